"""Issue 20: when an agent and a person change different fields of one record at about the same time, both
changes survive; when both change the same field, the later change wins. Black-box, on the local stack (the
functions over HTTP, the trigger inboxes, pg_net, the outbox): the final state of both sides, the audit log,
the Tables records (no duplicate) and the write counts (no loop).

The issue's two measurements, with the stack's real timings (nothing faked but the people):

* an agent sets ``status`` in Supabase; 50 ms later a person types a note into ``error_message`` in Tables
  (a cell edit: ``updated_at`` left as it was, Zapier's ``edited_at`` moves). Before the merge both sides
  ended with the note and the OLD status (the agent's change lost);
* a person's note first; an agent's status change committed 0.3 s later. Before: the new status and NO note.

Then each entry point that decides, one at a time: the two sides are made to diverge while every change
notification is lost in transit (``stack.drop_deliveries(1.0)``: the person's change waits in the trigger
inbox, the agent's in the outbox), then ONE entry point meets both changes - a single delivery POSTed to the
function (a Zap), an inbox lease (the scheduled drain), an outbox batch (the sweeper's wake-up), ``zsync
replay`` of a dead letter (either direction) or ``zsync reconcile`` - and afterwards everything still held is
released. Whichever decides, both sides must end with both changes, the merge audited once.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from shared.core.mapping import parse_supabase_record, parse_tables_record
from shared.core.spec import FUNCTIONS, TABLES
from shared.platform.settings import DEFAULT_SECRET_HEADER
from tests.e2e import Supabase, Tables, blind_writes_off, eventually, release_held, settle, uid

JOBS = TABLES["agent_jobs"]
FIELDS = ("status", "error_message", "retry_count", "parameters", "job_type")


# --- helpers ---------------------------------------------------------------------------------------------------


def new_job(stack: Any, tables: Tables, supabase: Supabase, prefix: str) -> tuple[str, str]:
    """A job both sides agree on (created by an agent in Supabase, synced): -> (id, its Tables record id)."""
    rid = uid(prefix)
    supabase.query("INSERT INTO agent_jobs (id, job_type, status, retry_count, parameters) "
                   "VALUES (%s, 'crawl', 'queued', 0, '{\"depth\": 1}')", (rid,))
    rec = eventually(lambda: tables.find("agent_jobs", rid))
    settle(stack)
    return rid, rec["id"]


def agent_sets(supabase: Supabase, rid: str, **values: Any) -> None:
    """A Claude agent's UPDATE, leaving updated_at to the trigger (as agents do)."""
    sets = ", ".join(f"{k} = %s" for k in values)
    supabase.query(f"UPDATE agent_jobs SET {sets} WHERE id = %s", (*values.values(), rid))


def person_types(tables: Tables, rec_id: str, **values: Any) -> None:
    """A person edits cells in Zapier's UI: only those cells, updated_at as it was (edited_at moves)."""
    tables.patch("agent_jobs", rec_id, values)


def both(tables: Tables, supabase: Supabase, rid: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Supabase's row, Tables' record) parsed the same way; fails on a duplicate in Tables."""
    found = tables.find_all("agent_jobs", rid)
    assert len(found) == 1, f"{len(found)} Tables records hold id {rid}"
    stored = supabase.row("agent_jobs", rid)
    assert stored is not None, rid
    return parse_supabase_record(JOBS, stored), parse_tables_record(JOBS, found[0]["data"])


def fields_of(row: dict[str, Any]) -> dict[str, Any]:
    return {f: (None if row.get(f) == "" else row.get(f)) for f in FIELDS}


def audit_ids(supabase: Supabase, rid: str) -> set[str]:
    return {a["id"] for a in supabase.audit(rid)}


def merge_entries(supabase: Supabase, rid: str, before: set[str]) -> list[dict[str, Any]]:
    """The audit entries written since ``before`` that report a merge (their action or metadata say so)."""
    out = []
    for entry in supabase.audit(rid):
        if entry["id"] in before:
            continue
        text = json.dumps({"action": entry.get("action"), "metadata": entry.get("metadata")})
        if "merge" in text.lower():
            out.append(entry)
    return out


def assert_merge_audited_once(supabase: Supabase, rid: str, before: set[str], fields: tuple[str, ...],
                              *, at_most: bool = False) -> None:
    """One merge entry naming ``fields`` (``at_most``: none is fine too, when the timing let the two changes
    pass each other without meeting)."""
    entries = merge_entries(supabase, rid, before)
    new = [(e["action"], e.get("metadata")) for e in supabase.audit(rid) if e["id"] not in before]
    if at_most and not entries:
        return
    assert len(entries) == 1, f"expected one merge audit entry for {rid}, got {len(entries)}; new entries: {new}"
    named = json.dumps(entries[0].get("metadata"))
    for f in fields:
        assert f in named, f"the merge entry does not name {f!r}: {named}"


def counts(stack: Any, tables: Tables, supabase: Supabase, rid: str) -> tuple[int, int, int]:
    return supabase.writes("agent_jobs", rid), tables.writes("agent_jobs"), len(supabase.audit(rid))


def assert_quiet(stack: Any, tables: Tables, supabase: Supabase, rid: str) -> None:
    """No loop: another sweep, inbox drain and a second of waiting change nothing anywhere."""
    before = counts(stack, tables, supabase, rid)
    time.sleep(0.3)
    settle(stack)
    assert counts(stack, tables, supabase, rid) == before, "the sync kept writing after it settled (a loop)"


def expect_both_sides(tables: Tables, supabase: Supabase, rid: str, **expected: Any) -> None:
    in_supabase, in_tables = both(tables, supabase, rid)
    want = {f: expected.get(f) for f in expected}
    got_s = {f: fields_of(in_supabase)[f] for f in want}
    got_t = {f: fields_of(in_tables)[f] for f in want}
    assert got_s == want and got_t == want, (
        f"lost field(s): wanted {want}\n  Supabase holds {got_s}\n  Tables holds   {got_t}")
    assert fields_of(in_supabase) == fields_of(in_tables), (fields_of(in_supabase), fields_of(in_tables))
    # The copies' updated_at may differ: a Tables cell edit that wins is applied at Zapier's edited_at and the new
    # updated_at is not written back (docs/design-decisions.md); Supabase never holds the older of the two.
    assert in_supabase["updated_at"] >= in_tables["updated_at"], (in_supabase["updated_at"], in_tables["updated_at"])


def post(stack: Any, function: str, payload: dict[str, Any]) -> requests.Response:
    return requests.post(stack.functions[function].url, json=payload,
                         headers={DEFAULT_SECRET_HEADER: stack.secret}, timeout=30)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A stack of its own with `make up`'s timings (pg_net polled every 0.25 s: the issue's measurements were
    taken there; the shared fixture polls every 0.05 s, which hides the race). The scheduled sweep, trash check
    and inbox drain run only when a test calls them."""
    from infra.local.stack import StackConfig, running_stack

    with running_stack(Path(f"/tmp/zsync-fm-{os.getpid()}"), sweep_interval_s=3600, trash_interval_s=3600,
                       safety_drain_interval_s=3600,
                       pgnet_poll_interval_s=StackConfig.pgnet_poll_interval_s) as local:
        yield local


@pytest.fixture(autouse=True)
def _deliveries_restored(stack) -> Iterator[None]:
    yield
    stack.drop_deliveries(0.0)
    try:  # a test that failed may leave work the sync cannot finish: that test reports it, not the next ones
        settle(stack)
    except (AssertionError, TimeoutError) as exc:
        print(f"after the test the stack did not settle: {exc}")


# --- 1. the two measurements, real timings --------------------------------------------------------------


TRIALS = 3  # the race is the stack's own: each measurement is taken a few times, every trial must keep both


def trials(stack: Any, tables: Tables, supabase: Supabase, name: str, first: str, gap_s: float,
           agent: dict[str, Any], person: dict[str, Any], expected: dict[str, Any], n: int = TRIALS,
           slow: bool = False) -> None:
    """``n`` fresh jobs; on each, ``first`` ("agent" or "person") writes, ``gap_s`` later the other; then
    everything settles. ``slow``: both changes' notifications are still in transit when the second write is
    made (delivered after it), as when a delivery takes longer than the gap (Zapier's trigger and the pg_net
    queue are not this local stack's few milliseconds). Fails listing every trial that lost a field."""
    lost = []
    n = 1 if slow else n  # held deliveries make the meeting certain: one trial is the measurement
    for i in range(n):
        rid, rec_id = new_job(stack, tables, supabase, f"fm-{name}")
        before = audit_ids(supabase, rid)
        steps = [lambda r=rid: agent_sets(supabase, r, **agent), lambda r=rec_id: person_types(tables, r, **person)]
        if first == "person":
            steps.reverse()
        if slow:
            stack.drop_deliveries(1.0)
        steps[0]()
        time.sleep(gap_s)
        steps[1]()
        if slow:
            release_held(stack)
        settle(stack)
        in_supabase, in_tables = (fields_of(r) for r in both(tables, supabase, rid))
        if any(in_supabase[f] != v or in_tables[f] != v for f, v in expected.items()):
            lost.append(f"trial {i} ({rid}): Supabase {in_supabase}, Tables {in_tables}")
            continue
        assert in_supabase == in_tables, (in_supabase, in_tables)
        own = tuple(sorted(set(agent) ^ set(person)))  # the fields only one of them changed: merged, if they met
        assert_merge_audited_once(supabase, rid, before, own, at_most=not (slow and own))
        assert_quiet(stack, tables, supabase, rid)
    assert not lost, f"{len(lost)} of {n} trials lost a field; wanted {expected}:\n  " + "\n  ".join(lost)


@pytest.mark.parametrize("slow", [False, True], ids=["live", "slow_delivery"])
def test_agent_status_then_person_note_50ms_later_both_survive(stack, tables, supabase, slow):
    """The issue's first measurement: before the merge the agent's status was lost."""
    trials(stack, tables, supabase, "a50", "agent", 0.05, {"status": "agent"},
           {"error_message": "a note from a person"},
           {"status": "agent", "error_message": "a note from a person", "retry_count": 0, "job_type": "crawl"},
           slow=slow)


@pytest.mark.parametrize("slow", [False, True], ids=["live", "slow_delivery"])
def test_person_note_then_agent_status_0_3s_later_both_survive(stack, tables, supabase, slow):
    """The issue's second measurement: before the merge the person's note was lost."""
    trials(stack, tables, supabase, "p300", "person", 0.3, {"status": "agent"}, {"error_message": "typed first"},
           {"status": "agent", "error_message": "typed first", "retry_count": 0, "job_type": "crawl"}, slow=slow)


@pytest.mark.parametrize("first", ["agent", "person"])
@pytest.mark.parametrize("gap_s", [0.0, 0.1, 0.2])
def test_different_fields_both_orders_at_other_gaps(stack, tables, supabase, first, gap_s):
    """Gaps around the stack's own delivery time (pg_net polled every 0.25 s): whichever path meets them."""
    trials(stack, tables, supabase, "gap", first, gap_s, {"status": "agent", "retry_count": 3},
           {"error_message": "person's note"},
           {"status": "agent", "retry_count": 3, "error_message": "person's note"}, n=1)


# --- 2. the same field: the later change wins ------------------------------------------------------------------


@pytest.mark.parametrize("slow", [False, True], ids=["live", "slow_delivery"])
def test_same_field_agent_then_person_50ms_later_the_person_wins(stack, tables, supabase, slow):
    """Both change status; the person typed later, so theirs stays (today the Tables copy was 'behind')."""
    trials(stack, tables, supabase, "same-a", "agent", 0.05, {"status": "agent"}, {"status": "person"},
           {"status": "person"}, slow=slow)


@pytest.mark.parametrize("slow", [False, True], ids=["live", "slow_delivery"])
def test_same_field_person_then_agent_0_3s_later_the_agent_wins(stack, tables, supabase, slow):
    trials(stack, tables, supabase, "same-p", "person", 0.3, {"status": "agent"},
           {"status": "person"}, {"status": "agent"}, slow=slow)


def test_same_field_and_different_fields_at_once(stack, tables, supabase):
    """Both change status (the later, the person, wins it); each also changes a field of its own (both kept)."""
    rid, rec_id = new_job(stack, tables, supabase, "fm-mixed")
    before = audit_ids(supabase, rid)
    stack.drop_deliveries(1.0)
    agent_sets(supabase, rid, status="agent", retry_count=7)
    time.sleep(0.05)
    person_types(tables, rec_id, status="person", error_message="why it failed")
    release_held(stack)
    settle(stack)
    expect_both_sides(tables, supabase, rid, status="person", retry_count=7, error_message="why it failed")
    assert_merge_audited_once(supabase, rid, before, ("retry_count", "error_message"))
    assert_quiet(stack, tables, supabase, rid)


# --- 3. every entry point ---------------------------------------------------------------------------------------


def _single_delivery(stack: Any, tables: Tables, supabase: Supabase, rid: str) -> str:
    """A Zap POSTs the person's edited record to agent_jobs_to_supabase."""
    rec = tables.find("agent_jobs", rid)
    r = post(stack, "agent_jobs_to_supabase", dict(rec["data"], edited_at=rec["edited_at"]))
    assert r.status_code == 200, r.text
    return r.json()["outcome"]


def _inbox_lease(stack: Any, tables: Tables, supabase: Supabase, rid: str) -> str:
    """The every-minute drain leases the person's change from the trigger inbox."""
    return json.dumps(stack.safety_drain())


def _outbox_batch(stack: Any, tables: Tables, supabase: Supabase, rid: str) -> str:
    """The sweeper wakes agent_jobs_to_tables, whose drain meets the person's edit in Tables (the wake-up is
    sent by pg_net: done when its request is)."""
    from infra.local.pgnet_sql import wait_idle

    with blind_writes_off(stack):  # the drain's own merge: it finds the record (blind, the delivery merges)
        sent = stack.sweep_outbox(0)
        wait_idle(stack.database_url, timeout_s=30)
    return str(sent)


def _replay_settings(stack: Any):
    from shared.platform.settings import Settings

    return Settings(database_url=stack.function_database_url, zapier_base_url=stack.tables.url,
                    zapier_token_url=stack.tables.url + "/oauth/token/", zapier_client_id=stack.client_id,
                    zapier_client_secret=stack.client_secret, table_ids=stack.table_ids, dlq_url=stack.dlq_url,
                    aws_endpoint_url=stack.aws_endpoint_url, webhook_secret=stack.secret, retry_budget_s=3)


def _replay(stack: Any, function: str, payload: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> str:
    from infra import replay
    from shared.adapters.dead_letter import DeadLetter, DeadLetterQueue

    aws = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in aws.items():
        monkeypatch.setenv(k, v)
    settings = _replay_settings(stack)
    at = datetime.now(UTC)
    DeadLetterQueue(settings).send(DeadLetter(
        function=function, payload=payload, error_type="DatabaseUnavailable", error_message="test: an outage",
        received_at=at, first_seen=at, last_seen=at, record_id=payload.get("id") or payload["record"]["id"]))
    report = replay.replay(settings)
    assert report.ok, report
    return json.dumps(report.counts.get(function))


def _replay_to_supabase(stack, tables, supabase, rid, monkeypatch) -> str:
    """The person's change was dead-lettered (Supabase unreachable); zsync replay delivers it."""
    rec = tables.find("agent_jobs", rid)
    return _replay(stack, "agent_jobs_to_supabase", dict(rec["data"], edited_at=rec["edited_at"]), monkeypatch)


def _replay_to_tables(stack, tables, supabase, rid, monkeypatch) -> str:
    """The agent's change was dead-lettered (Tables unreachable); zsync replay delivers it (the single path)."""
    record = supabase.row("agent_jobs", rid)
    hook = {"type": "UPDATE", "table": "agent_jobs", "schema": "public", "record": record, "old_record": None}
    with blind_writes_off(stack):  # the replay's own merge: it finds the record (blind, the delivery merges,
        return _replay(stack, "agent_jobs_to_tables", hook, monkeypatch)  # when it comes after the replay)


def _reconcile(stack: Any, tables: Tables, supabase: Supabase, rid: str) -> str:
    from infra.reconcile import reconcile
    from shared.platform.settings import Settings
    from shared.services.sync import SyncContext

    ctx = SyncContext(settings=Settings(database_url=stack.function_database_url, zapier_base_url=stack.tables.url,
                                        tables_token=stack.token, table_ids=stack.table_ids))
    try:
        result = reconcile(ctx, ["agent_jobs"])
    finally:
        ctx.tables.close()
    assert not result.tables["agent_jobs"].errors, result.tables["agent_jobs"].errors
    return repr(result.tables["agent_jobs"])


ENTRY_POINTS: dict[str, Callable[..., str]] = {
    "single_delivery": _single_delivery,
    "inbox_lease": _inbox_lease,
    "outbox_batch": _outbox_batch,
    "replay_to_supabase": _replay_to_supabase,
    "replay_to_tables": _replay_to_tables,
    "reconcile": _reconcile,
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_each_entry_point_merges_different_fields(stack, tables, supabase, entry, monkeypatch):
    rid, rec_id = new_job(stack, tables, supabase, f"fm-{entry[:8]}")
    before = audit_ids(supabase, rid)
    stack.drop_deliveries(1.0)  # both changes held in transit: the person's in the inbox, the agent's in the outbox
    agent_sets(supabase, rid, status="agent", retry_count=2)
    time.sleep(0.05)
    person_types(tables, rec_id, error_message="note", job_type="crawl-deep")
    release_held(stack)
    fn = ENTRY_POINTS[entry]
    answer = fn(stack, tables, supabase, rid, monkeypatch) if entry.startswith("replay") else \
        fn(stack, tables, supabase, rid)
    # What the entry point did on its own (before anything held is released): both changes in Supabase.
    decided = fields_of(parse_supabase_record(JOBS, supabase.row("agent_jobs", rid)))
    settle(stack)
    expect_both_sides(tables, supabase, rid, status="agent", retry_count=2, error_message="note",
                      job_type="crawl-deep")
    assert decided["error_message"] == "note" and decided["status"] == "agent", (entry, answer, decided)
    assert_merge_audited_once(supabase, rid, before, ("status", "error_message"))
    assert_quiet(stack, tables, supabase, rid)


def test_an_echo_of_our_own_write_is_never_a_change(stack, tables, supabase):
    """After a merge, the merged record's echo and the old deliveries still held change nothing."""
    rid, rec_id = new_job(stack, tables, supabase, "fm-echo")
    stack.drop_deliveries(1.0)
    agent_sets(supabase, rid, status="agent")
    person_types(tables, rec_id, error_message="note")
    old_tables = tables.find("agent_jobs", rid)
    release_held(stack)
    settle(stack)
    expect_both_sides(tables, supabase, rid, status="agent", error_message="note")
    writes = counts(stack, tables, supabase, rid)
    # The person's pre-merge record delivered late (a Zap's Autoreplay): older than the merge, nothing changes.
    r = post(stack, "agent_jobs_to_supabase", dict(old_tables["data"], edited_at=old_tables["edited_at"]))
    assert r.status_code == 200 and r.json()["outcome"] in ("unchanged", "skipped_stale"), r.text
    # The merged record's own echo.
    now = tables.find("agent_jobs", rid)
    r = post(stack, "agent_jobs_to_supabase", dict(now["data"], edited_at=now["edited_at"]))
    assert r.status_code == 200 and r.json()["outcome"] == "unchanged", r.text
    settle(stack)
    expect_both_sides(tables, supabase, rid, status="agent", error_message="note")
    assert counts(stack, tables, supabase, rid)[:2] == writes[:2]


def test_no_far_future_version_from_a_merge(stack, tables, supabase):
    rid, rec_id = new_job(stack, tables, supabase, "fm-time")
    stack.drop_deliveries(1.0)
    agent_sets(supabase, rid, status="agent")
    person_types(tables, rec_id, error_message="note")
    release_held(stack)
    settle(stack)
    expect_both_sides(tables, supabase, rid, status="agent", error_message="note")
    row = parse_supabase_record(JOBS, supabase.row("agent_jobs", rid))
    assert (row["updated_at"] - datetime.now(UTC)).total_seconds() < 1.0, row["updated_at"]


@pytest.mark.parametrize("entry", ["outbox_batch", "inbox_lease"])
def test_a_later_cell_edit_of_the_same_and_other_fields_meets_the_agents_change(stack, tables, supabase, entry):
    """The shape hypothesis found (tests/test_merge_properties.py): an agent changes parameters and retry_count,
    then a person edits retry_count, parameters and job_type; the person's change is later on the fields both
    changed and the only one on job_type: all three are the person's, whichever entry point meets them."""
    rid, rec_id = new_job(stack, tables, supabase, f"fm-mix-{entry[:5]}")
    stack.drop_deliveries(1.0)
    agent_sets(supabase, rid, parameters='{"w": "agent"}', retry_count=2)
    time.sleep(0.01)
    person_types(tables, rec_id, retry_count=4, parameters='{"w": "person"}', job_type="person")
    release_held(stack)
    ENTRY_POINTS[entry](stack, tables, supabase, rid)
    settle(stack)
    expect_both_sides(tables, supabase, rid, retry_count=4, parameters={"w": "person"}, job_type="person",
                      status="queued")
    assert_quiet(stack, tables, supabase, rid)


@pytest.mark.parametrize("agent_after", [False, True], ids=["alone", "agent_after"])
def test_several_cell_edits_waiting_in_the_inbox_the_last_one_wins(stack, tables, supabase, agent_after):
    """Hypothesis found it (test_merge_properties, --runslow): a person edits the same cell four times while the
    notifications are late, so one inbox lease holds four snapshots of the record that differ only in Zapier's
    edited_at (updated_at as it was); the last edit must win on both sides (an agent's later change of another
    field, held too, must not bring an earlier one back)."""
    rid, rec_id = new_job(stack, tables, supabase, "fm-edits")
    stack.drop_deliveries(1.0)
    for n in range(5, 9):
        person_types(tables, rec_id, job_type=f"person-{n}")
        time.sleep(0.01)
    if agent_after:
        agent_sets(supabase, rid, retry_count=9)
    release_held(stack)
    settle(stack)
    expect_both_sides(tables, supabase, rid, job_type="person-8", retry_count=9 if agent_after else 0)
    assert_quiet(stack, tables, supabase, rid)


@pytest.mark.parametrize("origin", ["replay", "live"])  # live: outbox batches off
def test_a_delivery_of_a_row_supabase_has_moved_on_from_writes_the_stored_row(stack, tables, supabase, origin):
    """The single-record path (a replayed dead letter, or a live delivery with outbox batches off) given a
    version Supabase has since replaced (a later write, a merge) writes the row Supabase holds: the stale row
    would overwrite, in Tables, a person's edit the later row holds (merged in), and its echo would then read
    as a Tables change undoing it. (The batch drain reads the stored rows itself.)"""
    from shared.services.sync import SupabaseWebhook
    from shared.services.to_tables import apply_from_supabase
    from tests.test_correctness import stack_context

    rid, _ = new_job(stack, tables, supabase, "fm-stale-delivery")
    stack.drop_deliveries(1.0)  # the two writes' own deliveries are held
    agent_sets(supabase, rid, status="first")
    stale = supabase.row("agent_jobs", rid)
    agent_sets(supabase, rid, status="second", retry_count=2)
    hook = SupabaseWebhook.model_validate({"type": "UPDATE", "table": "agent_jobs", "schema": "public",
                                           "record": stale, "old_record": None})
    result = apply_from_supabase(stack_context(stack), FUNCTIONS["agent_jobs_to_tables"], hook,
                                 origin=origin)
    assert str(result.outcome) == "applied", result
    found = tables.find("agent_jobs", rid)
    assert found is not None
    held = fields_of(parse_tables_record(JOBS, found["data"]))
    assert (held["status"], held["retry_count"]) == ("second", 2), held
    release_held(stack)
    settle(stack)
    expect_both_sides(tables, supabase, rid, status="second", retry_count=2)
    assert_quiet(stack, tables, supabase, rid)


def test_a_drain_leaves_a_field_both_changed_to_the_deliveries_of_two_tables_edits(stack, tables, supabase):
    """A person sets parameters in Tables (t1), an agent sets parameters in Supabase (t2), the person then sets
    status (t3) on the record still holding their parameters; every notification is still in transit. The
    *_to_tables drain then reads the Tables record - both edits, at t3's time - and would have handed the
    person's t1 parameters the record's t3 and kept them over the agent's later t2 (the soak's lost fields of a
    drain's read). It leaves the record to the two edits' deliveries (its entry stays pending) and drains the
    inbox holding them, and they decide each edit at its own time: the agent's parameters, the person's status."""
    with blind_writes_off(stack):  # the drain reads the record (with blind writes, each delivery decides anyway)
        _two_tables_edits(stack, tables, supabase)


def _two_tables_edits(stack: Any, tables: Tables, supabase: Supabase) -> None:
    rid, rec_id = new_job(stack, tables, supabase, "fm-two-edits")
    before = audit_ids(supabase, rid)
    stack.drop_deliveries(1.0)
    person_types(tables, rec_id, parameters='{"by": "person"}')
    time.sleep(0.05)
    agent_sets(supabase, rid, parameters='{"by": "agent"}')
    time.sleep(0.05)
    person_types(tables, rec_id, status="person")
    release_held(stack)
    _outbox_batch(stack, tables, supabase, rid)  # the drain meets the Tables record before its deliveries
    # ... and drained the person's inbox at once (the held notifications would have left it to the scheduled
    # drain): each edit decided at its own time, in Supabase before anything else ran
    decided = fields_of(parse_supabase_record(JOBS, supabase.row("agent_jobs", rid)))
    assert (decided["parameters"], decided["status"]) == ({"by": "agent"}, "person"), decided
    settle(stack)
    expect_both_sides(tables, supabase, rid, status="person", parameters={"by": "agent"})
    assert merge_entries(supabase, rid, before), "the deliveries' merge is audited"
    assert supabase.query("SELECT count(*) FROM zsync.outbox WHERE record_id = %s AND acked_at IS NULL",
                          (rid,))[0][0] == 0
    assert_quiet(stack, tables, supabase, rid)


def test_pulling_deliveries_without_an_inbox_is_a_no_op(stack):
    """A deployment whose Tables changes come by Zap has no inbox to pull from: the deferral's pull finds none
    and does nothing (no error; the deliveries come as they come), and with an inbox it drains it."""
    from infra.local.stack import LOCAL_STAGE
    from shared.services.inbox_consumer import pull_deliveries
    from tests.test_correctness import stack_context

    fn = FUNCTIONS["agent_jobs_to_supabase"]
    ctx = stack_context(stack)
    ctx.settings = ctx.settings.model_copy(update={"stage": "no-such-stage"})
    assert pull_deliveries(fn, ctx) is None
    ctx = stack_context(stack)
    ctx.settings = ctx.settings.model_copy(update={"stage": LOCAL_STAGE})
    report = pull_deliveries(fn, ctx)
    assert report is not None and report.stopped == "empty", report
