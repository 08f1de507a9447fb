"""The soak: N changes over the local stack, both directions, all four tables, under seeded chaos.

Zapier-side writers (the Tables records API, as agents do) and Supabase-side writers (SQL, as Claude
agents do) create and update records of agent_jobs, agent_decisions and rate_limits; Zapier-side writers
also create audit_log entries (one-way). A share of the changes are conflict pairs: the same record
written from both sides at once. Writers also re-POST earlier payloads straight to the functions
(duplicated and out-of-order redeliveries). Meanwhile a seeded chaos loop, at random intervals,
SIGKILLs a function process (restarted after a moment, as a platform would), stops and restarts
Postgres, makes the Tables API answer 429 / 503 / hang past the functions' timeout for a while, and
``LocalStack.drop_deliveries`` loses a share of the notifications on both paths.

A share of the writes (``partial_share``, on either side, conflict pairs included) change only a random subset
of a record's fields, as a person editing one cell or an agent setting one column does, so the field-level
merge (issue 20) is exercised: the other fields must keep what the other side wrote.

Then the chaos stops and the only human action is ``zsync replay`` of the dead-letter queue (reconcile
repairs nothing); the sweeper and Zapier's Autoreplay do the rest. Checks: lost = 0 (every record on both
sides), lost fields = 0 (every field of every record holds, on both sides, the value of the latest write to
THAT field: a field whose value was written and then overwritten by an older one is a lost field; with only
whole-record writes this is the last-writer-wins winner, field for field), duplicates = 0 (one Tables record per id, one
``_synced`` audit entry per (record, version, direction), one audit_log row per Tables audit record),
no echo write on either side (a Supabase version written twice; a Tables write that leaves the record's
``updated_at`` where it was), writes per real change on the other side ~ 1, ``reconcile --dry-run`` finds no
drift, function memory and database connections flat. One table of figures; a failing run lists the ids
that differ and how.

    python -m bench.soak --changes 2000 --seed 7      # make soak: --changes 50000
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import requests

from infra.local.stack import LocalStack, running_stack
from infra.reconcile import reconcile
from infra.replay import replay
from shared.adapters.dead_letter import DeadLetterQueue
from shared.adapters.supabase_db import ASIDE_POOL_MAX
from shared.core.mapping import parse_supabase_record, parse_tables_record
from shared.core.spec import FUNCTIONS, TABLES, Direction
from shared.platform.settings import DEFAULT_SECRET_HEADER, Settings
from shared.services.sync import SyncContext

TWO_WAY = ("agent_jobs", "agent_decisions", "rate_limits")
# The fields every write sets on a table (text, json, number), besides updated_at.
MUTABLE = {
    "agent_jobs": ("status", "parameters", "retry_count"),
    "agent_decisions": ("decision", "metadata", "confidence"),
    "rate_limits": ("service_name", "metadata", "request_count"),
}
TICK = timedelta(milliseconds=10)  # versions 10 ms apart: Supabase's +1 ms bump of a raced write never ties
# Versions count up from an hour before the run, 10 ms per change: they trail the clock (a version more than
# ZSYNC_MAX_FUTURE_SKEW_S ahead of it is refused) as long as the run writes fewer than 100 changes a second.
BASE_TS = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
# Fail fast when a dependency is down (as tests/test_faults.py): the chaos is then cheap to absorb.
FAST_ENV = {"ZSYNC_DB_CONNECT_TIMEOUT_S": "1", "ZSYNC_HTTP_TIMEOUT_S": "2", "ZSYNC_DB_POOL_MAX": "16"}
HANG_S = 3.0  # past ZSYNC_HTTP_TIMEOUT_S
AUTOREPLAY = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)  # Zapier's Autoreplay, compressed
H = DEFAULT_SECRET_HEADER


@dataclass
class SoakConfig:
    changes: int = 2000
    seed: int = 1
    writers: int = 8
    conflict_share: float = 0.10  # of the updates: a pair written from both sides at once
    redelivery_share: float = 0.10  # extra re-POSTs of earlier payloads, per change
    drop_share: float = 0.05  # of the notifications on both paths
    chaos: bool = True
    chaos_gap_s: tuple[float, float] = (0.5, 3.0)
    rate_limit: int | None = 1000  # Tables requests per 5 s per table (Zapier's is 100)
    converge_timeout_s: float = 600.0
    changes_per_record: int = 6
    partial_share: float = 0.30  # of the updates (each side of a conflict pair too): a random subset of fields
    blind_writes: bool | None = None  # zsync.config blind_writes for the run (None: the migration's default)
    inbox_newest_first: bool = False  # the inbox stand-in hands out the newest messages first (Zapier: no order)
    state_dir: Path | None = None


@dataclass
class Write:
    side: str  # "tables" | "sql"
    table: str
    rid: str
    ts: datetime  # the version it stored (Supabase's, for SQL writes: it may move a raced write forward)
    values: dict[str, Any]
    at: float = field(default_factory=time.time)  # when the write returned (wall clock): for failure reports


@dataclass
class Soak:
    stack: LocalStack
    cfg: SoakConfig
    writes: list[Write] = field(default_factory=list)
    uncertain_sql: int = 0  # SQL writes retried after a lost connection (may have committed twice)
    rec_ids: dict[str, str] = field(default_factory=dict)  # rid -> Tables record id
    created: dict[str, threading.Event] = field(default_factory=lambda: defaultdict(threading.Event))
    audit_ids: list[str] = field(default_factory=list)  # Tables record ids of audit_log entries
    audit_values: dict[str, dict[str, Any]] = field(default_factory=dict)
    captured: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    redeliveries: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    fault_log: list[tuple[float, str, str]] = field(default_factory=list)  # (wall clock, kind, target)
    changes: Counter = field(default_factory=Counter)  # by direction of the change ("tables->supabase" ...)
    conflicts: int = 0
    _tick: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _chaos_stop: threading.Event = field(default_factory=threading.Event)

    # -- versions and values -------------------------------------------------------------------------
    def next_ts(self) -> datetime:
        with self._lock:
            self._tick += 1
            return BASE_TS + TICK * self._tick

    @staticmethod
    def values(table: str, rng: random.Random, label: str) -> dict[str, Any]:
        text, doc, number = MUTABLE[table]
        flavour = rng.choice(["", " \u00e9t\u00e9 \U0001F600", " '; DROP TABLE x; --", " \u202eltr\u202c"])
        num: float | int = round(rng.random(), 6) if table == "agent_decisions" else rng.randint(0, 10_000)
        return {text: label + flavour, doc: {"by": label, "n": [rng.randint(0, 9)], "ok": rng.random() < 0.5},
                number: num}

    def update_values(self, table: str, rng: random.Random, label: str) -> dict[str, Any]:
        """An update's values: every mutable field, or (``partial_share``) a random non-empty subset of them."""
        values = self.values(table, rng, label)
        if rng.random() >= self.cfg.partial_share:
            return values
        keep = rng.sample(list(values), rng.randint(1, len(values) - 1))
        return {k: v for k, v in values.items() if k in keep}

    def record(self, write: Write, function: str, payload: dict[str, Any]) -> None:
        with self._lock:
            self.writes.append(write)
            self.changes["tables->supabase" if write.side == "tables" else "supabase->tables"] += 1
            self.captured.append((function, payload))
            if len(self.captured) > 5000:
                del self.captured[: len(self.captured) - 5000]

    # -- the Zapier side -------------------------------------------------------------------------------
    def tables_call(self, fn: Any) -> Any:
        """A Zapier agent retries until the Tables API takes its write (the client retries inside too)."""
        for _ in range(200):
            try:
                return fn()
            except Exception:  # injected 429/503/hangs past the client budget
                time.sleep(0.5)
        raise RuntimeError("the Tables API never took the write")

    def tables_fields(self, table: str, values: dict[str, Any], ts: datetime) -> dict[str, Any]:
        """The cells a write sets: the given fields (all three, or a subset) and updated_at."""
        _, doc, _ = MUTABLE[table]
        return {**{k: json.dumps(v) if k == doc else v for k, v in values.items()},
                "updated_at": ts.isoformat().replace("+00:00", "Z")}

    def tables_create(self, client: Any, table: str, rid: str, rng: random.Random, label: str) -> None:
        values = self.values(table, rng, label)
        ts = self.next_ts()
        fields = {"id": rid, **self.tables_fields(table, values, ts), "created_at": BASE_TS.isoformat()}
        rec = self.tables_call(lambda: client.create(self.stack.table_ids[table], fields))
        self.rec_ids[rid] = rec.id
        self.record(Write("tables", table, rid, ts, values), TABLES[table].function_name(Direction.TO_SUPABASE),
                    dict(rec.data))

    def tables_rec_id(self, client: Any, table: str, rid: str) -> str | None:
        if rid in self.rec_ids:
            return self.rec_ids[rid]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # created in Supabase: the agent waits for the synced copy
            try:
                found = client.find_by_field(self.stack.table_ids[table], "id", rid)
            except Exception:
                found = None
            if found is not None:
                self.rec_ids[rid] = found.id
                return found.id
            time.sleep(0.3)
        return None

    def tables_update(self, client: Any, table: str, rid: str, values: dict[str, Any]) -> bool:
        rec_id = self.tables_rec_id(client, table, rid)
        if rec_id is None:
            return False
        ts = self.next_ts()
        rec = self.tables_call(lambda: client.update(self.stack.table_ids[table], rec_id,
                                                     self.tables_fields(table, values, ts)))
        self.record(Write("tables", table, rid, ts, values), TABLES[table].function_name(Direction.TO_SUPABASE),
                    dict(rec.data))
        return True

    def audit_create(self, client: Any, rng: random.Random, label: str) -> None:
        fields = {"action": "soak_event", "actor": label, "actor_type": "zapier_agent",
                  "resource_type": "job", "resource_id": f"r-{rng.randint(0, 999)}",
                  "metadata": json.dumps({"n": rng.randint(0, 99)}), "compliance_tags": ["soak"],
                  "timestamp": self.next_ts().isoformat()}
        rec = self.tables_call(lambda: client.create(self.stack.table_ids["audit_log"], fields))
        with self._lock:
            self.audit_ids.append(rec.id)
            self.audit_values[rec.id] = dict(rec.data)
            self.changes["tables->supabase"] += 1
            # as the trigger delivers it: the record's fields, its id being the Tables record id
            self.captured.append(("audit_log_to_supabase", {"id": rec.id, **rec.data}))

    # -- the Supabase side -----------------------------------------------------------------------------
    def sql(self, state: dict[str, Any], query: str, params: tuple) -> Any:
        """Run one statement, reconnecting across Postgres restarts; returns (row, retried)."""
        retried = False
        for _ in range(600):
            try:
                if state.get("conn") is None or state["conn"].closed:
                    state["conn"] = psycopg.connect(self.stack.database_url, autocommit=True, connect_timeout=2)
                return state["conn"].execute(query, params).fetchone(), retried
            except psycopg.errors.UniqueViolation:
                return None, retried  # a retried INSERT that had committed
            except psycopg.OperationalError:
                retried = True
                if state.get("conn") is not None:
                    state["conn"].close()
                state["conn"] = None
                time.sleep(0.3)
        raise RuntimeError("Postgres never came back")

    def sql_create(self, state: dict[str, Any], table: str, rid: str, rng: random.Random, label: str) -> None:
        values = self.values(table, rng, label)
        ts = self.next_ts()
        text, doc, number = MUTABLE[table]
        row, _ = self.sql(state, f"INSERT INTO public.{table} AS t (id, {text}, {doc}, {number}, updated_at) "
                          "VALUES (%s, %s, %s::jsonb, %s, %s) RETURNING to_jsonb(t)",
                          (rid, values[text], json.dumps(values[doc]), values[number], ts))
        self.record(Write("sql", table, rid, ts, values), TABLES[table].function_name(Direction.TO_TABLES),
                    {"type": "INSERT", "table": table, "schema": "public", "record": row[0] if row else None,
                     "old_record": None})

    def sql_update(self, state: dict[str, Any], table: str, rid: str, values: dict[str, Any]) -> bool:
        """An agent's UPDATE of the given fields (all three, or a subset) and updated_at."""
        _, doc, _ = MUTABLE[table]
        sets = ", ".join(f"{k} = %s::jsonb" if k == doc else f"{k} = %s" for k in values)
        params = [json.dumps(v) if k == doc else v for k, v in values.items()]
        deadline = time.monotonic() + 180
        while True:  # created in Tables: the agent waits for the synced row
            ts = self.next_ts()
            row, retried = self.sql(state, f"UPDATE public.{table} t SET {sets}, updated_at = %s WHERE id = %s "
                                    "RETURNING to_jsonb(t)", (*params, ts, rid))
            if row is not None:
                break
            if time.monotonic() > deadline:
                return False
            time.sleep(0.3)
        stored = parse_supabase_record(TABLES[table], row[0])["updated_at"]  # >= ts: a raced write moves on
        with self._lock:
            self.uncertain_sql += retried
        self.record(Write("sql", table, rid, stored, values), TABLES[table].function_name(Direction.TO_TABLES),
                    {"type": "UPDATE", "table": table, "schema": "public", "record": row[0], "old_record": None})
        return True

    # -- redeliveries --------------------------------------------------------------------------------
    def redeliver(self, rng: random.Random) -> None:
        with self._lock:
            if not self.captured:
                return
            function, payload = rng.choice(self.captured)
        if payload.get("record") is None and "type" in payload:
            return
        for _ in range(rng.choice([1, 1, 2])):
            try:
                r = requests.post(self.stack.functions[function].url, json=payload,
                                  headers={H: self.stack.secret}, timeout=30)
                outcome = r.json().get("outcome", str(r.status_code)) if r.status_code < 500 else str(r.status_code)
            except (requests.RequestException, ValueError):
                outcome = "refused"
            with self._lock:
                self.redeliveries[outcome] += 1

    # -- writers -----------------------------------------------------------------------------------
    def plan(self) -> list[list[tuple[str, ...]]]:
        """Per writer, its ops. Every record is created first (by one side), then updated by both."""
        rng = random.Random(f"{self.cfg.seed}-plan")
        n_records = max(4, self.cfg.changes // self.cfg.changes_per_record)
        records = [(TWO_WAY[i % 3], f"soak-{self.cfg.seed}-{i}") for i in range(n_records)]
        ops: list[tuple[str, ...]] = []
        budget = self.cfg.changes
        for table, rid in records:
            ops.append(("create", rng.choice(["tables", "sql"]), table, rid))
            budget -= 1
        audits = max(1, self.cfg.changes // 20)
        ops += [("audit",)] * audits
        budget -= audits
        while budget > 0:
            table, rid = rng.choice(records)
            if rng.random() < self.cfg.conflict_share and budget >= 2:
                ops.append(("conflict", "both", table, rid))
                budget -= 2
            else:
                ops.append(("update", rng.choice(["tables", "sql"]), table, rid))
                budget -= 1
        creates, rest = ops[:n_records], ops[n_records:]
        rng.shuffle(rest)
        # every writer does its creates first: an update waits for its record's create (an event), which
        # is then never behind a waiting op of another writer (no deadlock)
        merged = creates + rest
        n_redeliveries = int(self.cfg.changes * self.cfg.redelivery_share)
        for _ in range(n_redeliveries):
            merged.insert(rng.randrange(n_records, len(merged) + 1), ("redeliver",))
        per_writer: list[list[tuple[str, ...]]] = [[] for _ in range(self.cfg.writers)]
        for i, op in enumerate(merged):
            per_writer[i % self.cfg.writers].append(op)
        return per_writer

    def writer(self, index: int, ops: list[tuple[str, ...]], errors: list[BaseException]) -> None:
        rng = random.Random(f"{self.cfg.seed}-writer-{index}")
        state: dict[str, Any] = {}
        pair = ThreadPoolExecutor(max_workers=1)
        try:
            with self.stack.tables_client(timeout_s=5, retry_budget_s=10) as client, \
                    self.stack.tables_client(timeout_s=5, retry_budget_s=10) as client2:
                for k, op in enumerate(ops):
                    label = f"w{index}-{k}"
                    if op[0] == "redeliver":
                        self.redeliver(rng)
                        continue
                    if op[0] == "audit":
                        self.audit_create(client, rng, label)
                        continue
                    kind, side, table, rid = op
                    if kind == "create":
                        if side == "tables":
                            self.tables_create(client, table, rid, rng, label)
                        else:
                            self.sql_create(state, table, rid, rng, label)
                        self.created[rid].set()
                        continue
                    if not self.created[rid].wait(120):
                        raise RuntimeError(f"{rid} was never created")
                    if kind == "conflict":  # both sides at once, on the same record
                        a = self.update_values(table, rng, label + "-z")
                        b = self.update_values(table, rng, label + "-c")
                        other = pair.submit(self.tables_update, client2, table, rid, a)
                        self.sql_update(state, table, rid, b)
                        if not other.result():
                            self.sql_update(state, table, rid, a)
                        with self._lock:
                            self.conflicts += 1
                    elif side == "tables" and self.tables_update(client, table, rid,
                                                                 self.update_values(table, rng, label)):
                        pass
                    else:
                        self.sql_update(state, table, rid, self.update_values(table, rng, label))
        except BaseException as exc:  # surfaced by run_writers()
            errors.append(exc)
        finally:
            pair.shutdown()
            if state.get("conn") is not None:
                state["conn"].close()

    # -- chaos -------------------------------------------------------------------------------------
    def chaos(self) -> None:
        rng = random.Random(f"{self.cfg.seed}-chaos")
        stack = self.stack
        stack.drop_deliveries(self.cfg.drop_share, seed=self.cfg.seed)
        kinds = ["kill_function"] * 4 + ["postgres_restart"] * 2 + ["tables_429", "tables_503"] + ["tables_hang"] * 2
        while not self._chaos_stop.wait(rng.uniform(*self.cfg.chaos_gap_s)):
            kind = rng.choice(kinds)
            self.faults[kind] += 1
            name = rng.choice(sorted(FUNCTIONS)) if kind == "kill_function" else ""
            self.fault_log.append((time.time(), kind, name))
            if kind == "kill_function":
                stack.kill_function(name)
                self._chaos_stop.wait(rng.uniform(0.2, 1.5))
                stack.restart_function(name)
            elif kind == "postgres_restart":
                stack.stop_postgres()
                self._chaos_stop.wait(rng.uniform(0.3, 2.0))
                stack.start_postgres()
            elif kind == "tables_429":
                stack.tables_fault(429, rng.uniform(0.5, 3.0), retry_after=1)
            elif kind == "tables_503":
                stack.tables_fault(503, rng.uniform(0.5, 3.0))
            else:
                stack.tables_fault(503, rng.uniform(0.5, 3.0), hang_s=HANG_S)
        stack.clear_tables_faults()
        stack.drop_deliveries(0.0)

    # -- the run -----------------------------------------------------------------------------------
    def run_writers(self) -> float:
        plan = self.plan()
        errors: list[BaseException] = []
        chaos = threading.Thread(target=self.chaos, name="chaos", daemon=True) if self.cfg.chaos else None
        started = time.monotonic()
        if chaos:
            chaos.start()
        threads = [threading.Thread(target=self.writer, args=(i, ops, errors)) for i, ops in enumerate(plan)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        self._chaos_stop.set()
        if chaos:
            chaos.join()
        if errors:
            raise errors[0]
        return elapsed


# --- after the chaos: settle, then judge ---------------------------------------------------------------


def settings_for(stack: LocalStack) -> Settings:
    assert stack.tables is not None
    return Settings(database_url=stack.database_url, zapier_base_url=stack.tables.url, tables_token=stack.token,
                    table_ids=stack.table_ids, dlq_url=stack.dlq_url, aws_endpoint_url=stack.aws_endpoint_url,
                    webhook_secret=stack.secret, retry_budget_s=10)


def unacked(stack: LocalStack) -> int:
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM zsync.outbox WHERE acked_at IS NULL").fetchone()[0]


def settle(stack: LocalStack, timeout_s: float) -> tuple[Counter, int]:
    """`zsync replay` whenever the dead-letter queue holds something; otherwise wait for the sweeper and
    Autoreplay. Done when nothing is queued, pending or unacknowledged."""
    settings = settings_for(stack)
    dlq = DeadLetterQueue(settings)
    replayed: Counter = Counter()
    replays = 0
    deadline = time.monotonic() + timeout_s
    quiet_rounds = 0
    while time.monotonic() < deadline:
        try:
            stack.wait_quiet(timeout_s=60, settle_s=0.5)
        except TimeoutError:
            continue
        if dlq.approximate_depth() > 0:
            report = replay(settings)
            replays += 1
            for column in ("applied", "unchanged", "skipped_stale", "ignored", "duplicates", "rejected", "left"):
                replayed[column] += report.total(column)
            quiet_rounds = 0
            continue
        if unacked(stack) == 0:
            quiet_rounds += 1
            if quiet_rounds >= 2:
                return replayed, replays
        else:
            quiet_rounds = 0
        time.sleep(1.0)
    raise TimeoutError(f"not converged within {timeout_s:.0f} s: {unacked(stack)} outbox entries unacknowledged, "
                       f"dead-letter depth {dlq.approximate_depth()}")


def ms(ts: datetime) -> datetime:
    return ts.replace(microsecond=ts.microsecond // 1000 * 1000)


@dataclass
class Verdict:
    lost: list[str] = field(default_factory=list)
    lost_fields: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    # (table, rid, field, value found, the field's latest write time): classified by out_of_order()
    lost_field_keys: list[tuple[str, str, str, Any, datetime]] = field(default_factory=list)
    out_of_order: list[str] = field(default_factory=list)  # the lost fields out_of_order() explains
    echo_ids: list[str] = field(default_factory=list)  # records of the latest Tables echo writes

    @property
    def unexplained_lost_fields(self) -> int:
        return len(self.lost_fields) - len(self.out_of_order)

    @property
    def ok(self) -> bool:
        return not self.lost and not self.lost_fields and not self.duplicates


@dataclass
class Expected:
    """What one record must end with: per field, the latest write to it (time, value, side)."""
    table: str
    latest: dict[str, tuple[datetime, Any, str]] = field(default_factory=dict)
    partial: bool = False  # some write set only some fields: a merge may give the record a newer version

    @property
    def version(self) -> datetime:
        return max(ts for ts, _, _ in self.latest.values())


def expectations(writes: list[Write]) -> dict[str, Expected]:
    out: dict[str, Expected] = {}
    for w in writes:
        e = out.setdefault(w.rid, Expected(w.table))
        e.partial |= set(w.values) != set(MUTABLE[w.table])
        for k, value in w.values.items():
            if k not in e.latest or w.ts > e.latest[k][0]:
                e.latest[k] = (w.ts, value, w.side)
    return out


def compare(rid: str, e: Expected, side: str, got: dict[str, Any], v: Verdict) -> None:
    """A field not holding its latest write is a lost field; the version must be the latest write's (or,
    after a merge of partial writes, a later one)."""
    for k, (ts, want, by) in sorted(e.latest.items()):
        if got.get(k) != want:
            v.lost_fields.append(f"{e.table} {rid}.{k}: {side} has {got.get(k)!r}, latest write {want!r} "
                                 f"({by} {ts.isoformat()})")
            v.lost_field_keys.append((e.table, rid, k, got.get(k), ts))
    have = ms(got["updated_at"]) if got.get("updated_at") else None
    want_ts = ms(e.version)
    if have is None or have < want_ts or (have != want_ts and not e.partial):
        v.lost.append(f"{e.table} {rid}: {side} version {have.isoformat() if have else None}, latest write "
                      f"{want_ts.isoformat()}")


def judge(soak: Soak, outbox_mark: int) -> Verdict:
    stack, v = soak.stack, Verdict()
    winners = expectations(soak.writes)
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        supa: dict[str, dict[str, Any]] = {}
        for table in TWO_WAY:
            for (row,) in conn.execute(f"SELECT to_jsonb(t) FROM public.{table} t WHERE id LIKE %s",
                                       (f"soak-{soak.cfg.seed}-%",)):
                supa[row["id"]] = parse_supabase_record(TABLES[table], row)
        audit_rows = {r[0]: r[1] for r in conn.execute(
            "SELECT id, to_jsonb(a) FROM audit_log a WHERE id = ANY(%s)", (soak.audit_ids,))}
        synced_dupes = conn.execute(
            "SELECT resource_id, action, metadata->>'sync_direction', metadata->>'source_timestamp', count(*) "
            "FROM audit_log WHERE action LIKE '%%\\_synced' AND actor_type = 'zapier_sync' "
            "GROUP BY 1, 2, 3, 4 HAVING count(*) > 1").fetchall()
        # one outbox row per Supabase write (repair rows re-queue a version already written: not writes)
        outbox = conn.execute("SELECT record_id, record_updated_at FROM zsync.outbox WHERE id > %s AND NOT repair "
                              "ORDER BY id", (outbox_mark,)).fetchall()
        swept = conn.execute("SELECT count(*) FROM zsync.outbox WHERE id > %s AND attempts > 0 "
                             "AND ack_outcome IS DISTINCT FROM 'dead_letter'", (outbox_mark,)).fetchone()[0]
        repairs = conn.execute(
            "SELECT count(*) FROM audit_log WHERE actor_type = 'zapier_sync' AND metadata->>'origin' = 'repair' "
            "AND resource_id LIKE %s", (f"soak-{soak.cfg.seed}-%",)).fetchone()[0]
        parked = conn.execute("SELECT count(*) FROM zsync.outbox WHERE id > %s AND ack_outcome = 'dead_letter'",
                              (outbox_mark,)).fetchone()[0]
    tables: dict[str, list[dict[str, Any]]] = defaultdict(list)
    with stack.tables_client(timeout_s=30, retry_budget_s=60) as client:
        for table in TWO_WAY:
            for rec in client.iter_records(stack.table_ids[table], page_size=1000):
                data = dict(rec.data)
                if str(data.get("id", "")).startswith(f"soak-{soak.cfg.seed}-"):
                    tables[data["id"]].append(parse_tables_record(TABLES[table], data))
        audit_in_tables = {rec.id for rec in client.iter_records(stack.table_ids["audit_log"], page_size=1000)}

    # lost records and lost fields: per field the latest write, on both sides; both sides on one version
    for rid, e in sorted(winners.items()):
        found = {"supabase": supa.get(rid), "tables": (tables.get(rid) or [None])[0]}
        for side, got in found.items():
            if got is None:
                v.lost.append(f"{e.table} {rid}: missing in {side} (latest write {e.version.isoformat()})")
            else:
                compare(rid, e, side, got, v)
        if all(found.values()) and found["supabase"]["updated_at"] != found["tables"]["updated_at"] and e.partial:
            v.lost.append(f"{e.table} {rid}: versions differ: supabase {found['supabase']['updated_at']}, "
                          f"tables {found['tables']['updated_at']}")
    for rec_id in soak.audit_ids:
        row = audit_rows.get(rec_id)
        if row is None:
            v.lost.append(f"audit_log {rec_id}: missing in supabase")
        elif row.get("actor") != soak.audit_values[rec_id].get("actor"):
            want = soak.audit_values[rec_id].get("actor")
            v.lost.append(f"audit_log {rec_id}: actor {row.get('actor')!r}, expected {want!r}")
        if rec_id not in audit_in_tables:
            v.lost.append(f"audit_log {rec_id}: missing in tables")
    # duplicates
    v.duplicates += [f"tables: {len(recs)} records with id {rid}" for rid, recs in sorted(tables.items())
                     if len(recs) > 1]
    v.duplicates += [f"audit: {n} x {action} {rid} {direction} version {ver}"
                     for rid, action, direction, ver, n in synced_dupes]
    # writes per real change
    user = Counter((w.side, w.table in TWO_WAY) for w in soak.writes)
    partial = sum(1 for w in soak.writes if set(w.values) != set(MUTABLE[w.table]))
    tables_user, sql_user = user[("tables", True)], user[("sql", True)]
    supa_writes = len(outbox)
    seen: Counter = Counter(outbox)
    echoes = sum(n - 1 for n in seen.values() if n > 1)  # one Supabase version written twice
    tables_stats = stack.tables.stats()
    tables_total = sum(tables_stats["writes"].get(stack.table_ids[t], 0) for t in TWO_WAY)
    # A Tables write that left the record's updated_at where it was: the version it already held, written
    # again (every soak writer sets a new updated_at; the sync's echo, changed content or not).
    tables_echoes = sum(tables_stats["same_version_writes"].get(stack.table_ids[t], 0) for t in TWO_WAY)
    v.figures.update(
        supabase_sync_writes=supa_writes - sql_user, tables_user_writes=tables_user,
        tables_sync_writes=tables_total - tables_user, sql_user_writes=sql_user, supabase_echoes=echoes,
        tables_echoes=tables_echoes,
        swept=swept, parked=parked, repairs=repairs, records=len(winners), audit_entries=len(soak.audit_ids),
        partial_writes=partial,
    )
    if echoes:
        v.duplicates.append(f"supabase: {echoes} versions written twice (echo)")
    if tables_echoes:
        v.echo_ids = list(tables_stats.get("same_version_records", [])[-tables_echoes:])
        v.duplicates.append(f"tables: {tables_echoes} writes of the version the record already held (echo): "
                            f"{', '.join(tables_stats.get('same_version_records', [])[-tables_echoes:])}")
    return v


def out_of_order(soak: Soak, v: Verdict) -> None:
    """Which lost fields are the known limit of a merge without per-field times on the Tables side (see
    docs/design-decisions.md): the value found is an older Tables write's (``old``), a later Tables write
    (``new``, after the field's latest write) did not write that field - its Tables record still carried
    ``old``'s value, the latest write had not reached Tables - and the sync applied ``new``'s delivery before
    ``old``'s (out of order: concurrent drains, a redelivery), so nothing it had seen said when Tables' value of
    that field was written. In order, the sync keeps the latest write (the base moves to ``old``'s record)."""
    firsts: dict[tuple[str, datetime], datetime] = {}
    with psycopg.connect(soak.stack.database_url, autocommit=True) as conn:
        for rid, src, ts in conn.execute(
                "SELECT resource_id, metadata->>'source_timestamp', timestamp FROM audit_log "
                "WHERE resource_id = ANY(%s) AND actor_type = 'zapier_sync' AND metadata->>'function' LIKE "
                r"'%%\_to\_supabase' AND metadata->>'source_timestamp' IS NOT NULL",
                (list({key[1] for key in v.lost_field_keys}),)):
            key = (rid, ms(datetime.fromisoformat(src)))
            firsts[key] = min(firsts.get(key, ts), ts)
    for (_table, rid, k, found, latest), text in zip(v.lost_field_keys, v.lost_fields, strict=True):
        writes = [w for w in soak.writes if w.rid == rid and w.side == "tables"]
        olds = [w for w in writes if w.ts < latest and w.values.get(k, object()) == found]
        news = [w for w in writes if w.ts > latest and k not in w.values]
        never = datetime.max.replace(tzinfo=UTC)
        if any(firsts.get((rid, ms(n.ts)), never) < firsts.get((rid, ms(o.ts)), never)
               for o in olds for n in news if (rid, ms(n.ts)) in firsts):
            v.out_of_order.append(text)


def history(soak: Soak, v: Verdict, records: int = 8) -> list[str]:
    """The writes of the first few records with a lost field or an echo write: version, when each returned, side,
    what it set, the sync's audit entries, replaced records and known copy; and when functions were killed and
    Postgres restarted."""
    rids = list(dict.fromkeys(x.split(" ")[1].split(".")[0] for x in v.lost_fields))[:records]
    rids += [rid for rid in dict.fromkeys(v.echo_ids) if rid not in rids][:4]
    out = [f"  chaos: {datetime.fromtimestamp(at, UTC).time()} {kind} {target}" for at, kind, target in soak.fault_log
           if kind in ("kill_function", "postgres_restart")] if rids else []
    for rid in rids:
        out.append(f"  writes of {rid} (version / returned at / side / values):")
        for w in sorted((w for w in soak.writes if w.rid == rid), key=lambda w: w.ts):
            shown = {k: (val.get("by") if isinstance(val, dict) else val) for k, val in w.values.items()}
            out.append(f"    {w.ts.isoformat()}  {datetime.fromtimestamp(w.at, UTC).time()}  {w.side:<6} {shown}")
        out.append("    the sync's audit entries (time / function / outcome / version / merge):")
        with psycopg.connect(soak.stack.database_url, autocommit=True) as conn:
            for ts, meta in conn.execute("SELECT timestamp, metadata FROM audit_log WHERE resource_id = %s "
                                         "AND actor_type = 'zapier_sync' ORDER BY timestamp, id", (rid,)):
                meta = meta or {}
                merged = json.dumps(meta["merged"]) if meta.get("merged") else ""
                out.append(f"    {ts.time()}  {meta.get('function')}  {meta.get('outcome')}  "
                           f"{meta.get('source_timestamp')}  {merged}")
            for (replaced,) in conn.execute("SELECT replaced FROM zsync.sync_base WHERE record_id = %s", (rid,)):
                out.append("    the writes' replaced Tables records (from / until / row's updated_at):")
                for e in replaced or []:
                    out.append(f"      {e.get('from')}  {e.get('until')}  {(e.get('row') or {}).get('updated_at')}")
            for known, known_at in conn.execute("SELECT known, known_at FROM zsync.tables_known WHERE record_id = %s",
                                                (rid,)):
                out.append(f"    Tables' known copy: edited_at {known_at}, updated_at {known.get('updated_at')}")
    return out


def connections(stack: LocalStack) -> int:
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND usename <> current_user").fetchone()[0]


@dataclass
class SoakResult:
    ok: bool
    table: str
    verdict: Verdict
    figures: dict[str, str]


def run(cfg: SoakConfig) -> SoakResult:
    state_dir = cfg.state_dir or Path(f"/tmp/zsync-soak-{cfg.seed}-{time.time_ns()}")
    with running_stack(state_dir, function_env=FAST_ENV, sweep_interval_s=1.0, sweep_min_age_s=2.0,
                       pgnet_poll_interval_s=0.05, retry_budget_s=1.5, tables_autoreplay=AUTOREPLAY,
                       tables_rate_limit=cfg.rate_limit, monitor_interval_s=0,
                       safety_drain_interval_s=2.0) as stack:  # lost inbox wake-ups: the scheduled drain
        return run_on(stack, cfg)


def run_on(stack: LocalStack, cfg: SoakConfig) -> SoakResult:
    soak = Soak(stack, cfg)
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        outbox_mark = conn.execute("SELECT coalesce(max(id), 0) FROM zsync.outbox").fetchone()[0]
        if cfg.blind_writes is not None:
            conn.execute("UPDATE zsync.config SET value = to_jsonb(%s::text) WHERE key = 'blind_writes'",
                         ("on" if cfg.blind_writes else "off",))
    assert stack.tables is not None
    if cfg.inbox_newest_first:
        requests.post(f"{stack.tables.url.rstrip('/')}/_admin/inbox/faults", json={"newest_first": True}, timeout=10
                      ).raise_for_status()
    stack.tables.ctx.stats.reset()
    # warm every function once, so the memory and connection figures start from a working process
    for fp in stack.functions.values():
        requests.post(fp.url, json={}, headers={H: stack.secret}, timeout=30)
    rss_start, conns_start = stack.function_rss_kb(), connections(stack)
    write_s = soak.run_writers()
    chaos_stopped = time.monotonic()
    dropped = stack.dropped_deliveries()
    replayed, replays = settle(stack, cfg.converge_timeout_s)
    converge_s = time.monotonic() - chaos_stopped
    verdict = judge(soak, outbox_mark)
    out_of_order(soak, verdict)
    drift = reconcile(SyncContext(settings=settings_for(stack)), dry_run=True)
    if not drift.in_sync:
        verdict.lost.append(f"reconcile --dry-run reports drift: {drift.total('drift')} records, "
                            f"{drift.total('duplicates_in_tables')} duplicates in tables")
    rss_end, conns_end = stack.function_rss_kb(), connections(stack)
    f = verdict.figures
    total = sum(soak.changes.values())
    faults = dict(soak.faults) | {"dropped_tables": dropped["tables"], "dropped_pgnet": dropped["pgnet"]}
    rows = [
        ("seed", str(cfg.seed)),
        ("changes", f"{total} (tables->supabase {soak.changes['tables->supabase']}, supabase->tables "
                    f"{soak.changes['supabase->tables']}; conflict pairs {soak.conflicts}; "
                    f"{f['partial_writes']} writes of some fields only; "
                    f"{f['records']} records + {f['audit_entries']} audit entries)"),
        ("redeliveries", ", ".join(f"{k} {n}" for k, n in sorted(soak.redeliveries.items())) or "0"),
        ("faults injected", ", ".join(f"{k} {n}" for k, n in sorted(faults.items()))),
        ("dead-lettered / replayed", f"{sum(replayed.values())} replayed in {replays} replay runs: "
                                     + ", ".join(f"{k} {n}" for k, n in replayed.items() if n)),
        ("recovered by the sweeper", f"{f['swept']} outbox entries re-sent and acknowledged (parked {f['parked']})"),
        ("lost", str(len(verdict.lost))),
        ("lost fields (a field overwritten by an older value)",
         f"{len(verdict.lost_fields)} ({len(verdict.out_of_order)} from Tables deliveries applied out of order, "
         "the known limit; unexplained "
         f"{verdict.unexplained_lost_fields})"),
        ("duplicates", str(len(verdict.duplicates))),
        ("echo writes (a version written again)", f"supabase {f['supabase_echoes']}, tables {f['tables_echoes']}"),
        ("writes per change, tables->supabase", f"{f['supabase_sync_writes'] / max(1, f['tables_user_writes']):.3f} "
                                                f"({f['supabase_sync_writes']} / {f['tables_user_writes']})"),
        ("writes per change, supabase->tables", f"{f['tables_sync_writes'] / max(1, f['sql_user_writes']):.3f} "
                                                f"({f['tables_sync_writes']} / {f['sql_user_writes']}; "
                                                f"SQL writes retried across a restart {soak.uncertain_sql})"),
        ("raced writes converged by a push-back", f"{f['repairs']} (a stale delivery answered with the newer "
                                                  "version: the race a Tables write cannot exclude)"),
        ("reconcile --dry-run drift", str(drift.total("drift"))),
        ("convergence after the chaos stopped", f"{converge_s:.1f} s"),
        ("throughput", f"{total / write_s:.0f} changes/s ({write_s:.1f} s of writing)"),
        ("function RSS start / end", f"{sum(rss_start.values()) / 1024:.0f} / {sum(rss_end.values()) / 1024:.0f} MiB "
                                     f"(7 processes; killed ones restart small)"),
        ("database connections start / end", f"{conns_start} / {conns_end} (bound: 7 x ("
                                             f"{FAST_ENV['ZSYNC_DB_POOL_MAX']} + {ASIDE_POOL_MAX} aside))"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'soak figure':<{width}}  value", *(f"{k:<{width}}  {val}" for k, val in rows)]
    if not verdict.ok:
        lines.append("FAILED: ids that differ and how:")
        lines += history(soak, verdict)
        lines += [f"  lost: {x}" for x in verdict.lost[:200]]
        lines += [f"  lost field{' (out of order)' if x in verdict.out_of_order else ''}: {x}"
                  for x in verdict.lost_fields[:200]]
        lines += [f"  duplicate: {x}" for x in verdict.duplicates[:200]]
    grew = [n for n in rss_start if n in rss_end and rss_end[n] > rss_start[n] * 1.5 + 20_000]
    # pools grow under a burst up to ZSYNC_DB_POOL_MAX per function and keep idle connections a while;
    # a leak would pass that bound (killed processes' connections must be gone)
    growth_ok = conns_end <= len(FUNCTIONS) * (int(FAST_ENV["ZSYNC_DB_POOL_MAX"]) + ASIDE_POOL_MAX)
    if grew:
        lines.append(f"WARNING: function RSS grew by more than half: {grew}")
    if not growth_ok:
        lines.append(f"WARNING: database connections past the pools' bound: {conns_start} -> {conns_end}")
    return SoakResult(verdict.ok and not grew and growth_ok, "\n".join(lines), verdict, dict(rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--changes", type=int, default=2000)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--writers", type=int, default=8)
    p.add_argument("--drop-share", type=float, default=0.05)
    p.add_argument("--rate-limit", type=int, default=1000, help="Tables requests per 5 s per table (0: none)")
    p.add_argument("--partial-share", type=float, default=SoakConfig.partial_share,
                   help="share of the updates that set only some fields (0: whole records only)")
    p.add_argument("--no-chaos", action="store_true")
    p.add_argument("--blind-writes", choices=("on", "off"), default=None,
                   help="zsync.config blind_writes for the run (default: as the migration sets it)")
    p.add_argument("--inbox-newest-first", action="store_true",
                   help="the trigger inbox stand-in leases the newest messages first (Zapier documents no order)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the chaos makes the stand-ins log every failure
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    cfg = SoakConfig(changes=args.changes, seed=seed, writers=args.writers, drop_share=args.drop_share,
                     rate_limit=args.rate_limit or None, chaos=not args.no_chaos, partial_share=args.partial_share,
                     blind_writes=None if args.blind_writes is None else args.blind_writes == "on",
                     inbox_newest_first=args.inbox_newest_first,
                     converge_timeout_s=max(600.0, args.changes / 20))
    print(f"soak: {cfg.changes} changes, seed {seed} (rerun: python -m bench.soak --changes {cfg.changes} "
          f"--seed {seed})", flush=True)
    result = run(cfg)
    print(result.table, flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
