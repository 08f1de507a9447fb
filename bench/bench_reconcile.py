"""``zsync reconcile`` at scale, against embedded Postgres and the local Tables service (run as its own
process, ``python -m infra.local.tables_service``, as Zapier is its own service: its work is not done under
our interpreter's lock). One table (agent_jobs) of ``n`` records with drift on both sides: 10 % only in
Supabase, 10 % only in Tables, 10 % newer in Tables, 10 % newer in Supabase, the rest equal. The drifted
state is seeded once and copied (``CREATE DATABASE ... TEMPLATE``, the service's SQLite file), so the two runs
below repair the same drift:

(a) **without the rate limit**: reconcile's records/s (records compared / elapsed) against the raw batched
    upsert of the same Postgres measured in the same run: a plain ``INSERT ... ON CONFLICT DO UPDATE`` of
    ``n`` rows of the same shape, in batches of 1,000 (reconcile's Supabase batch), into a copy of the table
    without triggers, inserted and then all updated again. That is the database's own write limit with no
    sync logic, no reading and no Tables at all: a generous baseline for reconcile, which reads both sides
    in full (``n`` rows from Postgres, ``n`` records over HTTP), maps every record, compares versions, and
    writes the drift (40 %) to both sides with an audit entry each, the outbox acked and per-record locks -
    it writes far fewer rows than the baseline (0.2 ``n`` to Postgres, plus as many audit rows) but does
    everything else too. The goal (>= 50 %) is the issue's.
(b) **with Zapier's limit** (the service's default: 100 requests / 5 s per table, a sliding window): the
    elapsed time against the lower bound the limit alone imposes on the requests made
    (``(ceil(requests / 100) - 1) x 5 s``: the first 100 go at once) and against the larger of that bound and
    run (a)'s time (what reconcile needs without the limit), and the Tables requests against the minimum
    (records / 100; reads are pages of 1,000, writes batches of 100). When elapsed is close to the bound,
    the limit, not reconcile, is what bounds it.

Also Tables -> Supabase batch apply (``apply_many_from_tables``) against one record at a time.

    python -m bench.bench_reconcile [--n 100000] [--apply-n 2000] [--no-rate-limit]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import requests

from bench.databases import raw_upsert_sql
from infra.deploy.tables_setup import ensure_tables, table_ids
from infra.local.postgres import create_database, prepare_database, start_postgres, with_database
from infra.local.tables_service import RATE_LIMIT, RATE_WINDOW_S
from infra.reconcile import reconcile
from infra.reconcile_report import TableReport
from shared.adapters.supabase_db import close_pools
from shared.adapters.zapier_tables import TablesClient
from shared.core.spec import FUNCTIONS, TABLES
from shared.platform.settings import Settings
from shared.services.from_tables import apply_from_tables, apply_many_from_tables
from shared.services.sync import SyncContext

CLIENT_ID, CLIENT_SECRET = "zsync-bench", "bench-secret"
TS = "2025-12-22T10:00:00Z"
LATER = "2025-12-22T11:00:00Z"
RAW_BATCH = 1000
Summary = list[tuple[str, str, str]]


def _ids(n: int) -> dict[str, list[str]]:
    tenth = n // 10
    names = {"supa_only": "so", "tables_only": "to", "newer_in_tables": "nt", "newer_in_supabase": "ns"}
    out = {name: [f"{prefix}-{i:07d}" for i in range(tenth)] for name, prefix in names.items()}
    out["equal"] = [f"eq-{i:07d}" for i in range(n - 4 * tenth)]
    return out


def _seed(url: str, client: TablesClient, table: str, ids: dict[str, list[str]]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for key, status, ts in (("supa_only", "queued", TS), ("equal", "queued", TS),
                                ("newer_in_tables", "old", TS), ("newer_in_supabase", "new", LATER)):
            conn.execute("INSERT INTO agent_jobs (id, status, parameters, created_at, updated_at) SELECT x, %s, "
                         "jsonb_build_object('k', x), %s, %s FROM unnest(%s::text[]) x", (status, TS, ts, ids[key]))
        conn.execute("DELETE FROM zsync.outbox")
    for key, status, ts in (("tables_only", "queued", TS), ("equal", "queued", TS),
                            ("newer_in_tables", "new", LATER), ("newer_in_supabase", "old", TS)):
        client.create_many(table, [{"id": i, "status": status, "parameters": {"k": i} if key == "equal" else None,
                                    "created_at": TS, "updated_at": ts} for i in ids[key]])


def raw_upsert_rate(url: str, n: int) -> float:
    """Rows/s of a plain batched INSERT ... ON CONFLICT DO UPDATE of ``n`` agent_jobs-shaped rows (inserted,
    then all updated again: the same mix of inserts and updates a repair makes, no sync logic)."""
    rows = [f'{{"id":"r-{i:07d}","status":"queued","parameters":{{"k":"r-{i:07d}"}},"created_at":"{TS}",'
            f'"updated_at":"{TS}"}}' for i in range(n)]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_raw")
        sql = raw_upsert_sql(conn)
        start = time.perf_counter()
        for _ in range(2):
            for i in range(0, n, RAW_BATCH):
                with conn.transaction():
                    conn.execute(sql, ("[" + ",".join(rows[i:i + RAW_BATCH]) + "]",))
        elapsed = time.perf_counter() - start
        conn.execute("DROP TABLE bench_raw")
    return 2 * n / elapsed


def apply_rates(ctx: SyncContext, n: int) -> tuple[float, float]:
    """Tables -> Supabase records/s: apply_many_from_tables in batches of 1,000 vs apply_from_tables one by one
    (new records, then the same ids one version newer: inserts and updates)."""
    fn = FUNCTIONS["agent_jobs_to_supabase"]
    now = datetime.now(UTC)

    def deliveries(prefix: str, ts: str) -> list[dict]:
        return [{"id": f"{prefix}-{i:06d}", "status": "queued", "parameters": {"k": i}, "updated_at": ts}
                for i in range(n)]

    start = time.perf_counter()
    for ts in (TS, LATER):
        batch = deliveries("am", ts)
        for i in range(0, n, 1000):
            apply_many_from_tables(ctx, fn, batch[i:i + 1000], received_at=now)
    many = 2 * n / (time.perf_counter() - start)
    start = time.perf_counter()
    for ts in (TS, LATER):
        for d in deliveries("a1", ts):
            apply_from_tables(ctx, fn, d, now)
    one = 2 * n / (time.perf_counter() - start)
    return many, one


class ServiceProcess:
    """The local Tables service as its own process (stopped with SIGTERM)."""

    def __init__(self, tmp: Path, db: Path, rate_limit: bool) -> None:
        config = tmp / f"tables-{db.stem}-{'limited' if rate_limit else 'unlimited'}.json"
        config.write_text(json.dumps({
            "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
            "rate_limit": RATE_LIMIT if rate_limit else None, "rate_window_s": RATE_WINDOW_S,
            "tables": [{"name": t} for t in TABLES]}))
        self.log = (tmp / f"{config.stem}.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "infra.local.tables_service", "--db", str(db), "--config", str(config)],
            stdout=subprocess.PIPE, stderr=self.log, cwd=Path(__file__).resolve().parent.parent)
        line = self.process.stdout.readline().decode() if self.process.stdout else ""
        if "listening on " not in line:
            self.stop()
            raise RuntimeError(f"tables service did not start: {line!r} (see {self.log.name})")
        self.url = line.split("listening on ", 1)[1].split()[0]
        self.token_url = self.url + "/oauth/token/"

    def requests(self) -> int:
        return requests.get(f"{self.url}/_admin/stats", timeout=10).json()["api_requests"]

    def reset(self) -> None:
        requests.post(f"{self.url}/_admin/stats/reset", timeout=10).raise_for_status()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def _context(url: str, service: ServiceProcess, tids: dict[str, str]) -> SyncContext:
    return SyncContext(settings=Settings(database_url=url, zapier_base_url=service.url,
                                         zapier_token_url=service.token_url, zapier_client_id=CLIENT_ID,
                                         zapier_client_secret=CLIENT_SECRET, table_ids=tids))


@dataclass
class Run:
    elapsed: float
    requests: int
    report: TableReport
    in_sync_after: bool


def _reconcile_run(url: str, service: ServiceProcess, tids: dict[str, str]) -> Run:
    ctx = _context(url, service, tids)
    service.reset()
    start = time.perf_counter()
    result = reconcile(ctx, ["agent_jobs"])
    elapsed = time.perf_counter() - start
    made = service.requests()
    clean = reconcile(ctx, ["agent_jobs"], dry_run=True)
    close_pools()
    return Run(elapsed, made, result.tables["agent_jobs"], clean.in_sync)


def limit_bound_s(made: int) -> float:
    """The least time ``made`` requests to one table take under the limit (sliding window, empty at start)."""
    return max(0, -(-made // RATE_LIMIT) - 1) * RATE_WINDOW_S


def run(n: int = 20_000, apply_n: int = 2000, rate_limit: bool = True) -> Summary:
    """Both runs (``rate_limit=False``: only the unlimited one). -> summary rows."""
    tmp = Path(tempfile.mkdtemp(prefix="zsync-bench-rc-"))
    pg = start_postgres(tmp / "pg")
    services: list[ServiceProcess] = []
    try:
        url = create_database(pg.get_uri(), "bench_a")
        prepare_database(url)
        ids = _ids(n)
        print(f"reconcile: seeding agent_jobs with {n:,} records (drift both sides) ...", flush=True)
        start = time.perf_counter()
        seeder = ServiceProcess(tmp, tmp / "a.sqlite3", rate_limit=False)
        services.append(seeder)
        with TablesClient(seeder.url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                          token_url=seeder.token_url) as client:
            tids = table_ids(ensure_tables(client))
            _seed(url, client, tids["agent_jobs"], ids)
        seeder.stop()
        seeded = time.perf_counter() - start
        # the same drifted state for the rate-limited run
        url_b = None
        if rate_limit:
            with psycopg.connect(pg.get_uri(), autocommit=True) as conn:
                conn.execute('CREATE DATABASE "bench_b" TEMPLATE "bench_a"')
            url_b = with_database(url, "bench_b")
            shutil.copyfile(tmp / "a.sqlite3", tmp / "b.sqlite3")
        print(f"  seeded in {seeded:.1f} s", flush=True)
        raw = raw_upsert_rate(url, n)
        free = ServiceProcess(tmp, tmp / "a.sqlite3", rate_limit=False)
        services.append(free)
        a = _reconcile_run(url, free, tids)
        many, one = apply_rates(_context(url, free, tids), apply_n)
        free.stop()
        b = None
        if url_b is not None:
            limited = ServiceProcess(tmp, tmp / "b.sqlite3", rate_limit=True)
            services.append(limited)
            b = _reconcile_run(url_b, limited, tids)
            limited.stop()
    finally:
        for service in services:
            service.stop()
        close_pools()
        pg.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    summary: Summary = []
    rate = a.report.compared / a.elapsed
    minimum = -(-n // 100)
    print(f"\nreconcile of agent_jobs, {n:,} records, drift {a.report.drift:,} (seeding took {seeded:.1f} s)")
    for label, r in (("(a) no rate limit", a), (f"(b) {RATE_LIMIT} req / {RATE_WINDOW_S:g} s", b)):
        if r is None:
            continue
        print(f"  {label}: {r.elapsed:.1f} s, compared {r.report.compared:,}, repaired {r.report.repaired:,}, "
              f"unresolved {r.report.unresolved}, errors {r.report.errors}, in sync after: {r.in_sync_after}, "
              f"Tables requests {r.requests:,}")
        print("      phases (wall s): " + ", ".join(f"{k} {v:.1f}" for k, v in r.report.timings.items()))
    print(f"  (a) reconcile {rate:,.0f} records/s vs raw batched upsert {raw:,.0f} rows/s = {rate / raw:.0%} "
          f"(goal >= 50 %)")
    summary.append((f"reconcile {n:,} rec/s vs raw upsert", f"{rate:,.0f} vs {raw:,.0f} = {rate / raw:.0%}",
                    ">= 50%"))
    if b is not None:
        bound = limit_bound_s(b.requests)
        floor = max(bound, a.elapsed)
        versus_bound = f"= {b.elapsed / bound:.2f}x" if bound else "(none: they fit in the first window)"
        print(f"  (b) elapsed {b.elapsed:.1f} s vs {bound:.1f} s the limit alone imposes on {b.requests:,} requests "
              f"{versus_bound}; vs max(that, {a.elapsed:.1f} s without the limit) = {b.elapsed / floor:.2f}x; "
              f"{n / b.elapsed:,.0f} records/s")
        print(f"  (b) Tables API requests {b.requests:,} (429s and their retries included) vs minimum {minimum:,} "
              f"(records / 100) = {b.requests / minimum:.2f}x")
        summary.append((f"reconcile {n:,} rate-limited vs bound", f"{b.elapsed:.1f} s vs {floor:.1f} s = "
                        f"{b.elapsed / floor:.2f}x (limit alone {bound:.1f} s, {b.requests:,} requests)",
                        "near the bound"))
        summary.append((f"reconcile {n:,} Tables requests", f"{b.requests:,} vs {minimum:,} (records/100)",
                        "<= records/100"))
    print(f"  Tables -> Supabase apply ({apply_n:,} records x 2): batch {many:,.0f}/s, one by one {one:,.0f}/s "
          f"= {many / one:.1f}x")
    summary.append(("tables->supabase batch vs 1-by-1", f"{many:,.0f} vs {one:,.0f} rec/s = {many / one:.1f}x",
                    "batch faster"))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_reconcile", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="records in the table (default 20,000)")
    parser.add_argument("--apply-n", type=int, default=2000, help="records for the batch-vs-single apply row")
    parser.add_argument("--no-rate-limit", action="store_true",
                        help=f"only run (a): skip the run under the per-table limit "
                             f"({RATE_LIMIT} requests / {RATE_WINDOW_S:g} s)")
    args = parser.parse_args(argv)
    for name, value, goal in run(args.n, args.apply_n, not args.no_rate_limit):
        print(f"{name:<40} {value:<44} {goal}")


if __name__ == "__main__":
    main()
