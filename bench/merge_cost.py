"""The field-level merge's cost (issue 20 item 5), measured merge on vs off in one run:

* batched apply: ``zsync.sync_apply_many`` of ``--n`` agent_jobs records in batches of 1,000 (new records, then
  the same ids one version newer from Tables), merge on vs ``SET zsync.field_merge = 'off'`` (the seed's
  whole-record rule: no base looked up, and the sync's own apply queued for an echo check as before),
  interleaved, best of ``--reps``; embedded Postgres;
* lag: end to end through the local stack, a Tables -> Supabase change (trigger inbox) and a Supabase -> Tables
  change, in alternating blocks with ``zsync.set_field_merge`` on and off (the setting every function reads).

Goal: on / off at most 1.10 for each. Printed by ``make bench`` (bench/lag.py) and by

    python -m bench.merge_cost [--n 10000] [--reps 3] [--e2e 30]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from bench.databases import migrated_database
from infra.local.postgres import start_postgres

GOAL = 1.10
TS = "2026-01-01T00:00:00.000Z"
LATER = "2026-01-02T00:00:00.000Z"


def _payloads(prefix: str, ts: str, n: int, batch: int) -> list[str]:
    rows = [{"id": f"{prefix}-{i:07d}", "status": "queued" if ts == TS else "running", "parameters": {"k": i},
             "updated_at": ts} for i in range(n)]
    return [json.dumps([{"row": r, "edited_at": None} for r in rows[i:i + batch]]) for i in range(0, n, batch)]


def apply_rate(url: str, n: int, batch: int, prefix: str, merge: bool) -> tuple[float, float]:
    """(inserts/s, updates/s) of zsync.sync_apply_many with the merge on or off for the session."""
    rates = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"SET zsync.field_merge = '{'on' if merge else 'off'}'")
        for ts in (TS, LATER):
            payloads = _payloads(prefix, ts, n, batch)
            start = time.perf_counter()
            for p in payloads:
                with conn.transaction():
                    got = conn.execute("SELECT count(*) FILTER (WHERE outcome = 'applied') "
                                       "FROM zsync.sync_apply_many('public.agent_jobs', %s::jsonb)", (p,)).fetchone()
                    assert got and got[0] == len(json.loads(p)), got
            rates.append(n / (time.perf_counter() - start))
        pending = conn.execute("SELECT count(*) FROM zsync.outbox WHERE record_id LIKE %s AND acked_at IS NULL",
                               (f"{prefix}-%",)).fetchone()[0]
        assert pending == (0 if merge else 2 * n), pending  # on: no echo left for a drain to check against Tables
    return rates[0], rates[1]


def batched_apply(n: int, reps: int, batch: int = 1000) -> list[tuple[str, str, str]]:
    tmp = Path(tempfile.mkdtemp(prefix="zsync-mergecost-"))
    server = start_postgres(tmp / "pg")
    try:
        url = migrated_database(server.get_uri(), tmp)
        best: dict[bool, list[float]] = {True: [0.0, 0.0], False: [0.0, 0.0]}
        for rep in range(reps):  # interleaved, so machine load hits both alike
            for merge in (False, True):
                ins, upd = apply_rate(url, n, batch, f"m{rep}{'on' if merge else 'off'}", merge)
                best[merge] = [max(best[merge][0], ins), max(best[merge][1], upd)]
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    (on_i, on_u), (off_i, off_u) = best[True], best[False]
    print(f"field merge, batched apply (zsync.sync_apply_many, agent_jobs, {n} rows in batches of {batch}, best of "
          f"{reps}): off inserts {off_i:,.0f} rows/s updates {off_u:,.0f} rows/s; on inserts {on_i:,.0f} rows/s "
          f"updates {on_u:,.0f} rows/s; cost on/off: inserts {off_i / on_i:.3f}x updates {off_u / on_u:.3f}x")
    return [("field merge: batched apply time on/off (updates)", f"{off_u / on_u:.3f}x", f"<= {GOAL:.2f}x"),
            ("field merge: batched apply time on/off (inserts)", f"{off_i / on_i:.3f}x", f"<= {GOAL:.2f}x")]


def _wait(probe: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError("bench: change did not arrive")
        time.sleep(0.002)


def _lags(stack: Any, tables: Any, n: int) -> tuple[list[float], list[float]]:
    """n Tables -> Supabase changes (an update of one record) and n Supabase -> Tables changes, end to end."""
    t2s, s2t = [], []
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        rid = f"bench-m-{uuid.uuid4().hex[:10]}"
        rec = tables.create("agent_jobs", {"id": rid, "status": "s0"})
        _wait(lambda: conn.execute("SELECT 1 FROM agent_jobs WHERE id = %s", (rid,)).fetchone())
        stack.wait_quiet()
        for i in range(n):
            start = time.perf_counter()
            tables.patch("agent_jobs", rec["id"], {"status": f"t{i}"})
            _wait(lambda i=i: conn.execute("SELECT 1 FROM agent_jobs WHERE id = %s AND status = %s",
                                           (rid, f"t{i}")).fetchone())
            t2s.append(time.perf_counter() - start)
            start = time.perf_counter()
            conn.execute("UPDATE agent_jobs SET error_message = %s WHERE id = %s", (f"s{i}", rid))
            _wait(lambda i=i: (tables.find("agent_jobs", rid) or {}).get("data", {}).get("error_message") == f"s{i}")
            s2t.append(time.perf_counter() - start)
            stack.wait_quiet()
    return t2s, s2t


def lag(stack: Any, tables: Any, n: int, blocks: int = 4) -> list[tuple[str, str, str]]:
    """End-to-end lag merge on vs off, in alternating blocks of n // blocks changes each way."""
    got: dict[bool, tuple[list[float], list[float]]] = {True: ([], []), False: ([], [])}
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        try:
            for block in range(2 * blocks):
                merge = block % 2 == 1
                conn.execute("SELECT zsync.set_field_merge(%s)", (merge,))
                t2s, s2t = _lags(stack, tables, max(1, n // blocks))
                got[merge][0].extend(t2s)
                got[merge][1].extend(s2t)
        finally:
            conn.execute("SELECT zsync.set_field_merge(true)")
    rows = []
    for k, name in ((0, "tables->supabase"), (1, "supabase->tables")):
        on, off = statistics.mean(got[True][k]), statistics.mean(got[False][k])
        print(f"field merge, lag {name}: off avg {off * 1000:.1f} ms, on avg {on * 1000:.1f} ms "
              f"(p50 {statistics.median(got[False][k]) * 1000:.1f} / {statistics.median(got[True][k]) * 1000:.1f} ms;"
              f" n={len(got[True][k])} each): on/off {on / off:.3f}x")
        rows.append((f"field merge: lag {name} on/off", f"{on / off:.3f}x ({on * 1000:.1f} vs {off * 1000:.1f} ms)",
                     f"<= {GOAL:.2f}x"))
    return rows


def main(argv: list[str] | None = None) -> None:
    from infra.local.stack import running_stack
    from infra.local.tables_service import RATE_WINDOW_S
    from infra.local.tables_service.counters import RateLimiter
    from tests.e2e import Tables

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="rows per batched-apply measurement")
    parser.add_argument("--reps", type=int, default=3, help="batched apply: repetitions, best of each")
    parser.add_argument("--e2e", type=int, default=40, help="changes each way per setting for the lag")
    args = parser.parse_args(argv)
    summary = batched_apply(args.n, args.reps)
    tmp = Path(tempfile.mkdtemp(prefix="zsync-mergecost-stack-"))
    try:
        with running_stack(tmp / "stack", sweep_interval_s=3600) as stack:
            stack.tables.ctx.limiter = RateLimiter(None, RATE_WINDOW_S)  # lag, not Zapier's rate limit
            summary += lag(stack, Tables(stack), args.e2e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name, value, goal in summary:
        print(f"{name:<50} {value:<36} {goal}")


if __name__ == "__main__":
    main()
