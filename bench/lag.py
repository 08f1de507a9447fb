"""End-to-end sync lag in each direction through the real local stack, as ratios to the seed's targets
(average < 5 s expected, 30 s acceptable), plus sync writes per user write (must be exactly 1.0: no
echo) and the memory of each function process. All figures come from one run on this machine.

    python -m bench [--n 40] [--burst 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg

from infra.local.stack import LocalStack, running_stack
from tests.e2e import Supabase, Tables

TARGET_AVG_S = 5.0
ACCEPTABLE_S = 30.0


def _wait(probe: Callable[[], bool], timeout_s: float = 60.0) -> float:
    start = time.perf_counter()
    while not probe():
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError("record never arrived")
        time.sleep(0.002)
    return time.perf_counter() - start


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _report(name: str, lags: list[float]) -> None:
    avg = statistics.mean(lags)
    print(f"{name:<28} n={len(lags):<4} avg={avg * 1000:7.1f} ms  p50={_pct(lags, .5) * 1000:7.1f} ms  "
          f"p95={_pct(lags, .95) * 1000:7.1f} ms  max={max(lags) * 1000:7.1f} ms  "
          f"avg/target(5 s)={avg / TARGET_AVG_S:.4f}  max/acceptable(30 s)={max(lags) / ACCEPTABLE_S:.4f}")


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


def burst(stack: LocalStack, tables: Tables, supabase: Supabase, size: int) -> None:
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
    print(f"{'burst tables->supabase':<28} n={size:<4} drained in {drained:.2f} s ({size / drained:.0f} records/s); "
          f"supabase writes per user write = {supabase_writes / size:.3f}; "
          f"extra tables writes per user write = {(tables_writes - size) / size:.3f}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40, help="sequential writes per direction")
    parser.add_argument("--burst", type=int, default=200, help="concurrent writes in the burst")
    args = parser.parse_args()
    t0 = time.perf_counter()
    with running_stack(Path(tempfile.mkdtemp(prefix="zsync-bench-")), sweep_interval_s=3600) as stack:
        print(f"local stack started in {time.perf_counter() - t0:.1f} s "
              f"(pg_net stand-in poll interval {stack.config.pgnet_poll_interval_s} s, plus NOTIFY wake-up)")
        tables, supabase = Tables(stack), Supabase(stack)
        tables_to_supabase(stack, tables, 3)  # warm-up: imports, pools
        supabase_to_tables(stack, tables, 3)
        _report("lag tables->supabase", tables_to_supabase(stack, tables, args.n))
        _report("lag supabase->tables", supabase_to_tables(stack, tables, args.n))
        burst(stack, tables, supabase, args.burst)
        for name, fp in sorted(stack.functions.items()):
            print(f"{'rss ' + name:<36} {rss_mb(fp.process.pid):6.1f} MB")


if __name__ == "__main__":
    main()
