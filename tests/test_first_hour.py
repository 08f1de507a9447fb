"""A new user's first hour (issue 22): `make up` with a busy port, doctor on the local stack, one-line
connection errors, gcloud refusing missing settings, tool output under an ignored folder, status at 80
columns, the same dead-letter figure everywhere, quiet idle trash checks, the lag plot readable."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from tests.e2e import eventually

REPO = Path(__file__).resolve().parent.parent
ZSYNC = Path(sys.executable).parent / "zsync"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZSYNC_")}
    return env | {"COLUMNS": "80"} | extra


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_range(width: int = 10) -> int:
    for _ in range(50):
        base = random.randrange(20000, 40000, 10)
        if all(_port_free(p) for p in range(base, base + width)):
            return base
    raise RuntimeError("no free port range")


# --- 1. make up with a busy port -----------------------------------------------------------------


def _stop_hung_stack(proc: subprocess.Popen, state_dir: Path) -> None:
    """What a hung `zsync up` left: its process group, and the Postgres it started (its own daemon)."""
    os.killpg(proc.pid, 9)
    proc.communicate(timeout=30)
    pid_file = state_dir / "pg" / "postmaster.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text().split()[0]), 15)


def test_up_with_a_busy_port_exits_at_once_naming_it(tmp_path: Path) -> None:
    base = _free_range()
    with socket.socket() as held:  # another program on moto's port (base + 9), as 8709 was
        held.bind(("127.0.0.1", base + 9))
        held.listen()
        started = time.monotonic()
        proc = subprocess.Popen([str(ZSYNC), "up", "--port-base", str(base), "--state-dir", str(tmp_path / "st")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_clean_env(),
                                start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            _stop_hung_stack(proc, tmp_path / "st")
            pytest.fail("zsync up hung with a busy port")
    assert proc.returncode == 1
    assert time.monotonic() - started < 20
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert str(base + 9) in lines[0] and "moto" in lines[0]
    assert f"PORT_BASE={base + 100}" in lines[0] and "PORT_BASE=0" in lines[0]
    assert not (tmp_path / "st" / "pg").exists()  # nothing was started


def test_make_up_passes_the_port_choice_through() -> None:
    out = subprocess.run(["make", "-n", "up", "PORT_BASE=8800"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert "zsync up --port-base 8800" in out
    default = subprocess.run(["make", "-n", "up"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "zsync up --port-base 8700" in default


# --- 5. one-line connection errors ---------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", [["status"], ["report", "--out", "{tmp}/r.html"], ["monitor"], ["migrate"],
                                     ["reconcile", "--dry-run", "--no-progress"]])
@pytest.mark.parametrize("kind", ["unreachable", "malformed"])
def test_a_bad_database_url_is_one_line_naming_what_to_check(command: list[str], kind: str, tmp_path: Path) -> None:
    url = (f"postgresql://zsync:hunter2secret@127.0.0.1:{_closed_port()}/zsync" if kind == "unreachable"
           else "postgres//not a url")
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    env = _clean_env(ZSYNC_DATABASE_URL=url)
    run = subprocess.run([str(ZSYNC), *args], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert "Traceback" not in run.stderr and "hunter2secret" not in run.stderr + run.stdout
    assert "ZSYNC_DATABASE_URL" in lines[0]
    assert ("cannot connect to the database" if kind == "unreachable" else "malformed") in lines[0]


def test_wire_setup_and_replay_say_an_unreachable_service_in_one_line(tmp_path: Path) -> None:
    from infra.deploy import write_urls
    from shared.core.spec import FUNCTIONS

    urls = write_urls(tmp_path / "urls.json", {name: "http://127.0.0.1:9/" for name in FUNCTIONS})
    port = _closed_port()
    runs = {
        "ZSYNC_DATABASE_URL": subprocess.run(
            [str(ZSYNC), "wire", "supabase", "--urls", str(urls)], capture_output=True, text=True, timeout=120,
            env=_clean_env(ZSYNC_DATABASE_URL=f"postgresql://u:pw@127.0.0.1:{port}/x", ZSYNC_WEBHOOK_SECRET="s")),
        "ZSYNC_ZAPIER_BASE_URL": subprocess.run(
            [str(ZSYNC), "setup", "zapier", "--out", str(tmp_path / "ids.json")], capture_output=True, text=True,
            timeout=120, env=_clean_env(ZSYNC_ZAPIER_BASE_URL=f"http://127.0.0.1:{port}",
                                        ZSYNC_ZAPIER_TOKEN_URL=f"http://127.0.0.1:{port}/oauth/token/",
                                        ZSYNC_ZAPIER_CLIENT_ID="a", ZSYNC_ZAPIER_CLIENT_SECRET="b",
                                        ZSYNC_RETRY_BUDGET_S="1")),
    }
    runs["ZSYNC_DLQ_URL"] = subprocess.run(
        [str(ZSYNC), "replay"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env=_clean_env(ZSYNC_DLQ_URL=f"http://127.0.0.1:{port}/000000000000/q",
                       ZSYNC_AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="x",
                       AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1"))
    for names, run in runs.items():
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert run.returncode in (1, 2) and len(lines) == 1, run.stderr
        assert names in lines[0] and "Traceback" not in run.stderr


# --- 10. gcloud refuses missing settings -----------------------------------------------------------


def test_gcloud_refuses_missing_table_ids() -> None:
    from infra.deploy import DeployError
    from infra.deploy.gcloud import render_script
    from shared.platform.settings import Settings

    with pytest.raises(DeployError, match="no table id for agent_jobs, agent_decisions, audit_log, rate_limits"):
        render_script("p", "r", Settings(table_ids={}))
    with pytest.raises(DeployError, match="no table id for rate_limits"):
        render_script("p", "r", Settings(table_ids={"agent_jobs": "a", "agent_decisions": "b", "audit_log": "c"}))
    ids = {"agent_jobs": "a", "agent_decisions": "b", "audit_log": "c", "rate_limits": "d"}
    assert "{}" not in render_script("p", "r", Settings(table_ids=ids))


# --- 6. tool output under an ignored folder --------------------------------------------------------


def test_report_writes_under_an_ignored_folder_by_default() -> None:
    from infra.cli import report

    default = report.__defaults__[1].default  # type: ignore[index]
    path = Path(default)
    assert path.is_absolute() and path.parent == REPO / ".zsync"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO)
    assert ignored.returncode == 0, f"{path} is not ignored by git"


# --- 4. status at 80 columns; 9. the same dead-letter figure ------------------------------------------


def _row(table: str, direction: str, **figures: Any) -> dict[str, Any]:
    base = {"function": f"{table}_x", "table": table, "direction": direction, "applied": 12345, "unchanged": 678,
            "skipped_stale": 9, "rejected": 10, "failed": 11, "conflicts": 12, "lag_p50_s": 0.014,
            "lag_p95_s": 0.2, "lag_max_s": 2.379, "lag_avg_s": 0.02, "repairs": 3, "breaches": []}
    return base | figures


def test_status_is_readable_at_80_columns() -> None:
    from infra import status as st

    data = {"functions": [_row(t, d) for t in ("agent_jobs", "agent_decisions", "audit_log", "rate_limits")
                          for d in ("tables_to_supabase", "supabase_to_tables")],
            "outbox": [], "inboxes": [], "dead_letters": 0, "dead_letters_problem": None, "reachability": []}
    out = io.StringIO()
    st.render(Console(file=out, width=80, force_terminal=False), data, "1h")
    text = out.getvalue()
    assert "…" not in text, text
    for header in ("applied", "unchanged", "stale", "rejected", "failed", "conflicts", "lag p50", "p95", "max",
                   "repairs", "agent_decisions", "to Supabase", "to Tables", "2.4 s"):
        assert header in text, (header, text)
    assert max(len(line) for line in text.splitlines()) <= 80


def test_dead_letters_read_the_same_everywhere() -> None:
    from infra.status import DLQ_NOT_CONFIGURED, dead_letters, dead_letters_text
    from shared.platform.settings import Settings

    assert dead_letters(Settings(dlq_url=None)) == (None, DLQ_NOT_CONFIGURED)
    assert dead_letters_text(0, None) == "0"
    assert dead_letters_text(None, None) == DLQ_NOT_CONFIGURED


# --- 2. doctor and 9. monitor on the local stack, nothing exported ------------------------------------


@pytest.fixture
def stack_file(stack: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from shared.platform.settings import reset_settings

    for key in [k for k in os.environ if k.startswith("ZSYNC_")]:
        monkeypatch.delenv(key)
    reset_settings()
    path = tmp_path / "stack.json"
    path.write_text(json.dumps(stack.info()))
    yield path
    reset_settings()


def test_doctor_on_the_local_stack_needs_no_exported_variable(stack: Any, stack_file: Path) -> None:
    from infra.cli import app

    stack.sweep_outbox(60)
    stack.check_trash()
    result = CliRunner().invoke(app, ["doctor", "--urls", str(stack_file), "--timeout", "10"])
    assert result.exit_code == 0, result.output
    assert "All checks passed" in result.output
    assert stack.info()["secret"] not in result.output


def test_monitor_and_status_show_the_stack_dead_letter_depth_alike(stack: Any, stack_file: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from infra import cli
    from shared.adapters import dead_letter

    dead_letter.reset_clients()
    monkeypatch.setattr(cli, "STATE", stack_file.parent)  # where `make up` writes stack.json
    runner = CliRunner()
    monitor = runner.invoke(cli.app, ["monitor", "--json", "--no-slack"])
    status = runner.invoke(cli.app, ["status", "--json"])
    depth_monitor = json.loads(monitor.stdout)["health"]["dead_letters"]
    depth_status = json.loads(status.stdout.strip().splitlines()[-1])["dead_letters"]
    assert depth_status is not None
    assert depth_monitor == depth_status


# --- 8. idle trash checks are quiet ---------------------------------------------------------------------


def test_an_idle_trash_check_logs_nothing_a_real_delete_does(stack: Any, tables: Any) -> None:
    log = Path(stack.functions["agent_jobs_to_supabase"].log_path)
    stack.check_trash()  # apply whatever earlier tests left in the trash
    time.sleep(0.5)
    before = log.stat().st_size
    for _ in range(3):
        stack.check_trash()
    time.sleep(1.0)  # the function's log lines are written a moment after its answer
    idle = log.read_bytes()[before:].decode(errors="replace")
    assert "trash_checked" not in idle and "check_trash" not in idle, idle

    rid = f"fh-trash-{time.time_ns()}"
    record = tables.create("agent_jobs", {"id": rid, "job_type": "discovery", "status": "queued"})
    stack.wait_quiet()
    tables.client.delete(tables.ids["agent_jobs"], record["id"])  # to the trash, as a person deletes
    # The stack's inboxes are on the deletes-capable trigger: the delete arrives through the inbox (logged, a
    # moment later on a busy machine); the trash check after it finds it applied and stays quiet. (Run at once,
    # the check could apply it first: then the inbox's line is delete_unchanged - a race of the test's own.)
    def applied() -> str | None:
        text = log.read_bytes()[before:].decode(errors="replace")
        return text if '"outcome": "delete_applied"' in text and rid in text else None

    eventually(applied, timeout_s=20)
    after = log.stat().st_size
    stack.check_trash()
    time.sleep(1.0)  # the function's log lines are written a moment after its answer
    assert "trash_checked" not in log.read_bytes()[after:].decode(errors="replace")


# --- 3. the lag plot ---------------------------------------------------------------------------------------


def _series(lags_ms: list[float], max_ms: list[float], start: datetime) -> dict[str, list]:
    return {"t": [(start + timedelta(minutes=5 * i)).isoformat() for i in range(len(lags_ms))],
            "p50_s": [v / 1000 for v in lags_ms], "max_s": [v / 1000 for v in max_ms], "n": [1] * len(lags_ms)}


def test_the_plot_with_one_bucket_spans_minutes_not_years() -> None:
    import matplotlib.dates as mdates
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from infra.report import lag_figure

    now = datetime(2026, 12, 5, 18, 0, tzinfo=UTC)
    fig = lag_figure({"agent_jobs-tables_to_supabase": _series([14], [20], now)})
    ax = fig.axes[0]
    lo, hi = (mdates.num2date(x) for x in ax.get_xlim())
    assert timedelta(minutes=10) <= hi - lo <= timedelta(hours=2)
    FigureCanvasAgg(fig).draw()  # the labels: times, with the date (year included) as the axis offset
    assert "2026" in ax.xaxis.get_major_formatter().get_offset()


def test_the_legend_hides_no_point_and_an_outlier_flattens_nothing() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from infra.report import lag_figure

    now = datetime(2026, 12, 5, 18, 0, tzinfo=UTC)
    fig = lag_figure({"agent_jobs-tables_to_supabase": _series([14, 15, 16, 14], [20, 2379, 30, 20], now),
                      "agent_decisions-supabase_to_tables": _series([20, 19, 20], [30, 40, 30], now)})
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    legend = fig.legends[0].get_window_extent()
    ys = {}
    for line in ax.get_lines():
        for x, y in ax.transData.transform(line.get_xydata()):
            assert not legend.contains(x, y), f"the legend covers a point of {line.get_gid()}"
        ys[line.get_gid()] = ax.transData.transform(line.get_xydata())[:, 1]
    p50_jobs, p50_decisions = ys["lag-agent_jobs-tables_to_supabase"], ys["lag-agent_decisions-supabase_to_tables"]
    assert min(p50_decisions) - max(p50_jobs) > 10, "14-16 ms and 19-20 ms lines are drawn on top of each other"


# --- 7. the help agrees with the docs ------------------------------------------------------------------------


def test_reconcile_help_names_origin_and_client_credentials() -> None:
    from infra.cli import app

    text = " ".join(CliRunner().invoke(app, ["reconcile", "--help"], env={"COLUMNS": "200"}).output.split())
    assert 'metadata.origin = "reconcile"' in text and "metadata.via" not in text
    assert "ZSYNC_ZAPIER_CLIENT_ID" in text and "ZSYNC_ZAPIER_CLIENT_SECRET" in text
