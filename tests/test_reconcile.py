"""``zsync reconcile`` against a real Postgres (a fresh migrated database per test) and the real local Zapier
Tables service (records API, no triggers: only reconcile writes)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from typer.testing import CliRunner

from infra.cli import app
from infra.local.postgres import create_database, prepare_database
from infra.reconcile import reconcile
from shared.adapters import supabase_db
from shared.adapters.zapier_tables import TablesClient
from shared.core.mapping import InvalidRecord, parse_supabase_record, parse_tables_record
from shared.core.spec import TABLES, TableSpec
from shared.platform.settings import Settings, reset_settings
from shared.services.sync import SyncContext, tables_row
from tests.tables_local import LocalTables, start_local_tables

# --- both sides, parsed independently of reconcile (also used by test_faults) -------------------------------


def _norm(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if v == "" else v) for k, v in row.items()}


def tables_rows(client: TablesClient, spec: TableSpec, table_id: str) -> tuple[dict[str, dict], list[str]]:
    """Every Tables record of a table parsed as the sync does -> (rows by id, ids held by several records)."""
    rows: dict[str, dict] = {}
    dupes: list[str] = []
    for rec in client.iter_records(table_id, page_size=1000):
        row = tables_row(spec, rec)  # no id cell: the record id; no updated_at: versioned at edited_at
        if row["id"] in rows:
            dupes.append(row["id"])
        rows[row["id"]] = _norm(row)
    return rows, dupes


def supabase_rows(database_url: str, spec: TableSpec) -> dict[str, dict]:
    with psycopg.connect(database_url) as conn:
        return {r["id"]: _norm(parse_supabase_record(spec, r)) for r in supabase_db.fetch_rows(conn, spec)}


def differences(client: TablesClient, database_url: str, table_ids: dict[str, str]) -> dict[str, Any]:
    """What differs between the two sides, per table (empty when identical). audit_log is one-way: every
    Tables entry must be in Supabase (which also holds the sync's own entries)."""
    out: dict[str, Any] = {}
    for name, spec in TABLES.items():
        t, dupes = tables_rows(client, spec, table_ids[name])
        s = supabase_rows(database_url, spec)
        if spec.append_only:
            lost = sorted(i for i in t if i not in s or s[i] != t[i])
            diff = {"lost": lost, "duplicates": dupes}
        else:
            diff = {"only_tables": sorted(set(t) - set(s)), "only_supabase": sorted(set(s) - set(t)),
                    "differ": sorted(i for i in set(t) & set(s) if t[i] != s[i]), "duplicates": dupes}
        if any(diff.values()):
            out[name] = diff
    return out


# --- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_db(pg_server: Any) -> str:
    url = create_database(pg_server.get_uri())
    prepare_database(url)
    return url


@pytest.fixture
def service(tmp_path: Path) -> Iterator[LocalTables]:
    """The local Tables service with the four tables (no triggers: only reconcile writes)."""
    with start_local_tables(tmp_path / "t.sqlite3") as local:
        yield local


@pytest.fixture
def tids(service: LocalTables) -> dict[str, str]:
    return service.ids


@pytest.fixture
def settings(fresh_db: str, service: LocalTables) -> Settings:
    return service.settings(database_url=fresh_db, retry_budget_s=2, http_timeout_s=2, webhook_secret="x")


@pytest.fixture
def ctx(settings: Settings) -> Iterator[SyncContext]:
    c = SyncContext(settings=settings)
    yield c
    c.tables.close()


@pytest.fixture
def client(service: LocalTables) -> Iterator[TablesClient]:
    with service.client() as c:
        yield c


def sql(url: str, query: str, params: tuple | list = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []




def stats(service: LocalTables) -> dict:
    return requests.get(f"{service.url}/_admin/stats", timeout=5).json()


# --- tests ---------------------------------------------------------------------------------------------------


def test_backfill_of_an_empty_tables_side_is_batched(tids, ctx, fresh_db, client, service):
    ids = [f"job-{i:04d}" for i in range(250)]
    sql(fresh_db, "INSERT INTO agent_jobs (id, status, parameters, retry_count, updated_at) SELECT x, 'queued', "
        "jsonb_build_object('n', x), 1, '2025-12-22T10:00:00Z' FROM unnest(%s::text[]) x", (ids,))
    dry = reconcile(ctx, ["agent_jobs"], dry_run=True)
    report = dry.tables["agent_jobs"]
    assert (report.compared, report.missing_in_tables, report.repaired) == (250, 250, 0) and not dry.in_sync
    assert stats(service)["writes"].get(tids["agent_jobs"], 0) == 0

    requests.post(f"{service.url}/_admin/stats/reset", timeout=5)
    done = reconcile(ctx, ["agent_jobs"])
    assert done.tables["agent_jobs"].repaired == 250 and done.in_sync
    assert stats(service)["api_requests"] <= 6  # 1 page read + 1 trash read + 3 batch creates, not one per record
    assert differences(client, fresh_db, tids) == {}
    synced = sql(fresh_db, "SELECT metadata FROM audit_log WHERE action = 'agent_jobs_synced'")
    assert len(synced) == 250
    assert all(m["via"] == "reconcile" and m["sync_direction"] == "supabase_to_tables" for (m,) in synced)
    assert sql(fresh_db, "SELECT count(*) FROM zsync.outbox WHERE acked_at IS NULL") == [(0,)]

    again = reconcile(ctx)
    assert again.in_sync and again.total("drift") == 0 and again.tables["agent_jobs"].in_sync == 250


def test_backfill_of_an_empty_supabase_side(tids, ctx, fresh_db, client):
    client.create_many(tids["agent_decisions"], [
        {"id": f"dec-{i}", "decision": "qualified", "confidence": 0.5 + i / 1000, "metadata": {"k": 1},
         "updated_at": "2025-12-22T10:00:00Z"} for i in range(120)])
    client.create_many(tids["rate_limits"], [{"id": "rl-1", "service_name": "openai", "request_count": 3}])
    entries = client.create_many(tids["audit_log"], [
        {"action": "lead_scored", "actor": "zapier_agent", "compliance_tags": ["gdpr", "soc2"], "metadata": {"a": 1},
         "timestamp": "2025-12-22T10:00:00Z"} for _ in range(3)])
    result = reconcile(ctx)
    assert result.tables["agent_decisions"].missing_in_supabase == 120
    assert result.tables["rate_limits"].missing_in_supabase == 1
    assert result.tables["audit_log"].missing_in_supabase == 3 and result.in_sync
    assert result.total("repaired") == 124
    assert differences(client, fresh_db, tids) == {}
    assert sorted(r[0] for r in sql(fresh_db, "SELECT id FROM audit_log WHERE action = 'lead_scored'")) == sorted(
        e.id for e in entries)  # one Supabase row per Tables audit record, keyed by its record id
    synced = sql(fresh_db, "SELECT metadata->>'via', metadata->>'sync_direction' FROM audit_log "
                 "WHERE action = 'agent_decisions_synced'")
    assert len(synced) == 120 and set(synced) == {("reconcile", "tables_to_supabase")}
    # audit_log is one-way: the sync's own Supabase entries are never pushed to Tables.
    assert reconcile(ctx).tables["audit_log"].missing_in_tables == 0
    assert len(list(client.iter_records(tids["audit_log"]))) == 3


def test_drift_in_both_directions_follows_last_writer_wins(tids, ctx, fresh_db, client):
    t = tids["agent_jobs"]
    ts = "2025-12-22T10:00:00Z"
    later = "2025-12-22T11:00:00Z"
    # Both sides, same version.
    client.create(t, {"id": "same", "created_at": ts, "status": "queued", "updated_at": ts})
    # Tables newer / Supabase newer.
    client.create(t, {"id": "t-newer", "created_at": ts, "status": "done", "updated_at": later})
    client.create(t, {"id": "s-newer", "created_at": ts, "status": "queued", "updated_at": ts})
    # Same updated_at, different content: the larger content hash wins on both sides.
    client.create(t, {"id": "tie", "created_at": ts, "status": "from-tables", "updated_at": ts})
    client.create(t, {"id": "only-t", "created_at": ts, "status": "queued", "updated_at": ts})
    rows = [("same", "queued", ts), ("t-newer", "queued", ts), ("s-newer", "done", later), ("tie", "from-supabase", ts),
            ("only-s", "queued", ts)]
    for rid, status, at in rows:  # created_at given: both sides would stamp their own "now" otherwise
        sql(fresh_db, "INSERT INTO agent_jobs (id, status, created_at, updated_at) VALUES (%s, %s, %s, %s)",
            (rid, status, ts, at))
    result = reconcile(ctx, ["agent_jobs"])
    r = result.tables["agent_jobs"]
    assert r.compared == 6 and r.in_sync == 1
    assert (r.missing_in_supabase, r.missing_in_tables) == (1, 1)
    assert r.stale_in_supabase + r.stale_in_tables == 3 and r.stale_in_supabase >= 1 and r.stale_in_tables >= 1
    assert r.repaired == 5 and result.in_sync
    assert differences(client, fresh_db, tids) == {}
    final = supabase_rows(fresh_db, TABLES["agent_jobs"])
    assert final["t-newer"]["status"] == "done" and final["s-newer"]["status"] == "done"
    with psycopg.connect(fresh_db) as conn:  # the tie went to whichever version_cmp prefers, on both sides
        a = {"id": "tie", "status": "from-tables", "updated_at": ts}
        b = {"id": "tie", "status": "from-supabase", "updated_at": ts}
        winner = "from-tables" if supabase_db.version_cmp(conn, TABLES["agent_jobs"], a, b) > 0 else "from-supabase"
    assert final["tie"]["status"] == winner
    assert reconcile(ctx, ["agent_jobs"], dry_run=True).in_sync


def test_since_limits_the_comparison(tids, ctx, fresh_db, client):
    t = tids["rate_limits"]
    client.create(t, {"id": "old-t", "service_name": "a", "updated_at": "2025-01-01T00:00:00Z"})
    client.create(t, {"id": "new-t", "service_name": "b", "updated_at": "2025-12-22T12:00:00Z"})
    sql(fresh_db, "INSERT INTO rate_limits (id, service_name, updated_at) VALUES ('old-s', 'c', '2025-01-01'), "
        "('new-s', 'd', '2025-12-22T12:00:00Z'), ('moved', 'e', '2025-12-22T12:00:00Z')")
    client.create(t, {"id": "moved", "service_name": "e-old", "updated_at": "2025-01-01T00:00:00Z"})
    since = datetime(2025, 12, 1, tzinfo=UTC)
    result = reconcile(ctx, ["rate_limits"], since=since)
    r = result.tables["rate_limits"]
    assert r.compared == 3  # new-t, new-s, moved (newer in Supabase, older in Tables)
    assert (r.missing_in_supabase, r.missing_in_tables, r.stale_in_tables) == (1, 1, 1)
    full = reconcile(ctx, ["rate_limits"], dry_run=True).tables["rate_limits"]
    assert (full.missing_in_supabase, full.missing_in_tables) == (1, 1)  # old-t and old-s were left alone


def test_duplicates_and_unreadable_tables_records(tids, ctx, fresh_db, client):
    t = tids["agent_jobs"]
    older = client.create(t, {"id": "dup", "status": "queued", "updated_at": "2025-12-22T10:00:00Z"})
    client.create(t, {"id": "dup", "status": "running", "updated_at": "2025-12-22T10:05:00Z"})
    # A whole number is what Supabase holds; Zapier's number field takes 1.5, the sync cannot read it.
    client.create(t, {"id": "broken", "status": "x", "retry_count": 1.5, "updated_at": "2025-12-22T10:00:00Z"})
    client.create(t, {"id": "hopeless", "retry_count": 1.5})
    sql(fresh_db, "INSERT INTO agent_jobs (id, status, updated_at) VALUES ('broken', 'fixed', '2025-12-22T09:00:00Z')")
    result = reconcile(ctx, ["agent_jobs"])
    r = result.tables["agent_jobs"]
    assert r.duplicates_in_tables == 1 and r.invalid_in_tables == 2
    assert r.missing_in_supabase == 1 and r.stale_in_tables == 1  # dup -> Supabase; broken <- Supabase
    remaining = {rec.id: rec.data for rec in client.iter_records(t)}
    assert older.id not in remaining
    assert [d["status"] for d in remaining.values() if d["id"] == "dup"] == ["running"]
    assert [d["status"] for d in remaining.values() if d["id"] == "broken"] == ["fixed"]
    with pytest.raises(InvalidRecord):  # nothing to restore it from: reported, left as it is
        parse_tables_record(TABLES["agent_jobs"], next(d for d in remaining.values() if d["id"] == "hopeless"))


def test_tables_unavailable_is_reported_not_hidden(ctx, fresh_db, service):
    sql(fresh_db, "INSERT INTO agent_jobs (id, status) VALUES ('j', 'queued')")
    requests.post(f"{service.url}/_admin/faults", json={"status": 503, "count": 1000}, timeout=5)
    try:
        result = reconcile(ctx, ["agent_jobs"])
    finally:
        requests.delete(f"{service.url}/_admin/faults", timeout=5)
    assert not result.in_sync and "503" in result.tables["agent_jobs"].errors[0]


def test_cli(tids, settings, fresh_db, client, monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("ZSYNC_"):
            monkeypatch.delenv(key)
    stack = tmp_path / "stack.json"  # the local stack's info file supplies every setting
    stack.write_text(json.dumps({"database_url": fresh_db, "zapier_base_url": settings.zapier_base_url,
                                 "zapier_token_url": settings.zapier_token_url,
                                 "zapier_client_id": settings.zapier_client_id,
                                 "zapier_client_secret": settings.zapier_client_secret.get_secret_value(),
                                 "table_ids": tids}))
    reset_settings()
    sql(fresh_db, "INSERT INTO rate_limits (id, service_name, updated_at) VALUES ('cli', 'x', %s)",
        (datetime.now(UTC) - timedelta(hours=1),))
    runner = CliRunner()
    args = ["reconcile", "--stack-file", str(stack), "--no-progress"]
    dry = runner.invoke(app, [*args, "--dry-run", "--table", "rate_limits"])
    assert dry.exit_code == 1, dry.output
    assert "dry run" in dry.output and "missing in tables" in dry.output
    fixed = runner.invoke(app, args)
    assert fixed.exit_code == 0, fixed.output
    assert runner.invoke(app, [*args, "--dry-run"]).exit_code == 0
    bad = runner.invoke(app, [*args, "--since", "yesterday"])
    assert bad.exit_code == 2
    assert runner.invoke(app, [*args, "--table", "nope"]).exit_code == 2


def test_a_tables_version_from_the_future_is_not_compared_and_a_refused_row_fails_no_batch(tids, ctx, fresh_db,
                                                                                          client):
    """Issue 18: a Tables updated_at a day ahead used to win the compare and be written to Supabase (pinning the
    row); now it is treated like an unreadable record (Supabase's version overwrites it). A row only the
    database refuses (a CHECK added by hand) no longer fails its whole batch of 1,000: it is reported alone."""
    from datetime import UTC, datetime, timedelta

    t = tids["agent_jobs"]
    ahead = (datetime.now(UTC) + timedelta(days=1)).isoformat().replace("+00:00", "Z")
    sql(fresh_db, "INSERT INTO agent_jobs (id, status, updated_at) VALUES ('future', 'supabase', %s)",
        ("2025-12-22T10:00:00Z",))
    sql(fresh_db, "ALTER TABLE agent_jobs ADD CHECK (status <> 'poison')")
    client.create(t, {"id": "future", "status": "tables", "updated_at": ahead})
    client.create(t, {"id": "poisoned", "status": "poison", "updated_at": "2025-12-22T10:00:00Z"})
    for i in range(5):
        client.create(t, {"id": f"fine-{i}", "status": "tables", "updated_at": "2025-12-22T10:00:00Z"})
    r = reconcile(ctx, ["agent_jobs"]).tables["agent_jobs"]
    assert r.invalid_in_tables == 1 and r.stale_in_tables == 1 and r.repaired >= 6
    assert any(e.startswith("poisoned: status") for e in r.errors), r.errors
    assert sql(fresh_db, "SELECT id, status FROM agent_jobs ORDER BY id") == [
        *[(f"fine-{i}", "tables") for i in range(5)], ("future", "supabase")]
    assert [d["status"] for d in (rec.data for rec in client.iter_records(t)) if d["id"] == "future"] == ["supabase"]
