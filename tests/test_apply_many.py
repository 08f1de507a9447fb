"""Tables -> Supabase in batches (shared.services.from_tables.apply_many_from_tables / zsync.sync_apply_many)
against real Postgres: every delivery gets the outcome, audit entries and side effects (push-back / re-sent delete) that
the one-record path gives it, on a mixed batch (new, older, newer, same, tombstoned, edited in Tables without
a new updated_at, duplicate in the batch, invalid); the generated version expressions agree with
zsync.version_of; concurrent batches and single applies do not deadlock."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from infra.local.postgres import create_database, prepare_database
from shared.adapters import supabase_db
from shared.core.outcome import Outcome
from shared.core.spec import FUNCTIONS
from shared.platform.settings import Settings
from shared.services.from_tables import apply_from_tables, apply_many_from_tables
from shared.services.sync import SyncContext, change_time, unwrap_tables_payload
from tests.e2e import deadlocks

FN = FUNCTIONS["agent_jobs_to_supabase"]
AUDIT_FN = FUNCTIONS["audit_log_to_supabase"]
T0, T1, T2 = "2030-01-01T00:00:00Z", "2030-01-01T01:00:00Z", "2030-01-01T02:00:00Z"
RECEIVED = datetime(2030, 1, 2, tzinfo=UTC)
# These fixed versions lie ahead of the clock (deterministic tombstones, and newer than any Zapier edited_at):
# the future-skew rule (ZSYNC_MAX_FUTURE_SKEW_S, zsync.config) is raised past them here.
FAR_SKEW_S = 20 * 365 * 86400.0


def _fresh(pg_server: Any) -> str:
    url = create_database(pg_server.get_uri())
    prepare_database(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT zsync.set_max_future_skew(%s)", (FAR_SKEW_S,))
        # Wired, so a push-back queues an outbox entry (the webhook goes nowhere reachable).
        conn.execute("INSERT INTO zsync.webhook_endpoints (table_name, url, headers, timeout_ms) "
                     "VALUES ('agent_jobs', 'http://127.0.0.1:9/', '{}', 100)")
        conn.execute("INSERT INTO agent_jobs (id, status, parameters, updated_at, created_at) "
                     "SELECT v.*, %(t0)s FROM (VALUES "
                     "('same', 'a', '{\"n\": 12.50}'::jsonb, %(t1)s::timestamptz), ('older', 'stored', NULL, %(t1)s), "
                     "('newer', 'stored', NULL, %(t1)s), ('edited', 'x', NULL, %(t1)s), "
                     "('dup', 'stored', NULL, %(t0)s), ('gone', 'bye', NULL, %(t0)s)) "
                     "AS v(id, status, parameters, updated_at)", {"t0": T0, "t1": T1})
        conn.execute("DELETE FROM agent_jobs WHERE id = 'gone'")  # tombstoned later than T0
        conn.execute("DELETE FROM zsync.outbox")
    return url


def _ctx(url: str) -> SyncContext:
    return SyncContext(settings=Settings(database_url=url, retry_budget_s=2, max_future_skew_s=FAR_SKEW_S))


DELIVERIES: list[dict[str, Any]] = [
    {"id": "new-1", "status": "queued", "updated_at": T1, "parameters": {"a": [1, 2]}},
    {"id": "same", "status": "a", "updated_at": T1, "created_at": T0, "parameters": {"n": 12.5}},  # 12.50 = 12.5
    {"id": "older", "status": "old", "updated_at": T0},  # skipped_stale + push-back
    {"id": "newer", "status": "new", "updated_at": T2},
    {"id": "edited", "status": "y", "updated_at": T1, "created_at": T0, "edited_at": T2},  # a cell edit in Tables
    {"record": {"id": "wrapped", "status": "w"}, "edited_at": T1},  # changed_at from the delivery's edited_at
    {"id": "gone", "status": "zombie", "updated_at": T0},  # deleted in Supabase: deleted + re-sent delete
    {"id": "dup", "status": "second", "updated_at": T2},  # the newest of two in the batch
    {"id": "bad", "retry_count": "many"},  # invalid
    {"id": "dup", "status": "first", "updated_at": T1},  # older duplicate: compared after the newest
    {"id": "new-2", "status": ""},  # no updated_at: as new as its arrival
]


def _state(url: str) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT id, to_jsonb(t) - 'created_at' FROM agent_jobs t ORDER BY id").fetchall()
        audit = conn.execute(
            "SELECT id, action, resource_id, metadata->>'outcome', metadata->>'origin', metadata->>'changed_at', "
            "metadata->>'changed_at_source', metadata->>'source_timestamp', metadata->>'stored_updated_at', "
            "metadata->'problems' FROM audit_log ORDER BY id").fetchall()
        outbox = conn.execute("SELECT record_id, op, record_updated_at, repair FROM zsync.outbox "
                              "ORDER BY record_id, id").fetchall()
        tombs = conn.execute("SELECT record_id, version FROM zsync.tombstones ORDER BY 1").fetchall()
    return {"rows": rows, "audit": audit, "outbox": outbox, "tombstones": tombs}


@pytest.mark.parametrize("chunk", [None, 3])  # one batch (the multi-row statement), or small ones (sync_apply per row)
def test_batch_equals_one_by_one(pg_server: Any, chunk: int | None) -> None:
    single_url, batch_url = _fresh(pg_server), _fresh(pg_server)
    single = _ctx(single_url)
    expected = []
    for payload in DELIVERIES:
        changed, source = change_time(payload, RECEIVED)
        try:
            result = apply_from_tables(single, FN, unwrap_tables_payload(payload), RECEIVED, changed_at=changed,
                                       changed_at_source=source, origin="replay")
            expected.append((result.outcome, result.id))
        except Exception as exc:  # InvalidRecord: the handler rejects it and writes sync_failed
            from shared.adapters import supabase_db
            from shared.adapters.dead_letter import canonical_json
            from shared.core import audit

            entry = audit.failed_entry(FN, canonical_json(payload).encode(), exc.problems, RECEIVED, payload["id"])
            single.db.run(lambda conn, entry=entry: supabase_db.append_audit(conn, entry))
            expected.append((Outcome.REJECTED, payload["id"]))
    size = chunk or len(DELIVERIES)
    batch = _ctx(batch_url)
    results = [r for i in range(0, len(DELIVERIES), size)
               for r in apply_many_from_tables(batch, FN, DELIVERIES[i:i + size], received_at=RECEIVED,
                                               origin="replay")]
    assert [(r.outcome, r.id) for r in results] == expected
    assert [o for o, _ in expected] == [
        Outcome.APPLIED, Outcome.UNCHANGED, Outcome.SKIPPED_STALE, Outcome.APPLIED, Outcome.APPLIED,
        Outcome.APPLIED, Outcome.DELETED, Outcome.APPLIED, Outcome.REJECTED, Outcome.SKIPPED_STALE, Outcome.APPLIED]
    assert results[8].detail and "retry_count" in results[8].detail
    a, b = _state(single_url), _state(batch_url)
    assert a["rows"] == b["rows"]
    assert a["tombstones"] == b["tombstones"]
    assert a["outbox"] == b["outbox"]
    assert [r[:-1] for r in a["audit"]] == [r[:-1] for r in b["audit"]]  # same entries, same stable ids
    assert {r[1] for r in b["audit"]} == {"agent_jobs_synced", "sync_skipped_stale_data", "sync_failed"}
    pushed = {(r[0], r[1]) for r in b["outbox"]}
    assert {("older", "UPDATE"), ("dup", "UPDATE"), ("gone", "DELETE")} <= pushed
    edited = dict(b["rows"])["edited"]
    assert edited["status"] == "y" and edited["updated_at"].startswith("2030-01-01T02:00:00")


def test_append_only_batch(pg_server: Any) -> None:
    url = _fresh(pg_server)
    entry = {"id": "tbl-1", "timestamp": T0, "action": "login", "severity": "info"}
    results = apply_many_from_tables(_ctx(url), AUDIT_FN, [entry, entry, {"id": "tbl-2", "timestamp": "soon"}])
    assert [r.outcome for r in results] == [Outcome.APPLIED, Outcome.UNCHANGED, Outcome.REJECTED]


def test_version_exprs_match_version_of(db: psycopg.Connection) -> None:
    """The generated expressions are zsync.version_of, on random rows with every kind of value."""
    rnd = random.Random(7)
    values: dict[str, list[Any]] = {
        "status": [None, "", "x", "[]", " "],
        "parameters": [None, {}, [], "", {"n": 1.50}, {"n": 1.5, "a": [1e2, {"z": None}]}, [12.0], 0, "s"],
        "retry_count": [None, 0, 3],
        "started_at": [None, "2030-01-01T00:00:00.123456Z", "2030-01-01T00:00:00.123Z", "infinity"],
        "updated_at": [None, "2030-01-01T00:00:00.1239Z", "2030-01-01T00:00:00.123Z"],
    }
    rows = [{"id": f"r{i}", **{k: rnd.choice(v) for k, v in values.items() if rnd.random() < 0.8}} for i in range(300)]
    pairs = [(rows[i], rows[rnd.randrange(len(rows))]) for i in range(len(rows))] + [(r, dict(r)) for r in rows[:50]]
    from shared.adapters import supabase_db
    from shared.core.spec import TABLES

    many = supabase_db.version_cmp_many(db, TABLES["agent_jobs"], pairs)
    one = [supabase_db.version_cmp(db, TABLES["agent_jobs"], a, b) for a, b in pairs]
    assert many == one
    for row in rows[:100]:
        got = db.execute("SELECT v.ts::text, v.hash FROM zsync.version_of('public.agent_jobs', %s::jsonb) v, "
                         "LATERAL (SELECT 1) z", (psycopg.types.json.Jsonb(row),)).fetchone()
        exprs = db.execute("SELECT ts_expr, hash_expr FROM zsync.version_exprs('public.agent_jobs', 'x')").fetchone()
        mine = db.execute(f"SELECT ({exprs[0]})::text, {exprs[1]} FROM jsonb_populate_record(NULL::public.agent_jobs, "
                          "%s::jsonb) x", (psycopg.types.json.Jsonb(row),)).fetchone()
        assert tuple(got) == tuple(mine), row


def test_concurrent_batches_and_single_applies(pg_server: Any) -> None:
    """Batches of the same new ids in opposite orders, and single applies, at once, round after round: no
    deadlock at all (none retried away: the contexts have no retry budget), the newest version wins.

    Before migration 20261205500000 a batch whose insert lost the race to a concurrent batch applied those
    rows one by one in its own delivery order, holding the rows it had inserted or locked: two such batches
    deadlocked in most rounds (and a 2 s retry budget hid it, except 1 run in 10-20)."""
    url = _fresh(pg_server)
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as admin:  # a deadlock fails fast
        admin.execute(f'ALTER DATABASE "{psycopg.conninfo.conninfo_to_dict(url)["dbname"]}" '
                      "SET deadlock_timeout = '50ms'")
    workers, rounds, per_round = 4, 8, 40
    errors: list[BaseException] = []
    start = threading.Barrier(workers)

    def worker(w: int) -> None:
        ctx = SyncContext(settings=Settings(database_url=url, retry_budget_s=0, max_future_skew_s=FAR_SKEW_S))
        rnd = random.Random(w)
        try:
            for r in range(rounds):
                ids = [f"c-{r}-{i:03d}" for i in range(per_round)]
                # Opposite orders, and a little shuffle, so no two workers meet the ids in the same order.
                mine = ids[::-1] if w % 2 else ids[:]
                for k in range(0, per_round - 1, 7):
                    if rnd.random() < 0.5:
                        mine[k], mine[k + 1] = mine[k + 1], mine[k]
                stamp = f"2030-01-01T00:{r:02d}:{w:02d}Z"
                start.wait(10)
                apply_many_from_tables(ctx, FN, [{"id": i, "status": f"b{w}", "updated_at": stamp} for i in mine])
                for i in mine[:3]:
                    apply_from_tables(ctx, FN, {"id": i, "status": f"one{w}", "updated_at": stamp})
                later = f"2030-01-01T00:{r:02d}:{w + 30:02d}Z"
                apply_many_from_tables(ctx, FN, [{"id": i, "status": f"u{w}", "updated_at": later} for i in mine])
        except BaseException as exc:  # reported below
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    causes = [f"{type(e).__name__}: {e} <- {e.__cause__!r}" for e in errors
              if not isinstance(e, threading.BrokenBarrierError)]
    assert not causes, causes
    assert deadlocks(url) == 0
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT id, status, updated_at FROM agent_jobs WHERE id LIKE 'c-%' ORDER BY id").fetchall()
    assert len(rows) == rounds * per_round
    newest = datetime(2030, 1, 1, 0, 0, 30 + workers - 1, tzinfo=UTC)
    assert {(status, ts.replace(minute=0)) for _, status, ts in rows} == {(f"u{workers - 1}", newest)}


def test_a_small_batch_takes_its_rows_in_id_order(pg_server: Any) -> None:
    """A batch of a few rows (zsync.sync_apply per row) locks or inserts each row in id order. It locked the
    existing rows first: holding sb-b, it waited for sb-a, being inserted by a transaction that then wanted
    sb-b - a deadlock. Now it waits for sb-a holding nothing, and that transaction simply goes on."""
    url = _fresh(pg_server)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO agent_jobs (id, status, updated_at) VALUES ('sb-b', 'old', %s)", (T0,))
    results: list[Any] = []
    batch = [{"id": "sb-b", "status": "new", "updated_at": T1}, {"id": "sb-a", "status": "batch", "updated_at": T1}]
    with psycopg.connect(url) as holder:
        holder.execute("SET lock_timeout = '5s'")
        holder.execute("INSERT INTO agent_jobs (id, status, updated_at) VALUES ('sb-a', 'holder', %s)", (T2,))
        worker = threading.Thread(target=lambda: results.append(apply_many_from_tables(_ctx(url), FN, batch)))
        worker.start()
        _wait_for_a_lock_wait(url, "sb-a")
        holder.execute("SELECT 1 FROM agent_jobs WHERE id = 'sb-b' FOR UPDATE")  # deadlocked here before
        holder.commit()
    worker.join(30)
    assert [r.outcome for r in results[0]] == [Outcome.APPLIED, Outcome.SKIPPED_STALE]
    assert deadlocks(url) == 0


def _wait_for_a_lock_wait(url: str, what: str) -> None:
    with psycopg.connect(url, autocommit=True) as probe:
        for _ in range(200):
            if probe.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                             "AND wait_event_type = 'Lock'").fetchone()[0]:
                return
            time.sleep(0.05)
    raise AssertionError(f"never waited for {what}")


def test_audit_entries_are_appended_in_id_order(pg_server: Any) -> None:
    """zsync.append_audit_each (the audit_log table's own sync) inserts in id order: a batch [au-b, au-a] waits
    for au-a, being inserted by another transaction, holding nothing; that transaction's insert of au-b goes
    on. (In delivery order it held au-b: a deadlock.)"""
    url = _fresh(pg_server)
    results: list[Any] = []
    batch = [{"id": rid, "timestamp": T0, "action": "login"} for rid in ("au-b", "au-a")]
    with psycopg.connect(url) as holder:
        holder.execute("SET lock_timeout = '5s'")
        holder.execute("INSERT INTO audit_log (id, timestamp, action) VALUES ('au-a', %s, 'login')", (T0,))
        worker = threading.Thread(target=lambda: results.append(apply_many_from_tables(_ctx(url), AUDIT_FN, batch)))
        worker.start()
        _wait_for_a_lock_wait(url, "au-a")
        holder.execute("INSERT INTO audit_log (id, timestamp, action) VALUES ('au-b', %s, 'login')", (T0,))
        holder.commit()
    worker.join(30)
    assert [r.outcome for r in results[0]] == [Outcome.UNCHANGED, Outcome.UNCHANGED]
    assert deadlocks(url) == 0


def test_the_syncs_audit_entries_are_appended_in_id_order(pg_server: Any) -> None:
    """zsync.append_audit_many (the sync's own entries, a batch at a time) likewise: one insert in id order."""
    url = _fresh(pg_server)
    inserted: list[int] = []
    entries = [{"id": rid, "action": "sync_failed", "metadata": {"n": 1}} for rid in ("am-b", "am-a")]

    def append() -> None:
        with psycopg.connect(url) as conn:
            inserted.append(supabase_db.append_audit_many(conn, entries))

    with psycopg.connect(url) as holder:
        holder.execute("SET lock_timeout = '5s'")
        holder.execute("INSERT INTO audit_log (id, action) VALUES ('am-a', 'sync_failed')")
        worker = threading.Thread(target=append)
        worker.start()
        _wait_for_a_lock_wait(url, "am-a")
        holder.execute("INSERT INTO audit_log (id, action) VALUES ('am-b', 'sync_failed')")
        holder.commit()
    worker.join(30)
    assert inserted == [0]
    assert deadlocks(url) == 0


def test_wrapped_delivery_edited_at_versions_like_the_flat_form(pg_server: Any) -> None:
    """``{"record": {...}, "edited_at": ...}`` is the flat delivery with that ``edited_at``: a cell edit that
    did not move updated_at is versioned at edited_at on the single path (the function's) and in a batch."""
    from shared.services.deliveries import process

    flat = {"id": "edited", "status": "flat", "updated_at": T1, "created_at": T0, "edited_at": T2}
    wrapped = {"record": {"id": "edited", "status": "wrapped", "updated_at": T1, "created_at": T0}, "edited_at": T2}
    for payload in (flat, wrapped):
        url = _fresh(pg_server)
        assert process(FN, _ctx(url), payload, RECEIVED).outcome is Outcome.APPLIED
        edited = dict(_state(url)["rows"])["edited"]
        assert edited["updated_at"].startswith("2030-01-01T02:00:00"), edited
        url = _fresh(pg_server)
        assert [r.outcome for r in apply_many_from_tables(_ctx(url), FN, [payload], received_at=RECEIVED)] == [
            Outcome.APPLIED]
        edited = dict(_state(url)["rows"])["edited"]
        assert edited["updated_at"].startswith("2030-01-01T02:00:00"), edited
    assert unwrap_tables_payload({"record": {"id": "a", "edited_at": T1}, "edited_at": T2})["edited_at"] == T1
    assert unwrap_tables_payload({"record": [1], "edited_at": T2}) == [1]
