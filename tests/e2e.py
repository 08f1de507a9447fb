"""Helpers for end-to-end tests that drive the local stack the way users do: Zapier agents through
the Tables records API, Claude agents through SQL on Supabase."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
import requests

T = TypeVar("T")


def eventually(probe: Callable[[], T | None], timeout_s: float = 15.0, interval_s: float = 0.05) -> T:
    """Poll ``probe`` until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s (last: {value!r})")
        time.sleep(interval_s)



@contextmanager
def blind_writes(stack: Any, on: bool) -> Iterator[None]:
    """zsync.config 'blind_writes' set for the block, then put back. On: a *_to_tables write of a record whose
    Tables copy the sync knows goes by its Zapier id without a find (issue 21, the default); off: every write
    finds its record first - the path whose own merge a test watches."""
    def put(value: str) -> str:
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            old = conn.execute("SELECT value #>> '{}' FROM zsync.config WHERE key = 'blind_writes'").fetchone()
            conn.execute("UPDATE zsync.config SET value = to_jsonb(%s::text) WHERE key = 'blind_writes'", (value,))
            return old[0] if old else "off"

    before = put("on" if on else "off")
    try:
        yield
    finally:
        put(before)


def blind_writes_off(stack: Any) -> Any:
    return blind_writes(stack, False)


@contextmanager
def wakeups_lost(stack: Any) -> Iterator[None]:
    """The Database Webhook's wake-ups are lost for the block (blind writes as they are): Supabase's changes wait
    in the outbox until the test sweeps it (or the block's lost wake-up is sent again)."""
    with stack.trash_paused():
        stack.drop_deliveries(1.0)
        try:
            yield
        finally:
            stack.drop_deliveries(0.0)


@contextmanager
def late_deliveries(stack: Any, function: str = "agent_jobs_to_supabase") -> Iterator[None]:
    """The trigger inbox of ``function`` sends no wake-up for the block (its notification URL unset): Tables
    edits made meanwhile wait in the inbox, their deliveries late; wired again afterwards."""
    from shared.adapters.trigger_inbox import InboxClient

    client = InboxClient.for_tables(stack.tables_client())
    inbox_id = stack.inboxes[function]
    url = client.get(inbox_id).notification_url
    client.update(inbox_id, None)
    try:
        yield
    finally:
        client.update(inbox_id, url)


def uid(prefix: str) -> str:
    """A unique record id for one test (tests share one stack)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Tables:
    """The Zapier side, through the Tables API (our client, OAuth client credentials, fields by name)."""

    def __init__(self, stack: Any):
        self.base = stack.tables.url.rstrip("/")
        self.ids = stack.table_ids
        self.client = stack.tables_client(timeout_s=10, retry_budget_s=20)
        self.s = requests.Session()  # for /_admin

    @staticmethod
    def _dict(record: Any) -> dict:
        return record.model_dump()

    def create(self, table: str, fields: dict[str, Any]) -> dict:
        """A person's or agent's create: a new change each time, even with the fields of an earlier one (the
        client's Idempotency-Key would otherwise take it for a retry of that one)."""
        return self._dict(self.client.create(self.ids[table], fields, change=uuid.uuid4().hex))

    def find(self, table: str, record_id: str) -> dict | None:
        found = self.client.find_by_field(self.ids[table], "id", record_id)
        return self._dict(found) if found else None

    def find_all(self, table: str, record_id: str) -> list[dict]:
        return [self._dict(r) for r in self.client.iter_records(self.ids[table], filters={"id": record_id})]

    def patch(self, table: str, rec_id: str, fields: dict[str, Any]) -> dict:
        return self._dict(self.client.update(self.ids[table], rec_id, fields))

    def update(self, table: str, record_id: str, fields: dict[str, Any]) -> dict:
        rec = self.find(table, record_id)
        assert rec, record_id
        return self.patch(table, rec["id"], fields)

    def stats(self) -> dict:
        return self.s.get(f"{self.base}/_admin/stats", timeout=10).json()

    def writes(self, table: str) -> int:
        return self.stats()["writes"].get(self.ids[table], 0)


class Supabase:
    """The Claude side, through SQL."""

    def __init__(self, stack: Any):
        self.url = stack.database_url

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def row(self, table: str, record_id: str) -> dict | None:
        rows = self.query(f"SELECT to_jsonb(t) FROM public.{table} t WHERE id = %s", (record_id,))
        return rows[0][0] if rows else None

    def writes(self, table: str, record_id: str | None = None) -> int:
        """INSERTs + UPDATEs on a webhook table, as counted by the outbox trigger (one row per write; the
        sync's repairs queued by zsync.requeue are re-sends, not writes)."""
        sql = "SELECT count(*) FROM zsync.outbox WHERE table_name = %s AND NOT repair"
        params: tuple = (table,)
        if record_id is not None:
            sql += " AND record_id = %s"
            params += (record_id,)
        return self.query(sql, params)[0][0]

    def audit(self, resource_id: str, action: str | None = None) -> list[dict]:
        sql = "SELECT to_jsonb(a) FROM audit_log a WHERE resource_id = %s"
        params: tuple = (resource_id,)
        if action:
            sql += " AND action = %s"
            params += (action,)
        return [r[0] for r in self.query(sql + " ORDER BY timestamp", params)]


def deadlocks(url: str) -> int:
    """Deadlocks Postgres detected in this database, once every other session has ended (each reports its
    statistics when it exits)."""
    from shared.adapters import supabase_db

    supabase_db.close_pools()
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(100):
            others = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                  "AND pid <> pg_backend_pid()").fetchone()[0]
            if not others:
                break
            time.sleep(0.05)
        return conn.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()").fetchone()[0]


def settle(stack: Any, rounds: int = 5) -> None:
    """Everything held is delivered: what the every-minute inbox drain and pg_cron's sweeper do, then wait
    until quiet, until a round finds nothing to do (no round left: a loop)."""
    for _ in range(rounds):
        drained = stack.safety_drain()
        sent = stack.sweep_outbox(0)
        stack.wait_quiet(timeout_s=60, settle_s=0.2)
        if not sent and not any(_handled(v) for v in drained.values()):
            return
    raise AssertionError(f"the sync did not settle in {rounds} rounds (a loop?)")


def _handled(answer: Any) -> int:
    """How many messages an inbox drain's answer says it handled (the counts next to inbox/stopped)."""
    if not isinstance(answer, dict):
        return 0
    return sum(v for v in answer.values() if isinstance(v, int) and not isinstance(v, bool))


def release_held(stack: Any) -> None:
    """Wait until every notification sent under ``drop_deliveries(1.0)`` is lost, then deliver again."""
    from infra.local.pgnet_sql import wait_idle

    deadline = time.monotonic() + 30
    while stack.tables.ctx.inboxes.stats()["notifications"]["pending"] and time.monotonic() < deadline:
        time.sleep(0.02)
    wait_idle(stack.database_url, timeout_s=30)
    stack.drop_deliveries(0.0)
