"""Issue 18 items 1, 2 and the delete parts of 8: a later delete wins whatever is in flight, a restore comes
back, tombstones expire, refused or ignored deletes are not acknowledged as applied, the trash check misses
no delete, and what reconcile does with a delete that left Zapier's trash unseen. Against the real local stack
(Tables API, functions over HTTP, the outbox sweeper, SQL on Postgres); see docs/deletes.md."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from infra.reconcile import reconcile
from shared.core.mapping import parse_supabase_record, to_tables_fields
from shared.core.spec import FUNCTIONS, TABLES
from shared.services import tables_trash
from shared.services.sync import SupabaseWebhook
from shared.services.tables_trash import check_trash
from shared.services.to_tables import apply_from_supabase
from tests.e2e import Supabase, Tables, eventually, uid
from tests.test_correctness import post, stack_context
from tests.test_tables_deletes import delete_in_tables, synced_job, tombstone

JOBS = TABLES["agent_jobs"]
PENDING = "SELECT op, ack_outcome FROM zsync.outbox WHERE table_name = 'agent_jobs' AND record_id = %s ORDER BY id"


def live_everywhere(tables: Tables, supabase: Supabase, rid: str) -> tuple[bool, bool]:
    return supabase.row("agent_jobs", rid) is not None, tables.find("agent_jobs", rid) is not None


def admin(tables: Tables, path: str, body: dict | None = None) -> dict:
    r = tables.s.post(f"{tables.base}/_admin/{path}", json=body, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


# --- 1. a later delete wins, whatever is in flight ------------------------------------------------------------


def test_a_tables_delete_after_an_update_still_in_the_outbox_wins(stack, tables, supabase):
    """An agent updates X at t1; the change waits in the outbox (its webhook lost); a person deletes X in Tables
    at t2 > t1; then the sweeper delivers t1. Before: the delivery re-created X in Tables and the trash check,
    seeing a live X, dropped the delete: X lived on both sides. Now the delivery finds X in the trash, deleted
    after t1, and applies the delete to Supabase instead."""
    rec = synced_job(stack, tables, supabase, "dwin")
    rid = rec["data"]["id"]
    with stack.trash_paused():
        lost = stack.dropped_deliveries()["pgnet"]
        stack.drop_deliveries(1.0)  # pg_net loses the webhook: the change stays pending in the outbox
        try:
            supabase.query("UPDATE agent_jobs SET status = 'running' WHERE id = %s", (rid,))  # t1
            eventually(lambda: stack.dropped_deliveries()["pgnet"] > lost)
            delete_in_tables(tables, "agent_jobs", rec)  # t2 > t1
        finally:
            stack.drop_deliveries(0.0)
        assert stack.sweep_outbox(min_age_s=0) >= 1  # the sweeper re-sends t1
        stack.wait_quiet()
        assert live_everywhere(tables, supabase, rid) == (False, False)
        assert tombstone(supabase, rid)[0][1] == "tables"
        assert ("UPDATE", "deleted") in supabase.query(PENDING, (rid,))
        deletes = [a for a in supabase.audit(rid, "agent_jobs_synced") if a["metadata"].get("operation") == "delete"]
        assert len(deletes) == 1 and deletes[0]["metadata"]["outcome"] == "applied", deletes
        res = check_trash(stack_context(stack), JOBS)  # the scheduled check: nothing left to do
    assert res.applied == 0 and res.still_live == 0, res
    stack.wait_quiet()
    assert live_everywhere(tables, supabase, rid) == (False, False)
    assert not supabase.query("SELECT 1 FROM zsync.outbox WHERE record_id = %s AND acked_at IS NULL", (rid,))


def test_the_single_path_does_not_recreate_a_record_deleted_in_tables_after_the_version(stack, tables, supabase):
    """The one-record path (batches off, catch hook, a hand-sent webhook) follows the same rule."""
    rec = synced_job(stack, tables, supabase, "dwin1")
    rid = rec["data"]["id"]
    row = supabase.row("agent_jobs", rid)
    with stack.trash_paused():
        time.sleep(0.01)
        delete_in_tables(tables, "agent_jobs", rec)
        hook = SupabaseWebhook.model_validate({"type": "UPDATE", "table": "agent_jobs", "schema": "public",
                                               "record": row, "old_record": None})
        result = apply_from_supabase(stack_context(stack), FUNCTIONS["agent_jobs_to_tables"], hook)
    assert result.outcome == "deleted", result
    stack.wait_quiet()
    assert live_everywhere(tables, supabase, rid) == (False, False)
    # A version later than the delete still wins over it: re-created in Tables.
    supabase.query("INSERT INTO agent_jobs (id, status) VALUES (%s, 'again')", (rid,))
    eventually(lambda: tables.find("agent_jobs", rid))
    stack.wait_quiet()
    assert live_everywhere(tables, supabase, rid) == (True, True)


def test_a_create_whose_answer_was_lost_is_not_resent_over_a_later_tables_delete(stack, tables, supabase):
    """A Supabase insert reached Tables but the create's answer was lost (the outbox entry stays pending); a
    person deletes the new record in Tables; the sweeper re-sends the insert. Before: a second create brought
    X back on both sides. Now the delete, later than the insert, wins. (With the field merge on, the created
    record's own trigger delivery - the same version - acknowledges the insert already: nothing is re-sent.)"""
    rid = uid("dlost")
    with stack.trash_paused():
        lost = stack.dropped_deliveries()["pgnet"]
        stack.drop_deliveries(1.0)  # the insert's webhook is lost: its outbox entry stays pending
        try:
            supabase.query("INSERT INTO agent_jobs (id, status) VALUES (%s, 'queued')", (rid,))
            eventually(lambda: stack.dropped_deliveries()["pgnet"] > lost)
        finally:
            stack.drop_deliveries(0.0)
        row = parse_supabase_record(JOBS, supabase.row("agent_jobs", rid))
        made = tables.create("agent_jobs", to_tables_fields(JOBS, row))  # what the create whose answer was lost made
        stack.wait_quiet()  # its trigger delivery: the same version, unchanged
        time.sleep(0.01)
        delete_in_tables(tables, "agent_jobs", made)
        assert supabase.query(PENDING, (rid,)) in ([("INSERT", None)], [("INSERT", "unchanged")])
        stack.sweep_outbox(min_age_s=0)
        stack.wait_quiet()
        res = check_trash(stack_context(stack), JOBS)
    stack.wait_quiet()
    assert live_everywhere(tables, supabase, rid) == (False, False), res
    assert {("INSERT", "deleted"), ("INSERT", "unchanged")} & set(supabase.query(PENDING, (rid,)))


def test_the_syncs_own_trashed_copy_is_not_a_later_delete(stack, tables, supabase):
    """The Tables copy the sync trashed after a Supabase delete is never taken for a person's delete: a re-insert
    whose version is before that trash time (a clock behind) is still created in Tables, and the trash check
    leaves it alone."""
    rid = uid("down")
    supabase.query("INSERT INTO agent_jobs (id, status) VALUES (%s, 'one')", (rid,))
    eventually(lambda: tables.find("agent_jobs", rid))
    stack.wait_quiet()
    supabase.query("DELETE FROM agent_jobs WHERE id = %s", (rid,))
    eventually(lambda: tables.find("agent_jobs", rid) is None)
    stack.wait_quiet()
    assert supabase.query("SELECT count(*) FROM zsync.sync_trashed WHERE record_id = %s", (rid,))[0][0] == 1
    with stack.trash_paused():
        supabase.query("INSERT INTO agent_jobs (id, status, updated_at) VALUES (%s, 'two', now() - interval '1 hour')",
                       (rid,))
        eventually(lambda: (tables.find("agent_jobs", rid) or {}).get("data", {}).get("status") == "two")
        stack.wait_quiet()
        res = check_trash(stack_context(stack), JOBS, since=datetime(2000, 1, 1, tzinfo=UTC))
    assert res.applied == 0, res
    assert live_everywhere(tables, supabase, rid) == (True, True)


# --- 2. a restore comes back ---------------------------------------------------------------------------------


def test_a_record_restored_from_the_tables_trash_comes_back_on_both_sides(stack, tables, supabase):
    """Deleted in Tables (applied to Supabase by the trash check), then restored from Zapier's trash with its old
    updated_at. Before: every delivery of it was answered 'deleted' and the Tables copy deleted again. Now the
    restore (Zapier's edited_at later than the tombstone) is a new change: back on both sides, versioned after
    the delete."""
    rec = synced_job(stack, tables, supabase, "drest")
    rid = rec["data"]["id"]
    with stack.trash_paused():
        delete_in_tables(tables, "agent_jobs", rec)
        assert check_trash(stack_context(stack), JOBS).applied == 1
        [(tomb, origin)] = tombstone(supabase, rid)
        assert origin == "tables" and supabase.row("agent_jobs", rid) is None
        time.sleep(0.01)
        restored = admin(tables, f"tables/{tables.ids['agent_jobs']}/records/{rec['id']}/restore")["data"]
        eventually(lambda: supabase.row("agent_jobs", rid))
        stack.wait_quiet()
        assert check_trash(stack_context(stack), JOBS).applied == 0
    stack.wait_quiet()
    assert live_everywhere(tables, supabase, rid) == (True, True)
    assert tables.find("agent_jobs", rid)["id"] == rec["id"]  # the restored record itself, not a copy
    stored = datetime.fromisoformat(supabase.row("agent_jobs", rid)["updated_at"])
    assert stored > tomb and stored >= datetime.fromisoformat(restored["edited_at"].replace("Z", "+00:00")) \
        - timedelta(milliseconds=1)
    assert not tombstone(supabase, rid)
    # Tables carries the restore's version too, and the sync is quiet: its updated_at cell when the sync wrote one
    # back, else Zapier's edited_at (a record without updated_at is versioned at it, as Supabase was).
    copy = tables.find("agent_jobs", rid)
    in_tables = datetime.fromisoformat((copy["data"].get("updated_at") or copy["edited_at"]).replace("Z", "+00:00"))
    assert abs(in_tables - stored) < timedelta(milliseconds=1), (in_tables, stored)
    # A stale delivery from before the delete changes nothing now. It is sent as the trigger delivered it: the
    # fields (no updated_at: Zapier fills nothing in) and Zapier's edited_at of that change, at which such a
    # record is versioned (fields alone, with neither time, would be versioned at their arrival: a new change).
    r = post(stack, "agent_jobs_to_supabase", rec["data"] | {"edited_at": rec["edited_at"]})
    assert r.json()["outcome"] == "skipped_stale", r.text
    stack.wait_quiet()
    assert live_everywhere(tables, supabase, rid) == (True, True)


def test_a_record_recreated_in_tables_with_its_old_updated_at_comes_back(stack, tables, supabase):
    rid = uid("drecr")
    old = "2024-01-02T03:04:05Z"
    rec = tables.create("agent_jobs", {"id": rid, "status": "queued", "updated_at": old})
    eventually(lambda: supabase.row("agent_jobs", rid))
    stack.wait_quiet()
    with stack.trash_paused():
        delete_in_tables(tables, "agent_jobs", rec)
        assert check_trash(stack_context(stack), JOBS).applied == 1
        # A delivery of the record as it was before the delete is still refused...
        before = {"record": rec["data"], "edited_at": rec["edited_at"]}
        assert post(stack, "agent_jobs_to_supabase", before).json()["outcome"] == "deleted"
        stack.wait_quiet()
        # ...while the same fields created again afterwards are a new change.
        again = tables.create("agent_jobs", {"id": rid, "status": "queued", "updated_at": old})
        eventually(lambda: supabase.row("agent_jobs", rid))
        stack.wait_quiet()
    assert live_everywhere(tables, supabase, rid) == (True, True)
    assert tables.find("agent_jobs", rid)["id"] == again["id"]
    assert supabase.row("agent_jobs", rid)["updated_at"] > "2025"


def test_a_restore_reconcile_finds_comes_back_too(stack, tables, supabase):
    """A restore whose delivery was lost: reconcile applies it (Zapier's edited_at from the records API)."""
    rec = synced_job(stack, tables, supabase, "drrec")
    rid = rec["data"]["id"]
    with stack.trash_paused():
        delete_in_tables(tables, "agent_jobs", rec)
        assert check_trash(stack_context(stack), JOBS).applied == 1
        lost = stack.dropped_deliveries()["tables"]
        stack.drop_deliveries(1.0)  # the restore's trigger notification is lost: its message waits in the inbox
        try:
            admin(tables, f"tables/{tables.ids['agent_jobs']}/records/{rec['id']}/restore")
            eventually(lambda: stack.dropped_deliveries()["tables"] > lost)
            assert supabase.row("agent_jobs", rid) is None
            report = reconcile(stack_context(stack), ["agent_jobs"]).tables["agent_jobs"]
            assert supabase.row("agent_jobs", rid) is not None  # applied by reconcile itself
        finally:
            stack.drop_deliveries(0.0)
    assert not report.errors and report.deleted_in_tables == 0, report
    stack.safety_drain()  # the waiting message arrives later: changes nothing
    stack.wait_quiet()
    assert live_everywhere(tables, supabase, rid) == (True, True)


def test_a_copy_restored_after_a_supabase_delete_comes_back_on_both_sides(stack, tables, supabase):
    """Deleted in Supabase; the sync moved the Tables copy to the trash (noted in zsync.sync_trashed); a person
    restores it from Zapier's trash. Before: its delivery was refused by the tombstone and the copy deleted
    again. Now the sync recognises its own trashed record live again: a later change, back on both sides."""
    for via_reconcile in (False, True):
        rid = uid("drsup")
        supabase.query("INSERT INTO agent_jobs (id, status) VALUES (%s, 'queued')", (rid,))
        rec = eventually(lambda rid=rid: tables.find("agent_jobs", rid))
        stack.wait_quiet()
        supabase.query("DELETE FROM agent_jobs WHERE id = %s", (rid,))
        eventually(lambda rid=rid: tables.find("agent_jobs", rid) is None)
        stack.wait_quiet()
        [(tomb, _)] = tombstone(supabase, rid)
        restore = f"tables/{tables.ids['agent_jobs']}/records/{rec['id']}/restore"
        with stack.trash_paused():
            if via_reconcile:  # its delivery lost: reconcile finds it
                lost = stack.dropped_deliveries()["tables"]
                stack.drop_deliveries(1.0)
                try:
                    admin(tables, restore)
                    eventually(lambda lost=lost: stack.dropped_deliveries()["tables"] > lost)
                    report = reconcile(stack_context(stack), ["agent_jobs"]).tables["agent_jobs"]
                finally:
                    stack.drop_deliveries(0.0)
                assert not report.errors, report
                stack.safety_drain()
            else:
                admin(tables, restore)
            eventually(lambda rid=rid: supabase.row("agent_jobs", rid))
            stack.wait_quiet()
            assert check_trash(stack_context(stack), JOBS).applied == 0
        stack.wait_quiet()
        assert live_everywhere(tables, supabase, rid) == (True, True), via_reconcile
        assert tables.find("agent_jobs", rid)["id"] == rec["id"]
        assert datetime.fromisoformat(supabase.row("agent_jobs", rid)["updated_at"]) > tomb


def test_the_tombstone_rule_in_sql_both_paths(db):
    """zsync.sync_apply and the multi-row zsync.sync_apply_many decide alike: a Tables change after a Tables
    delete (edited_at later) is applied at greatest(edited_at, tombstone + 1 ms); earlier, or against a delete
    made in Supabase (another clock, and the sync's own writes), it is refused."""
    tomb = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    row = {"id": None, "status": "back", "updated_at": "2026-05-01T00:00:00Z"}
    cases = [("tables", tomb + timedelta(seconds=5), "applied", tomb + timedelta(seconds=5)),
             ("tables", tomb, "deleted", None),
             ("tables", tomb - timedelta(seconds=5), "deleted", None),
             ("tables", None, "deleted", None),
             ("supabase", tomb + timedelta(seconds=5), "deleted", None)]
    for multi in (False, True):
        for n, (origin, edited, outcome, version) in enumerate(cases):
            rid = f"sqltomb-{multi}-{n}"
            db.execute("INSERT INTO zsync.tombstones (table_name, record_id, version, origin) "
                       "VALUES ('agent_jobs', %s, %s, %s)", (rid, tomb, origin))
            incoming = json.dumps(row | {"id": rid})
            with db.transaction():
                if multi:
                    db.execute("SET LOCAL zsync.small_batch = 0")
                    batch = json.dumps([{"row": json.loads(incoming), "edited_at": edited and edited.isoformat()},
                                        {"row": {"id": f"{rid}-other", "status": "x",
                                                 "updated_at": "2026-01-01T00:00:00Z"},
                                         "edited_at": None}])
                    got = db.execute("SELECT outcome FROM zsync.sync_apply_many('public.agent_jobs', %s) "
                                     "WHERE record_id = %s", (batch, rid)).fetchone()[0]
                else:
                    got = db.execute("SELECT outcome FROM zsync.sync_apply('public.agent_jobs', %s, %s)",
                                     (incoming, edited)).fetchone()[0]
            assert got == outcome, (multi, origin, edited, got)
            stored = db.execute("SELECT updated_at FROM agent_jobs WHERE id = %s", (rid,)).fetchone()
            assert (stored[0] if stored else None) == version, (multi, origin, edited, stored)


# --- tombstones expire ----------------------------------------------------------------------------------------


def test_tombstones_expire_after_the_retention_once_both_sides_agree(db):
    old = datetime.now(UTC) - timedelta(days=31)
    for rid, when in (("exp-old", old), ("exp-pending", old), ("exp-young", datetime.now(UTC) - timedelta(days=29))):
        db.execute("INSERT INTO zsync.tombstones (table_name, record_id, version, origin, deleted_at) "
                   "VALUES ('agent_jobs', %s, %s, 'supabase', %s) ON CONFLICT DO NOTHING", (rid, when, when))
    # exp-pending's DELETE has not reached Tables yet: the two sides do not agree.
    db.execute("INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at) "
               "VALUES ('agent_jobs', 'exp-pending', 'DELETE', %s)", (old,))
    db.execute("INSERT INTO zsync.sync_trashed (table_name, tables_record_id, record_id, trashed_at) "
               "VALUES ('agent_jobs', 'EXPTRASHED', 'exp-old', %s) ON CONFLICT DO NOTHING", (old,))
    removed = db.execute("SELECT zsync.expire_tombstones()").fetchone()[0]
    assert removed >= 1
    left = {r[0] for r in db.execute("SELECT record_id FROM zsync.tombstones WHERE record_id LIKE 'exp-%%'")}
    assert left == {"exp-pending", "exp-young"}
    assert not db.execute("SELECT 1 FROM zsync.sync_trashed WHERE tables_record_id = 'EXPTRASHED'").fetchall()
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        db.execute("SELECT zsync.expire_tombstones(interval '-1 day')")
    # Once the DELETE is acknowledged, it expires too.
    db.execute("UPDATE zsync.outbox SET acked_at = now(), ack_outcome = 'applied' WHERE record_id = 'exp-pending'")
    db.execute("SELECT zsync.expire_tombstones()")
    assert {r[0] for r in db.execute("SELECT record_id FROM zsync.tombstones WHERE record_id LIKE 'exp-%%'")} \
        == {"exp-young"}


# --- 8. deletes acknowledged only when they happened -------------------------------------------------------


def test_a_delete_refused_inside_a_200_is_not_acknowledged_as_applied(stack, tables, supabase):
    """Zapier answers the DELETE 200 with meta.errors (nothing deleted). Before: the delete was acked 'applied'
    and the Tables copy lived on. Now it counts as a refused write: not acked, audited, re-sent."""
    rec = synced_job(stack, tables, supabase, "drefuse")
    rid = rec["data"]["id"]
    admin(tables, "faults", {"status": 200, "count": 1, "method": "DELETE"})
    try:
        supabase.query("DELETE FROM agent_jobs WHERE id = %s", (rid,))
        stack.wait_quiet()
        assert tables.find("agent_jobs", rid) is not None  # Zapier refused: the copy is still there
        assert supabase.query(PENDING, (rid,))[-1] == ("DELETE", None)  # not acknowledged
        assert supabase.query("SELECT failures FROM zsync.outbox WHERE record_id = %s AND op = 'DELETE'",
                              (rid,))[0][0] == 1
        assert supabase.audit(rid, "sync_failed")
    finally:
        tables.s.delete(f"{tables.base}/_admin/faults", timeout=10)
    stack.sweep_outbox(min_age_s=0)  # re-sent: now Zapier deletes it
    stack.wait_quiet()
    eventually(lambda: tables.find("agent_jobs", rid) is None)
    assert supabase.query(PENDING, (rid,))[-1] == ("DELETE", "applied")


def test_a_delete_refused_inside_a_200_in_a_batch_drain_is_not_acknowledged(stack, tables, supabase):
    """The same refusal met by a batch drain (the DELETE's own webhook lost, a later wake-up claims it)."""
    from shared.services.outbox_batch import drain_outbox

    rec = synced_job(stack, tables, supabase, "drefb")
    rid = rec["data"]["id"]
    lost = stack.dropped_deliveries()["pgnet"]
    stack.drop_deliveries(1.0)
    try:
        supabase.query("DELETE FROM agent_jobs WHERE id = %s", (rid,))
        eventually(lambda: stack.dropped_deliveries()["pgnet"] > lost)
    finally:
        stack.drop_deliveries(0.0)
    admin(tables, "faults", {"status": 200, "count": 1, "method": "DELETE"})
    try:
        drained = drain_outbox(stack_context(stack), FUNCTIONS["agent_jobs_to_tables"])
    finally:
        tables.s.delete(f"{tables.base}/_admin/faults", timeout=10)
    assert drained.results[rid].outcome == "failed", drained.results.get(rid)
    assert tables.find("agent_jobs", rid) is not None
    assert supabase.query(PENDING, (rid,))[-1] == ("DELETE", None)
    assert supabase.audit(rid, "sync_failed")
    stack.sweep_outbox(min_age_s=0)
    stack.wait_quiet()
    eventually(lambda: tables.find("agent_jobs", rid) is None)
    assert supabase.query(PENDING, (rid,))[-1] == ("DELETE", "applied")


def test_a_catch_hook_delete_is_acknowledged_not_resent_for_ever(zsync_env, database_url):
    """The catch-hook writer cannot delete a Tables record: the DELETE is answered 'ignored' and acknowledged
    (before: left pending, so the sweeper re-sent it every few minutes for ever)."""
    from functions_framework import create_app

    from tests.receiver import recording_server
    from tests.test_functions_inprocess import MAIN

    with recording_server() as (base, got):
        zsync_env(database_url=database_url, webhook_secret="s", retry_budget_s="1", tables_writer="catch_hook",
                  catch_hook_urls=json.dumps({"agent_jobs": f"{base}/hooks/catch/1/x/"}))
        rid = uid("dhook")
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("INSERT INTO agent_jobs (id, status) VALUES (%s, 'queued')", (rid,))
            conn.execute("UPDATE zsync.outbox SET acked_at = now() WHERE record_id = %s", (rid,))
            conn.execute("DELETE FROM agent_jobs WHERE id = %s", (rid,))
        hook = {"type": "DELETE", "table": "agent_jobs", "schema": "public", "record": None,
                "old_record": {"id": rid}}
        r = create_app("agent_jobs_to_tables", MAIN).test_client().post("/", json=hook, headers={"X-Zsync-Secret": "s"})
        assert r.status_code == 200 and r.json["outcome"] == "ignored", r.json
        assert not got  # nothing was sent to the hook
        with psycopg.connect(database_url, autocommit=True) as conn:
            assert conn.execute(PENDING, (rid,)).fetchall()[-1] == ("DELETE", "ignored")
            assert not conn.execute("SELECT 1 FROM zsync.outbox WHERE record_id = %s AND acked_at IS NULL",
                                    (rid,)).fetchall()


def test_the_trash_check_misses_no_delete_made_on_a_page_it_already_read(stack, tables, supabase, monkeypatch):
    """A person deletes R (on a trash page the check has already read) and Q (on a later page) while a check
    runs. Before: the watermark became Q's deleted_at, so once a check took longer than the overlap R was never
    applied. Now the watermark never passes the check's start: the next check applies R (overlap 0 here: a check
    longer than the overlap)."""
    r_rec = synced_job(stack, tables, supabase, "dpgr")  # oldest: its trash position comes first
    p_rec = synced_job(stack, tables, supabase, "dpgp")
    q_rec = synced_job(stack, tables, supabase, "dpgq")
    s_rec = synced_job(stack, tables, supabase, "dpgs")  # trashed last in order: the trash has a page after P's
    ctx = stack_context(stack)
    monkeypatch.setattr(tables_trash, "PAGE", 1)  # one trashed record per page
    real = ctx.tables.iter_records

    def concurrent_deletes(*args, **kwargs):  # a person deletes while the check reads the trash
        for record in real(*args, **kwargs):
            yield record
            if record.id == p_rec["id"]:
                delete_in_tables(tables, "agent_jobs", r_rec)  # behind the check's cursor
                delete_in_tables(tables, "agent_jobs", q_rec)  # ahead of it

    with stack.trash_paused():
        check_trash(ctx, JOBS)  # a watermark from the trash as it is
        delete_in_tables(tables, "agent_jobs", s_rec)
        delete_in_tables(tables, "agent_jobs", p_rec)
        monkeypatch.setattr(ctx.tables, "iter_records", concurrent_deletes)
        first = check_trash(ctx, JOBS, overlap=timedelta(0))
        monkeypatch.setattr(ctx.tables, "iter_records", real)
        assert supabase.row("agent_jobs", r_rec["data"]["id"]) is not None, first  # not read in this check
        assert supabase.row("agent_jobs", q_rec["data"]["id"]) is None
        second = check_trash(ctx, JOBS, overlap=timedelta(0))
    assert second.applied == 1, second
    stack.wait_quiet()
    assert live_everywhere(tables, supabase, r_rec["data"]["id"]) == (False, False)


def test_reconcile_recreates_a_record_whose_tables_delete_left_the_trash_unseen(stack, tables, supabase):
    """Stated behaviour (docs/deletes.md): a record deleted in Tables while the trash checks were stopped, and
    gone from Zapier's trash before any check or reconcile saw it, leaves no trace of the delete on either side.
    Reconcile then finds the Supabase row without a Tables copy and re-creates it there (it cannot tell the
    delete from a copy that never reached Tables, and never deletes without evidence)."""
    rec = synced_job(stack, tables, supabase, "dpurge")
    rid = rec["data"]["id"]
    with stack.trash_paused():
        delete_in_tables(tables, "agent_jobs", rec)
        assert admin(tables, f"tables/{tables.ids['agent_jobs']}/trash/empty")["removed"] >= 1
        assert not tables.find_all("agent_jobs", rid)
        report = reconcile(stack_context(stack), ["agent_jobs"]).tables["agent_jobs"]
    assert report.missing_in_tables >= 1 and not report.errors, report
    assert report.trashed_in_tables == 0 and report.deleted_in_supabase == 0
    stack.wait_quiet()
    assert live_everywhere(tables, supabase, rid) == (True, True)
    assert not tombstone(supabase, rid)
