"""``zsync``: the command line for running, deploying and repairing the sync.

Run ``zsync --help`` or ``zsync COMMAND --help``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Keep Zapier Tables and Supabase in sync: local stack, migrations, deploy, wiring, repair.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",  # reflow docstring paragraphs to the terminal width
    pretty_exceptions_show_locals=False,  # a traceback must never print a local holding a URL or secret
)
console = Console()
err = Console(stderr=True)
REPO = Path(__file__).resolve().parent.parent
STATE = REPO / ".local"


def _one_line(message: str) -> None:
    """An error for the user as one line on stderr (never wrapped at the terminal width, no traceback)."""
    sys.stderr.write("zsync: " + " ".join(message.split()) + "\n")


_DB_CHECK = ("check --database-url / ZSYNC_DATABASE_URL and that the database is running "
             "(the local stack: `make up`, its URL is in .local/stack.json)")
_DB_FORMAT = "expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE"


def _redact(text: str) -> str:
    """A URL's password as ***, the text on one line."""
    return " ".join(re.sub(r"(://[^:/@\s]*:)[^@\s]+@", r"\1***@", text).split())


def connection_error_message(exc: BaseException) -> str | None:
    """One line for an error about a connection (database, HTTP service, AWS) naming what to check, or
    None for any other error. Looks through the exception's causes (psycopg under a pool timeout...)."""
    import psycopg
    import requests
    import urllib3

    from shared.adapters.supabase_db import DatabaseUnavailable
    from shared.adapters.zapier_errors import TablesUnavailable

    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in seen:
        first = _redact(str(e).splitlines()[0] if str(e).strip() else type(e).__name__)
        if isinstance(e, psycopg.ProgrammingError) and _is_conninfo_error(str(e)):
            return f"the database URL is malformed ({first}): {_DB_FORMAT}; check --database-url / ZSYNC_DATABASE_URL"
        if isinstance(e, psycopg.OperationalError | DatabaseUnavailable):
            return f"cannot connect to the database ({first}): {_DB_CHECK}"
        http = (TablesUnavailable, requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError)
        if isinstance(e, http):
            return (f"cannot reach a service over HTTP ({first[:300]}): check the URL (--urls, ZSYNC_ZAPIER_BASE_URL) "
                    "and that the service is running")
        if type(e).__name__ in ("EndpointConnectionError", "NoCredentialsError", "ConnectTimeoutError"):
            return (f"cannot reach AWS ({first}): check ZSYNC_AWS_ENDPOINT_URL / ZSYNC_DLQ_URL and the AWS "
                    "credentials")
    return None


def _is_conninfo_error(text: str) -> bool:
    return any(k in text for k in ("connection info string", "connection option", "URI", "conninfo", "dsn"))


def _database_url(database_url: str | None) -> str:
    import psycopg

    url = database_url or os.environ.get("ZSYNC_DATABASE_URL")
    if not url:
        stack = STATE / "stack.json"
        if stack.exists():
            url = json.loads(stack.read_text())["database_url"]
    if not url:
        _one_line("no database: pass --database-url or set ZSYNC_DATABASE_URL (or run `make up`)")
        raise typer.Exit(2)
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        _one_line(f"the database URL is malformed ({_redact(str(exc))}): {_DB_FORMAT}; "
                  "check --database-url / ZSYNC_DATABASE_URL")
        raise typer.Exit(2) from None
    return url


@app.command()
def up(
    port_base: int = typer.Option(8700, envvar="ZSYNC_PORT_BASE",
                                  help="Tables API on this port, the seven functions on the next ones, moto on "
                                  "+9 (8700-8709). 0 picks free ports. `make up PORT_BASE=N` passes it."),
    state_dir: Path = typer.Option(STATE, help="Where the database, Tables data, logs and stack.json live."),
) -> None:
    """Start the whole local stack and run the sync until Ctrl-C.

    Embedded Postgres (migrated), the local Zapier Tables service, the seven functions on
    functions-framework, the Supabase webhook sender (pg_net stand-in) with the outbox sweeper, and a
    moto server. URLs, token and secret are printed and written to STATE_DIR/stack.json.
    """
    import warnings

    from infra.local.stack import LocalStack, PortsBusy, StackConfig

    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")  # pgserver's platformdirs
    stack = LocalStack(StackConfig(state_dir=state_dir, port_base=port_base))
    state_dir.mkdir(parents=True, exist_ok=True)
    lock_file = (state_dir / "stack.lock").open("a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        pid = lock_file.read().strip() or "?"
        err.print(f"[yellow]The zsync local stack is already running (pid {pid}); its URLs are in "
                  f"{state_dir / 'stack.json'}. Stop it with Ctrl-C in its terminal (or kill {pid}).[/]")
        raise typer.Exit(1) from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(str(os.getpid()))
    lock_file.flush()
    try:
        stack.check_ports()  # before anything starts: a busy port is said at once, not hung on
    except PortsBusy as exc:
        _one_line(str(exc))
        raise typer.Exit(1) from None

    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        with console.status("Starting Postgres, Tables service, functions, webhook sender, moto..."):
            stack.start()
        path = stack.write_info()
        info = stack.info()
        table = Table(title="zsync local stack", show_lines=False)
        table.add_column("part")
        table.add_column("URL")
        for name, url in info["functions"].items():
            table.add_row(name, url)
        table.add_row("Zapier Tables API", info["zapier_base_url"])
        table.add_row("moto (AWS)", info["aws_endpoint_url"] or "-")
        console.print(table)
        console.print(f"Database: {info['database_url']}", soft_wrap=True)  # a long socket path: never cut
        console.print(f"Secret header [bold]{info['secret_header']}[/] and token are in {path}.", soft_wrap=True)
        console.print(f"Per-function logs: {state_dir / 'logs'}/<function>.log  (zsync logs <function>)",
                      soft_wrap=True)
        console.print("[green]Sync running.[/] Ctrl-C to stop.")
        stopped.wait()
    except PortsBusy as exc:  # taken between the check and the start
        _one_line(str(exc))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        pass
    finally:
        console.print("Stopping...")
        stack.stop()
        (state_dir / "stack.json").unlink(missing_ok=True)


@app.command()
def migrate(
    database_url: str = typer.Option(None, help="Postgres URL (default: ZSYNC_DATABASE_URL, then the local stack)."),
    check: bool = typer.Option(False, "--check", help="Only list pending migrations; exit 1 if any."),
) -> None:
    """Apply infra/supabase/migrations to the database (idempotent; safe to run concurrently)."""
    from shared.adapters.migrations import MigrationError, apply_migrations, pending_migrations

    url = _database_url(database_url)
    try:
        if check:
            pending = pending_migrations(url)
            for name in pending:
                console.print(f"pending: {name}")
            console.print("migrations current" if not pending else f"{len(pending)} pending")
            raise typer.Exit(1 if pending else 0)
        applied = apply_migrations(url)
    except MigrationError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    for name in applied:
        console.print(f"applied: {name}")
    console.print("migrations current" if not applied else f"{len(applied)} applied")


@app.command()
def squash(
    migrations_dir: Path = typer.Option(None, help="The migrations to fold (default: infra/supabase/migrations)."),
    history_dir: Path = typer.Option(None, help="Where the folded chain goes (default: infra/supabase/history)."),
) -> None:
    """Fold infra/supabase/migrations into one baseline migration (a developer's step, not a deploy step).

    Runs every migration on a scratch embedded Postgres, writes its schema-only dump grouped by concern as
    infra/supabase/migrations/VERSION_zsync_baseline.sql (first line: the versions it replaces) and moves
    the chain into infra/supabase/history/. `zsync migrate` then records the baseline on databases where the
    chain ran and runs it on new ones. Review the diff, run `make test` (tests/test_migrations.py compares
    the two), commit."""
    from infra.squash import SquashError
    from infra.squash import squash as fold
    from shared.adapters.migrations import HISTORY_DIR, MIGRATIONS_DIR

    try:
        target = fold(migrations_dir or MIGRATIONS_DIR, history_dir or HISTORY_DIR)
    except SquashError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    console.print(f"wrote {target}; the chain it replaces is in {history_dir or HISTORY_DIR}")


@app.command()
def logs(
    function: str = typer.Argument(..., help="Function name, e.g. agent_jobs_to_supabase."),
    lines: int = typer.Option(50, "-n", help="How many recent lines."),
    state_dir: Path = typer.Option(STATE, help="The local stack's state dir."),
) -> None:
    """Show a local function's recent structured log lines (one JSON object each).

    Deployed: `npx osls logs -f FUNCTION --stage S` (AWS) or Cloud Logging with label function=FUNCTION.
    """
    from shared.core.spec import FUNCTIONS

    if function not in FUNCTIONS:
        err.print(f"[red]Unknown function {function!r}. One of: {', '.join(sorted(FUNCTIONS))}[/]")
        raise typer.Exit(2)
    path = state_dir / "logs" / f"{function}.log"
    if not path.exists():
        err.print(f"[yellow]No log at {path}: is the local stack running (`make up`)?[/]")
        raise typer.Exit(1)
    for line in path.read_text(errors="replace").splitlines()[-lines:]:
        sys.stdout.write(line + "\n")


@app.command()
def monitor(
    database_url: str = typer.Option(None, help="Postgres URL (default: ZSYNC_DATABASE_URL, then the local stack)."),
    window_minutes: int = typer.Option(60, help="How far back to look."),
    slack: bool = typer.Option(True, help="Post alert transitions to ZSYNC_SLACK_WEBHOOK_URL when it is set."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures and alerts as JSON."),
) -> None:
    """Run the scheduled alert check once: the seed's thresholds (failure rate > 5%, average live lag > 30 s,
    conflicts > 10/h) and the backlog ones (outbox rows older than 5 min, any dead letter).

    Posts to Slack once when an alert opens and once when it resolves (state in zsync.alert_state), exactly
    like the deployed `monitor` function. Exits 1 while any alert is open.
    """
    from datetime import timedelta

    from infra import monitor as mon
    from infra.status import dead_letters_text
    from shared.services.alerts import SlackError

    settings, _ = _status_settings(None)  # the local stack's DLQ too, as status and report read it
    try:
        result = mon.run_check(_database_url(database_url), settings, timedelta(minutes=window_minutes),  # type: ignore[arg-type]
                               slack)
    except SlackError as exc:
        err.print(f"[red]Posting to Slack failed:[/] {exc} (the next check posts again)")
        raise typer.Exit(2) from None
    health = result.health
    if as_json:
        sys.stdout.write(json.dumps({"firing": sorted(result.firing), "alerts": result.firing,
                                     "posted": result.posted, "health": health.as_dict()}, default=str) + "\n")
        raise typer.Exit(1 if result.firing else 0)
    table = Table(title=f"zsync health, last {window_minutes} min")
    table.add_column("metric")
    table.add_column("value", justify="right")
    lag = "-" if health.live_lag_avg_s is None else f"{health.live_lag_avg_s:.2f} s ({health.live_lag_n})"
    table.add_row("avg live lag", lag)
    table.add_row("applied", str(health.applied))
    table.add_row("failed", f"{health.failed} ({health.failure_rate:.1%})")
    table.add_row("conflicts (stale skipped)", f"{health.conflicts} ({health.conflicts_per_hour:.1f}/h)")
    table.add_row("repairs (replay/reconcile)", str(health.repairs))
    table.add_row("outbox pending / > 5 min", f"{health.outbox_pending} / {health.outbox_older_than_5m}")
    table.add_row("dead letters", dead_letters_text(health.dead_letters, None))
    console.print(table)
    for alert in result.firing.values():
        err.print(f"[red]ALERT[/] {alert}")
    for alert, transition in result.posted:
        console.print(f"posted to Slack: {alert} {transition}")
    raise typer.Exit(1 if result.firing else 0)


def _inbox_stage(settings: Any, urls_file: Path | None) -> str | None:
    """The stage whose trigger inboxes status reports: the urls file's, else ZSYNC_STAGE (the local stack's
    stack.json sets it); None when no Zapier credentials are configured (nothing to ask)."""
    from infra.inbox_status import zapier_configured

    if not zapier_configured(settings):
        return None
    if urls_file is not None:
        with contextlib.suppress(OSError, ValueError):
            stage = json.loads(urls_file.read_text()).get("stage")
            if isinstance(stage, str):
                return stage
    return settings.stage


def _status_settings(urls_file: Path | None) -> tuple[object, dict[str, str] | None]:
    """Settings for status/report/monitor plus the function URLs to ping: --urls, else the local stack's
    stack.json (whose secret, DLQ and moto endpoint fill in what the environment does not set)."""
    from infra.deploy import DeployError, load_urls, with_local_stack
    from shared.platform.settings import get_settings

    path = urls_file or (STATE / "stack.json" if (STATE / "stack.json").exists() else None)
    if path is None:
        return get_settings(), None
    try:
        urls = load_urls(path)
    except DeployError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    return with_local_stack(get_settings(), path), urls


@app.command()
def status(
    since: str = typer.Option("1h", help="Window: 90s, 30m, 1h, 2d."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts) instead of tables."),
    database_url: str = typer.Option(None, help="Postgres URL as the owner (default: ZSYNC_DATABASE_URL, then "
                                     "the local stack)."),
    urls: Path = typer.Option(None, "--urls", help="Function URLs to ping (.zsync/urls.STAGE.json; default: the "
                              "local stack's stack.json when it runs)."),
    zaps: bool = typer.Option(False, "--zaps", help="Wired with Zaps: no trigger inboxes to report."),
) -> None:
    """Health per table and direction: outcomes, conflicts, live lag p50/p95/max, repairs; the outbox
    backlog, each trigger inbox's backlog (pending messages, oldest age), the dead-letter queue depth and
    each function's reachability (signed ping). Red where a threshold is crossed; exits 1 then."""
    from infra import status as st

    try:
        window = st.parse_duration(since)
    except ValueError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    settings, function_urls = _status_settings(urls)
    data = st.collect(_database_url(database_url), window, settings, function_urls,  # type: ignore[arg-type]
                      inbox_stage=None if zaps else _inbox_stage(settings, urls))
    bad = (any(r["breaches"] for r in data["functions"]) or data["outbox_alert"] or bool(data["dead_letters"])
           or any(not r["reachable"] for r in data["reachability"]) or data["inbox_alert"])
    if as_json:
        sys.stdout.write(json.dumps(data, default=str) + "\n")
    else:
        st.render(console, data, since)
    raise typer.Exit(1 if bad else 0)


@app.command()
def report(
    since: str = typer.Option("24h", help="Window: 30m, 24h, 7d."),
    out: Path = typer.Option(REPO / ".zsync" / "report.html", "--out",
                             help="The HTML file to write (default under .zsync/, which git ignores)."),
    database_url: str = typer.Option(None, help="Postgres URL as the owner (default: ZSYNC_DATABASE_URL, then "
                                     "the local stack)."),
) -> None:
    """Write one self-contained HTML report: lag over time per table and direction (plot), outcome counts
    and conflicts, the latest failures with their problems, backlog figures. Opens without network."""
    from infra import report as rp
    from infra import status as st

    try:
        window = st.parse_duration(since)
    except ValueError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    settings, _ = _status_settings(None)
    data = rp.collect(_database_url(database_url), window, settings)  # type: ignore[arg-type]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(rp.render_html(data), encoding="utf-8")
    points = sum(len(s["t"]) for s in data["series"].values())
    console.print(f"wrote {out} ({len(data['series'])} lag series, {points} points, "
                  f"{len(data['failures'])} failures)")


def _register_subsystems() -> None:
    """Commands that live with their subsystem: deploy/wire/doctor/gcloud, replay/reconcile."""
    from infra.deploy.cli import register as register_deploy
    from infra.repair_cli import register as register_repair

    register_deploy(app)
    register_repair(app)


_register_subsystems()


def main() -> None:
    """The ``zsync`` entry point: an error about a connection is one line naming what to check (exit 1),
    not a traceback."""
    try:
        app()
    except Exception as exc:
        message = connection_error_message(exc)
        if message is None:
            raise
        _one_line(message)
        sys.exit(1)


if __name__ == "__main__":
    main()
