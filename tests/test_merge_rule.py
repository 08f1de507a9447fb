"""The field-level merge's SQL rule (zsync.merge3, zsync.merge_decide, zsync.sync_apply / sync_apply_many with
zsync.sync_base) against a real Postgres, and - through the local stack - that a change applied from Tables costs
no Tables request (the echo is not checked against Tables) while a record both sides changed is merged by
whichever direction meets it first.

Scenarios of issue 20 at the SQL level: an agent's status change in Supabase and a person's note in Tables 50 ms
later; the note typed first and the status committed 0.3 s later; both keep both changes (merged), where the
whole-record rule (``SET zsync.field_merge = 'off'``, the seed's rule) loses one of them.
"""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import requests

from infra.local.postgres import create_database, prepare_database
from tests.e2e import eventually, late_deliveries, uid

T = "public.agent_jobs"


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _row(conn: psycopg.Connection, rid: str) -> dict:
    return conn.execute("SELECT to_jsonb(t) FROM agent_jobs t WHERE id = %s", (rid,)).fetchone()[0]


def _apply(conn: psycopg.Connection, row: dict, edited_at: datetime | None = None) -> tuple[str, dict | None]:
    out = conn.execute("SELECT outcome, merge FROM zsync.sync_apply(%s::regclass, %s::jsonb, %s)",
                       (T, json.dumps(row), edited_at)).fetchone()
    return out[0], out[1]


def _merge3(conn: psycopg.Connection, base: dict, a: dict, b: dict) -> dict:
    cur = conn.execute("SELECT merged, outcome, from_a, from_b, both_later FROM zsync.merge3(%s::regclass, "
                       "%s::jsonb, %s::jsonb, %s::jsonb)", (T, json.dumps(base), json.dumps(a), json.dumps(b)))
    merged, outcome, from_a, from_b, both = cur.fetchone()
    return {"merged": merged, "outcome": outcome, "from_a": from_a, "from_b": from_b, "both_later": both}


def _seed(conn: psycopg.Connection, rid: str, at: datetime, **fields: Any) -> dict:
    """A record both sides hold (inserted, then the same version delivered from Tables: 'unchanged', which
    acknowledges the insert's outbox entry: the row is the agreed version, no copy of it is kept)."""
    row = {"id": rid, "job_type": "discovery", "status": "queued", "error_message": None, "parameters": None,
           "retry_count": 0, "created_at": _iso(at), "updated_at": _iso(at), **fields}
    conn.execute("INSERT INTO agent_jobs SELECT * FROM jsonb_populate_record(NULL::agent_jobs, %s::jsonb)",
                 (json.dumps(row),))
    assert _apply(conn, row)[0] == "unchanged"
    assert conn.execute("SELECT count(*) FROM zsync.sync_base WHERE record_id = %s", (rid,)).fetchone()[0] == 0
    assert conn.execute("SELECT ack_outcome FROM zsync.outbox WHERE record_id = %s", (rid,)).fetchall() == \
        [("unchanged",)]
    return row


NOW = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
BASE = {"id": "m", "job_type": "discovery", "status": "queued", "error_message": None,
        "parameters": {"a": 1, "b": 2}, "retry_count": 0, "updated_at": _iso(NOW)}


# --- zsync.merge3 --------------------------------------------------------------------------------------------


def test_merge3_takes_each_sides_own_fields_and_the_later_side_on_a_field_both_changed(db):
    a = dict(BASE, status="agent", retry_count=5, updated_at=_iso(NOW + timedelta(seconds=1)))
    b = dict(BASE, error_message="a note", retry_count=7, updated_at=_iso(NOW + timedelta(seconds=2)))
    m = _merge3(db, BASE, a, b)
    assert m["outcome"] == "merged"
    assert m["merged"]["status"] == "agent" and m["merged"]["error_message"] == "a note"
    assert m["merged"]["retry_count"] == 7  # both changed it: b's version is later
    assert m["from_a"] == ["status"] and m["from_b"] == ["error_message"] and m["both_later"] == {"retry_count": "b"}
    # strictly after both inputs: the later one's time + 1 ms
    assert datetime.fromisoformat(m["merged"]["updated_at"]) == NOW + timedelta(seconds=2, milliseconds=1)


def test_merge3_is_the_later_input_when_it_already_holds_every_change(db):
    a = dict(BASE, status="agent", updated_at=_iso(NOW + timedelta(seconds=1)))
    b = dict(a, error_message="note", updated_at=_iso(NOW + timedelta(seconds=2)))  # made from a
    m = _merge3(db, BASE, a, b)
    assert m["outcome"] == "b" and m["merged"]["updated_at"] == b["updated_at"].replace("Z", "+00:00")
    # an older input whose content wins still needs a version after the other side's
    older_only = _merge3(db, BASE, dict(BASE, status="x", updated_at=_iso(NOW + timedelta(seconds=1))),
                         dict(BASE, updated_at=_iso(NOW + timedelta(seconds=3))))
    assert older_only["outcome"] == "merged" and older_only["merged"]["status"] == "x"


def test_merge3_json_and_arrays_are_whole_values_and_empty_text_is_no_value(db):
    a = dict(BASE, parameters={"a": 10, "b": 2}, error_message="", updated_at=_iso(NOW + timedelta(seconds=1)))
    b = dict(BASE, parameters={"a": 1, "b": 20}, updated_at=_iso(NOW + timedelta(seconds=2)))
    m = _merge3(db, BASE, a, b)
    # different keys of one JSON value changed on each side: one value, changed on both -> the later whole value
    assert m["merged"]["parameters"] == {"a": 1, "b": 20} and m["both_later"] == {"parameters": "b"}
    assert m["outcome"] == "b"  # "" is null: a changed nothing else
    # the same JSON by value (12.50 = 12.5, key order) is no change
    c = dict(BASE, parameters={"b": 2.0, "a": 1.00}, status="s", updated_at=_iso(NOW + timedelta(seconds=1)))
    assert _merge3(db, BASE, c, b)["both_later"] == {}


def test_merge3_is_symmetric_and_deterministic(db):
    rng = random.Random(20)
    values = {"status": ["queued", "agent", "done", None], "error_message": [None, "", "n1", "n2"],
              "retry_count": [0, 1, 2], "parameters": [None, {"a": 1}, {"a": 2}, [1, 2]]}
    for i in range(150):
        def version(k: int) -> dict:
            return dict(BASE, **{f: rng.choice(v) for f, v in values.items() if rng.random() < 0.5},
                        updated_at=_iso(NOW + timedelta(milliseconds=rng.choice([k, 5, 7]))))
        base, a, b = dict(BASE), version(3), version(4)
        ab, ba = _merge3(db, base, a, b), _merge3(db, base, b, a)
        assert ab["merged"] == ba["merged"], (i, base, a, b)
        assert (ab["from_a"], ab["from_b"]) == (ba["from_b"], ba["from_a"])
        assert _merge3(db, base, a, b) == ab


# --- zsync.sync_apply: the two measured scenarios -------------------------------------------------


def _pending(conn: psycopg.Connection, rid: str) -> list[datetime]:
    return [r[0] for r in conn.execute("SELECT record_updated_at FROM zsync.outbox WHERE record_id = %s "
                                       "AND acked_at IS NULL ORDER BY id", (rid,))]


def test_agent_status_then_a_persons_note_50ms_later_both_survive(db):
    rid = uid("agent-then-note")
    t0 = datetime.now(UTC) - timedelta(seconds=10)
    seeded = _seed(db, rid, t0)
    db.execute("UPDATE agent_jobs SET status = 'agent', updated_at = now() WHERE id = %s", (rid,))
    agent = _row(db, rid)
    # 50 ms later a person types a note in Tables: updated_at left as it was, edited_at = the edit's time
    note = dict(seeded, error_message="checked by hand")
    outcome, merge = _apply(db, note, datetime.fromisoformat(agent["updated_at"]) + timedelta(milliseconds=50))
    assert outcome == "merged"
    assert merge["supabase"] == ["status"] and merge["tables"] == ["error_message"] and merge["both_later"] == {}
    row = _row(db, rid)
    assert (row["status"], row["error_message"]) == ("agent", "checked by hand")
    assert _pending(db, rid)[-1] == datetime.fromisoformat(row["updated_at"])  # queued for Tables: it lacks it
    base = db.execute("SELECT base FROM zsync.sync_base WHERE record_id = %s", (rid,)).fetchone()[0]
    assert base["status"] == "queued"  # saved by the agent's write; not the merged record: Tables lacks it
    # The merged record's echo from Tables (once written there) is nothing new: both hold it, the copy goes.
    assert _apply(db, row)[0] == "unchanged"
    assert db.execute("SELECT count(*) FROM zsync.sync_base WHERE record_id = %s", (rid,)).fetchone()[0] == 0
    assert _pending(db, rid) == []


def test_a_persons_note_first_then_the_agents_status_03s_later_both_survive(db):
    rid = uid("note-then-agent")
    t0 = datetime.now(UTC) - timedelta(seconds=10)
    seeded = _seed(db, rid, t0)
    typed_at = (datetime.now(UTC) - timedelta(seconds=1)).replace(microsecond=0)
    # the agent commits 0.3 s after the note was typed; the note's delivery arrives after that
    db.execute("UPDATE agent_jobs SET status = 'agent', updated_at = %s WHERE id = %s",
               (typed_at + timedelta(milliseconds=300), rid))
    outcome, merge = _apply(db, dict(seeded, error_message="a note"), typed_at)
    assert outcome == "merged", merge
    row = _row(db, rid)
    assert (row["status"], row["error_message"]) == ("agent", "a note")
    assert datetime.fromisoformat(row["updated_at"]) == typed_at + timedelta(milliseconds=301)


def test_the_switch_off_gives_the_whole_record_rule_back(db):
    """What the seed did (the issue's 'before'): the person's note, typed before the agent's status change was
    committed, loses to the later whole record: the note is lost on both sides."""
    rid = uid("switch-off")
    seeded = _seed(db, rid, datetime.now(UTC) - timedelta(seconds=10))
    db.execute("UPDATE agent_jobs SET status = 'agent', updated_at = now() - interval '1 second' WHERE id = %s",
               (rid,))
    with db.transaction():
        db.execute("SET LOCAL zsync.field_merge = 'off'")
        outcome, _ = _apply(db, dict(seeded, error_message="note"), datetime.now(UTC))
    assert outcome == "skipped_stale"
    row = _row(db, rid)
    assert (row["status"], row["error_message"]) == ("agent", None)  # the person's note lost


def test_a_field_both_sides_changed_keeps_the_later_change(db):
    rid = uid("same-field")
    seeded = _seed(db, rid, datetime.now(UTC) - timedelta(seconds=10))
    db.execute("UPDATE agent_jobs SET status = 'agent', error_message = 'sql', updated_at = now() - interval '2 s' "
               "WHERE id = %s", (rid,))
    outcome, merge = _apply(db, dict(seeded, error_message="tables"), datetime.now(UTC) - timedelta(seconds=1))
    assert outcome == "merged" and merge["both_later"] == {"error_message": "tables"}
    assert (_row(db, rid)["status"], _row(db, rid)["error_message"]) == ("agent", "tables")


def test_a_late_echo_and_a_stale_delivery_change_nothing(db):
    rid = uid("echo")
    seeded = _seed(db, rid, datetime.now(UTC) - timedelta(seconds=10))
    db.execute("UPDATE agent_jobs SET status = 'agent', updated_at = now() - interval '2 s' WHERE id = %s", (rid,))
    # the base's content again (our own earlier write echoed late), even with a newer edited_at: no change
    assert _apply(db, seeded, datetime.now(UTC))[0] == "skipped_stale"
    assert _row(db, rid)["status"] == "agent"


def test_a_merged_version_never_lies_beyond_the_future_skew(db):
    """Both inputs at the edge of the allowed skew: the merged version (+1 ms) would pass it, so the whole-record
    rule decides instead of a refused write."""
    rid = uid("skew")
    seeded = _seed(db, rid, datetime.now(UTC) - timedelta(seconds=10))
    edge = db.execute("SELECT clock_timestamp() + zsync.max_future_skew()").fetchone()[0]
    db.execute("UPDATE agent_jobs SET status = 'agent', updated_at = %s WHERE id = %s",
               (edge - timedelta(milliseconds=200), rid))
    outcome, _ = _apply(db, dict(seeded, error_message="n", updated_at=_iso(edge - timedelta(milliseconds=1))))
    assert outcome in ("applied", "merged")
    assert datetime.fromisoformat(_row(db, rid)["updated_at"]) <= edge + timedelta(seconds=1)


# --- the set-based batch agrees with the row path ------------------------------------------------------------


def _scenario(url: str, rng: random.Random, n: int, t0: datetime) -> list[dict]:
    """n records with bases, some changed in Supabase since; -> one Tables delivery per record (changed fields,
    stale, echo, cell edit without a new updated_at, new record)."""
    deliveries = []
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(n):
            rid = f"rec-{i:03d}"
            seeded = _seed(conn, rid, t0)
            kind = rng.choice(["sb", "none"])
            if kind == "sb":
                conn.execute("UPDATE agent_jobs SET status = %s, retry_count = %s, updated_at = %s WHERE id = %s",
                             (rng.choice(["agent", "done"]), rng.choice([0, 1, 2]),
                              t0 + timedelta(seconds=rng.choice([1, 3])), rid))
            how = rng.choice(["fields", "cell", "echo", "stale", "same-field"])
            d = dict(seeded)
            edited = None
            if how == "fields":
                d.update(error_message=f"note {i}", updated_at=_iso(t0 + timedelta(seconds=rng.choice([2, 4]))))
            elif how == "cell":
                d.update(error_message=f"cell {i}")
                edited = t0 + timedelta(seconds=rng.choice([2, 4]))
            elif how == "stale":
                d.update(status="old", updated_at=_iso(t0 - timedelta(seconds=5)))
            elif how == "same-field":
                d.update(status="tables", updated_at=_iso(t0 + timedelta(seconds=2)))
            deliveries.append({"row": d, "edited_at": _iso(edited) if edited else None})
        deliveries.append({"row": {"id": "rec-new", "status": "new", "updated_at": _iso(t0)}, "edited_at": None})
    return deliveries


def _state(url: str) -> tuple[list, list, list]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT to_jsonb(t) FROM agent_jobs t ORDER BY id").fetchall()
        bases = conn.execute("SELECT record_id, base, version, hash, tables_ts FROM zsync.sync_base "
                             "ORDER BY record_id").fetchall()
        pending = conn.execute("SELECT record_id, record_updated_at FROM zsync.outbox WHERE acked_at IS NULL "
                               "ORDER BY record_id, record_updated_at").fetchall()
    return rows, [(r, json.dumps(b, sort_keys=True), v, h, tt) for r, b, v, h, tt in bases], pending


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_set_based_batch_agrees_with_the_row_path(pg_server, seed):
    urls = []
    for _ in range(2):
        url = create_database(pg_server.get_uri())
        prepare_database(url)
        urls.append(url)
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=2)
    deliveries = _scenario(urls[0], random.Random(seed), 24, t0)
    assert _scenario(urls[1], random.Random(seed), 24, t0) == deliveries
    with psycopg.connect(urls[0], autocommit=True) as conn:
        batch = conn.execute("SELECT ord, outcome, merge FROM zsync.sync_apply_many_set(%s::regclass, %s::jsonb) "
                             "ORDER BY ord", (T, json.dumps(deliveries))).fetchall()
    one_by_one = []
    with psycopg.connect(urls[1], autocommit=True) as conn:
        for n, d in enumerate(deliveries, 1):
            outcome, merge = conn.execute("SELECT outcome, merge FROM zsync.sync_apply(%s::regclass, %s::jsonb, %s)",
                                          (T, json.dumps(d["row"]), d["edited_at"])).fetchone()
            one_by_one.append((n, outcome, merge))
    assert batch == one_by_one
    assert {o for _, o, _ in batch} >= {"merged", "applied", "skipped_stale"}, batch
    assert _state(urls[0]) == _state(urls[1])


# --- through the stack: no Tables request for the sync's own applies; the drain merges --------------------


def _record_requests(stack: Any) -> list[dict]:
    log = requests.get(f"{stack.tables.url.rstrip('/')}/_admin/requests", timeout=10).json()["data"]
    return [r for r in log if "/records" in r["path"] or "/query" in r["path"]]


def _reset_requests(stack: Any) -> None:
    requests.delete(f"{stack.tables.url.rstrip('/')}/_admin/requests", timeout=10)


def test_a_tables_side_change_costs_the_sync_no_tables_request(stack, tables, supabase):
    rid = uid("echo-free")
    rec = tables.create("agent_jobs", {"id": rid, "status": "queued", "updated_at": _iso(datetime.now(UTC))})
    eventually(lambda: supabase.row("agent_jobs", rid))
    stack.wait_quiet()
    _reset_requests(stack)
    for n in range(5):  # people's edits (no new updated_at) and agents' (a new one)
        fields = {"error_message": f"edit {n}"} if n % 2 else {"status": f"s{n}", "updated_at": _iso(datetime.now(UTC))}
        tables.patch("agent_jobs", rec["id"], fields)
        eventually(lambda n=n: (supabase.row("agent_jobs", rid) or {}).get(
            "error_message" if n % 2 else "status") == (f"edit {n}" if n % 2 else f"s{n}"))
        stack.wait_quiet()
    stack.sweep_outbox(0)
    stack.wait_quiet()
    made = _record_requests(stack)
    assert len(made) == 5, made  # the test's own 5 updates; the sync: none
    assert supabase.query("SELECT count(*) FROM zsync.outbox WHERE record_id = %s AND acked_at IS NULL",
                          (rid,)) == [(0,)]


def test_a_single_supabase_change_costs_a_find_and_a_write(stack, tables, supabase):
    rid = uid("one-change")
    supabase.query("INSERT INTO agent_jobs (id, status) VALUES (%s, 'queued')", (rid,))
    eventually(lambda: tables.find("agent_jobs", rid))
    stack.wait_quiet()
    _reset_requests(stack)
    supabase.query("UPDATE agent_jobs SET status = 'running' WHERE id = %s", (rid,))
    stack.wait_quiet()
    eventually(lambda: tables.find("agent_jobs", rid)["data"]["status"] == "running")
    _reset_requests(stack)
    # its echo through the trigger inbox: no request back
    stack.safety_drain()
    stack.wait_quiet()
    assert _record_requests(stack) == []


def test_both_sides_changed_before_the_drain_ran_the_drain_merges_once(stack, tables, supabase):
    """A person's note reaches Tables while its delivery is late; the agent's status change is drained: the
    *_to_tables drain finds both changed since the base and writes the merged record to both sides, audited
    once as a merge naming the fields of each side."""
    rid = uid("drain-merge")
    supabase.query("INSERT INTO agent_jobs (id, status) VALUES (%s, 'queued')", (rid,))
    rec = eventually(lambda: tables.find("agent_jobs", rid))
    stack.wait_quiet()
    with late_deliveries(stack):  # the note's wake-up is late: its message waits in the inbox
        tables.patch("agent_jobs", rec["id"], {"error_message": "a person's note"})
        supabase.query("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (rid,))
        try:
            eventually(lambda: tables.find("agent_jobs", rid)["data"].get("status") == "agent")
        except AssertionError:
            for fp in stack.functions.values():
                for line in fp.log_path.read_text(errors="replace").splitlines()[-30:]:
                    if "agent_jobs_to_tables" in fp.name:
                        print("LOG", line[:700])
            print("TABLES", tables.find("agent_jobs", rid))
            print("OUTBOX", supabase.query("SELECT * FROM zsync.outbox WHERE record_id = %s", (rid,)))
            raise
    stack.safety_drain()
    stack.wait_quiet()
    stack.sweep_outbox(0)
    stack.wait_quiet()
    row, found = supabase.row("agent_jobs", rid), tables.find("agent_jobs", rid)["data"]
    assert (row["status"], row["error_message"]) == ("agent", "a person's note")
    assert (found["status"], found["error_message"]) == ("agent", "a person's note")
    merges = [a for a in supabase.audit(rid, "agent_jobs_synced") if a["metadata"].get("outcome") == "merged"]
    assert len(merges) == 1, merges
    assert merges[0]["metadata"]["merged"]["supabase"] == ["status"]
    assert merges[0]["metadata"]["merged"]["tables"] == ["error_message"]


def test_the_sweeper_keeps_the_mark_of_the_agreed_version(db):
    """The base of a quiet record is its row, marked by its newest agreed outbox entry: the 7-day cleanup keeps
    that one (older and unagreed entries go), so an agent's write a month later still saves a base."""
    rid = uid("quiet")
    seeded = _seed(db, rid, datetime.now(UTC) - timedelta(days=30))
    db.execute("UPDATE zsync.outbox SET acked_at = now() - interval '20 days' WHERE record_id = %s", (rid,))
    db.execute("INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at, acked_at, ack_outcome) "
               "VALUES ('agent_jobs', %s, 'UPDATE', %s, now() - interval '25 days', 'skipped_stale')",
               (rid, datetime.now(UTC) - timedelta(days=31)))
    db.execute("SELECT zsync.sweep_outbox()")
    assert db.execute("SELECT ack_outcome FROM zsync.outbox WHERE record_id = %s", (rid,)).fetchall() == \
        [("unchanged",)]
    db.execute("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (rid,))
    outcome, merge = _apply(db, dict(seeded, error_message="note"), datetime.now(UTC))
    assert outcome == "merged" and merge["tables"] == ["error_message"]


def test_switching_the_merge_off_drops_the_bases_and_queues_echoes_again(db):
    rid = uid("off")
    seeded = _seed(db, rid, datetime.now(UTC) - timedelta(seconds=10))
    db.execute("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (rid,))
    assert db.execute("SELECT count(*) FROM zsync.sync_base WHERE record_id = %s", (rid,)).fetchone()[0] == 1
    try:
        db.execute("SELECT zsync.set_field_merge(false)")
        assert db.execute("SELECT count(*) FROM zsync.sync_base").fetchone()[0] == 0
        later = dict(seeded, status="tables", updated_at=_iso(datetime.now(UTC)))
        assert _apply(db, later)[0] == "applied"
        assert _pending(db, rid)[-1] == datetime.fromisoformat(later["updated_at"].replace("Z", "+00:00"))
    finally:
        db.execute("SELECT zsync.set_field_merge(true)")


def test_reconcile_marks_equal_records_as_agreed_so_a_later_edit_merges(stack, tables, supabase):
    """A record synced before the field merge (its outbox mark gone): reconcile finds both sides equal and marks
    that version agreed, so the next concurrent edits on both sides merge."""
    from infra.reconcile import reconcile
    from tests.test_correctness import stack_context

    rid = uid("recon-mark")
    supabase.query("INSERT INTO agent_jobs (id, status) VALUES (%s, 'queued')", (rid,))
    eventually(lambda: tables.find("agent_jobs", rid))
    stack.wait_quiet()
    supabase.query("DELETE FROM zsync.outbox WHERE record_id = %s", (rid,))  # as the 7-day cleanup did
    reconcile(stack_context(stack), ["agent_jobs"])
    assert supabase.query("SELECT ack_outcome, repair FROM zsync.outbox WHERE record_id = %s", (rid,)) == \
        [("unchanged", True)]
    supabase.query("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (rid,))
    assert supabase.query("SELECT count(*) FROM zsync.sync_base WHERE record_id = %s", (rid,)) == [(1,)]
    stack.wait_quiet()
    assert tables.find("agent_jobs", rid)["data"]["status"] == "agent"


def test_a_field_both_changed_goes_to_its_later_change_not_the_later_record(db):
    """An agent sets status, a person then sets status in Tables, then the agent writes another field: the
    agent's record is the later one, but the person's status is the later change of that field."""
    rid = uid("per-field")
    seeded = _seed(db, rid, datetime.now(UTC) - timedelta(seconds=10))
    t = (datetime.now(UTC) - timedelta(seconds=5)).replace(microsecond=0)
    db.execute("UPDATE agent_jobs SET status = 'agent', updated_at = %s WHERE id = %s", (t, rid))
    db.execute("UPDATE agent_jobs SET retry_count = 4, updated_at = %s WHERE id = %s", (t + timedelta(seconds=2), rid))
    outcome, merge = _apply(db, dict(seeded, status="person"), t + timedelta(seconds=1))
    assert outcome == "merged" and merge["both_later"] == {"status": "tables"}, merge
    row = _row(db, rid)
    assert (row["status"], row["retry_count"]) == ("person", 4)
    assert datetime.fromisoformat(row["updated_at"]) == t + timedelta(seconds=2, milliseconds=1)


def test_a_base_saved_while_its_version_was_being_written_to_tables_counts_once_acknowledged(db):
    """The agent's next write lands while the drain writes the previous version to Tables (not yet acknowledged):
    the row as it was is kept unconfirmed, and counts as the base once the drain acknowledges it."""
    outcomes = {}
    for acked in (False, True):
        rid = uid("race")
        t0 = (datetime.now(UTC) - timedelta(seconds=10)).replace(microsecond=0)
        db.execute("INSERT INTO agent_jobs (id, status, updated_at) VALUES (%s, 'queued', %s)", (rid, t0))
        s1 = _row(db, rid)  # its outbox entry pending: a drain is writing it to Tables
        db.execute("UPDATE agent_jobs SET status = 'agent', updated_at = now() - interval '5 s' WHERE id = %s",
                   (rid,))
        assert db.execute("SELECT agreed FROM zsync.sync_base WHERE record_id = %s", (rid,)).fetchone() == (False,)
        if acked:  # the drain's write of s1 is acknowledged
            db.execute("SELECT zsync.ack_outbox('agent_jobs', %s, %s, 'applied')", (rid, t0))
        outcomes[acked] = _apply(db, dict(s1, error_message="note"), datetime.now(UTC) - timedelta(seconds=4))[0]
        outcomes[acked, "row"] = (_row(db, rid)["status"], _row(db, rid)["error_message"])
    assert outcomes[False] == "skipped_stale" and outcomes[False, "row"] == ("agent", None)  # no base yet
    assert outcomes[True] == "merged" and outcomes[True, "row"] == ("agent", "note")


def test_reconcile_does_not_write_supabases_row_over_a_newer_cell_edit(stack, tables, supabase):
    """A person's cell edit whose delivery is late (the trigger inbox's wake-up lost) while the agent changed
    another field: reconcile decides as the functions do - both kept - instead of Supabase's later record
    overwriting the edit."""
    from infra.reconcile import reconcile
    from tests.test_correctness import stack_context

    rid = uid("recon-cell")
    supabase.query("INSERT INTO agent_jobs (id, status) VALUES (%s, 'queued')", (rid,))
    rec = eventually(lambda: tables.find("agent_jobs", rid))
    stack.wait_quiet()
    with late_deliveries(stack):
        lost = stack.dropped_deliveries()["pgnet"]
        stack.drop_deliveries(1.0)  # the agent's change is not drained either: its wake-up is lost
        try:
            tables.patch("agent_jobs", rec["id"], {"error_message": "typed by a person"})
            supabase.query("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (rid,))
            eventually(lambda: stack.dropped_deliveries()["pgnet"] > lost)
            reconcile(stack_context(stack), ["agent_jobs"])
        finally:
            stack.drop_deliveries(0.0)
    stack.sweep_outbox(0)
    stack.wait_quiet()
    stack.safety_drain()
    stack.wait_quiet()
    row, found = supabase.row("agent_jobs", rid), tables.find("agent_jobs", rid)["data"]
    assert (row["status"], row["error_message"]) == ("agent", "typed by a person")
    assert (found["status"], found["error_message"]) == ("agent", "typed by a person")



def test_one_merge_one_audit_entry_whichever_direction_records_it():
    """Both directions compute the same merged record; met at once from both sides, the merge is audited once
    (the entries share their id, and append_audit inserts an id once)."""
    from shared.core import audit
    from shared.core.mapping import parse_supabase_record
    from shared.core.outcome import Outcome
    from shared.core.spec import FUNCTIONS

    merged = parse_supabase_record(FUNCTIONS["agent_jobs_to_supabase"].table, dict(
        BASE, status="agent", error_message="note", updated_at=_iso(NOW + timedelta(milliseconds=1))))
    info = {"supabase": ["status"], "tables": ["error_message"], "both_later": {}}
    now = datetime.now(UTC)
    a = audit.sync_entry(FUNCTIONS["agent_jobs_to_supabase"], merged, Outcome.MERGED, now, merge=info)
    b = audit.sync_entry(FUNCTIONS["agent_jobs_to_tables"], merged, Outcome.MERGED, now, merge=info)
    assert a["id"] == b["id"] and a["metadata"]["merged"]["tables"] == ["error_message"]
    applied = audit.sync_entry(FUNCTIONS["agent_jobs_to_tables"], merged, Outcome.APPLIED, now)
    assert applied["id"] != a["id"]


def _replaced_by_a_drain(db: psycopg.Connection, prefix: str,
                         written_after: timedelta | None = None) -> tuple[str, dict, dict, datetime]:
    """A record both sides agreed on (s1); the agent's version s2; a *_to_tables drain that read s1 in Tables at
    ``read_at`` and wrote s2 over it (acknowledged; ``zsync.agree`` keeps s1 as the record the write replaced,
    until the write's own edited_at, ``read_at + written_after`` - or, without one, until the agree).
    -> (rid, s1, s2, read_at)."""
    rid = uid(prefix)
    s1 = _seed(db, rid, datetime.now(UTC) - timedelta(seconds=10))
    db.execute("UPDATE agent_jobs SET status = 'agent', updated_at = now() - interval '3 s' WHERE id = %s", (rid,))
    s2 = _row(db, rid)
    read_at = datetime.now(UTC) - timedelta(seconds=2)
    replaced = {"row": s1, "edited_at": _iso(read_at)}
    if written_after is not None:
        replaced["written_at"] = _iso(read_at + written_after)
    db.execute("SELECT zsync.ack_outbox('agent_jobs', %s, %s, 'applied')", (rid, s2["updated_at"]))
    db.execute("SELECT zsync.agree('public.agent_jobs', %s::jsonb, %s::jsonb)",
               (json.dumps([s2]), json.dumps({rid: replaced})))
    return rid, s1, s2, read_at


def test_a_tables_edit_overwritten_by_a_write_that_read_before_it_is_merged_when_it_arrives(db):
    """A person edits the Tables copy between a *_to_tables drain's read and its write of the agent's version:
    the write replaces the edit in Tables; when the edit's delivery arrives it is merged against the record the
    write replaced (zsync.agree keeps it), so neither the edit nor the agent's change is lost."""
    rid, s1, _, read_at = _replaced_by_a_drain(db, "overwritten")
    # the person's edit, made from s1 after the drain's read and before its write landed
    outcome, merge = _apply(db, dict(s1, error_message="typed"), read_at + timedelta(milliseconds=500))
    assert outcome == "merged" and merge["tables"] == ["error_message"] and merge["supabase"] == ["status"], merge
    row = _row(db, rid)
    assert (row["status"], row["error_message"]) == ("agent", "typed")
    # a stale delivery of s1 itself changes nothing
    assert _apply(db, s1, read_at)[0] in ("skipped_stale", "unchanged")


def test_an_edit_in_the_same_millisecond_just_before_the_write_is_one_it_overwrote(db):
    """Zapier's edited_at has microseconds: an edit 300 us before the write's own edited_at, in the same
    millisecond, was made before the write landed - it is merged against the record the write replaced, not
    taken for an edit made from the write (whose record would then count the write's fields as its own)."""
    rid = uid("same-ms")
    s1 = _seed(db, rid, datetime.now(UTC) - timedelta(seconds=10))
    db.execute("UPDATE agent_jobs SET status = 'agent', updated_at = now() - interval '3 s' WHERE id = %s", (rid,))
    s2 = _row(db, rid)
    read_at = datetime.now(UTC) - timedelta(seconds=2)
    written_at = read_at.replace(microsecond=500_700)  # the write's own edited_at, mid-millisecond
    db.execute("SELECT zsync.ack_outbox('agent_jobs', %s, %s, 'applied')", (rid, s2["updated_at"]))
    db.execute("SELECT zsync.agree('public.agent_jobs', %s::jsonb, %s::jsonb)",
               (json.dumps([s2]), json.dumps({rid: {"row": s1, "edited_at": _iso(read_at.replace(microsecond=0)),
                                                    "written_at": _iso(written_at)}})))
    outcome, merge = _apply(db, dict(s1, error_message="typed"), written_at - timedelta(microseconds=300))
    assert outcome == "merged" and merge["tables"] == ["error_message"] and merge["supabase"] == ["status"], merge
    row = _row(db, rid)
    assert (row["status"], row["error_message"]) == ("agent", "typed")


@pytest.mark.parametrize("with_note", [False, True])
def test_a_later_tables_edit_made_from_a_record_already_merged_does_not_undo_supabases_later_change(db, with_note):
    """A person sets status in Tables (t1) - and, in one variant, a note; an agent sets status later in Supabase
    (t2); the person's change arrives and loses status to the agent's later change (the record 'skipped_stale', or
    'merged' keeping the note). Before Tables holds the result, the person edits another field (t3) of the record
    Tables still holds (status as the person set it). That edit changed retry_count only: the agent's status must
    stay. Before: compared with the older base, the Tables record's status counted as a change at t3 (its record's
    time) and won over the agent's t2 - the agent's later change lost on both sides."""
    rid = uid("merged-then-edit")
    seeded = _seed(db, rid, datetime.now(UTC) - timedelta(seconds=20))
    t1 = (datetime.now(UTC) - timedelta(seconds=10)).replace(microsecond=0)
    db.execute("UPDATE agent_jobs SET status = 'agent', updated_at = %s WHERE id = %s",
               (t1 + timedelta(seconds=1), rid))
    person = dict(seeded, status="person", **({"error_message": "a note"} if with_note else {}))
    outcome, _ = _apply(db, person, t1)
    assert outcome == ("merged" if with_note else "skipped_stale")
    assert _row(db, rid)["status"] == "agent"
    outcome, merge = _apply(db, dict(person, retry_count=9), t1 + timedelta(seconds=3))
    assert outcome == "merged", (outcome, merge)
    row = _row(db, rid)
    assert (row["status"], row["retry_count"]) == ("agent", 9), row
    assert row["error_message"] == ("a note" if with_note else None)


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
def test_several_cell_edits_of_one_record_in_one_batch_the_last_edit_wins(db, order):
    """Snapshots of one Tables record that differ only in Zapier's edited_at (cell edits leave updated_at as it
    was) arrive in one inbox lease, in any order: the last edit is the record's newest state (the batch ranks
    versions of one id by updated_at, then edited_at, then hash). With an agent's change held too, see
    tests/test_field_merge.py::test_several_cell_edits_waiting_in_the_inbox_the_last_one_wins."""
    rid = uid("cell-edits")
    seeded = _seed(db, rid, datetime.now(UTC) - timedelta(seconds=20))
    t = (datetime.now(UTC) - timedelta(seconds=10)).replace(microsecond=0)
    snaps = [{"row": dict(seeded, error_message=f"edit-{i}"), "edited_at": _iso(t + timedelta(seconds=i))}
             for i in range(4)]
    batch = [snaps[i] for i in order] + [{"row": dict(seeded, id=uid("other")), "edited_at": None}
                                         for _ in range(5)]  # past the small-batch size: the set-based path
    db.execute("SELECT * FROM zsync.sync_apply_many(%s::regclass, %s::jsonb)", (T, json.dumps(batch))).fetchall()
    assert _row(db, rid)["error_message"] == "edit-3"


def test_a_later_tables_write_overwritten_by_a_drain_that_read_before_it_goes_back_to_tables(db):
    """A person rewrites the whole record in Tables (a later updated_at) between a *_to_tables drain's read and
    its write of the agent's older version: the drain's write replaced it in Tables. When the person's delivery
    arrives it wins whole in Supabase - and must be queued for Tables too, which now holds the drain's write.
    Before: 'applied' to Supabase only; Tables kept the agent's older version for good (the soak's lost record)."""
    rid, s1, s2, read_at = _replaced_by_a_drain(db, "overwritten-whole", timedelta(milliseconds=800))
    person = dict(s1, status="person", error_message="typed",
                  updated_at=_iso(datetime.fromisoformat(s2["updated_at"]) + timedelta(seconds=1)))
    outcome, merge = _apply(db, person, read_at + timedelta(milliseconds=500))
    assert outcome == "merged" and merge.get("back_to_tables"), (outcome, merge)
    row = _row(db, rid)
    assert (row["status"], row["error_message"]) == ("person", "typed")
    assert _pending(db, rid)[-1] == datetime.fromisoformat(row["updated_at"])  # queued for Tables
    # the drain's own write coming back from Tables (older) changes nothing
    assert _apply(db, s2, read_at + timedelta(seconds=1))[0] in ("skipped_stale", "unchanged")
    assert (_row(db, rid)["status"], _row(db, rid)["error_message"]) == ("person", "typed")
    # a person's later edit of other fields, made on what Tables holds (the drain's write, s2): the person's
    # record stays, only the edited fields change
    outcome, merge = _apply(db, dict(s2, retry_count=7, updated_at=_iso(datetime.fromisoformat(s2["updated_at"])
                                                                        + timedelta(seconds=2))),
                            read_at + timedelta(seconds=1))
    assert outcome == "merged", (outcome, merge)
    row = _row(db, rid)
    assert (row["status"], row["error_message"], row["retry_count"]) == ("person", "typed", 7), row


def test_an_overwritten_tables_edit_in_a_batch_is_merged_as_in_the_row_path(db):
    """The same edit as above (made before a *_to_tables write replaced it in Tables), delivered in an inbox
    lease with other records (the set-based path). Before: the batch saw Supabase unchanged since the base (the
    drain's write) and applied the edit whole - the agent's status, which the edit's record never had, lost."""
    rid, s1, s2, read_at = _replaced_by_a_drain(db, "overwritten-batch", timedelta(seconds=1))
    later = _iso(datetime.fromisoformat(s2["updated_at"]) + timedelta(seconds=1))  # newer than Supabase's row
    edit = {"row": dict(s1, error_message="typed", updated_at=later),
            "edited_at": _iso(read_at + timedelta(milliseconds=500))}
    others = [{"row": dict(s1, id=uid("pad")), "edited_at": None} for _ in range(5)]
    out = db.execute("SELECT record_id, outcome FROM zsync.sync_apply_many(%s::regclass, %s::jsonb)",
                     (T, json.dumps([edit, *others]))).fetchall()
    assert (rid, "merged") in out, out
    row = _row(db, rid)
    assert (row["status"], row["error_message"]) == ("agent", "typed")


def test_the_writes_own_echo_applied_first_leaves_the_overwritten_edit_its_ancestor(db):
    """The live race the soak and tests/test_field_merge.py found: the echo of a *_to_tables write (Tables now
    holding what Supabase holds) is applied BEFORE the delivery of a person's edit that write overwrote (two
    drains, or one batch applying the record's newest version first). Before: the echo found both sides equal
    and dropped the saved base with the replaced record, and the edit then lost to the agent's newer version
    whole. The base is kept (as the agreed row) while the write is recent, so the edit is still merged."""
    for batch in (False, True):
        rid, s1, s2, read_at = _replaced_by_a_drain(db, "echo-first", timedelta(seconds=1))
        echo = (s2, read_at + timedelta(seconds=1))
        edit = (dict(s1, error_message="typed"), read_at + timedelta(milliseconds=500))
        if batch:  # newest first in the lease; padded past the small-batch size (the set-based path)
            items = [{"row": r, "edited_at": _iso(e)} for r, e in (echo, edit)]
            items += [{"row": dict(s1, id=uid("pad")), "edited_at": None} for _ in range(5)]
            out = dict(db.execute("SELECT ord, outcome FROM zsync.sync_apply_many(%s::regclass, %s::jsonb)",
                                  (T, json.dumps(items))).fetchall())
            assert (out[1], out[2]) == ("unchanged", "merged"), out
        else:
            assert _apply(db, *echo)[0] == "unchanged"
            outcome, merge = _apply(db, *edit)
            assert outcome == "merged" and merge["tables"] == ["error_message"], (outcome, merge)
        row = _row(db, rid)
        assert (row["status"], row["error_message"]) == ("agent", "typed"), (batch, row)


def test_an_edit_overwritten_by_the_first_of_two_quick_writes_is_merged_against_what_that_one_replaced(db):
    """Two *_to_tables writes of one record in quick succession (the agent wrote twice), and a person's edit
    that the first overwrote, delivered after both. Before: the base kept only the record the second write
    replaced (the first write's), so the edit's old status counted as a Tables change and undid the agent's.
    Every replaced record is kept with its window; the edit is matched to the first write after it."""
    rid, s1, s2, read_at = _replaced_by_a_drain(db, "two-writes", timedelta(milliseconds=300))
    db.execute("UPDATE agent_jobs SET retry_count = 5, updated_at = now() - interval '1 s' WHERE id = %s", (rid,))
    s3 = _row(db, rid)
    db.execute("SELECT zsync.ack_outbox('agent_jobs', %s, %s, 'applied')", (rid, s3["updated_at"]))
    second = {"row": s2, "edited_at": _iso(read_at + timedelta(milliseconds=300)),  # it read the first write
              "written_at": _iso(read_at + timedelta(milliseconds=600))}
    db.execute("SELECT zsync.agree('public.agent_jobs', %s::jsonb, %s::jsonb)",
               (json.dumps([s3]), json.dumps({rid: second})))
    kept = db.execute("SELECT jsonb_array_length(replaced) FROM zsync.sync_base WHERE record_id = %s",
                      (rid,)).fetchone()[0]
    assert kept == 2
    outcome, merge = _apply(db, dict(s1, error_message="typed"), read_at + timedelta(milliseconds=100))
    assert outcome == "merged" and merge["tables"] == ["error_message"], (outcome, merge)
    row = _row(db, rid)
    assert (row["status"], row["retry_count"], row["error_message"]) == ("agent", 5, "typed"), row
    # a redelivery of an edit older than the record the first write read (which held it): changes nothing
    before = _row(db, rid)
    outcome, _ = _apply(db, dict(s1, error_message="older"), read_at - timedelta(seconds=1))
    assert outcome == "skipped_stale" and _row(db, rid) == before


def test_a_records_deliveries_in_one_batch_are_merged_oldest_first(db):
    """Two Tables writes of one record wait in one lease: the first set parameters (t1), the second - made on
    the record holding the first - set status (t3); the agent set parameters in between (t2). Applied newest
    first, the second delivery carried the first's parameters as its own change at t3 and beat the agent's t2.
    Oldest first, each moves the base on: the agent's parameters stay, the person's status comes in."""
    rid = uid("oldest-first")
    t0 = (datetime.now(UTC) - timedelta(seconds=30)).replace(microsecond=0)
    seeded = _seed(db, rid, t0)
    db.execute("UPDATE agent_jobs SET parameters = '{\"by\": \"agent\"}', updated_at = %s WHERE id = %s",
               (t0 + timedelta(seconds=2), rid))
    first = dict(seeded, parameters={"by": "tables"}, updated_at=_iso(t0 + timedelta(seconds=1)))
    second = dict(first, status="person", updated_at=_iso(t0 + timedelta(seconds=3)))
    items = [{"row": second, "edited_at": _iso(t0 + timedelta(seconds=3))},
             {"row": first, "edited_at": _iso(t0 + timedelta(seconds=1))}]
    items += [{"row": dict(seeded, id=uid("pad")), "edited_at": None} for _ in range(5)]
    db.execute("SELECT * FROM zsync.sync_apply_many(%s::regclass, %s::jsonb)", (T, json.dumps(items))).fetchall()
    row = _row(db, rid)
    assert (row["parameters"], row["status"]) == ({"by": "agent"}, "person"), row


def test_a_change_from_tables_waits_for_a_to_tables_write_of_its_record_in_progress(db, database_url):
    """A *_to_tables function holds the record's lock (shared.adapters.supabase_db.lock_record) from its read
    of Tables to the transaction that records what Tables now holds (zsync.agree). A change from Tables
    arriving meanwhile waits for it (zsync.sync_apply takes the same lock), so it is merged against the base
    that write leaves, not the one it is about to replace (the soak's lost fields of a write whose agree had
    not committed yet). Other records do not wait."""
    import threading

    from shared.adapters import supabase_db
    from shared.core.spec import TABLES

    rid, other = uid("locked"), uid("free")
    seeded = _seed(db, rid, datetime.now(UTC) - timedelta(seconds=20))
    _seed(db, other, datetime.now(UTC) - timedelta(seconds=20))
    done: dict[str, float] = {}

    def apply(record_id: str) -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            _apply(conn, dict(seeded, id=record_id, error_message="typed"), datetime.now(UTC))
            done[record_id] = time.monotonic()

    with psycopg.connect(database_url) as writer:  # the *_to_tables function, mid-write
        supabase_db.lock_record(writer, TABLES["agent_jobs"], rid)
        threads = [threading.Thread(target=apply, args=(r,)) for r in (rid, other)]
        for t in threads:
            t.start()
        threads[1].join(timeout=10)
        time.sleep(0.5)
        assert other in done and rid not in done, done  # the other record went through; this one waits
        released = time.monotonic()
        writer.commit()
    threads[0].join(timeout=10)
    assert done[rid] >= released and _row(db, rid)["error_message"] == "typed"
