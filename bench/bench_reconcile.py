"""How fast ``zsync reconcile`` compares and repairs, against embedded Postgres and the local Tables service
(no triggers: only reconcile writes). Seeds ``n`` agent_jobs rows only in Supabase, ``n`` only in Tables,
and ``n // 10`` stale on each side, then times a dry run, the repair, and a final (clean) pass, and counts
Tables API requests (pages and batches, never one call per record).

    python -m bench.bench_reconcile [--n 2000]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import psycopg
import requests

from infra.deploy.tables_setup import ensure_tables, table_ids
from infra.local.postgres import create_database, prepare_database, start_postgres
from infra.local.tables_service import RATE_LIMIT, RATE_WINDOW_S, TableConfig, start_tables_service
from infra.reconcile import ReconcileResult, reconcile
from shared.settings import Settings
from shared.spec import TABLES
from shared.sync import SyncContext
from shared.zapier_tables import TablesClient

CLIENT_ID, CLIENT_SECRET = "zsync-bench", "bench-secret"
TS = "2025-12-22T10:00:00Z"
LATER = "2025-12-22T11:00:00Z"


def _seed(url: str, client: TablesClient, table: str, n: int) -> None:
    stale = n // 10
    supa_only = [f"s-{i:06d}" for i in range(n)]
    tables_only = [f"t-{i:06d}" for i in range(n)]
    newer_in_tables = [f"nt-{i:06d}" for i in range(stale)]
    newer_in_supabase = [f"ns-{i:06d}" for i in range(stale)]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO agent_jobs (id, status, parameters, created_at, updated_at) SELECT x, 'queued', "
                     "jsonb_build_object('k', x), %s, %s FROM unnest(%s::text[]) x", (TS, TS, supa_only))
        conn.execute("INSERT INTO agent_jobs (id, status, created_at, updated_at) SELECT x, 'old', %s, %s "
                     "FROM unnest(%s::text[]) x", (TS, TS, newer_in_tables))
        conn.execute("INSERT INTO agent_jobs (id, status, created_at, updated_at) SELECT x, 'new', %s, %s "
                     "FROM unnest(%s::text[]) x", (TS, LATER, newer_in_supabase))
    client.create_many(table, [{"id": i, "status": "queued", "created_at": TS, "updated_at": TS} for i in tables_only])
    client.create_many(table, [{"id": i, "status": "new", "created_at": TS, "updated_at": LATER}
                               for i in newer_in_tables])
    client.create_many(table, [{"id": i, "status": "old", "created_at": TS, "updated_at": TS}
                               for i in newer_in_supabase])


def _line(name: str, seconds: float, result: ReconcileResult, requests_made: int) -> None:
    r = result.tables["agent_jobs"]
    rate = r.compared / seconds if seconds else 0
    print(f"{name:<10} {seconds:7.2f} s  compared={r.compared:<6} drift={r.drift:<6} repaired={r.repaired:<6} "
          f"compared/s={rate:8.0f}  Tables API requests={requests_made}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_reconcile", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="records missing on each side (default 2000)")
    parser.add_argument("--no-rate-limit", action="store_true",
                        help=f"turn off the service's per-table limit ({RATE_LIMIT} requests / {RATE_WINDOW_S:g} s)")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="zsync-bench-rc-"))
    pg = start_postgres(tmp / "pg")
    service = None
    try:
        url = create_database(pg.get_uri(), "bench")
        prepare_database(url)
        configs = [TableConfig(name=n, stamp_updated_at=TABLES[n].version is not None) for n in TABLES]
        service = start_tables_service(tmp / "t.sqlite3", configs, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                                       rate_limit=None if args.no_rate_limit else RATE_LIMIT)
        token_url = service.url + "/oauth/token/"
        with TablesClient(service.url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, token_url=token_url) as client:
            ids = table_ids(ensure_tables(client))
            _seed(url, client, ids["agent_jobs"], args.n)
        ctx = SyncContext(settings=Settings(database_url=url, zapier_base_url=service.url, zapier_token_url=token_url,
                                            zapier_client_id=CLIENT_ID, zapier_client_secret=CLIENT_SECRET,
                                            table_ids=ids))

        def run(name: str, dry_run: bool) -> None:
            requests.post(f"{service.url}/_admin/stats/reset", timeout=5)
            start = time.perf_counter()
            result = reconcile(ctx, ["agent_jobs"], dry_run=dry_run)
            elapsed = time.perf_counter() - start
            _line(name, elapsed, result, requests.get(f"{service.url}/_admin/stats", timeout=5).json()["api_requests"])

        print(f"agent_jobs: {args.n} only in Supabase, {args.n} only in Tables, {args.n // 10} stale on each side")
        run("dry run", True)
        run("repair", False)
        run("clean", True)
    finally:
        if service is not None:
            service.stop()
        pg.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
