"""``zsync doctor``: check a deployment end to end and say exactly what is wrong.

Per function URL: a POST without the secret must be refused (401) and a signed ping must answer 200
(and report ``migrations_current``); a ``*_to_tables`` function must answer the Database Webhook's
secret-free wake-up (``?zsync_wake=outbox``) with ``drained``. Then: the database is reachable and its
migrations are current, the Supabase webhook triggers point at the deployed ``*_to_tables`` URLs, and
the Zapier Tables token can list one record of every configured table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests

from infra.deploy.webhook_sql import trigger_name
from shared.core.spec import FUNCTIONS, WEBHOOK_TABLES, Direction
from shared.platform.settings import Settings

PING = {"zsync_ping": True}


@dataclass(frozen=True)
class Check:
    area: str
    target: str
    ok: bool
    detail: str


def _post(url: str, headers: Mapping[str, str], timeout_s: float) -> tuple[int | None, Any, str]:
    try:
        response = requests.post(url, json=PING, headers=dict(headers), timeout=timeout_s, allow_redirects=False)
    except requests.RequestException as exc:
        return None, None, f"{type(exc).__name__}: {str(exc)[:160]}"
    try:
        body = response.json()
    except ValueError:
        body = None
    return response.status_code, body, response.text[:160]


def check_function(name: str, url: str, settings: Settings, timeout_s: float = 20.0) -> list[Check]:
    out: list[Check] = []
    status, _, text = _post(url, {}, timeout_s)
    if status == 401:
        out.append(Check("auth", name, True, "unsigned POST refused with 401"))
    elif status is None:
        out.append(Check("auth", name, False, f"unreachable: {text}"))
    else:
        out.append(Check("auth", name, False, f"unsigned POST answered {status} (expected 401): the URL is open"))
    if name in FUNCTIONS and FUNCTIONS[name].direction is Direction.TO_TABLES:
        out.append(_check_wake(name, url, timeout_s))
    secrets = settings.accepted_secrets()
    if not secrets:
        out.append(Check("ping", name, False, "ZSYNC_WEBHOOK_SECRET is not set here: cannot sign the ping"))
        return out
    status, body, text = _post(url, {settings.secret_header: secrets[0]}, timeout_s)
    if status is None:
        out.append(Check("ping", name, False, f"unreachable: {text}"))
    elif status == 401:
        out.append(Check("ping", name, False, "signed ping refused with 401: the deployed secret differs from "
                                              "ZSYNC_WEBHOOK_SECRET here (check SSM /zsync/<stage>/webhook_secret)"))
    elif status != 200 or not isinstance(body, dict) or body.get("outcome") != "ping":
        out.append(Check("ping", name, False, f"signed ping answered {status}: {text}"))
    elif body.get("function") not in (None, name):
        out.append(Check("ping", name, False, f"URL serves {body.get('function')!r}, not {name!r}"))
    elif body.get("migrations_current") is False:
        out.append(Check("ping", name, False, "function reports migrations_current=false: run `zsync migrate`"))
    else:
        current = body.get("migrations_current")
        extra = "migrations current" if current is True else "migrations_current not reported"
        out.append(Check("ping", name, True, f"signed ping 200 ({extra})"))
    return out


def _check_wake(name: str, url: str, timeout_s: float) -> Check:
    """The webhook's path: an unsigned wake-up drains the function's outbox (and can do nothing else)."""
    wake = url + ("&" if "?" in url else "?") + "zsync_wake=outbox"
    status, body, text = _post(wake, {}, timeout_s)
    if status == 200 and isinstance(body, dict) and body.get("outcome") == "drained":
        return Check("wake", name, True, "unsigned wake-up drained the outbox")
    if status == 401:
        return Check("wake", name, False, "wake-up refused with 401: the deployed code predates secret-free "
                                          "webhooks; run `zsync deploy`")
    return Check("wake", name, False, f"wake-up answered {status}: {text}")


SWEEP_MAX_AGE_S = 300  # pg_cron sweeps every 30 s; 5 minutes without one means it is not scheduled
OUTBOX_MAX_AGE_S = 3600  # an unacknowledged change older than this: deliveries are failing


def check_outbox(conn: Any) -> list[Check]:
    """The outbox sweeper ran recently and nothing waits unacknowledged for long (parked changes are
    ``sync_failed`` entries, which the monitor reports)."""
    last = conn.execute("SELECT extract(epoch FROM now() - last_at) FROM zsync.sweeper_runs").fetchone()
    cron = conn.execute("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron')").fetchone()[0]
    hint = "" if cron else " (pg_cron is not enabled: enable it under Database > Extensions, then `zsync migrate`)"
    if last is None:
        out = [Check("database", "outbox sweeper", False, "the sweep has never run" + hint)]
    else:
        age = float(last[0])
        out = [Check("database", "outbox sweeper", age <= SWEEP_MAX_AGE_S,
                     f"last sweep {age:.0f} s ago" + ("" if age <= SWEEP_MAX_AGE_S else hint))]
    old, oldest = conn.execute(
        "SELECT count(*), coalesce(max(extract(epoch FROM now() - created_at)), 0) FROM zsync.outbox "
        "WHERE acked_at IS NULL AND created_at < now() - make_interval(secs => %s)", (OUTBOX_MAX_AGE_S,)).fetchone()
    out.append(Check("database", "outbox backlog", old == 0,
                     "no old unacknowledged changes" if old == 0 else
                     f"{old} change(s) unacknowledged for over {OUTBOX_MAX_AGE_S} s (oldest {float(oldest):.0f} s)"))
    return out


TRASH_MAX_AGE_S = 300  # the trash check runs every minute; 5 minutes without one: the schedule is not running


def check_trash_runs(conn: Any) -> list[Check]:
    """Each table whose Tables deletes are synced had its trash checked recently (zsync.trash_watermarks)."""
    from shared.core.spec import TABLES
    from shared.services.tables_trash import deletes_checked

    ages = dict(conn.execute("SELECT table_name, extract(epoch FROM now() - checked_at) "
                             "FROM zsync.trash_watermarks").fetchall())
    out = []
    for name, spec in TABLES.items():
        if not deletes_checked(spec):
            continue
        age = ages.get(name)
        fn = f"{name}_to_supabase"
        if age is None:
            out.append(Check("database", f"trash check {name}", False,
                             f"never ran: Tables deletes are not applied (schedule {fn} with "
                             '{"zsync": "check_trash"}, see serverless.yml)'))
        else:
            ok = float(age) <= TRASH_MAX_AGE_S
            out.append(Check("database", f"trash check {name}", ok, f"last check {float(age):.0f} s ago" + (
                "" if ok else f": is the schedule of {fn} running?")))
    return out


def check_database(settings: Settings, function_urls: Mapping[str, str]) -> list[Check]:
    import psycopg

    from shared.adapters.migrations import MigrationError, pending_migrations

    if settings.database_url is None:
        return [Check("database", "migrations", False, "ZSYNC_DATABASE_URL is not set here")]
    url = settings.database_url.get_secret_value()
    try:
        pending = pending_migrations(url)
    except psycopg.OperationalError as exc:  # one line naming what to check, as every CLI connection error
        first = " ".join(str(exc).splitlines()[0].split()) if str(exc).strip() else type(exc).__name__
        return [Check("database", "migrations", False, f"cannot connect ({first[:200]}): check ZSYNC_DATABASE_URL "
                                                        "and that the database is running")]
    except (MigrationError, psycopg.Error) as exc:
        return [Check("database", "migrations", False, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")]
    out = [Check("database", "migrations", not pending,
                 "current" if not pending else f"pending: {', '.join(pending)} (run `zsync migrate`)")]
    try:
        with psycopg.connect(url, autocommit=True, prepare_threshold=None, connect_timeout=10) as conn:
            rows = dict(conn.execute(
                "SELECT e.table_name, e.url FROM zsync.webhook_endpoints e WHERE EXISTS ("
                " SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
                " WHERE c.relname = e.table_name AND t.tgname = 'zsync_' || e.table_name || '_webhook')"
            ).fetchall())
            out += check_outbox(conn)
            out += check_trash_runs(conn)
    except psycopg.Error as exc:
        return [*out, Check("database", "webhooks", False, f"{type(exc).__name__}: {str(exc)[:200]}")]
    for table in WEBHOOK_TABLES:
        fn = f"{table}_to_tables"
        expected = function_urls.get(fn)
        got = rows.get(table)
        if got is None:
            out.append(Check("webhook", trigger_name(table), False, "no trigger: run `zsync wire supabase`"))
        elif expected is not None and got != expected:
            out.append(Check("webhook", trigger_name(table), False,
                             f"points at {got}, not {fn} at {expected}: run `zsync wire supabase`"))
        else:
            out.append(Check("webhook", trigger_name(table), True, f"-> {got}"))
    return out


def check_tables(settings: Settings) -> list[Check]:
    """Each table readable, with the spec's fields and field types (``zsync setup zapier`` fixes)."""
    from infra.deploy import tables_setup
    from shared.adapters.zapier_errors import TablesError
    from shared.adapters.zapier_tables import client_from_settings

    try:
        client = client_from_settings(settings)
    except ValueError as exc:
        return [Check("tables", "credentials", False, str(exc))]
    with client:
        try:
            results = tables_setup.check_tables(client, settings.table_ids)
        except TablesError as exc:
            return [Check("tables", "api", False, f"{type(exc).__name__}: {str(exc)[:200]}")]
    out = []
    for r in results:
        problems = ([r.error] if r.error else []) + [f"missing field {m}" for m in r.missing_fields] + r.type_mismatches
        detail = "; ".join(problems) + (" (run `zsync setup zapier`)" if r.missing_fields else "")
        where = f"{r.table_id}: " if r.table_id else ""
        out.append(Check("tables", r.name, r.ok, f"{where}{detail}" if problems else
                         f"{r.table_id}: fields match the spec"))
    return out


def check_inboxes(settings: Settings, function_urls: Mapping[str, str], stage: str) -> list[Check]:
    """Each *_to_supabase function's trigger inbox exists, is active (a paused one is reported with its
    reason), notifies the deployed URL, and is being drained: its pending message count and the oldest
    message's age (older than the outbox's alert age: the function is not draining it)."""
    from infra.deploy.wire import notification_url
    from infra.inbox_status import backlog, describe

    try:
        rows = backlog(settings, stage)
    except Exception as exc:  # no credentials, token endpoint refused them
        return [Check("inbox", "*", False, f"{type(exc).__name__}: {str(exc)[:160]}")]
    checks = []
    for row in rows:
        fn, key = row["function"], row["key"]
        if row["error"]:
            checks.append(Check("inbox", key, False, row["error"]))
        elif row["status"] != "active":
            checks.append(Check("inbox", key, False, describe(row) + "; fix the cause, then resume it"))
        elif fn in function_urls and row["notification_url"] != notification_url(function_urls[fn]):
            checks.append(Check("inbox", key, False, "notifies another URL: run `zsync wire zapier`"))
        elif row["alert"]:
            checks.append(Check("inbox", key, False, describe(row) + ": not being drained (see the function's "
                                "logs and its scheduled drain)"))
        else:
            checks.append(Check("inbox", key, True, "active, " + describe(row)))
    return checks


def run(function_urls: Mapping[str, str], settings: Settings, *, timeout_s: float = 20.0,
        check_db: bool = True, check_tables_api: bool = True, inbox_stage: str | None = None) -> list[Check]:
    jobs: list[Callable[[], list[Check]]] = [
        (lambda n=name, u=url: check_function(n, u, settings, timeout_s)) for name, url in function_urls.items()
    ]
    if check_db:
        jobs.append(lambda: check_database(settings, function_urls))
    if check_tables_api:
        jobs.append(lambda: check_tables(settings))
    if check_tables_api and inbox_stage:
        jobs.append(lambda: check_inboxes(settings, function_urls, inbox_stage))
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda job: job(), jobs))
    return [c for group in results for c in group]
