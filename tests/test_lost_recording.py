"""A *_to_tables drain whose transaction is lost after its Tables write (a Postgres restart, a killed
connection) records the write in a fresh transaction - without the record's lock for a moment. A Tables edit
delivered in that moment is applied to Supabase; the recording that comes after it must not take what its
write's answer showed for what Tables holds now.

The soak (blind writes on, seed 330) met it: the record's first write (a create) was recorded after the
delivery of a person's later edit, which had found no known copy to move forward. The recording then left the
create's answer as the known copy, at the sync's own time (no edit seen), and the next change of the record
was written blind - the person's version written over itself (an echo), recorded as replacing the create's
copy. A real Postgres backend is terminated here, between the write and its recording."""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

import psycopg

from tests.e2e import blind_writes, eventually, uid


def _recording(conn: psycopg.Connection) -> list[int]:
    """The backends waiting to record what Tables holds (zsync.remember_tables): a drain's recording, held
    back by the test's uncommitted copy of the record."""
    return [pid for (pid,) in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%%remember_tables%%' "
        "AND pid <> pg_backend_pid()").fetchall()]


def test_a_recording_retried_after_a_delivery_does_not_take_the_write_s_answer_for_tables_copy(
        stack, tables, supabase):
    rid = uid("lost-record")
    with blind_writes(stack, True):
        # the agent's insert waits in the outbox (its wake-up lost), so the test starts the drain itself
        lost = stack.dropped_deliveries()["pgnet"]
        stack.drop_deliveries(1.0)
        try:
            supabase.query("INSERT INTO agent_jobs (id, status) VALUES (%s, 'queued')", (rid,))
            eventually(lambda: stack.dropped_deliveries()["pgnet"] > lost)
        finally:
            stack.drop_deliveries(0.0)
        with psycopg.connect(stack.database_url) as holder:
            # an uncommitted copy of the record's Tables state: the drain's recording waits for it (a delivery,
            # which only moves a copy already there forward, does not)
            holder.execute("INSERT INTO zsync.tables_known (table_name, record_id, tables_id, known) "
                           "VALUES ('agent_jobs', %s, 'held', '{}')", (rid,))
            sweep = threading.Thread(target=stack.sweep_outbox, args=(0,), daemon=True)
            sweep.start()
            rec = eventually(lambda: tables.find("agent_jobs", rid), timeout_s=30)  # the create landed
            with psycopg.connect(stack.database_url, autocommit=True) as watch:
                drain = eventually(lambda: _recording(watch), timeout_s=30)
                # a person edits the record: its delivery waits for the record's lock, which the drain holds
                edited = tables.patch("agent_jobs", rec["id"], {"status": "a person's"})
                eventually(lambda: watch.execute(  # (the delivery's own wait: its query applies the record)
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory' "
                    "AND query LIKE '%%sync_apply%%' AND pid <> ALL(%s)", (drain,)).fetchone()[0], timeout_s=60)
                # the drain's transaction is lost after its write: the delivery is applied before the recording
                for pid in drain:
                    watch.execute("SELECT pg_terminate_backend(%s)", (pid,))
                eventually(lambda: supabase.row("agent_jobs", rid)["status"] == "a person's", timeout_s=30)
                eventually(lambda: set(_recording(watch)) - set(drain), timeout_s=30)  # the recording, retried
            holder.rollback()
        sweep.join(60)
        eventually(lambda: supabase.row("agent_jobs", rid)["status"] == "a person's", timeout_s=30)
        eventually(lambda: supabase.query("SELECT count(*) FROM zsync.outbox WHERE record_id = %s "
                                          "AND acked_at IS NULL", (rid,)) == [(0,)], timeout_s=30)
        stack.wait_quiet()
        # the copy the sync knows is the person's (or none: the next write finds the record first)
        known = supabase.query("SELECT known_at FROM zsync.tables_known WHERE record_id = %s", (rid,))
        person_at = datetime.fromisoformat(edited["edited_at"].replace("Z", "+00:00"))
        assert not known or known[0][0] >= person_at, (known, person_at)
        # the agent's next change reaches Tables with the person's status kept, and nothing is written twice
        supabase.query("UPDATE agent_jobs SET error_message = 'the agent''s' WHERE id = %s", (rid,))
        eventually(lambda: (tables.find("agent_jobs", rid) or {}).get("data", {}).get("error_message")
                   == "the agent's", timeout_s=30)
        stack.wait_quiet()
        found: dict[str, Any] = tables.find("agent_jobs", rid)["data"]
        assert found["status"] == "a person's"
        assert supabase.row("agent_jobs", rid)["status"] == "a person's"
        audit = [(a["metadata"].get("function"), a["metadata"].get("outcome"), a["metadata"].get("merged"))
                 for a in supabase.audit(rid)]
        # (a write that left updated_at where it was: the person's cell edit, once - a second is the sync's echo)
        assert tables.stats()["same_version_records"].count(rid) == 1, audit
