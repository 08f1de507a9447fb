"""The database cost of ONE delivery in each direction, before and after the single-record SQL of
migrations 2026112981xxxx, in the same run against embedded Postgres (no network, no Zapier).

* tables->supabase: :func:`shared.services.from_tables.apply_from_tables` of one Zap delivery, three kinds: a new record
  (insert), a newer version (update) and the echo of the sync's own write (unchanged: every
  Supabase -> Tables write comes back this way).
* supabase->tables: what a *_to_tables webhook costs in the database: :func:`shared.services.outbox_batch.deliver`
  of one captured change (claim, lock, read, compare, audit, ack) with a Tables stand-in that answers at
  once (``NullTables``: the HTTP part is not what is measured here; ``bench/lag.py`` measures the whole hop).
* round trips per delivery: counted from libpq's protocol trace of the pool's connections (every Sync or
  simple Query the client sends is one round trip: the pool's connection check, BEGIN, each statement,
  COMMIT).
* the version of one row: ``zsync.version_of`` (the single path's) per call, before and after.

"before" is a database migrated without the 2026112981xxxx migrations, with the drain's previous statements
(:func:`previous_drain`: claim, one try-lock per record, read rows, tombstones; audit insert, ack, and a
second transaction to find the queue empty); "after" is this checkout as it is.

    python -m bench.singlepath [--n 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from bench.databases import migrated_database
from infra.local.postgres import start_postgres
from shared.adapters import supabase_db
from shared.core.outcome import Outcome
from shared.core.spec import FUNCTIONS
from shared.platform.settings import Settings
from shared.services.from_tables import apply_from_tables, apply_many_from_tables
from shared.services.outbox_batch import deliver
from shared.services.sync import SupabaseWebhook, SyncContext

TO_SUPABASE = FUNCTIONS["agent_jobs_to_supabase"]
TO_TABLES = FUNCTIONS["agent_jobs_to_tables"]
MINE = "20261129810000"  # the first migration of this change: "before" stops short of it


@dataclass
class _Rec:
    id: str
    data: dict[str, Any]
    edited_at: str | None = None
    deleted_at: str | None = None  # never trashed here


@dataclass
class NullTables:
    """A Zapier Tables stand-in that answers at once (the bench measures the database part)."""

    records: dict[str, _Rec] = field(default_factory=dict)

    def find_many(self, table_id: str, name: str, values: list[str], trash: str = "exclude") -> list[_Rec]:
        return [self.records[v] for v in values if v in self.records]

    def find_by_field(self, table_id: str, name: str, value: str) -> _Rec | None:
        return self.records.get(value)

    def create_many(self, table_id: str, fields: list[dict[str, Any]]) -> list[str]:
        for f in fields:
            self.records[f["id"]] = _Rec(f"rec-{f['id']}", dict(f))
        return [f"rec-{f['id']}" for f in fields]

    def create(self, table_id: str, fields: dict[str, Any]) -> str:
        return self.create_many(table_id, [fields])[0]

    def update_many(self, table_id: str, items: list[tuple[str, dict[str, Any]]]) -> None:
        for _, f in items:
            self.records[f["id"]] = _Rec(f"rec-{f['id']}", dict(f))

    def update(self, table_id: str, record_id: str, fields: dict[str, Any]) -> None:
        self.update_many(table_id, [(record_id, fields)])


class Trips:
    """Round trips the client makes, from libpq's trace of every pool connection."""

    def __init__(self, directory: Path):
        self.path = directory / f"trace-{uuid.uuid4().hex[:8]}.log"
        self._file = self.path.open("w")

    def configure(self, conn: psycopg.Connection) -> None:
        from psycopg import pq

        conn.pgconn.trace(self._file.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)

    def count(self) -> int:
        self._file.flush()
        text = self.path.read_text(errors="replace")
        return len(re.findall(r"^F\t\d+\t(?:Sync|Query)\b", text, re.M))


def _pool_with(url: str, trips: Trips | None) -> None:
    """The pool supabase_db would make for ``url`` (same settings), optionally tracing its connections."""
    supabase_db._pools[url] = ConnectionPool(
        url, min_size=0, max_size=1, kwargs={"prepare_threshold": None, "connect_timeout": 5},
        check=supabase_db._check_if_idle, timeout=5, max_idle=300, open=True, name="bench",
        configure=trips.configure if trips else None)


@contextlib.contextmanager
def previous_drain() -> Iterator[None]:
    """The outbox drain's database calls as they were before zsync.claim_outbox_rows/record_outbox_batch."""
    def claim(conn: psycopg.Connection, spec: Any, limit: int, exclude: list[str] | None = None) -> list[tuple]:
        claimed = supabase_db.claim_outbox(conn, spec, limit, exclude)
        locked = [(rid, n, cap, supabase_db.try_lock_record(conn, spec, rid)) for rid, n, cap in claimed]
        rows = supabase_db.fetch_rows_by_id(conn, spec, [rid for rid, _, _, ok in locked if ok])
        return [(rid, n, cap, ok, rows.get(rid),
                 supabase_db.tombstone_version(conn, spec, rid) if ok and rid not in rows else None)
                for rid, n, cap, ok in locked]

    def record(conn: psycopg.Connection, spec: Any, entries: list, acks: list, exclude: list[str]) -> bool:
        supabase_db.append_audit_many(conn, entries)
        supabase_db.ack_outbox_many(conn, spec, acks)
        return True  # the drain then claims again in a new transaction, as it did

    saved = supabase_db.claim_outbox_rows, supabase_db.record_outbox_batch
    supabase_db.claim_outbox_rows, supabase_db.record_outbox_batch = claim, record
    try:
        yield
    finally:
        supabase_db.claim_outbox_rows, supabase_db.record_outbox_batch = saved


def _ctx(url: str) -> SyncContext:
    ctx = SyncContext(settings=Settings(database_url=url, retry_budget_s=5.0, table_ids={"agent_jobs": "t1"}))
    ctx.__dict__["tables"] = NullTables()
    return ctx


def _stamp(i: int, base: datetime) -> str:
    return (base + timedelta(milliseconds=i)).isoformat()


def _record(rid: str, i: int, base: datetime) -> dict[str, Any]:
    return {"id": rid, "status": f"s{i % 7}", "agent_name": "bench", "retry_count": i % 5,
            "parameters": {"n": i, "tags": ["a", "b"], "nested": {"x": 1.5}},
            "started_at": _stamp(i, base), "updated_at": _stamp(i, base), "created_at": base.isoformat()}


def _timed(n: int, one: Callable[[int], Any]) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        one(i)
        out.append((time.perf_counter() - t) * 1000)
    return out


def to_supabase(url: str, n: int, expect: Outcome, kind: str, lease: bool = False) -> list[float]:
    """``lease``: through :func:`apply_many_from_tables` with one delivery (a trigger-inbox lease of one message,
    the default path) instead of :func:`apply_from_tables` (a Zap's POST)."""
    ctx = _ctx(url)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    ids = [f"{kind}-{uuid.uuid4().hex[:10]}" for _ in range(n)]
    if kind != "insert":  # the stored versions first
        for i, rid in enumerate(ids):
            apply_from_tables(ctx, TO_SUPABASE, _record(rid, i, base))
    later = base + timedelta(days=1) if kind == "update" else base

    def one(i: int) -> None:
        record = _record(ids[i], i, later)
        result = (apply_many_from_tables(ctx, TO_SUPABASE, [record])[0] if lease
                  else apply_from_tables(ctx, TO_SUPABASE, record))
        assert result.outcome is expect, (kind, result)

    return _timed(n, one)


def to_tables(url: str, n: int, update: bool = False) -> list[float]:
    """``update``: the record is in Tables already (created by a first delivery, not timed): the version
    comparison runs too."""
    ctx = _ctx(url)
    fn = TO_TABLES

    def write(c: psycopg.Connection, rid: str, status: str) -> dict[str, Any]:
        return c.execute("INSERT INTO agent_jobs (id, status, parameters) VALUES (%s, %s, '{\"n\": 1}') "
                         "ON CONFLICT (id) DO UPDATE SET status = excluded.status RETURNING to_jsonb(agent_jobs)",
                         (rid, status)).fetchone()[0]

    def one(i: int) -> None:
        rid = f"out-{uuid.uuid4().hex[:10]}"
        with psycopg.connect(url, autocommit=True) as c:  # the Supabase-side write (not timed below)
            if update:
                first = write(c, rid, "queued")
                assert deliver(ctx, fn, SupabaseWebhook.model_validate(
                    {"type": "INSERT", "table": "agent_jobs", "schema": "public", "record": first})).outcome \
                    is Outcome.APPLIED
            row = write(c, rid, "running" if update else "queued")
        hook = SupabaseWebhook.model_validate({"type": "INSERT", "table": "agent_jobs", "schema": "public",
                                               "record": row, "old_record": None})
        t = time.perf_counter()
        result = deliver(ctx, fn, hook)
        times.append((time.perf_counter() - t) * 1000)
        assert result.outcome is Outcome.APPLIED, result

    times: list[float] = []
    for i in range(n):
        one(i)
    return times


def version_of(url: str, n: int) -> list[float]:
    row = _record("v", 1, datetime(2026, 1, 1, tzinfo=UTC))
    import json

    payload = json.dumps(row)
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as c:
        def one(_: int) -> None:
            c.execute("SELECT * FROM zsync.version_of('public.agent_jobs', %s::jsonb)", (payload,)).fetchone()

        return _timed(n, one)


SERVER_KINDS = {  # kind -> (row changes over the stored one, edited_at, expected outcome)
    "insert": ({}, None, "applied"),
    "echo (unchanged)": ({}, None, "unchanged"),
    "update": ({"updated_at": "2026-01-02T00:00:00Z"}, None, "applied"),
    "cell edit (edited_at)": ({"updated_at": "2026-01-02T00:00:00Z", "status": "edited"}, "2026-01-03T00:00:00Z",
                              "applied"),
}


def server_sync_apply(url: str, n: int) -> dict[str, float]:
    """zsync.sync_apply's own time per call (no client, no round trip): ``n`` calls in one statement per kind,
    in order on the same ids, rolled back. -> kind -> microseconds per call."""
    import json

    row = json.dumps(_record("x", 1, datetime(2026, 1, 1, tzinfo=UTC)))
    out: dict[str, float] = {}
    with psycopg.connect(url, prepare_threshold=None) as c, c.transaction(force_rollback=True):
        for kind, (change, edited, expect) in SERVER_KINDS.items():
            t = time.perf_counter()
            got = c.execute("SELECT count(*) FILTER (WHERE a.outcome = %s) FROM generate_series(1, %s) g, "
                            "LATERAL zsync.sync_apply('public.agent_jobs', %s::jsonb || %s::jsonb "
                            "|| jsonb_build_object('id', 'srv-' || g), %s) a",
                            (expect, n, row, json.dumps(change), edited)).fetchone()[0]
            out[kind] = (time.perf_counter() - t) * 1e6 / n
            assert got == n, (kind, got)
    return out


def _apply_one(url: str, base: datetime) -> None:
    apply_from_tables(_ctx(url), TO_SUPABASE, _record(uuid.uuid4().hex, 1, base))


def _vacuum(url: str) -> None:
    """VACUUM ANALYZE what a delivery reads (autovacuum's visits to each database come at random times: right
    after a drain of thousands of entries, the claim's plan may scan all the dead ones until it does)."""
    with psycopg.connect(url, autocommit=True) as c:
        for table in ("zsync.outbox", "zsync.tombstones", "public.audit_log", "public.agent_jobs"):
            c.execute(f"VACUUM ANALYZE {table}")


def _p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _line(name: str, before: list[float], after: list[float]) -> str:
    b50, a50 = statistics.median(before), statistics.median(after)
    return (f"{name:<34} p50 {b50:7.3f} -> {a50:7.3f} ms  p99 {_p(before, .99):7.3f} -> {_p(after, .99):7.3f} ms"
            f"  after/before {a50 / b50:5.2f}")


def _trips(admin_url: str, tmp: Path, run: Callable[[str], Any], before: bool = False) -> int:
    url = migrated_database(admin_url, tmp, MINE if before else None)
    trips = Trips(tmp)
    _pool_with(url, trips)
    run(url)  # warm: the connection exists and is checked on the next checkout
    start = trips.count()
    run(url)
    return trips.count() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="deliveries per measurement")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this text")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="zsync-singlepath-"))
    server = start_postgres(tmp / "pg")
    admin = server.get_uri()
    try:
        dbs = {label: migrated_database(admin, tmp, MINE if label == "before" else None)
               for label in ("before", "after")}
        for url in dbs.values():
            _pool_with(url, None)
        print(f"one delivery, database part ({args.n} each, embedded Postgres, unix socket; before = without "
              f"migrations >= {MINE})")
        cases: list[tuple[str, Callable[[str], list[float]]]] = [
            ("version_of (one row)", lambda u: version_of(u, args.n)),
            ("tables->supabase insert", lambda u: to_supabase(u, args.n, Outcome.APPLIED, "insert")),
            ("tables->supabase update", lambda u: to_supabase(u, args.n, Outcome.APPLIED, "update")),
            ("tables->supabase echo (unchanged)", lambda u: to_supabase(u, args.n, Outcome.UNCHANGED, "echo")),
            ("tables->supabase inbox lease of 1", lambda u: to_supabase(u, args.n, Outcome.APPLIED, "update", True)),
            ("supabase->tables new (deliver)", lambda u: to_tables(u, max(1, args.n // 2))),
            ("supabase->tables update (deliver)", lambda u: to_tables(u, max(1, args.n // 2), update=True)),
        ]
        def old(run: Callable[[str], list[float]]) -> Callable[[str], list[float]]:
            def wrapped(url: str) -> list[float]:
                with previous_drain():
                    return run(url)
            return wrapped

        for name, run in cases:
            if args.only not in name:
                continue
            run_before = old(run)
            run_before(dbs["before"])  # warm both (plans, caches) with a first pass of the same size
            run(dbs["after"])
            for url in dbs.values():  # steady state: the first drain acks every change the cases before made
                _vacuum(url)
            before, after = [], []
            for _ in range(2):  # interleaved halves: drift on a shared machine hits both alike
                before += run_before(dbs["before"])
                after += run(dbs["after"])
            print(_line(name, before, after))
        server = {label: [server_sync_apply(url, args.n) for _ in range(3)] for label, url in dbs.items()}
        for kind in SERVER_KINDS:
            b, a = (min(r[kind] for r in server[label]) for label in ("before", "after"))
            print(f"server: zsync.sync_apply {kind:<22} {b:7.1f} -> {a:7.1f} us per call  after/before {a / b:5.2f}")
        base = datetime(2026, 1, 1, tzinfo=UTC)
        for label, is_before in (("before", True), ("after", False)):
            with previous_drain() if is_before else contextlib.nullcontext():
                one = _trips(admin, tmp, lambda u: _apply_one(u, base), is_before)
                drain = _trips(admin, tmp, lambda u: to_tables(u, 1), is_before)
                updated = _trips(admin, tmp, lambda u: to_tables(u, 1, update=True), is_before)
            print(f"round trips per delivery {label:<6}: tables->supabase {one}, supabase->tables new {drain}, "
                  f"update {updated} (the first delivery included)")
    finally:
        supabase_db.close_pools()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
