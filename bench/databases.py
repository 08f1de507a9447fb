"""Databases for the before/after benchmarks (``bench/singlepath.py``, ``bench/apply_many.py``) and the raw
upsert they and ``bench/bench_reconcile.py`` compare with."""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg

from infra.local.pgnet_sql import apply_pg_net_sql, ensure_utc_database
from infra.local.postgres import apply_supabase_roles_sql, apply_vault_sql, create_database
from shared.adapters.migrations import HISTORY_DIR, MIGRATIONS_DIR, apply_migrations


def migrated_database(admin_url: str, tmp: Path, before: str | None = None) -> str:
    """A new database as ``prepare_database`` makes it; with ``before``, migrated only up to the migrations
    whose names sort before it (the code before a change, for a before/after run; the changes measured so far
    are in the chain the baseline replaced, infra/supabase/history/)."""
    url = create_database(admin_url)
    ensure_utc_database(url)
    apply_supabase_roles_sql(url)
    apply_pg_net_sql(url)
    apply_vault_sql(url)
    directory = MIGRATIONS_DIR
    if before is not None:
        directory = tmp / f"migrations-before-{before}"
        if not directory.exists():
            directory.mkdir()
            for path in HISTORY_DIR.glob("*.sql"):
                if path.name < before:
                    shutil.copy(path, directory / path.name)
    apply_migrations(url, directory)
    return url


def raw_upsert_sql(conn: psycopg.Connection, table: str = "agent_jobs") -> str:
    """Creates ``bench_raw``, a trigger-less copy of ``table``, and returns a plain batched
    ``INSERT ... ON CONFLICT DO UPDATE`` into it of a JSON array of rows (``%s``): no sync logic."""
    conn.execute(f"CREATE TABLE IF NOT EXISTS bench_raw (LIKE public.{table} INCLUDING ALL)")
    cols = [r[0] for r in conn.execute("SELECT attname FROM pg_attribute WHERE attrelid = 'bench_raw'::regclass "
                                       "AND attnum > 0 AND NOT attisdropped AND attname <> 'id' ORDER BY attnum")]
    sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols)
    return (f"INSERT INTO bench_raw SELECT * FROM jsonb_populate_recordset(NULL::bench_raw, %s::jsonb) "
            f"ON CONFLICT (id) DO UPDATE SET {sets}")
