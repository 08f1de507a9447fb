"""The local Zapier stand-in serves Zapier's public Tables API v2 and Trigger Inbox API (``/work/shared/
reference/zapier-public-api.md`` sections 1, 2 and 4) over the same store as the SDK paths, over real HTTP:
UUID-form record ids (the ULID's 128 bits), ``results``/``meta``/``links``, the documented error envelope,
Idempotency-Key replay, both inbox prefixes with the lease bounds, and the ``/_admin/requests`` log."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from infra.local.tables_service import TableConfig, TablesService, start_tables_service
from infra.local.tables_service.values import ulid_to_uuid, uuid_to_ulid

TOKEN = "tok-" + os.urandom(8).hex()
SDK = "/api/v0/sdk/tables/api/v1"
V2 = "/tables/v2"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENVELOPE = {"detail", "code", "meta", "errors", "message", "support_id"}


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[TablesService]:
    with start_tables_service(tmp_path / "t.sqlite3", [TableConfig("jobs")], TOKEN, rate_limit=None) as s:
        yield s


def call(svc: TablesService, method: str, path: str, body: Any = None, **headers: str) -> requests.Response:
    return requests.request(method, svc.url + path, json=body, headers=AUTH | headers, timeout=10)


@pytest.fixture
def table(svc: TablesService) -> dict[str, Any]:
    t = call(svc, "POST", f"{SDK}/tables", {"name": "jobs"}).json()["data"]["id"]
    made = call(svc, "POST", f"{SDK}/tables/{t}/fields",
                {"new_fields": [{"name": "status", "type": "string"}, {"name": "n", "type": "number"}]}).json()
    f = {c["new"]["name"]: f"f{c['new']['id']}" for c in made["data"]}
    return {"id": t, "status": f["status"], "n": f["n"]}


def test_ulid_and_uuid_forms_are_the_same_bits() -> None:
    assert uuid_to_ulid("01563e3a-b5d3-d676-4c61-efb99302bd5b") == "01ARZ3NDEKTSV4RRFFQ69G5FAV"
    assert ulid_to_uuid("01JYEPSEARXB2Z6BJRCMFGXBC2") == "01979d6c-b958-eac5-f32e-58651f0ead82"
    assert uuid_to_ulid("01JYEPSEARXB2Z6BJRCMFGXBC2") == "01JYEPSEARXB2Z6BJRCMFGXBC2"
    assert uuid_to_ulid("not-an-id") is None


def test_a_record_written_through_one_api_is_read_through_the_other(svc, table) -> None:
    t, status = table["id"], table["status"]
    made = call(svc, "POST", f"{V2}/tables/{t}/records", {"new_records": [{"data": {status: "new"}}]})
    assert made.status_code in (200, 201), made.text
    body = made.json()
    assert set(body) == {"results", "meta"}
    record = body["results"][0]
    assert uuid.UUID(record["id"]) and record["data"] == {status: "new"}
    assert {"created_at", "edited_at", "deleted_at", "is_source_record", "errors"} <= set(record)
    ulid = uuid_to_ulid(record["id"])
    sdk = call(svc, "GET", f"{SDK}/tables/{t}/records/{ulid}").json()["data"]
    assert sdk["id"] == ulid and sdk["data"] == {status: "new"}
    # and back: an SDK write, read through v2 (table id in UUID form too)
    sdk_made = call(svc, "POST", f"{SDK}/tables/{t}/records", {"new_records": [{"data": {status: "sdk"}}]})
    rid = sdk_made.json()["data"][0]["new"]["id"]
    got = call(svc, "GET", f"{V2}/tables/{ulid_to_uuid(t)}/records/{ulid_to_uuid(rid)}")
    assert got.status_code == 200 and got.json()["id"] == ulid_to_uuid(rid)
    assert got.json()["data"] == {status: "sdk"}


def test_update_delete_and_get_after_delete(svc, table) -> None:
    t, status = table["id"], table["status"]
    rid = call(svc, "POST", f"{V2}/tables/{t}/records",
               {"new_records": [{"data": {status: "a"}}]}).json()["results"][0]["id"]
    upd = call(svc, "PATCH", f"{V2}/tables/{t}/records", {"updated_records": [{"id": rid, "data": {status: "b"}}]})
    assert upd.status_code == 200, upd.text
    assert upd.json()["results"][0] == call(svc, "GET", f"{V2}/tables/{t}/records/{rid}").json()
    assert upd.json()["results"][0]["data"] == {status: "b"}
    gone = call(svc, "DELETE", f"{V2}/tables/{t}/records", {"record_ids": [rid]})
    assert gone.status_code == 200, gone.text
    assert gone.json()["results"][0]["id"] == rid and gone.json()["results"][0]["deleted_at"]
    missing = call(svc, "GET", f"{V2}/tables/{t}/records/{rid}")
    assert missing.status_code == 404 and set(missing.json()) == ENVELOPE
    again = call(svc, "DELETE", f"{V2}/tables/{t}/records", {"record_ids": [rid]})
    assert again.status_code == 404 and set(again.json()) == ENVELOPE


def test_query_pages_with_next_cursor_and_links(svc, table) -> None:
    t, n = table["id"], table["n"]
    call(svc, "POST", f"{V2}/tables/{t}/records", {"new_records": [{"data": {n: i}} for i in range(5)]})
    body = {"limit": 2, "filters": [{"key": n, "operator": "gte", "value": 1}]}
    seen, url = [], f"{svc.url}{V2}/tables/{t}/records/query"
    while url:
        page = requests.post(url, json=body, headers=AUTH, timeout=10)  # follow links.next, same body
        assert page.status_code == 200, page.text
        data = page.json()
        assert data["meta"]["limit"] == 2 and set(data["links"]) == {"next", "prev"}
        seen += [r["data"][n] for r in data["results"]]
        url = data["links"]["next"]
        assert (url is None) == (data["meta"]["next_cursor"] is None)
    assert seen == [1, 2, 3, 4]
    assert data["links"]["prev"] is not None  # the last page goes back to the one before it
    back = requests.post(data["links"]["prev"], json=body, headers=AUTH, timeout=10).json()
    assert [r["data"][n] for r in back["results"]] == [1, 2] and back["links"]["prev"] is None
    first = call(svc, "POST", f"{V2}/tables/{t}/records/query", {"limit": 2}).json()
    cursor = first["meta"]["next_cursor"]
    second = call(svc, "POST", f"{V2}/tables/{t}/records/query?cursor={cursor}", {"limit": 2}).json()
    assert [r["data"][n] for r in second["results"]] == [2, 3] and second["meta"]["cursor"] == cursor
    bad = call(svc, "POST", f"{V2}/tables/{t}/records/query?cursor=nope", {"limit": 2})
    assert bad.status_code == 400 and set(bad.json()) == ENVELOPE
    ordered = call(svc, "POST", f"{V2}/tables/{t}/records/query",
                   {"limit": 3, "orders": [{"key": n, "direction": "desc"}]}).json()
    assert [r["data"][n] for r in ordered["results"]] == [4, 3, 2]


def test_refusals_use_the_documented_envelope_and_write_nothing(svc, table) -> None:
    t, n = table["id"], table["n"]
    bad = call(svc, "POST", f"{V2}/tables/{t}/records",
               {"new_records": [{"data": {n: 1}}, {"data": {n: "not a number"}}]})
    assert bad.status_code == 422 and set(bad.json()) == ENVELOPE
    err = bad.json()["errors"][0]
    assert {"title", "status", "code", "detail", "meta"} <= set(err) and err["status"] == 422
    unknown = call(svc, "POST", f"{V2}/tables/{t}/records", {"new_records": [{"data": {"f999": 1}}]})
    assert unknown.status_code == 422 and set(unknown.json()) == ENVELOPE
    options = call(svc, "POST", f"{V2}/tables/{t}/records",
                   {"new_records": [{"data": {n: 1}}], "change_options": {"on_conflict": "block"}})
    assert options.status_code == 400 and set(options.json()) == ENVELOPE  # create publishes no option
    assert call(svc, "POST", f"{V2}/tables/{t}/records/query", {}).json()["results"] == []  # all-or-nothing
    no_table = call(svc, "GET", f"{V2}/tables/{ulid_to_uuid('0' * 26)}/records/{uuid.uuid4()}")
    assert no_table.status_code == 404 and set(no_table.json()) == ENVELOPE
    noauth = requests.post(f"{svc.url}{V2}/tables/{t}/records/query", json={}, timeout=10)
    assert noauth.status_code == 401 and set(noauth.json()) == ENVELOPE
    rid = call(svc, "POST", f"{V2}/tables/{t}/records", {"new_records": [{"data": {n: 1}}]}).json()["results"][0]["id"]
    blocked = call(svc, "PATCH", f"{V2}/tables/{t}/records",
                   {"updated_records": [{"id": rid, "data": {n: 2}}], "change_options": {"on_conflict": "block"}})
    assert blocked.status_code == 200, blocked.text  # no linked records here: block has nothing to refuse


def test_idempotency_key_replays_a_finished_write_and_refuses_another_payload(svc, table) -> None:
    t, status = table["id"], table["status"]
    body = {"new_records": [{"data": {status: "once"}}]}
    first = call(svc, "POST", f"{V2}/tables/{t}/records", body, **{"Idempotency-Key": "k-1"})
    writes = svc.stats()["writes"]
    again = call(svc, "POST", f"{V2}/tables/{t}/records", body, **{"Idempotency-Key": "k-1"})
    assert again.status_code == first.status_code and again.json() == first.json()
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert svc.stats()["writes"] == writes
    found = call(svc, "POST", f"{V2}/tables/{t}/records/query", {}).json()["results"]
    assert len(found) == 1
    other = call(svc, "POST", f"{V2}/tables/{t}/records", {"new_records": [{"data": {status: "x"}}]},
                 **{"Idempotency-Key": "k-1"})
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    assert "k-1" in other.json()["detail"]
    fresh = call(svc, "POST", f"{V2}/tables/{t}/records", body, **{"Idempotency-Key": "k-2"})
    assert fresh.status_code in (200, 201) and fresh.json()["results"][0]["id"] != first.json()["results"][0]["id"]
    # a refused write is not kept: the same key may carry the corrected request
    bad = call(svc, "DELETE", f"{V2}/tables/{t}/records", {"record_ids": [str(uuid.uuid4())]},
               **{"Idempotency-Key": "k-3"})
    assert bad.status_code == 404
    rid = first.json()["results"][0]["id"]
    ok = call(svc, "DELETE", f"{V2}/tables/{t}/records", {"record_ids": [rid]}, **{"Idempotency-Key": "k-3"})
    assert ok.status_code == 200, ok.text
    # no replay for a caller without a token
    anon = requests.post(f"{svc.url}{V2}/tables/{t}/records", json=body, headers={"Idempotency-Key": "k-1"},
                         timeout=10)
    assert anon.status_code == 401


def test_request_log_shows_method_path_and_idempotency_key(svc, table) -> None:
    t, status = table["id"], table["status"]
    assert requests.delete(f"{svc.url}/_admin/requests", timeout=10).status_code == 204
    call(svc, "POST", f"{V2}/tables/{t}/records", {"new_records": [{"data": {status: "a"}}]},
         **{"Idempotency-Key": "log-1"})
    call(svc, "POST", f"{SDK}/tables/{t}/records/query", {})
    log = requests.get(f"{svc.url}/_admin/requests", timeout=10).json()["data"]
    assert [(e["method"], e["path"], e["idempotency_key"]) for e in log] == [
        ("POST", f"{V2}/tables/{t}/records", True), ("POST", f"{SDK}/tables/{t}/records/query", False)]
    requests.delete(f"{svc.url}/_admin/requests", timeout=10)
    assert requests.get(f"{svc.url}/_admin/requests", timeout=10).json()["data"] == []


@pytest.mark.parametrize("prefix", ["/trigger-inbox/api/v1/inboxes", "/trigger-inbox/v1/inboxes"])
def test_public_trigger_inbox_prefixes_share_the_inboxes_and_bounds(svc, table, prefix) -> None:
    t, status = table["id"], table["status"]
    sub = {"app_key": "TableCLIAPI@1.0.0", "action_key": "new_or_updated_record", "inputs": {"table_id": t}}
    made = call(svc, "POST", prefix, {"key": f"k-{uuid.uuid4().hex[:6]}", "subscription": sub})
    assert made.status_code in (200, 201), made.text
    inbox = made.json()["id"]
    assert call(svc, "GET", f"/api/v0/sdk/trigger-inbox/api/v1/inboxes/{inbox}").json()["id"] == inbox
    call(svc, "POST", f"{V2}/tables/{t}/records", {"new_records": [{"data": {status: str(i)}} for i in range(12)]})
    for member, value in [("lease_limit", 0), ("lease_limit", 101), ("lease_seconds", 0), ("lease_seconds", 3601)]:
        refused = call(svc, "POST", f"{prefix}/{inbox}/messages/lease", {member: value})
        assert refused.status_code == 400 and member in refused.json()["errors"][0]["detail"]
    leased = call(svc, "POST", f"{prefix}/{inbox}/messages/lease", {})
    assert leased.status_code == 200 and len(leased.json()["results"]) == 10  # default lease_limit
    acked = call(svc, "POST", f"{prefix}/{inbox}/messages/ack", {"lease_id": leased.json()["lease_id"]})
    assert acked.status_code == 200 and len(acked.json()["results"]) == 10
    assert requests.get(f"{svc.url}{prefix}", timeout=10).status_code == 401


def test_an_update_replay_answers_the_original_even_after_a_later_change(svc, table) -> None:
    t, status = table["id"], table["status"]
    rid = call(svc, "POST", f"{V2}/tables/{t}/records",
               {"new_records": [{"data": {status: "a"}}]}).json()["results"][0]["id"]
    body = {"updated_records": [{"id": rid, "data": {status: "b"}}]}
    first = call(svc, "PATCH", f"{V2}/tables/{t}/records", body, **{"Idempotency-Key": "u-1"})
    call(svc, "PATCH", f"{V2}/tables/{t}/records", {"updated_records": [{"id": rid, "data": {status: "c"}}]})
    again = call(svc, "PATCH", f"{V2}/tables/{t}/records", body, **{"Idempotency-Key": "u-1"})
    assert again.json() == first.json() and again.json()["results"][0]["data"] == {status: "b"}
    assert call(svc, "GET", f"{V2}/tables/{t}/records/{rid}").json()["data"] == {status: "c"}  # not re-applied
    other_path = call(svc, "DELETE", f"{V2}/tables/{t}/records", {"record_ids": [rid]}, **{"Idempotency-Key": "u-1"})
    assert other_path.status_code == 422 and other_path.json()["code"] == "idempotency_key_reused"


def test_injected_faults_and_rate_limit_answer_the_v2_envelope(tmp_path) -> None:
    with start_tables_service(tmp_path / "r.sqlite3", [], TOKEN, rate_limit=2, rate_window_s=60) as svc:
        t = call(svc, "POST", f"{SDK}/tables", {"name": "r"}).json()["data"]["id"]
        call(svc, "POST", f"{SDK}/tables/{t}/records/query", {})
        call(svc, "POST", f"{V2}/tables/{ulid_to_uuid(t)}/records/query", {})
        limited = call(svc, "POST", f"{V2}/tables/{t}/records/query", {})  # one limit per table, any path/form
        assert limited.status_code == 429 and set(limited.json()) == ENVELOPE and limited.headers["Retry-After"]
        armed = requests.post(f"{svc.url}/_admin/faults", json={"status": 503, "count": 1}, timeout=10)
        assert armed.status_code == 200
        fault = call(svc, "GET", f"{V2}/tables/{t}/records/{ulid_to_uuid(t)}")
        assert fault.status_code == 503 and set(fault.json()) == ENVELOPE
