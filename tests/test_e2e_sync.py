"""The seed's tests 1-5, end to end over real HTTP through the local stack, plus the echo test.

Zapier agents are played by writes to the local Tables records API (whose "Zap trigger" POSTs to the
*_to_supabase functions); Claude agents by SQL writes to Postgres (whose Database Webhook triggers,
delivered by the pg_net stand-in, POST to the *_to_tables functions).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
import requests

from tests.e2e import eventually, uid

# --- Test 1: Tables -> Supabase (all four tables) ------------------------------------------------


def test_1_tables_to_supabase_agent_jobs(stack, tables, supabase):
    job_id = uid("test-job")
    tables.create("agent_jobs", {"id": job_id, "job_type": "discovery", "status": "queued",
                                 "parameters": "{\"metro\": \"Austin\", \"radius\": 15}"})
    row = eventually(lambda: supabase.row("agent_jobs", job_id))
    assert row["job_type"] == "discovery" and row["status"] == "queued"
    assert row["parameters"] == {"metro": "Austin", "radius": 15}  # JSON string in Tables -> jsonb
    synced = supabase.audit(job_id, "agent_jobs_synced")
    assert len(synced) == 1
    meta = synced[0]["metadata"]
    assert meta["sync_direction"] == "tables_to_supabase" and meta["source_timestamp"] and meta["lag_seconds"] >= 0
    assert synced[0]["actor_type"] == "zapier_sync"


def test_1_tables_to_supabase_decisions_rate_limits_audit(stack, tables, supabase):
    decision, limit, entry = uid("dec"), uid("rl"), uid("act")
    tables.create("agent_decisions", {"id": decision, "decision": "qualified", "confidence": "0.87",
                                      "metadata": "{\"source\": \"zap\"}"})
    tables.create("rate_limits", {"id": limit, "service_name": "openai", "request_count": "3", "quota_limit": 100,
                                  "window_start": "2025-12-22T10:00:00+02:00"})
    rec = tables.create("audit_log", {"action": entry, "actor": "zapier_agent_1", "compliance_tags": ["gdpr", "soc2"],
                                      "metadata": "{\"k\": 1}", "timestamp": "2025-12-22T10:00:00Z"})
    d = eventually(lambda: supabase.row("agent_decisions", decision))
    assert d["confidence"] == 0.87 and d["metadata"] == {"source": "zap"}
    r = eventually(lambda: supabase.row("rate_limits", limit))
    assert r["request_count"] == 3 and r["quota_limit"] == 100 and r["window_start"] == "2025-12-22T08:00:00+00:00"
    a = eventually(lambda: supabase.row("audit_log", rec["id"]))
    assert a["compliance_tags"] == ["gdpr", "soc2"] and a["retention_days"] == 2555 and a["severity"] == "info"


# --- Test 2: Supabase -> Tables ------------------------------------------------------------------


def test_2_supabase_to_tables_agent_decisions(stack, tables, supabase):
    decision = uid("test-decision")
    supabase.query(
        "INSERT INTO agent_decisions (id, lead_id, decision_type, agent_name, decision, confidence, metadata) "
        "VALUES (%s, 'lead-abc-123', 'qualification', 'claude_qualifier', 'qualified', 0.87, %s)",
        (decision, json.dumps({"signals": ["x", "y"]})),
    )
    rec = eventually(lambda: tables.find("agent_decisions", decision))
    assert rec["data"]["confidence"] == 0.87
    assert rec["data"]["metadata"] == {"signals": ["x", "y"]}  # jsonb -> a json field holding the value
    assert rec["data"]["updated_at"].endswith("Z")
    # The entry commits with the function's transaction, just after its Tables write.
    eventually(lambda: supabase.audit(decision, "agent_decisions_synced"))
    stack.wait_quiet()
    assert len(supabase.audit(decision, "agent_decisions_synced")) == 1


def test_2_supabase_to_tables_jobs_and_rate_limits_updates(stack, tables, supabase):
    job, limit = uid("job"), uid("rl")
    supabase.query("INSERT INTO agent_jobs (id, job_type, status, parameters) VALUES (%s, 'qualification', "
                   "'queued', '{\"lead_id\": \"lead-xyz-789\"}')", (job,))
    supabase.query("INSERT INTO rate_limits (id, service_name, quota_limit) VALUES (%s, 'serp', 10)", (limit,))
    eventually(lambda: tables.find("agent_jobs", job))
    eventually(lambda: tables.find("rate_limits", limit))
    supabase.query("UPDATE agent_jobs SET status = 'running' WHERE id = %s", (job,))  # no explicit updated_at
    supabase.query("UPDATE rate_limits SET request_count = request_count + 1 WHERE id = %s", (limit,))
    eventually(lambda: tables.find("agent_jobs", job)["data"]["status"] == "running")
    eventually(lambda: tables.find("rate_limits", limit)["data"]["request_count"] == 1)


def test_2_delete_reaches_tables(stack, tables, supabase):
    job = uid("job-del")
    supabase.query("INSERT INTO agent_jobs (id, status) VALUES (%s, 'queued')", (job,))
    eventually(lambda: tables.find("agent_jobs", job))
    url = stack.functions["agent_jobs_to_tables"].url
    r = requests.post(url, json={"type": "DELETE", "table": "agent_jobs", "schema": "public", "record": None,
                                 "old_record": {"id": job}}, headers={"X-Zsync-Secret": stack.secret}, timeout=10)
    # Not deleted in Supabase (no tombstone): a DELETE webhook for a row that exists changes nothing.
    assert r.status_code == 200 and r.json()["outcome"] == "unchanged"
    assert tables.find("agent_jobs", job) is not None
    supabase.query("DELETE FROM agent_jobs WHERE id = %s", (job,))  # deletes win (issue 13)
    eventually(lambda: tables.find("agent_jobs", job) is None)


# --- Test 3: conflict resolution -----------------------------------------------------------------


def test_3_simultaneous_writes_converge_to_the_newer(stack, tables, supabase):
    rid = uid("conflict-test")
    # Both systems written at (nearly) the same moment; Supabase's timestamp is 1 s newer.
    tables.create("agent_jobs", {"id": rid, "status": "queued", "updated_at": "2025-12-22T10:00:00Z"})
    supabase.query(
        "INSERT INTO agent_jobs (id, status, updated_at) VALUES (%s, 'running', '2025-12-22T10:00:01Z') "
        "ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, updated_at = EXCLUDED.updated_at", (rid,))
    stack.wait_quiet()
    eventually(lambda: (tables.find("agent_jobs", rid) or {}).get("data", {}).get("status") == "running")
    assert supabase.row("agent_jobs", rid)["status"] == "running"
    assert tables.find("agent_jobs", rid)["data"]["updated_at"] == "2025-12-22T10:00:01Z"


def test_3_older_tables_write_is_skipped_and_audited(stack, tables, supabase):
    rid = uid("stale")
    supabase.query("INSERT INTO agent_jobs (id, status, updated_at) VALUES (%s, 'done', '2025-12-22T12:00:00Z')",
                   (rid,))
    eventually(lambda: tables.find("agent_jobs", rid))
    stack.wait_quiet()
    # A Zapier agent writes an older version of the record (e.g. from a stale read).
    tables.update("agent_jobs", rid, {"status": "queued", "updated_at": "2025-12-22T11:00:00Z"})
    stack.wait_quiet()
    eventually(lambda: supabase.audit(rid, "sync_skipped_stale_data"))
    assert supabase.row("agent_jobs", rid)["status"] == "done"
    # Supabase keeps the newer value and pushes it back, so Tables converges too.
    eventually(lambda: tables.find("agent_jobs", rid)["data"]["status"] == "done")
    assert tables.find("agent_jobs", rid)["data"]["updated_at"] == "2025-12-22T12:00:00Z"


TIE_CREATED = "2025-12-22T09:00:00Z"
# The tie's updated_at: later than every edited_at of the test (a pure tie, edited_at cannot decide), yet within
# the allowed future skew (ZSYNC_MAX_FUTURE_SKEW_S, 300 s by default), which refuses a version further ahead.
TIE_AHEAD = timedelta(seconds=180)


def _tie_ts() -> str:
    return (datetime.now(UTC) + TIE_AHEAD).strftime("%Y-%m-%dT%H:%M:%SZ")


def _tie_winner(supabase, rid: str, ts: str, mine: str, theirs: str) -> int:
    """zsync.version_cmp of the Tables version (status ``mine``) against Supabase's (``theirs``) at the same
    updated_at - checked against the documented rule, independently: the larger content hash wins."""
    row = {"id": rid, "retry_count": 0, "created_at": TIE_CREATED, "updated_at": ts}
    a, b = json.dumps(row | {"status": mine}), json.dumps(row | {"status": theirs})
    [(cmp, ha, hb)] = supabase.query(
        "SELECT zsync.version_cmp('public.agent_jobs', %s::jsonb, %s::jsonb), "
        "(zsync.version_of('public.agent_jobs', %s::jsonb)).hash, "
        "(zsync.version_of('public.agent_jobs', %s::jsonb)).hash", (a, b, a, b))
    assert cmp == (1 if ha > hb else -1), (cmp, ha, hb)
    return cmp


@pytest.mark.parametrize("tables_wins", [True, False], ids=["tables_wins", "supabase_wins"])
def test_3_same_timestamp_tie_converges_on_the_version_version_cmp_picks(stack, tables, supabase, tables_wins):
    """Both sides written at the same updated_at, each before seeing the other's (the notifications held
    back, then let through): both end with the version zsync.version_cmp ranks higher, at that updated_at
    (not a time bumped by edited_at: the tie is decided by the content hash), in either order of arrival."""
    rid = uid("tie")
    ts = _tie_ts()
    n = 0
    while _tie_winner(supabase, rid, ts, f"from-tables-{n}", "from-supabase") != (1 if tables_wins else -1):
        n += 1
    mine, theirs = f"from-tables-{n}", "from-supabase"
    expected = mine if tables_wins else theirs
    stack.wait_quiet()
    stack.drop_deliveries(1.0)
    try:
        supabase.query("INSERT INTO agent_jobs (id, status, retry_count, created_at, updated_at) "
                       "VALUES (%s, %s, 0, %s, %s)", (rid, theirs, TIE_CREATED, ts))
        tables.create("agent_jobs", {"id": rid, "status": mine, "retry_count": 0, "created_at": TIE_CREATED,
                                     "updated_at": ts})
    finally:
        stack.drop_deliveries(0.0)
    for _ in range(3):  # the lost notifications: the sweeper re-sends Supabase's, the scheduled drain Tables'
        stack.sweep_outbox(0)
        stack.safety_drain()
        stack.wait_quiet()
    row = supabase.row("agent_jobs", rid)
    found = tables.find("agent_jobs", rid)["data"]
    assert (row["status"], found["status"]) == (expected, expected), (row, found)
    assert row["updated_at"].startswith(ts.removesuffix("Z")) and found["updated_at"] == ts, (row, found)
    assert datetime.now(UTC) < datetime.fromisoformat(ts.replace("Z", "+00:00")), "the tie was not pure: too slow"


# --- Test 4: no sync loop ------------------------------------------------------------------------


def test_4_one_tables_write_makes_one_supabase_write_then_quiet(stack, tables, supabase):
    rid = uid("echo-t")
    before = tables.writes("agent_jobs")
    tables.create("agent_jobs", {"id": rid, "status": "queued", "parameters": "{\"a\": [1, 2.5, null]}"})
    eventually(lambda: supabase.row("agent_jobs", rid))
    stack.wait_quiet()
    time.sleep(0.5)
    stack.wait_quiet()
    assert supabase.writes("agent_jobs", rid) == 1  # the sync's insert, nothing after
    assert tables.writes("agent_jobs") - before == 1  # the user's own create only: the echo was dropped


def test_4_one_supabase_write_makes_one_tables_write_then_quiet(stack, tables, supabase):
    rid = uid("echo-s")
    supabase.query("INSERT INTO agent_decisions (id, decision, confidence, metadata) VALUES (%s, 'hold', 0.5, "
                   "'{\"nested\": {\"k\": [true, 1.0]}}')", (rid,))
    eventually(lambda: tables.find("agent_decisions", rid))
    stack.wait_quiet()
    before_t = tables.writes("agent_decisions")
    time.sleep(0.5)
    stack.wait_quiet()
    assert supabase.writes("agent_decisions", rid) == 1  # the user's insert only
    assert tables.writes("agent_decisions") == before_t  # nothing more after the one sync write
    assert tables.find("agent_decisions", rid)["data"]["decision"] == "hold"


def test_4_sync_source_marker_does_not_block_genuine_edits(stack, tables, supabase):
    rid = uid("marker")
    meta = {"sync_source": "zapier_tables", "sync_id": "unique-sync-operation-id"}
    tables.create("agent_decisions", {"id": rid, "decision": "v1", "metadata": json.dumps(meta)})
    eventually(lambda: supabase.row("agent_decisions", rid))
    stack.wait_quiet()
    tables.update("agent_decisions", rid, {"decision": "v2"})
    eventually(lambda: supabase.row("agent_decisions", rid)["decision"] == "v2")
    stack.wait_quiet()
    assert supabase.writes("agent_decisions", rid) == 2


def test_4_redelivered_echo_is_unchanged(stack, tables, supabase):
    rid = uid("redeliver")
    rec = tables.create("rate_limits", {"id": rid, "service_name": "x", "quota_limit": 5})
    eventually(lambda: supabase.row("rate_limits", rid))
    stack.wait_quiet()
    url = stack.functions["rate_limits_to_supabase"].url
    # What the trigger delivers again: the fields (no updated_at: the record was created without one, and
    # Zapier fills in nothing) and Zapier's edited_at, at which such a record is versioned.
    delivery = rec["data"] | {"edited_at": rec["edited_at"]}
    assert "updated_at" not in delivery
    for _ in range(3):
        r = requests.post(url, json=delivery, headers={"X-Zsync-Secret": stack.secret}, timeout=10)
        assert r.status_code == 200 and r.json()["outcome"] == "unchanged", r.text
    assert supabase.writes("rate_limits", rid) == 1


# --- Test 5: error handling ----------------------------------------------------------------------


@pytest.mark.parametrize("fields,field", [
    ({"parameters": "{\"metro\": "}, "parameters"),
    ({"created_at": "2025-02-31T10:00:00Z"}, "created_at"),
    ({"started_at": "yesterday-ish"}, "started_at"),
])
def test_5_invalid_json_and_bad_timestamps_are_rejected_clearly(stack, supabase, fields, field):
    rid = uid("bad")
    url = stack.functions["agent_jobs_to_supabase"].url
    r = requests.post(url, json={"id": rid, "status": "queued", **fields},
                      headers={"X-Zsync-Secret": stack.secret}, timeout=10)
    assert r.status_code == 400
    body = r.json()
    assert body["outcome"] == "rejected" and body["id"] == rid
    assert [p["field"] for p in body["problems"]] == [field]
    assert supabase.row("agent_jobs", rid) is None  # nothing written
    failed = supabase.audit(rid, "sync_failed")
    assert len(failed) == 1 and failed[0]["metadata"]["problems"][0]["field"] == field


def test_5_bad_record_in_tables_never_reaches_supabase(stack, tables, supabase):
    rid = uid("bad-tables")
    tables.create("agent_jobs", {"id": rid, "parameters": "not json at all"})
    eventually(lambda: supabase.audit(rid, "sync_failed"))
    assert supabase.row("agent_jobs", rid) is None


def test_secret_required_everywhere(stack):
    for name, fp in stack.functions.items():
        assert requests.post(fp.url, json={"zsync_ping": True}, timeout=10).status_code == 401, name
        r = requests.post(fp.url, json={"zsync_ping": True}, headers={"X-Zsync-Secret": "wrong"}, timeout=10)
        assert r.status_code == 401 and stack.secret not in r.text
        ok = requests.post(fp.url, json={"zsync_ping": True}, headers={"X-Zsync-Secret": stack.secret}, timeout=10)
        assert ok.status_code == 200 and ok.json()["outcome"] == "ping"


def test_4_tables_record_without_timestamps_is_one_write_in_supabase_and_none_back(stack, tables, supabase):
    """A Tables record with no created_at/updated_at: versioned at Zapier's edited_at, written once in
    Supabase, and not written back to Tables (what Tables sent, it holds: no echo check, no request)."""
    rid = uid("no-ts")
    tables.create("agent_jobs", {"id": rid, "status": "queued"})
    before_t = tables.writes("agent_jobs")
    eventually(lambda: supabase.row("agent_jobs", rid))
    stack.wait_quiet()
    time.sleep(0.5)
    stack.wait_quiet()
    assert supabase.writes("agent_jobs", rid) == 1
    assert tables.writes("agent_jobs") - before_t == 0
    assert "created_at" not in tables.find("agent_jobs", rid)["data"]  # an empty cell: not in data


def test_duplicate_tables_records_for_one_id_are_merged(stack, tables, supabase):
    rid = uid("dup")
    tables.create("agent_jobs", {"id": rid, "status": "a", "updated_at": "2025-12-22T10:00:00Z"})
    eventually(lambda: supabase.row("agent_jobs", rid))
    stack.wait_quiet()
    # A second Tables record with the same id (e.g. a create retried after its response was lost).
    tables.create("agent_jobs", {"id": rid, "status": "b", "updated_at": "2025-12-22T10:00:05Z"})
    eventually(lambda: supabase.row("agent_jobs", rid)["status"] == "b")
    supabase.query("UPDATE agent_jobs SET status = 'c', updated_at = '2025-12-22T10:00:09Z' WHERE id = %s", (rid,))
    stack.wait_quiet()
    found = tables.find_all("agent_jobs", rid)
    assert [f["data"]["status"] for f in found] == ["c"]


def test_4_empty_text_from_a_zap_equals_null_no_extra_write(stack, tables, supabase):
    """Zapier sends "" for an empty field; Supabase holds NULL: same version, nothing written."""
    rid = uid("empty")
    supabase.query("INSERT INTO agent_jobs (id, status, error_message) VALUES (%s, 'queued', NULL)", (rid,))
    rec = eventually(lambda: tables.find("agent_jobs", rid))
    stack.wait_quiet()
    zap_payload = {k: ("" if v is None else v) for k, v in rec["data"].items()}  # how a Zap renders empties
    url = stack.functions["agent_jobs_to_supabase"].url
    r = requests.post(url, json=zap_payload, headers={"X-Zsync-Secret": stack.secret}, timeout=10)
    assert r.json()["outcome"] == "unchanged", r.text
    assert supabase.writes("agent_jobs", rid) == 1
