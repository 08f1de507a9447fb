"""Apply ``infra/supabase/migrations/*.sql`` (Supabase CLI naming: ``<timestamp>_<name>.sql``) in order.

Idempotent and safe to run concurrently, also through Supabase's transaction pooler (port 6543): each file
runs in its own transaction, which first takes a *transaction-level* advisory lock (released with that
transaction, on the backend that holds it - a session lock could be taken on one pooled backend and
"released" on another) and re-reads what is applied; it is recorded in ``zsync.schema_migrations`` with
its checksum; a file changed after it was applied is reported, never silently re-run.

A *baseline* (written by ``zsync squash``) folds a chain of migrations into one file whose first line names
the versions it replaces (``-- zsync:baseline replaces V1 V2 ...``); the chain itself moves to
``infra/supabase/history/``. A new database runs the baseline. A database where (part of) that chain ran
gets the rest of the chain from history, then the baseline is recorded as applied without running it, so
what it already holds is never re-created.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "infra" / "supabase" / "migrations"
HISTORY_DIR = MIGRATIONS_DIR.parent / "history"
BASELINE_MARK = "-- zsync:baseline replaces"
_NAME = re.compile(r"^(\d{14})_[a-z0-9_]+\.sql$")
_LOCK_KEY = 0x7A73796E63  # "zsync"

_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS zsync;
CREATE TABLE IF NOT EXISTS zsync.schema_migrations (
    version    text PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    @property
    def replaces(self) -> tuple[str, ...]:
        """The versions a baseline stands for (empty for an ordinary migration)."""
        with self.path.open(encoding="utf-8") as f:
            first = f.readline()
        return tuple(first[len(BASELINE_MARK):].split()) if first.startswith(BASELINE_MARK) else ()


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise MigrationError(f"{path.name}: migration files are named <14-digit timestamp>_<name>.sql")
        found.append(Migration(m.group(1), path.stem, path))
    return found


def _connect(database_url: str) -> psycopg.Connection:
    return psycopg.connect(database_url, autocommit=True, prepare_threshold=None)


def _applied(conn: psycopg.Connection) -> dict[str, str]:
    conn.execute(_BOOTSTRAP)
    return dict(conn.execute("SELECT version, checksum FROM zsync.schema_migrations").fetchall())


def _check_edited(migrations: list[Migration], applied: dict[str, str]) -> None:
    edited = [m.path.name for m in migrations if m.version in applied and applied[m.version] != m.checksum]
    if edited:
        raise MigrationError(
            "already-applied migration(s) changed since they ran: "
            + ", ".join(edited)
            + " - add a new migration instead of editing an applied one"
        )


def pending_on(conn: psycopg.Connection, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Names of the migrations not yet applied, read-only (works for the functions' restricted role).
    Raises MigrationError if an applied one was edited."""
    migrations = discover(directory)
    applied = _recorded(conn)
    _check_edited(migrations, applied)
    return [m.name for m in migrations if m.version not in applied]


def pending_migrations(database_url: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Names of the migrations not yet applied (raises MigrationError if an applied one was edited)."""
    with _connect(database_url) as conn:
        return pending_on(conn, directory)


def apply_migrations(database_url: str, directory: Path = MIGRATIONS_DIR,
                     history: Path = HISTORY_DIR) -> list[str]:
    """Apply every pending migration; returns the names applied (empty when already current). A baseline
    over a chain that ran here finishes that chain from ``history`` and is then recorded, not run."""
    done: list[str] = []
    with _connect(database_url) as conn:
        _apply_chain(conn, discover(directory), history, done)
        _store_settings(conn)
    return done


def _apply_chain(conn: psycopg.Connection, migrations: list[Migration], history: Path, done: list[str]) -> None:
    for m in migrations:
        replaced = m.replaces
        if replaced and set(replaced) & (already := set(_recorded(conn))) and m.version not in already:
            old = [h for h in discover(history) if h.version in replaced]
            missing = sorted(set(replaced) - {h.version for h in old})
            if missing:
                raise MigrationError(f"{m.path.name} replaces {', '.join(missing)}, which {history} lacks")
            _apply_chain(conn, old, history, done)
            if _apply_one(conn, migrations, m, run=False):  # another migrator may have recorded it meanwhile
                done.append(f"{m.name} (recorded: its chain ran here)")
        elif _apply_one(conn, migrations, m, run=True):
            done.append(m.name)


def _recorded(conn: psycopg.Connection) -> dict[str, str]:
    """Applied versions and checksums, read without creating anything (an empty dict on a new database)."""
    if conn.execute("SELECT to_regclass('zsync.schema_migrations')").fetchone()[0] is None:  # type: ignore[index]
        return {}
    return dict(conn.execute("SELECT version, checksum FROM zsync.schema_migrations").fetchall())  # type: ignore[arg-type]


def _apply_one(conn: psycopg.Connection, migrations: list[Migration], m: Migration, *, run: bool) -> bool:
    """Run (or only record) ``m`` in its own transaction under the migration lock. -> was it new?"""
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            applied = _applied(conn)
            _check_edited(migrations, applied)
            if m.version in applied:
                return False
            if run:
                conn.execute(m.sql)
            conn.execute(
                "INSERT INTO zsync.schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (m.version, m.name, m.checksum),
            )
    except psycopg.Error as exc:
        raise MigrationError(f"{m.path.name} failed: {exc}") from exc
    return True


def _store_settings(conn: psycopg.Connection) -> None:
    """Copy the settings the database's own checks read into zsync.config (``ZSYNC_MAX_FUTURE_SKEW_S``: the
    one source of the skew; see migration *_zsync_future_skew.sql). A no-op before that migration."""
    from shared.platform.settings import get_settings

    with conn.transaction():
        if conn.execute("SELECT to_regprocedure('zsync.set_max_future_skew(double precision)')").fetchone()[0]:
            conn.execute("SELECT zsync.set_max_future_skew(%s)", (get_settings().max_future_skew_s,))
