"""Issue 20 item 4, the property: random interleavings of two-sided edits to random fields of a few records
converge, on both sides, to the per-field latest value, with no duplicate record and no sync loop.

Hypothesis draws a program for two ``agent_jobs`` records both sides agree on: agents' UPDATEs in Supabase and
people's cell edits in Tables (``updated_at`` left as it was), each to a random subset of five fields (text,
integer, JSON); random pauses; stretches where every change notification is lost in transit (so the next
edits on the other side are made before the first ones arrive: the two sides meet only later, in the inbox
lease, the outbox batch or the sweep); and redeliveries of an older Tables payload (a Zap's Autoreplay) or an
older Database Webhook. Every written value is unique, so where it ends up tells which write it was. Writes
are at least a few milliseconds apart: program order is time order on both clocks (one machine).

After the program everything held is delivered (what the schedules do: the outbox sweep, the inbox drain) and:

* every field of every record, in Supabase and in Tables, holds the value of the LAST write to that field (or
  its initial value) - a field overwritten by an older value is a lost field;
* each record is held by exactly one Tables record (no duplicate);
* another sweep and drain change nothing: no write to either side, no audit entry (no loop).

CI runs a few examples (``derandomize``: the same ones each run); ``--runslow`` runs many more.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from shared.core.mapping import parse_supabase_record, parse_tables_record
from shared.core.spec import TABLES
from shared.platform.settings import DEFAULT_SECRET_HEADER
from tests.e2e import Supabase, Tables, eventually, release_held, settle

JOBS = TABLES["agent_jobs"]
FIELDS = ("status", "error_message", "job_type", "retry_count", "parameters")
RECORDS = 2
MIN_GAP_S = 0.004  # between two writes: distinct milliseconds on both clocks

# --- the program ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    side: str  # "agent" (SQL in Supabase) or "person" (a cell edit in Tables)
    record: int
    fields: tuple[str, ...]


@dataclass(frozen=True)
class Pause:
    seconds: float


@dataclass(frozen=True)
class Hold:
    on: bool  # True: every change notification from now on is lost in transit until Hold(False)


@dataclass(frozen=True)
class Redeliver:
    side: str  # "tables": an older Tables payload to *_to_supabase; "supabase": an older webhook to *_to_tables
    record: int
    age: int  # 0 = the newest captured payload of that record, 1 = the one before, ...


edits = st.builds(Edit, st.sampled_from(["agent", "person"]), st.integers(0, RECORDS - 1),
                  st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True).map(tuple))
steps = st.one_of(
    edits, edits, edits, edits,
    st.builds(Pause, st.sampled_from([0.0, 0.01, 0.03, 0.08, 0.2])),
    st.builds(Hold, st.booleans()),
    st.builds(Redeliver, st.sampled_from(["tables", "supabase"]), st.integers(0, RECORDS - 1), st.integers(0, 3)),
)
programs = st.lists(steps, min_size=3, max_size=12).filter(lambda p: any(isinstance(s, Edit) for s in p))

CI = settings(max_examples=6, deadline=None, derandomize=True, print_blob=True,
              phases=(Phase.explicit, Phase.reuse, Phase.generate),  # no shrinking: every example is a stack run
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.filter_too_much])
LARGE = settings(CI, max_examples=60, derandomize=False)

# --- running it ---------------------------------------------------------------------------------------------------


def value_for(field: str, label: str, n: int) -> Any:
    if field == "retry_count":
        return n
    if field == "parameters":
        return {"w": label, "n": n}
    return label


@dataclass
class Run:
    stack: Any
    tables: Tables
    supabase: Supabase
    program: list[Any]

    def __post_init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.ids = [f"mp-{tag}-{i}" for i in range(RECORDS)]
        self.rec_ids: list[str] = []
        self.expected: list[dict[str, Any]] = []
        self.tables_payloads: list[list[dict[str, Any]]] = [[] for _ in range(RECORDS)]
        self.webhooks: list[list[dict[str, Any]]] = [[] for _ in range(RECORDS)]
        self.n = 0
        self.last_write = 0.0
        self.log: list[str] = []

    def setup(self) -> None:
        for i, rid in enumerate(self.ids):
            initial = {"status": "queued", "error_message": None, "job_type": f"t{i}", "retry_count": 0,
                       "parameters": {"w": "initial"}}
            self.supabase.query("INSERT INTO agent_jobs (id, status, job_type, retry_count, parameters) "
                                "VALUES (%s, %s, %s, %s, %s::jsonb)", (rid, initial["status"], initial["job_type"],
                                                                      0, json.dumps(initial["parameters"])))
            self.expected.append(initial)
        for rid in self.ids:
            rec = eventually(lambda r=rid: self.tables.find("agent_jobs", r))
            self.rec_ids.append(rec["id"])
        settle(self.stack, rounds=6)
        for i, rid in enumerate(self.ids):
            rec = self.tables.find("agent_jobs", rid)
            self.tables_payloads[i].append(dict(rec["data"], edited_at=rec["edited_at"]))
            self.webhooks[i].append(self._webhook(rid))

    def _webhook(self, rid: str) -> dict[str, Any]:
        return {"type": "UPDATE", "table": "agent_jobs", "schema": "public",
                "record": self.supabase.row("agent_jobs", rid), "old_record": None}

    def _gap(self) -> None:
        wait = self.last_write + MIN_GAP_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    def edit(self, step: Edit) -> None:
        self._gap()
        self.n += 1
        label = f"{step.side}-{self.n}"
        values = {f: value_for(f, label, self.n) for f in step.fields}
        rid = self.ids[step.record]
        if step.side == "agent":
            sets = ", ".join(f"{f} = %s" + ("::jsonb" if f == "parameters" else "") for f in values)
            params = [json.dumps(v) if f == "parameters" else v for f, v in values.items()]
            self.supabase.query(f"UPDATE agent_jobs SET {sets} WHERE id = %s", (*params, rid))
            self.webhooks[step.record].append(self._webhook(rid))
        else:
            cells = {f: json.dumps(v) if f == "parameters" else v for f, v in values.items()}
            rec = self.tables.patch("agent_jobs", self.rec_ids[step.record], cells)
            self.tables_payloads[step.record].append(dict(rec["data"], edited_at=rec["edited_at"]))
        self.last_write = time.monotonic()
        self.expected[step.record].update(values)
        self.log.append(f"{label}: record {step.record} {values}")

    def redeliver(self, step: Redeliver) -> None:
        captured = (self.tables_payloads if step.side == "tables" else self.webhooks)[step.record]
        payload = captured[max(0, len(captured) - 1 - step.age)]
        direction = "agent_jobs_to_supabase" if step.side == "tables" else "agent_jobs_to_tables"
        r = requests.post(self.stack.functions[direction].url, json=payload,
                          headers={DEFAULT_SECRET_HEADER: self.stack.secret}, timeout=30)
        self.log.append(f"redeliver {step.side} record {step.record} age {step.age}: {r.status_code} "
                        f"{r.text[:120]}")
        assert r.status_code == 200, r.text

    def play(self) -> None:
        holding = False
        for step in self.program:
            if isinstance(step, Edit):
                self.edit(step)
            elif isinstance(step, Pause):
                time.sleep(step.seconds)
            elif isinstance(step, Hold):
                if step.on and not holding:
                    self.stack.drop_deliveries(1.0)
                elif not step.on and holding:
                    release_held(self.stack)
                holding = step.on
            else:
                self.redeliver(step)
        if holding:
            release_held(self.stack)
        settle(self.stack, rounds=6)

    # -- the checks ------------------------------------------------------------------------------------------
    def sides(self, i: int) -> tuple[dict[str, Any], dict[str, Any]]:
        found = self.tables.find_all("agent_jobs", self.ids[i])
        assert len(found) == 1, f"record {i}: {len(found)} Tables records (duplicate)\n{self.story()}"
        s = parse_supabase_record(JOBS, self.supabase.row("agent_jobs", self.ids[i]))
        t = parse_tables_record(JOBS, found[0]["data"])
        return ({f: s.get(f) for f in FIELDS}, {f: t.get(f) for f in FIELDS})

    def counts(self) -> tuple[int, int, int]:
        audits = sum(len(self.supabase.audit(rid)) for rid in self.ids)
        return sum(self.supabase.writes("agent_jobs", rid) for rid in self.ids), \
            self.tables.writes("agent_jobs"), audits

    def story(self) -> str:
        return "program:\n  " + "\n  ".join(map(repr, self.program)) + "\nwrites:\n  " + "\n  ".join(self.log)

    def check(self) -> None:
        lost = []
        for i in range(RECORDS):
            in_supabase, in_tables = self.sides(i)
            want = {f: (None if self.expected[i][f] == "" else self.expected[i][f]) for f in FIELDS}
            for f in FIELDS:
                if in_supabase[f] != want[f] or in_tables[f] != want[f]:
                    lost.append(f"record {i} field {f}: latest write {want[f]!r}; Supabase {in_supabase[f]!r}, "
                                f"Tables {in_tables[f]!r}")
        assert not lost, "lost field(s):\n  " + "\n  ".join(lost) + "\n" + self.story()
        before = self.counts()
        time.sleep(0.3)
        settle(self.stack, rounds=6)
        assert self.counts() == before, f"still writing after it settled (a loop): {before} -> {self.counts()}\n" \
                                        + self.story()


def converge(stack: Any, program: list[Any]) -> None:
    tables, supabase = Tables(stack), Supabase(stack)
    run = Run(stack, tables, supabase, program)
    try:
        run.setup()
        run.play()
        run.check()
    finally:
        stack.drop_deliveries(0.0)


@CI
@given(programs)
def test_two_sided_edits_converge_to_the_per_field_latest_value(stack, program):
    converge(stack, program)


@pytest.mark.slow
@LARGE
@given(programs)
def test_two_sided_edits_converge_larger(stack, program):
    converge(stack, program)


# The shape hypothesis found with --runslow (2026-12-05, against the merge branch): an agent writes twice in a
# row, a person edits the record a few milliseconds later. Whether it loses depends on the stack's timing (3-4
# runs in 10 lost all of the person's fields: the agent's second write lands while the drain is writing the
# first to Tables), so it runs several times.
AGENT_TWICE_THEN_PERSON = [Edit("agent", 1, ("status", "error_message", "parameters")),
                           Edit("agent", 1, ("parameters", "retry_count")),
                           Edit("person", 0, ("retry_count",)),
                           Edit("person", 1, ("retry_count", "parameters", "job_type"))]


@pytest.mark.parametrize("attempt", range(6))
def test_agent_writes_twice_then_a_person_edits_soon_after(stack, attempt):
    converge(stack, AGENT_TWICE_THEN_PERSON)
