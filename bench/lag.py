"""Sync lag in each direction through the real local stack, against its floor measured in the same run.

* delivery lag vs floor (``--n`` deliveries per direction, 1,000 by default): the same body POSTed to the
  function's URL and to a no-op functions-framework target served the same way (``bench/floor_target.py``:
  one INSERT + COMMIT for Tables -> Supabase; one Tables create + one INSERT + COMMIT for Supabase ->
  Tables), alternately, one at a time. The function answers after its commit / Tables write, so the time to
  the answer is the delivery's lag. p50/p99 and ratios to the floor. Goal: p50 <= 2x floor, p99 <= 150 ms.
* end to end (``--e2e``): a Zapier-side create until the row is in Supabase, through the trigger inbox (the
  default path: notification, lease, apply, ack) and through a Zap (the Tables service POSTs the record),
  and an INSERT in Supabase until the record is in Tables (through the pg_net stand-in), as ratios to
  the seed's targets (average < 5 s, 30 s acceptable); then a burst of concurrent writes (writes per user
  write must be 1.0: no echo) and each function process's memory.
* Tables requests per change, each direction, single changes and a burst (``bench/tables_requests.py``).
* cold start, per-delivery CPU and where a delivery's time goes: ``bench/coldstart.py``.

    python -m bench [--n 1000] [--e2e 40] [--burst 200] [--runs 5] [--warm 400]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import requests

from bench import batching, bench_reconcile, coldstart, lease_ledger_cost, merge_cost, tables_requests
from bench.floor_target import TABLE_SQL
from bench.probe import insert_webhook
from infra.local.stack import REPO, LocalStack, free_port, running_stack, wait_listening
from infra.local.tables_service import RATE_WINDOW_S
from infra.local.tables_service.counters import RateLimiter
from shared.platform.settings import DEFAULT_SECRET_HEADER
from tests.e2e import Supabase, Tables

TARGET_AVG_S = 5.0
ACCEPTABLE_S = 30.0
GOAL_P50_RATIO = 2.0
GOAL_P99_MS = 150.0
FLOOR = Path(__file__).with_name("floor_target.py")
DIRECTIONS = {  # direction -> (function, floor target, bodies)
    "tables->supabase": (coldstart.TO_SUPABASE, "floor_to_supabase", coldstart.tables_record),
    "supabase->tables": (coldstart.TO_TABLES, "floor_to_tables", coldstart.supabase_webhook),
}


def _wait(probe: Callable[[], Any], timeout_s: float = 60.0) -> float:
    start = time.perf_counter()
    while not probe():
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError("record never arrived")
        time.sleep(0.002)
    return time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- delivery lag against its floor -------------------------------------------------------------------------


@contextmanager
def floor_processes(stack: LocalStack) -> Any:
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(TABLE_SQL)
    env = {**stack.function_env(), "ZSYNC_BENCH_DATABASE_URL": stack.database_url,
           "ZSYNC_BENCH_TABLE": "agent_decisions"}
    procs, urls = [], {}
    log = (stack.config.state_dir / "floor.log").open("ab")
    try:
        for _direction, (_fn, target, _bodies) in DIRECTIONS.items():
            port = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "functions_framework", "--source", str(FLOOR), "--target", target,
                 "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
            urls[target] = f"http://127.0.0.1:{port}/"
        for url in urls.values():
            wait_listening(int(url.rsplit(":", 1)[1].strip("/")))
        yield urls
    finally:
        log.close()
        for p in procs:
            p.terminate()
            p.wait(10)


def delivery_lags(stack: LocalStack, n: int) -> dict[str, tuple[list[float], list[float]]]:
    """direction -> (our lags, floor lags) in seconds, measured alternately. Supabase -> Tables webhooks are
    those of rows really inserted just before (the change is in the outbox, as a real webhook's is)."""
    session = requests.Session()
    headers = {DEFAULT_SECRET_HEADER: stack.secret, "Content-Type": "application/json"}

    def post(url: str, body: str) -> float:
        start = time.perf_counter()
        r = session.post(url, data=body, headers=headers, timeout=30)
        elapsed = time.perf_counter() - start
        assert r.status_code == 200, (url, r.status_code, r.text[:300])
        return elapsed

    out = {}
    with floor_processes(stack) as floor_urls, coldstart.webhook_trigger_off(stack), \
            psycopg.connect(stack.database_url, autocommit=True) as owner:
        for direction, (fn, target, bodies) in DIRECTIONS.items():
            ours_url, floor_url = stack.functions[fn].url, floor_urls[target]
            real = (lambda body: insert_webhook(owner, body)) if fn == coldstart.TO_TABLES else (lambda body: body)
            for body in bodies(20):  # warm-up: connections, pools, the logging library
                post(ours_url, real(body))
                post(floor_url, body)
            ours, floor = [], []
            for a, b in zip(bodies(n), bodies(n), strict=True):
                ours.append(post(ours_url, real(a)))
                floor.append(post(floor_url, b))
            out[direction] = (ours, floor)
    return out


def report_delivery_lags(lags: dict[str, tuple[list[float], list[float]]]) -> list[tuple[str, str, str]]:
    rows = []
    print(f"{'delivery lag (POST -> answer)':<30} {'n':>5} {'p50':>8} {'p99':>8} {'floor p50':>10} {'floor p99':>10} "
          f"{'p50/floor':>10} {'p99/floor':>10}")
    for direction, (ours, floor) in lags.items():
        o50, o99, f50, f99 = (pct(v, q) * 1000 for v, q in ((ours, .5), (ours, .99), (floor, .5), (floor, .99)))
        print(f"  {direction:<28} {len(ours):>5} {o50:6.1f}ms {o99:6.1f}ms {f50:8.1f}ms {f99:8.1f}ms "
              f"{o50 / f50:9.2f}x {o99 / f99:9.2f}x")
        rows.append((f"lag {direction} p50 / floor", f"{o50 / f50:.2f}x ({o50:.1f} / {f50:.1f} ms)",
                     f"<= {GOAL_P50_RATIO:.0f}x"))
        rows.append((f"lag {direction} p99", f"{o99:.1f} ms ({o99 / GOAL_P99_MS:.2f}x of goal; floor {f99:.1f})",
                     f"<= {GOAL_P99_MS:.0f} ms"))
    return rows


# --- end to end through the trigger inbox or the Zap trigger, and the pg_net stand-in ---------------------


def tables_to_supabase(stack: LocalStack, tables: Tables, n: int) -> list[float]:
    lags = []
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        for _ in range(n):
            rid = f"bench-t-{uuid.uuid4().hex[:10]}"
            start = time.perf_counter()
            tables.create("agent_jobs", {"id": rid, "status": "queued", "parameters": "{\"metro\": \"Austin\"}"})
            _wait(lambda rid=rid: conn.execute("SELECT 1 FROM agent_jobs WHERE id = %s", (rid,)).fetchone())
            lags.append(time.perf_counter() - start)
    return lags


@contextmanager
def zap_path(stack: LocalStack, table: str) -> Any:
    """The seed's Zap path for one table on the running stack: the Tables service POSTs each change to the
    function (a Zap's trigger + webhook step) and the table's trigger inbox is paused (it gets no messages)."""
    fn = f"{table}_to_supabase"
    inbox = stack.inboxes[fn]
    base = stack.tables.url
    requests.post(f"{base}/_admin/inboxes/{inbox}/pause", json={"reason": "user"}, timeout=10).raise_for_status()
    requests.put(f"{base}/_admin/tables/{stack.table_ids[table]}/trigger", json={"url": stack.functions[fn].url},
                 timeout=10).raise_for_status()
    try:
        yield
    finally:
        requests.put(f"{base}/_admin/tables/{stack.table_ids[table]}/trigger", json={"url": None}, timeout=10)
        with stack.tables_client() as client:
            from shared.adapters.trigger_inbox import InboxClient

            InboxClient.for_tables(client).resume(inbox)


def supabase_to_tables(stack: LocalStack, tables: Tables, n: int) -> list[float]:
    lags = []
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        for _ in range(n):
            rid = f"bench-s-{uuid.uuid4().hex[:10]}"
            start = time.perf_counter()
            conn.execute("INSERT INTO agent_decisions (id, decision, confidence) VALUES (%s, 'qualified', 0.87)",
                         (rid,))
            _wait(lambda rid=rid: tables.find("agent_decisions", rid) is not None)
            lags.append(time.perf_counter() - start)
    return lags


def report_e2e(name: str, lags: list[float]) -> tuple[str, str, str]:
    avg = statistics.mean(lags)
    print(f"  {name:<28} n={len(lags):<4} avg={avg * 1000:7.1f} ms  p50={pct(lags, .5) * 1000:7.1f} ms  "
          f"p95={pct(lags, .95) * 1000:7.1f} ms  max={max(lags) * 1000:7.1f} ms  "
          f"avg/target(5 s)={avg / TARGET_AVG_S:.4f}  max/acceptable(30 s)={max(lags) / ACCEPTABLE_S:.4f}")
    return (f"end to end {name} avg", f"{avg * 1000:.0f} ms ({avg / TARGET_AVG_S:.3f}x of 5 s)", "< 5 s")


def burst(stack: LocalStack, tables: Tables, supabase: Supabase, size: int) -> tuple[str, str, str]:
    """``size`` concurrent Zapier-side writes: drain time and writes per user write on the other side."""
    before_t = tables.writes("rate_limits")
    before_s = supabase.writes("rate_limits")
    ids = [f"bench-b-{uuid.uuid4().hex[:10]}" for _ in range(size)]
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda rid: tables.create("rate_limits", {"id": rid, "service_name": "serp", "quota_limit": 10}),
                      ids))
    _wait(lambda: supabase.query("SELECT count(*) FROM rate_limits WHERE id = ANY(%s)", (ids,))[0][0] == size, 120)
    drained = time.perf_counter() - start
    stack.wait_quiet(60)
    time.sleep(1.0)
    stack.wait_quiet(60)
    supabase_writes = supabase.writes("rate_limits") - before_s
    tables_writes = tables.writes("rate_limits") - before_t
    print(f"  {'burst tables->supabase':<28} n={size:<4} drained in {drained:.2f} s ({size / drained:.0f} records/s); "
          f"supabase writes per user write = {supabase_writes / size:.3f}; "
          f"extra tables writes per user write = {(tables_writes - size) / size:.3f}")
    return ("burst: supabase writes per user write", f"{supabase_writes / size:.3f}", "1.000")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="deliveries per direction against the floor")
    parser.add_argument("--e2e", type=int, default=40, help="sequential end-to-end writes per direction")
    parser.add_argument("--burst", type=int, default=200, help="concurrent writes in the burst")
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per cold-start figure")
    parser.add_argument("--warm", type=int, default=400, help="warm in-process deliveries for CPU / breakdown")
    parser.add_argument("--batch-big", type=int, default=100_000,
                        help="records already in the table for the batching figures (bench/batching.py)")
    parser.add_argument("--reconcile-n", type=int, default=20_000,
                        help="records in the table for the reconcile figures (bench/bench_reconcile.py: with "
                             "and without the rate limit; 100,000 takes about two minutes)")
    parser.add_argument("--merge-n", type=int, default=10_000,
                        help="rows per batched-apply measurement of the field merge's cost (bench/merge_cost.py)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="zsync-bench-"))
    with running_stack(tmp / "stack", sweep_interval_s=3600) as stack:
        # Lag, not Zapier's per-table rate limit (100 requests / 5 s, which back-to-back deliveries exceed):
        # the local service's limiter off (as bench_reconcile's run (a)).
        stack.tables.ctx.limiter = RateLimiter(None, RATE_WINDOW_S)
        print(f"local stack started in {time.perf_counter() - t0:.1f} s "
              f"(pg_net stand-in poll interval {stack.config.pgnet_poll_interval_s} s, plus NOTIFY wake-up)")
        summary = report_delivery_lags(delivery_lags(stack, args.n))
        summary += coldstart.run(stack, tmp, args.runs, args.warm)
        print("end to end (trigger inbox or Zap trigger / pg_net stand-in included)")
        tables, supabase = Tables(stack), Supabase(stack)
        tables_to_supabase(stack, tables, 3)  # warm-up
        supabase_to_tables(stack, tables, 3)
        # Tables -> Supabase both ways Zapier can deliver: trigger inbox (the default: notification, then the
        # function leases, applies, acks) and the seed's Zap (the Tables service POSTs the record).
        summary.append(report_e2e("tables->supabase (inbox)", tables_to_supabase(stack, tables, args.e2e)))
        with zap_path(stack, "agent_jobs"):
            tables_to_supabase(stack, tables, 3)  # warm-up
            summary.append(report_e2e("tables->supabase (zap)", tables_to_supabase(stack, tables, args.e2e)))
        summary.append(report_e2e("supabase->tables", supabase_to_tables(stack, tables, args.e2e)))
        summary.append(burst(stack, tables, supabase, args.burst))
        summary += merge_cost.lag(stack, tables, args.e2e)  # the field merge on vs off (bench/merge_cost.py)
        summary += tables_requests.run(stack)  # Tables requests per change, each direction (issue 21 item 3)
        print("  rss: " + ", ".join(f"{name} {rss_mb(fp.process.pid):.0f} MB"
                                    for name, fp in sorted(stack.functions.items()) if fp.process))
    summary += merge_cost.batched_apply(args.merge_n, reps=3)
    summary += lease_ledger_cost.run()  # a record's edits kept in order across inbox drains
    summary += batching.run(big=args.batch_big)
    summary += bench_reconcile.run(args.reconcile_n)
    width = max(len(name) for name, _, _ in summary)
    print(f"\nSUMMARY (one run on this machine; `make bench`)\n{'figure':<{width}}  {'measured':<44} goal")
    for name, value, goal in summary:
        print(f"{name:<{width}}  {value:<44} {goal}")


if __name__ == "__main__":
    main()
