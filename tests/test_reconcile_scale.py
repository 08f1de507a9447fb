"""What makes ``zsync reconcile`` fast at 100,000 records (issue 12) gives the same results as the slower
per-element paths it replaced: set-based audit inserts and outbox acks (real Postgres), the plain-Python
parse of bulk reads, the identical-row shortcut, the read-ahead of Tables pages, and a reconcile across
several pages with drift on both sides (real Postgres, real local Tables service)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from infra import reconcile_repair
from infra.local.postgres import create_database, prepare_database
from infra.reconcile import reconcile
from infra.reconcile_compare import _identical
from infra.reconcile_read import PAGE_SIZE, _prefetched
from shared.adapters import supabase_db
from shared.core.mapping import InvalidRecord, parse_record, parse_record_fast, row_to_json
from shared.core.spec import TABLES, Kind
from shared.services.sync import SyncContext
from tests.tables_local import LocalTables, start_local_tables
from tests.test_reconcile import sql, supabase_rows, tables_rows

# --- zsync.append_audit_many (set-based) == zsync.append_audit per entry ------------------------------------


def _entries(prefix: str) -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}-1", "timestamp": "2025-12-22T10:00:00+00:00", "action": "a", "metadata": {"n": 1},
         "severity": "debug", "compliance_tags": ["gdpr"]},
        {"id": f"{prefix}-2", "action": "b", "severity": None, "retention_days": None},  # defaults apply
        {"id": f"{prefix}-1", "timestamp": "2025-12-22T11:00:00+00:00", "action": "again"},  # same id: no-op
        {"id": f"{prefix}-3", "timestamp": "2025-12-22T10:00:00+00:00", "action": "c", "resource_id": "r",
         "not_a_column": 1},
        {"id": f"{prefix}-0", "action": "stored before"},  # already in the table: no-op
    ]


def _audit(conn: psycopg.Connection, prefix: str) -> list[tuple]:
    return conn.execute(
        "SELECT substr(id, length(%s) + 1), timestamp IS NOT NULL, "
        "CASE WHEN action NOT IN ('b', 'x') THEN timestamp END, action, resource_id, metadata, severity, "
        "compliance_tags, retention_days FROM audit_log "
        "WHERE id LIKE %s ORDER BY id", (prefix, prefix + "-%")).fetchall()


def test_append_audit_many_inserts_what_append_audit_inserts(db: psycopg.Connection) -> None:
    one, many = "one", "many"
    for prefix in (one, many):
        db.execute("SELECT zsync.append_audit(%s::jsonb)", (json.dumps({"id": f"{prefix}-0", "action": "x"}),))
    inserted_one = sum(db.execute("SELECT zsync.append_audit(%s::jsonb)", (json.dumps(e),)).fetchone()[0]
                       for e in _entries(one))
    inserted_many = db.execute("SELECT zsync.append_audit_many(%s::jsonb)", (json.dumps(_entries(many)),)).fetchone()[0]
    assert inserted_one == inserted_many == 3
    assert _audit(db, one) == _audit(db, many)
    assert [r[6] for r in _audit(db, many)] == ["info", "debug", "info", "info"]  # severity default for "-2"
    assert db.execute("SELECT zsync.append_audit_many('[]'::jsonb)").fetchone()[0] == 0


@pytest.mark.parametrize("entries", [[{}], [{"id": "e-1", "action": "ok"}, {"action": None}], [3], {"id": "x"}])
def test_append_audit_many_refuses_an_empty_entry_and_writes_nothing(db: psycopg.Connection, entries: Any) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        db.execute("SELECT zsync.append_audit_many(%s::jsonb)", (json.dumps(entries),))
    assert db.execute("SELECT count(*) FROM audit_log WHERE id = 'e-1'").fetchone()[0] == 0


# --- zsync.ack_outbox_set == zsync.ack_outbox per record ----------------------------------------------------


def _outbox(conn: psycopg.Connection, prefix: str) -> list[tuple]:
    return conn.execute("SELECT substr(record_id, length(%s) + 1), record_updated_at, acked_at IS NOT NULL, "
                        "ack_outcome FROM zsync.outbox WHERE record_id LIKE %s ORDER BY record_id, id",
                        (prefix, prefix + "-%")).fetchall()


def test_ack_outbox_set_acknowledges_what_ack_outbox_does(db: psycopg.Connection) -> None:
    t1, t2, t3 = (datetime(2025, 12, 22, h, tzinfo=UTC) for h in (10, 11, 12))
    acks = [("a", t2), ("b", None), ("c", t3), ("a", t1)]  # "a" twice: up to the newer version
    for prefix in ("one", "set"):
        for rid, version in [("a", t1), ("a", t2), ("a", t3), ("b", None), ("b", t1), ("c", t1), ("d", t1)]:
            db.execute("INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at) "
                       "VALUES ('agent_jobs', %s, 'UPDATE', %s)", (f"{prefix}-{rid}", version))
    one = sum(db.execute("SELECT zsync.ack_outbox('agent_jobs', %s, %s, 'applied')", (f"one-{rid}", v)).fetchone()[0]
              for rid, v in acks)
    with db.transaction():
        done = supabase_db.ack_outbox_set(db, TABLES["agent_jobs"], [(f"set-{rid}", v, "applied") for rid, v in acks])
    assert one == done == 4  # a up to t2 (2), b without a version (1), c (1); d untouched
    assert _outbox(db, "one") == _outbox(db, "set")
    assert supabase_db.ack_outbox_set(db, TABLES["agent_jobs"], []) == 0


# --- the plain parse of bulk reads == the pydantic model --------------------------------------------------


TS = "2025-12-22T10:00:00Z"
RECORDS: list[Any] = [
    {"id": "j-1", "status": "queued", "parameters": {"k": 1}, "created_at": TS, "updated_at": TS},
    {"id": "j-2", "parameters": '{"k": [1, 2.5, true, null]}', "results": "", "retry_count": "3",
     "updated_at": "2025-12-22 10:00:00.123456+01:00", "job_type": 7},
    {"id": "j-3", "retry_count": None, "started_at": None, "extra": "ignored"},
    {"id": "d-1", "decision": "qualified", "confidence": "0.5", "metadata": None, "updated_at": TS},
    {"id": "a-1", "action": "x", "compliance_tags": "gdpr, soc2", "retention_days": 30, "timestamp": TS},
    {"id": "a-2", "action": "x", "compliance_tags": ["gdpr"], "timestamp": None},
    {"id": "r-1", "service_name": "openai", "request_count": 2.0, "window_start": TS},
    # not accepted: the same problems either way
    {"status": "no id"},
    {"id": ""},
    {"id": "bad\x01id"},
    {"id": "j-4", "updated_at": "yesterday"},
    {"id": "j-5", "parameters": "{not json"},
    {"id": "j-6", "retry_count": 1.5, "confidence": "high", "compliance_tags": [1]},
    {"id": "j-7", "status": "nul\x00"},
    {"id": 12},
    ["not", "an", "object"],
    None,
]


@pytest.mark.parametrize("source", ["tables", "supabase"])
@pytest.mark.parametrize("table", sorted(TABLES))
def test_plain_parse_gives_the_models_rows_and_problems(table: str, source: Any) -> None:
    spec = TABLES[table]
    for record in RECORDS:
        try:
            expected: Any = parse_record(spec, record, source)
        except InvalidRecord as exc:
            expected = exc.problems
        try:
            got: Any = parse_record_fast(spec, record, source)
        except InvalidRecord as exc:
            got = exc.problems
        assert got == expected, record
        if isinstance(got, dict):
            assert [type(v) for v in got.values()] == [type(v) for v in expected.values()], record
            assert list(got) == list(expected)


def test_identical_is_row_to_json_equality_where_it_says_equal() -> None:
    spec = TABLES["agent_decisions"]
    fields = spec.fields_of(Kind.JSON) + spec.fields_of(Kind.FLOAT)
    row = parse_record(spec, {"id": "d", "metadata": {"k": 1}, "confidence": 0.5, "updated_at": TS}, "tables")
    assert _identical(fields, row, dict(row))
    assert not _identical(fields, row, row | {"metadata": {"k": 1.0}})  # equal in Python, not the same JSON
    assert not _identical(fields, row, row | {"metadata": {"k": True}})
    assert not _identical(fields, row | {"confidence": 0.0}, row | {"confidence": -0.0})
    assert not _identical(fields, row, row | {"decision": "other"})


@pytest.mark.parametrize("table", sorted(TABLES))
def test_fetch_rows_bulk_reads_what_fetch_rows_reads(db: psycopg.Connection, table: str) -> None:
    spec = TABLES[table]
    records = [r for r in RECORDS if isinstance(r, dict) and str(r.get("id", "")).strip() and not any(
        isinstance(v, str) and "\x00" in v for v in r.values())]
    for i in range(7):
        for r in records:
            try:
                row = parse_record(spec, {**r, "id": f"{r['id']}-{i}", "confidence": 1e20 if i % 2 else 0.1}, "tables")
            except InvalidRecord:
                continue
            row = {k: v for k, v in row.items() if v is not None}  # column defaults for the rest
            try:
                with db.transaction():
                    db.execute(f"INSERT INTO {table} SELECT * FROM jsonb_populate_record(NULL::{table}, %s::jsonb)",
                               (row_to_json(row),))
            except psycopg.Error:
                continue
    since = datetime(2025, 12, 22, 10, tzinfo=UTC)
    for chunk in (3, 1000):
        for after in (None, since):
            plain = [parse_record(spec, r, "supabase") for r in supabase_db.fetch_rows(db, spec, after)]
            bulk = [parse_record(spec, r, "supabase") for r in supabase_db.fetch_rows_bulk(db, spec, after, chunk)]
            assert bulk == plain and len(plain) >= 7


# --- read-ahead of Tables pages --------------------------------------------------------------------------------


def _pages(n: int, fail_at: int | None = None, seen: list[int] | None = None) -> Iterator[int]:
    for i in range(n):
        if i == fail_at:
            raise RuntimeError(f"page read failed at {i}")
        if seen is not None:
            seen.append(i)
        yield i


def test_prefetched_yields_everything_in_order_and_raises_where_it_failed() -> None:
    assert list(_prefetched(_pages(2501), 1000, "t")) == list(range(2501))
    got: list[int] = []
    with pytest.raises(RuntimeError, match="failed at 1500"):
        for i in _prefetched(_pages(3000, fail_at=1500), 1000, "t"):
            got.append(i)
    assert got == list(range(1000))  # the complete page before the failure, then the error


def test_prefetched_stops_reading_when_the_consumer_stops() -> None:
    seen: list[int] = []
    for i in _prefetched(_pages(100_000, seen=seen), 100, "t"):
        if i == 150:
            break
    assert len(seen) <= 600  # a few pages ahead at most, not the whole source


# --- a reconcile across several pages, drift on both sides -------------------------------------------------


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalTables]:
    with start_local_tables(tmp_path / "t.sqlite3", names=["agent_jobs"]) as service:
        yield service


@pytest.mark.parametrize("pool", [8, 1])  # 1 connection: everything one at a time (no second writer/thread)
def test_reconcile_across_pages_repairs_both_ways_with_one_audit_entry_each(pg_server: Any, local: LocalTables,
                                                                           pool: int, monkeypatch) -> None:
    monkeypatch.setattr(reconcile_repair, "PIPELINE_MIN_BATCHES", 2)  # two Tables writers for these 6 batches
    url = create_database(pg_server.get_uri())
    prepare_database(url)
    n = 2 * PAGE_SIZE + 300
    later = "2025-12-22T11:00:00Z"
    ids = {k: [f"{k}-{i:05d}" for i in range(n // 10)] for k in ("so", "to", "nt", "ns")}
    ids["eq"] = [f"eq-{i:05d}" for i in range(n - 4 * (n // 10))]
    with psycopg.connect(url, autocommit=True) as conn:
        for key, status, ts in (("so", "queued", TS), ("eq", "queued", TS), ("nt", "old", TS), ("ns", "new", later)):
            conn.execute("INSERT INTO agent_jobs (id, status, parameters, created_at, updated_at) SELECT x, %s, "
                         "jsonb_build_object('k', x), %s, %s FROM unnest(%s::text[]) x", (status, TS, ts, ids[key]))
    with local.client() as client:
        t = local.ids["agent_jobs"]
        for key, status, ts in (("to", "queued", TS), ("eq", "queued", TS), ("nt", "new", later), ("ns", "old", TS)):
            client.create_many(t, [{"id": i, "status": status, "parameters": {"k": i}, "created_at": TS,
                                    "updated_at": ts} for i in ids[key]])
        ctx = SyncContext(settings=local.settings(database_url=url, retry_budget_s=2, webhook_secret="x",
                                                  db_pool_max=pool))
        try:
            result = reconcile(ctx, ["agent_jobs"])
        finally:
            ctx.tables.close()
        r = result.tables["agent_jobs"]
        tenth = n // 10
        assert (r.compared, r.in_sync, r.errors) == (n, n - 4 * tenth, [])
        assert (r.missing_in_supabase, r.missing_in_tables, r.stale_in_supabase, r.stale_in_tables) == (tenth,) * 4
        assert r.repaired == 4 * tenth and r.unresolved == 0 and result.in_sync
        assert set(r.timings) >= {"read_tables", "read_supabase", "compare", "repair"}
        assert _same(client, url, t)
    synced = sql(url, "SELECT resource_id, metadata->>'via', metadata->>'sync_direction' FROM audit_log "
                 "WHERE action = 'agent_jobs_synced'")
    assert len(synced) == len({s[0] for s in synced}) == 4 * tenth
    assert {(v, d) for _, v, d in synced} == {("reconcile", "tables_to_supabase"), ("reconcile", "supabase_to_tables")}
    assert sql(url, "SELECT count(*) FROM zsync.outbox WHERE acked_at IS NULL AND table_name = 'agent_jobs' "
               "AND record_id = ANY(%s)", (ids["so"] + ids["ns"],)) == [(0,)]


def _same(client: Any, url: str, table_id: str) -> bool:
    t, dupes = tables_rows(client, TABLES["agent_jobs"], table_id)
    return not dupes and t == supabase_rows(url, TABLES["agent_jobs"])
