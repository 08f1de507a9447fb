"""Rows/s of ``zsync.sync_apply_many`` (the multi-row conditional upsert) next to a raw
``INSERT ... ON CONFLICT DO UPDATE`` of the same rows into a trigger-less copy of the table, in one run,
before and after migration 20261129820000 (before = a database migrated up to just short of it).

Each case: ``--n`` agent_jobs rows in batches of ``--batch`` (1,000), first as new records (inserts), then the
same ids one version newer (updates); one transaction per batch, as ``apply_many_from_tables`` runs them.
Embedded Postgres on a unix socket; the shared dev machine is noisy, so each figure is the best of ``--reps``.

    python -m bench.apply_many [--n 10000] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import psycopg

from bench.databases import migrated_database, raw_upsert_sql
from infra.local.postgres import start_postgres

MINE = "20261129820000"  # the first migration of this change: "before" stops short of it
TS = "2026-01-01T00:00:00.000Z"
LATER = "2026-01-02T00:00:00.000Z"


def _rows(prefix: str, ts: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}-{i:07d}", "status": "queued", "parameters": {"k": i}, "updated_at": ts}
            for i in range(n)]


def _batches(rows: list[dict], size: int) -> list[list[dict]]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def apply_many_rate(url: str, n: int, batch: int, prefix: str) -> tuple[float, float]:
    """(inserts/s, updates/s) of zsync.sync_apply_many on agent_jobs."""
    rates = []
    with psycopg.connect(url, autocommit=True) as conn:
        for ts in (TS, LATER):
            payloads = [json.dumps([{"row": r, "edited_at": None} for r in b])
                        for b in _batches(_rows(prefix, ts, n), batch)]
            start = time.perf_counter()
            for p in payloads:
                with conn.transaction():
                    got = conn.execute("SELECT count(*) FILTER (WHERE outcome = 'applied') "
                                       "FROM zsync.sync_apply_many('public.agent_jobs', %s::jsonb)", (p,)).fetchone()
                    assert got and got[0] == len(json.loads(p)), got
            rates.append(n / (time.perf_counter() - start))
    return rates[0], rates[1]


def raw_upsert_rate(url: str, n: int, batch: int, prefix: str) -> tuple[float, float]:
    """(inserts/s, updates/s) of a plain INSERT ... ON CONFLICT DO UPDATE of the same rows, trigger-less copy."""
    rates = []
    with psycopg.connect(url, autocommit=True) as conn:
        sql = raw_upsert_sql(conn)
        for ts in (TS, LATER):
            payloads = [json.dumps(b) for b in _batches(_rows(prefix, ts, n), batch)]
            start = time.perf_counter()
            for p in payloads:
                with conn.transaction():
                    conn.execute(sql, (p,))
            rates.append(n / (time.perf_counter() - start))
    return rates[0], rates[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="rows per measurement (inserted, then updated)")
    parser.add_argument("--batch", type=int, default=1000, help="rows per sync_apply_many call")
    parser.add_argument("--reps", type=int, default=3, help="repetitions; the best of each is printed")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="zsync-applymany-"))
    server = start_postgres(tmp / "pg")
    try:
        dbs = {label: migrated_database(server.get_uri(), tmp, MINE if label == "before" else None)
               for label in ("before", "after")}
        best: dict[str, list[float]] = {}
        for rep in range(args.reps):  # interleaved, so machine load hits both alike
            for label, url in dbs.items():
                for name, fn in ((f"{label} sync_apply_many", apply_many_rate),
                                 (f"{label} raw upsert", raw_upsert_rate)):
                    ins, upd = fn(url, args.n, args.batch, f"r{rep}")
                    prev = best.setdefault(name, [0.0, 0.0])
                    best[name] = [max(prev[0], ins), max(prev[1], upd)]
        print(f"zsync.sync_apply_many vs raw upsert, agent_jobs, {args.n} rows in batches of {args.batch}, best of "
              f"{args.reps} (embedded Postgres; before = without migrations >= {MINE})")
        for label in dbs:
            ins, upd = best[f"{label} sync_apply_many"]
            rins, rupd = best[f"{label} raw upsert"]
            print(f"  {label:6}  inserts {ins:8,.0f} rows/s ({1e6 / ins:5.1f} us/row) raw {rins:8,.0f} "
                  f"({1e6 / rins:4.1f} us) "
                  f"= {ins / rins:4.0%}   updates {upd:8,.0f} rows/s ({1e6 / upd:5.1f} us/row) raw {rupd:8,.0f} "
                  f"({1e6 / rupd:4.1f} us) = {upd / rupd:4.0%}")
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
