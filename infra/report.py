"""``zsync report``: one self-contained HTML file (no network needed to open it) with

* live delivery lag over time per table and direction (p50 and max per 5-minute bucket), drawn by
  matplotlib and inlined as SVG (each series is an SVG group ``id="lag-<table>-<direction>"``);
* outcome counts and conflicts per table and direction;
* the latest failures with their problems;
* the backlog: outbox per table, dead-letter queue depth.

The figures behind the plot are embedded too (``<script type="application/json" id="zsync-data">``).
"""

from __future__ import annotations

import html
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from infra.status import DIRECTION, dead_letters_text, per_function
from shared.platform.settings import Settings

SERIES_SQL = """
SELECT date_bin('5 minutes', at, timestamptz '2000-01-01 00:00:00+00') AS bucket, table_name, direction,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY lag_s) AS p50, max(lag_s) AS max, count(lag_s) AS n
FROM zsync.sync_events
WHERE at > now() - %(since)s AND origin = 'live' AND lag_s IS NOT NULL
GROUP BY 1, 2, 3 ORDER BY 2, 3, 1
"""
FAILURES_SQL = """
SELECT at, table_name, direction, origin, outcome, record_id, problems
FROM zsync.sync_events
WHERE at > now() - %(since)s AND outcome IN ('rejected', 'failed')
ORDER BY at DESC LIMIT %(limit)s
"""


def collect(database_url: str, since: timedelta, settings: Settings | None = None,
            failures: int = 20) -> dict[str, Any]:
    from infra.status import dead_letters, outbox

    with psycopg.connect(database_url, autocommit=True, prepare_threshold=None, connect_timeout=10) as conn:
        series: dict[str, dict[str, list]] = {}
        for bucket, table, direction, p50, top, n in conn.execute(SERIES_SQL, {"since": since}):
            s = series.setdefault(f"{table}-{direction}", {"t": [], "p50_s": [], "max_s": [], "n": []})
            s["t"].append(bucket.isoformat())
            s["p50_s"].append(p50)
            s["max_s"].append(top)
            s["n"].append(n)
        latest = [{"at": at.isoformat(), "table": t, "direction": d, "origin": o, "outcome": out, "record_id": rid,
                   "problems": problems or []}
                  for at, t, d, o, out, rid, problems in conn.execute(FAILURES_SQL, {"since": since,
                                                                                     "limit": failures})]
        functions, backlog = per_function(conn, since), outbox(conn)
    dead, dead_problem = dead_letters(settings)
    return {"generated_at": datetime.now(UTC).isoformat(), "since_s": since.total_seconds(), "series": series,
            "functions": functions, "failures": latest, "outbox": backlog, "dead_letters": dead,
            "dead_letters_problem": dead_problem}


def lag_figure(series: dict[str, dict[str, list]]) -> Any:
    """The lag plot as a matplotlib Figure (no pyplot: no global state, no GUI backend)."""
    import matplotlib.dates as mdates
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    _draw(ax, series, mdates)
    return fig


def lag_svg(series: dict[str, dict[str, list]]) -> str:
    """The lag plot as an inline SVG (matplotlib, Agg-free SVG backend, text as paths: no fonts needed)."""
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "zsync"}):
        fig = lag_figure(series)
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prolog and doctype: inline in HTML


BUCKET = timedelta(minutes=5)
LOG_SPREAD = 20  # a max this many times the smallest p50: log scale, so one outlier cannot flatten the rest


def _draw(ax: Any, series: dict[str, dict[str, list]], mdates: Any) -> None:
    every: list[datetime] = []
    values: list[float] = []
    for i, (key, s) in enumerate(sorted(series.items())):
        times = [datetime.fromisoformat(t) for t in s["t"]]
        every += times
        color = f"C{i % 10}"
        p50 = [v * 1000 for v in s["p50_s"]]
        top = [v * 1000 for v in s["max_s"]]
        values += p50 + top
        (line,) = ax.plot(times, p50, marker="o", markersize=4, linewidth=1.6, color=color, label=f"{key} p50")
        line.set_gid(f"lag-{key}")
        (mx,) = ax.plot(times, top, linestyle=":", marker="v", markersize=3, linewidth=1, color=color)
        mx.set_gid(f"lagmax-{key}")
    positive = [v for v in values if v > 0]
    log = bool(positive) and max(positive) / min(positive) >= LOG_SPREAD
    if log:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 10, 20, 50, 100...: a label near every line
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    if not log:
        ax.set_ylim(bottom=0)
    ax.set_ylabel("delivery lag (ms" + (", log scale)" if log else ")"))
    ax.set_title("Live delivery lag per table and direction (5-minute buckets; dotted: max)")
    ax.grid(True, alpha=0.3, which="both" if log else "major")
    if every:  # the buckets' own span (at least 30 min), not matplotlib's default of years around one point
        first, last = min(every), max(every)
        pad = max(BUCKET, (timedelta(minutes=30) - (last - first)) / 2)
        ax.set_xlim(first - pad, last + pad)
    locator = mdates.AutoDateLocator(tz=UTC)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=UTC, show_offset=True))
    if series:  # below the plot, never over a point
        ax.figure.legend(loc="outside lower center", fontsize=8, ncols=min(len(series), 3))
    else:
        ax.text(0.5, 0.5, "no live deliveries in this window", ha="center", va="center", transform=ax.transAxes)


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td { white-space: nowrap; }
td:first-child, td:nth-child(2), th { text-align: left; } .bad { color: #b00; font-weight: bold; }
.muted { color: #777; } #lag-plot svg { max-width: 100%; height: auto; }
"""


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def render_html(data: dict[str, Any]) -> str:
    hours = data["since_s"] / 3600
    rows = []
    for r in data["functions"]:
        bad = set(r["breaches"])
        cls = ' class="bad"'
        rows.append(
            f"<tr><td>{_e(r['table'])}</td><td>{_e(DIRECTION.get(r['direction'], r['direction']))}</td>"
            f"<td>{r['applied']}</td>"
            f"<td>{r['unchanged']}</td><td>{r['skipped_stale']}</td>"
            f"<td{cls if 'failure_rate' in bad else ''}>{r['rejected']}</td>"
            f"<td{cls if 'failure_rate' in bad else ''}>{r['failed']}</td>"
            f"<td{cls if 'conflicts' in bad else ''}>{r['conflicts']}</td>"
            f"<td{cls if 'avg_lag' in bad else ''}>{_ms(r['lag_p50_s'])}</td><td>{_ms(r['lag_p95_s'])}</td>"
            f"<td>{_ms(r['lag_max_s'])}</td><td>{r['repairs']}</td></tr>")
    failures = "".join(
        f"<tr><td>{_e(f['at'][:19])}</td><td>{_e(f['table'])}</td><td>{_e(f['outcome'])}</td>"
        f"<td>{_e(f['record_id'])}</td><td style='text-align:left'>"
        + "; ".join(f"{_e(p.get('field'))}: {_e(p.get('problem'))}" for p in f["problems"][:5]
                    if isinstance(p, dict))
        + "</td></tr>" for f in data["failures"]) or "<tr><td colspan=5 class=muted>none</td></tr>"
    backlog = "".join(
        f"<tr><td>{_e(b['table_name'])}</td><td>{b['pending']}</td><td>{_ms(b['oldest_age_s'])}</td>"
        f"<td{' class=bad' if b['older_than_5m'] else ''}>{b['older_than_5m']}</td></tr>"
        for b in data["outbox"]) or "<tr><td colspan=4 class=muted>outbox empty</td></tr>"
    dead = data["dead_letters"]
    dead_text = dead_letters_text(dead, data.get("dead_letters_problem"))
    payload = json.dumps(data, default=str).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>zsync report</title><style>{_CSS}</style></head>
<body>
<h1>zsync report: last {hours:g} h</h1>
<p class="muted">Generated {_e(data['generated_at'][:19])} UTC. Lag is live delivery lag (from the change to its
application); replays, reconciles and repairs are counted apart (column "repairs").</p>
<h2>Lag over time</h2>
<div id="lag-plot">{lag_svg(data['series'])}</div>
<h2>Outcomes per table and direction</h2>
<table id="outcomes"><tr><th>table</th><th>direction</th><th>applied</th><th>unchanged</th><th>skipped stale</th>
<th>rejected</th><th>failed</th><th>conflicts</th><th>lag p50</th><th>p95</th><th>max</th><th>repairs</th></tr>
{''.join(rows)}</table>
<h2>Latest failures</h2>
<table id="failures"><tr><th>at (UTC)</th><th>table</th><th>outcome</th><th>record</th><th>problems</th></tr>
{failures}</table>
<h2>Backlog</h2>
<table id="backlog"><tr><th>outbox table</th><th>pending</th><th>oldest</th><th>older than 5 min</th></tr>
{backlog}</table>
<p>Dead-letter queue: <b id="dead-letters"{' class=bad' if dead else ''}>{_e(dead_text)}</b></p>
<script type="application/json" id="zsync-data">{payload}</script>
</body></html>
"""
