"""Supabase -> Tables in batches (shared/services/outbox_batch.py) against a real Postgres and the real local Tables
service with its rate limit on: parallel drains never take the same outbox rows, several changes of one
record go out as its newest version, a 429 mid-batch is absorbed within the shared budget or leaves the
unsent rows pending (not lost, not doubled), and every record gets the outcome and audit entry the
one-record path gives it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from infra.local.postgres import create_database, prepare_database
from shared.adapters import supabase_db
from shared.core.outcome import Outcome
from shared.core.spec import FUNCTIONS, TABLES
from shared.services.outbox_batch import drain_outbox
from shared.services.sync import SupabaseWebhook, SyncContext
from shared.services.to_tables import apply_from_supabase
from tests.e2e import deadlocks
from tests.tables_local import LocalTables, start_local_tables

FN = FUNCTIONS["agent_jobs_to_tables"]
JOBS = TABLES["agent_jobs"]
TS = "2030-01-01T00:00:00Z"
# These fixed versions lie ahead of the clock (newer than any Zapier edited_at): the future-skew rule
# (ZSYNC_MAX_FUTURE_SKEW_S, zsync.config) is raised past them here; tests/test_bad_input.py holds the default.
FAR_SKEW_S = 20 * 365 * 86400.0


def _far(url: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT zsync.set_max_future_skew(%s)", (FAR_SKEW_S,))
    return url


@pytest.fixture
def fresh_db(pg_server: Any) -> str:
    url = create_database(pg_server.get_uri())
    prepare_database(url)
    return _far(url)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[LocalTables]:
    with start_local_tables(tmp_path / "t.sqlite3", names=["agent_jobs"]) as local:
        yield local


def _ctx(service: LocalTables, url: str, **kw: Any) -> SyncContext:
    kw.setdefault("retry_budget_s", 3)
    kw.setdefault("http_timeout_s", 2)
    kw.setdefault("max_future_skew_s", FAR_SKEW_S)
    return SyncContext(settings=service.settings(database_url=url, webhook_secret="x", **kw))


def _insert(url: str, ids: list[str], status: str = "queued") -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO agent_jobs (id, status, parameters) SELECT x, %s, jsonb_build_object('k', x) "
                     "FROM unnest(%s::text[]) x", (status, ids))


def _stats(service: LocalTables) -> int:
    return requests.get(service.url + "/_admin/stats", timeout=5).json()["api_requests"]


def _reset(service: LocalTables) -> None:
    requests.post(service.url + "/_admin/stats/reset", timeout=5)


def _tables_ids(service: LocalTables) -> list[str]:
    with service.client(retry_budget_s=15, timeout_s=2) as c:  # waits out the rate limit
        return [r.data["id"] for r in c.iter_records(service.ids["agent_jobs"], page_size=1000)]


def _pending(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT record_id FROM zsync.outbox WHERE acked_at IS NULL ORDER BY id")]


def _audit(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT resource_id, action, metadata->>'outcome', metadata->>'origin', metadata->>'changed_at_source', "
            "metadata->>'source_timestamp', (metadata->>'lag_seconds') IS NOT NULL FROM audit_log "
            "WHERE actor = 'zsync/agent_jobs_to_tables' ORDER BY resource_id, action").fetchall()


def test_a_burst_goes_out_in_batches_of_100(fresh_db, service):
    ids = [f"b-{i:04d}" for i in range(250)]
    _insert(fresh_db, ids)
    ctx = _ctx(service, fresh_db)
    ctx.tables.field_map(service.ids["agent_jobs"])  # listed once per process, not per batch
    _reset(service)
    result = drain_outbox(ctx, FN)
    assert result.count(Outcome.APPLIED) == 250 and not result.pending_left
    assert _stats(service) == 1 + 3  # one `in` query for the 250 ids, three batch creates
    assert sorted(_tables_ids(service)) == ids
    assert _pending(fresh_db) == []
    entries = _audit(fresh_db)
    assert len(entries) == 250
    assert {e[1:5] for e in entries} == {("agent_jobs_synced", "applied", "live", "outbox")}
    assert all(e[6] for e in entries)  # lag from the outbox capture time


def test_a_single_change_costs_what_the_single_path_costs(fresh_db, service):
    ctx = _ctx(service, fresh_db)
    ctx.tables.field_map(service.ids["agent_jobs"])
    _insert(fresh_db, ["one"])
    _reset(service)
    assert drain_outbox(ctx, FN).results["one"].outcome is Outcome.APPLIED
    assert _stats(service) == 2  # find + create


def test_several_changes_of_one_record_go_out_once_as_the_newest(fresh_db, service):
    _insert(fresh_db, ["c-1"], "queued")
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        for status in ("running", "retrying", "done"):
            conn.execute("UPDATE agent_jobs SET status = %s WHERE id = 'c-1'", (status,))
    ctx = _ctx(service, fresh_db)
    ctx.tables.field_map(service.ids["agent_jobs"])
    _reset(service)
    result = drain_outbox(ctx, FN)
    assert list(result.results) == ["c-1"] and result.results["c-1"].outcome is Outcome.APPLIED
    assert _stats(service) == 2  # one find, one create: not four writes
    with service.client() as c:
        [rec] = list(c.iter_records(service.ids["agent_jobs"]))
    assert rec.data["status"] == "done"
    assert len(_audit(fresh_db)) == 1 and _pending(fresh_db) == []


def test_parallel_claims_never_take_the_same_rows(fresh_db):
    _insert(fresh_db, [f"p-{i}" for i in range(10)])
    with psycopg.connect(fresh_db) as a, psycopg.connect(fresh_db) as b:
        first = {r[0] for r in supabase_db.claim_outbox(a, JOBS, 6)}
        second = {r[0] for r in supabase_db.claim_outbox(b, JOBS, 100)}
        assert len(first) == 6 and len(second) == 4 and not first & second
        a.rollback()
        assert len(supabase_db.claim_outbox(a, JOBS, 100)) == 6  # b still holds its 4


def test_parallel_drains_write_every_record_exactly_once(fresh_db, service):
    ids = [f"q-{i:04d}" for i in range(300)]
    _insert(fresh_db, ids)
    ctxs = [_ctx(service, fresh_db, outbox_claim_limit=60) for _ in range(4)]
    results: list[Any] = []
    threads = [threading.Thread(target=lambda c=c: results.append(drain_outbox(c, FN))) for c in ctxs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    delivered = [rid for r in results for rid, res in r.results.items() if res.outcome is Outcome.APPLIED]
    assert sorted(delivered) == ids  # each record delivered by exactly one drain
    assert sorted(_tables_ids(service)) == ids  # no duplicates in Tables
    assert len(_audit(fresh_db)) == 300 and _pending(fresh_db) == []


def _tables_writes(service: LocalTables) -> int:
    """Records the service has written (created or updated) in agent_jobs since the last reset."""
    return requests.get(service.url + "/_admin/stats", timeout=5).json()["writes"].get(service.ids["agent_jobs"], 0)


def test_parallel_drains_compete_for_records_with_several_changes(fresh_db, service):
    """Several changes per record, spread over the outbox, half the records already in Tables: four drains
    with small claims take entries of the same records at once. The per-record lock of zsync.claim_outbox_rows
    must give each record to one drain: one write of its newest version, one audit entry, no duplicate.
    (Without that lock - pg_try_advisory_xact_lock replaced by true - two drains created the same new
    record twice and updated existing ones twice.)"""
    ids = [f"r-{i:03d}" for i in range(24)]
    _insert(fresh_db, ids[:12])
    assert drain_outbox(_ctx(service, fresh_db), FN).count(Outcome.APPLIED) == 12  # these are in Tables now
    _insert(fresh_db, ids[12:])
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        for step in ("s1", "s2", "s3"):  # one entry per record per step: each record's entries apart
            conn.execute("UPDATE agent_jobs SET status = %s, updated_at = updated_at + interval '1 second' "
                         "WHERE id = ANY(%s)", (step, ids))
    _reset(service)
    # 84 pending entries, four claims of 21 at once: every record's entries are in two to four of them.
    ctxs = [_ctx(service, fresh_db, outbox_claim_limit=21) for _ in range(4)]
    start = threading.Barrier(len(ctxs))
    results: list[Any] = []

    def drain(ctx: SyncContext) -> None:
        start.wait(10)
        results.append(drain_outbox(ctx, FN))

    threads = [threading.Thread(target=drain, args=(c,)) for c in ctxs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    while _pending(fresh_db):  # a record every drain found held by another: the next wake-up takes it
        results.append(drain_outbox(_ctx(service, fresh_db), FN))
    applied = sorted(rid for r in results for rid, res in r.results.items() if res.outcome is Outcome.APPLIED)
    assert applied == ids  # each record written by exactly one drain
    assert _tables_writes(service) == len(ids)  # once each: its newest version
    assert sorted(_tables_ids(service)) == ids  # no duplicate created
    with service.client() as c:
        assert {r.data["status"] for r in c.iter_records(service.ids["agent_jobs"], page_size=1000)} == {"s3"}
    assert len(_audit(fresh_db)) == len(ids) + 12  # the first drain's 12, then one per record


def test_a_drain_pushing_newer_tables_versions_back_locks_rows_in_id_order(fresh_db, service):
    """Tables holds newer versions of two records: the drain pushes them into Supabase. It must lock those rows
    in id order, as a Tables -> Supabase batch does: a transaction holding the lower id and then taking the
    higher one must simply wait for the drain, not deadlock with it. (The drain pushed in claim order: it held
    pb-b, the first claimed, and waited for pb-a, held by the transaction that then waited for pb-b.)"""
    ids = ["pb-a", "pb-b"]
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        for rid in ids:
            conn.execute("INSERT INTO agent_jobs (id, status, created_at, updated_at) "
                         "VALUES (%s, 'v1', %s, '2030-01-01T00:00:00Z')", (rid, TS))
        conn.execute("DELETE FROM zsync.outbox")
        for rid in reversed(ids):  # claimed pb-b first
            conn.execute("UPDATE agent_jobs SET status = 'v2', updated_at = '2030-01-02T00:00:00Z' WHERE id = %s",
                         (rid,))
    with service.client() as c:
        c.create_many(service.ids["agent_jobs"], [
            {"id": rid, "status": "v9", "created_at": TS, "updated_at": "2030-01-03T00:00:00Z"} for rid in ids])
    ctx = _ctx(service, fresh_db)
    results: list[Any] = []
    with psycopg.connect(fresh_db) as holder:
        holder.execute("SET lock_timeout = '5s'")
        holder.execute("SELECT 1 FROM agent_jobs WHERE id = 'pb-a' FOR UPDATE")
        drain = threading.Thread(target=lambda: results.append(drain_outbox(ctx, FN)))
        drain.start()
        waiting = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                   "AND wait_event_type = 'Lock'")
        with psycopg.connect(fresh_db, autocommit=True) as probe:
            for _ in range(200):
                if probe.execute(waiting).fetchone()[0]:
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("the drain never waited for pb-a")
        holder.execute("SELECT 1 FROM agent_jobs WHERE id = 'pb-b' FOR UPDATE")  # deadlocked here before
        holder.commit()
    drain.join(30)
    assert [r.outcome for r in results[0].results.values()] == [Outcome.SKIPPED_STALE] * 2
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT array_agg(status ORDER BY id) FROM agent_jobs").fetchone()[0] == ["v9", "v9"]
    assert deadlocks(fresh_db) == 0


def test_a_429_mid_batch_leaves_the_unsent_rows_pending_then_they_go_once(fresh_db, tmp_path):
    with start_local_tables(tmp_path / "r.sqlite3", names=["agent_jobs"], rate_limit=4, rate_window_s=3.0) as svc:
        ids = [f"r-{i:04d}" for i in range(250)]
        _insert(fresh_db, ids)
        ctx = _ctx(svc, fresh_db, retry_budget_s=1, http_timeout_s=1)
        time.sleep(3.1)  # the window of the setup's requests is over
        ctx.tables.field_map(svc.ids["agent_jobs"])
        first = drain_outbox(ctx, FN)  # find + 2 creates fit; the third create gets 429 Retry-After 3 > budget
        assert first.pending_left and first.count(Outcome.APPLIED) == 200
        assert len(_pending(fresh_db)) == 50
        assert len(_tables_ids(svc)) == 200
        time.sleep(3.1)
        second = drain_outbox(ctx, FN)
        assert second.count(Outcome.APPLIED) == 50 and not second.pending_left
        assert sorted(_tables_ids(svc)) == ids  # nothing lost, nothing written twice
        assert len(_audit(fresh_db)) == 250 and _pending(fresh_db) == []


def test_a_429_within_the_shared_budget_is_absorbed(fresh_db, tmp_path):
    with start_local_tables(tmp_path / "r.sqlite3", names=["agent_jobs"], rate_limit=4, rate_window_s=2.0) as svc:
        ids = [f"s-{i:04d}" for i in range(250)]
        _insert(fresh_db, ids)
        ctx = _ctx(svc, fresh_db, retry_budget_s=10, http_timeout_s=1)
        time.sleep(2.1)
        ctx.tables.field_map(svc.ids["agent_jobs"])
        result = drain_outbox(ctx, FN)
        assert result.count(Outcome.APPLIED) == 250 and not result.pending_left
        assert sorted(_tables_ids(svc)) == ids and _pending(fresh_db) == []


# --- same outcome and audit entry per record as the one-record path -----------------------------------------


def _scenario(url: str, service: LocalTables) -> list[str]:
    """Records in every state the comparison can meet; -> their ids."""
    tid = service.ids["agent_jobs"]
    with psycopg.connect(url, autocommit=True) as conn:
        rows = [("new", "queued", "2030-01-01T00:00:00Z"), ("older-in-tables", "v2", "2030-01-02T00:00:00Z"),
                ("newer-in-tables", "v1", "2030-01-01T00:00:00Z"), ("same", "v1", "2030-01-01T00:00:00Z"),
                ("unreadable-newer", "v3", "2030-01-01T00:00:00Z"),
                ("unreadable-older", "v3", "2030-01-05T00:00:00Z")]
        for rid, status, ts in rows:
            conn.execute("INSERT INTO agent_jobs (id, status, created_at, updated_at) VALUES (%s, %s, %s, %s)",
                         (rid, status, TS, ts))
        conn.execute("SELECT set_config('zsync.origin', 'sync', false)")
    with service.client() as c:
        c.create_many(tid, [
            {"id": "older-in-tables", "status": "v1", "created_at": TS, "updated_at": "2030-01-01T00:00:00Z"},
            {"id": "newer-in-tables", "status": "v9", "created_at": TS, "updated_at": "2030-01-03T00:00:00Z"},
            {"id": "same", "status": "v1", "created_at": TS, "updated_at": "2030-01-01T00:00:00Z"},
            {"id": "unreadable-newer", "status": "x", "created_at": TS, "parameters": "{broken",
             "updated_at": "2030-01-04T00:00:00Z"},
            {"id": "unreadable-older", "status": "x", "created_at": TS, "parameters": "{broken",
             "updated_at": "2030-01-02T00:00:00Z"},
        ])
    return [r[0] for r in rows]


def _tables_state(service: LocalTables) -> dict[str, dict]:
    with service.client() as c:
        return {r.data["id"]: {k: v for k, v in r.data.items() if k not in ("edited_at",)}
                for r in c.iter_records(service.ids["agent_jobs"])}


def test_the_batch_gives_each_record_the_single_paths_outcome_and_audit(pg_server, tmp_path):
    outcomes: dict[str, dict[str, str]] = {}
    audits: dict[str, list[tuple]] = {}
    tables: dict[str, dict] = {}
    for mode in ("single", "batch"):
        url = create_database(pg_server.get_uri())
        prepare_database(url)
        _far(url)
        with start_local_tables(tmp_path / f"{mode}.sqlite3", names=["agent_jobs"]) as svc:
            ids = _scenario(url, svc)
            ctx = _ctx(svc, url)
            if mode == "batch":
                got = drain_outbox(ctx, FN).results
                outcomes[mode] = {rid: got[rid].outcome.value for rid in ids}
            else:
                outcomes[mode] = {}
                for rid in ids:
                    with psycopg.connect(url) as conn:
                        raw = supabase_db.fetch_row(conn, JOBS, rid)
                    hook = SupabaseWebhook.model_validate({"type": "UPDATE", "table": "agent_jobs", "schema": "public",
                                                           "record": raw})
                    outcomes[mode][rid] = apply_from_supabase(ctx, FN, hook).outcome.value
            audits[mode] = _audit(url)
            tables[mode] = _tables_state(svc)
            if mode == "batch":  # the batch also takes the change its skipped_stale pushed back (unchanged)
                assert _pending(url) == []
    assert outcomes["batch"] == outcomes["single"]
    assert outcomes["batch"] == {"new": "applied", "older-in-tables": "applied", "newer-in-tables": "skipped_stale",
                                 "same": "unchanged", "unreadable-newer": "parked", "unreadable-older": "applied"}
    assert audits["batch"] == audits["single"]
    assert tables["batch"] == tables["single"]


def test_version_cmp_many_agrees_with_version_cmp(db):
    pairs = [({"id": "a", "updated_at": "2030-01-01T00:00:00Z", "status": "x"},
              {"id": "a", "updated_at": "2030-01-01T00:00:00.0004Z", "status": "x"}),
             ({"id": "a", "updated_at": "2030-01-02T00:00:00Z"}, {"id": "a", "updated_at": "2030-01-01T00:00:00Z"}),
             ({"id": "a", "updated_at": "2030-01-01T00:00:00Z", "status": "a"},
              {"id": "a", "updated_at": "2030-01-01T00:00:00Z", "status": "b"}),
             ({"id": "a"}, {"id": "a", "updated_at": "2030-01-01T00:00:00Z"}),
             ({"id": "a", "parameters": {"x": [1, 2]}, "status": ""}, {"id": "a", "parameters": {"x": [1, 2]}})]
    pairs += [(b, a) for a, b in pairs]
    assert supabase_db.version_cmp_many(db, JOBS, pairs) == [supabase_db.version_cmp(db, JOBS, a, b) for a, b in pairs]
