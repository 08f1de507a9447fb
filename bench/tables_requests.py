"""Zapier Tables requests the sync makes per change, each direction (issue 21 item 3), through the local
stack and the Tables stand-in's request log (``GET /_admin/requests``, ``DELETE /_admin/requests``).

Goals: Tables -> Supabase 0 records-API requests per change (the sync applied it: it needs no Tables request to
know that Tables holds it); Supabase -> Tables at most 1 per single change and at most 0.02 per record in a
burst (one UPDATE of many rows: finds and writes in batches).

How it counts: the log resets, the people's own writes carry an ``Idempotency-Key`` starting with
:data:`MARK` (so they are told apart from the sync's), the change is made, and the run waits until the other
side holds it (read from Postgres, never from Tables) and the stack is quiet (the sync's outbox sweep and the
inbox drain run once more, as their schedules would). Every other request in the log is the sync's. They are
split into the records API (the figure with the goal), the trigger inbox (lease / ack of the change's
notification: the Zapier side's delivery, not a Tables read) and the OAuth token.

    python -m bench.tables_requests [--singles 20] [--burst 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import requests

from shared.core.spec import TABLES

TABLE = "agent_jobs"
MARK = "zsync-bench-person-"
GOAL_TO_SUPABASE = 0.0
GOAL_TO_TABLES_SINGLE = 1.0
GOAL_TO_TABLES_BURST = 0.02
BATCH = 100  # records per people's batch write (the API's maximum)


@dataclass
class Count:
    changes: int
    records_api: int = 0
    inbox: int = 0
    token: int = 0
    other: int = 0
    paths: Counter | None = None

    def per_change(self, what: str = "records_api") -> float:
        return getattr(self, what) / self.changes if self.changes else 0.0


def classify(entries: list[dict[str, Any]], changes: int) -> Count:
    """The sync's requests in the log (entries without our MARK), by kind."""
    out = Count(changes, paths=Counter())
    for e in entries:
        if str(e.get("idempotency_key_value") or "").startswith(MARK):
            continue
        path = e["path"]
        kind = ("inbox" if "inbox" in path else "token" if "oauth" in path or "token" in path
                else "records_api" if "/tables" in path or "/records" in path else "other")
        setattr(out, kind, getattr(out, kind) + 1)
        out.paths[f"{e['method']} {_shape(path)}"] += 1
    return out


def _shape(path: str) -> str:
    """A path with its ids replaced, for the breakdown."""
    parts = path.split("/")
    return "/".join("{id}" if len(p) >= 20 or (p and p[0].isdigit()) else p for p in parts)


class People:
    """Writes made by people and agents, marked in the request log; waits read Postgres only."""

    def __init__(self, stack: Any):
        self.stack = stack
        self.base = stack.tables.url.rstrip("/")
        self.tid = stack.table_ids[TABLE]
        self.client = stack.tables_client(timeout_s=30, retry_budget_s=60)
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {stack.token}"

    def close(self) -> None:
        self.client.close()
        self.http.close()

    def reset_log(self) -> None:
        r = self.http.delete(f"{self.base}/_admin/requests", timeout=10)
        assert r.status_code == 204, r.text

    def log(self) -> list[dict[str, Any]]:
        return self.http.get(f"{self.base}/_admin/requests", timeout=10).json()["data"]

    def sql(self, query: str, params: tuple | list = ()) -> list[tuple]:
        with psycopg.connect(self.stack.database_url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    # -- setup -------------------------------------------------------------------------------------------
    def jobs(self, n: int, run: str) -> dict[str, str]:
        """``n`` jobs made by agents in Supabase and synced: -> {id: Tables record id}."""
        ids = [f"req-{run}-{i}" for i in range(n)]
        self.sql("INSERT INTO agent_jobs (id, status, error_message) "
                 "SELECT x, 'queued', NULL FROM unnest(%s::text[]) x", (ids,))
        self.settle()
        wanted = set(ids)
        out: dict[str, str] = {}
        for rec in self.client.iter_records(self.tid, page_size=1000):
            if rec.data.get("id") in wanted:
                out[rec.data["id"]] = rec.id
        missing = wanted - set(out)
        assert not missing, f"{len(missing)} jobs never reached Tables"
        return out

    # -- the people's writes -----------------------------------------------------------------------------
    def person_edits(self, updates: list[tuple[str, dict[str, Any]]]) -> None:
        """Cell edits in Tables (updated_at as it was), marked; in batches of :data:`BATCH`."""
        path = f"{self.base}/api/v0/sdk/tables/api/v1/tables/{self.tid}/records"
        for i in range(0, len(updates), BATCH):
            chunk = updates[i:i + BATCH]
            body = {"updated_records": [{"id": rid, "data": self.client._keys(self.tid, data)} for rid, data in chunk]}
            r = self.http.patch(path, json=body, headers={"Idempotency-Key": MARK + uuid.uuid4().hex}, timeout=60)
            assert r.status_code == 200, r.text

    def agent_updates(self, ids: list[str], value: str) -> None:
        """One UPDATE of all ``ids`` (a single change when there is one)."""
        self.sql("UPDATE agent_jobs SET status = %s WHERE id = ANY(%s)", (value, ids))

    # -- waits (Postgres only) ---------------------------------------------------------------------------
    def wait_in_supabase(self, ids: list[str], note: str, timeout_s: float = 60) -> None:
        self._wait(lambda: self.sql("SELECT count(*) FROM agent_jobs WHERE id = ANY(%s) AND error_message = %s",
                                    (ids, note))[0][0] == len(ids), timeout_s)

    def wait_acked(self, ids: list[str], timeout_s: float = 60) -> None:
        self._wait(lambda: self.sql("SELECT count(*) FROM zsync.outbox WHERE record_id = ANY(%s) AND acked_at IS NULL",
                                    (ids,))[0][0] == 0, timeout_s)

    @staticmethod
    def _wait(probe: Any, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not probe():
            if time.monotonic() > deadline:
                raise TimeoutError("the change never arrived")
            time.sleep(0.02)

    def settle(self) -> None:
        """Quiet, then what the schedules do (outbox sweep, inbox drain), then quiet again."""
        self.stack.wait_quiet(timeout_s=120)
        for _ in range(3):
            sent = self.stack.sweep_outbox(0)
            self.stack.safety_drain()
            self.stack.wait_quiet(timeout_s=120)
            if not sent:
                return


def to_supabase(people: People, recs: dict[str, str], ids: list[str], burst: bool) -> Count:
    """People's note edits in Tables: one at a time (``burst`` False) or all in one go."""
    note = f"note-{uuid.uuid4().hex[:6]}"
    people.settle()
    people.reset_log()
    if burst:
        people.person_edits([(recs[i], {"error_message": note}) for i in ids])
        people.wait_in_supabase(ids, note)
    else:
        for i in ids:
            people.person_edits([(recs[i], {"error_message": note})])
            people.wait_in_supabase([i], note)
            people.stack.wait_quiet(timeout_s=60)
    people.settle()
    return classify(people.log(), len(ids))


def to_tables(people: People, ids: list[str], burst: bool) -> Count:
    """Agents' status updates in Supabase: one UPDATE per record, or one UPDATE of them all."""
    value = f"s-{uuid.uuid4().hex[:6]}"
    people.settle()
    people.reset_log()
    if burst:
        people.agent_updates(ids, value)
        people.wait_acked(ids)
    else:
        for i in ids:
            people.agent_updates([i], value)
            people.wait_acked([i])
            people.stack.wait_quiet(timeout_s=60)
    people.settle()
    return classify(people.log(), len(ids))


def measure(stack: Any, singles: int = 20, burst: int = 200) -> dict[str, Count]:
    """The four figures with goals (``to_supabase single|burst``, ``to_tables single|burst``) and one shown
    (``to_tables single, just edited in Tables``) on a running stack."""
    assert TABLES[TABLE].version
    people = People(stack)
    try:
        run = uuid.uuid4().hex[:6]
        recs = people.jobs(3 * singles + burst, run)
        ids = sorted(recs)
        edited_ids, quiet_ids, quiet2_ids = ids[:singles], ids[singles:2 * singles], ids[2 * singles:3 * singles]
        burst_ids = ids[3 * singles:]
        counts = {
            "to_supabase single": to_supabase(people, recs, edited_ids, burst=False),
            "to_supabase burst": to_supabase(people, recs, burst_ids, burst=True),
            "to_tables single": to_tables(people, quiet_ids, burst=False),
            "to_tables burst": to_tables(people, burst_ids, burst=True),
        }
        # agents' single changes of records people edited in Tables just before: found first (blind_quiet_s,
        # 30 s), so an edit of theirs still on its way is read, not overwritten
        to_supabase(people, recs, edited_ids, burst=True)  # people edit them again now (well inside 30 s)
        counts[BLIND_EDITED] = to_tables(people, edited_ids, burst=False)
        # with zsync.config blind_writes off (on by default): every write found first
        [(before,)] = people.sql("SELECT value #>> '{}' FROM zsync.config WHERE key = 'blind_writes'")
        people.sql("UPDATE zsync.config SET value = '\"off\"' WHERE key = 'blind_writes'")
        try:
            counts[FOUND] = to_tables(people, quiet2_ids, burst=False)
        finally:
            people.sql("UPDATE zsync.config SET value = to_jsonb(%s::text) WHERE key = 'blind_writes'", (before,))
        return counts
    finally:
        people.close()


FOUND = "to_tables single, blind writes off"
BLIND_EDITED = "to_tables single, just edited in Tables"
GOALS = {"to_supabase single": GOAL_TO_SUPABASE, "to_supabase burst": GOAL_TO_SUPABASE,
         "to_tables single": GOAL_TO_TABLES_SINGLE, "to_tables burst": GOAL_TO_TABLES_BURST}
INFO = {BLIND_EDITED: 2.0, FOUND: 2.0}  # shown with what they cost by design, not goals
LABELS = {"to_supabase single": "tables->supabase, single changes", "to_supabase burst": "tables->supabase, burst",
          "to_tables single": "supabase->tables, single changes",
          FOUND: "supabase->tables, single, blind writes off",
          BLIND_EDITED: "supabase->tables, single, edited in Tables <30 s ago",
          "to_tables burst": "supabase->tables, burst"}


def summary(counts: dict[str, Count]) -> list[tuple[str, str, str]]:
    """Rows for `make bench`'s SUMMARY: (figure, measured, goal)."""
    rows = []
    for key, c in counts.items():
        goal = GOALS.get(key, INFO.get(key, 0.0))
        verdict = ("ok" if c.per_change() <= goal else "OVER") if key in GOALS else "(info)"
        rows.append((f"Tables requests/change {LABELS[key]}",
                     f"{c.per_change():.3f} ({c.records_api} for {c.changes}; inbox {c.inbox}, "
                     f"token {c.token}) {verdict}",
                     f"<= {goal:g} records-API requests per change" if key in GOALS else "find + write (info)"))
    return rows


def report(counts: dict[str, Count]) -> list[tuple[str, str, str]]:
    print("Tables requests per change (the sync's, from the stand-in's request log; people's writes excluded)")
    for key, c in counts.items():
        goal = f"goal <= {GOALS[key]:g}" if key in GOALS else "no goal"
        print(f"  {LABELS[key]:<34} {c.changes:>4} changes: records API {c.records_api} "
              f"({c.per_change():.3f}/change, {goal}), inbox {c.inbox} "
              f"({c.per_change('inbox'):.3f}/change), token {c.token}, other {c.other}")
        for what, n in sorted((c.paths or Counter()).items(), key=lambda kv: -kv[1])[:6]:
            print(f"      {n:>5}  {what}")
    return summary(counts)


def run(stack: Any, singles: int = 20, burst: int = 200) -> list[tuple[str, str, str]]:
    """For bench/lag.py's `make bench` run (its stack)."""
    return report(measure(stack, singles, burst))


def main() -> None:
    from infra.local.stack import running_stack

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--singles", type=int, default=20, help="single changes per direction")
    parser.add_argument("--burst", type=int, default=200, help="records in the burst per direction")
    args = parser.parse_args()
    with running_stack(Path(tempfile.mkdtemp(prefix="zsync-bench-req-")) / "stack", sweep_interval_s=3600,
                       trash_interval_s=3600, safety_drain_interval_s=3600) as stack:
        rows = run(stack, args.singles, args.burst)
    width = max(len(r[0]) for r in rows)
    for name, value, goal in rows:
        print(f"{name:<{width}}  {value:<52} {goal}")


if __name__ == "__main__":
    main()
