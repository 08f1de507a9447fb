"""Two writes of one Tables record that land in the other order than their ``edited_at`` (migration
20261206200201, ``zsync.overwritten_by``). Zapier stamps a write's ``edited_at`` when it starts - as a database's
``now()`` is its transaction's start - and a write waiting for the record's lock lands after one stamped later.
The local stand-in stamps before it locks, so under load this happens by itself (the soak of the test suite
lost two fields to it); here the stand-in's ``next_edited_at`` knob makes it happen on purpose.

The sync tells an edit a *_to_tables write overwrote from one made on the write's record by these stamps; where
the edit's own fields tell - it holds the write's values, or the record's the write replaced - they decide.
Real Postgres, the local Zapier stand-in and the functions over HTTP."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
import requests

from shared.adapters.trigger_inbox import InboxClient
from shared.core.spec import FUNCTIONS
from shared.services.inbox_consumer import InboxConsumer, _field_names_of
from tests.e2e import blind_writes, eventually, late_deliveries, wakeups_lost
from tests.test_correctness import stack_context
from tests.test_one_request import _agreed_job, _both_end_with, _delivered, _drain_held, _set_config

FN = FUNCTIONS["agent_jobs_to_supabase"]


def _at(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


@contextmanager
def _next_stamped(stack: Any, record_id: str, at: datetime) -> Iterator[None]:
    """The next write of that Tables record is stamped ``at`` (it started then and waited for the lock); the
    knob is cleared after the block even when no write used it."""
    url = f"{stack.tables.url.rstrip('/')}/_admin/quirks"
    requests.post(url, json={"next_edited_at": {record_id: at.isoformat()}}, timeout=10).raise_for_status()
    try:
        yield
    finally:
        requests.post(url, json={"next_edited_at": {}}, timeout=10).raise_for_status()


def test_the_knob_refuses_what_is_not_a_time(stack):
    url = f"{stack.tables.url.rstrip('/')}/_admin/quirks"
    answer = requests.post(url, json={"next_edited_at": {"r": "yesterday"}}, timeout=10)
    assert answer.status_code == 400 and "yesterday" in answer.text
    answer = requests.post(url, json={"next_edited_at": "2026-12-06T08:00:00Z"}, timeout=10)
    assert answer.status_code == 400 and "record id" in answer.text
    assert requests.get(url, timeout=10).json()["next_edited_at"] == {}


def test_an_edit_stamped_before_the_sync_s_write_but_landing_after_it_is_merged_on_it(stack, tables, supabase):
    """The agent's status and retry_count are written to Tables. A person's status edit, stamped just before
    that write (it waited for the record), lands after it: it holds the write's retry_count. Then the agent sets
    retry_count again, and the edit's delivery comes before that change reaches Tables. Taken by its stamp for
    an edit the write overwrote, it was merged against the older record and its retry_count - the write's, only
    carried - won back over the agent's later one (the suite's soak lost two fields so, on the default path).
    The person's status and the agent's later retry_count end on both sides."""
    rid = _agreed_job(stack, tables, supabase, "race-after")
    time.sleep(0.1)  # the write's stamp comes well after the record's create
    supabase.query("UPDATE agent_jobs SET status = 'agent', retry_count = 1 WHERE id = %s", (rid,))
    _delivered(stack, supabase, [rid])
    written = tables.find("agent_jobs", rid)
    assert (written["data"]["status"], written["data"]["retry_count"]) == ("agent", 1)
    with late_deliveries(stack), _drain_held(stack):  # the agent's next change waits in the outbox
        supabase.query("UPDATE agent_jobs SET retry_count = 2 WHERE id = %s", (rid,))
        agent_at = _at(supabase.row("agent_jobs", rid)["updated_at"])
        with _next_stamped(stack, written["id"], _at(written["edited_at"]) - timedelta(milliseconds=20)):
            edit = tables.patch("agent_jobs", written["id"], {
                "status": "person", "updated_at": (agent_at + timedelta(milliseconds=10)).isoformat()})
        assert _at(edit["edited_at"]) < _at(written["edited_at"])  # landed after the write, stamped before it
        stack.safety_drain()  # the edit's delivery is taken in while the agent's change waits
        row = supabase.row("agent_jobs", rid)
        assert (row["status"], row["retry_count"]) == ("person", 2), supabase.audit(rid)
    _both_end_with(stack, tables, supabase, rid, status="person", retry_count=2)


def test_an_edit_the_sync_s_write_overwrote_though_stamped_after_it_is_merged_on_what_it_replaced(
        stack, tables, supabase):
    """A person sets retry_count (versioned after the agent's status change, which waits in the outbox); the
    agent's status is then written blind over that edit - but the write was stamped just before the edit (it
    waited for the record). Taken by its stamp for an edit made on the write's record, its status - the old one
    it only carried - counted as a change at its later version and won over the agent's. It holds the record the
    write replaced: merged against that, the agent's status and the person's retry_count end on both sides."""
    rid = _agreed_job(stack, tables, supabase, "race-before")
    rec = tables.find("agent_jobs", rid)
    with blind_writes(stack, True), late_deliveries(stack):  # (the find would see the edit and merge it first)
        with _drain_held(stack):
            supabase.query("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (rid,))
        agent_at = _at(supabase.row("agent_jobs", rid)["updated_at"])
        edit = tables.patch("agent_jobs", rec["id"], {
            "retry_count": 5, "updated_at": (agent_at + timedelta(milliseconds=10)).isoformat()})
        with _next_stamped(stack, rec["id"], _at(edit["edited_at"]) - timedelta(milliseconds=20)):
            stack.sweep_outbox(min_age_s=0)  # the agent's status, written blind over the edit
            written = eventually(lambda: (r := tables.find("agent_jobs", rid))["data"].get("status") == "agent" and r)
        assert _at(written["edited_at"]) < _at(edit["edited_at"])  # landed after the edit, stamped before it
    _both_end_with(stack, tables, supabase, rid, status="agent", retry_count=5)


def _drain_one_at_a_time_newest_first(stack: Any) -> None:
    """The inbox hands out its newest message first, and the drain leases one at a time: the write's own delivery
    (landed last) is taken in before the edit it overwrote - the order a soak met (Zapier documents none)."""
    ctx = stack_context(stack)
    inbox_id = stack.inboxes[FN.name]
    faults = f"{stack.tables.url.rstrip('/')}/_admin/inbox/faults"
    requests.post(faults, json={"newest_first": True}, timeout=10).raise_for_status()
    try:
        InboxConsumer(FN, ctx, InboxClient.for_tables(stack.tables_client()), inbox_id,
                      field_names=_field_names_of(ctx, FN), lease_limit=1).drain(10)
    finally:
        requests.post(faults, json={"newest_first": False}, timeout=10).raise_for_status()


def test_an_edit_of_every_field_the_write_changed_that_it_overwrote_goes_back_to_tables(stack, tables, supabase):
    """As above, but the person changed status too - the one field the agent's write changes - so the edit holds
    neither the write's values nor the replaced record's: its content cannot tell. The write's own delivery is
    taken in first (Supabase holds it: nothing to do), then the edit's: taken by its stamp for an edit made after
    the write, it was applied to Supabase while Tables kept the write, which landed last - the two sides apart for
    good (a soak with blind writes on ended so). Stamped within zsync.stamp_race() of the write, it is taken for
    overwritten: merged against the replaced record, the person's later status and retry_count go back to
    Tables."""
    rid = _agreed_job(stack, tables, supabase, "race-every-field")
    rec = tables.find("agent_jobs", rid)
    with blind_writes(stack, True), late_deliveries(stack):
        with _drain_held(stack):
            supabase.query("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (rid,))
        agent_at = _at(supabase.row("agent_jobs", rid)["updated_at"])
        edit = tables.patch("agent_jobs", rec["id"], {
            "status": "person", "retry_count": 5, "updated_at": (agent_at + timedelta(milliseconds=10)).isoformat()})
        with _next_stamped(stack, rec["id"], _at(edit["edited_at"]) - timedelta(milliseconds=20)):
            stack.sweep_outbox(min_age_s=0)  # the agent's status, written blind over the edit
            written = eventually(lambda: (r := tables.find("agent_jobs", rid))["data"].get("status") == "agent" and r)
        assert _at(written["edited_at"]) < _at(edit["edited_at"])
        _drain_one_at_a_time_newest_first(stack)
    _both_end_with(stack, tables, supabase, rid, status="person", retry_count=5)


def test_an_edit_made_just_after_the_write_on_every_field_it_changed_costs_no_extra_write(stack, tables, supabase):
    """The other side of the rule above: a person's edit made just after the agent's write (landing after it,
    stamped after it) that changes the same field holds no value telling it apart, so it too is taken for
    overwritten and merged back - Tables already holds it: the write back is found first and writes nothing."""
    rid = _agreed_job(stack, tables, supabase, "after-every-field")
    rec = tables.find("agent_jobs", rid)
    with blind_writes(stack, True):
        supabase.query("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (rid,))
        eventually(lambda: tables.find("agent_jobs", rid)["data"].get("status") == "agent")
        agent_at = _at(supabase.row("agent_jobs", rid)["updated_at"])
        writes = tables.stats()["writes"][tables.ids["agent_jobs"]]
        tables.patch("agent_jobs", rec["id"], {
            "status": "person", "updated_at": (agent_at + timedelta(milliseconds=10)).isoformat()})
        _both_end_with(stack, tables, supabase, rid, status="person")
        assert tables.stats()["writes"][tables.ids["agent_jobs"]] == writes + 1, supabase.audit(rid)  # the edit only


@pytest.mark.parametrize("path", ["direct", "inbox_batch"])
def test_two_tables_edits_landing_in_the_other_order_than_their_stamps_both_count(stack, tables, supabase, path):
    """Two people edit one Tables record at once: B sets status and parameters, A parameters and retry_count.
    A's writer chose the earlier updated_at and Zapier stamped A first, but A waited for the record and landed
    after B - on B's record, so A's delivery holds B's status. Taken by its stamps for a stale delivery (older
    than B's, which Supabase holds), A was skipped and its retry_count lost on both sides (a soak with blind
    writes on lost it so; the race is Tables' own, the write path does not matter). Merged against the copy
    Tables held before both, each field keeps its latest change: B's status and parameters (B's updated_at is
    the later), A's retry_count. ``inbox_batch``: A's delivery comes with more than zsync.small_batch others, taken
    in by the set-based batch (zsync.sync_apply_many_set), which hands it to the row path."""
    rid = _agreed_job(stack, tables, supabase, "race-two-edits")
    others = [_agreed_job(stack, tables, supabase, "race-two-others") for _ in range(5)] \
        if path == "inbox_batch" else []
    rec = tables.find("agent_jobs", rid)
    start = _at(supabase.row("agent_jobs", rid)["updated_at"]) + timedelta(milliseconds=100)
    b = tables.patch("agent_jobs", rec["id"], {"status": "B", "parameters": {"by": "B"},
                                                "updated_at": (start + timedelta(milliseconds=20)).isoformat()})
    eventually(lambda: supabase.row("agent_jobs", rid)["status"] == "B")
    with late_deliveries(stack) if others else contextlib.nullcontext():
        with _next_stamped(stack, rec["id"], _at(b["edited_at"]) - timedelta(milliseconds=20)):
            a = tables.patch("agent_jobs", rec["id"], {"parameters": {"by": "A"}, "retry_count": 7,
                                                        "updated_at": start.isoformat()})
        for other in others:
            tables.update("agent_jobs", other, {"status": "other"})
        if others:
            stack.safety_drain()  # A's delivery and the others', in one batch
    assert _at(a["edited_at"]) < _at(b["edited_at"]) and a["data"]["status"] == "B"  # stamped first, landed last
    _both_end_with(stack, tables, supabase, rid, status="B", parameters={"by": "B"}, retry_count=7)
    if others:
        assert all(supabase.row("agent_jobs", o)["status"] == "other" for o in others)


def test_a_tables_edit_made_on_a_later_one_with_an_older_updated_at_is_merged_on_it(stack, tables, supabase):
    """As above, in stamp order: B sets retry_count with the later updated_at and is applied; A, made on B's record
    (it lands and is stamped after B), sets status and retry_count with an older updated_at (its writer's clock
    behind, or a version chosen before). Taken for a stale delivery, A was skipped and its status lost on both
    sides (a soak with blind writes off lost one so). Merged against the copy before both: A's status, B's
    retry_count (the later updated_at)."""
    rid = _agreed_job(stack, tables, supabase, "race-older-edit")
    rec = tables.find("agent_jobs", rid)
    start = _at(supabase.row("agent_jobs", rid)["updated_at"]) + timedelta(milliseconds=100)
    b = tables.patch("agent_jobs", rec["id"], {"retry_count": 5,
                                                "updated_at": (start + timedelta(milliseconds=20)).isoformat()})
    eventually(lambda: supabase.row("agent_jobs", rid)["retry_count"] == 5)
    a = tables.patch("agent_jobs", rec["id"], {"status": "A", "retry_count": 9, "updated_at": start.isoformat()})
    assert _at(a["edited_at"]) > _at(b["edited_at"])
    _both_end_with(stack, tables, supabase, rid, status="A", retry_count=5)


def test_an_older_tables_edit_landing_on_a_newer_one_keeps_only_what_the_newer_did_not_change(
        stack, tables, supabase):
    """The sync has just written the record (its base kept for that write's replaced record). K sets status and
    retry_count with the later updated_at and is applied; D, made on K (stamped and landing after it), sets both
    with an older updated_at. Against the base kept as K's record, every field D changed counted as made on it,
    at its older time, and D won both - K's later values lost on both sides (the suite's soak lost three fields
    so). Against the copy before both, each field keeps its latest change: K's."""
    rid = _agreed_job(stack, tables, supabase, "race-older-on-newer")
    supabase.query("UPDATE agent_jobs SET error_message = 'agent' WHERE id = %s", (rid,))
    _delivered(stack, supabase, [rid])
    rec = tables.find("agent_jobs", rid)
    start = _at(supabase.row("agent_jobs", rid)["updated_at"]) + timedelta(milliseconds=100)
    k = tables.patch("agent_jobs", rec["id"], {"status": "K", "retry_count": 1,
                                                "updated_at": (start + timedelta(milliseconds=20)).isoformat()})
    eventually(lambda: supabase.row("agent_jobs", rid)["status"] == "K")
    d = tables.patch("agent_jobs", rec["id"], {"status": "D", "retry_count": 2, "updated_at": start.isoformat()})
    assert _at(d["edited_at"]) > _at(k["edited_at"])
    _both_end_with(stack, tables, supabase, rid, status="K", retry_count=1, error_message="agent")


def test_a_late_echo_of_the_sync_s_own_write_is_not_merged_over_the_edit_made_on_it(stack, tables, supabase):
    """The agent's status is written to Tables; its echo waits in the inbox. More than zsync.stamp_race() later a
    person, seeing the agent's status, sets it back and sets retry_count (the later updated_at): Supabase takes it,
    and it is the record's base. Then the echo comes, older than what Supabase holds. zsync.overwritten_by took the
    write's own record for what replaced the base (as it is when the base is an edit the write overwrote), so the
    echo was merged against the record the write replaced: the agent's old status counted as a change Supabase
    lacked and came back over the person's later one, on both sides, and the merge went to Tables again
    (migration 20261206200501). The base was made after the write landed: the echo is stale."""
    rid = _agreed_job(stack, tables, supabase, "late-own-echo")
    with late_deliveries(stack):  # the echo of the agent's write waits in the inbox
        supabase.query("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (rid,))
        eventually(lambda: supabase.query("SELECT count(*) FROM zsync.outbox WHERE record_id = %s "
                                          "AND acked_at IS NULL", (rid,)) == [(0,)])
        written = tables.find("agent_jobs", rid)
        assert written["data"]["status"] == "agent"
        assert supabase.query("SELECT ack_outcome FROM zsync.outbox WHERE record_id = %s ORDER BY id DESC LIMIT 1",
                              (rid,)) == [("applied",)]
        time.sleep(2.1)  # past zsync.stamp_race(): the person's edit is plainly made after the write, on it
        agent_at = _at(supabase.row("agent_jobs", rid)["updated_at"])
        person = tables.patch("agent_jobs", written["id"], {
            "status": "queued", "retry_count": 5, "updated_at": (agent_at + timedelta(seconds=2)).isoformat()})
        assert _at(person["edited_at"]) > _at(written["edited_at"]) + timedelta(seconds=2)
        _drain_one_at_a_time_newest_first(stack)  # the person's edit is taken in first, then the late echo
        audit = [(a["metadata"].get("outcome"), a["metadata"].get("merged")) for a in supabase.audit(rid)]
        row = supabase.row("agent_jobs", rid)
        assert (row["status"], row["retry_count"]) == ("queued", 5), audit
    _both_end_with(stack, tables, supabase, rid, status="queued", retry_count=5)
    assert "merged" not in [a["metadata"].get("outcome") for a in supabase.audit(rid)]


def _an_edit_lands_on_the_agent_s_write(stack: Any, tables: Any, supabase: Any, rid: str) -> None:
    """The agent's status is written (blind) to Tables; a person's retry_count 5, stamped just before that write
    (it waited for the record), lands on it. Both deliveries come late, in one drain (newest first by updated_at:
    the edit, then the write's echo); then both sides hold status 'agent' and retry_count 5."""
    rec = tables.find("agent_jobs", rid)
    time.sleep(0.1)
    with late_deliveries(stack):
        supabase.query("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (rid,))
        written = eventually(lambda: (r := tables.find("agent_jobs", rid))["data"].get("status") == "agent" and r)
        eventually(lambda: supabase.query("SELECT count(*) FROM zsync.outbox WHERE record_id = %s "
                                          "AND acked_at IS NULL", (rid,)) == [(0,)])
        agent_at = _at(supabase.row("agent_jobs", rid)["updated_at"])
        with _next_stamped(stack, rec["id"], _at(written["edited_at"]) - timedelta(milliseconds=20)):
            edit = tables.patch("agent_jobs", rec["id"], {
                "retry_count": 5, "updated_at": (agent_at + timedelta(milliseconds=10)).isoformat()})
        assert _at(edit["edited_at"]) < _at(written["edited_at"]) and edit["data"]["status"] == "agent"
        stack.safety_drain()
    _both_end_with(stack, tables, supabase, rid, status="agent", retry_count=5)


def test_the_late_echo_of_a_write_an_edit_stamped_before_it_landed_on_is_taken_in_already(stack, tables, supabase):
    """The agent's status is written blind to Tables; a person's retry_count edit, stamped just before that write
    (it waited for the record), lands on it. Both deliveries come late, the edit's first (the later
    updated_at): Supabase takes it, and it is the record's base. The write's echo, stamped after the edit, is
    the write's own record, and the base holds what the write put there: taken in already, stale. Left to the
    other rules, it came after the copy seen last (the edit's, stamped first) and counted as an edit made on it
    with an older updated_at: the write's retry_count won back over the person's, on both sides (a first version
    of 20261206200501 did so; the rule before it merged the echo against the record the write replaced, which
    kept the person's). The agent's next change - retry_count set back - reaches both sides."""
    rid = _agreed_job(stack, tables, supabase, "race-echo-landed-on")
    with blind_writes(stack, True):
        _an_edit_lands_on_the_agent_s_write(stack, tables, supabase, rid)
        old = _set_config(supabase, "blind_quiet_s", 0)  # the person's edit no longer recent: written blind
        try:
            supabase.query("UPDATE agent_jobs SET retry_count = 0 WHERE id = %s", (rid,))
            _delivered(stack, supabase, [rid])
        finally:
            _set_config(supabase, "blind_quiet_s", old)
    _both_end_with(stack, tables, supabase, rid, status="agent", retry_count=0)


def test_the_copy_an_edit_stamped_before_the_write_landed_on_is_what_the_next_write_replaces(
        stack, tables, supabase):
    """As above: the person's retry_count 5 lands on the agent's blind write, stamped just before it. Tables' copy
    the sync knows must then be the person's record, though its stamp is older than the write's answer. Kept at
    the write's answer (retry_count 0), it is what the agent's next blind write (retry_count 7) counted as
    replaced: a second person's note, made on the first person's record and overwritten by that write, was merged
    against it - the 5 it only carried counted as its own later change of retry_count and won over the agent's 7,
    on both sides."""
    rid = _agreed_job(stack, tables, supabase, "race-known-copy")
    rec = tables.find("agent_jobs", rid)
    with blind_writes(stack, True):
        _an_edit_lands_on_the_agent_s_write(stack, tables, supabase, rid)
        old = _set_config(supabase, "blind_quiet_s", 0)  # the next write goes blind
        try:
            with late_deliveries(stack):
                with wakeups_lost(stack):
                    supabase.query("UPDATE agent_jobs SET retry_count = 7 WHERE id = %s", (rid,))
                agent_at = _at(supabase.row("agent_jobs", rid)["updated_at"])
                tables.patch("agent_jobs", rec["id"], {
                    "error_message": "a note", "updated_at": (agent_at + timedelta(milliseconds=10)).isoformat()})
                stack.sweep_outbox(min_age_s=0)  # the agent's retry_count, written blind over the note's record
                eventually(lambda: tables.find("agent_jobs", rid)["data"].get("retry_count") == 7)
                stack.safety_drain()
        finally:
            _set_config(supabase, "blind_quiet_s", old)
    _both_end_with(stack, tables, supabase, rid, status="agent", retry_count=7, error_message="a note")


def test_a_person_s_write_landing_between_the_sync_s_find_and_its_merge_keeps_its_later_values(
        stack, tables, supabase):
    """The agent sets status; a person sets retry_count in Tables. The agent's change finds the record and merges
    both (status, retry_count), but the merge's write reaches Zapier late (the stand-in holds it): a second
    person's write of every field, with the latest updated_at, lands between the find and the write, and the
    write overwrites it. A merge written to Tables recorded no replaced record, unlike any other write: the
    second person's delivery was applied, and the merge's echo, stamped after it, counted as an edit made on it
    and won back every field (the suite's soak lost three fields so). Recorded, the second person's edit is one
    the merge overwrote: merged on the record the merge replaced, its later values end on both sides."""
    rid = _agreed_job(stack, tables, supabase, "race-merge-write")
    supabase.query("UPDATE agent_jobs SET error_message = 'first' WHERE id = %s", (rid,))
    _delivered(stack, supabase, [rid])  # an earlier write: the record keeps a base (its replaced record) a while
    time.sleep(2.1)  # (past zsync.stamp_race(): nothing below counts as overwritten by that write)
    rec = tables.find("agent_jobs", rid)
    faults = f"{stack.tables.url.rstrip('/')}/_admin/faults"
    with blind_writes(stack, False), late_deliveries(stack):  # (found first: the drain merges)
        tables.patch("agent_jobs", rec["id"], {"retry_count": 3})  # a cell edit (updated_at kept)
        served = requests.get(f"{stack.tables.url.rstrip('/')}/_admin/stats", timeout=10).json()["faults"]["served"]
        requests.post(faults, json={"slow": True, "hang_s": 1.5, "count": 1, "method": "PATCH"},
                      timeout=10).raise_for_status()
        try:
            with wakeups_lost(stack):
                supabase.query("UPDATE agent_jobs SET status = 'agent' WHERE id = %s", (rid,))
            agent_at = _at(supabase.row("agent_jobs", rid)["updated_at"])
            stack.sweep_outbox(min_age_s=0)  # the agent's change: found, merged, written - held on its way
            eventually(lambda: requests.get(f"{stack.tables.url.rstrip('/')}/_admin/stats",
                                            timeout=10).json()["faults"]["served"] > served)
            person = tables.patch("agent_jobs", rec["id"], {
                "status": "person", "retry_count": 9, "error_message": "note",
                "updated_at": (agent_at + timedelta(seconds=1)).isoformat()})
            merged = eventually(lambda: (r := tables.find("agent_jobs", rid))["data"].get("status") == "agent" and r)
        finally:
            requests.delete(faults, timeout=10)
        assert _at(merged["edited_at"]) > _at(person["edited_at"])  # the merge landed on the person's write
        stack.safety_drain()
    _both_end_with(stack, tables, supabase, rid, status="person", retry_count=9, error_message="note")


def test_two_tables_edits_taken_in_one_batch_one_made_on_the_other_keep_each_field_s_latest_change(
        stack, tables, supabase):
    """As the two edits above, both deliveries late and taken in by one drain: B (status, retry_count, the later
    updated_at) lands first, A (retry_count, parameters, an older updated_at) on it. The batch applies B, then
    A (newest first). zsync.base_for_raced_edits ran once, before the batch, when A was not stale yet: A was then
    merged against B's record (kept as the base: the record had a recent write), and its older retry_count won
    (the suite's soak lost a field so). Asked again before each round: B's status and retry_count, A's
    parameters."""
    rid = _agreed_job(stack, tables, supabase, "race-one-batch")
    supabase.query("UPDATE agent_jobs SET error_message = 'first' WHERE id = %s", (rid,))
    _delivered(stack, supabase, [rid])  # a recent write: the record keeps a base a while
    time.sleep(2.1)  # (past zsync.stamp_race(): nothing below counts as overwritten by that write)
    rec = tables.find("agent_jobs", rid)
    start = _at(supabase.row("agent_jobs", rid)["updated_at"]) + timedelta(milliseconds=100)
    with late_deliveries(stack):
        b = tables.patch("agent_jobs", rec["id"], {"status": "B", "retry_count": 5,
                                                    "updated_at": (start + timedelta(milliseconds=20)).isoformat()})
        a = tables.patch("agent_jobs", rec["id"], {"retry_count": 7, "parameters": {"by": "A"},
                                                    "updated_at": start.isoformat()})
        assert _at(a["edited_at"]) > _at(b["edited_at"]) and a["data"]["status"] == "B"
        stack.safety_drain()  # one lease: both deliveries in one batch
    _both_end_with(stack, tables, supabase, rid, status="B", retry_count=5, parameters={"by": "A"},
                   error_message="first")
