"""Issue 21 item 3, Supabase -> Tables: a single agent UPDATE costs ONE Tables request (a PATCH by the Zapier
record id the sync remembered, zsync.tables_known / zsync.blind_plan: no find), a burst <= 0.02 requests per
record, a redelivery none, and what the find guarded still holds: a person's edit made in Tables just before the
blind write is merged (both sides), of another field or of the same one; an update of a record deleted in Tables
follows the delete rules (the PATCH is refused, the find with the trash decides); an id-less Tables record still
gets its id. Counted with the stand-in's request log."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import requests

from shared.adapters.zapier_errors import TablesNotFound
from tests.e2e import blind_writes, blind_writes_off, eventually, late_deliveries, uid, wakeups_lost
from tests.test_tables_deletes import delete_in_tables, lose_delete_events, tombstone


@pytest.fixture(autouse=True, scope="module")
def blind_writes_on(stack: Any) -> Iterator[None]:
    """The one-request path is behind zsync.config 'blind_writes' ("on" by default since 20261206200301: see
    docs/design-decisions.md, "One Tables request per Supabase change"): kept on here whatever the default."""
    with blind_writes(stack, True):
        yield


def _requests(stack: Any) -> list[dict]:
    log = requests.get(f"{stack.tables.url.rstrip('/')}/_admin/requests", timeout=10).json()["data"]
    return [r for r in log if "/records" in r["path"] or "/query" in r["path"]]


def _reset(stack: Any) -> None:
    requests.delete(f"{stack.tables.url.rstrip('/')}/_admin/requests", timeout=10)


def _agreed_job(stack: Any, tables: Any, supabase: Any, prefix: str) -> str:
    """An agent's job, created in Supabase and written to Tables (its Zapier id learned from the create)."""
    rid = uid(prefix)
    supabase.query("INSERT INTO agent_jobs (id, status) VALUES (%s, 'queued')", (rid,))
    eventually(lambda: tables.find("agent_jobs", rid))
    stack.wait_quiet()
    assert supabase.query("SELECT count(*) FROM zsync.tables_known WHERE record_id = %s", (rid,)) == [(1,)]
    return rid


def _delivered(stack: Any, supabase: Any, ids: list[str]) -> None:
    stack.wait_quiet()
    eventually(lambda: supabase.query("SELECT count(*) FROM zsync.outbox WHERE record_id = ANY(%s) "
                                      "AND acked_at IS NULL", (ids,)) == [(0,)])
    stack.wait_quiet()


@contextmanager
def _drain_held(stack: Any) -> Iterator[None]:
    """The Database Webhook's wake-ups are lost for the block: Supabase's changes wait in the outbox."""
    with blind_writes_off(stack), wakeups_lost(stack):
        lost = stack.dropped_deliveries()["pgnet"]
        yield
        eventually(lambda: stack.dropped_deliveries()["pgnet"] > lost)


def _both_end_with(stack: Any, tables: Any, supabase: Any, rid: str, **fields: Any) -> None:
    """Once everything held is delivered and the outbox swept: both sides hold ``fields`` (the sync's audit
    entries shown when Supabase does not)."""
    stack.safety_drain()
    stack.wait_quiet()
    stack.sweep_outbox(0)
    stack.wait_quiet()
    audit = [(a["metadata"].get("function"), a["metadata"].get("outcome"), a["metadata"].get("merged"))
             for a in supabase.audit(rid)]
    row, found = supabase.row("agent_jobs", rid), tables.find("agent_jobs", rid)["data"]
    assert {k: row[k] for k in fields} == fields, audit
    assert {k: found.get(k) for k in fields} == fields


def test_a_single_agent_update_costs_one_tables_request(stack, tables, supabase):
    rid = _agreed_job(stack, tables, supabase, "one-req")
    for status in ("running", "done"):  # two changes in a row: each one PATCH
        _reset(stack)
        supabase.query("UPDATE agent_jobs SET status = %s WHERE id = %s", (status, rid))
        _delivered(stack, supabase, [rid])
        made = _requests(stack)  # read before the test's own find below
        assert [r["method"] for r in made] == ["PATCH"], made
        assert tables.find("agent_jobs", rid)["data"]["status"] == status


def test_with_blind_writes_off_an_update_costs_a_find_and_a_write(stack, tables, supabase):
    """The switch's "off" (the path before issue 21): every write takes the find (with the trash) first."""
    rid = _agreed_job(stack, tables, supabase, "two-req")
    with blind_writes_off(stack):
        _reset(stack)
        supabase.query("UPDATE agent_jobs SET status = 'running' WHERE id = %s", (rid,))
        _delivered(stack, supabase, [rid])
        assert [r["method"] for r in _requests(stack)] == ["POST", "PATCH"]  # the query, the write
    assert tables.find("agent_jobs", rid)["data"]["status"] == "running"


def test_a_burst_of_updates_costs_at_most_0_02_requests_per_record(stack, tables, supabase):
    n = 150
    ids = [uid(f"burst{i}") for i in range(n)]
    supabase.query("INSERT INTO agent_jobs (id, status) SELECT unnest(%s::text[]), 'queued'", (ids,))
    stack.wait_quiet()
    eventually(lambda: all(tables.find("agent_jobs", i) for i in ids[::37]))
    stack.wait_quiet()
    _reset(stack)
    supabase.query("UPDATE agent_jobs SET status = 'burst' WHERE id = ANY(%s)", (ids,))
    _delivered(stack, supabase, ids)
    made = _requests(stack)
    assert len(made) / n <= 0.02, (len(made), [(r["method"], r["path"]) for r in made])
    assert {r["method"] for r in made} == {"PATCH"}
    assert all(tables.find("agent_jobs", i)["data"]["status"] == "burst" for i in ids[::29])


def test_a_person_s_edit_just_before_the_blind_write_is_merged_on_both_sides(stack, tables, supabase):
    """The note reaches Tables while its delivery is late; the agent's status change is written blind (no find),
    whole, so the note is overwritten in Tables for a moment; its delivery then meets the copy the write
    replaced (the known copy, kept in zsync.sync_base.replaced): the note is merged with the agent's status
    and written back, so both changes end on both sides."""
    rid = _agreed_job(stack, tables, supabase, "blind-merge")
    rec = tables.find("agent_jobs", rid)
    with late_deliveries(stack):  # the note's wake-up is late: its message waits in the inbox
        tables.patch("agent_jobs", rec["id"], {"error_message": "a person's note"})
        _reset(stack)
        supabase.query("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (rid,))
        eventually(lambda: supabase.query("SELECT count(*) FROM zsync.outbox WHERE record_id = %s "
                                          "AND acked_at IS NULL", (rid,)) == [(0,)])
        assert [r["method"] for r in _requests(stack)] == ["PATCH"]  # blind: no find
        # the whole record was sent: the note, not yet in Supabase, is overwritten in Tables for now
        assert tables.find("agent_jobs", rid)["data"].get("error_message") is None
    stack.safety_drain()
    stack.wait_quiet()
    stack.sweep_outbox(0)
    stack.wait_quiet()
    row, found = supabase.row("agent_jobs", rid), tables.find("agent_jobs", rid)["data"]
    assert (row["status"], row["error_message"]) == ("agent", "a person's note")
    assert (found["status"], found["error_message"]) == ("agent", "a person's note")
    assert supabase.query("SELECT count(*) FROM zsync.outbox WHERE record_id = %s AND acked_at IS NULL",
                          (rid,)) == [(0,)]


@pytest.mark.parametrize("versioned", [False, True], ids=["cell_edit", "with_updated_at"])
def test_a_person_s_later_edit_of_the_same_field_wins_over_the_blind_write(stack, tables, supabase, versioned):
    """The agent changes status, then a person changes status in Tables (later), its delivery late; the blind
    write overwrites the person's status in Tables. The person's delivery then meets the version Tables held
    before (the known copy the write replaced, kept in zsync.sync_base.replaced with Supabase's field times):
    the later change - the person's - wins on both sides."""
    rid = _agreed_job(stack, tables, supabase, "blind-same")
    rec = tables.find("agent_jobs", rid)
    with late_deliveries(stack):
        with _drain_held(stack):  # hold the drain: the webhook is lost for now
            supabase.query("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (rid,))
        time.sleep(0.01)
        later = {"status": "person"}  # later than the agent's change (a cell edit, or a writer's updated_at)
        if versioned:
            agent_at = datetime.fromisoformat(supabase.row("agent_jobs", rid)["updated_at"])
            later["updated_at"] = (agent_at + timedelta(milliseconds=10)).isoformat()
        tables.patch("agent_jobs", rec["id"], later)
        _reset(stack)
        assert stack.sweep_outbox(min_age_s=0) >= 1  # the agent's change, written blind
        eventually(lambda: supabase.query("SELECT count(*) FROM zsync.outbox WHERE record_id = %s "
                                          "AND acked_at IS NULL", (rid,)) == [(0,)])
        assert [r["method"] for r in _requests(stack)] == ["PATCH"]
    stack.safety_drain()
    stack.wait_quiet()
    stack.sweep_outbox(0)
    stack.wait_quiet()
    audit = [(a["action"], a["metadata"].get("function"), a["metadata"].get("outcome"), a["metadata"].get("merged"),
              a["metadata"].get("source_timestamp"), a["metadata"].get("changed_at"), a["metadata"].get("origin"))
             for a in supabase.audit(rid)]
    assert supabase.row("agent_jobs", rid)["status"] == "person", audit
    assert tables.find("agent_jobs", rid)["data"]["status"] == "person"


def test_an_overwritten_edit_delivered_late_does_not_undo_a_later_tables_edit_applied_before_it(
        stack, tables, supabase):
    """The agent's status is written blind over a person's later status (its delivery late); then another
    person sets status again in Tables, later still, and that delivery arrives first (a redelivery, another
    drain). When the overwritten edit's delivery comes, Supabase's status is the latest edit's, not the
    agent's: the field times kept with the replaced record (the agent's) no longer tell when Supabase's status
    changed, so it counts at the row's version - and the latest edit stays, on both sides."""
    rid = _agreed_job(stack, tables, supabase, "blind-late")
    rec = tables.find("agent_jobs", rid)
    url = stack.functions["agent_jobs_to_supabase"].url
    with late_deliveries(stack):
        with _drain_held(stack):  # hold the drain: the webhook is lost for now
            supabase.query("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (rid,))
        agent_at = datetime.fromisoformat(supabase.row("agent_jobs", rid)["updated_at"])
        tables.patch("agent_jobs", rec["id"], {"status": "person-1",
                                               "updated_at": (agent_at + timedelta(milliseconds=10)).isoformat()})
        _reset(stack)
        assert stack.sweep_outbox(min_age_s=0) >= 1  # the agent's change, written blind over person-1
        eventually(lambda: supabase.query("SELECT count(*) FROM zsync.outbox WHERE record_id = %s "
                                          "AND acked_at IS NULL", (rid,)) == [(0,)])
        assert [r["method"] for r in _requests(stack)] == ["PATCH"]
        later = tables.patch("agent_jobs", rec["id"], {
            "status": "person-2", "updated_at": (agent_at + timedelta(milliseconds=20)).isoformat()})
        answer = requests.post(url, json={**later["data"], "edited_at": later["edited_at"]},
                               headers={"X-Zsync-Secret": stack.secret}, timeout=30)
        assert answer.ok and supabase.row("agent_jobs", rid)["status"] == "person-2", answer.text
    _both_end_with(stack, tables, supabase, rid, status="person-2")


def test_an_overwritten_edit_delivered_after_a_later_write_still_wins_the_field_it_changed_later(
        stack, tables, supabase):
    """The agent sets status; a person sets status in Tables later (its delivery late); the agent's change is
    written blind over it; then the agent changes another field, written too. When the person's delivery comes
    it is merged against the record the first write replaced: Supabase changed status at the agent's time
    (sync_base.field_at), before the person - not at the row's newer version - so the person's status wins,
    on both sides, and the agent's later field stays."""
    rid = _agreed_job(stack, tables, supabase, "blind-older")
    rec = tables.find("agent_jobs", rid)
    with late_deliveries(stack):
        with _drain_held(stack):  # hold the drain: the webhook is lost for now
            supabase.query("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (rid,))
        agent_at = datetime.fromisoformat(supabase.row("agent_jobs", rid)["updated_at"])
        tables.patch("agent_jobs", rec["id"], {"status": "person",
                                               "updated_at": (agent_at + timedelta(milliseconds=10)).isoformat()})
        def written() -> bool:
            return supabase.query("SELECT count(*) FROM zsync.outbox WHERE record_id = %s AND acked_at IS NULL",
                                  (rid,)) == [(0,)]

        assert stack.sweep_outbox(min_age_s=0) >= 1  # the agent's status, written blind over the person's
        eventually(written)
        time.sleep(0.02)
        supabase.query("UPDATE agent_jobs SET retry_count = 7 WHERE id = %s", (rid,))  # a later write
        eventually(written)
        eventually(lambda: tables.find("agent_jobs", rid)["data"]["retry_count"] == 7)
        assert tables.find("agent_jobs", rid)["data"]["status"] == "agent"  # the person's, overwritten for now
    _both_end_with(stack, tables, supabase, rid, status="person", retry_count=7)


def test_an_edit_made_after_a_blind_write_meets_that_write_not_the_edit_it_overwrote(stack, tables, supabase):
    """A person's note is overwritten by the agent's blind write; its late delivery is merged (note + agent's
    status) and goes back to Tables - but before it gets there another person sets retry_count on the record
    Tables holds: the agent's write, without the note. That edit's ancestor is the write, so it changes
    retry_count only: the note stays (the merge of an overwritten edit does not make it the base)."""
    rid = _agreed_job(stack, tables, supabase, "blind-after")
    rec = tables.find("agent_jobs", rid)
    with late_deliveries(stack):
        with _drain_held(stack):
            supabase.query("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (rid,))
        agent_at = datetime.fromisoformat(supabase.row("agent_jobs", rid)["updated_at"])
        tables.patch("agent_jobs", rec["id"], {  # the note, by a writer that versions it (after the agent)
            "error_message": "a person's note", "updated_at": (agent_at + timedelta(milliseconds=10)).isoformat()})
        assert stack.sweep_outbox(min_age_s=0) >= 1  # the agent's change, written blind over the note
        eventually(lambda: supabase.query("SELECT count(*) FROM zsync.outbox WHERE record_id = %s "
                                          "AND acked_at IS NULL", (rid,)) == [(0,)])
        with _drain_held(stack):  # the merged record waits in the outbox
            stack.safety_drain()  # the note's delivery: merged with the agent's status, queued for Tables
            eventually(lambda: supabase.row("agent_jobs", rid)["error_message"] == "a person's note")
            assert tables.find("agent_jobs", rid)["data"].get("error_message") is None
            merged_at = datetime.fromisoformat(supabase.row("agent_jobs", rid)["updated_at"])
            tables.patch("agent_jobs", rec["id"], {  # made from the agent's write, by a writer that versions it
                "retry_count": 5, "updated_at": (merged_at + timedelta(milliseconds=10)).isoformat()})
            stack.safety_drain()
            eventually(lambda: supabase.row("agent_jobs", rid)["retry_count"] == 5)
    _both_end_with(stack, tables, supabase, rid, status="agent", error_message="a person's note", retry_count=5)


def test_a_tables_edit_a_drain_deferred_to_is_not_written_over_blind(stack, tables, supabase):
    """The agent and then a person change status; the person's delivery is held by a drain that died with it
    leased (the inbox hands it to nobody for a while). The agent's drain finds the person's edit, gives status
    to its delivery (deferred, nothing taken in) - and must not keep that record as the copy to write blind
    over: the agent's next change, after blind_quiet_s, finds it again, and when the delivery finally comes,
    the person's status wins on both sides with the agent's later field."""
    from shared.adapters.trigger_inbox import InboxClient

    rid = _agreed_job(stack, tables, supabase, "blind-deferred")
    rec = tables.find("agent_jobs", rid)
    inbox = InboxClient.for_tables(stack.tables_client())
    inbox_id = stack.inboxes["agent_jobs_to_supabase"]
    old = _set_config(supabase, "blind_quiet_s", 0)
    try:
        with late_deliveries(stack):
            with _drain_held(stack):
                supabase.query("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (rid,))
            agent_at = datetime.fromisoformat(supabase.row("agent_jobs", rid)["updated_at"])
            tables.patch("agent_jobs", rec["id"], {
                "status": "person", "updated_at": (agent_at + timedelta(milliseconds=10)).isoformat()})
            held = inbox.lease(inbox_id, 100, 120)  # a drain that died holding the person's delivery
            assert [m for m in held.messages if rid in json.dumps(m.payload)]
            with blind_writes_off(stack):  # (a record people edit is found first: blind_quiet_s, as in a soak)
                _reset(stack)
                assert stack.sweep_outbox(min_age_s=0) >= 1
                eventually(lambda: [r["method"] for r in _requests(stack)][:1] == ["POST"])  # found: deferred
                time.sleep(0.5)  # (its entry stays pending: the stack is not quiet until the delivery comes)
            assert supabase.row("agent_jobs", rid)["status"] == "agent"
            assert supabase.query("SELECT count(*) FROM zsync.tables_known WHERE record_id = %s", (rid,)) == [(0,)]
            time.sleep(0.02)
            _reset(stack)
            supabase.query("UPDATE agent_jobs SET retry_count = 3 WHERE id = %s", (rid,))
            eventually(lambda: _requests(stack))
            time.sleep(0.5)
            assert [r["method"] for r in _requests(stack)][:1] == ["POST"]  # found again, not written blind
            assert tables.find("agent_jobs", rid)["data"]["status"] == "person"
            inbox.release(inbox_id, held.lease_id)  # the lease comes back
        stack.safety_drain()
        stack.wait_quiet()
        stack.sweep_outbox(0)
        stack.wait_quiet()
    finally:
        _set_config(supabase, "blind_quiet_s", old)
    row, found = supabase.row("agent_jobs", rid), tables.find("agent_jobs", rid)["data"]
    assert (row["status"], row["retry_count"]) == ("person", 3)
    assert (found["status"], found["retry_count"]) == ("person", 3)


def test_the_stand_in_refuses_an_update_of_a_trashed_record_as_zapier_does(stack, tables, supabase):
    """"Refused if any named record does not exist": a PATCH naming a trashed record changes nothing, not even
    the live record named with it."""
    a, b = uid("trash-a"), uid("trash-b")
    ra = tables.create("agent_jobs", {"id": a, "status": "queued"})
    rb = tables.create("agent_jobs", {"id": b, "status": "queued"})
    delete_in_tables(tables, "agent_jobs", rb)
    try:
        tables.client.update_many(tables.ids["agent_jobs"], [(ra["id"], {"status": "x"}), (rb["id"], {"status": "x"})])
    except TablesNotFound:
        pass
    else:
        raise AssertionError("a PATCH of a trashed record was accepted")
    assert tables.find("agent_jobs", a)["data"]["status"] == "queued"


def test_an_update_of_a_record_deleted_in_tables_follows_the_delete_rules(stack, tables, supabase):
    """The blind PATCH is refused (the record is in the trash), the drain forgets the Zapier id and takes the find
    with the trash: the delete, later than the update, wins (not re-created in Tables, deleted in Supabase)."""
    rid = _agreed_job(stack, tables, supabase, "blind-del")
    rec = tables.find("agent_jobs", rid)
    with contextmanager(lose_delete_events)(stack), stack.trash_paused():
        lost = stack.dropped_deliveries()["pgnet"]
        stack.drop_deliveries(1.0)  # the webhook is lost: the change waits in the outbox
        try:
            supabase.query("UPDATE agent_jobs SET status = 'running' WHERE id = %s", (rid,))
            eventually(lambda: stack.dropped_deliveries()["pgnet"] > lost)
            delete_in_tables(tables, "agent_jobs", rec)  # later than the update
        finally:
            stack.drop_deliveries(0.0)
        _reset(stack)
        assert stack.sweep_outbox(min_age_s=0) >= 1
        stack.wait_quiet()
        methods = [r["method"] for r in _requests(stack)]
        assert methods[:2] == ["PATCH", "POST"], methods  # the refused PATCH, then the find with the trash
        assert supabase.row("agent_jobs", rid) is None and tables.find("agent_jobs", rid) is None
        assert tombstone(supabase, rid)[0][1] == "tables"
        assert supabase.query("SELECT count(*) FROM zsync.tables_known WHERE record_id = %s", (rid,)) == [(0,)]


def test_an_idless_tables_record_still_gets_its_id(stack, tables, supabase):
    rec = tables.create("agent_jobs", {"status": "made by a person"})
    zid = rec["id"]
    eventually(lambda: supabase.row("agent_jobs", zid))
    stack.wait_quiet()
    eventually(lambda: tables.find("agent_jobs", zid) is not None)
    supabase.query("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (zid,))
    eventually(lambda: tables.find("agent_jobs", zid)["data"]["status"] == "agent")
    stack.wait_quiet()
    assert len(tables.find_all("agent_jobs", zid)) == 1


def test_a_redelivered_version_costs_no_tables_request(stack, tables, supabase):
    """The version Tables' known copy holds already (its write answered it) is not written again: unchanged."""
    from shared.core.spec import FUNCTIONS
    from shared.services.sync import SupabaseWebhook
    from shared.services.to_tables import apply_from_supabase
    from tests.test_correctness import stack_context

    rid = _agreed_job(stack, tables, supabase, "redeliver")
    supabase.query("UPDATE agent_jobs SET status = 'running' WHERE id = %s", (rid,))
    _delivered(stack, supabase, [rid])
    stored = supabase.query("SELECT to_jsonb(t) FROM agent_jobs t WHERE id = %s", (rid,))[0][0]
    hook = SupabaseWebhook.model_validate({"type": "UPDATE", "table": "agent_jobs", "schema": "public",
                                           "record": stored})
    _reset(stack)
    outcome = apply_from_supabase(stack_context(stack), FUNCTIONS["agent_jobs_to_tables"], hook).outcome
    assert outcome.value == "unchanged"
    assert _requests(stack) == []
    assert tables.find("agent_jobs", rid)["data"]["status"] == "running"


def _set_config(supabase: Any, key: str, value: Any) -> Any:
    old = supabase.query("SELECT value FROM zsync.config WHERE key = %s", (key,))[0][0]
    supabase.query("UPDATE zsync.config SET value = %s::jsonb WHERE key = %s", (json.dumps(value), key))
    return old


def _one_patch_once_quiet(stack: Any, supabase: Any, rid: str, status: str) -> None:
    """Past blind_quiet_s (set to 0 for the change), an agent's change of ``rid`` is one PATCH."""
    old = _set_config(supabase, "blind_quiet_s", 0)
    try:
        _reset(stack)
        supabase.query("UPDATE agent_jobs SET status = %s WHERE id = %s", (status, rid))
        _delivered(stack, supabase, [rid])
        assert [r["method"] for r in _requests(stack)] == ["PATCH"]
    finally:
        _set_config(supabase, "blind_quiet_s", old)


def test_a_record_a_find_showed_edited_in_tables_is_found_again_while_the_edit_is_recent(stack, tables, supabase):
    """A record made in Tables (its delivery cannot introduce a Zapier id the sync does not know) is found before
    the first write; that find saw an edit made in Tables, so the record counts as being edited there for
    blind_quiet_s: the next change is found first too, though the write's own answer came after the find. Once
    that edit is old enough, a change is one PATCH."""
    rid = uid("found-edit")
    tables.create("agent_jobs", {"id": rid, "status": "queued", "updated_at": datetime.now(UTC).isoformat()})
    eventually(lambda: supabase.row("agent_jobs", rid))
    stack.wait_quiet()
    for status in ("running", "done"):
        _reset(stack)
        supabase.query("UPDATE agent_jobs SET status = %s WHERE id = %s", (status, rid))
        _delivered(stack, supabase, [rid])
        assert [r["method"] for r in _requests(stack)] == ["POST", "PATCH"], status  # the find, the write
    _one_patch_once_quiet(stack, supabase, rid, "quiet")
    assert tables.find("agent_jobs", rid)["data"]["status"] == "quiet"


def _lost_blind_write(stack: Any, supabase: Any, rid: str, *, fresh_process_key: bool = False) -> Any:
    """What a drain killed after its PATCH leaves behind: the record's pending change written to Tables blind,
    announced (committed aside), and nothing recorded (its transaction rolled back)."""
    import psycopg

    from shared.core.mapping import parse_supabase_record, to_tables_fields
    from shared.core.spec import TABLES
    from shared.services.to_tables import write_blind
    from tests.test_correctness import stack_context

    spec = TABLES["agent_jobs"]
    row = parse_supabase_record(spec, supabase.row("agent_jobs", rid))
    ctx = stack_context(stack)
    ctx.tables.find_many(ctx.table_id(spec), "id", [rid])  # this process had read it (not part of the key)
    _reset(stack)
    with psycopg.connect(stack.function_database_url) as conn:
        done = write_blind(ctx, conn, spec, ctx.table_id(spec), {rid: (row, to_tables_fields(spec, row))})
        conn.rollback()
    assert list(done.written) == [rid] and [r["method"] for r in _requests(stack)] == ["PATCH"]
    if fresh_process_key:  # the same write from a process that never read the record: the same key, replayed
        tid = supabase.query("SELECT tables_id FROM zsync.tables_known WHERE record_id = %s", (rid,))[0][0]
        again = stack_context(stack).tables.update_many(
            ctx.table_id(spec), [(tid, to_tables_fields(spec, row))],
            read_at={tid: done.written[rid].edited_at.isoformat()})
        assert datetime.fromisoformat(again[0].edited_at) == done.known[rid].edited_at  # the first answer
        keys = [r["idempotency_key_value"] for r in _requests(stack) if r["method"] == "PATCH"]
        assert len(keys) == 2 and keys[0] == keys[1]
    return done


def test_a_blind_write_whose_transaction_was_lost_is_found_before_it_is_written_again(stack, tables, supabase):
    """A drain killed after its PATCH, or whose transaction a Postgres restart lost, leaves the known copy as it
    was - but its announcement (zsync.tables_writing, committed before the PATCH) stays: the next drain of the
    record finds it first, sees the version already there and writes nothing (no echo write), records what
    the lost write replaced (an edit it overwrote can still be merged) and clears the announcement. A blind
    write's Idempotency-Key names the known copy it replaces, not what the process last read: the same in any
    process, so Zapier replays its first answer."""
    rid = _agreed_job(stack, tables, supabase, "blind-lost")
    table_id = tables.ids["agent_jobs"]
    with late_deliveries(stack):  # the lost write's own trigger delivery waits too
        with _drain_held(stack):
            supabase.query("UPDATE agent_jobs SET status = 'lost drain' WHERE id = %s", (rid,))
        writes = tables.stats()["writes"][table_id]
        done = _lost_blind_write(stack, supabase, rid, fresh_process_key=True)
        assert tables.stats()["writes"][table_id] == writes + 1
        assert supabase.query("SELECT count(*) FROM zsync.tables_writing WHERE record_id = %s", (rid,)) == [(1,)]
        same = tables.stats()["same_version_writes"].get(table_id, 0)
        _reset(stack)
        assert stack.sweep_outbox(min_age_s=0) >= 1  # the change, retried
        eventually(lambda: supabase.query("SELECT count(*) FROM zsync.outbox WHERE record_id = %s "
                                          "AND acked_at IS NULL", (rid,)) == [(0,)])
        assert [r["method"] for r in _requests(stack)] == ["POST"]  # the find only: Tables holds it
        assert tables.stats()["writes"][table_id] == writes + 1
        assert tables.stats()["same_version_writes"].get(table_id, 0) == same
        assert supabase.query("SELECT count(*) FROM zsync.tables_writing WHERE record_id = %s", (rid,)) == [(0,)]
        replaced = supabase.query("SELECT replaced FROM zsync.sync_base WHERE record_id = %s", (rid,))[0][0]
        assert any(e["row"]["status"] == "queued" and datetime.fromisoformat(e["until"]) == done.known[rid].edited_at
                   for e in replaced), replaced
    stack.safety_drain()  # (the held deliveries: the lost write's own, found equal)
    stack.wait_quiet()
    # (the copy the find saw moved on without the sync recording it: it counts as an edit made in Tables, so
    # the next write is found too while blind_quiet_s runs; past it, one PATCH)
    _one_patch_once_quiet(stack, supabase, rid, "after")


@pytest.mark.parametrize("retry_first", [False, True], ids=["delivery_first", "retry_first"])
def test_an_edit_a_lost_blind_write_overwrote_ends_on_both_sides(stack, tables, supabase, retry_first):
    """A person's note lands in Tables (its delivery late), then a drain writes the agent's change blind over it
    and is killed before recording. Whether the note's delivery comes before the lost change is retried (it is
    applied, and - the write unrecorded - queued back for Tables rather than taken as held there) or after
    (the retry's find recorded what the lost write replaced: the note is merged against it), both changes end
    on both sides."""
    rid = _agreed_job(stack, tables, supabase, "blind-lost-note")
    rec = tables.find("agent_jobs", rid)
    with late_deliveries(stack):
        with _drain_held(stack):
            supabase.query("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (rid,))
        tables.patch("agent_jobs", rec["id"], {"error_message": "a person's note"})
        _lost_blind_write(stack, supabase, rid)
        assert tables.find("agent_jobs", rid)["data"].get("error_message") is None  # overwritten, unrecorded
        if retry_first:
            assert stack.sweep_outbox(min_age_s=0) >= 1
            eventually(lambda: supabase.query("SELECT count(*) FROM zsync.tables_writing WHERE record_id = %s",
                                              (rid,)) == [(0,)])
    _both_end_with(stack, tables, supabase, rid, status="agent", error_message="a person's note")


def test_the_redefined_functions_follow_the_field_merge_migration():
    """20261206000101 redefines zsync.agree and zsync.merge_decide_base (a replaced record keeps Supabase's field
    times), 20261206100101 five (sync_base.field_at), 20261206100201 two (zsync.tables_writing): each must be the
    text before it plus those lines only, so a change made there is not silently undone here (update the copy
    when this fails)."""
    from pathlib import Path

    migrations = Path(__file__).resolve().parents[1] / "infra" / "supabase" / "migrations"
    merge = (migrations / "20261205600101_zsync_field_merge.sql").read_text()
    mine = (migrations / "20261206000101_zsync_one_request.sql").read_text()

    def body(text: str, name: str) -> str:
        start = text.index(f"CREATE OR REPLACE FUNCTION zsync.{name}(")
        return text[start:text.index("\n$", start)]

    def canon(text: str) -> str:
        text = re.sub(r"--[^\n]*", "", text)
        return " ".join(text.split())

    agree = canon(body(mine, "agree"))
    for added in ("v_fts jsonb;", "v_fts := NULL; IF v_prev IS NOT NULL THEN SELECT b.field_ts INTO v_fts FROM "
                  "zsync.sync_base b WHERE b.table_name = v_name AND b.record_id = r.row ->> 'id'; END IF;",
                  ", 'field_ts', CASE WHEN (v_prev ->> 'blind')::boolean THEN v_fts END"):
        assert added in agree
        agree = agree.replace(added, "", 1)
    assert canon(agree).replace(") )", "))") == canon(body(merge, "agree"))
    decide = canon(body(mine, "merge_decide_base"))
    added = ("b.field_ts := CASE WHEN jsonb_typeof(v_rep -> 'field_ts') = 'object' "
             "AND (v_rep ->> 'until')::timestamptz >= (SELECT max((e.v ->> 'until')::timestamptz) "
             "FROM jsonb_array_elements(b.replaced) e(v)) "
             "THEN (v_rep -> 'field_ts') || coalesce(b.field_ts, '{}'::jsonb) END;")
    assert added in decide
    assert canon(decide.replace(added, "b.field_ts := NULL;", 1)) == canon(body(merge, "merge_decide_base"))

    # 20261206100101 redefines five (Supabase's field times kept across base moves, sync_base.field_at): each
    # is its last definition plus the lines it adds
    later = (migrations / "20261206100101_zsync_field_times.sql").read_text()
    baseline = (migrations / "20261205500001_zsync_baseline.sql").read_text()

    def without(name: str, *added: str) -> str:
        text = canon(body(later, name))
        for part in added:
            assert canon(part) in text, (name, part)
            text = text.replace(canon(part), "", 1)
        return canon(text)

    def before_update(text: str) -> str:  # (base_before_change's last statement now also stamps field_at)
        text = canon(text)
        return text[:text.index("UPDATE zsync.sync_base b")]

    assert before_update(body(later, "base_before_change")) == before_update(body(merge, "base_before_change"))
    assert "field_at = coalesce(b.field_at, '{}'::jsonb) || s.stamps" in body(later, "base_before_change")
    assert without("maintain_updated_at", """IF TG_OP = 'UPDATE' AND current_setting('zsync.origin', true) = 'sync_send'
        AND zsync.field_merge_on() THEN PERFORM zsync.stamp_fields(TG_RELID::regclass, to_jsonb(OLD), to_jsonb(NEW));
        END IF;""") == canon(body(merge, "maintain_updated_at"))
    assert "maintain_updated_at" in baseline
    apply_stamp = canon(body(later, "base_after_apply"))
    apply_stamp = apply_stamp[apply_stamp.index("UPDATE zsync.sync_base"):apply_stamp.index("IF p_tables_ts")]
    assert without("base_after_apply", apply_stamp) == canon(body(merge, "base_after_apply"))
    batch_stamp = canon(body(later, "bases_after_batch"))
    batch_stamp = batch_stamp[batch_stamp.index("UPDATE zsync.sync_base b"):batch_stamp.index("WITH l AS")]
    assert without("bases_after_batch", batch_stamp) == canon(body(merge, "bases_after_batch"))
    merge_stamp = canon(body(later, "base_after_merge"))
    merge_stamp = merge_stamp[merge_stamp.index("UPDATE zsync.sync_base b SET field_at"):merge_stamp.index(
        "IF zsync.set_base")]
    assert without("base_after_merge", merge_stamp) == canon(
        body(merge.replace("CREATE FUNCTION zsync.base_after_merge(",
                           "CREATE OR REPLACE FUNCTION zsync.base_after_merge("), "base_after_merge"))
    field_at = ("b.field_ts := (SELECT jsonb_object_agg(a.key, a.value) FROM jsonb_each(b.field_at) a "
                "WHERE (a.value #>> '{}')::timestamptz > b.version);")
    back = "CASE WHEN v_over THEN '{\"back_to_tables\": true}'::jsonb"
    full = "WHERE p_edited_at < (e.v ->> 'until')::timestamptz"
    assert canon(body(later, "merge_decide_base")).replace(canon(field_at), canon(added), 1).replace(
        back, back.replace("v_over", "v_over AND m.outcome = 'a'"), 1).replace(
        full, full.replace("p_edited_at", "v_edit"), 1) == canon(body(mine, "merge_decide_base"))
    until = "'until', coalesce((v_prev ->> 'written_at')::timestamptz, clock_timestamp()),"
    assert canon(body(later, "agree")).replace(until, "'until', coalesce(date_trunc('milliseconds', (v_prev ->> "
                                               "'written_at')::timestamptz), clock_timestamp()),", 1) == canon(
        body(mine, "agree"))

    # 20261206100201 redefines remember_tables (a recorded find or answer clears the announcement) and blind_plan
    # (a record with an announcement left is found first)
    flight = (migrations / "20261206100201_zsync_blind_in_flight.sql").read_text()
    remember = canon(body(flight, "remember_tables"))
    added_part = remember[remember.index("FOR v_lost IN"):remember.index("RETURN n;")]
    assert "zsync.agree(" in added_part and "zsync.requeue(" in added_part and "DELETE FROM zsync.tables_writing" \
        in added_part
    assert remember.replace(added_part, "", 1).replace(
        " v_lost record; BEGIN", " BEGIN", 1) == canon(body(mine, "remember_tables"))
    left = ("AND NOT EXISTS (SELECT 1 FROM zsync.tables_writing w WHERE w.table_name = $1 "
            "AND w.record_id = k.record_id) ")
    assert canon(body(flight, "blind_plan")).replace(left, "", 1) == canon(body(mine, "blind_plan"))


def test_a_version_tables_already_had_is_found_not_written_over_itself(stack, tables, supabase):
    """A person's edit is applied to Supabase, but the known Tables copy lags behind it (soaks met this under
    chaos, near a Postgres restart; the cause is not known) and an older change of the record is re-sent. The
    drain would write the current row - the person's version - blind over itself (an echo). Its outbox entry
    says Tables had that version (zsync.tables_had): the record is found first, and nothing is written."""
    from psycopg.types.json import Jsonb

    rid = _agreed_job(stack, tables, supabase, "had")
    known, known_at = supabase.query("SELECT known, known_at FROM zsync.tables_known WHERE record_id = %s", (rid,))[0]
    rec = tables.find("agent_jobs", rid)
    edited_at = datetime.now(UTC) + timedelta(milliseconds=5)
    tables.patch("agent_jobs", rec["id"], {"status": "a person's", "updated_at": edited_at.isoformat()})
    eventually(lambda: supabase.row("agent_jobs", rid)["status"] == "a person's")
    stack.wait_quiet()
    with psycopg.connect(stack.database_url, autocommit=True) as conn:  # the lag, and the re-sent change
        conn.execute("UPDATE zsync.tables_known SET known = %s, known_at = %s, edited_seen_at = NULL "
                     "WHERE record_id = %s", (Jsonb(known), known_at, rid))
        conn.execute("SELECT zsync.requeue('agent_jobs', %s)", (rid,))
    _reset(stack)
    stack.sweep_outbox(min_age_s=0)
    _delivered(stack, supabase, [rid])
    assert [r["method"] for r in _requests(stack)] == ["POST"], _requests(stack)  # the find; no write
    assert tables.find("agent_jobs", rid)["data"]["status"] == "a person's"
