"""Fault injection against the real local stack: nothing lost, nothing doubled.

Four scenarios, each ending with both sides compared record by record (parsed rows, independently of
reconcile): records lost = 0, duplicates = 0. Each prints one summary line (``-s`` shows them):

a. Postgres stopped during a burst of Tables writes: the functions answer 503 and dead-letter every
   delivery; Postgres back; ``replay`` + ``reconcile`` -> identical.
b. The Tables API answering 429 (Retry-After) and then 503 during Supabase -> Tables syncs: the client's
   retries absorb what fits in their budget, the rest is dead-lettered; ``replay`` and the outbox sweeper
   recover it.
c. ``agent_jobs_to_tables`` killed mid-burst of Claude-side inserts: pg_net sends once and the connection
   is refused; after a restart the outbox sweeper (pg_cron's job) re-sends what was never acknowledged.
d. The same burst delivered twice, concurrently and out of order: same state, no duplicate rows, one audit
   entry per source record (and per applied version).

The module runs its own stack (short retry budget and connect timeout so that a dead dependency fails a
delivery in ~2 s instead of ~20 s); its functions, Tables service, Postgres and SQS queue are this
module's alone, so the faults never reach other tests.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from infra.local.stack import LocalStack, running_stack
from infra.reconcile import reconcile
from infra.replay import replay
from shared.adapters.dead_letter import DeadLetterQueue
from shared.adapters.zapier_tables import TablesClient
from shared.core.spec import FUNCTIONS, TABLES, Direction
from shared.platform.settings import Settings
from shared.services.sync import SyncContext
from tests.e2e import Supabase, Tables, uid
from tests.test_reconcile import differences

# Fail fast when a dependency is down; a pool as large as functions-framework's thread count (2 CPUs x 4) so a
# burst never waits for a connection longer than the 1 s pool timeout.
FAST_ENV = {"ZSYNC_DB_CONNECT_TIMEOUT_S": "1", "ZSYNC_HTTP_TIMEOUT_S": "2", "ZSYNC_DB_POOL_MAX": "16"}
TO_TABLES = [name for name, fn in FUNCTIONS.items() if fn.direction is Direction.TO_TABLES]


def set_function_env(stack: LocalStack, names: list[str], **env: str) -> None:
    """Restart ``names`` with extra ZSYNC_* settings (a redeploy with new configuration)."""
    for name in names:
        stack.restart_function(name, env)


@pytest.fixture(scope="module")
def fstack() -> Iterator[LocalStack]:
    # The Zap path: these scenarios count the Zap pushes the Tables service makes (and their 503s and
    # dead letters); the trigger inbox path's faults are in tests/test_trigger_inbox.py.
    with running_stack(Path(f"/tmp/zsync-faults-{os.getpid()}"), function_env=FAST_ENV, sweep_interval_s=3600,
                       pgnet_poll_interval_s=0.05, retry_budget_s=1.5, zapier_path="zaps") as local:
        yield local


@pytest.fixture(scope="module")
def settings(fstack: LocalStack) -> Settings:
    """What an operator's `zsync replay` / `zsync reconcile` would use against this stack."""
    assert fstack.tables is not None
    return Settings(database_url=fstack.database_url, zapier_base_url=fstack.tables.url, tables_token=fstack.token,
                    table_ids=fstack.table_ids, dlq_url=fstack.dlq_url, aws_endpoint_url=fstack.aws_endpoint_url,
                    webhook_secret=fstack.secret, retry_budget_s=5)


@pytest.fixture(scope="module")
def client(fstack: LocalStack) -> Iterator[TablesClient]:
    assert fstack.tables is not None
    with TablesClient(fstack.tables.url, fstack.token, timeout_s=5, retry_budget_s=10) as c:
        yield c


@pytest.fixture
def tables(fstack: LocalStack) -> Tables:
    return Tables(fstack)


@pytest.fixture
def supabase(fstack: LocalStack) -> Supabase:
    return Supabase(fstack)




def dlq_depth(settings: Settings) -> int:
    return DeadLetterQueue(settings).approximate_depth()


def faults_left(fstack: LocalStack) -> int:
    """How many armed faults the Tables service has not served yet (read in-process)."""
    assert fstack.tables is not None
    return fstack.tables.stats()["faults"]["left"]


def arm(fstack: LocalStack, status: int, count: int, retry_after: int | None = None) -> None:
    assert fstack.tables is not None
    body: dict[str, Any] = {"status": status, "count": count}
    if retry_after is not None:
        body["retry_after"] = retry_after
    requests.post(f"{fstack.tables.url}/_admin/faults", json=body, timeout=5).raise_for_status()


def converge(fstack: LocalStack) -> None:
    fstack.wait_quiet(timeout_s=60)


def check_identical(client: TablesClient, fstack: LocalStack, ids: dict[str, list[str]]) -> tuple[int, int]:
    """Both sides hold the same parsed rows; -> (records lost, duplicates) for this scenario's ids."""
    diff = differences(client, fstack.database_url, fstack.table_ids)
    mine = {i for v in ids.values() for i in v}
    lost = sum(1 for d in diff.values() for key in ("lost", "only_tables", "only_supabase", "differ")
               for i in d.get(key, ()) if i in mine)
    dupes = sum(len(d.get("duplicates", ())) for d in diff.values())
    with psycopg.connect(fstack.database_url) as conn:
        dupes += conn.execute(
            "SELECT count(*) - count(DISTINCT (action, resource_id, metadata->>'source_timestamp', "
            "metadata->>'function')) FROM audit_log WHERE actor_type = 'zapier_sync' AND resource_id = ANY(%s) "
            "AND action <> 'sync_failed'", (sorted(mine),)).fetchone()[0]
    assert diff == {}, diff
    return lost, dupes


def summary(name: str, **numbers: Any) -> None:
    line = " ".join(f"{k}={v}" for k, v in numbers.items())
    print(f"\n[fault scenario {name}] {line}", flush=True)


# --- a. Postgres down during a burst of Tables writes ------------------------------------------------------


def test_a_postgres_down_during_tables_burst(fstack, settings, client, tables, supabase):
    started = time.monotonic()
    ids: dict[str, list[str]] = {"agent_jobs": [uid("fa-job") for _ in range(6)],
                                 "agent_decisions": [uid("fa-dec") for _ in range(3)],
                                 "rate_limits": [uid("fa-rl") for _ in range(3)], "audit_log": []}
    for rid in ids["agent_jobs"][:3]:  # a few before the outage, updated during it
        tables.create("agent_jobs", {"id": rid, "status": "queued", "parameters": '{"n": 1}'})
    converge(fstack)
    assert all(supabase.row("agent_jobs", rid) for rid in ids["agent_jobs"][:3])
    assert fstack.tables is not None
    before = len(fstack.tables.deliveries())
    depth_before = dlq_depth(settings)

    fstack.stop_postgres()
    try:
        for rid in ids["agent_jobs"][:3]:
            tables.update("agent_jobs", rid, {"status": "running", "results": {"ok": True}})
        for rid in ids["agent_jobs"][3:]:
            tables.create("agent_jobs", {"id": rid, "status": "queued"})
        for rid in ids["agent_decisions"]:
            tables.create("agent_decisions", {"id": rid, "decision": "qualified", "confidence": 0.9})
        for rid in ids["rate_limits"]:
            tables.create("rate_limits", {"id": rid, "service_name": "openai", "request_count": 7})
        for _ in range(3):
            rec = tables.create("audit_log", {"action": "lead_scored", "actor": "zapier_agent",
                                              "timestamp": "2025-12-22T10:00:00Z", "compliance_tags": ["gdpr"]})
            ids["audit_log"].append(rec["id"])
        assert fstack.tables.flush(60)
        burst = fstack.tables.deliveries()[before:]
        failed = [d for d in burst if d["status"] == 503]
    finally:
        fstack.start_postgres()
    deliveries = len(burst)
    statuses = sorted(str(d["status"]) for d in burst)
    # every delivery was refused, none half-applied
    assert deliveries == 15 and len(failed) == deliveries, statuses
    dead_lettered = dlq_depth(settings) - depth_before
    assert dead_lettered == deliveries

    report = replay(settings)
    assert report.ok and report.total("applied") == deliveries and report.remaining == 0
    converge(fstack)
    result = reconcile(SyncContext(settings=settings))
    assert result.in_sync, result
    converge(fstack)
    lost, dupes = check_identical(client, fstack, ids)
    assert (lost, dupes) == (0, 0)
    assert supabase.row("agent_jobs", ids["agent_jobs"][0])["status"] == "running"
    with psycopg.connect(fstack.database_url) as conn:  # the outage is on record, once per failed delivery
        failed_entries = conn.execute("SELECT count(*) FROM audit_log WHERE action = 'sync_failed' AND "
                                      "resource_id = ANY(%s)", ([i for v in ids.values() for i in v],)).fetchone()[0]
    assert failed_entries == deliveries
    summary("a: postgres stopped during a Tables burst", deliveries=deliveries, faults_injected=len(failed),
            dead_lettered=dead_lettered, replay_applied=report.total("applied"),
            reconcile_repaired=result.total("repaired"), lost=lost, duplicates=dupes,
            seconds=round(time.monotonic() - started, 1))


# --- b. Tables API 429 / 503 during Supabase -> Tables syncs ------------------------------------------------


def _last_response(fstack: LocalStack) -> int:
    with psycopg.connect(fstack.database_url, autocommit=True) as conn:
        return conn.execute("SELECT coalesce(max(id), 0) FROM net._http_response").fetchone()[0]


def _responses(fstack: LocalStack, after: int, upto: int | None = None) -> list[tuple[int | None, str | None]]:
    """pg_net's record of the webhook deliveries: (status or None for a transport error/timeout, body)."""
    with psycopg.connect(fstack.database_url, autocommit=True) as conn:
        return conn.execute("SELECT status_code, content FROM net._http_response WHERE id > %s AND id <= %s",
                            (after, upto if upto is not None else 2**62)).fetchall()


def test_b_tables_api_429_then_503(fstack, settings, client, tables, supabase):
    started = time.monotonic()
    # The deployed default budget is 20 s; 8 s leaves room for Retry-After: 1 and a few backoffs.
    set_function_env(fstack, TO_TABLES, ZSYNC_RETRY_BUDGET_S="8")
    ids: dict[str, list[str]] = {"agent_decisions": [uid("fb-dec") for _ in range(8)],
                                 "rate_limits": [uid("fb-rl") for _ in range(8)]}
    depth_before = dlq_depth(settings)
    mark0 = _last_response(fstack)
    try:
        arm(fstack, 429, 6, retry_after=1)  # phase 1: rate limited
        # One statement: one secret-free wake-up for the transaction's 8 rows (zsync.wake, once per table).
        supabase.query("INSERT INTO agent_decisions (id, decision, confidence) SELECT x, 'qualified', 0.8 "
                       "FROM unnest(%s::text[]) x", (ids["agent_decisions"],))
        converge(fstack)
        served_429 = 6 - faults_left(fstack)
        mark1 = _last_response(fstack)
        arm(fstack, 503, 40)  # phase 2: down for longer than some deliveries' retry budget
        supabase.query("INSERT INTO rate_limits (id, service_name, quota_limit) SELECT x, 'serp', 10 "
                       "FROM unnest(%s::text[]) x", (ids["rate_limits"],))
        supabase.query("UPDATE agent_decisions SET decision = 'rejected' WHERE id = ANY(%s)",
                       (ids["agent_decisions"][:4],))
        converge(fstack)
        served_503 = 40 - faults_left(fstack)
    finally:
        requests.delete(f"{fstack.tables.url}/_admin/faults", timeout=5)  # the API recovers
        set_function_env(fstack, TO_TABLES)
    phase1, phase2 = Counter(s for s, _ in _responses(fstack, mark0, mark1)), _responses(fstack, mark1)
    answers2 = Counter(s for s, _ in phase2)
    dead_lettered = dlq_depth(settings) - depth_before
    # Batches: the one wake-up claims all 8 and waits out Retry-After within its drain budget (4 s, under
    # pg_net's 5 s timeout); what does not fit stays pending in the outbox (never dead-lettered) for the next
    # wake-up or the sweeper below. Every wake-up is answered 200 either way.
    assert served_429 >= 3 and served_503 > 0
    assert phase1 == {200: 1}
    # Every 503 says it was dead-lettered (a delivery slower than pg_net's 5 s timeout may have been too).
    assert all(json.loads(body)["dead_lettered"] is True for status, body in phase2 if status == 503)
    assert dead_lettered >= answers2[503]

    report = replay(settings)  # an operator drains the DLQ ...
    assert report.ok and report.remaining == 0
    swept = fstack.sweep_outbox(0)  # ... and pg_cron's sweeper re-sends anything still unacknowledged
    converge(fstack)
    with psycopg.connect(fstack.database_url) as conn:
        unacked = conn.execute("SELECT count(*) FROM zsync.outbox WHERE acked_at IS NULL AND record_id = ANY(%s)",
                               ([i for v in ids.values() for i in v],)).fetchone()[0]
    assert unacked == 0
    assert reconcile(SyncContext(settings=settings), dry_run=True).in_sync
    lost, dupes = check_identical(client, fstack, ids)
    assert (lost, dupes) == (0, 0)
    assert all(tables.find("agent_decisions", rid)["data"]["decision"] == "rejected"
               for rid in ids["agent_decisions"][:4])
    summary("b: Tables API 429 then 503", deliveries=sum(phase1.values()) + len(phase2),
            faults_injected=f"{served_429}x429+{served_503}x503", absorbed_429=phase1[200],
            answered_200_under_503=answers2[200], answered_503=answers2[503], timed_out=answers2[None],
            dead_lettered=dead_lettered, replay_applied=report.total("applied"),
            replay_unchanged=report.total("unchanged"), swept=swept, lost=lost, duplicates=dupes,
            seconds=round(time.monotonic() - started, 1))


# --- c. a function killed mid-burst ------------------------------------------------------------------------


def test_c_function_killed_mid_burst_outbox_sweeper_recovers(fstack, settings, client, tables, supabase):
    started = time.monotonic()
    ids = {"agent_jobs": [uid("fc-job") for _ in range(24)]}
    killed, restarted = threading.Event(), threading.Event()

    def claude_agent() -> None:
        for i, rid in enumerate(ids["agent_jobs"]):
            if i == 6:
                fstack.kill_function("agent_jobs_to_tables")
                killed.set()
            if i == 18:
                fstack.restart_function("agent_jobs_to_tables")
                restarted.set()
            supabase.query("INSERT INTO agent_jobs (id, job_type, status) VALUES (%s, 'discovery', 'queued')",
                           (rid,))
            time.sleep(0.02)

    first_response = _last_response(fstack)
    worker = threading.Thread(target=claude_agent)
    worker.start()
    worker.join(60)
    assert killed.is_set() and restarted.is_set()
    converge(fstack)
    with psycopg.connect(fstack.database_url, autocommit=True) as conn:
        refused = conn.execute("SELECT count(*) FROM net._http_response WHERE id > %s AND status_code IS NULL",
                               (first_response,)).fetchone()[0]
    missing = [rid for rid in ids["agent_jobs"] if tables.find("agent_jobs", rid) is None]
    # pg_net sent each once and never retried; a request in flight at the kill may have reached Tables. A
    # webhook after the restart drains the whole outbox (batches), so the refused ones may be delivered already.
    assert refused >= 1 and len(missing) <= refused

    swept = fstack.sweep_outbox(0)  # pg_cron's job: no human action
    converge(fstack)
    assert swept >= len(missing)
    assert all(tables.find("agent_jobs", rid) for rid in ids["agent_jobs"])
    assert dlq_depth(settings) == 0  # nothing reached a dead function's DLQ: the outbox alone recovered it
    lost, dupes = check_identical(client, fstack, ids)
    assert (lost, dupes) == (0, 0)
    summary("c: agent_jobs_to_tables killed mid-burst", deliveries=len(ids["agent_jobs"]),
            faults_injected=f"1 kill, {refused} refused", missing_before_sweep=len(missing), swept=swept,
            lost=lost, duplicates=dupes, seconds=round(time.monotonic() - started, 1))


# --- d. the same burst twice, out of order ------------------------------------------------------------------


def test_d_same_burst_twice_out_of_order(fstack, settings, client, tables, supabase):
    started = time.monotonic()
    assert fstack.tables is not None
    ids: dict[str, list[str]] = {"agent_jobs": [uid("fd-job") for _ in range(10)], "audit_log": []}
    payloads: list[tuple[str, dict]] = []
    base = fstack.tables.url

    def set_trigger(table: str, url: str | None) -> None:
        requests.put(f"{base}/_admin/tables/{fstack.table_ids[table]}/trigger", json={"url": url},
                     timeout=5).raise_for_status()

    # Record the burst as Zapier's trigger would send it (trigger off: we deliver it ourselves).
    for table in ("agent_jobs", "audit_log"):
        set_trigger(table, None)
    try:
        for n, rid in enumerate(ids["agent_jobs"]):
            v1 = {"id": rid, "status": "queued", "retry_count": 0, "created_at": "2025-12-22T10:00:00Z",
                  "updated_at": f"2025-12-22T10:00:{n:02d}Z"}
            v2 = {**v1, "status": "done", "results": json.dumps({"n": n}), "updated_at": f"2025-12-22T10:05:{n:02d}Z"}
            tables.create("agent_jobs", v1)
            rec = tables.update("agent_jobs", rid, v2)
            payloads += [("agent_jobs_to_supabase", v1), ("agent_jobs_to_supabase", {**rec["data"]})]
        for n in range(5):
            rec = tables.create("audit_log", {"action": "lead_scored", "actor": f"agent-{n}",
                                              "timestamp": "2025-12-22T10:00:00Z"})
            ids["audit_log"].append(rec["id"])
            payloads.append(("audit_log_to_supabase", {**rec["data"], "id": rec["id"]}))
    finally:
        for table in ("agent_jobs", "audit_log"):
            set_trigger(table, fstack.functions[TABLES[table].function_name(Direction.TO_SUPABASE)].url)

    rng = random.Random(3)
    first = payloads[:]
    rng.shuffle(first)
    burst = first + first[::-1]  # twice; each record's v1 and v2 in both orders

    def deliver(item: tuple[str, dict]) -> str:
        fn, body = item
        r = requests.post(fstack.functions[fn].url, json=body, headers={"X-Zsync-Secret": fstack.secret}, timeout=30)
        # A 503 here is the short test retry budget running out under CPU contention: it must be dead-lettered.
        assert r.status_code == 200 or (r.status_code == 503 and r.json()["dead_lettered"]), r.text
        return r.json()["outcome"]

    depth_before = dlq_depth(settings)
    with ThreadPoolExecutor(8) as pool:
        outcomes = Counter(pool.map(deliver, burst))
    assert dlq_depth(settings) - depth_before == outcomes["failed"]
    report = replay(settings)
    assert report.ok
    outcomes.update({k: report.total(k) for k in ("applied", "unchanged", "skipped_stale")})
    outcomes["unchanged"] += report.total("duplicates")  # a second copy of a replayed delivery
    converge(fstack)
    assert outcomes["applied"] + outcomes["unchanged"] + outcomes["skipped_stale"] == len(burst)
    with psycopg.connect(fstack.database_url) as conn:
        synced = conn.execute("SELECT resource_id, count(*), count(DISTINCT metadata->>'source_timestamp') FROM "
                              "audit_log WHERE action = 'agent_jobs_synced' AND resource_id = ANY(%s) GROUP BY 1",
                              (ids["agent_jobs"],)).fetchall()
        audit_rows = conn.execute("SELECT count(*), count(DISTINCT id) FROM audit_log WHERE id = ANY(%s)",
                                  (ids["audit_log"],)).fetchone()
        statuses = dict(conn.execute("SELECT id, status FROM agent_jobs WHERE id = ANY(%s)",
                                     (ids["agent_jobs"],)).fetchall())
    assert audit_rows == (5, 5)  # exactly one Supabase row per Tables audit record
    # One entry per applied version (v1 may never be applied if v2 came first; a version can also be applied by
    # the to_tables function pushing Tables' newer copy back, with the same stable entry id): never two.
    assert len(synced) == 10 and all(total == distinct <= 2 for _, total, distinct in synced)
    assert set(statuses.values()) == {"done"}
    lost, dupes = check_identical(client, fstack, ids)
    assert (lost, dupes) == (0, 0)
    summary("d: same burst twice, out of order", deliveries=len(burst), faults_injected=f"{len(payloads)} repeats",
            applied=outcomes["applied"], unchanged=outcomes["unchanged"], skipped_stale=outcomes["skipped_stale"],
            dead_lettered_then_replayed=outcomes["failed"],
            lost=lost, duplicates=dupes, seconds=round(time.monotonic() - started, 1))
