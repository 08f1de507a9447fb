"""Fold the migration chain into one baseline migration (``zsync squash``).

Supabase CLI's ``migration squash`` is the convention: run the chain on a scratch database and write its
schema-only dump as one file. Our ``zsync migrate`` keeps a checksum per applied file, so the baseline
says which versions it replaces (its first line, ``-- zsync:baseline replaces ...``) and the replaced
files move to ``infra/supabase/history/``: on a database where that chain ran, ``zsync migrate`` applies
whatever of the chain is missing from history and records the baseline without running it; on a new
database it runs the baseline (``shared.adapters.migrations``).

What a dump cannot hold is kept here by hand (``PROLOGUE`` / ``EPILOGUE``): the cluster-wide role, the
grants on schemas we do not own (``net``), default privileges and pg_cron's schedule. The dump's objects
are grouped by concern (``SECTIONS``), so a reader finds each in one place, and each function keeps the
comment that stood above its latest definition in the chain. An object no section claims stops the squash:
classify it in ``SECTIONS``. ``tests/test_migrations.py`` proves that a database migrated through the chain
and one migrated from the baseline have the same schema, grants and roles.

    zsync squash            # writes infra/supabase/migrations/<last version>_zsync_baseline.sql and
                            # moves the chain it replaces to infra/supabase/history/
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from shared.adapters.migrations import BASELINE_MARK, HISTORY_DIR, MIGRATIONS_DIR, Migration, discover

# (title, what it holds, pattern on the owning object's name). First match wins; order is file order, so a
# section only uses what an earlier section (or itself) defines.
SECTIONS: list[tuple[str, str, str]] = [
    ("Bookkeeping", "the zsync schema and zsync.schema_migrations: created by `zsync migrate` itself before "
     "any migration runs (shared/adapters/migrations.py)", r"zsync|schema_migrations"),
    ("The synced tables", "the four tables the sync keeps equal on both sides, their checks and row security",
     r"agent_jobs|agent_decisions|audit_log|rate_limits"),
    ("Versions and the conflict rule", "a row's version (updated_at, content hash), its canonical form, the "
     "comparison both directions use, and updated_at kept current for writers that forget it",
     r"canonical_json|canonical_row|content_hash|version_\w+|maintain_updated_at|zsync_maintain_updated_at|"
     r"config\w*|max_future_skew|set_max_future_skew"),
    ("Deletes", "tombstones, deletes made in Zapier Tables and the trash check's watermarks",
     r"tombstones?\w*|track_tombstone|zsync_tombstone|tombstone_of|expire_tombstones|apply_tables_delete|trash_\w+|"
     r"sync_trashed\w*|note_sync_trashed"),
    ("Applying changes", "the atomic last-writer-wins upsert, one row and many, and enabling a table",
     r"sync_apply\w*|sync_upsert\w*|enable_sync"),
    ("Audit", "the append-only audit log's writers and guards",
     r"append_audit\w*|reject_audit_change|zsync_audit_log_\w+"),
    ("Outbox and delivery", "every change captured in the same transaction, claimed, acknowledged, swept "
     "and announced to the *_to_tables functions through Database Webhooks",
     r"outbox\w*|capture_change|claim_outbox\w*|ack_outbox\w*|record_outbox_batch|requeue|sweep_outbox|"
     r"sweeper_runs\w*|announce|wake|webhook_\w+|endpoint_headers|zsync_outbox_\w+"),
    ("Metrics and alerts", "what status, monitor and the alert check read",
     r"sync_health|sync_events|sync_metrics_\w+|alert_state\w*|transition_alerts"),
]
GRANTS_TITLE = "Roles and grants"

PROLOGUE = """\
SET LOCAL check_function_bodies = false;  -- bodies refer to objects defined further down

-- The functions' role (cluster-wide; idempotent, and safe when two databases of one cluster migrate at once).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'zsync_sync') THEN
        CREATE ROLE zsync_sync NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;
"""

GRANTS_EXTRA = """\
-- The API roles (Supabase's anon, authenticated, service_role) get the synced tables through Supabase's default
-- privileges in schema public, not from here; RLS (above) gives anon and authenticated no row, and what RLS does
-- not govern is taken back from them. Where those roles do not exist (a plain Postgres) nothing is granted.
DO $$
DECLARE
    t text;
    api text;
BEGIN
    FOREACH t IN ARRAY ARRAY['agent_jobs', 'agent_decisions', 'audit_log', 'rate_limits'] LOOP
        FOREACH api IN ARRAY ARRAY['anon', 'authenticated'] LOOP
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = api) THEN
                EXECUTE format('REVOKE TRUNCATE, TRIGGER, REFERENCES ON public.%I FROM %I', t, api);
            END IF;
        END LOOP;
    END LOOP;
END
$$;

-- No role that merely inherits PUBLIC creates objects in public; nothing in zsync is callable by PUBLIC.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO zsync_sync;
ALTER DEFAULT PRIVILEGES IN SCHEMA zsync REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'net') THEN
        GRANT USAGE ON SCHEMA net TO zsync_sync;
    END IF;
END
$$;
"""

EPILOGUE = """\
-- Settings the database's own checks read (zsync migrate writes ZSYNC_MAX_FUTURE_SKEW_S over this default).
INSERT INTO zsync.config (key, value) VALUES ('max_future_skew_s', '300') ON CONFLICT (key) DO NOTHING;

-- Schedule: Supabase ships pg_cron; enable it here and sweep the outbox every 30 seconds. Where pg_cron is
-- not available (the local embedded Postgres) the local stack runs the sweep itself.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron')
       AND EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_cron') THEN
        BEGIN
            CREATE EXTENSION pg_cron;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'zsync: could not enable pg_cron (%); enable it in the dashboard '
                          '(Database > Extensions)', SQLERRM;
        END;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
        PERFORM cron.schedule('zsync-sweep-outbox', '30 seconds', 'SELECT zsync.sweep_outbox()');
        -- tombstones past their retention, once both sides agree (zsync.expire_tombstones)
        PERFORM cron.schedule('zsync-expire-tombstones', '17 * * * *', 'SELECT zsync.expire_tombstones()');
    END IF;
END
$$;
"""

BOOTSTRAPPED = {"zsync", "schema_migrations"}
API_ROLES = ("anon", "authenticated", "service_role")  # Supabase's: their grants come from default privileges
SYNCED_TABLES = ("agent_jobs", "agent_decisions", "audit_log", "rate_limits")
_HEADER = re.compile(r"^-- Name: (?P<name>.+?); Type: (?P<type>[A-Z ]+); Schema: (?P<schema>\S+); Owner: .*$")
_SESSION_SETTINGS = re.compile(r"^(SET |SELECT pg_catalog\.set_config)")


class SquashError(RuntimeError):
    pass


@dataclass(frozen=True)
class Entry:
    """One object of a pg_dump: its header fields and its SQL."""

    name: str
    type: str
    schema: str
    sql: str

    @property
    def owner_name(self) -> str:
        """The object the entry belongs to: a constraint's or trigger's table, an ACL's object, an index's
        table (read from its statement), a function without its argument list."""
        name = self.name
        if self.type == "ACL":
            name = name.split(" ", 1)[-1]
        elif self.type == "INDEX":
            found = re.search(r" ON (?:ONLY )?\w+\.(\w+)", self.sql)
            name = found.group(1) if found else name
        elif self.type in {"TRIGGER", "CONSTRAINT", "CHECK CONSTRAINT", "FK CONSTRAINT", "POLICY", "DEFAULT",
                           "ROW SECURITY"}:
            table, _, own = name.partition(" ")
            # triggers and policies are classified by their own name (a trigger serves a concern, not a table)
            name = own if self.type == "TRIGGER" and own.startswith("zsync_") else table
        return name.split("(", 1)[0]


def parse_dump(text: str) -> list[Entry]:
    """Split pg_dump's plain output at its ``-- Name: ...`` headers (session settings dropped)."""
    entries: list[Entry] = []
    current: dict[str, str] | None = None
    body: list[str] = []

    def close() -> None:
        if current is not None:
            sql = "\n".join(line for line in body if not line.startswith("--")).strip()
            if sql:
                entries.append(Entry(current["name"], current["type"], current["schema"], sql))

    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            close()
            current, body = header.groupdict(), []
        elif current is not None and not _SESSION_SETTINGS.match(line):
            body.append(line)
    close()
    return entries


def section_of(entry: Entry) -> str:
    if entry.type == "ACL":
        return GRANTS_TITLE
    name = entry.owner_name
    for title, _, pattern in SECTIONS:
        if re.fullmatch(pattern, name):
            return title
    raise SquashError(f"{entry.type} {entry.name!r} belongs to no section: classify it in infra/squash.py SECTIONS")


def _function_comments(chain: Iterable[Migration]) -> dict[str, str]:
    """Each zsync function's comment block, from the latest migration of the chain that (re)defines it."""
    comments: dict[str, str] = {}
    define = re.compile(r"^CREATE (?:OR REPLACE )?FUNCTION zsync\.(\w+)\s*\(", re.IGNORECASE)
    for migration in chain:
        lines = migration.sql.splitlines()
        for i, line in enumerate(lines):
            found = define.match(line)
            if not found:
                continue
            j = i
            while j > 0 and lines[j - 1].startswith("--"):
                j -= 1
            comments[found.group(1)] = "\n".join(lines[j:i])
    return comments


def render(entries: list[Entry], chain: list[Migration]) -> str:
    """The baseline's text: header, prologue, one section per concern, grants, schedule."""
    comments = _function_comments(chain)
    grouped: dict[str, list[str]] = {title: [] for title, _, _ in SECTIONS}
    grouped[GRANTS_TITLE] = []
    order = {"SCHEMA": 0, "TABLE": 1, "SEQUENCE": 1, "SEQUENCE OWNED BY": 2, "DEFAULT": 2, "CONSTRAINT": 3,
             "CHECK CONSTRAINT": 3, "FK CONSTRAINT": 4, "INDEX": 4, "FUNCTION": 5, "VIEW": 6, "ROW SECURITY": 7,
             "POLICY": 7, "TRIGGER": 8, "COMMENT": 9, "ACL": 10}
    for entry in sorted(entries, key=lambda e: order.get(e.type, 9)):
        if entry.type not in order:
            raise SquashError(f"{entry.type} {entry.name!r}: a kind of object infra/squash.py does not place")
        if entry.type != "ACL" and entry.owner_name in BOOTSTRAPPED:
            continue  # shared.adapters.migrations creates them before the first migration
        text = entry.sql
        if entry.type == "ACL":
            text = "\n".join(line for line in text.splitlines()
                              if not re.fullmatch(rf"GRANT .* TO ({'|'.join(API_ROLES)});", line))
            if not text:
                continue
        if entry.type == "FUNCTION" and comments.get(entry.owner_name):
            text = comments[entry.owner_name] + "\n" + text
        grouped[section_of(entry)].append(text)

    # an earlier baseline in the chain stands for its own chain too: a database may have run either
    versions = " ".join(sorted({v for m in chain for v in (*m.replaces, m.version)}))
    out = [
        f"{BASELINE_MARK} {versions}",
        "-- zsync baseline: the schema the migration chain above built, one definition per object, grouped",
        "-- by concern (written by `zsync squash` from a schema-only dump of the chain; the chain itself is in",
        "-- infra/supabase/history/). Later changes are new migrations again.",
        "--",
    ]
    titles = [title for title, _, _ in SECTIONS] + [GRANTS_TITLE, "Schedule"]
    out += [f"-- {i}. {title}" for i, title in enumerate(titles, 1)]
    out += ["", PROLOGUE]
    descriptions = {title: what for title, what, _ in SECTIONS}
    descriptions[GRANTS_TITLE] = "who may read, write and call what; nothing for PUBLIC, anon or authenticated"
    for i, title in enumerate(titles[:-1], 1):
        rule = "-" * (100 - len(title) - len(str(i)) - 6)
        out += [f"-- {i}. {title} {rule}", f"-- {descriptions[title]}", ""]
        if title == GRANTS_TITLE:
            out += [GRANTS_EXTRA]
        out += [text + "\n" for text in grouped[title]]
    out += [f"-- {len(titles)}. Schedule " + "-" * 86, EPILOGUE]
    return "\n".join(out)


def dump_schema(database_url: str, pg_dump: Path, run_as: str | None = None) -> str:
    """Schema-only dump of schema zsync and the synced tables (their triggers, checks, policies, grants)."""
    args = [str(pg_dump), "--schema-only", "--no-owner", "--no-comments", "-d", database_url]
    parts = []
    for selection in (["-n", "zsync"], [a for t in SYNCED_TABLES for a in ("-t", f"public.{t}")]):
        done = subprocess.run(args + selection, capture_output=True, text=True, user=run_as, check=False)
        if done.returncode:
            raise SquashError(f"pg_dump failed: {done.stderr.strip()}")
        parts.append(done.stdout)
    return "\n".join(parts)


def squash(migrations_dir: Path = MIGRATIONS_DIR, history_dir: Path = HISTORY_DIR) -> Path:
    """Write the baseline of every migration in ``migrations_dir`` and move them into ``history_dir``."""
    from infra.local.postgres import create_database, pg_tool, prepare_database, start_postgres

    chain = discover(migrations_dir)
    if not chain:
        raise SquashError(f"no migrations in {migrations_dir}")
    with tempfile.TemporaryDirectory(prefix="zsync-squash-", dir="/tmp") as scratch:
        server = start_postgres(Path(scratch) / "pg")
        try:
            url = create_database(server.get_uri(), "squash")
            prepare_database(url, migrations_dir=migrations_dir)
            text = dump_schema(url, pg_tool("pg_dump"), server.system_user)
        finally:
            server.cleanup()
    baseline = render(parse_dump(text), chain)
    # A version of its own, after the chain's: the chain's last file keeps its checksum where it ran.
    version = max(datetime.now(UTC).strftime("%Y%m%d%H%M%S"), str(int(chain[-1].version) + 1))
    target = migrations_dir / f"{version}_zsync_baseline.sql"
    history_dir.mkdir(parents=True, exist_ok=True)
    for migration in chain:
        migration.path.rename(history_dir / migration.path.name)
    target.write_text(baseline, encoding="utf-8")
    return target
