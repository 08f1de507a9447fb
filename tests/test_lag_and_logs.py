"""Delivery lag is measured from the change, not from the record's updated_at; repairs (replay, reconcile)
are reported apart from live deliveries; every delivery log line carries what Logs Insights / Cloud
Logging queries need. Real Postgres, a real Tables service, a real functions-framework process."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import requests
from functions_framework import create_app

from infra.local.stack import FunctionProcess, free_port
from shared.adapters import supabase_db
from shared.core.outcome import Outcome
from shared.core.spec import FUNCTIONS, TABLES
from shared.platform.settings import get_settings
from shared.services import deliveries
from shared.services.sync import SupabaseWebhook, SyncContext
from shared.services.to_tables import apply_from_supabase
from tests.e2e import uid
from tests.tables_local import start_local_tables

MAIN = str(Path(__file__).resolve().parent.parent / "functions" / "main.py")
SECRET = "lag-secret"
H = "X-Zsync-Secret"
OLD = "2025-01-01T00:00:00Z"  # a record last edited long ago (a backfill, a reconcile, a writer's clock)




@pytest.fixture
def env(zsync_env, database_url: str) -> pytest.MonkeyPatch:
    return zsync_env(database_url=database_url, webhook_secret=SECRET, retry_budget_s="1")


def post(target: str, body: object, **headers: str):
    return create_app(target, MAIN).test_client().post("/", json=body, headers={H: SECRET, **headers})


def audit_meta(conn: psycopg.Connection, record_id: str, action: str = "agent_jobs_synced") -> dict:
    rows = conn.execute("SELECT metadata FROM audit_log WHERE resource_id = %s AND action = %s",
                        (record_id, action)).fetchall()
    assert len(rows) == 1, rows
    return rows[0][0]


def test_an_old_record_synced_now_shows_milliseconds_of_lag_not_its_age(env, db):
    plain, zapier, wrapped = uid("old"), uid("old-edited"), uid("old-wrapped")
    assert post("agent_jobs_to_supabase", {"id": plain, "status": "queued", "updated_at": OLD}).status_code == 200
    meta = audit_meta(db, plain)
    assert meta["origin"] == "live" and meta["changed_at_source"] == "received"
    assert 0 <= meta["lag_seconds"] < 5, meta  # milliseconds in practice; a loaded CI machine gets slack
    assert meta["record_age_seconds"] > 300 * 86400  # the age is kept, apart

    edited = (datetime.now(UTC) - timedelta(seconds=2)).isoformat()
    r = post("agent_jobs_to_supabase", {"id": zapier, "status": "queued", "updated_at": OLD, "edited_at": edited})
    assert r.status_code == 200 and r.json["outcome"] == "applied"
    meta = audit_meta(db, zapier)
    assert meta["changed_at_source"] == "edited_at" and meta["changed_at"] == datetime.fromisoformat(edited).isoformat()
    assert 2 <= meta["lag_seconds"] < 7, meta
    assert db.execute("SELECT 1 FROM agent_jobs WHERE id = %s", (zapier,)).fetchone()  # edited_at is not a column

    r = post("agent_jobs_to_supabase", {"record": {"id": wrapped, "status": "queued", "updated_at": OLD},
                                        "edited_at": edited})
    assert r.status_code == 200 and r.json["id"] == wrapped
    assert audit_meta(db, wrapped)["changed_at_source"] == "edited_at"


def test_supabase_to_tables_lag_runs_from_the_outbox_capture(database_url, db, tmp_path):
    service = start_local_tables(tmp_path / "t.sqlite3")
    try:
        ctx = SyncContext(settings=service.settings(database_url=database_url, retry_budget_s=1.0))
        rid = uid("out")
        db.execute("INSERT INTO agent_jobs (id, status, updated_at) VALUES (%s, 'queued', %s)", (rid, OLD))
        row = supabase_db.fetch_row(db, TABLES["agent_jobs"], rid)
        hook = SupabaseWebhook.model_validate({"type": "INSERT", "table": "agent_jobs", "schema": "public",
                                               "record": json.loads(json.dumps(row, default=str))})
        result = apply_from_supabase(ctx, FUNCTIONS["agent_jobs_to_tables"], hook)
        assert result.outcome is Outcome.APPLIED and result.lag_ms is not None and 0 <= result.lag_ms < 5000
        meta = audit_meta(db, rid)
        assert meta["sync_direction"] == "supabase_to_tables" and meta["changed_at_source"] == "outbox"
        assert meta["lag_seconds"] < 5 and meta["record_age_seconds"] > 300 * 86400
        # A re-send of the acknowledged change has no capture time: no lag rather than the record's age.
        again = apply_from_supabase(ctx, FUNCTIONS["agent_jobs_to_tables"], hook)
        assert again.outcome is Outcome.UNCHANGED and again.lag_ms is None
    finally:
        supabase_db.close_pools()
        service.stop()


def test_replays_are_reported_apart_and_never_trip_the_live_lag(env, db):
    ctx = deliveries.context_for(FUNCTIONS["rate_limits_to_supabase"], get_settings())
    live, replayed = uid("live"), uid("replayed")
    deliveries.process(FUNCTIONS["rate_limits_to_supabase"], ctx, {"id": live, "quota_limit": 1})
    an_hour_ago = datetime.now(UTC) - timedelta(minutes=50)
    deliveries.process(FUNCTIONS["rate_limits_to_supabase"], ctx, {"id": replayed, "quota_limit": 1},
                    received_at=an_hour_ago, origin="replay")
    meta = audit_meta(db, replayed, "rate_limits_synced")
    assert meta["origin"] == "replay" and meta["lag_seconds"] > 2900  # the replay's real delay, kept
    health = db.execute("SELECT live_lag_avg_s, repairs FROM zsync.sync_health('1 hour')").fetchone()
    assert health[0] < 5 and health[1] >= 1
    by_origin = dict(db.execute("SELECT origin, sum(applied) FROM zsync.sync_metrics_5m "
                                "WHERE table_name = 'rate_limits' GROUP BY origin").fetchall())
    assert by_origin.get("replay", 0) >= 1 and by_origin.get("live", 0) >= 1


REQUIRED = ("function", "table", "record_id", "outcome", "lag_ms", "duration_ms", "trace_id")


def test_each_delivery_log_line_carries_what_the_queries_need(database_url, tmp_path):
    log_path = tmp_path / "fn.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZSYNC_")}
    env |= {"ZSYNC_DATABASE_URL": database_url, "ZSYNC_WEBHOOK_SECRET": SECRET, "PYTHONUNBUFFERED": "1"}
    fn = FunctionProcess("agent_jobs_to_supabase", free_port(), env, log_path)
    fn.start()
    try:
        fn.wait_ready()
        rid = uid("log")
        trace = uuid.uuid4().hex
        edited = datetime.now(UTC).isoformat()
        record = {"id": rid, "status": "queued", "updated_at": OLD, "edited_at": edited}
        sent = [
            (record, {"traceparent": f"00-{trace}-{'1' * 16}-01"}),
            (record, {}),  # unchanged
            ({"id": rid, "retry_count": "many"}, {"X-Amzn-Trace-Id": "Root=1-5759e988-bd862e3fe1be46a994272793"}),
        ]
        statuses = [requests.post(fn.url, json=body, headers={H: SECRET, **extra}, timeout=10).status_code
                    for body, extra in sent]
        assert statuses == [200, 200, 400]
    finally:
        fn.stop()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    deliveries = [line for line in lines if line.get("event") == "delivery"]
    assert len(deliveries) == 3, lines
    for line in deliveries:
        missing = [k for k in REQUIRED if k not in line]
        assert not missing, (missing, line)
        assert line["function"] == "agent_jobs_to_supabase" and line["table"] == "agent_jobs"
        assert line["record_id"] == rid and isinstance(line["duration_ms"], int | float)
        assert line["severity"] in ("INFO", "WARNING")
    applied, unchanged, rejected = deliveries
    assert applied["outcome"] == "applied" and 0 <= applied["lag_ms"] < 5000 and applied["trace_id"] == trace
    assert unchanged["outcome"] == "unchanged" and len(unchanged["trace_id"]) == 32  # a fresh id when none given
    assert unchanged["trace_id"] != trace
    assert rejected["outcome"] == "rejected" and rejected["lag_ms"] is None
    assert rejected["trace_id"] == "1-5759e988-bd862e3fe1be46a994272793"
