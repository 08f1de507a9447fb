"""The local Supabase database: embedded Postgres from the ``pgserver`` wheel (no system service),
prepared like a Supabase project (TimeZone UTC, its API roles and default grants, the pg_net / Database
Webhook and Vault stand-ins with their real grants) and migrated
with our own migration tool.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import psycopg

from infra.local.pgnet_sql import apply_pg_net_sql, ensure_utc_database
from shared.adapters.migrations import MIGRATIONS_DIR, MigrationError, apply_migrations


def start_postgres(data_dir: Path) -> Any:
    """Start (or reuse, if already running on this data dir) an embedded Postgres server."""
    import pgserver  # dev-only dependency

    data_dir.mkdir(parents=True, exist_ok=True)
    return pgserver.get_server(data_dir, cleanup_mode="stop")


def stop_postgres(server: Any) -> None:
    """Fast shutdown of an embedded server (fault injection); ``start_again`` brings it back."""
    import subprocess

    import pgserver

    pg_ctl = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_ctl"
    subprocess.run([str(pg_ctl), "-D", str(server.pgdata), "-m", "fast", "-w", "stop"], check=True,
                   user=server.system_user, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)


def start_again(server: Any) -> None:
    """Restart a server stopped by :func:`stop_postgres` on the same data dir and socket."""
    server.ensure_postgres_running()


def with_user(url: str, user: str) -> str:
    """The same server URL connecting as ``user`` (no password: the local server trusts local sockets)."""
    return re.sub(r"^postgresql://[^@/]*@", f"postgresql://{user}@", url, count=1)


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at database ``name``."""
    return re.sub(r"^(postgresql://[^/]*/)[^?]*", lambda m: m.group(1) + name, url, count=1)


def create_database(admin_url: str, name: str | None = None) -> str:
    name = name or f"zsync_{uuid.uuid4().hex[:12]}"
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"bad database name {name!r}")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    return with_database(admin_url, name)


FUNCTION_ROLE = "zsync_fn"


def function_role_url(url: str) -> str:
    """``url`` as the functions' least-privileged LOGIN role (a member of zsync_sync, see the roles
    migration), created if missing. The local server trusts local connections, so no password."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'zsync_fn') THEN "
            "CREATE ROLE zsync_fn LOGIN IN ROLE zsync_sync; END IF; END $$"
        )
    return with_user(url, FUNCTION_ROLE)


VAULT_SQL_PATH = Path(__file__).with_name("vault.sql")
SUPABASE_ROLES_SQL_PATH = Path(__file__).with_name("supabase_roles.sql")


def apply_supabase_roles_sql(url: str) -> None:
    """Apply infra/local/supabase_roles.sql: Supabase's API roles (anon, authenticated, service_role, ...) and
    their default grants in schema public (idempotent). LOCAL ONLY."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SUPABASE_ROLES_SQL_PATH.read_text(encoding="utf-8"))  # type: ignore[arg-type]  # a trusted file


def apply_vault_sql(url: str) -> None:
    """Apply infra/local/vault.sql, the Supabase Vault stand-in (idempotent). LOCAL ONLY."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(VAULT_SQL_PATH.read_text(encoding="utf-8"))  # type: ignore[arg-type]  # a trusted file


def prepare_database(url: str, migrations_dir: Path = MIGRATIONS_DIR) -> list[str]:
    """Make ``url`` look like a Supabase database with our schema. Idempotent. -> migrations applied."""
    ensure_utc_database(url)
    apply_supabase_roles_sql(url)  # before pg_net (its grants name these roles) and our tables (default grants)
    apply_pg_net_sql(url)
    apply_vault_sql(url)
    return apply_migrations(url, migrations_dir)


def prepare_local_database(url: str, pg_dir: Path) -> None:
    """prepare_database for the stack's own database, which lives on in ``pg_dir`` between runs: a migration
    edited since this database applied it (a checkout of zsync from before the edit) is refused by the migration
    tool, and here the refusal says how to start afresh - this database holds local data only."""
    try:
        prepare_database(url)
    except MigrationError as exc:
        if "changed since they ran" not in str(exc):
            raise
        raise MigrationError(f"{exc}. This local database was built by an older checkout of zsync and holds only "
                             f"the local stack's data: stop the stack, remove {pg_dir} and run `make up` again "
                             "(a real Supabase database needs a new migration instead)") from exc


def pg_tool(name: str) -> Path:
    """A client program of the embedded server (pg_dump, psql, ...)."""
    import pgserver

    return Path(pgserver.__file__).parent / "pginstall" / "bin" / name
