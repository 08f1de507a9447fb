"""Cold start and per-delivery cost of the functions, against the real local stack.

* cold start: a fresh process (``bench/probe.py``) loads one function as functions-framework does and
  answers its first real delivery; wall time from spawning the process to that answer, median of
  ``--runs``, for a Tables -> Supabase and a Supabase -> Tables function, plus the same through the Lambda
  adapter (no SnapStart: everything imported in the first call), and the floor: the same fresh process
  loading ``bench/floor_target.py`` instead (functions-framework and psycopg, one INSERT; for Supabase ->
  Tables also our Tables client, one create): what the dependencies alone cost. Goal: <= 300 ms.
* the heaviest imports of one more fresh process (``python -X importtime``), by top-level package.
* per-delivery CPU of the request thread (warm, in-process, no I/O wait counted; goal <= 2 ms median) and
  where a warm delivery's wall time goes: parse, DB, Tables, log, the rest.

    python -m bench.coldstart [--runs 5] [--warm 400]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from bench.floor_target import TABLE_SQL
from bench.probe import insert_webhook
from infra.deploy.webhook_sql import trigger_name
from infra.local.stack import LocalStack
from infra.local.tables_service import RATE_WINDOW_S
from infra.local.tables_service.counters import RateLimiter

PROBE = Path(__file__).with_name("probe.py")
FLOOR_SOURCE = Path(__file__).with_name("floor_target.py")
GOAL_COLD_MS = 300.0
GOAL_CPU_MS = 2.0
TO_SUPABASE = "agent_jobs_to_supabase"
TO_TABLES = "agent_decisions_to_tables"


def tables_record(n: int = 1) -> list[str]:
    """What a Zap posts to a *_to_supabase function: the record's fields, flat."""
    return [json.dumps({"id": f"cold-t-{uuid.uuid4().hex[:12]}", "status": "queued",
                        "parameters": "{\"metro\": \"Austin\"}"}) for _ in range(n)]


def supabase_webhook(n: int = 1) -> list[str]:
    """What a Supabase Database Webhook posts to a *_to_tables function."""
    now = datetime.now(UTC).isoformat()
    return [json.dumps({"type": "INSERT", "table": "agent_decisions", "schema": "public", "old_record": None,
                        "record": {"id": f"cold-s-{uuid.uuid4().hex[:12]}", "decision": "qualified",
                                   "confidence": 0.87, "created_at": now, "updated_at": now}})
            for _ in range(n)]


BODIES = {TO_SUPABASE: tables_record, TO_TABLES: supabase_webhook}


@contextmanager
def webhook_trigger_off(stack: LocalStack, table: str = "agent_decisions") -> Iterator[None]:
    """While the bench POSTs the webhooks of rows it inserts (:func:`bench.probe.insert_webhook`) itself: the
    table's webhook trigger is off (its outbox trigger stays on), so the stack's own ``*_to_tables`` process
    does not take the change first."""
    trigger = f'TRIGGER "{trigger_name(table)}"'
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(f'ALTER TABLE public."{table}" DISABLE {trigger}')
        try:
            yield
        finally:
            conn.execute(f'ALTER TABLE public."{table}" ENABLE {trigger}')


def run_probe(stack: LocalStack, target: str, bodies: list[str], tmp: Path, python_flags: tuple[str, ...] = (),
              probe_flags: tuple[str, ...] = (), extra_env: dict[str, str] | None = None,
              real_webhook: bool = True) -> dict[str, Any]:
    """One fresh probe process. A ``*_to_tables`` target gets real webhooks: each record is inserted first (the
    cold one here, the warm ones by the probe), so its change is in the outbox as a real webhook's is."""
    env = stack.function_env() | (extra_env or {})
    if target == TO_TABLES and real_webhook:
        env["ZSYNC_BENCH_OWNER_URL"] = stack.database_url
        probe_flags = (*probe_flags, "--insert")
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            bodies = [insert_webhook(conn, bodies[0]), *bodies[1:]]
    path = tmp / f"{uuid.uuid4().hex}.jsonl"
    path.write_text("\n".join(bodies) + "\n")
    warm = ["--warm", str(len(bodies) - 1)] if len(bodies) > 1 else []
    t0 = time.time()
    done = subprocess.run([sys.executable, *python_flags, str(PROBE), target, str(path), *warm, *probe_flags],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"probe failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1].removeprefix("PROBE "))
    result.update(spawned=t0, stderr=done.stderr)
    return result


FLOORS = {TO_SUPABASE: "floor_to_supabase", TO_TABLES: "floor_to_tables"}


def cold_starts(stack: LocalStack, tmp: Path, runs: int) -> list[tuple[str, list[float], list[float], list[float]]]:
    """Each function fresh, through functions-framework and through the Lambda adapter, and its floor: the
    same kind of fresh process loading ``bench/floor_target.py`` (functions-framework, psycopg, one INSERT;
    for Supabase -> Tables also the Zapier Tables client and one create), interleaved run by run."""
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(TABLE_SQL)
    floor_env = {"ZSYNC_BENCH_DATABASE_URL": stack.database_url, "ZSYNC_BENCH_TABLE": "agent_decisions"}
    rows = []
    for target in (TO_SUPABASE, TO_TABLES):
        ways = {f"{target} (functions-framework)": {},
                f"{target} (Lambda adapter, no SnapStart)": {"probe_flags": ("--lambda",)},
                f"  floor: {FLOORS[target]}": {"probe_flags": ("--source", str(FLOOR_SOURCE)), "env": floor_env,
                                                "floor_of": target}}
        found: dict[str, tuple[list[float], list[float], list[float]]] = {label: ([], [], []) for label in ways}
        for _ in range(runs):
            for label, how in ways.items():
                name = FLOORS[target] if how.get("floor_of") else target
                r = run_probe(stack, name, BODIES[target](), tmp, probe_flags=how.get("probe_flags", ()),
                              extra_env=how.get("env"), real_webhook=not how.get("floor_of"))
                assert r["status"] == 200, r
                totals, imports, cpus = found[label]
                totals.append((r["first"] - r["spawned"]) * 1000)
                imports.append((r["imported"] - r["spawned"]) * 1000)
                cpus.append(r["cpu_first"] * 1000)
        rows += [(label, *values) for label, values in found.items()]
    return rows


def import_top(stack: LocalStack, tmp: Path, top: int = 12) -> tuple[float, list[tuple[str, float]]]:
    """Self import time summed by top-level package (google.cloud.* by its third part) in a fresh probe."""
    r = run_probe(stack, TO_SUPABASE, BODIES[TO_SUPABASE](), tmp, python_flags=("-X", "importtime"))
    by_package: Counter[str] = Counter()
    for line in r["stderr"].split("PROBE first answer")[0].splitlines():
        parts = line.split("|")
        if not line.startswith("import time:") or len(parts) < 3 or not parts[0].split(":")[1].strip().isdigit():
            continue
        name = parts[2].strip()
        package = ".".join(name.split(".")[:3]) if name.startswith("google.") else name.split(".")[0]
        by_package[package] += int(parts[0].split(":")[1]) / 1000
    return (r["first"] - r["spawned"]) * 1000, by_package.most_common(top)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


Row = tuple[str, str, str]  # summary: figure, measured, goal


def report_cold(rows: list[tuple[str, list[float], list[float], list[float]]]) -> list[Row]:
    """Wall time from spawn to the first answer (median, min, max), of which loading the function (import),
    and the process's CPU time to its first answer (less sensitive to a busy machine than wall time); each
    function through functions-framework also as a ratio to its floor (the dependencies' own cold start)."""
    summary = []
    print(f"{'cold start: spawn -> first answer':<56} {'median':>9} {'min':>6} {'max':>6} {'import':>7} "
          f"{'CPU':>7}  goal")
    function_median = 0.0
    for label, totals, imports, cpus in rows:
        med = statistics.median(totals)
        floor = "floor:" in label
        versus = (f"function {function_median / med:.2f}x of this floor" if floor
                  else f"{med / GOAL_COLD_MS:.2f}x of {GOAL_COLD_MS:.0f} ms")
        print(f"  {label:<54} {med:6.0f} ms {min(totals):6.0f} {max(totals):6.0f} {statistics.median(imports):7.0f} "
              f"{statistics.median(cpus):7.0f}  {versus}")
        if floor:
            summary.append((f"cold start {label.split(':')[1].strip()} (floor)",
                            f"{med:.0f} ms; the function {function_median / med:.2f}x of it", "(info)"))
            continue
        if "functions-framework" in label:
            function_median = med
        summary.append((f"cold start {label}", f"{med:.0f} ms median of {len(totals)} ({med / GOAL_COLD_MS:.2f}x "
                        f"of goal; CPU {statistics.median(cpus):.0f} ms)",
                        f"<= {GOAL_COLD_MS:.0f} ms" if "functions-framework" in label else "(info)"))
    return summary


def warm_profile(stack: LocalStack, tmp: Path, warm: int) -> list[dict[str, Any]]:
    out = []
    for target in (TO_SUPABASE, TO_TABLES):
        r = run_probe(stack, target, BODIES[target](warm + 1), tmp)
        assert r["statuses"] == [200], r["statuses"]
        out.append({"target": target, **r})
    return out


CATEGORIES = ("parse", "db", "tables", "log")


def report_warm(profiles: list[dict[str, Any]]) -> list[Row]:
    """CPU per delivery (uninstrumented half), where the wall time goes, and where the CPU goes: per
    delivery of the instrumented half, the thread's CPU inside each part (the DB and Tables parts are the
    client libraries' own work: psycopg, urllib3 and http.client, with our thin wrappers), median."""
    summary = []
    print(f"{'per delivery (warm, in-process)':<34} {'CPU p50':>8} {'CPU p99':>8} {'wall p50':>9}   "
          f"wall split: parse / DB / Tables / log / rest")
    for p in profiles:
        cpu = [c * 1000 for c in p["cpu"]]
        wall = [w * 1000 for w in p["wall"]]
        total = sum(wall)
        parts = {k: v * 1000 for k, v in p["breakdown"].items()}
        rest = total - sum(parts.values())
        split = " / ".join(f"{100 * parts.get(k, 0.0) / total:4.1f}%" for k in CATEGORIES)
        print(f"  {p['target']:<32} {statistics.median(cpu):6.2f}ms {pct(cpu, .99):6.2f}ms "
              f"{statistics.median(wall):7.2f}ms   {split} / {100 * rest / total:4.1f}%   "
              f"CPU p50 {statistics.median(cpu) / GOAL_CPU_MS:.2f}x of {GOAL_CPU_MS:.0f} ms")
        summary.append((f"CPU per delivery {p['target']} p50", f"{statistics.median(cpu):.2f} ms "
                        f"({statistics.median(cpu) / GOAL_CPU_MS:.2f}x of goal)", f"<= {GOAL_CPU_MS:.0f} ms"))
    print(f"{'CPU split per delivery, p50 (ms)':<34} {'total':>8}   {'parse':>6} {'DB':>6} {'Tables':>6} {'log':>6} "
          f"{'rest':>6}   rest = Flask/functions-framework and our own code")
    for p in profiles:
        per = [{k: v * 1000 for k, v in d.items()} for d in p["cpu_split"]]
        med = {k: statistics.median(d.get(k, 0.0) for d in per) for k in ("total", *CATEGORIES)}
        rest = statistics.median(d["total"] - sum(d.get(k, 0.0) for k in CATEGORIES) for d in per)
        print(f"  {p['target']:<32} {med['total']:6.2f}ms   " + " ".join(f"{med[k]:6.2f}" for k in CATEGORIES)
              + f" {rest:6.2f}")
        outside = statistics.median(d["total"] - d.get("db", 0.0) - d.get("tables", 0.0) for d in per)
        summary.append((f"  CPU outside the DB/Tables clients {p['target']}",
                        f"{outside:.2f} ms p50 (instrumented half; total {med['total']:.2f})", "(info)"))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.coldstart", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warm", type=int, default=400, help="warm deliveries for CPU and the breakdown")
    args = parser.parse_args(argv)
    from infra.local.stack import running_stack

    tmp = Path(tempfile.mkdtemp(prefix="zsync-bench-cold-"))
    with running_stack(tmp / "stack", sweep_interval_s=3600) as stack:
        # CPU, not Zapier's per-table rate limit (100 requests / 5 s), which back-to-back deliveries exceed:
        # the local service's limiter off, as in bench/lag.py.
        stack.tables.ctx.limiter = RateLimiter(None, RATE_WINDOW_S)
        run(stack, tmp, args.runs, args.warm)


def run(stack: LocalStack, tmp: Path, runs: int = 5, warm: int = 400) -> list[Row]:
    with webhook_trigger_off(stack):
        return _run(stack, tmp, runs, warm)


def _run(stack: LocalStack, tmp: Path, runs: int, warm: int) -> list[Row]:
    summary = report_cold(cold_starts(stack, tmp, runs))
    total, top = import_top(stack, tmp)
    print(f"  -X importtime, one more fresh {TO_SUPABASE} ({total:.0f} ms with importtime's own overhead), "
          "self time by package:")
    print("    " + ", ".join(f"{name} {ms:.0f} ms" for name, ms in top))
    return summary + report_warm(warm_profile(stack, tmp, warm))


if __name__ == "__main__":
    main()
