"""``zsync replay`` and ``zsync reconcile``: the repair commands (registered by :mod:`infra.cli`).

Both read the usual ``ZSYNC_*`` settings; whatever is not set there is taken from the running local stack's
``.local/stack.json`` (``make up``), so locally they need no configuration at all.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.platform.settings import Settings

REPO = Path(__file__).resolve().parent.parent
STACK_FILE = REPO / ".local" / "stack.json"
REJECTED_FILE = Path(".zsync") / "replay-rejected.jsonl"
console = Console()
err = Console(stderr=True)

# stack.json key -> Settings field
_FROM_STACK = {
    "database_url": "database_url",
    "zapier_base_url": "zapier_base_url",
    "zapier_client_id": "zapier_client_id",
    "zapier_client_secret": "zapier_client_secret",
    "zapier_token_url": "zapier_token_url",
    "table_ids": "table_ids",
    "dlq_url": "dlq_url",
    "aws_endpoint_url": "aws_endpoint_url",
}


def load_settings(stack_file: Path | None = None) -> Settings:
    """``ZSYNC_*`` environment first; settings it lacks come from the local stack's stack.json, if any."""
    overrides: dict[str, Any] = {}
    path = stack_file or STACK_FILE
    if path.exists():
        info = json.loads(path.read_text())
        for key, name in _FROM_STACK.items():
            if info.get(key) and f"ZSYNC_{name.upper()}" not in os.environ:
                overrides[name] = info[key]
    return Settings(**overrides)


STACK_HELP = f"Local stack info for settings not in the environment (default {STACK_FILE})."


_SHORT = {"skipped_stale": "stale", "duplicates": "dupes"}


def replay_table(report: Any) -> Table:
    from infra.replay import COLUMNS

    title = "zsync replay (dry run: nothing applied or deleted)" if report.dry_run else "zsync replay"
    table = Table(title=title)
    table.add_column("function", overflow="fold")
    for column in COLUMNS:
        header = _SHORT.get(column, column)
        table.add_column(header, justify="right", min_width=len(header))
    for function, row in sorted(report.counts.items()):
        table.add_row(function, *(str(row[c]) for c in COLUMNS))
    table.add_row("[bold]total[/]", *(f"[bold]{report.total(c)}[/]" for c in COLUMNS))
    return table


def replay_command(
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what is queued (one line per delivery); "
                                 "apply and delete nothing."),
    max_messages: int = typer.Option(None, "--max", min=1, help="Take at most N messages this run."),
    rejected_file: Path = typer.Option(REJECTED_FILE, help="Where rejected deliveries are kept (JSON lines)."),
    visibility_timeout: int = typer.Option(300, help="Seconds a taken message stays hidden from other readers."),
    stack_file: Path = typer.Option(None, "--stack-file", help=STACK_HELP),
) -> None:
    """Re-run the deliveries in the dead-letter queue (ZSYNC_DLQ_URL) through the functions' own code.

    Safe to run at any time and repeatedly: the sync is idempotent, so a delivery that was since applied,
    or that is older than what is stored, changes nothing. A message is deleted once its delivery was
    applied, found unchanged, skipped as stale or ignored. A delivery that is invalid (rejected) cannot
    succeed by replaying: it gets a sync_failed audit entry, is appended whole to --rejected-file and is
    deleted; fix it at its source (or fix the line and POST it to the function). Deliveries whose
    dependency (Supabase or Zapier Tables) is still down are left in the queue, one message per delivery.

    Exits 1 if anything was left in the queue, 2 if the queue is not configured or unreachable.
    """
    from infra.replay import replay
    from shared.adapters.dead_letter import DeadLetterError

    settings = load_settings(stack_file)
    try:
        report = replay(settings, max_messages=max_messages, dry_run=dry_run, rejected_file=rejected_file,
                        visibility_timeout_s=visibility_timeout)
    except DeadLetterError as exc:  # one line naming what to check, as every CLI connection error
        err.print(f"[red]Dead-letter queue: {exc}: check ZSYNC_DLQ_URL, ZSYNC_AWS_ENDPOINT_URL (moto locally) and the "
                  "AWS credentials[/]", soft_wrap=True)
        raise typer.Exit(2) from None
    if dry_run:
        inv = Table(title="queued deliveries")
        for column in ("function", "record id", "copies", "attempts", "first seen", "error"):
            inv.add_column(column)
        for item in report.inventory:
            inv.add_row(item["function"], str(item["record_id"]), str(item["copies"]), str(item["attempts"]),
                        item["first_seen"], item["error"][:80])
        console.print(inv)
    console.print(replay_table(report))
    for item in report.rejected:
        problems = "; ".join(f"{p['field']}: {p['problem']}" for p in item["problems"])
        err.print(f"[yellow]rejected[/] {item['function']} {item['record_id']}: {problems}")
    if report.rejected:
        err.print(f"rejected deliveries kept in {rejected_file}")
    for item in report.left:
        err.print(f"[red]left[/] {item['function']} {item.get('record_id') or item.get('message_id')}: "
                  f"{item['reason']}")
    if report.stopped:
        err.print(f"[red]stopped early: {report.stopped}[/]")
    if report.remaining is not None:
        console.print(f"messages in the queue now: ~{report.remaining}")
    raise typer.Exit(0 if dry_run or report.ok else 1)


RECONCILE_COLUMNS = ("compared", "in_sync", "missing_in_supabase", "missing_in_tables", "stale_in_supabase",
                     "stale_in_tables", "repaired", "unresolved", "invalid_in_tables", "duplicates_in_tables")


def reconcile_table(result: Any) -> Table:
    """One row per measure, one column per table (fits a narrow terminal)."""
    title = "zsync reconcile (dry run: nothing repaired)" if result.dry_run else "zsync reconcile"
    if result.since:
        title += f" since {result.since.isoformat()}"
    table = Table(title=title)
    table.add_column("")
    for name in result.tables:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right", style="bold")
    for column in RECONCILE_COLUMNS:
        table.add_row(column.replace("_", " "), *(str(getattr(r, column)) for r in result.tables.values()),
                      str(result.total(column)))
    return table


def _since(value: str | None) -> datetime | None:
    if not value:
        return None
    from shared.core.mapping import normalize_timestamp

    try:
        return normalize_timestamp(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None


def reconcile_command(
    table: list[str] = typer.Option(None, "--table", "-t", help="Only this table (repeatable). Default: all four."),
    since: str = typer.Option(None, help="Only records changed at or after this ISO-8601 time on either side."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Compare and report only; change nothing."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    stack_file: Path = typer.Option(None, "--stack-file", help=STACK_HELP),
) -> None:
    """Compare Zapier Tables and Supabase record by record and repair drift under last-writer-wins.

    Missing in Supabase or newer in Tables: upserted into Supabase (batched, still conditional). Missing
    in Tables or newer in Supabase: created/updated in Tables (batches of 100). audit_log is one-way
    (Tables -> Supabase). Each repair writes the <table>_synced audit entry with metadata.origin =
    "reconcile". Also the initial backfill of an empty side. Needs ZSYNC_DATABASE_URL, ZSYNC_TABLE_IDS and
    the Zapier client credentials (ZSYNC_ZAPIER_CLIENT_ID and ZSYNC_ZAPIER_CLIENT_SECRET; or a token in
    ZSYNC_TABLES_TOKEN); locally, whatever is unset comes from .local/stack.json.

    Exits 0 when both sides are in sync afterwards (dry run: when there is no drift), 1 otherwise.
    """
    from infra.reconcile import reconcile
    from shared.services.sync import ConfigurationError, SyncContext

    settings = load_settings(stack_file)
    _database_reachable(settings)
    ctx = SyncContext(settings=settings)
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err, transient=True, disable=not progress)
    try:
        with bar:
            result = reconcile(ctx, table or None, since=_since(since), dry_run=dry_run, progress=bar)
    except (ConfigurationError, ValueError) as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    console.print(reconcile_table(result))
    for name, report in result.tables.items():
        for problem in report.errors:
            err.print(f"[red]{name}[/]: {problem}")
    raise typer.Exit(0 if result.in_sync else 1)


def _database_reachable(settings: Settings) -> None:
    """Connect once before starting: an unreachable database is then the CLI's one-line error (naming
    what to check), not a per-table list of failures."""
    import psycopg

    if settings.database_url is not None:
        psycopg.connect(settings.database_url.get_secret_value(), connect_timeout=10).close()


def register(app: typer.Typer) -> None:
    app.command("replay")(replay_command)
    app.command("reconcile")(reconcile_command)
