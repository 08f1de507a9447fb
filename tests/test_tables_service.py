"""The local Zapier Tables stand-in over real HTTP, spoken as the real API (see
``/work/shared/reference/zapier-tables-api.md``): OAuth token endpoint, field ids, query filters/orders/
cursor paging, changesets, trash, refusals inside a 200, per-table rate limit, durability, only the fields
sent (empty cells left out),
triggers, admin, CLI.

Also holds the small test helpers (HTTP receiver, service fixtures) that ``test_zapier_tables.py`` imports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from infra.local.tables_service import TableConfig, TablesService, start_tables_service

TOKEN = "tok-" + os.urandom(8).hex()
SECRET_HEADER = "X-Zsync-Secret"
SECRET = "shh-" + os.urandom(4).hex()
CLIENT_ID = "svc-test"
CLIENT_SECRET = "cs-" + os.urandom(8).hex()
JOBS = "agent_jobs"  # table name: triggers the receiver
AUDIT = "audit_log"  # table name: no trigger
API = "/api/v0/sdk/tables/api/v1"
FIELDS = {
    JOBS: {"id": "string", "job_type": "string", "status": "string", "retry_count": "number", "ok": "boolean",
           "parameters": "json", "tags": "multiple_string", "created_at": "datetime", "updated_at": "datetime"},
    AUDIT: {"n": "number", "parity": "string", "flag": "boolean", "action": "string", "worker": "number",
            "i": "number", "when": "datetime", "note": "string"},
}
ULID = re.compile(r"^[0-9A-Z]{26}$")
AUTOREPLAY = (0.2, 0.4, 0.8)
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
REPO = Path(__file__).resolve().parents[1]


# --- helpers shared with test_zapier_tables.py -----------------------------------------------------------


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class Receiver:
    """A real HTTP server on a free port that records requests and answers scripted statuses.

    Created with ``listen=False`` its port is reserved (bound) but refuses connections until
    :meth:`start`, which lets a test take a receiver "down" and bring it up on the same port.
    """

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.statuses: deque[int] = deque()  # answered first, then 200
        self.delay_s = 0.0
        self._cond = threading.Condition()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Receiver:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self), bind_and_activate=False)
        server.socket.close()
        server.socket = self._sock
        server.server_activate()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._thread.join()  # type: ignore[union-attr]
        self._sock.close()

    def record(self, received: Received) -> int:
        with self._cond:
            self.requests.append(received)
            self._cond.notify_all()
            return self.statuses.popleft() if self.statuses else 200

    def wait_for(self, n: int, timeout_s: float = 5.0) -> list[Received]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.requests) >= n, timeout=timeout_s), self.requests
            return list(self.requests)


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status = receiver.record(
                Received("POST", self.path, dict(self.headers.items()), json.loads(raw or b"null"))
            )
            time.sleep(receiver.delay_s)
            body = json.dumps({"status": "success" if status < 300 else "error"}).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up (read timeout tests)
                self.close_connection = True

        do_GET = do_POST
        do_PATCH = do_POST

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def start_service(db: Path, trigger_url: str | None, **kwargs: Any) -> TablesService:
    tables = [TableConfig(JOBS, trigger_url), TableConfig(AUDIT, None)]
    kwargs.setdefault("autoreplay", AUTOREPLAY)
    kwargs.setdefault("delivery_timeout_s", 2.0)
    kwargs.setdefault("client_id", CLIENT_ID)
    kwargs.setdefault("client_secret", CLIENT_SECRET)
    return start_tables_service(db, tables, TOKEN, SECRET_HEADER, SECRET, **kwargs)


class Api:
    """Raw requests against the service, in the real API's shapes. ``ids``: table name -> ULID;
    ``keys``: table name -> {field name: "f<n>"}. Bodies are written by field name and translated here."""

    def __init__(self, url: str, token: str = TOKEN) -> None:
        self.url = url
        self.token = token
        self.ids: dict[str, str] = {}
        self.keys: dict[str, dict[str, str]] = {}

    def setup(self) -> Api:
        """Make both test tables (or find them after a restart) with their typed fields, through the API."""
        existing = {t["name"]: t["id"] for t in self.call("GET", "/tables").json()["data"]}
        for name, fields in FIELDS.items():
            tid = existing.get(name) or self.call("POST", "/tables", {"name": name}).json()["data"]["id"]
            self.ids[name] = tid
            have = {f["name"] for f in self.call("GET", f"/tables/{tid}/fields").json()["data"]}
            new = [{"name": n, "type": t, "options": {}, "config": {}} for n, t in fields.items() if n not in have]
            if new:
                assert self.call("POST", f"/tables/{tid}/fields", {"new_fields": new}).status_code == 201
            listed = self.call("GET", f"/tables/{tid}/fields").json()["data"]
            self.keys[name] = {f["name"]: f"f{f['id']}" for f in listed}
        return self

    def call(self, method: str, path: str, body: Any = None, params: dict | None = None,
             token: str | None = None) -> requests.Response:
        return requests.request(method, self.url + API + path, json=body, params=params,
                                headers=auth(token or self.token), timeout=10)

    def records(self, table: str = JOBS) -> str:
        return f"{self.url}{API}/tables/{self.ids[table]}/records"

    def enc(self, table: str, data: dict[str, Any]) -> dict[str, Any]:
        return {self.keys[table].get(k, k): v for k, v in data.items()}

    def dec(self, table: str, record: dict[str, Any]) -> dict[str, Any]:
        names = {v: k for k, v in self.keys[table].items()}
        return record | {"data": {names.get(k, k): v for k, v in record["data"].items()}}

    def create(self, rows: list[dict[str, Any]], table: str = JOBS) -> requests.Response:
        return requests.post(self.records(table), json={"new_records": [{"data": self.enc(table, r)} for r in rows]},
                             headers=auth(self.token), timeout=10)

    def new(self, data: dict[str, Any], table: str = JOBS) -> dict[str, Any]:
        """Create one record; the decoded ``new`` record."""
        r = self.create([data], table)
        assert r.status_code == 201, r.text
        return self.dec(table, r.json()["data"][0]["new"])

    def update(self, updates: list[tuple[str, dict[str, Any]]], table: str = JOBS) -> requests.Response:
        body = {"updated_records": [{"id": rid, "data": self.enc(table, d)} for rid, d in updates]}
        return requests.patch(self.records(table), json=body, headers=auth(self.token), timeout=10)

    def change(self, rid: str, data: dict[str, Any], table: str = JOBS) -> dict[str, Any]:
        r = self.update([(rid, data)], table)
        assert r.status_code == 200, r.text
        return self.dec(table, r.json()["data"][0]["new"])

    def get(self, rid: str, table: str = JOBS) -> requests.Response:
        return requests.get(f"{self.records(table)}/{rid}", headers=auth(self.token), timeout=10)

    def delete(self, rids: list[str], table: str = JOBS) -> requests.Response:
        return requests.delete(self.records(table), json={"record_ids": rids}, headers=auth(self.token), timeout=10)

    def query(self, table: str = JOBS, filters: list[tuple[str, str, Any]] = (), orders: list[tuple[str, str]] = (),
              limit: int | None = None, cursor: str | None = None, trash: str | None = None,
              raw: dict | None = None) -> requests.Response:
        body: dict[str, Any] = {}
        if limit is not None:
            body["limit"] = limit
        if filters:
            body["filters"] = [{"key": self.keys[table][k], "operator": op, "value": v} for k, op, v in filters]
        if orders:
            body["orders"] = [{"key": self.keys[table][k], "direction": d} for k, d in orders]
        if cursor:
            body["cursor_query"] = {"query_type": "window", "start_cursor": cursor}
        params = {"allow_nested_queries": "true"} | ({"trash": trash} if trash else {})
        return requests.post(self.records(table) + "/query", json=raw if raw is not None else body, params=params,
                             headers=auth(self.token), timeout=10)

    def found(self, table: str = JOBS, **kw: Any) -> list[dict[str, Any]]:
        r = self.query(table, **kw)
        assert r.status_code == 200 and not r.json()["meta"].get("errors"), r.text
        return [self.dec(table, rec)["data"] for rec in r.json()["data"]]

    def admin(self, method: str, path: str, body: Any = None) -> requests.Response:
        return requests.request(method, f"{self.url}/_admin/{path}", json=body, timeout=15)

    def stats(self) -> dict[str, Any]:
        return self.admin("GET", "stats").json()

    def writes(self, table: str) -> int:
        return self.stats()["writes"].get(self.ids[table], 0)

    def flush(self) -> None:
        assert self.admin("POST", "triggers/flush", {"timeout": 10}).json()["flushed"]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def service(tmp_path: Path, receiver: Receiver) -> Iterator[TablesService]:
    svc = start_service(tmp_path / "tables.db", receiver.url + "/hook/agent_jobs")
    yield svc
    svc.stop()


@pytest.fixture
def api(service: TablesService) -> Api:
    return Api(service.url).setup()


# --- auth: OAuth client credentials ------------------------------------------------------------------------


def test_token_endpoint_issues_tokens_and_refuses_wrong_credentials(service: TablesService) -> None:
    form = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
            "scope": "external", "audience": "zapier.com"}
    ok = requests.post(service.url + "/oauth/token/", data=form, timeout=5)
    assert ok.status_code == 200
    token = ok.json()["access_token"]
    assert ok.json()["expires_in"] > 0 and ok.json()["token_type"] == "Bearer"
    assert Api(service.url, token).call("GET", "/tables").status_code == 200
    for bad in ({"client_secret": "wrong"}, {"client_id": "someone-else"}):
        refused = requests.post(service.url + "/oauth/token/", data=form | bad, timeout=5)
        assert refused.status_code == 401 and refused.json()["error"] == "invalid_client"
        assert CLIENT_SECRET not in refused.text
    assert requests.post(service.url + "/oauth/token/", data=form | {"grant_type": "password"},
                         timeout=5).status_code == 400


def test_expired_token_is_401(tmp_path: Path) -> None:
    with start_service(tmp_path / "t.db", None, token_ttl_s=1) as svc:
        form = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
        token = requests.post(svc.url + "/oauth/token/", data=form, timeout=5).json()["access_token"]
        assert Api(svc.url, token).call("GET", "/tables").status_code == 200
        time.sleep(1.2)
        expired = Api(svc.url, token).call("GET", "/tables")
        assert expired.status_code == 401 and expired.headers["WWW-Authenticate"] == "Bearer"


def test_auth_required_and_token_never_echoed(api: Api) -> None:
    for headers in ({}, auth("wrong"), {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
        r = requests.post(api.records() + "/query", json={}, headers=headers, timeout=5)
        assert r.status_code == 401
        assert r.json()["error"] and TOKEN not in r.text
    assert api.admin("GET", "health").json() == {"ok": True}  # admin needs no token


# --- tables and fields ------------------------------------------------------------------------------------


def test_tables_and_typed_fields(api: Api) -> None:
    tables = api.call("GET", "/tables").json()
    assert {t["name"]: t["id"] for t in tables["data"]} == api.ids and tables["links"]["next"] is None
    assert all(ULID.match(t) for t in api.ids.values())
    fields = api.call("GET", f"/tables/{api.ids[JOBS]}/fields").json()["data"]
    assert {f["name"]: f["type"] for f in fields} == FIELDS[JOBS]
    assert all(isinstance(f["id"], int) for f in fields)
    dup = api.call("POST", f"/tables/{api.ids[JOBS]}/fields", {"new_fields": [{"name": "status", "type": "string"}]})
    assert dup.status_code == 400 and "already exists" in dup.json()["error"]
    bad = api.call("POST", f"/tables/{api.ids[JOBS]}/fields", {"new_fields": [{"name": "x", "type": "blob"}]})
    assert bad.status_code == 400 and "not a supported field type" in bad.json()["error"]
    assert api.call("GET", "/tables", params={"q": "audit"}).json()["data"][0]["name"] == AUDIT


# --- CRUD, changesets, trash -------------------------------------------------------------------------------


def test_create_get_update_delete_with_changesets_and_trash(api: Api) -> None:
    r = api.create([{"id": "test-job-001", "job_type": "discovery", "status": "queued",
                     "parameters": {"metro": "Austin"}, "tags": ["a", "b"], "retry_count": 2, "ok": True}])
    assert r.status_code == 201
    change = r.json()["data"][0]
    assert set(change) == {"change_id", "old", "new", "changed_field_ids", "record_id"} and change["old"] is None
    rec = change["new"]
    assert ULID.match(rec["id"]) and change["record_id"] == rec["id"]
    assert set(rec) >= {"id", "data", "created_at", "edited_at", "schema_revision_id"}
    assert all(ULID.match(k) is None and re.match(r"^f\d+$", k) for k in rec["data"])  # keyed by field id
    data = api.dec(JOBS, rec)["data"]
    assert data["parameters"] == {"metro": "Austin"} and data["tags"] == ["a", "b"] and data["retry_count"] == 2
    assert data["ok"] is True

    assert api.get(rec["id"]).json()["data"] == rec
    time.sleep(0.002)
    patched = api.update([(rec["id"], {"status": "running"})])
    assert patched.status_code == 200
    ch = patched.json()["data"][0]
    assert ch["old"]["data"] == rec["data"] and ch["changed_field_ids"]
    assert int(api.keys[JOBS]["status"][1:]) in ch["changed_field_ids"]
    new = api.dec(JOBS, ch["new"])
    assert new["data"]["status"] == "running" and new["data"]["job_type"] == "discovery"
    assert new["created_at"] == rec["created_at"] and new["edited_at"] > rec["edited_at"]

    assert api.delete([rec["id"]]).status_code == 204
    gone = api.get(rec["id"])  # a GET by id still shows a trashed record, with deleted_at
    assert gone.status_code == 200 and gone.json()["data"]["deleted_at"]
    assert api.found(filters=[("id", "exact", "test-job-001")]) == []
    trashed = api.found(filters=[("id", "exact", "test-job-001")], trash="only")
    assert [t["status"] for t in trashed] == ["running"]
    assert len(api.found(trash="include")) == 1
    assert api.update([(rec["id"], {"status": "x"})]).status_code == 404  # a trashed record is not updated
    assert api.delete([rec["id"]]).status_code == 404


def test_not_found_and_malformed_ids(api: Api) -> None:
    nope = "01HZZZZZZZZZZZZZZZZZZZZZZZ"
    assert api.call("POST", f"/tables/{nope}/records/query", {}).status_code == 404
    assert api.call("POST", f"/tables/{nope}/records", {"new_records": [{"data": {}}]}).status_code == 404
    assert api.call("GET", "/tables/bad.table/fields").status_code == 404
    assert api.get(nope).status_code == 404
    assert api.get("bad id!").status_code == 404
    assert api.update([(nope, {"status": "1"})]).status_code == 404
    assert api.delete([nope]).status_code == 404
    unsupported = requests.put(api.records(), headers=auth(), timeout=5)
    assert unsupported.status_code in (404, 405) and unsupported.json()["error"]
    assert api.call("GET", "/nothing").status_code == 404 and api.call("GET", "/nothing").json()["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON"),
        (b'{"new_records": [{"data": {"f1": NaN}}]}', "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"new_records": []}', "1 to 100"),
        (b'{"records": [{"data": {}}]}', "new_records must be a list"),
        (b'{"new_records": [{"fields": {}}]}', "new_records[0] must be"),
    ],
)
def test_bad_create_bodies_are_400(api: Api, body: bytes, message: str) -> None:
    r = requests.post(api.records(), data=body, headers=auth() | {"Content-Type": "application/json"}, timeout=5)
    assert r.status_code == 400
    assert message in r.json()["error"]


def test_bad_queries_and_updates_are_400(api: Api) -> None:
    rid = api.new({"id": "q"})["id"]
    status = api.keys[JOBS]["status"]
    for body in (
        {"limit": 0},
        {"limit": 1001},
        {"limit": "x"},
        {"cursor_query": {"query_type": "window", "start_cursor": "%%%"}},
        {"filters": [{"key": status, "operator": "like", "value": "x"}]},
        {"filters": [{"key": status, "operator": "in", "value": "not-a-list"}]},
        {"filters": "status=x"},
        {"orders": [{"key": status, "direction": "sideways"}]},
    ):
        assert api.query(raw=body).status_code == 400, body
    assert api.call("PATCH", f"/tables/{api.ids[JOBS]}/records", {"updated_records": [{"id": rid}]}).status_code == 400
    assert api.update([(rid, {})] * 101).status_code == 400
    assert api.create([{"n": i} for i in range(101)], AUDIT).status_code == 400
    assert api.delete([]).status_code == 400


def test_body_over_limit_is_413(api: Api) -> None:
    r = api.create([{"status": "x" * (1024 * 1024 + 10)}])
    assert r.status_code == 413 and "larger than" in r.json()["error"]


# --- refusals inside a 200 ---------------------------------------------------------------------------------


def test_values_of_the_wrong_type_are_refused_per_record(api: Api) -> None:
    r = api.create([{"id": "typed", "retry_count": "lots", "ok": "yes", "status": "fine"}])
    assert r.status_code == 201
    rec = r.json()["data"][0]["new"]
    count_key, ok_key = api.keys[JOBS]["retry_count"], api.keys[JOBS]["ok"]
    assert set(rec["errors"]) == {count_key, ok_key}
    assert rec["errors"][count_key]["s"] == "error" and "not a number" in rec["errors"][count_key]["e"]
    assert rec["errors"][count_key]["h"].startswith("retry_count:") and rec["errors"][count_key]["v"] == "lots"
    data = api.dec(JOBS, rec)["data"]
    assert "retry_count" not in data and "ok" not in data and data["status"] == "fine"  # the rest is kept
    fixed = api.update([(rec["id"], {"retry_count": 3})]).json()["data"][0]["new"]
    assert "errors" not in fixed and api.dec(JOBS, fixed)["data"]["retry_count"] == 3


def test_unknown_field_id_refuses_the_whole_request_in_a_200(api: Api) -> None:
    before = api.writes(JOBS)
    r = requests.post(api.records(), json={"new_records": [{"data": {api.keys[JOBS]["id"]: "a"}},
                                                           {"data": {"f999": "b"}}]}, headers=auth(), timeout=5)
    assert r.status_code == 200 and r.json()["data"] == []
    (error,) = r.json()["meta"]["errors"]
    assert "f999" in error["title"] and error["human_title"]
    assert api.found() == [] and api.writes(JOBS) == before  # nothing written, not even the valid record
    q = api.query(raw={"filters": [{"key": "f999", "operator": "exact", "value": "x"}]})
    assert q.status_code == 200 and q.json()["meta"]["errors"] and q.json()["data"] == []


# --- query: filters, orders, cursor paging ------------------------------------------------------------------


def _fill_audit(api: Api, n: int = 260) -> None:
    for start in range(0, n, 100):
        rows = [{"n": i, "parity": "even" if i % 2 == 0 else "odd", "flag": i % 10 == 0,
                 "when": f"2025-12-{1 + i % 28:02d}T10:00:00Z", "note": None if i % 3 else "third"}
                for i in range(start, min(start + 100, n))]
        r = api.create(rows, AUDIT)
        assert r.status_code == 201 and len(r.json()["data"]) == len(rows)


def test_cursor_paging_in_creation_order(api: Api) -> None:
    _fill_audit(api)
    seen, cursor, pages = [], None, 0
    while True:
        page = api.query(AUDIT, limit=100, cursor=cursor).json()
        seen += [api.dec(AUDIT, rec)["data"]["n"] for rec in page["data"]]
        pages += 1
        pagination = page["meta"]["pagination"]
        assert pagination["has_less"] == (cursor is not None)
        if not pagination["has_more"]:
            break
        cursor = pagination["end_cursor"]
    assert seen == list(range(260)) and pages == 3
    assert len(api.found(AUDIT)) == 100  # default page size


def test_query_filters(api: Api) -> None:
    _fill_audit(api)

    def ns(*filters: tuple[str, str, Any], **kw: Any) -> list[int]:
        return [d["n"] for d in api.found(AUDIT, filters=list(filters), limit=1000, **kw)]

    assert ns(("parity", "exact", "even")) == list(range(0, 260, 2))
    assert ns(("parity", "exact", "even"), ("flag", "exact", True)) == list(range(0, 260, 10))
    assert ns(("n", "exact", 7)) == [7] and ns(("n", "exact", "7")) == [7] and ns(("n", "exact", 7.0)) == [7]
    assert ns(("n", "in", [3, 5, 999])) == [3, 5]
    assert ns(("n", "gte", 250)) == list(range(250, 260))
    assert ns(("n", "lte", 2)) == [0, 1, 2]
    assert ns(("n", "gt", 100), ("n", "lt", 104)) == [101, 102, 103]
    assert ns(("when", "gte", "2025-12-28T00:00:00Z")) == [i for i in range(260) if i % 28 == 27]
    assert ns(("note", "isnull", False)) == list(range(0, 260, 3))
    assert ns(("note", "isnull", True)) == [i for i in range(260) if i % 3]
    assert ns(("parity", "different", "even"), ("n", "lt", 6)) == [1, 3, 5]
    assert ns(("parity", "startswith", "ev"), ("n", "lt", 3)) == [0, 2]
    assert ns(("parity", "icontains", "DD"), ("n", "lt", 4)) == [1, 3]
    assert ns(("parity", "exact", "nothing")) == []
    # paging with a filter follows the cursor too
    first = api.query(AUDIT, filters=[("parity", "exact", "odd")], limit=100).json()
    rest = api.query(AUDIT, filters=[("parity", "exact", "odd")], limit=100,
                     cursor=first["meta"]["pagination"]["end_cursor"]).json()
    got = [api.dec(AUDIT, r)["data"]["n"] for r in first["data"] + rest["data"]]
    assert got == list(range(1, 260, 2)) and len(first["data"]) == 100
    assert first["meta"]["pagination"]["has_more"] is True and rest["meta"]["pagination"]["has_more"] is False


def test_query_orders(api: Api) -> None:
    _fill_audit(api, 30)
    desc = [d["n"] for d in api.found(AUDIT, orders=[("n", "desc")], limit=5)]
    assert desc == [29, 28, 27, 26, 25]
    by_parity = api.found(AUDIT, orders=[("parity", "asc"), ("n", "desc")], limit=1000)
    assert [d["n"] for d in by_parity] == list(range(28, -1, -2)) + list(range(29, 0, -2))
    first = api.query(AUDIT, orders=[("n", "desc")], limit=10).json()
    second = api.query(AUDIT, orders=[("n", "desc")], limit=10, cursor=first["meta"]["pagination"]["end_cursor"])
    assert [api.dec(AUDIT, r)["data"]["n"] for r in second.json()["data"]] == list(range(19, 9, -1))


def test_an_exact_find_costs_the_same_at_20000_records_as_at_10(tmp_path: Path) -> None:
    """``exact`` and ``in`` go through the value index: the records read per find stay flat with size."""
    with start_service(tmp_path / "big.db", None, rate_limit=None) as svc:
        api = Api(svc.url).setup()
        engine, audit = svc.ctx.engine, api.ids[AUDIT]
        n_key, note_key = api.keys[AUDIT]["n"], api.keys[AUDIT]["note"]

        def rows_read_by_find(value: int) -> int:
            api.admin("POST", "stats/reset")
            assert [d["n"] for d in api.found(AUDIT, filters=[("n", "exact", value)])] == [value]
            return api.stats()["query_rows_read"]

        engine.create_many(audit, [{n_key: i, note_key: "x"} for i in range(10)])
        small = rows_read_by_find(5)
        for start in range(10, 20_000, 1000):  # the service's own engine: fast setup, same storage and index
            engine.create_many(audit, [{n_key: i, note_key: "x"} for i in range(start, min(start + 1000, 20_000))])
        big = rows_read_by_find(19_999)
        assert small == big == 1
        api.admin("POST", "stats/reset")
        assert len(api.found(AUDIT, filters=[("n", "in", [1, 10_000, 19_998])])) == 3
        assert api.stats()["query_rows_read"] == 3
        # an unindexed filter scans (what the index saves)
        api.admin("POST", "stats/reset")
        assert len(api.found(AUDIT, filters=[("note", "startswith", "nothing")])) == 0
        assert api.stats()["query_rows_read"] == 20_000


# --- batches ----------------------------------------------------------------------------------------------


def test_batch_update_is_atomic(api: Api) -> None:
    a, b = (api.new({"status": "old"})["id"] for _ in range(2))
    ok = api.update([(a, {"status": "new"}), (b, {"retry_count": 1})])
    assert ok.status_code == 200
    first, second = (api.dec(JOBS, c["new"])["data"] for c in ok.json()["data"])
    assert first["status"] == "new" and second["retry_count"] == 1
    bad = api.update([(a, {"status": "newer"}), ("01HZZZZZZZZZZZZZZZZZZZZZZZ", {})])
    assert bad.status_code == 404
    assert api.dec(JOBS, api.get(a).json()["data"])["data"]["status"] == "new"


def test_concurrent_writes_are_all_kept(api: Api) -> None:
    def write(worker: int) -> list[str]:
        return [api.new({"worker": worker, "i": i}, AUDIT)["id"] for i in range(10)]

    with ThreadPoolExecutor(8) as pool:
        ids = [rid for chunk in pool.map(write, range(8)) for rid in chunk]
    assert len(set(ids)) == 80
    assert len(api.found(AUDIT, limit=1000)) == 80
    assert api.writes(AUDIT) == 80


# --- rate limit -------------------------------------------------------------------------------------------


def test_rate_limit_per_table_answers_429_with_retry_after(tmp_path: Path) -> None:
    with start_service(tmp_path / "rl.db", None, rate_limit=5, rate_window_s=1.0) as svc:
        api = Api(svc.url).setup()
        time.sleep(1.05)  # setup's own requests leave the window
        answers = [api.query(AUDIT).status_code for _ in range(7)]
        assert answers[:5] == [200] * 5 and answers[5:] == [429, 429]
        limited = api.query(AUDIT)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) == 1
        assert "rate limit" in limited.json()["error"] and limited.headers["X-RateLimit-Limit"] == "5"
        assert api.query(JOBS).status_code == 200  # the limit is per table
        time.sleep(int(limited.headers["Retry-After"]) + 0.1)
        assert api.query(AUDIT).status_code == 200


# --- durability -------------------------------------------------------------------------------------------


def test_records_survive_a_restart_on_the_same_file(tmp_path: Path) -> None:
    db = tmp_path / "state" / "tables.db"
    with start_service(db, None) as first:
        api = Api(first.url).setup()
        made = [api.create([{"n": i}], AUDIT).json()["data"][0]["new"] for i in range(5)]
        ids, keys = dict(api.ids), dict(api.keys)
        api.delete([made[0]["id"]], AUDIT)
    with start_service(db, None) as second:
        api = Api(second.url).setup()
        assert api.ids == ids and api.keys == keys  # tables and field ids kept
        assert api.query(AUDIT).json()["data"] == made[1:]
        assert [d["n"] for d in api.found(AUDIT, trash="only")] == [0]  # the trash too
        api.create([{"n": 5}], AUDIT)
        assert [d["n"] for d in api.found(AUDIT)] == list(range(1, 6))
        assert [d["n"] for d in api.found(AUDIT, filters=[("n", "exact", 3)])] == [3]  # the index too
    assert db.exists()


# --- only the fields sent; empty cells left out ----------------------------------------------------------


def test_writes_store_only_the_fields_sent_and_leave_empty_cells_out(api: Api) -> None:
    """Like Zapier: no ``created_at`` / ``updated_at`` field is filled in (``edited_at`` is Zapier's own
    metadata), and an empty cell (null, "", []) is not in ``data``."""
    plain = api.new({"id": "j1", "status": "queued"})
    assert plain["data"] == {"id": "j1", "status": "queued"}
    assert ISO_Z.match(plain["created_at"]) and ISO_Z.match(plain["edited_at"])  # system metadata always

    given = {"id": "j2", "created_at": "2025-12-22T10:00:00Z", "updated_at": "2025-12-22T10:00:01Z"}
    rec = api.new(given)
    assert rec["data"] == given  # given values are kept exactly

    blank = api.new({"id": "j3", "created_at": None, "job_type": "", "tags": [], "ok": False, "retry_count": 0})
    assert blank["data"] == {"id": "j3", "ok": False, "retry_count": 0}  # false and 0 are values

    changed = api.change(rec["id"], {"status": "running"})
    assert changed["data"] == given | {"status": "running"}  # updated_at not advanced
    assert changed["edited_at"] > rec["edited_at"]
    emptied = api.update([(rec["id"], {"status": None, "created_at": ""})])
    assert emptied.json()["data"][0]["changed_field_ids"] == sorted(
        int(api.keys[JOBS][k][1:]) for k in ("status", "created_at"))
    assert api.dec(JOBS, emptied.json()["data"][0]["new"])["data"] == {"id": "j2", "updated_at": given["updated_at"]}
    assert api.dec(JOBS, api.get(rec["id"]).json()["data"])["data"] == {"id": "j2", "updated_at": given["updated_at"]}
    assert sorted(d["id"] for d in api.found(filters=[("status", "isnull", True)])) == ["j2", "j3"]
    same = api.update([(blank["id"], {"job_type": None})]).json()["data"][0]
    assert same["changed_field_ids"] == [] and same["new"]["edited_at"] == blank["edited_at"]  # no change

    audit = api.new({"action": "x"}, AUDIT)
    assert audit["data"] == {"action": "x"}


# --- triggers ---------------------------------------------------------------------------------------------


def test_trigger_delivers_fields_by_name_with_id_edited_at_and_secret(api: Api, receiver: Receiver) -> None:
    with_id = api.new({"id": "job-1", "status": "queued", "parameters": {"a": [1]}, "tags": ["x"]})
    without_id = api.new({"status": "queued"})
    got = {r.body["id"]: r for r in receiver.wait_for(2)}
    assert set(got) == {"job-1", without_id["id"]}
    first = got["job-1"]
    assert first.path == "/hook/agent_jobs" and first.method == "POST"
    assert first.headers[SECRET_HEADER] == SECRET
    assert first.headers["Content-Type"] == "application/json"
    assert first.body == with_id["data"] | {"edited_at": with_id["edited_at"]}  # typed values, by field name
    assert got[without_id["id"]].body == without_id["data"] | {"id": without_id["id"],
                                                               "edited_at": without_id["edited_at"]}
    api.flush()
    expected = {"sent": 2, "failed": 0, "pending": 0, "attempts": 0, "dropped": 0}
    assert api.stats()["deliveries"] | {"attempts": 0} == expected


def test_noop_update_writes_and_sends_nothing(api: Api, receiver: Receiver) -> None:
    rec = api.new({"id": "job-2", "status": "queued"})
    api.flush()
    before = api.writes(JOBS)
    same = api.update([(rec["id"], {"status": "queued"})]).json()["data"][0]
    assert same["changed_field_ids"] == [] and api.dec(JOBS, same["new"]) == rec
    api.flush()
    assert len(receiver.requests) == 1
    assert api.writes(JOBS) == before

    api.change(rec["id"], {"status": "running"})
    api.flush()
    assert [r.body["status"] for r in receiver.requests] == ["queued", "running"]
    assert api.writes(JOBS) == before + 1


def test_autoreplay_after_receiver_comes_up(api: Api) -> None:
    down = Receiver()  # port reserved, refuses connections
    try:
        assert api.admin("PUT", f"tables/{api.ids[JOBS]}/trigger", {"url": down.url + "/late"}).status_code == 200
        rid = api.new({"id": "job-3"})["id"]
        deadline = time.monotonic() + 5
        while not [d for d in api.admin("GET", "deliveries").json()["data"] if d["record_id"] == rid]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        first = api.admin("GET", "deliveries").json()["data"][0]
        assert first["ok"] is False and first["status"] is None and first["error"] and first["attempt"] == 1
        down.start()
        api.flush()
        assert [r.body["id"] for r in down.wait_for(1)] == ["job-3"]
        outcomes = api.admin("GET", "deliveries").json()["data"]
        assert outcomes[-1]["ok"] is True and outcomes[-1]["attempt"] >= 2 and outcomes[-1]["status"] == 200
        assert api.stats()["deliveries"]["sent"] == 1
    finally:
        down.stop()


def test_replay_on_5xx_but_not_on_4xx_and_gives_up(api: Api, receiver: Receiver) -> None:
    receiver.statuses.extend([503, 429])
    api.new({"id": "job-4"})
    api.flush()
    assert [r.body["id"] for r in receiver.requests] == ["job-4"] * 3
    receiver.statuses.extend([400])
    api.new({"id": "job-5"})
    api.flush()
    assert [r.body["id"] for r in receiver.requests].count("job-5") == 1
    receiver.statuses.extend([500] * 4)
    api.new({"id": "job-6"})
    api.flush()
    assert [r.body["id"] for r in receiver.requests].count("job-6") == 1 + len(AUTOREPLAY)
    expected = {"sent": 1, "failed": 2, "pending": 0, "attempts": 0, "dropped": 0}
    assert api.stats()["deliveries"] | {"attempts": 0} == expected


def test_without_autoreplay_a_failed_delivery_is_not_retried(tmp_path: Path, receiver: Receiver) -> None:
    receiver.statuses.append(503)
    with start_service(tmp_path / "t.db", receiver.url, autoreplay=()) as svc:
        api = Api(svc.url).setup()
        api.new({"id": "job-7"})
        api.flush()
        assert len(receiver.requests) == 1 and api.stats()["deliveries"]["failed"] == 1


def test_trigger_can_be_pointed_elsewhere_or_off(api: Api, receiver: Receiver) -> None:
    assert api.admin("PUT", f"tables/{api.ids[JOBS]}/trigger", {"url": None}).status_code == 200
    api.new({"id": "job-8"})
    api.flush()
    assert receiver.requests == []
    assert api.admin("PUT", f"tables/{api.ids[JOBS]}/trigger", {"url": "ftp://x"}).status_code == 400
    assert api.admin("PUT", "tables/01HZZZZZZZZZZZZZZZZZZZZZZZ/trigger", {"url": None}).status_code == 404


# --- admin ------------------------------------------------------------------------------------------------


def test_writes_that_keep_the_version_are_counted(api: Api) -> None:
    """``same_version_writes``: updates that left ``updated_at`` where it was (the soak's Tables echo count)."""
    rec = api.new({"id": "job-3", "status": "queued", "updated_at": "2030-01-01T00:00:00Z"})
    api.admin("POST", "stats/reset")
    api.update([(rec["id"], {"status": "queued"})])  # nothing changed: the same version written again
    api.change(rec["id"], {"status": "x", "updated_at": "2030-01-01T00:00:00.000Z"})  # same time, other format
    api.change(rec["id"], {"status": "y", "updated_at": "2030-01-01T00:00:01Z"})  # a new version
    api.change(rec["id"], {"status": "z"})  # no updated_at sent: nothing stamps one, the version stays (one)
    api.new({"id": "job-4", "updated_at": "2030-01-01T00:00:00Z"})  # a create is never one
    assert api.stats()["same_version_writes"] == {api.ids[JOBS]: 3}


def test_fault_injection_and_stats(api: Api) -> None:
    api.admin("POST", "stats/reset")
    assert api.admin("POST", "faults", {"status": 429, "count": 2, "retry_after": 7}).status_code == 200
    first = api.create([{"status": "1"}])
    assert first.status_code == 429 and first.headers["Retry-After"] == "7" and first.json()["error"]
    assert api.query().status_code == 429
    assert api.create([{"status": "1"}]).status_code == 201
    api.admin("POST", "faults", {"status": 503, "count": 5})
    assert api.query().status_code == 503
    assert api.admin("DELETE", "faults").status_code == 204
    assert api.query().status_code == 200
    stats = api.stats()
    assert stats["api_requests"] == 5 and stats["writes"] == {api.ids[JOBS]: 1}
    assert api.admin("POST", "faults", {"status": "x", "count": 1}).status_code == 400
    assert api.admin("POST", "stats/reset").status_code == 204
    assert api.stats()["api_requests"] == 0


def test_timed_and_hanging_faults(api: Api) -> None:
    """``for_s``: every request fails for that long, then none; ``hang_s``: the answer comes that late."""
    assert api.admin("POST", "faults", {"status": 503, "count": 0, "for_s": 1.0}).status_code == 200
    assert [api.query().status_code for _ in range(3)] == [503, 503, 503]
    time.sleep(1.1)
    assert api.query().status_code == 200
    api.admin("POST", "faults", {"status": 503, "count": 0, "for_s": 5, "hang_s": 0.5})
    started = time.monotonic()
    assert api.query().status_code == 503 and time.monotonic() - started >= 0.5
    api.admin("DELETE", "faults")
    assert api.query().status_code == 200
    assert api.admin("POST", "faults", {"status": 503, "count": 0, "for_s": -1}).status_code == 400


def test_dropped_trigger_deliveries_are_failed_attempts(service: TablesService, api: Api,
                                                        receiver: Receiver) -> None:
    """``drop_share = 1``: nothing reaches the Zap's URL, each attempt is recorded as dropped."""
    service.ctx.dispatcher.drop_share = 1.0
    assert api.create([{"status": "1"}]).status_code == 201
    assert service.ctx.dispatcher.wait_idle(10)
    deliveries = service.stats()["deliveries"]  # every attempt (Autoreplay's too) lost, then given up
    assert deliveries["dropped"] == deliveries["attempts"] >= 1 and deliveries["failed"] == 1
    assert receiver.requests == []


def test_stop_is_clean_and_idempotent(tmp_path: Path) -> None:
    svc = start_service(tmp_path / "t.db", None)
    url = svc.url
    svc.stop()
    svc.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/_admin/health", timeout=2)


def test_cli_runs_until_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"token": TOKEN, "client_secret": CLIENT_SECRET, "client_id": CLIENT_ID,
                                  "tables": [{"name": "agent_jobs"}]}))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infra.local.tables_service",
            "--db",
            str(tmp_path / "cli.db"),
            "--config",
            str(config),
            "--port",
            "0",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)  # type: ignore[union-attr]
        api = Api(url).setup()
        assert api.create([{"id": "cli-1"}]).status_code == 201
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("config", [{"tables": "nope"}, {"tables": [], "client_secret": ""},
                                    {"tables": [{"name": "x", "table_id": "tbl_old"}], "client_secret": "s"},
                                    {"tables": [{"name": "x", "stamp_updated_at": True}], "client_secret": "s"}])
def test_cli_rejects_a_bad_config(tmp_path: Path, config: dict) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k != "ZSYNC_ZAPIER_CLIENT_SECRET"}
    done = subprocess.run(
        [sys.executable, "-m", "infra.local.tables_service", "--db", str(tmp_path / "x.db"), "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert done.returncode == 2 and "bad config" in done.stderr


def test_restore_from_the_trash_empty_trash_and_a_refused_delete(api: Api, receiver: Receiver) -> None:
    """A person's restore (live again, edited_at the restore time, the trigger fires), an emptied trash (gone
    for good), and a delete refused inside a 200 (meta.errors, nothing deleted) - issue 18's stand-in."""
    rec = api.new({"id": "restore-001", "status": "queued"})
    api.flush()
    assert api.admin("POST", f"tables/{api.ids[JOBS]}/records/{rec['id']}/restore").status_code == 409  # live
    assert api.admin("POST", "faults", {"status": 200, "count": 1, "method": "DELETE"}).status_code == 200
    assert api.query().status_code == 200  # a fault for DELETE leaves the other methods alone
    refused = api.delete([rec["id"]])
    assert refused.status_code == 200 and refused.json()["meta"]["errors"], refused.text
    assert api.get(rec["id"]).json()["data"]["deleted_at"] is None  # nothing deleted
    assert api.admin("POST", "faults", {"status": 200, "count": 1, "method": "PUT"}).status_code == 400
    api.admin("DELETE", "faults")
    assert api.delete([rec["id"]]).status_code == 204
    trashed = api.get(rec["id"]).json()["data"]
    before = len(receiver.requests)
    time.sleep(0.002)
    back = api.admin("POST", f"tables/{api.ids[JOBS]}/records/{rec['id']}/restore")
    assert back.status_code == 200, back.text
    assert back.json()["data"]["deleted_at"] is None and back.json()["data"]["edited_at"] > trashed["edited_at"]
    assert api.found(filters=[("id", "exact", "restore-001")]) == [api.dec(JOBS, rec)["data"]]
    api.flush()
    assert len(receiver.requests) == before + 1  # the trigger fired for the restore
    assert api.delete([rec["id"]]).status_code == 204
    emptied = api.admin("POST", f"tables/{api.ids[JOBS]}/trash/empty")
    assert emptied.status_code == 200 and emptied.json()["removed"] >= 1
    assert api.found(filters=[("id", "exact", "restore-001")], trash="include") == []
    assert api.get(rec["id"]).status_code == 404
