"""Issue 13: a later write is never lost to a clock, a number or a retry loop; deletes stay deleted.

Each test drives the real local stack (Tables records API, SQL on Postgres, the functions over HTTP) or
the real SQL on a migrated database, and failed before the fix.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.adapters import supabase_db
from shared.core.mapping import parse_tables_record
from shared.core.spec import TABLES
from tests.e2e import eventually, uid

JOBS = TABLES["agent_jobs"]




def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")




def post(stack, function: str, payload: dict) -> requests.Response:
    return requests.post(stack.functions[function].url, json=payload,
                         headers={"X-Zsync-Secret": stack.secret}, timeout=20)


# --- 1. a later write wins even when the earlier one's clock ran ahead --------------------------------


def test_1_later_sql_write_wins_over_a_tables_clock_running_ahead(stack, tables, supabase):
    rid = uid("skew")
    ahead = datetime.now(UTC) + timedelta(seconds=3)
    tables.create("agent_jobs", {"id": rid, "status": "queued", "updated_at": iso(ahead)})
    eventually(lambda: supabase.row("agent_jobs", rid))
    stack.wait_quiet()
    supabase.query("UPDATE agent_jobs SET status = 'done', updated_at = now() WHERE id = %s", (rid,))
    stack.wait_quiet()
    eventually(lambda: tables.find("agent_jobs", rid)["data"]["status"] == "done")
    assert supabase.row("agent_jobs", rid)["status"] == "done"
    assert supabase.audit(rid, "sync_skipped_stale_data") == []


def test_1_sql_write_forgetting_updated_at_after_a_skewed_one_still_wins(stack, tables, supabase):
    rid = uid("skew2")
    tables.create("agent_jobs", {"id": rid, "status": "queued",
                                 "updated_at": iso(datetime.now(UTC) + timedelta(seconds=30))})
    eventually(lambda: supabase.row("agent_jobs", rid))
    stack.wait_quiet()
    supabase.query("UPDATE agent_jobs SET status = 'running' WHERE id = %s", (rid,))
    stack.wait_quiet()
    eventually(lambda: tables.find("agent_jobs", rid)["data"]["status"] == "running")
    assert supabase.row("agent_jobs", rid)["status"] == "running"


def test_1_a_tables_edit_without_new_updated_at_is_versioned_by_edited_at_without_loops(stack, tables, supabase):
    rid = uid("edited")
    supabase.query("INSERT INTO agent_jobs (id, status) VALUES (%s, 'queued')", (rid,))
    rec = eventually(lambda: tables.find("agent_jobs", rid))
    stack.wait_quiet()
    before_sql, before_tables = supabase.writes("agent_jobs", rid), tables.writes("agent_jobs")
    # The echo of our own write: Tables' edited_at is later, content the same -> unchanged.
    echo = dict(rec["data"], edited_at=iso(datetime.now(UTC)))
    r = post(stack, "agent_jobs_to_supabase", echo)
    assert r.status_code == 200 and r.json()["outcome"] == "unchanged", r.text
    # A person edits a cell: same updated_at (the Zap maps the field as it is), new content, edited_at now.
    edit = dict(rec["data"], status="cancelled", edited_at=iso(datetime.now(UTC) + timedelta(milliseconds=5)))
    r = post(stack, "agent_jobs_to_supabase", edit)
    assert r.status_code == 200 and r.json()["outcome"] == "applied", r.text
    stack.wait_quiet()
    row = supabase.row("agent_jobs", rid)
    assert row["status"] == "cancelled"
    before = datetime.fromisoformat(rec["data"]["updated_at"].replace("Z", "+00:00"))
    assert datetime.fromisoformat(row["updated_at"]) > before
    # The same edit delivered again (and the echo of the new version) changes nothing more.
    assert post(stack, "agent_jobs_to_supabase", edit).json()["outcome"] in ("unchanged", "skipped_stale")
    stack.wait_quiet()
    # The record as the person's edit left it in Tables (this test posted the edit instead of making it there;
    # the sync does not write an applied Tables change back, so Tables keeps its own updated_at).
    new = dict(tables.find("agent_jobs", rid)["data"], status="cancelled")
    echo = dict(new, edited_at=iso(datetime.now(UTC)))
    assert post(stack, "agent_jobs_to_supabase", echo).json()["outcome"] == "unchanged"
    stack.wait_quiet()
    assert supabase.writes("agent_jobs", rid) == before_sql + 1  # the edit, once
    assert tables.writes("agent_jobs") - before_tables == 0  # no Tables request for the sync's own apply


# --- 2. numbers and timestamps compare by value -----------------------------------------------------------


def test_2_json_number_formatting_is_not_a_conflict(stack, tables, supabase):
    rid = uid("num")
    supabase.query("INSERT INTO agent_jobs (id, status, parameters) VALUES (%s, 'queued', "
                   "'{\"cost\": 12.50, \"n\": 1.0, \"big\": 1e2, \"b\": {\"z\": 1, \"a\": [0.10]}}')", (rid,))
    eventually(lambda: tables.find("agent_jobs", rid))
    stack.wait_quiet()
    assert supabase.audit(rid, "sync_skipped_stale_data") == []
    assert supabase.writes("agent_jobs", rid) == 1
    assert supabase.row("agent_jobs", rid)["parameters"]["cost"] == 12.50


def test_2_canonical_versions_in_sql(db):
    def cmp(a: dict, b: dict) -> int:
        return supabase_db.version_cmp(db, JOBS, a, b)

    base = {"id": "x", "updated_at": "2030-01-01T10:00:00.123456Z", "status": "s"}
    # A Tables field that keeps milliseconds only: the same version.
    assert cmp(base, dict(base, updated_at="2030-01-01T10:00:00.123Z")) == 0
    assert cmp(dict(base, started_at="2030-01-01T09:00:00.000999Z"), dict(base, started_at="2030-01-01T09:00:00Z")) == 0
    # Numbers by value, key order irrelevant, from JSON text.
    with db.cursor() as cur:
        for left, right in [('{"cost": 12.50}', '{"cost": 12.5}'), ('{"a": 1, "b": 2}', '{"b": 2.0, "a": 1e0}'),
                            ('[1.10, {"k": 100}]', '[1.1, {"k": 1E2}]')]:
            got = cur.execute("SELECT zsync.version_cmp('public.agent_jobs', "
                              "jsonb_build_object('id','x','parameters',%s::jsonb),"
                              " jsonb_build_object('id','x','parameters',%s::jsonb))", (left, right)).fetchone()[0]
            assert got == 0, (left, right)
    # Missing, null, empty text: one version.
    assert cmp(dict(base, error_message=None), {k: v for k, v in base.items()}) == 0
    assert cmp(dict(base, error_message=""), base) == 0
    # Different values still differ.
    assert cmp(dict(base, parameters={"cost": 12.5}), dict(base, parameters={"cost": 12.51})) != 0


# --- 3. rows the sync can never deliver -------------------------------------------------------------------


@pytest.mark.parametrize("sql, params", [
    ("INSERT INTO agent_jobs (id, status, updated_at) VALUES (%s, 'q', 'infinity')", ()),
    ("INSERT INTO agent_jobs (id, status, started_at) VALUES (%s, 'q', '-infinity')", ()),
    ("INSERT INTO agent_jobs (id, status) VALUES (%s || E'\\t', 'q')", ()),
    ("INSERT INTO agent_jobs (id, status) VALUES (%s, repeat('x', 100001))", ()),
    ("INSERT INTO agent_decisions (id, confidence) VALUES (%s, 'NaN')", ()),
    ("INSERT INTO rate_limits (id, reset_at) VALUES (%s, '10000-01-01')", ()),
])
def test_3_undeliverable_rows_are_refused_when_written(db, sql, params):
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(sql, (uid("bad"), *params))


def test_3_a_row_that_keeps_failing_is_parked_not_resent(stack, supabase):
    rid = uid("deep")
    deep = "[" * 70 + "]" * 70  # jsonb accepts it; the function refuses JSON nested deeper than 64
    supabase.query("INSERT INTO agent_jobs (id, status, parameters) VALUES (%s, 'q', %s::jsonb)", (rid, deep))
    stack.wait_quiet()
    for _ in range(3):
        stack.sweep_outbox(min_age_s=0)
        stack.wait_quiet()
    pending = supabase.query("SELECT count(*) FROM zsync.outbox WHERE record_id = %s AND acked_at IS NULL", (rid,))
    assert pending[0][0] == 0
    parked = supabase.query("SELECT ack_outcome, last_error FROM zsync.outbox WHERE record_id = %s", (rid,))
    assert parked[0][0] == "dead_letter" and "64" in parked[0][1]
    assert supabase.audit(rid, "sync_failed")
    assert stack.sweep_outbox(min_age_s=0) == 0


def test_3_a_lost_update_webhook_is_resent_by_the_sweeper(stack, tables, supabase):
    """pg_net sends an UPDATE's webhook once: lost, the change waits in the outbox and the sweeper (pg_cron
    in production) re-sends it; Tables' copy is updated once, not created again."""
    rid = uid("lost-update")
    # Versions a little ahead (later than any edited_at of the test), within the allowed future skew (300 s).
    ahead = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=120)
    t0, t1 = (f"{(ahead + timedelta(seconds=s)).strftime('%Y-%m-%dT%H:%M:%S')}Z" for s in (0, 1))
    supabase.query("INSERT INTO agent_jobs (id, status, updated_at) VALUES (%s, 'queued', %s)", (rid, t0))
    eventually(lambda: tables.find("agent_jobs", rid))
    stack.wait_quiet()
    writes = tables.writes("agent_jobs")
    stack.drop_deliveries(1.0)
    try:
        supabase.query("UPDATE agent_jobs SET status = 'done', updated_at = %s WHERE id = %s", (t1, rid))
        stack.wait_quiet()
    finally:
        stack.drop_deliveries(0.0)
    assert tables.find("agent_jobs", rid)["data"]["status"] == "queued"  # the webhook was lost
    pending = "SELECT op, attempts FROM zsync.outbox WHERE record_id = %s AND acked_at IS NULL"
    assert supabase.query(pending, (rid,)) == [("UPDATE", 0)]
    assert stack.sweep_outbox(min_age_s=0) >= 1
    stack.wait_quiet()
    found = eventually(lambda: tables.find("agent_jobs", rid))
    assert (found["data"]["status"], found["data"]["updated_at"]) == ("done", t1)
    assert len(tables.find_all("agent_jobs", rid)) == 1 and tables.writes("agent_jobs") == writes + 1
    assert supabase.query(pending, (rid,)) == []
    synced = [a["metadata"]["source_timestamp"][:19] for a in supabase.audit(rid, "agent_jobs_synced")
              if a["metadata"]["sync_direction"] == "supabase_to_tables"]
    assert synced == [t0[:19], t1[:19]]  # the insert, then the update once


# --- 4. deletes win ---------------------------------------------------------------------------------------


def test_4_supabase_delete_removes_the_tables_copy_and_is_not_resurrected(stack, tables, supabase):
    rid = uid("del")
    supabase.query("INSERT INTO agent_jobs (id, status) VALUES (%s, 'queued')", (rid,))
    old = eventually(lambda: tables.find("agent_jobs", rid))
    stack.wait_quiet()
    supabase.query("DELETE FROM agent_jobs WHERE id = %s", (rid,))
    stack.wait_quiet()
    eventually(lambda: tables.find("agent_jobs", rid) is None)
    tomb = supabase.query("SELECT version, origin FROM zsync.tombstones WHERE table_name = 'agent_jobs' "
                          "AND record_id = %s", (rid,))
    assert tomb and tomb[0][1] == "supabase"
    # A stale redelivery of the Tables copy is not re-inserted.
    r = post(stack, "agent_jobs_to_supabase", old["data"])
    assert r.status_code == 200 and r.json()["outcome"] == "deleted", r.text
    assert supabase.row("agent_jobs", rid) is None
    # The DELETE webhook again: nothing to do.
    r = post(stack, "agent_jobs_to_tables", {"type": "DELETE", "table": "agent_jobs", "schema": "public",
                                             "record": None, "old_record": {"id": rid}})
    assert r.status_code == 200 and r.json()["outcome"] == "unchanged", r.text
    pending = "SELECT count(*) FROM zsync.outbox WHERE record_id = %s AND acked_at IS NULL"
    assert supabase.query(pending, (rid,))[0][0] == 0
    # audit_log keeps the history, append-only.
    assert supabase.audit(rid, "agent_jobs_synced")


def test_4_delete_lag_runs_from_the_delete_not_from_the_old_record(stack, tables, supabase):
    """Deleting a record last changed a year ago: its delete entry's lag is the delivery's, not the record's age
    (an old record's delete must not trip the live lag alert)."""
    rid = uid("oldel")
    year_ago = datetime.now(UTC) - timedelta(days=365)
    supabase.query("INSERT INTO agent_jobs (id, status, updated_at) VALUES (%s, 'queued', %s)", (rid, year_ago))
    eventually(lambda: tables.find("agent_jobs", rid))
    stack.wait_quiet()
    supabase.query("DELETE FROM agent_jobs WHERE id = %s", (rid,))
    eventually(lambda: tables.find("agent_jobs", rid) is None)
    stack.wait_quiet()
    [entry] = [a for a in supabase.audit(rid, "agent_jobs_synced") if a["metadata"].get("operation") == "delete"]
    meta = entry["metadata"]
    assert meta["origin"] == "live" and meta["lag_seconds"] is not None and 0 <= meta["lag_seconds"] < 30, meta


def test_4_a_later_reinsert_wins_over_the_tombstone(stack, tables, supabase):
    rid = uid("reins")
    supabase.query("INSERT INTO agent_jobs (id, status) VALUES (%s, 'one')", (rid,))
    eventually(lambda: tables.find("agent_jobs", rid))
    stack.wait_quiet()
    supabase.query("DELETE FROM agent_jobs WHERE id = %s", (rid,))
    stack.wait_quiet()
    eventually(lambda: tables.find("agent_jobs", rid) is None)
    # A Claude agent re-creates the id with a clock behind the delete: still a newer version.
    supabase.query("INSERT INTO agent_jobs (id, status, updated_at) VALUES (%s, 'two', now() - interval '1 hour')",
                   (rid,))
    stack.wait_quiet()
    eventually(lambda: (tables.find("agent_jobs", rid) or {}).get("data", {}).get("status") == "two")
    assert supabase.query("SELECT count(*) FROM zsync.tombstones WHERE record_id = %s", (rid,))[0][0] == 0


def test_4_apply_tables_delete_entry_point(stack, tables, supabase):
    from shared.services.deletes import apply_tables_delete

    rid, newer = uid("tdel"), uid("tdel-newer")
    for i in (rid, newer):
        supabase.query("INSERT INTO agent_jobs (id, status) VALUES (%s, 'queued')", (i,))
    eventually(lambda: tables.find("agent_jobs", rid) and tables.find("agent_jobs", newer))
    stack.wait_quiet()
    ctx = stack_context(stack)
    # Deleted in Tables after its last version: Supabase deletes it, and a tombstone stops stale redelivery.
    res = apply_tables_delete(ctx, JOBS, rid, datetime.now(UTC))
    assert res.outcome == "applied"
    assert supabase.row("agent_jobs", rid) is None
    assert supabase.query("SELECT origin FROM zsync.tombstones WHERE record_id = %s", (rid,))[0][0] == "tables"
    assert apply_tables_delete(ctx, JOBS, rid, datetime.now(UTC)).outcome == "unchanged"
    # Deleted with a time before Supabase's newer version: Supabase keeps it.
    res = apply_tables_delete(ctx, JOBS, newer, datetime(2020, 1, 1, tzinfo=UTC))
    assert res.outcome == "skipped_stale" and supabase.row("agent_jobs", newer) is not None
    stack.wait_quiet()


def test_4_reconcile_never_resurrects_and_deletes_the_other_copy(stack, tables, supabase):
    from infra.reconcile import reconcile

    rid = uid("recdel")
    supabase.query("INSERT INTO agent_jobs (id, status) VALUES (%s, 'queued')", (rid,))
    rec = eventually(lambda: tables.find("agent_jobs", rid))
    stack.wait_quiet()
    # Deleted in Supabase while the webhook was lost (the Tables copy stays): simulate by deleting with the
    # webhook trigger's delivery acknowledged but the Tables copy re-created by hand.
    supabase.query("DELETE FROM agent_jobs WHERE id = %s", (rid,))
    stack.wait_quiet()
    eventually(lambda: tables.find("agent_jobs", rid) is None)
    tables.create("agent_jobs", rec["data"])  # a stale copy comes back in Tables
    stack.wait_quiet()
    assert supabase.row("agent_jobs", rid) is None  # its trigger delivery was refused by the tombstone
    result = reconcile(stack_context(stack), ["agent_jobs"])
    assert supabase.row("agent_jobs", rid) is None
    assert tables.find("agent_jobs", rid) is None
    assert not result.tables["agent_jobs"].errors


def stack_context(stack):
    """A SyncContext like the functions' (the function role, the local Tables service)."""
    from shared.platform.settings import Settings
    from shared.services.sync import SyncContext

    return SyncContext(settings=Settings(database_url=stack.function_database_url, zapier_base_url=stack.tables.url,
                                         tables_token=stack.token, table_ids=stack.table_ids))


def _reformat(value, rnd) -> str:
    """The same JSON value written differently: trailing zeros, exponents, key order, spacing."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return rnd.choice([str(value), f"{value}.0", f"{value}.000", f"{value}e0"])
    if isinstance(value, float):
        text = repr(value)
        return rnd.choice([text, text + "0" if "e" not in text and "." in text else text, f"{value!r}E0"
                           if "e" not in text else text])
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=rnd.random() < 0.5)
    if isinstance(value, list):
        return "[ " + " , ".join(_reformat(v, rnd) for v in value) + " ]"
    items = list(value.items())
    rnd.shuffle(items)
    return "{" + ",".join(f"{json.dumps(k)} : {_reformat(v, rnd)}" for k, v in items) + "}"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**15), 10**15)
    | st.floats(allow_nan=False, allow_infinity=False, width=64).filter(lambda f: f == 0 or 1e-300 < abs(f) < 1e300)
    | st.text(max_size=8).filter(lambda t: "\x00" not in t),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4).filter(lambda t: "\x00" not in t), c,
                                                        max_size=3),
    max_leaves=8)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(json_values, st.randoms(use_true_random=False))
def test_2_json_text_written_differently_is_the_same_version(db, value, rnd):
    a, b = json.dumps(value), _reformat(value, rnd)
    got = db.execute("SELECT zsync.version_cmp('public.agent_jobs', jsonb_build_object('id', 'x', 'parameters', "
                     "%s::jsonb), jsonb_build_object('id', 'x', 'parameters', %s::jsonb))", (a, b)).fetchone()[0]
    assert got == 0, (a, b)
    # And through the Tables side's parser (JSON text in a Tables field) against jsonb as Supabase keeps it.
    row = parse_tables_record(JOBS, {"id": "x", "parameters": b, "updated_at": "2030-01-01T00:00:00Z"})
    stored = {**row, "parameters": json.loads(a), "updated_at": "2030-01-01T00:00:00.000400Z"}
    assert supabase_db.version_cmp(db, JOBS, row, stored) == 0


# --- 5. the sweep is checked; 6. migrations through a pooler ------------------------------------------------


def test_5_doctor_fails_without_a_recent_sweep_or_with_an_old_backlog(database_url):
    from infra.deploy.doctor import check_outbox

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM zsync.sweeper_runs")
        checks = {c.target: c for c in check_outbox(conn)}
        assert not checks["outbox sweeper"].ok and "never run" in checks["outbox sweeper"].detail
        conn.execute("SELECT zsync.sweep_outbox()")
        assert all(c.ok for c in check_outbox(conn))
        conn.execute("UPDATE zsync.sweeper_runs SET last_at = now() - interval '10 minutes'")
        conn.execute("INSERT INTO zsync.outbox (table_name, record_id, op, created_at) "
                     "VALUES ('agent_jobs', 'stuck', 'UPDATE', now() - interval '2 hours')")
        checks = {c.target: c for c in check_outbox(conn)}
        assert not checks["outbox sweeper"].ok and not checks["outbox backlog"].ok
        assert "1 change(s) unacknowledged" in checks["outbox backlog"].detail


def test_6_migrations_hold_no_session_lock_and_run_once_concurrently(pg_server):
    from concurrent.futures import ThreadPoolExecutor

    from infra.local.pgnet_sql import apply_pg_net_sql, ensure_utc_database
    from infra.local.postgres import apply_vault_sql, create_database, prepare_database
    from shared.adapters.migrations import _LOCK_KEY, HISTORY_DIR, apply_migrations, discover

    def three_at_once(url: str, *directory: object) -> list[str]:
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda _: apply_migrations(url, *directory), range(3)))
        with psycopg.connect(url, autocommit=True) as conn:
            held = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s",
                                (_LOCK_KEY & 0xFFFFFFFF,)).fetchone()[0]
            assert held == 0
        return sorted(name for applied in results for name in applied)

    # a new database: three migrators at once apply each migration (the baseline first) exactly once
    fresh = create_database(pg_server.get_uri())
    ensure_utc_database(fresh)
    apply_pg_net_sql(fresh)
    apply_vault_sql(fresh)
    assert three_at_once(fresh) == sorted(m.name for m in discover())

    # the old chain (every file of it re-runnable): the later half again, by three migrators at once
    url = create_database(pg_server.get_uri())
    prepare_database(url, migrations_dir=HISTORY_DIR)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM zsync.schema_migrations WHERE version >= '20261129100000'")
    again = [m.name for m in discover(HISTORY_DIR) if m.version >= "20261129100000"]
    # Each migration is applied exactly once in all (the per-file lock may hand later files to another migrator).
    assert three_at_once(url, HISTORY_DIR) == sorted(again)
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM zsync.schema_migrations").fetchone()[0] == len(discover(HISTORY_DIR))


# --- 7. the outcome of a Tables write is recorded once, whatever fails after it ------------------------------


def test_7_commit_failing_after_the_tables_write_still_records_the_outcome_once(stack, tables, supabase):
    from shared.core.spec import FUNCTIONS
    from shared.services.sync import SupabaseWebhook
    from shared.services.to_tables import apply_from_supabase

    rid = uid("commitfail")
    # The first commit of a transaction that audits this record fails (serialization failure, retryable).
    supabase.query(f"""
        CREATE SEQUENCE IF NOT EXISTS public.zsync_test_commits;  -- nextval survives a rollback
        SELECT setval('public.zsync_test_commits', 1, false);
        CREATE OR REPLACE FUNCTION public.zsync_test_fail_commit_once() RETURNS trigger LANGUAGE plpgsql
        SECURITY DEFINER AS $$
        BEGIN
            IF NEW.resource_id = '{rid}' AND nextval('public.zsync_test_commits') = 1 THEN
                RAISE EXCEPTION 'injected commit failure' USING ERRCODE = '40001';
            END IF;
            RETURN NULL;
        END $$;
        DROP TRIGGER IF EXISTS zsync_test_fail_commit ON public.audit_log;
        CREATE CONSTRAINT TRIGGER zsync_test_fail_commit AFTER INSERT ON public.audit_log
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.zsync_test_fail_commit_once();
    """)
    try:
        row = {"id": rid, "status": "queued", "updated_at": "2031-01-01T00:00:00+00:00"}
        hook = SupabaseWebhook.model_validate({"type": "INSERT", "table": "agent_jobs", "schema": "public",
                                               "record": row, "old_record": None})
        before = tables.writes("agent_jobs")
        result = apply_from_supabase(stack_context(stack), FUNCTIONS["agent_jobs_to_tables"], hook)
        assert result.outcome == "applied"
        assert supabase.query("SELECT last_value FROM public.zsync_test_commits")[0][0] >= 2  # it did fail once
    finally:
        supabase.query("DROP TRIGGER IF EXISTS zsync_test_fail_commit ON public.audit_log")
    assert tables.find("agent_jobs", rid) is not None
    assert tables.writes("agent_jobs") - before == 1
    to_tables = [a for a in supabase.audit(rid, "agent_jobs_synced")
                 if a["metadata"]["function"] == "agent_jobs_to_tables"]
    assert len(to_tables) == 1


# --- 8. an unreadable Tables record that may be newer is parked, not overwritten --------------------------


def test_8_unreadable_newer_tables_record_is_parked_older_is_repaired(stack, tables, supabase):
    newer, older = uid("unread-new"), uid("unread-old")
    for rid in (newer, older):
        supabase.query("INSERT INTO agent_jobs (id, status) VALUES (%s, 'queued')", (rid,))
    eventually(lambda: tables.find("agent_jobs", newer) and tables.find("agent_jobs", older))
    stack.wait_quiet()
    future = iso(datetime.now(UTC) + timedelta(hours=1))
    # A person breaks the JSON but also sets a later updated_at (their edit is newer): refused (400) toward
    # Supabase; a later Supabase change must not overwrite their other fields.
    tables.update("agent_jobs", newer, {"parameters": "{broken", "status": "person-edit", "updated_at": future})
    tables.update("agent_jobs", older, {"parameters": "{broken", "updated_at": "2020-01-01T00:00:00Z"})
    stack.wait_quiet()
    supabase.query("UPDATE agent_jobs SET status = 'running' WHERE id IN (%s, %s)", (newer, older))
    stack.wait_quiet()
    kept = tables.find("agent_jobs", newer)["data"]
    assert kept["status"] == "person-edit" and kept["parameters"] == "{broken"
    parked = [a for a in supabase.audit(newer, "sync_failed") if a["metadata"].get("status") == 409]
    assert parked and "person-edit" in parked[0]["metadata"]["tables_record"]
    assert "parameters" in json.dumps(parked[0]["metadata"]["problems"])
    pending = "SELECT count(*) FROM zsync.outbox WHERE record_id = %s AND acked_at IS NULL"
    assert supabase.query(pending, (newer,))[0][0] == 0
    # Provably older than Supabase's version: overwritten with it (as before).
    eventually(lambda: tables.find("agent_jobs", older)["data"]["status"] == "running")
