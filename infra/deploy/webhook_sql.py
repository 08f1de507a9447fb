"""Render the SQL that points Supabase Database Webhooks at the deployed ``*_to_tables`` functions.

The triggers are ``AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW`` triggers executing
``zsync.webhook_request()`` (migration ``20261205100040_zsync_webhook_wakeup.sql``): a wake-up, once per
table per transaction, POSTed to ``<function URL>?zsync_wake=outbox`` with no secret and no row data. The
function then drains its table's outbox (the work queue) and trusts nothing in the request. pg_net's
request queue is readable by every database role, so nothing that authenticates anything is ever put
there; the triggers carry no arguments (``pg_trigger`` is readable by every role too). The URL and
timeout live in ``zsync.webhook_endpoints``, which the outbox sweeper (``zsync.sweep_outbox()``) uses for
its re-sends (wake-ups as well).

Nothing here needs the shared secret: it authenticates only the Tables -> Supabase direction (Zaps) and
the signed calls ``zsync doctor`` makes. Wiring also deletes the Vault secret older versions kept
(``zsync_webhook_secret``), where Vault exists.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from shared.core.spec import TABLES, WEBHOOK_TABLES

DEFAULT_TIMEOUT_MS = 5000
OLD_VAULT_SECRET_NAME = "zsync_webhook_secret"  # kept by `zsync wire supabase` before 20261205100040
TRIGGER_FUNCTION = "zsync.webhook_request"
WAKE_VALUE = "outbox"  # <function URL>?zsync_wake=outbox (shared.edge.handler.WAKE_PARAM)


def trigger_name(table: str) -> str:
    return f"zsync_{table}_webhook"


def _literal(value: str) -> str:
    """A SQL string literal (standard_conforming_strings is on in every supported Postgres)."""
    return "'" + value.replace("'", "''") + "'"


def render_forget_vault_secret_sql(name: str = OLD_VAULT_SECRET_NAME) -> list[str]:
    """Delete the webhook secret an older `zsync wire supabase` kept in Vault (a no-op without Vault)."""
    return [
        "DO $$ BEGIN IF to_regclass('vault.secrets') IS NOT NULL THEN",
        f"  DELETE FROM vault.secrets WHERE name = {_literal(name)};",
        "  END IF;",
        "EXCEPTION WHEN insufficient_privilege THEN",
        f"  RAISE WARNING 'zsync: delete the Vault secret {name} in the dashboard: it is no longer used';",
        "END $$;",
    ]


def render_webhook_sql(urls: Mapping[str, str], timeout_ms: int = DEFAULT_TIMEOUT_MS) -> str:
    """SQL (one transaction) creating or replacing the webhook trigger and endpoint of every table synced to
    Tables.

    ``urls`` maps table name -> function URL (``agent_jobs`` -> URL of ``agent_jobs_to_tables``).
    Idempotent: re-running with the same or new URLs replaces the triggers.
    """
    missing = [t for t in WEBHOOK_TABLES if t not in urls]
    if missing:
        raise ValueError(f"no function URL for table(s): {', '.join(missing)}")
    unknown = [t for t in urls if t not in WEBHOOK_TABLES]
    if unknown:
        raise ValueError(f"not a table synced to Zapier Tables: {', '.join(unknown)}")
    if not 100 <= timeout_ms <= 60_000:
        raise ValueError("timeout_ms must be between 100 and 60000")
    headers = json.dumps({"Content-Type": "application/json"}, separators=(",", ":"))
    lines = ["BEGIN;", *render_forget_vault_secret_sql()]
    for table in WEBHOOK_TABLES:
        spec = TABLES[table]
        url = urls[table]
        if not url.startswith(("https://", "http://")):
            raise ValueError(f"{table}: URL must start with https:// (got {url!r})")
        name = trigger_name(spec.name)
        lines += [
            f'DROP TRIGGER IF EXISTS "{name}" ON public."{spec.name}";',
            f'CREATE TRIGGER "{name}" AFTER INSERT OR UPDATE OR DELETE ON public."{spec.name}"',
            f"  FOR EACH ROW EXECUTE FUNCTION {TRIGGER_FUNCTION}();",
            "INSERT INTO zsync.webhook_endpoints (table_name, url, headers, timeout_ms)",
            f"  VALUES ({_literal(spec.name)}, {_literal(url)}, {_literal(headers)}::jsonb, {timeout_ms})",
            "  ON CONFLICT (table_name) DO UPDATE",
            "  SET url = EXCLUDED.url, headers = EXCLUDED.headers, timeout_ms = EXCLUDED.timeout_ms,",
            "      updated_at = now();",
        ]
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"
