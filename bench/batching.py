"""Supabase -> Zapier Tables in batches vs one record at a time, under the local Tables service's enforced
default rate limit (100 requests / 5 s per table, Zapier's), on an empty table and on one that already
holds ``--big`` records (100,000 by default).

* burst: ``--burst`` inserts (1,000) in one Supabase transaction, drained by 3 concurrent wake-ups of
  ``agent_jobs_to_tables`` (reserved concurrency 3) through ``shared.services.outbox_batch.drain_outbox``. Goal:
  <= 10 s, <= 30 Tables requests, 0 dead letters, 0 extra writes.
* one-record path: ``--single`` inserts (200) through ``shared.services.to_tables.apply_from_supabase``
  (what every webhook did before), 3 workers, same limit. Goal: batched records/s >= 20x this.
* lag: one change at a time (``--lag`` of them), drained at once: p50 / p99 of the capture -> Tables time.
* find by id: the local service's answer time for one ``exact`` query through its API, p50 over 80
  lookups (it must not grow with the table: it indexes field values).

Both the Postgres and the Tables service are local and embedded (no network); seeding the big table goes
straight into the service's store (not through its rate-limited API: it is not what is measured).

    python -m bench.batching [--burst 1000] [--single 200] [--big 100000] [--lag 50]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from infra.deploy.tables_setup import ensure_tables, table_ids
from infra.local.postgres import create_database, prepare_database, start_postgres
from infra.local.tables_service import RATE_LIMIT, RATE_WINDOW_S, TableConfig, TablesService, start_tables_service
from shared.adapters.zapier_tables import TablesClient
from shared.core.outcome import Outcome
from shared.core.spec import FUNCTIONS, TABLES
from shared.platform.settings import Settings
from shared.services.outbox_batch import drain_outbox
from shared.services.sync import SupabaseWebhook, SyncContext
from shared.services.to_tables import apply_from_supabase

CLIENT_ID, CLIENT_SECRET = "zsync-bench", "bench-secret"
FN = FUNCTIONS["agent_jobs_to_tables"]
WORKERS = 3  # the *_to_tables functions' reserved concurrency


@dataclass
class Env:
    url: str
    service: TablesService
    ids: dict[str, str]

    def ctx(self) -> SyncContext:
        token_url = self.service.url + "/oauth/token/"
        return SyncContext(settings=Settings(
            database_url=self.url, zapier_base_url=self.service.url, zapier_token_url=token_url,
            zapier_client_id=CLIENT_ID, zapier_client_secret=CLIENT_SECRET, table_ids=self.ids,
            retry_budget_s=20.0, db_pool_max=8))

    def requests(self) -> int:
        return self.service.stats()["api_requests"]

    def tables_count(self) -> tuple[int, int]:
        """-> (records, distinct ids) in agent_jobs (directly from the store: not through the limit)."""
        key, tid = _keys(self)["id"], self.ids["agent_jobs"]
        with self.service.ctx.engine.store.transaction() as c:
            rows = c.execute("SELECT count(*), count(DISTINCT value) FROM record_values WHERE table_id = ? "
                             "AND field_id = ?", (tid, int(key[1:]))).fetchone()
        return rows[0], rows[1]


_KEYS: dict[int, dict[str, str]] = {}


def _keys(env: Env) -> dict[str, str]:
    if id(env) not in _KEYS:
        with TablesClient(env.service.url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                          token_url=env.service.url + "/oauth/token/") as c:
            _KEYS[id(env)] = {f.name: f.key for f in c.list_fields(env.ids["agent_jobs"])}
    return _KEYS[id(env)]


def _start(tmp: Path, pg: Any, name: str, big: int) -> Env:
    url = create_database(pg.get_uri(), name)
    prepare_database(url)
    configs = [TableConfig(name=n) for n in TABLES]
    service = start_tables_service(tmp / f"{name}.sqlite3", configs, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                                   rate_limit=RATE_LIMIT, rate_window_s=RATE_WINDOW_S)
    with TablesClient(service.url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                      token_url=service.url + "/oauth/token/") as client:
        ids = table_ids(ensure_tables(client))
    env = Env(url, service, ids)
    if big:
        keys = _keys(env)
        tid = ids["agent_jobs"]
        for start in range(0, big, 5000):
            service.ctx.engine.create_many(tid, [
                {keys["id"]: f"old-{i:07d}", keys["status"]: "done", keys["updated_at"]: "2025-12-22T10:00:00Z"}
                for i in range(start, min(start + 5000, big))])
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT set_config('zsync.origin', 'sync', false)")
            conn.execute("ALTER TABLE agent_jobs DISABLE TRIGGER zsync_outbox_insert")
            conn.execute("INSERT INTO agent_jobs (id, status, updated_at) SELECT 'old-' || lpad(i::text, 7, '0'), "
                         "'done', '2025-12-22T10:00:00Z' FROM generate_series(0, %s - 1) i", (big,))
            conn.execute("ALTER TABLE agent_jobs ENABLE TRIGGER zsync_outbox_insert")
            conn.execute("ANALYZE agent_jobs")
    time.sleep(RATE_WINDOW_S)  # the setup's requests leave the window
    return env


def _insert(url: str, ids: list[str]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO agent_jobs (id, status, job_type, parameters) SELECT x, 'queued', 'bench', "
                     "jsonb_build_object('k', x) FROM unnest(%s::text[]) x", (ids,))


def _outbox(url: str) -> tuple[int, int]:
    """-> (pending, dead letters) of agent_jobs."""
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FILTER (WHERE acked_at IS NULL), "
                            "count(*) FILTER (WHERE ack_outcome = 'dead_letter') FROM zsync.outbox "
                            "WHERE table_name = 'agent_jobs'").fetchone()


@dataclass
class Row:
    name: str
    records: int
    seconds: float
    requests: int
    dead: int
    extra: int
    missing: int

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0


def burst(env: Env, n: int, tag: str, label: str) -> Row:
    ids = [f"{tag}-{i:05d}" for i in range(n)]
    before_records, _ = env.tables_count()
    ctxs = [env.ctx() for _ in range(WORKERS)]
    for c in ctxs:
        c.tables.field_map(env.ids["agent_jobs"])  # warm (a warm Lambda has its field map)
    env.service.ctx.stats.reset()
    _insert(env.url, ids)
    start = time.perf_counter()
    delivered: list[int] = []
    lock = threading.Lock()

    def wake(c: SyncContext) -> None:  # one webhook invocation per worker; the rest of the burst finds no work
        got = drain_outbox(c, FN).count(Outcome.APPLIED)
        with lock:
            delivered.append(got)

    threads = [threading.Thread(target=wake, args=(c,)) for c in ctxs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    while _outbox(env.url)[0]:  # what a wake-up left (budget): the next webhooks of the burst take it
        drain_outbox(ctxs[0], FN)
    seconds = time.perf_counter() - start
    records, distinct = env.tables_count()
    _, dead = _outbox(env.url)
    return Row(f"batched burst ({label})", n, seconds, env.requests(), dead, records - distinct,
               n - (records - before_records))


def single(env: Env, n: int, tag: str, label: str) -> Row:
    ids = [f"{tag}-{i:05d}" for i in range(n)]
    ctxs = [env.ctx() for _ in range(WORKERS)]
    for c in ctxs:
        c.tables.field_map(env.ids["agent_jobs"])
    before_records, _ = env.tables_count()
    _insert(env.url, ids)
    with psycopg.connect(env.url) as conn:
        rows = {r[0]: r[1] for r in conn.execute("SELECT id, to_jsonb(t) FROM agent_jobs t WHERE id = ANY(%s)",
                                                  (ids,))}
    env.service.ctx.stats.reset()
    failed: list[str] = []
    queue = list(ids)
    lock = threading.Lock()

    def worker(c: SyncContext) -> None:
        while True:
            with lock:
                if not queue:
                    return
                rid = queue.pop()
            hook = SupabaseWebhook.model_validate({"type": "INSERT", "table": "agent_jobs", "schema": "public",
                                                   "record": rows[rid]})
            try:
                apply_from_supabase(c, FN, hook)
            except Exception:  # a 429 beyond the budget: the delivery would be dead-lettered
                with lock:
                    failed.append(rid)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in ctxs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    records, distinct = env.tables_count()
    return Row(f"one-record path ({label})", n, seconds, env.requests(), len(failed), records - distinct,
               n - (records - before_records))


def lag(env: Env, n: int, tag: str) -> tuple[float, float]:
    ctx = env.ctx()
    ctx.tables.field_map(env.ids["agent_jobs"])
    out = []
    for i in range(n):
        _insert(env.url, [f"{tag}-lag-{i:04d}"])
        drain_outbox(ctx, FN)
        with psycopg.connect(env.url) as conn:
            out.append(conn.execute("SELECT extract(epoch FROM acked_at - created_at) * 1000 FROM zsync.outbox "
                                    "WHERE record_id = %s", (f"{tag}-lag-{i:04d}",)).fetchone()[0])
        time.sleep(0.1)  # 2 requests per change stay far under the limit
    out.sort()
    return statistics.median(out), out[min(len(out) - 1, int(len(out) * 0.99))]


def find_ms(env: Env, n: int = 80) -> float:
    """p50 of one find by id through the service's API (HTTP included), ``n`` < the rate limit."""
    times = []
    with TablesClient(env.service.url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                      token_url=env.service.url + "/oauth/token/") as c:
        tid = env.ids["agent_jobs"]
        c.field_map(tid)
        for i in range(n):
            start = time.perf_counter()
            c.find_by_field(tid, "id", f"old-{i * 37:07d}")
            times.append((time.perf_counter() - start) * 1000)
    time.sleep(RATE_WINDOW_S)
    return statistics.median(times)


def run(burst_n: int = 1000, single_n: int = 200, big: int = 100_000, lag_n: int = 50) -> list[tuple[str, str, str]]:
    """Run everything, print the details; -> summary rows (figure, measured, goal) for ``make bench``."""
    tmp = Path(tempfile.mkdtemp(prefix="zsync-bench-batch-"))
    pg = start_postgres(tmp / "pg")
    envs: list[Env] = []
    rows: list[Row] = []
    lags: dict[str, tuple[float, float]] = {}
    finds: dict[str, float] = {}
    try:
        for label, size in (("empty", 0), (f"{big:,} records", big)):
            print(f"batching: preparing a table with {label} ...", flush=True)
            env = _start(tmp, pg, f"b{size}", size)
            envs.append(env)
            finds[label] = find_ms(env)
            lags[label] = lag(env, lag_n, f"l{size}")
            time.sleep(RATE_WINDOW_S)
            rows.append(burst(env, burst_n, f"burst{size}", label))
            time.sleep(RATE_WINDOW_S)
            rows.append(single(env, single_n, f"one{size}", label))
            time.sleep(RATE_WINDOW_S)
    finally:
        for env in envs:
            env.service.stop()
        pg.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nSupabase -> Tables under the enforced limit ({RATE_LIMIT} requests / {RATE_WINDOW_S:g} s per table), "
          f"{WORKERS} concurrent invocations")
    print(f"{'':<40}{'records':>8}{'seconds':>9}{'rec/s':>9}{'Tables req':>11}{'dead':>6}{'extra':>7}"
          f"{'missing':>8}")
    for r in rows:
        print(f"{r.name:<40}{r.records:>8}{r.seconds:>9.2f}{r.rate:>9.1f}{r.requests:>11}{r.dead:>6}{r.extra:>7}"
              f"{r.missing:>8}")
    summary = []
    for i in range(0, len(rows), 2):
        b, s = rows[i], rows[i + 1]
        where = b.name.split("(")[1].rstrip(")")
        summary.append((f"batch burst of {b.records} ({where}): time, requests",
                        f"{b.seconds:.2f} s, {b.requests} req, {b.dead} dead, {b.extra + b.missing} extra/missing",
                        "<= 10 s, <= 30, 0, 0"))
        summary.append((f"batched vs one-record records/s ({where})",
                        f"{b.rate / s.rate:.0f}x ({b.rate:.0f} vs {s.rate:.1f} rec/s)", ">= 20x"))
    for label, (p50, p99) in lags.items():
        summary.append((f"supabase->tables lag, one change ({label})", f"p50 {p50:.1f} ms, p99 {p99:.1f} ms",
                        "same at any size"))
        summary.append((f"local Tables find by id ({label})", f"p50 {finds[label]:.2f} ms", "same at any size"))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--single", type=int, default=200)
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--lag", type=int, default=50)
    args = parser.parse_args(argv)
    summary = run(args.burst, args.single, args.big, args.lag)
    width = max(len(name) for name, _, _ in summary)
    print(f"\nSUMMARY\n{'figure':<{width}}  {'measured':<52} goal")
    for name, value, goal in summary:
        print(f"{name:<{width}}  {value:<52} {goal}")


if __name__ == "__main__":
    main()
