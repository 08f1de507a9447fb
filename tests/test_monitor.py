"""The seed's monitoring thresholds, computed from a real audit_log and posted to a real HTTP receiver."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from infra import monitor
from infra.cli import app
from shared.supabase_db import append_audit
from tests.receiver import recording_server


def _entry(i: int, action: str, lag: float | None = None) -> dict:
    meta = {"sync_direction": "tables_to_supabase"}
    if lag is not None:
        source = datetime.now(UTC) - timedelta(seconds=lag)
        meta |= {"source_timestamp": source.isoformat(), "lag_seconds": lag}
    return {"id": f"mon-{action}-{i}-{lag}", "actor_type": "zapier_sync", "action": action, "metadata": meta}


@pytest.fixture
def receiver():
    with recording_server() as (base, got):
        yield f"{base}/hook", got


def test_healthy_then_each_threshold_fires(database_url, db, receiver):
    for i in range(20):
        append_audit(db, _entry(i, "agent_jobs_synced", lag=1.0))
    health = monitor.check(database_url)
    assert health.synced == 20 and health.failed == 0 and health.avg_lag_s == pytest.approx(1.0)
    assert health.alerts() == []

    append_audit(db, _entry(0, "sync_failed"))  # 1 of 21 = 4.8%: under 5%
    assert monitor.check(database_url).alerts() == []
    append_audit(db, _entry(1, "sync_failed"))  # 2 of 22 = 9.1%
    assert any("failure rate" in a for a in monitor.check(database_url).alerts())

    for i in range(20):
        append_audit(db, _entry(100 + i, "rate_limits_synced", lag=120.0))  # avg (20*1 + 20*120)/40 = 60.5 s
    health = monitor.check(database_url)
    assert health.avg_lag_s == pytest.approx(60.5)
    assert any("lag" in a for a in health.alerts())

    for i in range(11):
        append_audit(db, _entry(200 + i, "sync_skipped_stale_data"))
    assert any("conflict" in a for a in monitor.check(database_url).alerts())

    url, got = receiver
    monitor.post_to_slack(url, monitor.check(database_url).alerts())
    assert "lag" in got[0].body["text"] and "conflict" in got[0].body["text"]  # failures diluted to 2 of 42 by now


def test_cli_exits_nonzero_and_posts_when_alerting(database_url, db, receiver, monkeypatch):
    url, got = receiver
    for i in range(3):
        append_audit(db, _entry(300 + i, "sync_failed"))
    monkeypatch.setenv("ZSYNC_SLACK_WEBHOOK_URL", url)
    from shared.settings import reset_settings

    reset_settings()
    try:
        result = CliRunner().invoke(app, ["monitor", "--database-url", database_url])
    finally:
        monkeypatch.delenv("ZSYNC_SLACK_WEBHOOK_URL")
        reset_settings()
    assert result.exit_code == 1, result.output
    assert got and "failure rate" in got[-1].body["text"]
