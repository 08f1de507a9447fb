"""Zapier's official SDK (npm ``@zapier/zapier-sdk`` 0.67.0) against the local Tables service, and the
sync carrying its writes to Supabase and Supabase writes back. If the SDK and our service disagree,
the SDK is right: this test is what keeps ``infra/local/tables_service/`` honest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.e2e import eventually

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "sdk" / "conformance.mjs"
pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (REPO / "node_modules" / "@zapier" / "zapier-sdk").exists(),
    reason="node or @zapier/zapier-sdk missing (run `make install`)",
)


def sdk(stack: Any, step: str, **data: Any) -> dict[str, Any]:
    payload = {"baseUrl": stack.tables.url, "clientId": stack.client_id, "clientSecret": stack.client_secret,
               "tableId": stack.table_ids["agent_jobs"]} | data
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZAPIER_")}
    env |= {"ZSYNC_SDK_INPUT": json.dumps(payload), "ZAPIER_BASE_URL": stack.tables.url}
    done = subprocess.run(["node", str(SCRIPT), step], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, f"SDK {step} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


def supabase(stack: Any, sql: str, *args: Any) -> Any:
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        return conn.execute(sql, args).fetchone()


def test_official_sdk_against_the_local_service_and_the_sync(stack: Any) -> None:
    rid = f"sdk-{uuid.uuid4().hex[:10]}"
    record = {"id": rid, "job_type": "discovery", "status": "queued", "parameters": {"lead_id": "lead-1"},
              "retry_count": 1, "created_at": "2025-12-22T10:00:00Z", "updated_at": "2025-12-22T10:00:00Z"}
    out = sdk(stack, "write", record=record, update={"status": "running", "updated_at": "2025-12-22T10:00:05Z"})

    # The SDK listed typed fields with f<n> ids, made a ULID record, found it by our id, updated and read it.
    fields = {f["name"]: f for f in out["fields"]}
    assert fields["parameters"]["type"] == "json" and fields["updated_at"]["type"] == "datetime"
    assert fields["compliance_tags" if "compliance_tags" in fields else "retry_count"]["id"].startswith("f")
    created = out["created"][0]
    assert len(created["id"]) == 26 and created["data"]["id"] == rid and created["edited_at"]
    assert [r["id"] for r in out["found"]] == [created["id"]]
    assert out["updated"][0]["data"]["status"] == "running"
    assert out["got"]["data"]["status"] == "running" and out["got"]["data"]["parameters"] == {"lead_id": "lead-1"}

    # The sync carried the SDK's writes to Supabase.
    row = eventually(lambda: supabase(stack, "select status, parameters from agent_jobs where id = %s and "
                                             "status = 'running'", rid))
    assert row == ("running", {"lead_id": "lead-1"})

    # A Supabase write comes back, and the SDK reads it.
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute("update agent_jobs set status = 'completed', results = '{\"n\": 2}'::jsonb, "
                     "updated_at = '2025-12-22T10:01:00Z' where id = %s", (rid,))

    def synced() -> dict | None:
        found = sdk(stack, "find", id=rid)["found"]
        return found[0] if found and found[0]["data"]["status"] == "completed" else None

    back = eventually(synced, timeout_s=20, interval_s=0.3)
    assert back["data"]["results"] == {"n": 2}

    gone = sdk(stack, "delete", id=rid, recordId=created["id"])
    assert gone["found"] == []


def test_official_sdk_trigger_inboxes_against_the_local_service(stack: Any) -> None:
    """ensureTriggerInbox (0.67.0: PUT with ``name``), list by name, lease, release, ack and list messages,
    delete: the inbox API as the SDK speaks it. The inbox is the SDK's own (no notification URL), so the
    stack's functions never drain it."""
    name = f"sdk-conformance-{uuid.uuid4().hex[:8]}"
    spec = {"name": name, "app": "TableCLIAPI@1.0.0", "action": "new_or_updated_record", "notificationUrl": None}
    out = sdk(stack, "inbox-ensure", **spec)
    first, again = out["first"], out["again"]
    assert first["id"] == again["id"] and first["name"] == name and first["status"] == "active"
    assert first["subscription"]["inputs"] == {"table_id": stack.table_ids["agent_jobs"]}
    assert [i["id"] for i in out["listed"]] == [first["id"]]
    try:
        rid = f"sdk-inbox-{uuid.uuid4().hex[:8]}"
        record = {"id": rid, "job_type": "discovery", "status": "queued"}
        out = sdk(stack, "inbox-messages", name=name, record=record)
        created = out["created"][0]
        mine = [m for m in out["lease1"]["results"] if m["payload"]["id"] == created["id"]]
        assert len(mine) == 1, out["lease1"]
        message = mine[0]
        # What a Tables trigger event carries here: the record as the API holds it (ULID, data keyed by field
        # id; the SDK hands records out by field name), and edited_at.
        with stack.tables_client() as client:
            names = {f.key: f.name for f in client.field_map(stack.table_ids["agent_jobs"]).fields}
        payload = message["payload"]
        assert all(key.startswith("f") for key in payload["data"])
        assert {names[k]: v for k, v in payload["data"].items()} == created["data"]
        assert payload["edited_at"] == created["edited_at"]
        assert message["message_attributes"]["lease_count"] == 1
        assert message["id"] in [m["id"] for m in out["released"]["results"]]
        again_leased = {m["id"]: m for m in out["lease2"]["results"]}
        assert again_leased[message["id"]]["message_attributes"]["lease_count"] == 2
        assert again_leased[message["id"]]["message_attributes"]["possible_duplicate_data"] is True
        assert {m["status"] for m in out["listedLeased"]} == {"leased"}
        assert out["acked"]["acked_id"] == out["lease2"]["lease_id"]
        assert out["listedAfter"] == []
    finally:
        gone = sdk(stack, "inbox-delete", name=name)
        assert gone["listed"] == []
