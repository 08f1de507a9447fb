"""`zsync status` and `zsync report` against a real database with known audit figures, a real function
process (signed ping), a moto SQS dead-letter queue, and the report opened in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from infra.cli import app
from infra.local.stack import FunctionProcess, free_port
from shared.adapters.supabase_db import append_audit
from shared.platform.settings import reset_settings

SECRET = "status-secret"
NOW = datetime.now(UTC)
# Six 5-minute buckets of live agent_jobs deliveries, three of rate_limits (Supabase -> Tables).
JOBS_LAGS = [0.120, 0.180, 0.090, 0.250, 0.300, 0.150]
LIMITS_LAGS = [0.400, 0.500, 0.450]


def entry(fn: str, direction: str, action: str, at: datetime, lag: float | None = None, origin: str = "live",
          status: int | None = None, problems: list | None = None) -> dict:
    meta: dict = {"function": fn, "sync_direction": direction, "origin": origin}
    if lag is not None:
        meta["lag_seconds"] = lag
    if status is not None:
        meta |= {"status": status, "problems": problems or []}
    return {"id": f"st-{uuid.uuid4().hex}", "timestamp": at.isoformat(), "actor_type": "zapier_sync",
            "action": action, "resource_id": f"rec-{uuid.uuid4().hex[:6]}", "metadata": meta}


@pytest.fixture(scope="module")
def figures(database_url: str) -> Iterator[str]:
    from infra.local.postgres import create_database, prepare_database, with_database

    url = create_database(with_database(database_url, "postgres"))
    prepare_database(url)
    rows = []
    for i, lag in enumerate(JOBS_LAGS):
        at = NOW - timedelta(minutes=5 * (len(JOBS_LAGS) - i))
        rows += [entry("agent_jobs_to_supabase", "tables_to_supabase", "agent_jobs_synced", at, lag) for _ in range(3)]
    for i, lag in enumerate(LIMITS_LAGS):
        at = NOW - timedelta(minutes=5 * (len(LIMITS_LAGS) - i))
        rows.append(entry("rate_limits_to_tables", "supabase_to_tables", "rate_limits_synced", at, lag))
    # A reconcile repair with a huge "lag" (a months-old record): reported apart, not in the plot or p95.
    rows.append(entry("agent_jobs_to_supabase", "tables_to_supabase", "agent_jobs_synced", NOW, 9e6, "reconcile"))
    rows.append(entry("agent_jobs_to_supabase", "tables_to_supabase", "sync_failed", NOW - timedelta(minutes=2),
                      status=400, problems=[{"field": "retry_count", "problem": "not an integer: 'many'"}]))
    rows.append(entry("agent_jobs_to_supabase", "tables_to_supabase", "sync_failed", NOW - timedelta(minutes=1),
                      status=503, problems=[{"field": "dependency", "problem": "TablesUnavailable: timed out"}]))
    with psycopg.connect(url, autocommit=True) as conn:
        for row in rows:
            append_audit(conn, row)
        conn.execute("INSERT INTO zsync.outbox (table_name, record_id, op, created_at) "
                     "VALUES ('agent_decisions', 'stuck', 'UPDATE', now() - interval '7 minutes')")
    yield url


@pytest.fixture
def moto_dlq(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="local",
                       aws_secret_access_key="local")
    queue = sqs.create_queue(QueueName="zsync-status-dlq")["QueueUrl"]
    for i in range(2):
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"n": i}))
    for key in list(os.environ):
        if key.startswith("ZSYNC_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("ZSYNC_DLQ_URL", queue)
    monkeypatch.setenv("ZSYNC_AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("ZSYNC_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    reset_settings()
    from shared.adapters import dead_letter

    dead_letter.reset_clients()
    yield queue
    reset_settings()
    dead_letter.reset_clients()
    server.stop()


def test_status_json_and_table(figures, moto_dlq, tmp_path, monkeypatch):
    from infra import cli

    monkeypatch.setattr(cli.console, "width", 200)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZSYNC_")}
    env |= {"ZSYNC_DATABASE_URL": figures, "ZSYNC_WEBHOOK_SECRET": SECRET}
    fn = FunctionProcess("agent_jobs_to_supabase", free_port(), env, tmp_path / "fn.log")
    fn.start()
    try:
        fn.wait_ready()
        from shared.core.spec import FUNCTIONS

        urls = {name: "http://127.0.0.1:9/" for name in FUNCTIONS} | {"agent_jobs_to_supabase": fn.url}
        urls_file = tmp_path / "urls.json"
        urls_file.write_text(json.dumps({"functions": urls}))
        result = CliRunner().invoke(app, ["status", "--since", "1h", "--json", "--database-url", figures,
                                          "--urls", str(urls_file)])
        table = CliRunner().invoke(app, ["status", "--since", "1h", "--database-url", figures])
    finally:
        fn.stop()
    assert result.exit_code == 1, result.output  # thresholds crossed: failures, the old outbox row, dead letters
    data = json.loads(result.stdout)
    rows = {r["function"]: r for r in data["functions"]}
    assert len(rows) == 7
    jobs = rows["agent_jobs_to_supabase"]
    assert (jobs["applied"], jobs["rejected"], jobs["failed"], jobs["repairs"]) == (18, 1, 1, 1)
    assert jobs["lag_max_s"] == pytest.approx(0.300) and jobs["lag_p50_s"] == pytest.approx(0.165)
    assert jobs["breaches"] == ["failure_rate"]  # 2 of 20 = 10 %; the reconcile's 9e6 s lag is not live lag
    limits = rows["rate_limits_to_tables"]
    assert limits["applied"] == 3 and limits["lag_p50_s"] == pytest.approx(0.450) and limits["breaches"] == []
    assert rows["audit_log_to_supabase"]["applied"] == 0
    assert data["outbox"][0]["table_name"] == "agent_decisions" and data["outbox"][0]["older_than_5m"] == 1
    assert data["dead_letters"] == 2
    reach = {r["function"]: r["reachable"] for r in data["reachability"]}
    assert reach.pop("agent_jobs_to_supabase") is True and not any(reach.values())
    assert table.exit_code == 1
    for text in ("zsync status", "agent_jobs", "to Supabase", "165 ms", "outbox agent_decisions",
                 "dead-letter queue"):
        assert text in table.output, text


def test_status_rejects_a_bad_window(figures):
    result = CliRunner().invoke(app, ["status", "--since", "yesterday", "--database-url", figures])
    assert result.exit_code == 2 and "not a duration" in result.output


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={tmp / 'profile'}",
         *args], capture_output=True, text=True, timeout=120, check=False)


def write_report(url: str, out: Path) -> dict:
    result = CliRunner().invoke(app, ["report", "--since", "24h", "--out", str(out), "--database-url", url])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the report must not load anything"
    return json.loads(re.search(r'<script type="application/json" id="zsync-data">(.*?)</script>', page,
                                re.S).group(1).replace("<\\/", "</"))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`make install` installs it via apt)")
def test_report_is_self_contained_and_chromium_draws_the_plot(figures, tmp_path):
    from PIL import Image

    out = tmp_path / "report.html"
    data = write_report(figures, out)
    assert [round(v, 3) for v in data["series"]["agent_jobs-tables_to_supabase"]["p50_s"]] == JOBS_LAGS
    assert [round(v, 3) for v in data["series"]["rate_limits-supabase_to_tables"]["p50_s"]] == LIMITS_LAGS
    assert len(data["failures"]) == 2 and data["failures"][0]["problems"][0]["field"] == "dependency"

    dom = chromium("--dump-dom", out.as_uri(), tmp=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for key, lags in (("agent_jobs-tables_to_supabase", JOBS_LAGS), ("rate_limits-supabase_to_tables", LIMITS_LAGS)):
        group = re.search(rf'<g id="lag-{key}">(.*?)</g>', html, re.S)
        assert group, f"no plotted line for {key}"
        path = re.search(r'<path d="([^"]+)"', group.group(1)).group(1)
        points = re.findall(r"[ML]\s*(-?[\d.]+)\s+(-?[\d.]+)", path)
        assert len(points) == len(lags), (key, path)
        ys = [float(y) for _, y in points]  # SVG y grows downwards: a larger lag is drawn higher
        order = sorted(range(len(lags)), key=lambda i: lags[i])
        assert sorted(range(len(ys)), key=lambda i: -ys[i]) == order, (key, ys)
    assert "retry_count: not an integer" in html and "TablesUnavailable" in html
    assert 'id="dead-letters"' in html

    shot = tmp_path / "shot.png"
    run = chromium(f"--screenshot={shot}", "--window-size=1100,900", out.as_uri(), tmp=tmp_path)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    blue = sum(1 for px in image.getdata() if abs(px[0] - 0x1F) < 40 and abs(px[1] - 0x77) < 40
               and abs(px[2] - 0xB4) < 40)
    assert blue > 200, f"the first series' line (matplotlib C0) is not visible: {blue} pixels"


@pytest.fixture(scope="module")
def few_points(database_url: str) -> Iterator[str]:
    """Issue 22: one bucket for rate_limits (~20 ms), four for agent_jobs (p50 14-16 ms) with one max of
    2,379 ms: the outlier must not flatten the p50 lines, nor the legend hide a point."""
    from infra.local.postgres import create_database, prepare_database, with_database

    url = create_database(with_database(database_url, "postgres"))
    prepare_database(url)
    rows = []
    for i, lags in enumerate([[0.014, 0.014, 0.015], [0.015, 0.015, 2.379], [0.016, 0.016, 0.017], [0.014] * 3]):
        at = NOW - timedelta(minutes=5 * (4 - i))
        rows += [entry("agent_jobs_to_supabase", "tables_to_supabase", "agent_jobs_synced", at, lag) for lag in lags]
    rows += [entry("rate_limits_to_tables", "supabase_to_tables", "rate_limits_synced", NOW - timedelta(minutes=1),
                   0.020)]
    with psycopg.connect(url, autocommit=True) as conn:
        for row in rows:
            append_audit(conn, row)
    yield url


def _box(svg: str, gid: str) -> tuple[float, float, float, float]:
    """x0, y0, x1, y1 of the first path in the SVG group ``gid`` (every M/L/Q coordinate)."""
    group = re.search(rf'<g id="{gid}">\s*(?:<g id="[^"]+">\s*)?<path d="([^"]+)"', svg, re.S)
    assert group, f"no {gid} in the plot"
    xy = [(float(x), float(y)) for x, y in re.findall(r"(-?[\d.]+)\s+(-?[\d.]+)", group.group(1))]
    return min(x for x, _ in xy), min(y for _, y in xy), max(x for x, _ in xy), max(y for _, y in xy)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`make install` installs it via apt)")
def test_report_plot_readable_with_few_points_and_an_outlier(few_points, tmp_path):
    out = tmp_path / "report.html"
    data = write_report(few_points, out)
    assert len(data["series"]["rate_limits-supabase_to_tables"]["t"]) == 1
    dom = chromium("--dump-dom", out.as_uri(), tmp=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    svg = dom.stdout
    axes, legend = _box(svg, "patch_2"), _box(svg, "legend_1")
    assert legend[1] > axes[3] or legend[0] > axes[2], "the legend lies over the plotting area"
    ys = {}
    for key in ("agent_jobs-tables_to_supabase", "rate_limits-supabase_to_tables"):
        group = re.search(rf'<g id="lag-{key}">(.*?)</g>', svg, re.S)
        assert group, f"no plotted line for {key}"
        path = re.search(r'<path d="([^"]+)"', group.group(1)).group(1)
        points = [(float(x), float(y)) for x, y in re.findall(r"[ML]\s*(-?[\d.]+)\s+(-?[\d.]+)", path)]
        assert all(axes[0] < x < axes[2] and axes[1] < y < axes[3] for x, y in points), (key, points, axes)
        ys[key] = [y for _, y in points]
    # 20 ms drawn apart from 14-16 ms (SVG y grows downwards) despite the 2,379 ms max (on a linear axis of
    # this height the 4 ms between them were under one pixel)
    assert min(ys["agent_jobs-tables_to_supabase"]) - max(ys["rate_limits-supabase_to_tables"]) > 8, ys
    jobs = ys["agent_jobs-tables_to_supabase"]
    assert max(jobs) - min(jobs) > 4, "14 and 16 ms on the same pixel row"
    # one bucket: a time axis of minutes around it, not years (the points spread over the plot's width)
    xs = re.findall(r"[ML]\s*(-?[\d.]+)\s", re.search(r'<g id="lag-agent_jobs-tables_to_supabase">.*?<path d="([^"]+)"',
                                                       svg, re.S).group(1))
    assert float(xs[-1]) - float(xs[0]) > (axes[2] - axes[0]) / 4

    shot = tmp_path / "few.png"
    run = chromium(f"--screenshot={shot}", "--window-size=1100,700", out.as_uri(), tmp=tmp_path)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    (Path(os.environ["ZSYNC_REPORT_PNG"]) if os.environ.get("ZSYNC_REPORT_PNG") else tmp_path / "x").write_bytes(
        shot.read_bytes())
