"""The local Zapier Tables stand-in over real HTTP: contract, durability, stamping, triggers, admin, CLI.

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
JOBS = "tbl_agent_jobs"  # stamps created_at/updated_at, triggers the receiver
AUDIT = "tbl_audit_log"  # no stamping, no trigger
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
    tables = [
        TableConfig("agent_jobs", JOBS, trigger_url, stamp_updated_at=True),
        TableConfig("audit_log", AUDIT, None, stamp_updated_at=False),
    ]
    kwargs.setdefault("autoreplay", AUTOREPLAY)
    kwargs.setdefault("delivery_timeout_s", 2.0)
    return start_tables_service(db, tables, TOKEN, SECRET_HEADER, SECRET, **kwargs)


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


class Api:
    """Raw requests against the service."""

    def __init__(self, url: str) -> None:
        self.url = url

    def records(self, table: str = JOBS) -> str:
        return f"{self.url}/api/v1/tables/{table}/records"

    def post(self, body: Any, table: str = JOBS, **kw: Any) -> requests.Response:
        return requests.post(self.records(table), json=body, headers=auth(), timeout=5, **kw)

    def patch(self, rid: str | None, body: Any, table: str = JOBS) -> requests.Response:
        url = self.records(table) + (f"/{rid}" if rid else "")
        return requests.patch(url, json=body, headers=auth(), timeout=5)

    def get(self, rid: str | None = None, table: str = JOBS, **params: Any) -> requests.Response:
        url = self.records(table) + (f"/{rid}" if rid else "")
        return requests.get(url, params=params, headers=auth(), timeout=5)

    def admin(self, method: str, path: str, body: Any = None) -> requests.Response:
        return requests.request(method, f"{self.url}/_admin/{path}", json=body, timeout=15)

    def stats(self) -> dict[str, Any]:
        return self.admin("GET", "stats").json()

    def flush(self) -> None:
        assert self.admin("POST", "triggers/flush", {"timeout": 10}).json()["flushed"]


@pytest.fixture
def api(service: TablesService) -> Api:
    return Api(service.url)


# --- CRUD --------------------------------------------------------------------------------------------------


def test_create_flat_and_wrapped_get_patch_delete(api: Api) -> None:
    flat = api.post({"id": "test-job-001", "job_type": "discovery", "status": "queued"})
    assert flat.status_code == 201
    rec = flat.json()
    assert set(rec) == {"id", "data", "created_at", "updated_at"}
    assert re.match(r"^rec_[0-9A-Z]{26}$", rec["id"])
    assert rec["data"]["id"] == "test-job-001" and rec["data"]["status"] == "queued"

    wrapped = api.post({"data": {"id": "test-job-002", "retry_count": 2, "ok": True, "x": None}}).json()
    assert wrapped["data"]["retry_count"] == 2 and wrapped["data"]["ok"] is True and wrapped["data"]["x"] is None

    assert api.get(rec["id"]).json() == rec
    patched = api.patch(rec["id"], {"data": {"status": "running"}}).json()
    assert patched["data"]["status"] == "running" and patched["data"]["job_type"] == "discovery"
    assert patched["created_at"] == rec["created_at"] and patched["updated_at"] > rec["updated_at"]

    assert requests.delete(api.records() + f"/{rec['id']}", headers=auth(), timeout=5).status_code == 204
    gone = api.get(rec["id"])
    assert gone.status_code == 404 and "error" in gone.json()


def test_auth_required_and_token_never_echoed(api: Api) -> None:
    for headers in ({}, auth("wrong"), {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
        r = requests.get(api.records(), headers=headers, timeout=5)
        assert r.status_code == 401
        assert r.json()["error"] and TOKEN not in r.text
    assert api.admin("GET", "health").json() == {"ok": True}  # admin needs no token


def test_not_found_and_malformed_ids(api: Api) -> None:
    assert api.get(table="tbl_nope").status_code == 404
    assert api.post({"a": "1"}, table="tbl_nope").status_code == 404
    assert api.get("rec_01HZZZZZZZZZZZZZZZZZZZZZZZ").status_code == 404
    assert api.patch("rec_missing", {"data": {"a": "1"}}).status_code == 404
    assert requests.delete(api.records() + "/rec_missing", headers=auth(), timeout=5).status_code == 404
    assert api.get("bad id!").status_code == 400
    assert api.get(table="bad.table").status_code == 400
    assert requests.put(api.records(), headers=auth(), timeout=5).status_code == 405
    assert requests.get(api.url + "/api/v1/nothing", headers=auth(), timeout=5).json()["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON"),
        (b'{"a": NaN}', "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"data": {"nested": {"a": 1}}}', "string, number, boolean or null"),
        (b'{"data": {"bad-name": "x"}}', "invalid field name"),
        (b'{"records": []}', "1 to 100"),
        (b'{"records": [{"fields": {}}]}', "records[0].data"),
    ],
)
def test_bad_create_bodies_are_400(api: Api, body: bytes, message: str) -> None:
    r = requests.post(api.records(), data=body, headers=auth() | {"Content-Type": "application/json"}, timeout=5)
    assert r.status_code == 400
    assert message in r.json()["error"]


def test_bad_queries_and_updates_are_400(api: Api) -> None:
    rid = api.post({"a": "1"}).json()["id"]
    for params in (
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "x"},
        {"cursor": "%%%"},
        {"sort": "id"},
        {"filter[bad-name]": "x"},
    ):
        r = api.get(**params)
        assert r.status_code == 400, params
    assert api.patch(rid, {"a": "2"}).status_code == 400  # single PATCH needs {"data": ...}
    assert api.patch(None, {"records": [{"id": rid}]}).status_code == 400
    assert api.patch(None, {"records": [{"id": rid, "data": {}}] * 101}).status_code == 400
    assert api.post({"records": [{"data": {"n": i}} for i in range(101)]}).status_code == 400


def test_body_over_limit_is_413(api: Api) -> None:
    r = api.post({"blob": "x" * (1024 * 1024 + 10)})
    assert r.status_code == 413 and "larger than" in r.json()["error"]


# --- listing, filters, batches ----------------------------------------------------------------------------


def test_batch_create_filters_and_cursor_paging(api: Api) -> None:
    for start in range(0, 260, 100):
        rows = [
            {"data": {"n": i, "parity": "even" if i % 2 == 0 else "odd", "flag": i % 10 == 0}}
            for i in range(start, min(start + 100, 260))
        ]
        r = api.post({"records": rows})
        assert r.status_code == 201 and len(r.json()["data"]) == len(rows)

    seen, cursor, pages = [], None, 0
    while True:
        page = api.get(limit=100, **({"cursor": cursor} if cursor else {})).json()
        seen += [rec["data"]["n"] for rec in page["data"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(range(260)) and pages == 3

    evens = api.get(limit=1000, **{"filter[parity]": "even"}).json()
    assert len(evens["data"]) == 130 and evens["next_cursor"] is None
    both = api.get(**{"filter[parity]": "even", "filter[flag]": "true"}).json()["data"]
    assert [rec["data"]["n"] for rec in both] == list(range(0, 260, 10))
    assert [rec["data"]["n"] for rec in api.get(**{"filter[n]": "7"}).json()["data"]] == [7]
    assert api.get(**{"filter[missing]": "x"}).json() == {"data": [], "next_cursor": None}


def test_batch_update_is_atomic(api: Api) -> None:
    a, b = (api.post({"data": {"s": "old"}}).json()["id"] for _ in range(2))
    ok = api.patch(None, {"records": [{"id": a, "data": {"s": "new"}}, {"id": b, "data": {"t": 1}}]})
    assert ok.status_code == 200
    first, second = ok.json()["data"]
    assert first["data"]["s"] == "new" and second["data"]["t"] == 1
    bad = api.patch(None, {"records": [{"id": a, "data": {"s": "newer"}}, {"id": "rec_missing", "data": {}}]})
    assert bad.status_code == 404
    assert api.get(a).json()["data"]["s"] == "new"


def test_concurrent_writes_are_all_kept(api: Api) -> None:
    def write(worker: int) -> list[str]:
        return [api.post({"worker": worker, "i": i}, table=AUDIT).json()["id"] for i in range(15)]

    with ThreadPoolExecutor(8) as pool:
        ids = [rid for chunk in pool.map(write, range(8)) for rid in chunk]
    assert len(set(ids)) == 120
    assert len(api.get(table=AUDIT, limit=1000).json()["data"]) == 120
    assert api.stats()["writes"][AUDIT] == 120


# --- durability -------------------------------------------------------------------------------------------


def test_records_survive_a_restart_on_the_same_file(tmp_path: Path) -> None:
    db = tmp_path / "state" / "tables.db"
    with start_service(db, None) as first:
        made = [Api(first.url).post({"n": i}, table=AUDIT).json() for i in range(5)]
    with start_service(db, None) as second:
        api = Api(second.url)
        assert api.get(table=AUDIT).json()["data"] == made
        api.post({"n": 5}, table=AUDIT)
        assert [r["data"]["n"] for r in api.get(table=AUDIT).json()["data"]] == list(range(6))
    assert (tmp_path / "state" / "tables.db").exists()


# --- stamping ---------------------------------------------------------------------------------------------


def test_stamping_rules(api: Api) -> None:
    plain = api.post({"id": "j1"}).json()["data"]
    assert ISO_Z.match(plain["created_at"]) and plain["updated_at"] == plain["created_at"]

    given = {"id": "j2", "created_at": "2025-12-22T10:00:00Z", "updated_at": "2025-12-22T10:00:01Z"}
    rec = api.post(given).json()
    assert rec["data"] == given  # given values are kept exactly

    blank = api.post({"id": "j3", "created_at": None}).json()["data"]
    assert blank["created_at"] is None  # an explicit null is the writer's value (the sync writes nulls as-is)

    stamped = api.patch(rec["id"], {"data": {"status": "running"}}).json()["data"]
    assert stamped["created_at"] == given["created_at"] and stamped["updated_at"] > given["updated_at"]
    assert ISO_Z.match(stamped["updated_at"])
    kept = api.patch(rec["id"], {"data": {"status": "done", "updated_at": "2020-01-01T00:00:00Z"}}).json()
    assert kept["data"]["updated_at"] == "2020-01-01T00:00:00Z"

    audit = api.post({"action": "x"}, table=AUDIT).json()
    assert audit["data"] == {"action": "x"}  # no stamping on this table
    assert ISO_Z.match(audit["created_at"]) and ISO_Z.match(audit["updated_at"])  # system metadata always


# --- triggers ---------------------------------------------------------------------------------------------


def test_trigger_delivers_flat_record_with_id_and_secret(api: Api, receiver: Receiver) -> None:
    with_id = api.post({"id": "job-1", "status": "queued"}).json()
    without_id = api.post({"data": {"status": "queued"}}).json()
    got = {r.body["id"]: r for r in receiver.wait_for(2)}
    assert set(got) == {"job-1", without_id["id"]}
    first = got["job-1"]
    assert first.path == "/hook/agent_jobs" and first.method == "POST"
    assert first.headers[SECRET_HEADER] == SECRET
    assert first.headers["Content-Type"] == "application/json"
    assert first.body == with_id["data"]
    assert got[without_id["id"]].body == without_id["data"] | {"id": without_id["id"]}
    api.flush()
    assert api.stats()["deliveries"] | {"attempts": 0} == {"sent": 2, "failed": 0, "pending": 0, "attempts": 0}


def test_noop_update_writes_and_sends_nothing(api: Api, receiver: Receiver) -> None:
    rec = api.post({"id": "job-2", "status": "queued"}).json()
    api.flush()
    before = api.stats()
    same = api.patch(rec["id"], {"data": {"status": "queued"}}).json()
    assert same == rec
    api.flush()
    assert len(receiver.requests) == 1
    assert api.stats()["writes"][JOBS] == before["writes"][JOBS]

    api.patch(rec["id"], {"data": {"status": "running"}})
    api.flush()
    assert [r.body["status"] for r in receiver.requests] == ["queued", "running"]
    assert api.stats()["writes"][JOBS] == before["writes"][JOBS] + 1


def test_autoreplay_after_receiver_comes_up(api: Api) -> None:
    down = Receiver()  # port reserved, refuses connections
    try:
        assert api.admin("PUT", f"tables/{JOBS}/trigger", {"url": down.url + "/late"}).status_code == 200
        rid = api.post({"id": "job-3"}).json()["id"]
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
    api.post({"id": "job-4"})
    api.flush()
    assert [r.body["id"] for r in receiver.requests] == ["job-4"] * 3
    receiver.statuses.extend([400])
    api.post({"id": "job-5"})
    api.flush()
    assert [r.body["id"] for r in receiver.requests].count("job-5") == 1
    receiver.statuses.extend([500] * 4)
    api.post({"id": "job-6"})
    api.flush()
    assert [r.body["id"] for r in receiver.requests].count("job-6") == 1 + len(AUTOREPLAY)
    assert api.stats()["deliveries"] | {"attempts": 0} == {"sent": 1, "failed": 2, "pending": 0, "attempts": 0}


def test_without_autoreplay_a_failed_delivery_is_not_retried(tmp_path: Path, receiver: Receiver) -> None:
    receiver.statuses.append(503)
    with start_service(tmp_path / "t.db", receiver.url, autoreplay=()) as svc:
        api = Api(svc.url)
        api.post({"id": "job-7"})
        api.flush()
        assert len(receiver.requests) == 1 and api.stats()["deliveries"]["failed"] == 1


def test_trigger_can_be_pointed_elsewhere_or_off(api: Api, receiver: Receiver) -> None:
    assert api.admin("PUT", f"tables/{JOBS}/trigger", {"url": None}).status_code == 200
    api.post({"id": "job-8"})
    api.flush()
    assert receiver.requests == []
    assert api.admin("PUT", f"tables/{JOBS}/trigger", {"url": "ftp://x"}).status_code == 400
    assert api.admin("PUT", "tables/tbl_nope/trigger", {"url": None}).status_code == 404


# --- admin ------------------------------------------------------------------------------------------------


def test_fault_injection_and_stats(api: Api) -> None:
    api.admin("POST", "stats/reset")
    assert api.admin("POST", "faults", {"status": 429, "count": 2, "retry_after": 7}).status_code == 200
    first = api.post({"a": "1"})
    assert first.status_code == 429 and first.headers["Retry-After"] == "7" and first.json()["error"]
    assert api.get().status_code == 429
    assert api.post({"a": "1"}).status_code == 201
    api.admin("POST", "faults", {"status": 503, "count": 5})
    assert api.get().status_code == 503
    assert api.admin("DELETE", "faults").status_code == 204
    assert api.get().status_code == 200
    stats = api.stats()
    assert stats["api_requests"] == 5 and stats["writes"] == {JOBS: 1, AUDIT: 0}
    assert api.admin("POST", "faults", {"status": "x", "count": 1}).status_code == 400
    assert api.admin("POST", "stats/reset").status_code == 204
    assert api.stats()["api_requests"] == 0


def test_stop_is_clean_and_idempotent(tmp_path: Path) -> None:
    svc = start_service(tmp_path / "t.db", None)
    url = svc.url
    svc.stop()
    svc.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/_admin/health", timeout=2)


def test_cli_runs_until_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"token": TOKEN, "tables": [{"name": "agent_jobs", "table_id": JOBS}]}))
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
        assert Api(url).post({"id": "cli-1"}).status_code == 201
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_rejects_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"tables": "nope"}))
    done = subprocess.run(
        [sys.executable, "-m", "infra.local.tables_service", "--db", str(tmp_path / "x.db"), "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "bad config" in done.stderr
