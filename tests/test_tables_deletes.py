"""Issue 13 item 4: deletes made in Zapier Tables (found in its trash) win, stay deleted, and never touch
audit_log. Everything runs against the real local stack: the Tables records API (a person deletes a record),
the functions over HTTP (the scheduled trash check, stale deliveries), SQL on Postgres."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import requests

from infra.reconcile import reconcile
from shared.core.spec import TABLES
from shared.services.tables_trash import check_trash
from tests.e2e import Supabase, Tables, eventually, uid
from tests.test_correctness import post, stack_context

JOBS = TABLES["agent_jobs"]


def lose_delete_events(stack) -> Iterator[None]:
    def lose(on: bool) -> None:
        r = requests.post(f"{stack.tables.url}/_admin/inbox/faults", json={"drop_delete_events": on}, timeout=10)
        assert r.json() == {"drop_delete_events": on}, r.text

    lose(True)
    try:
        yield
    finally:
        lose(False)


@pytest.fixture(autouse=True, scope="module")
def delete_events_lost(stack):
    """These tests are about the trash check: the deletes-capable trigger's delete events are lost meanwhile
    (the case the trash check is the safety net for; tests/test_trigger_inbox.py covers the events)."""
    yield from lose_delete_events(stack)






def synced_job(stack, tables: Tables, supabase: Supabase, prefix: str) -> dict:
    """A job created by a person in Tables and synced to Supabase. -> its Tables record."""
    rid = uid(prefix)
    rec = tables.create("agent_jobs", {"id": rid, "status": "queued"})
    eventually(lambda: supabase.row("agent_jobs", rid))
    stack.wait_quiet()
    return rec


def delete_in_tables(tables: Tables, table: str, rec: dict) -> None:
    tables.client.delete(tables.ids[table], rec["id"])  # to the trash, as a person's delete in the UI


def tombstone(supabase: Supabase, rid: str) -> list[tuple]:
    return supabase.query("SELECT version, origin FROM zsync.tombstones WHERE table_name = 'agent_jobs' "
                          "AND record_id = %s", (rid,))


def test_a_tables_delete_reaches_supabase_and_stays_deleted(stack, tables, supabase):
    rec = synced_job(stack, tables, supabase, "tdel")
    rid = rec["data"]["id"]
    delete_in_tables(tables, "agent_jobs", rec)
    answers = stack.check_trash()  # what the schedule does; the stack's own timer may have done it first
    assert answers["agent_jobs_to_supabase"]["status"] == 200, answers
    assert answers["agent_jobs_to_supabase"]["outcome"] == "check_trash"
    assert supabase.row("agent_jobs", rid) is None
    assert tombstone(supabase, rid)[0][1] == "tables"
    deletes = [a for a in supabase.audit(rid, "agent_jobs_synced") if a["metadata"].get("operation") == "delete"]
    assert len(deletes) == 1 and deletes[0]["metadata"]["outcome"] == "applied", deletes
    stack.wait_quiet()
    assert tables.find("agent_jobs", rid) is None  # the push back of the delete found nothing to delete

    # A stale Zap / inbox delivery of the deleted record is not re-inserted. It is what the trigger sent:
    # the fields (no updated_at: created without one) and Zapier's edited_at, its version.
    r = post(stack, "agent_jobs_to_supabase", rec["data"] | {"edited_at": rec["edited_at"]})
    assert r.status_code == 200 and r.json()["outcome"] == "deleted", r.text
    assert supabase.row("agent_jobs", rid) is None
    # Reconcile does not resurrect it either (on neither side).
    result = reconcile(stack_context(stack), ["agent_jobs"])
    assert not result.tables["agent_jobs"].errors
    assert supabase.row("agent_jobs", rid) is None and tables.find("agent_jobs", rid) is None

    # Idempotent: the whole trash again (no watermark) changes nothing.
    audit_before = supabase.query("SELECT count(*) FROM audit_log")[0][0]
    again = check_trash(stack_context(stack), JOBS, since=None)
    again_full = check_trash(stack_context(stack), JOBS, since=datetime(2000, 1, 1, tzinfo=UTC))
    for res in (again, again_full):
        assert res.applied == 0 and res.kept_newer == 0, res
    assert again_full.considered >= 1 and again_full.unchanged >= 1
    assert supabase.query("SELECT count(*) FROM audit_log")[0][0] == audit_before
    assert tombstone(supabase, rid)[0][1] == "tables"
    # The watermark is kept for `zsync doctor`.
    mark = supabase.query("SELECT watermark, checked_at FROM zsync.trash_watermarks WHERE table_name = 'agent_jobs'")
    assert mark and mark[0][0] is not None


def test_a_supabase_version_newer_than_the_tables_delete_wins_and_is_re_created(stack, tables, supabase):
    rid = uid("tnewer")
    # A Claude agent's clock runs ahead (within ZSYNC_MAX_FUTURE_SKEW_S): its version is later than the person's
    # delete that follows.
    supabase.query("INSERT INTO agent_jobs (id, status, updated_at) VALUES (%s, 'claude', now() + '4 min')",
                   (rid,))
    rec = eventually(lambda: tables.find("agent_jobs", rid))
    stack.wait_quiet()
    with stack.trash_paused():
        delete_in_tables(tables, "agent_jobs", rec)
        res = check_trash(stack_context(stack), JOBS)
    assert res.kept_newer == 1 or res.still_live == 1, res
    assert supabase.row("agent_jobs", rid)["status"] == "claude"
    stack.wait_quiet()
    again = eventually(lambda: tables.find("agent_jobs", rid))
    assert again["id"] != rec["id"] and again["data"]["status"] == "claude"
    # Later checks see the id live again in Tables: nothing more to do.
    res = check_trash(stack_context(stack), JOBS)
    assert res.applied == 0 and res.kept_newer == 0
    assert supabase.row("agent_jobs", rid) is not None


def test_a_table_that_ignores_deletes_keeps_its_rows(stack, tables, supabase):
    rec = synced_job(stack, tables, supabase, "tkeep")
    rid = rec["data"]["id"]
    keep_deletes = dataclasses.replace(JOBS, sync_deletes=False)
    with stack.trash_paused():
        delete_in_tables(tables, "agent_jobs", rec)
        res = check_trash(stack_context(stack), keep_deletes)
        assert not res.checked and res.applied == 0
        assert supabase.row("agent_jobs", rid) is not None and not tombstone(supabase, rid)
        # Unpaused, the real spec (deletes synced) applies it: the record was really in the trash.
        res = check_trash(stack_context(stack), JOBS)
    assert res.applied == 1, res
    assert supabase.row("agent_jobs", rid) is None


def test_audit_log_is_append_only_a_tables_delete_does_nothing(stack, tables, supabase):
    rid = uid("taudit")
    rec = tables.create("audit_log", {"id": rid, "action": "created", "actor": "person"})
    eventually(lambda: supabase.row("audit_log", rid))
    delete_in_tables(tables, "audit_log", rec)
    answers = stack.check_trash()
    assert "audit_log_to_supabase" not in answers  # never scheduled
    res = check_trash(stack_context(stack), TABLES["audit_log"])
    assert not res.checked
    r = post(stack, "audit_log_to_supabase", {"zsync": "check_trash"})  # asked anyway: nothing is read
    assert r.status_code == 200 and r.json()["checked"] is False, r.text
    assert supabase.row("audit_log", rid) is not None
    reconcile(stack_context(stack), ["audit_log"])
    assert supabase.row("audit_log", rid) is not None


def test_reconcile_applies_a_tables_delete_the_check_has_not_seen(stack, tables, supabase):
    gone = synced_job(stack, tables, supabase, "trecdel")
    newer_id = uid("trecnew")
    supabase.query("INSERT INTO agent_jobs (id, status, updated_at) VALUES (%s, 'claude', now() + '4 min')",
                   (newer_id,))
    newer = eventually(lambda: tables.find("agent_jobs", newer_id))
    stack.wait_quiet()
    with stack.trash_paused():
        delete_in_tables(tables, "agent_jobs", gone)
        delete_in_tables(tables, "agent_jobs", newer)
        dry = reconcile(stack_context(stack), ["agent_jobs"], dry_run=True)
        assert dry.tables["agent_jobs"].trashed_in_tables >= 2 and not dry.in_sync
        result = reconcile(stack_context(stack), ["agent_jobs"]).tables["agent_jobs"]
    assert not result.errors, result.errors
    assert result.deleted_in_supabase >= 1
    assert supabase.row("agent_jobs", gone["data"]["id"]) is None  # deleted in Supabase, not re-created in Tables
    assert tables.find("agent_jobs", gone["data"]["id"]) is None
    assert tombstone(supabase, gone["data"]["id"])[0][1] == "tables"
    assert supabase.row("agent_jobs", newer_id) is not None  # newer in Supabase: wins, re-created in Tables
    assert tables.find("agent_jobs", newer_id)["data"]["status"] == "claude"


def test_the_schedule_route_of_a_to_tables_function_is_not_a_trash_check(stack):
    r = post(stack, "agent_jobs_to_tables", {"zsync": "check_trash"})
    assert r.status_code == 400, r.text  # not a webhook payload; the check runs in *_to_supabase only


def test_doctor_fails_when_the_trash_check_has_not_run_recently(database_url):
    import psycopg

    from infra.deploy.doctor import check_trash_runs

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM zsync.trash_watermarks")
        checks = {c.target: c for c in check_trash_runs(conn)}
        assert set(checks) == {"trash check agent_jobs", "trash check agent_decisions", "trash check rate_limits"}
        assert not any(c.ok for c in checks.values()) and "never ran" in checks["trash check agent_jobs"].detail
        for name in ("agent_jobs", "agent_decisions", "rate_limits"):
            conn.execute("SELECT zsync.trash_checked(%s, now(), 0, 0)", (name,))
        assert all(c.ok for c in check_trash_runs(conn))
        conn.execute("UPDATE zsync.trash_watermarks SET checked_at = now() - interval '10 minutes' "
                     "WHERE table_name = 'rate_limits'")
        checks = {c.target: c for c in check_trash_runs(conn)}
        assert not checks["trash check rate_limits"].ok and checks["trash check agent_jobs"].ok
        # The watermark never moves back (two checks may overlap).
        conn.execute("SELECT zsync.trash_checked('agent_jobs', now() - interval '1 day', 0, 0)")
        assert conn.execute("SELECT watermark > now() - interval '1 hour' FROM zsync.trash_watermarks "
                            "WHERE table_name = 'agent_jobs'").fetchone()[0]


def test_the_lambda_schedule_event_runs_the_trash_check(stack, tables, supabase, monkeypatch):
    """EventBridge invokes the *_to_supabase Lambda with {"zsync": "check_trash"} (serverless.yml)."""
    from functions import lambda_adapter
    from shared.platform.settings import reset_settings

    rec = synced_job(stack, tables, supabase, "tlambda")
    for key, value in stack.function_env().items():
        if key.startswith("ZSYNC_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("ZSYNC_FUNCTION", "agent_jobs_to_supabase")
    reset_settings()
    lambda_adapter._handlers.clear()
    try:
        with stack.trash_paused():
            delete_in_tables(tables, "agent_jobs", rec)
            answer = lambda_adapter.handler({"zsync": "check_trash"}, None)
    finally:
        lambda_adapter._handlers.clear()
        reset_settings()
    assert answer["ok"] is True and answer["table"] == "agent_jobs" and answer["applied"] == 1, answer
    assert supabase.row("agent_jobs", rec["data"]["id"]) is None


def test_serverless_schedules_the_trash_check_on_exactly_the_tables_whose_deletes_sync():
    from pathlib import Path

    import yaml

    from shared.core.spec import Direction
    from shared.services.tables_trash import deletes_checked

    config = yaml.safe_load((Path(__file__).resolve().parent.parent / "serverless.yml").read_text())
    scheduled = {name for name, fn in config["functions"].items()
                 for event in fn.get("events") or []
                 if (event.get("schedule") or {}).get("input") == {"zsync": "check_trash"}}
    assert scheduled == {t.function_name(Direction.TO_SUPABASE) for t in TABLES.values() if deletes_checked(t)}
    for name in scheduled:
        assert config["functions"][name]["events"][0]["schedule"]["rate"] == "rate(1 minute)"
        assert config["functions"][name]["snapStart"] is True
