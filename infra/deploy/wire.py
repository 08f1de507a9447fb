"""``zsync wire supabase``: point Supabase Database Webhooks at the deployed ``*_to_tables`` functions;
``zsync wire zapier``: one Zapier trigger inbox per ``*_to_supabase`` function (:func:`apply_inboxes`).

Renders :func:`infra.deploy.webhook_sql.render_webhook_sql` for the three webhook tables and applies it in
one transaction. Idempotent: an identical re-run reports every trigger ``unchanged``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import psycopg

from infra.deploy import DeployError
from infra.deploy.webhook_sql import render_webhook_sql, trigger_name
from shared.adapters.trigger_inbox import InboxClient, InboxError, Subscription
from shared.core.spec import TABLES, WEBHOOK_TABLES, Direction
from shared.platform.settings import Settings


@dataclass(frozen=True)
class TriggerChange:
    table: str
    trigger: str
    url: str
    change: str  # created | replaced | unchanged


def webhook_urls(function_urls: Mapping[str, str]) -> dict[str, str]:
    """``{table: URL of <table>_to_tables}`` for every table Supabase pushes to Zapier Tables."""
    urls: dict[str, str] = {}
    for table in WEBHOOK_TABLES:
        fn = TABLES[table].function_name(Direction.TO_TABLES)
        if fn not in function_urls:
            raise DeployError(f"no URL for {fn} in the urls file")
        urls[table] = function_urls[fn]
    return urls


def render(function_urls: Mapping[str, str], settings: Settings | None = None) -> str:
    """The wiring SQL. It holds no secret: the webhook is a wake-up (see infra.deploy.webhook_sql)."""
    try:
        return render_webhook_sql(webhook_urls(function_urls))
    except ValueError as exc:
        raise DeployError(str(exc)) from None


_STATE = """
SELECT c.relname, pg_get_triggerdef(t.oid), e.url, e.headers::text, e.timeout_ms
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
LEFT JOIN zsync.webhook_endpoints e ON e.table_name = c.relname
WHERE NOT t.tgisinternal AND t.tgname = %s AND c.relname = %s
"""


def _state(conn: psycopg.Connection) -> dict[str, tuple[object, ...]]:
    found: dict[str, tuple[object, ...]] = {}
    for table in WEBHOOK_TABLES:
        row = conn.execute(_STATE, (trigger_name(table), table)).fetchone()
        if row is not None:
            found[table] = tuple(row[1:])
    return found


def _preflight(conn: psycopg.Connection) -> None:
    has_fn = conn.execute(
        "SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'supabase_functions' AND p.proname = 'http_request'"
    ).fetchone()
    if not has_fn:
        raise DeployError("supabase_functions.http_request does not exist: enable Database Webhooks in the Supabase "
                          "dashboard (Database -> Webhooks -> Enable) first.")
    has_wake = conn.execute("SELECT to_regprocedure('zsync.wake(text)')").fetchone()
    if not has_wake or has_wake[0] is None:
        raise DeployError("zsync.wake does not exist: run `zsync migrate --database-url URL` first (migration "
                          "20261205100040 makes the webhooks secret-free wake-ups).")
    has_endpoints = conn.execute("SELECT to_regclass('zsync.webhook_endpoints')").fetchone()
    if not has_endpoints or has_endpoints[0] is None:
        raise DeployError("zsync.webhook_endpoints does not exist: run `zsync migrate --database-url URL` first.")


def apply(database_url: str, function_urls: Mapping[str, str], settings: Settings) -> list[TriggerChange]:
    """Create or replace the three webhook triggers in one transaction; report what changed."""
    sql = render(function_urls, settings)
    urls = webhook_urls(function_urls)
    try:
        # prepare_threshold=None: the Supabase pooler (transaction mode) cannot keep prepared statements.
        with psycopg.connect(database_url, autocommit=True, prepare_threshold=None, connect_timeout=10) as conn:
            _preflight(conn)
            before = _state(conn)
            conn.execute(sql)  # the script is BEGIN; ... COMMIT;
            after = _state(conn)
    except psycopg.OperationalError as exc:  # one line naming what to check, as every CLI connection error
        first = " ".join(str(exc).splitlines()[0].split())
        raise DeployError(f"cannot connect to the database ({first}): check --database-url / ZSYNC_DATABASE_URL; "
                          "nothing was changed") from None
    except psycopg.Error as exc:
        raise DeployError(f"applying the webhook SQL failed (nothing was changed): {exc}") from None
    changes = []
    for table in WEBHOOK_TABLES:
        if table not in before:
            change = "created"
        elif before[table] == after.get(table):
            change = "unchanged"
        else:
            change = "replaced"
        changes.append(TriggerChange(table, trigger_name(table), urls[table], change))
    return changes


# --- zsync wire zapier: one trigger inbox per *_to_supabase function ------------------------------------


@dataclass(frozen=True)
class TriggerChoice:
    app_key: str  # TableCLIAPI@<version>
    action_key: str
    why: str
    deletes: bool = False  # the trigger also delivers deletes ("a record is added, updated, or deleted")


@dataclass(frozen=True)
class InboxChange:
    function: str
    key: str
    table_id: str
    notification_url: str
    change: str  # created | updated | replaced | unchanged | planned
    inbox_id: str | None = None


def notification_url(function_url: str) -> str:
    """The function URL plus the wake-up marker (see shared.edge.handler.WAKE_PARAM)."""
    from shared.edge.handler import WAKE_PARAM

    return function_url + ("&" if "?" in function_url else "?") + f"{WAKE_PARAM}=inbox"


def _text(action: dict[str, Any]) -> str:
    return " ".join(str(action.get(k) or "") for k in ("key", "name", "description")).lower().replace("_", " ")


def deletes_capable(action: dict[str, Any]) -> bool:
    """"Triggers when a record is added, updated, or deleted in a table." (its key is not published)."""
    text = _text(action)
    return "record" in text and "delet" in text and "updat" in text


def new_or_updated(action: dict[str, Any]) -> bool:
    """"Triggers when a record is added or updated on a table." (new or updated record)."""
    text = _text(action)
    return ("record" in text and "updat" in text and any(w in text for w in ("new", "add", "creat"))
            and not deletes_capable(action))


def choose_trigger(client: InboxClient, override: str | None) -> TriggerChoice:
    """The Tables trigger each inbox subscribes to, found in the app's read actions (or ``--trigger-key``):
    the deletes-capable one ("a record is added, updated, or deleted") when the app lists exactly one, so a
    delete made in Tables arrives at once (the trash check stays on as the safety net); else the
    new-or-updated one, deletes then reaching Supabase through the trash check only."""
    app_key = client.tables_implementation()
    actions = client.read_actions(app_key)
    keys = [a["key"] for a in actions]
    if override:
        if keys and override not in keys:
            raise DeployError(f"--trigger-key {override!r} is not a trigger of {app_key}; "
                              f"its triggers: {', '.join(keys)}")
        given = next((a for a in actions if a["key"] == override), {"key": override})
        return TriggerChoice(app_key, override, "given with --trigger-key", deletes_capable(given))
    visible = [a for a in actions if not a.get("is_hidden")]
    with_deletes = [a for a in visible if deletes_capable(a)]
    if len(with_deletes) == 1:
        a = with_deletes[0]
        return TriggerChoice(app_key, a["key"], f"{a['key']!r} ({a.get('name')}) also delivers deletes: a record "
                             "deleted in Tables reaches Supabase at once; the trash check stays on as the safety net",
                             deletes=True)
    matches = [a for a in visible if new_or_updated(a)] or [
        a for a in visible if "record" in _text(a) and "updated" in _text(a) and not deletes_capable(a)]
    if len(matches) != 1:
        raise DeployError(f"cannot tell which trigger of {app_key} is 'new or updated record' ({len(matches)} "
                          f"candidates among {', '.join(keys) or 'none'}): pass --trigger-key")
    a = matches[0]
    why = "no trigger of it delivers deletes" if not with_deletes else \
        f"{len(with_deletes)} triggers seem to deliver deletes, none chosen"
    return TriggerChoice(app_key, a["key"], f"the read action of {app_key} about new or updated records: "
                                            f"{a['key']!r} ({a.get('name')}); {why}: deletes made in Tables reach "
                                            "Supabase through the trash check")


def inbox_plan(function_urls: Mapping[str, str], settings: Settings, stage: str) -> list[InboxChange]:
    from shared.services.inbox_consumer import inbox_key

    plan = []
    for table in TABLES.values():
        fn = table.function_name(Direction.TO_SUPABASE)
        if fn not in function_urls:
            raise DeployError(f"no URL for {fn} in the urls file")
        table_id = settings.table_ids.get(table.name)
        if not table_id:
            raise DeployError(f"ZSYNC_TABLE_IDS has no Zapier table id for {table.name!r}")
        plan.append(InboxChange(fn, inbox_key(stage, fn), table_id, notification_url(function_urls[fn]), "planned"))
    return plan


def subscription(choice: TriggerChoice, table_id: str) -> Subscription:
    return Subscription(app_key=choice.app_key, action_key=choice.action_key, inputs={"table_id": table_id})


def apply_inboxes(client: InboxClient, plan: list[InboxChange], choice: TriggerChoice) -> list[InboxChange]:
    """Ensure each planned inbox: idempotent; a changed URL is patched, a changed table or trigger replaces
    the inbox (the API refuses to change a subscription in place)."""
    done = []
    for item in plan:
        sub = subscription(choice, item.table_id)
        try:
            existing = client.find(item.key)
            if existing is None:
                inbox, change = client.create(item.key, sub, item.notification_url), "created"
            elif existing.subscription != sub.to_json():
                client.delete(existing.id)
                inbox, change = client.create(item.key, sub, item.notification_url), "replaced"
            elif existing.notification_url != item.notification_url:
                inbox, change = client.update(existing.id, item.notification_url), "updated"
            else:
                inbox, change = existing, "unchanged"
        except InboxError as exc:
            raise DeployError(f"{item.key}: {exc}") from None
        done.append(replace(item, change=change, inbox_id=inbox.id))
    return done
