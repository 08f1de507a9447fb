"""The deployment commands of ``zsync``: deploy, wire supabase|zapier, doctor, gcloud.

``infra/cli.py`` calls :func:`register` on the root app.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from infra.deploy import URLS_DIR, DeployError, load_urls, urls_path, write_urls

console = Console()
err = Console(stderr=True)

URLS_HELP = "The urls file written by `zsync deploy` (.zsync/urls.STAGE.json); .local/stack.json works too."
SSM_HELP = "Read the secrets from SSM / Secrets Manager under this prefix (e.g. /zsync/prod/), like the functions do."


def _fail(exc: Exception, code: int = 1) -> typer.Exit:
    err.print(f"[red]{escape(str(exc))}[/]", soft_wrap=True)
    return typer.Exit(code)


def _settings(ssm_prefix: str | None = None, stack_file: Path | None = None):  # -> shared.platform.settings.Settings
    """The ``ZSYNC_*`` environment (after SSM, with --ssm-prefix); then, for what it leaves unset, the local
    stack's stack.json when ``stack_file`` is one; then the table ids `zsync setup zapier` wrote."""
    from infra.deploy import with_local_stack
    from shared.platform.settings import get_settings, reset_settings

    if ssm_prefix:
        from shared.platform.aws_secrets import SecretsUnavailable, load_into_environment

        try:
            load_into_environment(ssm_prefix)
        except SecretsUnavailable as exc:
            raise _fail(exc) from None
    reset_settings()
    settings = with_local_stack(get_settings(), stack_file)
    if not settings.table_ids:  # written by `zsync setup zapier`
        from infra.deploy.tables_setup import read_table_ids

        settings.table_ids = read_table_ids()
    return settings


def _urls(path: Path) -> dict[str, str]:
    try:
        return load_urls(path)
    except DeployError as exc:
        raise _fail(exc, 2) from None


def deploy(
    stage: str = typer.Option(..., "--stage", "-s", help="Deployment stage, e.g. dev or prod."),
    region: str = typer.Option(None, "--region", "-r", help="AWS region (default: AWS_REGION, else us-east-1)."),
    package_only: bool = typer.Option(False, "--package-only", help="Only build the artifact (offline, no AWS)."),
    urls_dir: Path = typer.Option(URLS_DIR, help="Where urls.STAGE.json is written."),
    refresh_secrets: bool = typer.Option(False, "--refresh-secrets",
                                         help="Make every function re-read its secrets (after changing them in SSM)."),
    skip_secret_check: bool = typer.Option(False, "--skip-secret-check",
                                           help="Deploy even if required secrets are missing from SSM."),
) -> None:
    """Deploy the seven functions to AWS Lambda (`npx osls deploy`) and save their URLs.

    Needs Node.js (`npm ci` once) and AWS credentials; the secrets must already be in SSM under
    /zsync/STAGE/ (see the README, section Deploy). Writes .zsync/urls.STAGE.json for `zsync wire` and `zsync doctor`.
    """
    from infra.deploy import aws

    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # Functions cache their secrets per instance; a new value here changes every function's
    # configuration, so Lambda starts fresh instances that read SSM again.
    extra_env = {"ZSYNC_SECRETS_EPOCH": str(int(time.time()))} if refresh_secrets else {}
    try:
        if not package_only and not skip_secret_check:
            aws.check_tooling()
            aws.check_credentials(region)
            missing = aws.missing_secrets(stage, region)
            if missing:
                raise DeployError(
                    f"missing in SSM /zsync/{stage}/: {', '.join(missing)}. Put each one first, e.g.\n"
                    + "\n".join(f"  aws ssm put-parameter --region {region} --type SecureString "
                                 f"--name /zsync/{stage}/{n} --value \"$ZSYNC_{n.upper()}\"" for n in missing)
                )
        aws.run_osls("package" if package_only else "deploy", stage, region, extra_env=extra_env)
        if package_only:
            console.print("[green]Packaged[/] into .serverless/ (nothing deployed).")
            return
        urls = aws.function_urls_from_stack(stage, region)
    except DeployError as exc:
        raise _fail(exc) from None
    path = write_urls(urls_path(stage, urls_dir), urls, stage=stage, region=region, stack=aws.stack_name(stage))
    table = Table(title=f"zsync {stage} ({region})")
    table.add_column("function")
    table.add_column("URL")
    table.add_column("logs")
    for name, url in urls.items():
        table.add_row(name, url, aws.log_group_name(name, stage))
    console.print(table)
    console.print(f"URLs written to [bold]{path}[/]. Next: `zsync wire supabase --urls {path}`.")


wire_app = typer.Typer(help="Point Supabase and Zapier at the deployed function URLs.", no_args_is_help=True)


@wire_app.command("supabase")
def wire_supabase(
    urls: Path = typer.Option(..., "--urls", help=URLS_HELP),
    database_url: str = typer.Option(None, "--database-url", help="Postgres URL (default: ZSYNC_DATABASE_URL)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the SQL (it holds no secret) and change nothing."),
    ssm_prefix: str = typer.Option(None, "--ssm-prefix", help=SSM_HELP),
) -> None:
    """Create or replace the Database Webhook triggers for the *_to_tables functions (one transaction).

    The webhooks are secret-free wake-ups (`?zsync_wake=outbox`): no secret is needed or stored; a Vault
    secret older versions kept is deleted. Idempotent (a re-run reports `unchanged`).
    """
    from infra.deploy import wire

    function_urls = _urls(urls)
    settings = _settings(ssm_prefix)
    try:
        if dry_run:
            typer.echo(wire.render(function_urls, settings), nl=False)
            return
        url = database_url or (settings.database_url.get_secret_value() if settings.database_url else None)
        if not url:
            raise DeployError("no database: pass --database-url or set ZSYNC_DATABASE_URL (the Supabase pooler URL)")
        changes = wire.apply(url, function_urls, settings)
    except DeployError as exc:
        raise _fail(exc) from None
    table = Table(title="Supabase Database Webhooks")
    for col in ("table", "trigger", "URL", "change"):
        table.add_column(col)
    for c in changes:
        table.add_row(c.table, c.trigger, c.url, c.change)
    console.print(table)


@wire_app.command("zapier")
def wire_zapier(
    urls: Path = typer.Option(..., "--urls", help=URLS_HELP),
    stage: str = typer.Option(None, "--stage", "-s", help="Inbox keys are zsync-STAGE-<function> (default: "
                              "the urls file's stage, else ZSYNC_STAGE)."),
    trigger_key: str = typer.Option(None, "--trigger-key", help="The Tables trigger's action key (default: "
                                    "discovered from the app's read actions)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan; change nothing."),
    zaps: bool = typer.Option(False, "--zaps", help="Instead: print the Zaps to click together (the seed's path)."),
    fmt: str = typer.Option("markdown", "--format", "-f", help="--zaps: json or markdown (checklist)."),
    show_secret: bool = typer.Option(False, "--show-secret", help="--zaps: put ZSYNC_WEBHOOK_SECRET in the headers."),
    ssm_prefix: str = typer.Option(None, "--ssm-prefix", help=SSM_HELP),
) -> None:
    """Ensure one Zapier trigger inbox per *_to_supabase function (idempotent), notifying its URL.

    Each inbox (key zsync-STAGE-FUNCTION) subscribes to Zapier Tables' deletes-capable trigger ("a record
    is added, updated, or deleted") of the function's table when the app lists it, else its new-or-updated
    one (the choice and why are printed); Zapier queues the events until the function leases and acks them. Uses
    ZSYNC_ZAPIER_CLIENT_ID / ZSYNC_ZAPIER_CLIENT_SECRET (OAuth, or ZSYNC_TABLES_TOKEN) and ZSYNC_TABLE_IDS.
    With --zaps: the Zap checklist instead.
    """
    if zaps:
        from infra.deploy import zapier_setup

        if fmt not in ("json", "markdown"):
            raise _fail(ValueError("--format must be json or markdown"), 2)
        plan = zapier_setup.plan(_urls(urls), _settings(ssm_prefix), show_secret=show_secret)
        typer.echo(json.dumps(plan, indent=2) if fmt == "json" else zapier_setup.to_markdown(plan))
        return
    from infra.deploy import wire
    from shared.services.inbox_consumer import client_from_settings

    function_urls = _urls(urls)
    settings = _settings(ssm_prefix)
    stage = stage or _urls_stage(urls) or settings.stage
    try:
        client = client_from_settings(settings)
        choice = wire.choose_trigger(client, trigger_key)
        console.print(f"trigger: [bold]{escape(choice.app_key)}[/] / [bold]{escape(choice.action_key)}[/] "
                      f"({escape(choice.why)})", soft_wrap=True)
        changes = wire.inbox_plan(function_urls, settings, stage)
        if not dry_run:
            changes = wire.apply_inboxes(client, changes, choice)
    except (DeployError, ValueError) as exc:
        raise _fail(exc) from None
    except Exception as exc:  # InboxError and friends: say what failed, no trace
        raise _fail(RuntimeError(f"{type(exc).__name__}: {exc}")) from None
    table = Table(title=f"Zapier trigger inboxes ({stage})" + (" - dry run" if dry_run else ""))
    for col in ("function", "inbox key", "table", "notification URL", "change"):
        table.add_column(col)
    for c in changes:
        table.add_row(c.function, c.key, c.table_id, c.notification_url, c.change)
    console.print(table)


def _urls_stage(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    stage = data.get("stage") if isinstance(data, dict) else None
    return stage if isinstance(stage, str) else None


LIVE_HELP = ("Instead: check what zsync assumes about zapier.com (docs/zapier-assumptions.md) against the "
             "account of the Zapier credentials in the settings. Creates a scratch table zsync-doctor-RANDOM "
             "(typed fields like the specs') and scratch trigger inboxes on it, writes, updates and deletes a few "
             "records, sends a short bounded burst of queries (--skip-rate-limit: none), and ALWAYS removes the "
             "table and inboxes afterwards, also after Ctrl-C or a failing check (--keep: leave them). Prints "
             "assumption | observed | ok / different / could not check. Exit 0: every sync-breaking assumption "
             "holds; 1: one differs or could not be checked; 2: no Zapier credentials; 130: interrupted.")


def doctor(
    urls: Path = typer.Option(None, "--urls", help=URLS_HELP + " Required unless --live."),
    timeout: float = typer.Option(20.0, help="Seconds per request (a cold start can take a few)."),
    skip_db: bool = typer.Option(False, "--skip-db", help="Do not check the database."),
    skip_tables: bool = typer.Option(False, "--skip-tables", help="Do not check the Zapier Tables token."),
    zaps: bool = typer.Option(False, "--zaps", help="Wired with Zaps: do not check the trigger inboxes."),
    ssm_prefix: str = typer.Option(None, "--ssm-prefix", help=SSM_HELP),
    live: bool = typer.Option(False, "--live", help=LIVE_HELP),
    keep: bool = typer.Option(False, "--keep", help="--live: leave the scratch table and inboxes (debugging)."),
    skip_rate_limit: bool = typer.Option(False, "--skip-rate-limit",
                                         help="--live: do not send the burst that looks for the rate limit."),
    rate_burst: int = typer.Option(120, "--rate-burst", min=1, max=500,
                                   help="--live: at most this many queries in the burst (it stops at the first 429)."),
    trigger_wait: float = typer.Option(30.0, "--trigger-wait", min=1, max=600,
                                       help="--live: seconds to wait for a change's trigger-inbox message."),
    api_url: str = typer.Option(None, "--api-url", help="--live: the public API's origin (default "
                                "https://api.zapier.com for a zapier.com base URL, else the base URL's origin)."),
) -> None:
    """Check a deployment end to end; exit 1 listing exactly what is wrong. With --live: the assumptions
    about zapier.com instead (see --live).

    Every URL refuses unsigned requests and answers a signed ping, migrations are current, the webhook
    triggers point at the deployed URLs, the Zapier Tables token reads every configured table. With
    --urls .local/stack.json (the local stack) the settings the environment leaves unset come from that file.
    """
    if live:
        from infra.deploy.doctor_live import Options

        options = Options(keep=keep, rate_limit=not skip_rate_limit, rate_burst=rate_burst,
                          trigger_wait_s=trigger_wait, api_url=api_url)
        raise typer.Exit(_doctor_live(_settings(ssm_prefix, urls), options))
    if urls is None:
        raise _fail(ValueError("--urls is required (or --live)"), 2)
    from infra.deploy import doctor as doc

    settings = _settings(ssm_prefix, urls)
    checks = doc.run(_urls(urls), settings, timeout_s=timeout, check_db=not skip_db,
                     check_tables_api=not skip_tables,
                     inbox_stage=None if zaps else (_urls_stage(urls) or settings.stage))
    table = Table(title="zsync doctor")
    for col in ("area", "target", "", "detail"):
        table.add_column(col, overflow="fold")  # at 80 columns an inbox key wraps instead of being cut
    for c in checks:
        table.add_row(c.area, c.target, "[green]ok[/]" if c.ok else "[red]FAIL[/]", escape(c.detail))
    console.print(table)
    failed = [c for c in checks if not c.ok]
    if failed:
        err.print(f"[red]{len(failed)} problem(s):[/]")
        for c in failed:
            err.print(f"  - {c.area} {c.target}: {escape(c.detail)}", soft_wrap=True)
        raise typer.Exit(1)
    console.print("[green]All checks passed.[/]")


def _doctor_live(settings, options) -> int:  # (Settings, doctor_live.Options) -> exit code
    import signal

    from infra.deploy import doctor_live

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)  # a TERM removes the scratch table too
    err.print("zsync doctor --live: a scratch table zsync-doctor-RANDOM is made, checked and removed "
              "(about a minute)...")
    seen: list = []  # every finding as it comes (the cleanup's too, when interrupted)

    def progress(finding) -> None:  # (doctor_live.Finding)
        seen.append(finding)
        err.print(f"[dim]  {finding.status}: {finding.key}[/]")

    try:
        findings = doctor_live.run(settings, options, progress)
    except ValueError as exc:  # no credentials
        err.print(f"[red]{escape(str(exc))}[/]", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        cleanup = next((f for f in reversed(seen) if f.key == "cleanup"), None)
        err.print("[yellow]interrupted; cleanup: "
                  + (escape(cleanup.observed) if cleanup else "did NOT run (delete zsync-doctor-* by hand)") + "[/]",
                  soft_wrap=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    table = Table(title="zsync doctor --live: what zsync assumes about zapier.com")
    for col in ("assumption", "observed", ""):
        table.add_column(col, overflow="fold")
    marks = {doctor_live.OK: "[green]ok[/]", doctor_live.DIFFERENT: "[red]different[/]",
             doctor_live.UNCHECKED: "[yellow]could not check[/]"}
    for f in findings:
        mark = marks[f.status] + (" [bold red](breaks the sync)[/]" if f.fails else "")
        table.add_row(f"{escape(f.assumption)} [dim]({f.key})[/]", escape(f.observed), mark)
    console.print(table)
    failing = [f for f in findings if f.fails]
    if failing:
        err.print(f"[red]{len(failing)} sync-breaking assumption(s) differ or could not be checked:[/] "
                  + ", ".join(f.key for f in failing), soft_wrap=True)
        return 1
    console.print("[green]Every sync-breaking assumption holds[/] (see docs/zapier-assumptions.md for the others).")
    return 0


def gcloud(
    project: str = typer.Option(..., "--project", help="Google Cloud project id."),
    region: str = typer.Option(..., "--region", help="e.g. us-central1"),
    out: Path = typer.Option(None, "--out", help="Write the script here (default: print it)."),
    secret_prefix: str = typer.Option("zsync-", help="Secret Manager ids are PREFIX + setting name with dashes."),
) -> None:
    """Generate the `gcloud functions deploy` commands (gen2) for the same seven functions, as a script."""
    from infra.deploy.gcloud import render_script

    try:
        script = render_script(project, region, _settings(), secret_prefix)
    except DeployError as exc:
        raise _fail(exc) from None
    if out is None:
        typer.echo(script, nl=False)
        return
    out.write_text(script)
    out.chmod(0o755)
    console.print(f"Wrote {out}: run it from the repository root (`bash {out}`).")


setup_app = typer.Typer(help="Create what zsync needs on the other systems.", no_args_is_help=True)


@setup_app.command("zapier")
def setup_zapier(
    ssm_prefix: str | None = typer.Option(None, help="Read secrets from SSM first (e.g. /zsync/prod/)."),
    out: Path = typer.Option(Path(".zsync/zapier_tables.json"), help="Where to write the table ids."),
) -> None:
    """Create the four Zapier tables and their typed fields (idempotent); write the table ids."""
    from infra.deploy.tables_setup import ensure_tables, report, table_ids, write_table_ids
    from shared.adapters.zapier_errors import TablesError, TablesUnavailable
    from shared.adapters.zapier_tables import client_from_settings

    try:
        with client_from_settings(_settings(ssm_prefix)) as client:
            results = ensure_tables(client)
    except TablesUnavailable as exc:  # one line naming what to check, as every CLI connection error
        raise _fail(RuntimeError(f"cannot reach Zapier Tables ({exc}): check ZSYNC_ZAPIER_BASE_URL and "
                                 "ZSYNC_ZAPIER_TOKEN_URL and the network")) from None
    except (TablesError, ValueError) as exc:
        raise _fail(exc) from None
    path = write_table_ids(table_ids(results), out)
    for r in report(results):
        state = "created" if r["created"] else "found"
        added = f", added {', '.join(r['added_fields'])}" if r["added_fields"] else ""
        console.print(f"{r['name']}: {state} {r['table_id']}{added}")
        for problem in r["type_mismatches"]:
            err.print(f"[yellow]{r['name']}.{problem} (not changed: fix it in Zapier Tables)[/]")
    console.print(f"Wrote {path}")
    if any(r["type_mismatches"] for r in report(results)):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add deploy, wire (supabase, zapier), doctor, gcloud and setup to the root ``zsync`` app."""
    app.add_typer(setup_app, name="setup")
    app.command("deploy")(deploy)
    app.add_typer(wire_app, name="wire")
    app.command("doctor")(doctor)
    app.command("gcloud")(gcloud)
