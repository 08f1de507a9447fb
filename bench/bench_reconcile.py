"""``zsync reconcile`` at scale, against embedded Postgres and the local Tables service with its default
per-table rate limit (100 requests / 5 s). One table (agent_jobs) of ``n`` records with drift on both sides:
10 % only in Supabase, 10 % only in Tables, 10 % newer in Tables, 10 % newer in Supabase, the rest equal.

Prints reconcile's records/s against the raw batched-upsert limit of the same Postgres measured in the same
run (a plain ``INSERT ... ON CONFLICT DO UPDATE`` of the same ``n`` rows in batches of 1,000 into a copy of
the table without triggers: no sync logic), the Tables API requests against the minimum (records / 100),
and Tables -> Supabase batch apply (``apply_many_from_tables``) against one record at a time.

    python -m bench.bench_reconcile [--n 100000] [--apply-n 2000]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import requests

from infra.deploy.tables_setup import ensure_tables, table_ids
from infra.local.postgres import create_database, prepare_database, start_postgres
from infra.local.tables_service import RATE_LIMIT, RATE_WINDOW_S, TableConfig, start_tables_service
from infra.reconcile import reconcile
from shared.settings import Settings
from shared.spec import FUNCTIONS, TABLES
from shared.sync import SyncContext, apply_from_tables, apply_many_from_tables
from shared.zapier_tables import TablesClient

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
        conn.execute("CREATE TABLE bench_raw (LIKE public.agent_jobs INCLUDING ALL)")
        cols = [r[0] for r in conn.execute("SELECT attname FROM pg_attribute WHERE attrelid = 'bench_raw'::regclass "
                                           "AND attnum > 0 AND NOT attisdropped AND attname <> 'id' ORDER BY attnum")]
        sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols)
        sql = (f"INSERT INTO bench_raw SELECT * FROM jsonb_populate_recordset(NULL::bench_raw, %s::jsonb) "
               f"ON CONFLICT (id) DO UPDATE SET {sets}")
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


def run(n: int = 20_000, apply_n: int = 2000, rate_limit: bool = True) -> Summary:
    tmp = Path(tempfile.mkdtemp(prefix="zsync-bench-rc-"))
    pg = start_postgres(tmp / "pg")
    service = None
    try:
        url = create_database(pg.get_uri(), "bench")
        prepare_database(url)
        configs = [TableConfig(name=t, stamp_updated_at=TABLES[t].version is not None) for t in TABLES]
        service = start_tables_service(tmp / "t.sqlite3", configs, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                                       rate_limit=RATE_LIMIT if rate_limit else None)
        token_url = service.url + "/oauth/token/"
        ids = _ids(n)
        print(f"reconcile: seeding agent_jobs with {n:,} records (drift both sides) ...", flush=True)
        with TablesClient(service.url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, token_url=token_url) as client:
            tids = table_ids(ensure_tables(client))
            _seed(url, client, tids["agent_jobs"], ids)
        ctx = SyncContext(settings=Settings(database_url=url, zapier_base_url=service.url, zapier_token_url=token_url,
                                            zapier_client_id=CLIENT_ID, zapier_client_secret=CLIENT_SECRET,
                                            table_ids=tids))
        raw = raw_upsert_rate(url, n)
        time.sleep(RATE_WINDOW_S)  # the seeding's requests out of the window
        requests.post(f"{service.url}/_admin/stats/reset", timeout=5)
        start = time.perf_counter()
        result = reconcile(ctx, ["agent_jobs"])
        elapsed = time.perf_counter() - start
        made = requests.get(f"{service.url}/_admin/stats", timeout=5).json()["api_requests"]
        r = result.tables["agent_jobs"]
        clean = reconcile(ctx, ["agent_jobs"], dry_run=True)
        many, one = apply_rates(ctx, apply_n)
    finally:
        if service is not None:
            service.stop()
        pg.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    rate = r.compared / elapsed
    minimum = -(-r.compared // 100)
    limit = f"{RATE_LIMIT} req / {RATE_WINDOW_S:g} s" if rate_limit else "no rate limit"
    print(f"\nreconcile of agent_jobs, {n:,} records ({limit}): {elapsed:.1f} s, compared {r.compared:,}, "
          f"drift {r.drift:,}, repaired {r.repaired:,}, unresolved {r.unresolved}, errors {r.errors}, "
          f"in sync after: {clean.in_sync}")
    print(f"  reconcile {rate:,.0f} records/s vs raw batched upsert {raw:,.0f} rows/s = {rate / raw:.0%}")
    print(f"  Tables API requests {made:,} vs minimum {minimum:,} (records / 100) = {made / minimum:.2f}x")
    print(f"  Tables -> Supabase apply ({apply_n:,} records x 2): batch {many:,.0f}/s, one by one {one:,.0f}/s "
          f"= {many / one:.1f}x")
    return [
        (f"reconcile {n:,} rec/s vs raw upsert", f"{rate:,.0f} vs {raw:,.0f} = {rate / raw:.0%}", ">= 50%"),
        (f"reconcile {n:,} Tables requests", f"{made:,} vs {minimum:,} (records/100)", "near records/100"),
        ("tables->supabase batch vs 1-by-1", f"{many:,.0f} vs {one:,.0f} rec/s = {many / one:.1f}x", "batch faster"),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_reconcile", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="records in the table (default 20,000)")
    parser.add_argument("--apply-n", type=int, default=2000, help="records for the batch-vs-single apply row")
    parser.add_argument("--no-rate-limit", action="store_true",
                        help=f"turn off the service's per-table limit ({RATE_LIMIT} requests / {RATE_WINDOW_S:g} s)")
    args = parser.parse_args(argv)
    for name, value, goal in run(args.n, args.apply_n, not args.no_rate_limit):
        print(f"{name:<40} {value:<44} {goal}")


if __name__ == "__main__":
    main()
