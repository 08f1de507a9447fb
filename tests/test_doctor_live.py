"""`zsync doctor --live` (issue 21 item 6) against the local Zapier stand-in, over real HTTP: every
assumption of docs/zapier-assumptions.md holds against the faithful stand-in (exit 0), each knob that makes
the stand-in differ (infra/local/tables_service/quirks.py, its faults) is reported "different", a
sync-breaking one exits 1, and the scratch table and inboxes are gone afterwards - also when checks fail
midway and after Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from typer.testing import CliRunner

from infra.deploy import doctor_live
from infra.deploy.doctor_live import DIFFERENT, OK, UNCHECKED, Finding, Options
from infra.local.tables_service import TablesService, start_tables_service
from shared.platform.settings import Settings

SECRET = "doctor-live-" + os.urandom(6).hex()
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[TablesService]:
    with start_tables_service(tmp_path / "tables.sqlite3", [], client_secret=SECRET) as s:
        yield s


def settings_for(svc: TablesService) -> Settings:
    return Settings(zapier_base_url=svc.url, zapier_token_url=svc.url + "/oauth/token/",
                    zapier_client_id=svc.client_id, zapier_client_secret=SECRET, http_timeout_s=5.0)


def env_for(svc: TablesService) -> dict[str, str]:
    return {"ZSYNC_ZAPIER_BASE_URL": svc.url, "ZSYNC_ZAPIER_TOKEN_URL": svc.url + "/oauth/token/",
            "ZSYNC_ZAPIER_CLIENT_ID": svc.client_id, "ZSYNC_ZAPIER_CLIENT_SECRET": SECRET}


def quirk(svc: TablesService, **knobs: Any) -> None:
    answer = requests.post(svc.url + "/_admin/quirks", json=knobs, timeout=5)
    assert answer.status_code == 200, answer.text


def by_key(findings: list[Finding]) -> dict[str, Finding]:
    out: dict[str, Finding] = {}
    for f in findings:
        assert f.key not in out, f"{f.key} reported twice"
        out[f.key] = f
    return out


def leftovers(svc: TablesService) -> tuple[list[str], list[str]]:
    """Scratch tables and scratch inboxes still in the stand-in."""
    tables = [n for n in svc.table_ids() if n.startswith(doctor_live.PREFIX)]
    inboxes = svc.ctx.inboxes.list(None, None, 100, 0)["results"]  # type: ignore[union-attr]
    return tables, [i["key"] for i in inboxes if str(i["key"]).startswith(doctor_live.PREFIX)]


def fast(**kwargs: Any) -> Options:
    return Options(trigger_wait_s=5.0, **kwargs)


def test_every_assumption_holds_against_the_faithful_standin_and_the_scratch_table_is_gone(svc) -> None:
    findings = doctor_live.run(settings_for(svc), fast())
    found = by_key(findings)
    assert set(found) == set(doctor_live.ASSUMPTIONS)  # every listed assumption is reported, once
    different = {k: f.observed for k, f in found.items() if f.status == DIFFERENT}
    assert different == {}
    # what the API cannot show is said, not guessed
    assert {k for k, f in found.items() if f.status == UNCHECKED} == {"exact_indexed", "restore"}
    assert not any(f.fails for f in findings) and doctor_live.exit_code(findings) == 0
    assert "429 at request 101" in found["rate_limit"].observed and "Retry-After" in found["rate_limit"].observed
    assert "record id ULID" in found["payload_change"].observed
    assert found["cleanup"].status == OK and "removed" in found["cleanup"].observed
    assert leftovers(svc) == ([], [])


def test_cli_live_exits_0_prints_the_table_and_removes_the_scratch_table(svc, zsync_env) -> None:
    from infra.cli import app
    from infra.deploy import cli

    monkeypatch = zsync_env(**env_for(svc))  # a clean ZSYNC_* environment; the cached settings reset after
    monkeypatch.setattr(cli.console, "width", 250)
    result = CliRunner().invoke(app, ["doctor", "--live", "--skip-rate-limit", "--trigger-wait", "5"])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "what zsync assumes about zapier.com" in flat and "Every sync-breaking assumption holds" in flat
    assert "skipped (--skip-rate-limit)" in flat
    assert leftovers(svc) == ([], [])


def test_cli_help_explains_the_flag() -> None:
    from infra.cli import app

    result = CliRunner().invoke(app, ["doctor", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    flat = " ".join(result.output.replace("│", " ").split())
    for part in ("--live", "scratch table zsync-doctor-RANDOM", "ALWAYS removes the table and inboxes",
                 "--keep", "Exit 0: every sync-breaking assumption holds; 1: one differs or could not be checked",
                 "--skip-rate-limit"):
        assert part in flat, part


def test_frozen_edited_at_is_different_and_fails_the_run(svc) -> None:
    quirk(svc, freeze_edited_at=True)
    findings = doctor_live.run(settings_for(svc), fast(rate_limit=False))
    found = by_key(findings)
    assert found["edited_at_moves"].status == DIFFERENT and found["edited_at_moves"].fails
    before, after = found["edited_at_moves"].observed.split(" (")[0].removeprefix("edited_at ").split(" -> ")
    assert before == after
    assert doctor_live.exit_code(findings) == 1
    assert leftovers(svc) == ([], [])


def test_idempotency_key_ignored_is_different_and_exits_1(svc, zsync_env) -> None:
    from infra.cli import app
    from infra.deploy import cli

    quirk(svc, idempotency=False)
    monkeypatch = zsync_env(**env_for(svc))
    monkeypatch.setattr(cli.console, "width", 250)  # made at import: whatever width the session had then
    result = CliRunner().invoke(app, ["doctor", "--live", "--skip-rate-limit", "--trigger-wait", "5"])
    assert result.exit_code == 1, result.output
    flat = " ".join(result.output.split())
    assert "idempotency_replay" in flat and "2 record(s) made" in flat and "(breaks the sync)" in flat
    assert leftovers(svc) == ([], [])


def test_a_lower_rate_limit_and_an_earlier_quarantine_are_different_but_do_not_fail_the_run(svc) -> None:
    quirk(svc, rate_limit=50)
    armed = requests.post(svc.url + "/_admin/inbox/faults", json={"quarantine_after": 3}, timeout=5)
    assert armed.status_code == 200
    findings = doctor_live.run(settings_for(svc), fast())
    found = by_key(findings)
    assert found["rate_limit"].status == DIFFERENT and not found["rate_limit"].fails
    assert "429 at request 51" in found["rate_limit"].observed
    assert found["lease_count"].status == DIFFERENT and "leased 3 time(s)" in found["lease_count"].observed
    assert [k for k, f in found.items() if f.status == DIFFERENT] == ["lease_count", "rate_limit"]
    assert doctor_live.exit_code(findings) == 0
    assert leftovers(svc) == ([], [])


def test_an_inbox_handing_out_the_newest_first_is_noted(svc) -> None:
    """Zapier documents no lease order; the sync counts on a record's edits leased oldest first (a later edit
    waits for an earlier one leased elsewhere, never for one still waiting in the inbox). An inbox that hands
    out the newest first is noted, with the order seen (exit 0: it narrows a guard, it does not stop the sync)."""
    armed = requests.post(svc.url + "/_admin/inbox/faults", json={"newest_first": True}, timeout=5)
    assert armed.status_code == 200 and armed.json() == {"newest_first": True}
    findings = doctor_live.run(settings_for(svc), fast(rate_limit=False))
    found = by_key(findings)
    assert found["lease_order"].status == DIFFERENT and not found["lease_order"].fails
    assert "order-3, order-2, order-1, order-0" in found["lease_order"].observed
    assert doctor_live.exit_code(findings) == 0
    assert leftovers(svc) == ([], [])


def test_an_app_listing_more_triggers_is_noted_with_the_key_to_pass(svc) -> None:
    """zapier.com describes six Tables events and publishes no keys: with two more look-alike triggers listed
    (one for new or updated records, one for added, updated or deleted ones), `zsync wire zapier` cannot tell
    which to take. Noted with the --trigger-key to pass (exit 0); the inbox checks use the new-or-updated one."""
    quirk(svc, extra_triggers=[{"key": "legacy_new_or_updated", "name": "New or Updated Record (legacy)"},
                               {"key": "record_changes", "name": "New, Updated or Deleted Record (all fields)"}])
    findings = doctor_live.run(settings_for(svc), fast(rate_limit=False))
    found = by_key(findings)
    assert found["trigger_new_or_updated"].status == OK
    assert "the inboxes get 'new_or_updated_record'" in found["trigger_new_or_updated"].observed
    assert found["trigger_pick"].status == DIFFERENT
    assert "pass --trigger-key new_or_updated_record" in found["trigger_pick"].observed
    assert found["trigger_deleted"].observed.startswith("listed: ")
    assert found["payload_change"].status == OK
    assert found["payload_delete"].status == OK
    assert "0 message(s) on the new-or-updated inbox" in found["payload_delete"].observed
    assert doctor_live.exit_code(findings) == 0
    assert leftovers(svc) == ([], [])


def test_a_short_token_lifetime_is_noted(svc) -> None:
    quirk(svc, token_ttl_s=120)
    found = by_key(doctor_live.run(settings_for(svc), fast(rate_limit=False)))
    assert found["token_lifetime"].status == DIFFERENT and "expires_in 120" in found["token_lifetime"].observed
    assert not found["token_lifetime"].fails


def test_a_jwt_whose_exp_disagrees_with_expires_in_is_noted(svc) -> None:
    quirk(svc, jwt_life_s=600)  # expires_in still says 3600
    found = by_key(doctor_live.run(settings_for(svc), fast(rate_limit=False)))
    token = found["token_lifetime"]
    assert token.status == DIFFERENT and not token.fails
    assert "a JWT living 600 s (exp - iat)" in token.observed and "disagrees with expires_in" in token.observed
    assert found["round_trip"].status == OK  # the JWT-shaped token is accepted as a Bearer token


def test_checks_failing_midway_still_remove_the_scratch_table(svc) -> None:
    """Every update refused (an injected 400 on PATCH, both APIs): the checks that update fail, the run
    goes on and ends 1, and the scratch table and inbox are removed."""
    armed = requests.post(svc.url + "/_admin/faults", json={"status": 400, "count": 10_000, "method": "PATCH"},
                          timeout=5)
    assert armed.status_code == 200
    findings = doctor_live.run(settings_for(svc), fast(rate_limit=False))
    found = by_key(findings)
    assert found["round_trip"].status == UNCHECKED and "400" in found["round_trip"].observed
    assert found["edited_at_moves"].status == UNCHECKED
    assert set(found) == set(doctor_live.ASSUMPTIONS)  # one row each, also for the checks that broke
    assert doctor_live.exit_code(findings) == 1
    assert found["cleanup"].status == OK
    assert leftovers(svc) == ([], [])


def test_refused_credentials_report_every_assumption_unchecked_and_exit_1(svc) -> None:
    wrong = settings_for(svc).model_copy(update={"zapier_client_secret": "wrong"})
    findings = doctor_live.run(wrong, fast())
    found = by_key(findings)
    assert set(found) == set(doctor_live.ASSUMPTIONS)
    assert {f.status for k, f in found.items() if k != "cleanup"} == {UNCHECKED}
    assert "could not make the scratch table: TablesAuthError" in found["round_trip"].observed
    assert found["cleanup"].observed == "removed nothing (none was made)"
    assert doctor_live.exit_code(findings) == 1


def test_keep_leaves_the_scratch_table(svc) -> None:
    found = by_key(doctor_live.run(settings_for(svc), fast(keep=True, rate_limit=False)))
    assert found["cleanup"].observed.startswith("kept (--keep)")
    tables, inboxes = leftovers(svc)
    assert len(tables) == 1 and len(inboxes) == 1


@pytest.fixture
def ctrl_c() -> Iterator[None]:
    """Ctrl-C as a terminal delivers it, whatever this process inherited: a process started with SIGINT ignored
    (a runner's background job) ignores it, and so do the processes it starts - two CI runs' Ctrl-C tests
    failed so (no KeyboardInterrupt; a doctor run that never stopped). Python's own handler for the test, and
    for the processes it starts (a handler is reset to the default at exec, an ignored signal is not)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c")
def test_ctrl_c_midway_removes_the_scratch_table(svc) -> None:
    """SIGINT while a check waits on a hanging request: exit 130, nothing left behind."""
    armed = requests.post(svc.url + "/_admin/faults",
                          json={"status": 503, "count": 10_000, "method": "PATCH", "hang_s": 3}, timeout=5)
    assert armed.status_code == 200
    # (a retry budget longer than the test's waits: the round trip keeps retrying the hanging update until the
    # signal comes - with 5 s it gave up first under CI load, and the run ended before the signal, exit 1 - and
    # shorter than the wait for the exit: once, under CI load, the exit waited out a 60 s budget; not traced)
    env = os.environ | env_for(svc) | {"ZSYNC_HTTP_TIMEOUT_S": "5", "ZSYNC_RETRY_BUDGET_S": "20"}
    proc = subprocess.Popen([sys.executable, "-m", "infra.cli", "doctor", "--live", "--skip-rate-limit"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not leftovers(svc)[0] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert leftovers(svc)[0], "the scratch table was never made"
        time.sleep(1.0)  # inside the round trip, in the hanging update
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "interrupted; cleanup: removed table" in " ".join(err.split())
    assert leftovers(svc) == ([], [])


def test_no_credentials_exits_2(zsync_env, tmp_path, monkeypatch) -> None:
    from infra.cli import app

    zsync_env()  # no ZSYNC_* variable at all
    monkeypatch.chdir(tmp_path)  # and no .zsync/ of a local run
    result = CliRunner().invoke(app, ["doctor", "--live"])
    assert result.exit_code == 2, result.output
    assert "ZSYNC_ZAPIER_CLIENT_ID" in result.output


def test_the_assumptions_page_lists_every_check_and_whether_a_difference_breaks_the_sync() -> None:
    rows = [line for line in (REPO / "docs" / "zapier-assumptions.md").read_text().splitlines()
            if line.startswith("| ") and "`" in line]
    for key, (_, breaks) in doctor_live.ASSUMPTIONS.items():
        if key == "cleanup":
            continue
        name = "value_*" if key.startswith("value_") and key != "value_empty" else key
        row = [r for r in rows if f"`{name}`" in r]
        assert len(row) == 1, key
        assert ("**breaks**" in row[0]) == breaks, key


@pytest.mark.usefixtures("ctrl_c")
def test_a_ctrl_c_the_kernel_hands_to_a_check_s_thread_stops_the_run_at_once() -> None:
    """Python runs a signal's handler in the main thread, but the kernel may deliver the signal to any thread. A
    Ctrl-C landing on a check's thread was seen only when the main thread's wait for that check ended (a CI run
    waited out its 60 s for the exit; here 30 s, the check's length): the main thread waits in short slices."""
    def check(_scratch: Any) -> list[Any]:
        me = threading.get_ident()  # while this thread waits on Zapier (here: sleeps), Ctrl-C is delivered to it
        threading.Timer(0.5, lambda: signal.pthread_kill(me, signal.SIGINT)).start()
        time.sleep(30)
        return []

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        doctor_live._bounded((("round_trip",), check), None, 60)  # type: ignore[arg-type]
    took = time.monotonic() - started
    assert took < 5, f"Ctrl-C seen after {took:.1f} s"
