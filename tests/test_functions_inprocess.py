"""The function edge in-process, through functions-framework's own app
(``create_app(target, source).test_client()``), against a real Postgres and real HTTP receivers."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest
from functions_framework import create_app

from shared.platform.settings import reset_settings
from tests.receiver import recording_server

MAIN = str(Path(__file__).resolve().parent.parent / "functions" / "main.py")
SECRET = "in-process-secret"


@pytest.fixture
def env(zsync_env, database_url: str) -> pytest.MonkeyPatch:
    return zsync_env(database_url=database_url, webhook_secret=SECRET, retry_budget_s="1")


def client(target: str):
    return create_app(target, MAIN).test_client()


def post(target: str, body: object, **headers: str):
    return client(target).post("/", json=body, headers={"X-Zsync-Secret": SECRET, **headers})


@pytest.fixture
def catch_hook():
    with recording_server() as (base, got):
        yield f"{base}/hooks/catch/1/abc/", got


def test_every_target_exists_and_is_thin():
    import functions.main as main
    from shared.core.spec import FUNCTIONS

    assert sorted(main.__all__) == sorted(FUNCTIONS)
    for name in FUNCTIONS:
        assert callable(getattr(main, name)) and getattr(main, name).__name__ == name


def test_to_supabase_applies_and_answers_json(env, database_url):
    r = post("agent_jobs_to_supabase", {"record": {"id": "ip-1", "status": "queued", "retry_count": "2"}})
    assert r.status_code == 200 and r.json == {"function": "agent_jobs_to_supabase", "table": "agent_jobs",
                                                "outcome": "applied", "id": "ip-1"}
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT retry_count FROM agent_jobs WHERE id = 'ip-1'").fetchone() == (2,)


def test_audit_log_is_inserted_once_per_source_record(env, database_url):
    entry = {"id": "rec-audit-1", "action": "lead_scored", "actor": "zapier_agent", "compliance_tags": "gdpr"}
    assert post("audit_log_to_supabase", entry).json["outcome"] == "applied"
    for _ in range(3):
        assert post("audit_log_to_supabase", entry).json["outcome"] == "unchanged"
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM audit_log WHERE id = 'rec-audit-1'").fetchone() == (1,)


def test_method_size_and_ping(env):
    c = client("rate_limits_to_tables")
    assert c.get("/", headers={"X-Zsync-Secret": SECRET}).status_code == 405
    env.setenv("ZSYNC_MAX_BODY_BYTES", "2048")
    reset_settings()
    big = {"record": {"id": "x", "metadata": "x" * 5000}}
    r = post("rate_limits_to_supabase", big)
    assert r.status_code == 413 and r.json["problems"][0]["field"] == "body"
    ping = post("rate_limits_to_tables", {"zsync_ping": True})
    assert ping.status_code == 200 and ping.json["outcome"] == "ping"


def test_catch_hook_writer_posts_the_formatted_record(env, catch_hook, database_url):
    """The seed's 3B path (ZSYNC_TABLES_WRITER=catch_hook): the record goes to the table's catch hook with
    typed values (JSON as a value for the json field), no Tables API credentials needed."""
    url, got = catch_hook
    env.setenv("ZSYNC_TABLES_WRITER", "catch_hook")
    env.setenv("ZSYNC_CATCH_HOOK_URLS", json.dumps({"agent_jobs": url}))
    reset_settings()
    hook = {"type": "INSERT", "table": "agent_jobs", "schema": "public", "old_record": None,
            "record": {"id": "abc-123-def-456", "job_type": "qualification", "status": "queued",
                       "parameters": {"lead_id": "lead-xyz-789"}, "created_at": "2025-12-22T10:05:00+00:00",
                       "updated_at": "2025-12-22T10:05:00+00:00", "retry_count": 0}}
    r = post("agent_jobs_to_tables", hook)
    assert r.status_code == 200 and r.json["outcome"] == "applied"
    assert [r.body for r in got] == [{
        "id": "abc-123-def-456", "job_type": "qualification", "status": "queued", "initiated_by": None,
        "initiated_by_type": None, "parameters": {"lead_id": "lead-xyz-789"}, "results": None,
        "error_message": None, "retry_count": 0, "created_at": "2025-12-22T10:05:00Z", "started_at": None,
        "completed_at": None, "updated_at": "2025-12-22T10:05:00Z",
    }]


def test_database_down_answers_503_without_details(env):
    env.setenv("ZSYNC_DATABASE_URL", "postgresql://zsync:hunter2@127.0.0.1:9/nowhere")
    reset_settings()
    r = post("agent_decisions_to_supabase", {"id": "d-down", "decision": "x"})
    assert r.status_code == 503 and r.json["outcome"] == "failed"
    assert "hunter2" not in r.get_data(as_text=True) and "Traceback" not in r.get_data(as_text=True)


def test_missing_configuration_is_a_clear_500(env):
    r = post("agent_jobs_to_tables", {"type": "INSERT", "table": "agent_jobs", "schema": "public",
                                      "record": {"id": "cfg", "updated_at": "2025-12-22T10:00:00Z"}})
    assert r.status_code == 500 and "misconfigured" in r.json["error"]


def test_no_secret_configured_refuses_everything(env):
    env.delenv("ZSYNC_WEBHOOK_SECRET")
    reset_settings()
    r = client("agent_jobs_to_supabase").post("/", json={"id": "x"}, headers={"X-Zsync-Secret": ""})
    assert r.status_code == 401


def test_ping_reports_whether_migrations_are_current(env, database_url):
    assert post("agent_jobs_to_supabase", {"zsync_ping": True}).json["migrations_current"] is True
    env.setenv("ZSYNC_DATABASE_URL", "postgresql://zsync@127.0.0.1:9/nowhere")
    reset_settings()
    r = post("agent_jobs_to_supabase", {"zsync_ping": True})
    assert r.status_code == 200 and "migrations_current" not in r.json  # unknown: the database is unreachable


def test_tables_refusing_our_write_is_a_502_not_retried_or_dead_lettered(env, database_url, tmp_path):
    from tests.tables_local import start_local_tables

    with start_local_tables(tmp_path / "t.sqlite3", names=["agent_jobs"], max_body_bytes=2048) as tables:
        for key, value in tables.env().items():
            env.setenv(key, value)
        reset_settings()
        hook = {"type": "INSERT", "table": "agent_jobs", "schema": "public", "old_record": None,
                "record": {"id": "too-big", "error_message": "x" * 5000, "updated_at": "2025-12-22T10:00:00+00:00"}}
        with psycopg.connect(database_url, autocommit=True) as conn:  # earlier tests' changes: not this one's
            conn.execute("UPDATE zsync.outbox SET acked_at = now() WHERE acked_at IS NULL")
        tables.service.ctx.stats.reset()
        r = post("agent_jobs_to_tables", hook)
        assert r.status_code == 502 and r.json["dead_lettered"] is False
        assert "rejected" in r.json["error"]
        # one token, one field listing, one lookup, one refused create: a 4xx is not retried
        assert tables.service.stats()["api_requests"] == 3
    with psycopg.connect(database_url) as conn:
        failed = conn.execute("SELECT count(*) FROM audit_log WHERE action = 'sync_failed' AND resource_id = 'too-big'")
        assert failed.fetchone() == (1,)
