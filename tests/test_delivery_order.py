"""A record's Tables edits are taken in one at a time, even when the drain that leased the first one died with it
(migration 20261206200101, :mod:`shared.adapters.lease_ledger`): Tables keeps no per-field times, so a delivery
applied before an earlier edit of its record carries that edit's fields at its own, later time - and could win
a field Supabase changed between the two edits. Each drain records what it leased before applying it; a later
edit of a record whose earlier edit another lease holds waits for it (a live drain: a moment; a dead one: until
its lease ends). Real Postgres, the local Zapier stand-in and the functions over HTTP."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import requests

from shared.adapters import lease_ledger
from shared.adapters.trigger_inbox import InboxClient, read_payload
from shared.core.spec import FUNCTIONS, TABLES
from shared.services.from_tables import apply_many_from_tables
from shared.services.inbox_consumer import InboxConsumer, _field_names_of
from tests.e2e import blind_writes, eventually, late_deliveries, uid
from tests.test_correctness import stack_context
from tests.test_one_request import _agreed_job, _both_end_with, _delivered, _drain_held

FN = FUNCTIONS["agent_jobs_to_supabase"]


class _Killed(Exception):
    """The drain is killed here: after it recorded its lease, before it applied anything."""


class _DiesAfterLeasing(InboxConsumer):
    """A drain killed after recording what it leased (a SIGKILL mid-apply, as the soak's chaos does)."""

    def _apply_batch(self, *args: Any, **kwargs: Any) -> Any:
        raise _Killed


def _end_leases(stack: Any, inbox_id: str) -> None:
    """Time passes: every lease of the inbox runs out (the dead drain's, and the one a waiting edit was left in)."""
    requests.post(f"{stack.tables.url.rstrip('/')}/_admin/inboxes/{inbox_id}/end_leases", timeout=10).raise_for_status()


def _two_edits_then_the_agent(stack: Any, tables: Any, supabase: Any, rid: str) -> None:
    """The agent sets status (its drain held: the change waits in the outbox); in Tables a person's status,
    versioned before the agent's change, then another person's retry_count, versioned after it - two edits
    the sync has not taken in, whose deliveries wait in the inbox."""
    rec = tables.find("agent_jobs", rid)
    with _drain_held(stack):
        supabase.query("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (rid,))
    agent_at = datetime.fromisoformat(supabase.row("agent_jobs", rid)["updated_at"])
    tables.patch("agent_jobs", rec["id"], {"status": "person",
                                           "updated_at": (agent_at - timedelta(milliseconds=5)).isoformat()})
    tables.patch("agent_jobs", rec["id"], {"retry_count": 5,
                                           "updated_at": (agent_at + timedelta(milliseconds=10)).isoformat()})


def _kill_a_drain_holding_the_first_edit(stack: Any, rid: str, lease_seconds: int = 60) -> None:
    """A drain leases the first edit's delivery (the oldest message), records it, and dies holding it."""
    inbox = InboxClient.for_tables(stack.tables_client())
    ctx = stack_context(stack)
    dead = _DiesAfterLeasing(FN, ctx, inbox, stack.inboxes[FN.name], field_names=_field_names_of(ctx, FN),
                             lease_limit=1, lease_seconds=lease_seconds)
    with pytest.raises(_Killed):
        dead.drain(5)
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM zsync.tables_leased WHERE record_id = %s", (rid,)).fetchone() == (1,)


@pytest.mark.parametrize("blind", [True, False], ids=["blind_write", "found_first"])
def test_an_edit_whose_earlier_edit_a_dead_drain_holds_waits_for_it(stack, tables, supabase, blind):
    """The agent set status after a person's status edit and before another person's retry_count edit. A drain
    leases the first edit's delivery and dies; the agent's change goes to Tables (blind, or found first and
    left to the deliveries); the second edit's delivery comes - and must not be applied first: it carries the
    first person's status at its own, later time, which would beat the agent's. It waits (left leased); when
    the leases run out both come back, are taken in oldest first, and both sides end with the agent's status
    and the second person's retry_count."""
    rid = _agreed_job(stack, tables, supabase, "in-order")
    with blind_writes(stack, blind), late_deliveries(stack):
        _two_edits_then_the_agent(stack, tables, supabase, rid)
        _kill_a_drain_holding_the_first_edit(stack, rid)
        stack.sweep_outbox(min_age_s=0)  # the agent's change goes out (found first: left to the deliveries,
        time.sleep(1.0)  # whose inbox that drain pulls at once)
        stack.safety_drain()  # the second edit's delivery waits for the first (the pull's drain or this one)
        row = supabase.row("agent_jobs", rid)
        assert (row["status"], row["retry_count"]) == ("agent", 0)  # neither edit taken in yet
        inbox = InboxClient.for_tables(stack.tables_client())
        assert sum(m.get("status") == "leased" for m in inbox.messages(stack.inboxes[FN.name])) >= 2
        _end_leases(stack, stack.inboxes[FN.name])
    _both_end_with(stack, tables, supabase, rid, status="agent", retry_count=5)
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM zsync.tables_leased WHERE record_id = %s", (rid,)).fetchone() == (0,)


def test_a_direct_delivery_of_a_later_edit_waits_for_an_earlier_one_a_drain_holds(stack, tables, supabase):
    """The same two edits, but the second comes by the trigger's own POST to the function (a Zap's delivery, the
    inbox's copy aside) while a dead drain holds the first edit's message. Applied, it carried the first person's
    status at its own, later time and beat the agent's (a soak of the default path lost a field so: only the
    inbox path asked the ledger). It is answered 503 with Retry-After, nothing applied; once the leases end both
    edits are taken in oldest first, and the agent's status and the later retry_count end on both sides."""
    from tests.test_correctness import post

    rid = _agreed_job(stack, tables, supabase, "direct-waits")
    with late_deliveries(stack):
        _two_edits_then_the_agent(stack, tables, supabase, rid)
        _kill_a_drain_holding_the_first_edit(stack, rid)
        found = tables.find("agent_jobs", rid)  # the record as the second edit left it
        answer = post(stack, FN.name, dict(found["data"], edited_at=found["edited_at"]))
        assert answer.status_code == 503 and answer.headers.get("Retry-After"), answer.text
        assert answer.json()["outcome"] == "queued"
        row = supabase.row("agent_jobs", rid)
        assert (row["status"], row["retry_count"]) == ("agent", 0)  # nothing applied
        _end_leases(stack, stack.inboxes[FN.name])
    _both_end_with(stack, tables, supabase, rid, status="agent", retry_count=5)


def test_a_drain_that_cannot_record_its_lease_releases_it_unapplied(stack, tables, supabase):
    """A drain that cannot record what it leased (zsync.hold_leased refused: here its grant taken away; in a soak,
    Postgres restarting) releases the batch unapplied instead of applying it unrecorded: killed while it held
    them, other drains would have applied later edits of those records first, unaware (a soak lost a field so).
    The edit comes back to the next drain, and is applied then."""
    rid = _agreed_job(stack, tables, supabase, "unrecorded")
    rec = tables.find("agent_jobs", rid)
    grant = "EXECUTE ON FUNCTION zsync.hold_leased(text, text, double precision, jsonb)"
    with late_deliveries(stack):
        tables.patch("agent_jobs", rec["id"], {"retry_count": 9})
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            conn.execute(f"REVOKE {grant} FROM zsync_sync")
        try:
            ctx = stack_context(stack)
            report = InboxConsumer(FN, ctx, InboxClient.for_tables(stack.tables_client()), stack.inboxes[FN.name],
                                   field_names=_field_names_of(ctx, FN), lease_limit=1).drain(5)
        finally:
            with psycopg.connect(stack.database_url, autocommit=True) as conn:
                conn.execute(f"GRANT {grant} TO zsync_sync")
        assert report.stopped == "dependency" and report.counts.get("dependency_errors", 0) >= 1, report
        assert supabase.row("agent_jobs", rid)["retry_count"] == 0  # nothing applied
    _both_end_with(stack, tables, supabase, rid, retry_count=9)  # released: back at once, not after its lease


def test_an_edit_waiting_for_one_whose_lease_ran_out_is_released_to_come_after_it(stack, tables, supabase):
    """The dead drain's lease is short (2 s): while the second edit's drain waits, the first edit comes back to
    the inbox. The waiting delivery is released at once, and the same drain leases both again, oldest first:
    applied in order without waiting out a lease - the agent's status and the later retry_count on both sides."""
    rid = _agreed_job(stack, tables, supabase, "in-order-back")
    with late_deliveries(stack):
        _two_edits_then_the_agent(stack, tables, supabase, rid)
        _kill_a_drain_holding_the_first_edit(stack, rid, lease_seconds=2)
        drained = stack.safety_drain()[FN.name]
        assert drained.get("released_for_order", 0) >= 1 and drained.get("held_back", 0) == 0, drained
        row = supabase.row("agent_jobs", rid)
        assert (row["status"], row["retry_count"]) == ("agent", 5), supabase.audit(rid)
    _both_end_with(stack, tables, supabase, rid, status="agent", retry_count=5)


def test_an_edit_waits_for_a_live_drain_to_apply_the_earlier_one(stack, tables, supabase):
    """A drain holding the first edit is alive, only slower: the second edit's drain waits for it (a moment,
    ``hold_wait_s``), then applies its edit after it - nothing left leased."""
    import threading

    rid = _agreed_job(stack, tables, supabase, "in-order-live")
    with late_deliveries(stack):
        _two_edits_then_the_agent(stack, tables, supabase, rid)
        inbox = InboxClient.for_tables(stack.tables_client())
        inbox_id = stack.inboxes[FN.name]
        slow = inbox.lease(inbox_id, 1, 60)
        [first] = slow.messages
        ctx = stack_context(stack)
        record = read_payload(first.payload, _field_names_of(ctx, FN)(False))
        at = datetime.fromisoformat(record.edited_at.replace("Z", "+00:00"))
        ticket = lease_ledger.Lease(slow.lease_id, (lease_ledger.Leased(first.id, rid, at),))
        assert lease_ledger.hold(ctx.db, TABLES["agent_jobs"], ticket, 60)

        def finish() -> None:  # the slow drain applies its edit a second later, and acks it
            threading.Event().wait(1.0)
            apply_many_from_tables(ctx, FN, [record.as_delivery()], received_at=[at], lease=ticket)
            inbox.ack(inbox_id, slow.lease_id)

        slow_drain = threading.Thread(target=finish)
        slow_drain.start()
        drained = stack.safety_drain()[FN.name]
        slow_drain.join()
        assert drained.get("held_back", 0) == 0, drained
        stack.sweep_outbox(min_age_s=0)
    _both_end_with(stack, tables, supabase, rid, status="agent", retry_count=5)


def test_a_later_edit_still_carrying_an_earlier_edit_s_field_counts_it_at_the_earlier_time(stack, tables, supabase):
    """No drain dies, deliveries in order: a person's status (versioned before the agent's) is delivered and
    Supabase keeps the agent's later status (skipped as stale; the push back to Tables still on its way). Then
    another person sets retry_count on the record Tables holds - still carrying the first person's status. That
    status was set at the first edit's time, not this one's: the agent's status stays, with the new retry_count.
    (Here the first delivery moves the base on; the blind-write case above, where both edits are merged against
    the record the write replaced, needs the copies of migration 20261206200201.)"""
    rid = _agreed_job(stack, tables, supabase, "in-order-carried")
    rec = tables.find("agent_jobs", rid)
    with late_deliveries(stack), _drain_held(stack):  # Supabase's changes wait in the outbox for the block
        supabase.query("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (rid,))
        agent_at = datetime.fromisoformat(supabase.row("agent_jobs", rid)["updated_at"])
        tables.patch("agent_jobs", rec["id"], {"status": "person",
                                               "updated_at": (agent_at - timedelta(milliseconds=5)).isoformat()})
        assert stack.safety_drain()[FN.name].get("skipped_stale") == 1
        tables.patch("agent_jobs", rec["id"], {"retry_count": 5,
                                               "updated_at": (agent_at + timedelta(milliseconds=10)).isoformat()})
        stack.safety_drain()
        row = supabase.row("agent_jobs", rid)
        assert (row["status"], row["retry_count"]) == ("agent", 5), supabase.audit(rid)
    _both_end_with(stack, tables, supabase, rid, status="agent", retry_count=5)


@pytest.mark.parametrize("overwritten", [False, True], ids=["delivered", "overwritten_by_a_later_write"])
def test_a_tables_edit_versioned_before_the_record_it_edits_still_counts(stack, tables, supabase, overwritten):
    """A Zapier agent chooses its updated_at before Supabase's status change reaches Tables, and its write lands
    after it. Its retry_count, versioned after Supabase's retry_count and before Supabase's status, wins that field;
    status stays Supabase's - on both sides. Also when Supabase's next change is written over that edit before its
    delivery comes (a soak of 10,000 changes lost such a field: the edit was taken for a stale delivery because its
    updated_at was older than the record's)."""
    rid = _agreed_job(stack, tables, supabase, "older-version")
    rec = tables.find("agent_jobs", rid)
    supabase.query("UPDATE agent_jobs SET retry_count = 606 WHERE id = %s", (rid,))
    _delivered(stack, supabase, [rid])
    retry_at = datetime.fromisoformat(supabase.row("agent_jobs", rid)["updated_at"])
    time.sleep(0.05)
    supabase.query("UPDATE agent_jobs SET status = 'later' WHERE id = %s", (rid,))
    _delivered(stack, supabase, [rid])
    edit = {"retry_count": 5267, "updated_at": (retry_at + timedelta(milliseconds=10)).isoformat()}
    if not overwritten:
        tables.patch("agent_jobs", rec["id"], edit)
        _both_end_with(stack, tables, supabase, rid, status="later", retry_count=5267)
        return
    with blind_writes(stack, True), late_deliveries(stack):  # (the find would see the edit and merge it first)
        tables.patch("agent_jobs", rec["id"], edit)
        with _drain_held(stack):
            supabase.query("UPDATE agent_jobs SET error_message = 'note' WHERE id = %s", (rid,))
        stack.sweep_outbox(min_age_s=0)  # Supabase's note written blind over the edit
        eventually(lambda: tables.find("agent_jobs", rid)["data"].get("error_message") == "note")
        assert tables.find("agent_jobs", rid)["data"]["retry_count"] == 606
    _both_end_with(stack, tables, supabase, rid, status="later", retry_count=5267, error_message="note")


def test_two_edits_one_blind_write_overwrote_are_both_taken_in(stack, tables, supabase):
    """Two people set status in Tables, one after the other (versioned before the agent's retry_count, which
    waits in the outbox); the agent's change is then written blind over both. The first edit's delivery is merged
    against the record the write replaced and goes back to Tables - its status, taken from Tables, must count at
    its own version, not the merged row's: stamped at the merged row's (later than both edits), it beat the
    second person's later status, which was lost on both sides (a soak with blind writes on lost fields so)."""
    rid = _agreed_job(stack, tables, supabase, "two-overwritten")
    rec = tables.find("agent_jobs", rid)
    with blind_writes(stack, True), late_deliveries(stack):
        with _drain_held(stack):
            supabase.query("UPDATE agent_jobs SET retry_count = 7 WHERE id = %s", (rid,))
        agent_at = datetime.fromisoformat(supabase.row("agent_jobs", rid)["updated_at"])
        for status, before_ms in (("first person", 30), ("second person", 20)):
            tables.patch("agent_jobs", rec["id"], {
                "status": status, "updated_at": (agent_at - timedelta(milliseconds=before_ms)).isoformat()})
        stack.sweep_outbox(min_age_s=0)  # the agent's retry_count, written blind over both edits
        eventually(lambda: tables.find("agent_jobs", rid)["data"].get("retry_count") == 7)
        assert tables.find("agent_jobs", rid)["data"]["status"] == "queued"
    _both_end_with(stack, tables, supabase, rid, status="second person", retry_count=7)


def _ledger(conn: psycopg.Connection, lease: str, items: list[tuple[str, str, datetime]], *, take: bool = False
            ) -> dict[str, bool]:
    payload = json.dumps([{"message": m, "id": r, "edited_at": t.isoformat()} for m, r, t in items])
    return conn.execute("SELECT zsync.leased_before('agent_jobs', %s, %s::jsonb, %s)", (lease, payload, take)
                        ).fetchone()[0]


def test_the_ledger_rules_as_the_functions_role_calls_them(stack):
    """Through the functions' role (SECURITY DEFINER; the table itself is out of its reach): an earlier edit
    leased elsewhere holds a later one back; an edit of the same time, an older one, one of the same lease, or
    one whose lease ended more than a lease length ago does not; taking removes the entries only when nothing
    waits; a message leased again moves to its new lease; an earlier edit whose lease is over (back in the inbox)
    is told apart from one still leased."""
    t0 = datetime.now(UTC)
    rid, other = uid("ledger"), uid("ledger")
    m1, m2, m3 = uid("m"), uid("m"), uid("m")
    with psycopg.connect(stack.function_database_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM zsync.tables_leased")
        hold = json.dumps([{"message": m1, "id": rid, "edited_at": t0.isoformat()}])
        assert conn.execute("SELECT zsync.hold_leased('agent_jobs', 'lease-a', 60, %s::jsonb)", (hold,)
                            ).fetchone() == (1,)
        later = (m2, rid, t0 + timedelta(seconds=1))
        assert _ledger(conn, "lease-b", [later]) == {rid: False}
        assert _ledger(conn, "lease-b", [later, (m3, other, t0)]) == {rid: False}  # that record only
        assert _ledger(conn, "lease-b", [(m2, rid, t0)]) == {}  # the same edit (a duplicate message)
        assert _ledger(conn, "lease-b", [(m2, rid, t0 - timedelta(seconds=1))]) == {}  # an older one
        assert _ledger(conn, "lease-a", [later]) == {}  # one lease's deliveries: applied oldest first
        assert _ledger(conn, "lease-b", [later], take=True) == {rid: False}  # waiting: nothing taken
        assert conn.execute("SELECT zsync.hold_leased('agent_jobs', 'lease-c', 60, %s::jsonb)", (hold,)
                            ).fetchone() == (1,)  # leased again, by another drain
        assert _ledger(conn, "lease-c", [later]) == {}
        assert _ledger(conn, "lease-c", [(m1, rid, t0)], take=True) == {}  # applied: the entry goes
        assert _ledger(conn, "lease-b", [later]) == {}
        # an earlier edit still leased, then back in the inbox (its lease over), then a lease length later: nothing
        short = json.dumps([{"message": m3, "id": other, "edited_at": t0.isoformat()}])
        conn.execute("SELECT zsync.hold_leased('agent_jobs', 'lease-d', 1, %s::jsonb)", (short,))
        next_edit = [(uid("m"), other, t0 + timedelta(seconds=1))]
        assert _ledger(conn, "lease-e", next_edit) == {other: False}
        time.sleep(1.1)
        assert _ledger(conn, "lease-e", next_edit) == {other: True}
        time.sleep(1.0)
        assert _ledger(conn, "lease-e", next_edit) == {}
        # a message dead-lettered (acked unapplied) is forgotten: nothing waits for it
        conn.execute("SELECT zsync.hold_leased('agent_jobs', 'lease-f', 60, %s::jsonb)", (hold,))
        assert _ledger(conn, "lease-b", [later]) == {rid: False}
        assert conn.execute("SELECT zsync.forget_leased('agent_jobs', %s::text[])", ([m1],)).fetchone() == (1,)
        assert _ledger(conn, "lease-b", [later]) == {}


def test_the_redefined_functions_follow_their_last_definitions():
    """20261206200201 redefines zsync.merge_decide_base and zsync.agree (20261206100101's), zsync.settle_blind
    (20261206100201's) and zsync.sync_apply_many_set (20261205600101's): each must be the text before it plus the
    lines it marks, so a change made there is not silently undone here (update the copy when this fails)."""
    import re
    from pathlib import Path

    migrations = Path(__file__).resolve().parents[1] / "infra" / "supabase" / "migrations"

    def body(name: str, function: str) -> str:
        text = next(migrations.glob(f"{name}_*.sql")).read_text()
        start = re.search(rf"CREATE (OR REPLACE )?FUNCTION zsync\.{function}\(", text).start()
        return " ".join(re.sub(r"--[^\n]*", "", text[start:text.index("\n$", start)]).split()).replace(
            "CREATE OR REPLACE FUNCTION", "CREATE FUNCTION", 1)

    decide = body("20261206200201", "merge_decide_base")

    def cut(text: str, start: str, end: str) -> tuple[str, str]:
        i, j = text.index(start), text.index(end)
        return text[:i] + text[j:], text[i:j]

    decide, seen = cut(decide, "IF t.hash <> b.hash THEN SELECT c.known, c.known_at INTO v_seen", "t_ts := t.ts;")
    assert "zsync.tables_seen" in seen and "zsync.tables_known" in seen
    decide, after = cut(decide, "v_after := ", "IF t.hash = b.hash OR (t_ts <= b.version AND NOT v_after)")
    assert "v_over OR (v_seen IS NOT NULL" in after
    decide, timed = cut(decide, "IF v_seen IS NOT NULL THEN v_sts", "SELECT * INTO m FROM zsync.merge3(")
    assert "v_tfts := " in timed
    for added in ("v_seen jsonb; ", "v_seen_at timestamptz; ", "v_sts timestamptz; ", "v_tfts jsonb; ",
                  "v_after boolean; "):
        assert added in decide
        decide = decide.replace(added, "", 1)
    decide = decide.replace(
        "v_rep := zsync.overwritten_by(p_table, b.replaced, p_tables, p_edited_at);",
        "SELECT e.v INTO v_rep FROM jsonb_array_elements(b.replaced) e(v) WHERE p_edited_at < (e.v ->> 'until')"
        "::timestamptz ORDER BY (e.v ->> 'until')::timestamptz LIMIT 1;", 1)
    decide = decide.replace("IF t.hash = b.hash OR (t_ts <= b.version AND NOT v_after) THEN",
                            "IF t.hash = b.hash OR t_ts <= b.version THEN", 1)
    assert decide.replace("t_row, p_supabase, v_tfts, b.field_ts)", "t_row, p_supabase, NULL, b.field_ts)", 1) \
        == body("20261206100101", "merge_decide_base")

    many = body("20261206200201", "sync_apply_many_set")
    assert many.replace(
        "< e.b_replaced_until + zsync.stamp_race() AND zsync.overwritten_by(%1$L::regclass, e.b_replaced, e.row, "
        "e.edited_at) IS NOT NULL, false)", "< e.b_replaced_until, false)", 1).replace(
        "AS b_replaced_until, b.replaced AS b_replaced, ", "AS b_replaced_until, ", 1) \
        == body("20261205600101", "sync_apply_many_set")

    agree = body("20261206200201", "agree")
    assert agree.count("'wrote', r.row, ") == 1
    assert agree.replace("'wrote', r.row, ", "", 1) == body("20261206100101", "agree")

    settle = body("20261206200201", "settle_blind")
    kept = settle[settle.index("IF zsync.field_merge_on() THEN INSERT INTO zsync.tables_seen"):
                  settle.index("IF NOT EXISTS (SELECT 1 FROM zsync.tables_writing")]
    assert "zsync.seen_kept(" in kept
    settle = settle.replace(kept, "", 1).replace(
        "IF jsonb_typeof(p_items) IS DISTINCT FROM 'array' THEN RETURN 0; END IF; IF NOT EXISTS",
        "IF jsonb_typeof(p_items) IS DISTINCT FROM 'array' OR NOT EXISTS", 1)
    assert settle == body("20261206100201", "settle_blind")
