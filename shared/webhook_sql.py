"""Render the SQL that points Supabase Database Webhooks at the deployed ``*_to_tables`` functions.

The triggers are exactly what Supabase's dashboard creates for a Database Webhook: an
``AFTER INSERT OR UPDATE ... FOR EACH ROW`` trigger executing
``supabase_functions.http_request(url, 'POST', headers, params, timeout_ms)``, with our shared secret in
``headers`` (Supabase has no request signing). The same SQL runs against the local pg_net stand-in.

The endpoint is also recorded in ``zsync.webhook_endpoints`` so the outbox sweeper
(``zsync.sweep_outbox()``, see the migrations) can re-send changes that were never acknowledged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from shared.spec import TABLES, WEBHOOK_TABLES

DEFAULT_TIMEOUT_MS = 5000


def trigger_name(table: str) -> str:
    return f"zsync_{table}_webhook"


def _literal(value: str) -> str:
    """A SQL string literal (standard_conforming_strings is on in every supported Postgres)."""
    return "'" + value.replace("'", "''") + "'"


def render_webhook_sql(
    urls: Mapping[str, str],
    secret_header: str,
    secret: str,
    timeout_ms: int = DEFAULT_TIMEOUT_MS,
) -> str:
    """SQL (one transaction) creating or replacing the webhook trigger of every table synced to Tables.

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
    headers = json.dumps({"Content-Type": "application/json", secret_header: secret}, separators=(",", ":"))
    lines = ["BEGIN;"]
    for table in WEBHOOK_TABLES:
        spec = TABLES[table]
        url = urls[table]
        if not url.startswith(("https://", "http://")):
            raise ValueError(f"{table}: URL must start with https:// (got {url!r})")
        name = trigger_name(spec.name)
        lines += [
            f'DROP TRIGGER IF EXISTS "{name}" ON public."{spec.name}";',
            f'CREATE TRIGGER "{name}" AFTER INSERT OR UPDATE OR DELETE ON public."{spec.name}"',
            "  FOR EACH ROW EXECUTE FUNCTION supabase_functions.http_request(",
            f"    {_literal(url)}, 'POST', {_literal(headers)}, '{{}}', '{timeout_ms}');",
            "INSERT INTO zsync.webhook_endpoints (table_name, url, headers, timeout_ms)",
            f"  VALUES ({_literal(spec.name)}, {_literal(url)}, {_literal(headers)}::jsonb, {timeout_ms})",
            "  ON CONFLICT (table_name) DO UPDATE",
            "  SET url = EXCLUDED.url, headers = EXCLUDED.headers, timeout_ms = EXCLUDED.timeout_ms,",
            "      updated_at = now();",
        ]
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


def redact(sql: str, secret: str) -> str:
    """The same SQL with the secret replaced, for --dry-run output and logs."""
    return sql.replace(secret, "<redacted>") if secret else sql
