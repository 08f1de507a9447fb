"""The scheduled alert check against a real audit_log/outbox and a real local HTTP receiver standing in for
Slack: thresholds, one message when an alert opens, none while it stays open, one when it resolves,
concurrent checks posting once, a failed post retried by the next check, the URL never logged."""

from __future__ import annotations

import io
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import psycopg
import pytest
from typer.testing import CliRunner

from infra.cli import app
from shared.adapters.supabase_db import append_audit
from shared.platform.logs import get_logger
from shared.services import alerts
from tests.receiver import recording_server, serving


def _entry(action: str, lag: float | None = None, origin: str = "live", status: int = 400) -> dict:
    meta: dict = {"sync_direction": "tables_to_supabase", "function": "agent_jobs_to_supabase", "origin": origin}
    if action == "sync_failed":
        meta["status"] = status
    if lag is not None:
        meta["lag_seconds"] = lag
    return {"id": f"mon-{uuid.uuid4().hex}", "actor_type": "zapier_sync", "action": action, "metadata": meta}


@pytest.fixture
def fresh(database_url: str, db: psycopg.Connection) -> Iterator[str]:
    """A clean slate per test: the audit log is append-only, so each test gets its own database."""
    from infra.local.postgres import create_database, prepare_database, with_database

    url = create_database(with_database(database_url, "postgres"))
    prepare_database(url)
    yield url


@pytest.fixture
def slack() -> Iterator[tuple[str, list]]:
    with recording_server(reply=b"ok") as (base, got):
        yield f"{base}/services/T000/B000/XXXX", got


def add(url: str, *entries: dict) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for e in entries:
            append_audit(conn, e)


def texts(got: list) -> list[str]:
    return [r.body["text"] for r in got]


def test_thresholds(fresh):
    add(fresh, *[_entry("agent_jobs_synced", lag=1.0) for _ in range(20)])
    with psycopg.connect(fresh) as conn:
        health = alerts.read_health(conn)
    assert (health.applied, health.failed, health.live_lag_avg_s) == (20, 0, pytest.approx(1.0))
    assert health.firing() == {}
    add(fresh, _entry("sync_failed"))  # 1 of 21 = 4.8 %: under 5 %
    with psycopg.connect(fresh) as conn:
        assert alerts.read_health(conn).firing() == {}
    add(fresh, _entry("sync_failed", status=503))  # 2 of 22 = 9.1 %
    add(fresh, *[_entry("agent_jobs_synced", lag=120.0) for _ in range(20)])  # avg (20*1 + 20*120)/40 = 60.5 s
    add(fresh, *[_entry("agent_jobs_synced", lag=9999.0, origin="reconcile") for _ in range(5)])  # never counted
    add(fresh, *[_entry("sync_skipped_stale_data") for _ in range(11)])
    with psycopg.connect(fresh) as conn:
        health = alerts.read_health(conn)
        conn.execute("INSERT INTO zsync.outbox (table_name, record_id, op, created_at) "
                     "VALUES ('agent_jobs', 'stuck', 'UPDATE', now() - interval '6 minutes')")
        backlog = alerts.read_health(conn)
    assert health.live_lag_avg_s == pytest.approx(60.5) and health.repairs == 5
    assert set(health.firing()) == {"avg_lag", "conflicts"}  # failures diluted to 2 of 42
    assert "outbox_backlog" in backlog.firing() and backlog.outbox_oldest_age_s >= 360
    health.dead_letters = 1
    assert "dead_letters" in health.firing()


def test_one_alert_while_open_and_one_resolved_after_recovery(fresh, slack):
    url, got = slack
    add(fresh, *[_entry("agent_jobs_synced", lag=0.2) for _ in range(10)])
    assert alerts.check_and_notify(fresh, url).posted == [] and got == []
    add(fresh, *[_entry("sync_failed") for _ in range(2)])  # 2 of 12 = 16.7 %
    for _ in range(4):
        alerts.check_and_notify(fresh, url)
    assert len(got) == 1 and "failure_rate" in got[0].body["text"] and "16.7%" in got[0].body["text"]
    add(fresh, *[_entry("agent_jobs_synced", lag=0.2) for _ in range(40)])  # 2 of 52 = 3.8 %: recovered
    for _ in range(3):
        alerts.check_and_notify(fresh, url)
    assert len(got) == 2 and "resolved" in got[1].body["text"] and "failure_rate" in got[1].body["text"]
    with psycopg.connect(fresh) as conn:
        state = conn.execute("SELECT is_open, opened_at IS NOT NULL, resolved_at IS NOT NULL FROM zsync.alert_state "
                             "WHERE alert = 'failure_rate'").fetchone()
    assert state == (False, True, True)


def test_concurrent_checks_post_once(fresh, slack):
    url, got = slack
    add(fresh, _entry("agent_jobs_synced", lag=0.1), *[_entry("sync_failed") for _ in range(3)])
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait()
            alerts.check_and_notify(fresh, url)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(got) == 1


def test_a_failed_post_is_retried_and_the_url_never_logged(fresh):
    calls: list[int] = []
    plan = [503, 503, 200, 500, 500, 500, 500, 500, 200]  # the 2nd check exhausts its retries (1 + 4)

    class Flaky(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            status = plan[len(calls)] if len(calls) < len(plan) else 200
            calls.append(status)
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"ok" if status == 200 else b"busy")

        def log_message(self, *args: object) -> None:
            pass

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    log = get_logger("monitor")
    log.addHandler(handler)
    try:
        with serving(Flaky) as base:
            url = f"{base}/services/T1/B1/secretpart"
            add(fresh, _entry("sync_failed"))
            assert alerts.check_and_notify(fresh, url).posted == [("failure_rate", "opened")]  # after 2 retries
            add(fresh, *[_entry("agent_jobs_synced", lag=0.1) for _ in range(100)])  # resolves
            with pytest.raises(alerts.SlackError) as failed:
                alerts.check_and_notify(fresh, url)
            assert "secretpart" not in str(failed.value) and "500" in str(failed.value)
            with psycopg.connect(fresh) as conn:  # rolled back: still open, so the next check posts it
                assert conn.execute("SELECT is_open FROM zsync.alert_state WHERE alert = 'failure_rate'"
                                    ).fetchone() == (True,)
            assert alerts.check_and_notify(fresh, url).posted == [("failure_rate", "resolved")]
    finally:
        log.removeHandler(handler)
    assert calls == plan
    assert "secretpart" not in out.getvalue() and "alert_post_failed" in out.getvalue()


def test_a_failed_second_post_does_not_repost_the_first(fresh):
    """Issue 18 item 8: two transitions in one check, Slack takes the first and refuses the second (every
    retry): the next check posts the second only, for openings and for resolutions alike."""
    taken: list[str] = []
    refuse = {"dead_letters"}

    class Slack(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            text = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["text"]
            ok = not any(f" {alert}:" in text for alert in refuse)
            if ok:
                taken.append(text)
            self.send_response(200 if ok else 500)
            self.end_headers()
            self.wfile.write(b"ok" if ok else b"busy")

        def log_message(self, *args: object) -> None:
            pass

    with serving(Slack) as base:
        url = f"{base}/services/T2/B2/x"
        add(fresh, _entry("sync_failed"))  # failure_rate opens, and 3 dead letters: two openings
        with pytest.raises(alerts.SlackError):
            alerts.check_and_notify(fresh, url, dead_letters=3)
        assert [t.split(")")[1].split(":")[0].strip() for t in taken] == ["failure_rate"]
        refuse.clear()
        assert alerts.check_and_notify(fresh, url, dead_letters=3).posted == [("dead_letters", "opened")]
        assert alerts.check_and_notify(fresh, url, dead_letters=3).posted == []
        add(fresh, *[_entry("agent_jobs_synced", lag=0.1) for _ in range(100)])  # both resolve
        refuse.add("dead_letters")
        with pytest.raises(alerts.SlackError):
            alerts.check_and_notify(fresh, url, dead_letters=0)
        refuse.clear()
        assert alerts.check_and_notify(fresh, url, dead_letters=0).posted == [("dead_letters", "resolved")]
    kinds = [(":rotating_light:" in t, t.split(")")[1].split(":")[0].strip()) for t in taken]
    assert kinds == [(True, "failure_rate"), (True, "dead_letters"), (False, "failure_rate"),
                     (False, "dead_letters")]  # each transition posted exactly once


def test_without_a_slack_url_nothing_is_recorded(fresh, slack):
    add(fresh, _entry("sync_failed"))
    assert alerts.check_and_notify(fresh, None).skipped == "no Slack webhook URL"
    url, got = slack
    assert alerts.check_and_notify(fresh, url).posted == [("failure_rate", "opened")] and len(got) == 1


def test_cli_monitor_exits_nonzero_posts_once_and_prints_json(fresh, slack, monkeypatch):
    url, got = slack
    add(fresh, *[_entry("sync_failed") for _ in range(3)])
    monkeypatch.setenv("ZSYNC_SLACK_WEBHOOK_URL", url)
    from shared.platform.settings import reset_settings

    reset_settings()
    try:
        first = CliRunner().invoke(app, ["monitor", "--database-url", fresh])
        second = CliRunner().invoke(app, ["monitor", "--database-url", fresh, "--json"])
    finally:
        monkeypatch.delenv("ZSYNC_SLACK_WEBHOOK_URL")
        reset_settings()
    assert first.exit_code == 1, first.output
    assert second.exit_code == 1, second.output
    report = json.loads(second.stdout)
    assert report["firing"] == ["failure_rate"] and report["posted"] == [] and report["health"]["failed"] == 3
    assert len(got) == 1 and "failure rate" in got[0].body["text"].lower()
    assert url not in first.output + second.output


def test_local_timer_runs_the_check_as_the_functions_role(fresh, slack):
    """The local stack's scheduler, connected as the least-privileged role the monitor Lambda uses."""
    import time

    from infra.local.postgres import function_role_url
    from infra.monitor import MonitorTimer
    from shared.platform.settings import Settings

    url, got = slack
    role_url = function_role_url(fresh)
    add(fresh, *[_entry("sync_failed") for _ in range(2)])
    timer = MonitorTimer(role_url, Settings(database_url=role_url, slack_webhook_url=url), interval_s=0.2)
    timer.start()
    try:
        deadline = time.monotonic() + 30
        while timer.runs < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        timer.stop()
    assert timer.runs >= 4 and len(got) == 1 and "failure_rate" in got[0].body["text"]
