"""``zsync status``: the health of a deployed (or local) sync in one screen.

Per table and direction over ``--since``: applied, unchanged, skipped stale, rejected, failed, conflicts,
live delivery lag p50/p95/max, repairs (replay/reconcile/repair entries, kept apart); the outbox backlog;
the dead-letter queue depth (SQS attributes); each function's reachability (signed ping). Red where one
of the seed's thresholds (or a backlog alert) is crossed. Reads the zsync views as the database owner.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from shared.core.audit import SYNC_DIRECTION
from shared.core.spec import FUNCTIONS
from shared.platform.settings import Settings
from shared.services.alerts import AVG_LAG_MAX_S, CONFLICTS_PER_HOUR_MAX, FAILURE_RATE_MAX, OUTBOX_MAX_AGE_S

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

PER_FUNCTION_SQL = """
SELECT table_name, direction,
       count(*) FILTER (WHERE outcome = 'applied' AND origin = 'live') AS applied,
       count(*) FILTER (WHERE outcome = 'unchanged') AS unchanged,
       count(*) FILTER (WHERE outcome = 'skipped_stale') AS skipped_stale,
       count(*) FILTER (WHERE outcome = 'rejected') AS rejected,
       count(*) FILTER (WHERE outcome = 'failed') AS failed,
       count(*) FILTER (WHERE outcome = 'skipped_stale' AND origin = 'live') AS conflicts,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY lag_s) FILTER (WHERE origin = 'live') AS lag_p50_s,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY lag_s) FILTER (WHERE origin = 'live') AS lag_p95_s,
       max(lag_s) FILTER (WHERE origin = 'live') AS lag_max_s,
       avg(lag_s) FILTER (WHERE origin = 'live') AS lag_avg_s,
       count(*) FILTER (WHERE origin <> 'live') AS repairs
FROM zsync.sync_events
WHERE at > now() - %(since)s
GROUP BY table_name, direction
"""
COLUMNS = ("applied", "unchanged", "skipped_stale", "rejected", "failed", "conflicts", "lag_p50_s", "lag_p95_s",
           "lag_max_s", "lag_avg_s", "repairs")


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``1h``, ``2d`` (or a sum like ``1h30m``)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 30m, 1h, 2d)")
    return timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in parts))


def per_function(conn: psycopg.Connection, since: timedelta) -> list[dict[str, Any]]:
    found = {(r[0], r[1]): r[2:] for r in conn.execute(PER_FUNCTION_SQL, {"since": since})}
    rows = []
    for name, fn in FUNCTIONS.items():
        direction = SYNC_DIRECTION[fn.direction]
        values = found.get((fn.table.name, direction))
        row: dict[str, Any] = {"function": name, "table": fn.table.name, "direction": direction}
        row |= dict(zip(COLUMNS, values, strict=True)) if values else {c: (0 if "lag" not in c else None)
                                                                      for c in COLUMNS}
        total = row["applied"] + row["rejected"] + row["failed"]
        row["failure_rate"] = (row["rejected"] + row["failed"]) / total if total else 0.0
        per_hour = row["conflicts"] / max(since.total_seconds() / 3600, 1e-9)
        row["breaches"] = [name for name, crossed in (
            ("failure_rate", row["failure_rate"] > FAILURE_RATE_MAX),
            ("avg_lag", (row["lag_avg_s"] or 0) > AVG_LAG_MAX_S),
            ("conflicts", per_hour > CONFLICTS_PER_HOUR_MAX)) if crossed]
        rows.append(row)
    return rows


def outbox(conn: psycopg.Connection) -> list[dict[str, Any]]:
    cur = conn.execute("SELECT table_name, pending, oldest_pending_at, oldest_age_s, older_than_5m, max_attempts "
                       "FROM zsync.outbox_backlog ORDER BY table_name")
    names = [d.name for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur]


def ping_all(urls: dict[str, str], settings: Settings, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Signed ping to every function URL (``zsync doctor``'s check): reachable, authenticated, serving it."""
    from infra.deploy.doctor import check_function

    def one(item: tuple[str, str]) -> dict[str, Any]:
        name, url = item
        ping = [c for c in check_function(name, url, settings, timeout_s) if c.area == "ping"]
        ok = bool(ping) and ping[0].ok
        return {"function": name, "url": url, "reachable": ok, "detail": ping[0].detail if ping else "not pinged"}

    with ThreadPoolExecutor(max_workers=7) as pool:
        return list(pool.map(one, sorted(urls.items())))


DLQ_NOT_CONFIGURED = "not configured (ZSYNC_DLQ_URL)"


def dead_letters(settings: Settings | None) -> tuple[int | None, str | None]:
    """The dead-letter queue depth and, when there is none to show, why: one wording for status, report
    and monitor (a depth of 0 is shown as 0 everywhere, never as '-')."""
    from shared.services.alerts import dead_letter_depth

    if settings is None or not settings.dlq_url:
        return None, DLQ_NOT_CONFIGURED
    try:
        depth = dead_letter_depth(settings)
    except Exception as exc:
        return None, f"unreadable: {type(exc).__name__}"
    return (depth, None) if depth is not None else (None, DLQ_NOT_CONFIGURED)


def dead_letters_text(depth: int | None, problem: str | None) -> str:
    return str(depth) if depth is not None else (problem or DLQ_NOT_CONFIGURED)


def collect(database_url: str, since: timedelta, settings: Settings, urls: dict[str, str] | None,
            *, inbox_stage: str | None = None) -> dict[str, Any]:
    """``inbox_stage``: also read the backlog of that stage's trigger inboxes (needs Zapier credentials)."""
    from infra.inbox_status import backlog as inbox_backlog

    with psycopg.connect(database_url, autocommit=True, prepare_threshold=None, connect_timeout=10) as conn:
        functions, backlog = per_function(conn, since), outbox(conn)
    dead, dead_problem = dead_letters(settings)
    inboxes = inbox_backlog(settings, inbox_stage) if inbox_stage else []
    return {
        "generated_at": datetime.now(UTC).isoformat(),
        "inboxes": inboxes,
        "inbox_alert": any(r["alert"] for r in inboxes),
        "since_s": since.total_seconds(),
        "functions": functions,
        "outbox": backlog,
        "outbox_alert": any(b["older_than_5m"] for b in backlog),
        "dead_letters": dead,
        "dead_letters_problem": dead_problem,
        "reachability": ping_all(urls, settings) if urls else [],
        "thresholds": {"failure_rate": FAILURE_RATE_MAX, "avg_lag_s": AVG_LAG_MAX_S,
                       "conflicts_per_hour": CONFLICTS_PER_HOUR_MAX, "outbox_max_age_s": OUTBOX_MAX_AGE_S},
    }


def _s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


DIRECTION = {"tables_to_supabase": "to Supabase", "supabase_to_tables": "to Tables"}
WIDE = 120  # below this many columns the figures are split in two tables (every header readable at 80)


def _figure_columns(row: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """column header -> (cell text, the alert that makes it red) for one table and direction."""
    return {
        "applied": (str(row["applied"]), ""), "unchanged": (str(row["unchanged"]), ""),
        "stale": (str(row["skipped_stale"]), ""), "rejected": (str(row["rejected"]), "failure_rate"),
        "failed": (str(row["failed"]), "failure_rate"), "conflicts": (str(row["conflicts"]), "conflicts"),
        "repairs": (str(row["repairs"]), ""), "lag p50": (_s(row["lag_p50_s"]), "avg_lag"),
        "p95": (_s(row["lag_p95_s"]), "avg_lag"), "max": (_s(row["lag_max_s"]), "avg_lag"),
    }


def _figures_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> Table:
    table = Table(title=title, box=None, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold underline")
    table.add_column("table", no_wrap=True)
    table.add_column("direction", no_wrap=True)
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        cells = _figure_columns(row)
        red = set(row["breaches"])
        table.add_row(row["table"], DIRECTION.get(row["direction"], row["direction"]),
                      *(f"[bold red]{cells[c][0]}[/]" if cells[c][1] in red else cells[c][0] for c in columns))
    return table


def render(console: Console, data: dict[str, Any], since_text: str) -> None:
    outcomes = ["applied", "unchanged", "stale", "rejected", "failed", "conflicts"]
    lag = ["lag p50", "p95", "max", "repairs"]
    title = f"zsync status, last {since_text}"
    if console.width >= WIDE:
        console.print(_figures_table(title, data["functions"], outcomes + lag))
    else:
        console.print(_figures_table(f"{title}: outcomes", data["functions"], outcomes))
        console.print(_figures_table("live delivery lag and repairs", data["functions"], lag))

    side = Table(title="backlog and reachability", show_header=True)
    side.add_column("what")
    side.add_column("value")
    if not data["outbox"]:
        side.add_row("outbox", "empty")
    for b in data["outbox"]:
        text = f"{b['pending']} pending, oldest {_s(b['oldest_age_s'])}, {b['older_than_5m']} older than 5 min"
        side.add_row(f"outbox {b['table_name']}", f"[bold red]{text}[/]" if b["older_than_5m"] else text)
    from infra.inbox_status import describe

    for r in data.get("inboxes", []):
        side.add_row(f"inbox {r['key']}", f"[bold red]{describe(r)}[/]" if r["alert"] else describe(r))
    dead = data["dead_letters"]
    text = dead_letters_text(dead, data["dead_letters_problem"])
    side.add_row("dead-letter queue", f"[bold red]{text}[/]" if dead else text)
    for r in data["reachability"]:
        side.add_row(r["function"], "[green]reachable[/]" if r["reachable"] else f"[bold red]{r['detail']}[/]")
    if not data["reachability"]:
        side.add_row("functions", "not pinged (pass --urls, or run the local stack)")
    console.print(side)
