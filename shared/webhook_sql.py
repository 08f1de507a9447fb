"""Render the SQL that points Supabase Database Webhooks at the deployed ``*_to_tables`` functions.

The triggers are ``AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW`` triggers executing
``zsync.webhook_request()`` (see the migration ``20261129200000_zsync_webhook_vault.sql``): it sends the
Database Webhook's own payload with ``net.http_post`` like Supabase's ``supabase_functions.http_request``,
but the trigger carries no arguments - the URL and timeout are in ``zsync.webhook_endpoints`` and the
shared secret is in Supabase Vault (``vault.secrets``, name :data:`VAULT_SECRET_NAME`), read from
``vault.decrypted_secrets`` inside that SECURITY DEFINER function. ``pg_trigger`` is readable by every
role; the secret is no longer there. The same SQL runs against the local pg_net and Vault stand-ins.

The endpoint row also serves the outbox sweeper (``zsync.sweep_outbox()``), which re-sends changes that
were never acknowledged with the same headers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from shared.spec import TABLES, WEBHOOK_TABLES

DEFAULT_TIMEOUT_MS = 5000
VAULT_SECRET_NAME = "zsync_webhook_secret"
TRIGGER_FUNCTION = "zsync.webhook_request"


def trigger_name(table: str) -> str:
    return f"zsync_{table}_webhook"


def _literal(value: str) -> str:
    """A SQL string literal (standard_conforming_strings is on in every supported Postgres)."""
    return "'" + value.replace("'", "''") + "'"


def render_vault_secret_sql(secret: str, name: str = VAULT_SECRET_NAME) -> list[str]:
    """Create the Vault secret, or update it when it differs (rotation); a no-op when it is current."""
    s, n = _literal(secret), _literal(name)
    return [
        f"SELECT vault.update_secret(d.id, {s}) FROM vault.decrypted_secrets d",
        f"  WHERE d.name = {n} AND d.decrypted_secret IS DISTINCT FROM {s};",
        f"SELECT vault.create_secret({s}, {n}, 'zsync: shared secret of the *_to_tables functions')",
        f"  WHERE NOT EXISTS (SELECT 1 FROM vault.secrets WHERE name = {n});",
    ]


def render_webhook_sql(
    urls: Mapping[str, str],
    secret_header: str,
    secret: str,
    timeout_ms: int = DEFAULT_TIMEOUT_MS,
) -> str:
    """SQL (one transaction) storing the secret in Vault and creating or replacing the webhook trigger of
    every table synced to Tables.

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
    if not secret:
        raise ValueError("the webhook secret is empty")
    headers = json.dumps({"Content-Type": "application/json"}, separators=(",", ":"))
    lines = ["BEGIN;", *render_vault_secret_sql(secret)]
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
            "INSERT INTO zsync.webhook_endpoints (table_name, url, headers, timeout_ms, secret_header, secret_name)",
            f"  VALUES ({_literal(spec.name)}, {_literal(url)}, {_literal(headers)}::jsonb, {timeout_ms},",
            f"          {_literal(secret_header)}, {_literal(VAULT_SECRET_NAME)})",
            "  ON CONFLICT (table_name) DO UPDATE",
            "  SET url = EXCLUDED.url, headers = EXCLUDED.headers, timeout_ms = EXCLUDED.timeout_ms,",
            "      secret_header = EXCLUDED.secret_header, secret_name = EXCLUDED.secret_name, updated_at = now();",
        ]
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


def redact(sql: str, secret: str) -> str:
    """The same SQL with the secret replaced, for --dry-run output and logs."""
    return sql.replace(secret, "<redacted>") if secret else sql
