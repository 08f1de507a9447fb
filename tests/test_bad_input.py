"""The bad-input corpus (tests/badinput/, see its README) against the seven functions of the local stack,
over real HTTP with the shared secret.

Every bad delivery must get the expected 4xx whose JSON names the field and the problem, and change
nothing but the audit trail: the handler (shared/edge/handler.py) writes one ``sync_failed`` audit entry for
every delivery it rejects after authentication (400, 413 and 415 alike). The entry's id is derived from
the function and the SHA-256 of the body bytes it read - which are empty when a 413 is decided from
Content-Length or cut off mid-read - so the same bytes to the same function are audited once, however
often they are delivered. Each delivery writes exactly one structured log line.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from shared.core.mapping import parse_supabase_record, parse_tables_record
from shared.core.spec import FUNCTIONS, TABLES, Direction
from shared.platform.settings import DEFAULT_SECRET_HEADER
from tests.e2e import Supabase, Tables

CORPUS = Path(__file__).resolve().parent / "badinput"
BODY_FORMS = ("json", "body", "body_b64", "body_size")
KNOWN_KEYS = {"description", "function", "content_type", *BODY_FORMS, "expand", "chunked", "expect_status",
              "expect_field", "expect_problem_substring", "expect_id", "expect_stored", "xfail"}
TRACEBACK_MARKERS = ("Traceback (most recent call last)", 'File "/', "psycopg.errors", "site-packages")


# --- the corpus ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    path: Path
    spec: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.path.parent.name}/{self.path.stem}"

    @property
    def function(self) -> str:
        return self.spec["function"]

    @property
    def status(self) -> int:
        return self.spec["expect_status"]

    @property
    def content_type(self) -> str | None:
        return self.spec.get("content_type", "application/json")

    @property
    def chunked(self) -> bool:
        return bool(self.spec.get("chunked"))

    @property
    def valid(self) -> bool:
        return self.status == 200

    def body(self) -> bytes:
        s = self.spec
        if "body_size" in s:
            return sized_body(s["body_size"])
        if "body_b64" in s:
            return base64.b64decode(s["body_b64"])
        text = s["body"] if "body" in s else json.dumps(s["json"])
        for marker, parts in s.get("expand", {}).items():
            text = text.replace(marker, "".join(piece * times for piece, times in parts))
        return text.encode("utf-8")

    def audited_body(self) -> bytes:
        """The bytes the handler hashes into the sync_failed entry: none for a 413 (never kept)."""
        return b"" if self.status == 413 else self.body()


def sized_body(size: int) -> bytes:
    """A well-formed JSON object of exactly ``size`` bytes."""
    head, tail = b'{"id": "bi-huge", "status": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def load_corpus() -> list[Case]:
    cases = []
    for path in sorted(CORPUS.glob("*/*.json")):
        spec = json.loads(path.read_text(encoding="utf-8"))
        cases.append(Case(path, spec))
    return cases


CASES = load_corpus()
BAD = [c for c in CASES if not c.valid]
VALID = [c for c in CASES if c.valid]


def params(cases: list[Case]) -> list[Any]:
    return [
        pytest.param(c, id=c.name, marks=[pytest.mark.xfail(strict=True, reason=c.spec["xfail"])] if "xfail" in c.spec
                     else [])
        for c in cases
    ]


def test_corpus_is_well_formed_and_covers_every_function():
    assert len(BAD) >= 60, len(BAD)
    per_function = {name: sum(c.function == name for c in BAD) for name in FUNCTIONS}
    print("bad deliveries per function:", per_function, "valid hostile-looking:", len(VALID))
    assert all(n >= 5 for n in per_function.values()), per_function
    for c in CASES:
        assert set(c.spec) <= KNOWN_KEYS, (c.name, set(c.spec) - KNOWN_KEYS)
        assert c.function == c.path.parent.name and c.function in FUNCTIONS, c.name
        assert sum(form in c.spec for form in BODY_FORMS) == 1, c.name
        assert c.spec["description"], c.name
        if c.valid:
            assert c.spec["expect_stored"] and c.spec["expect_id"], c.name
        else:
            assert c.status in (400, 413, 415), c.name
            assert c.spec["expect_field"] and c.spec["expect_problem_substring"], c.name
    big = [c for c in CASES if c.status == 413]
    assert big and all(len(c.body()) > 256 * 1024 for c in big)
    # Empty-body and oversized cases of one function would share one audit entry (both hash b""): keep
    # them on different functions so each case's own audit assertion is meaningful.
    empty_hash = [(c.function) for c in BAD if not c.audited_body()]
    assert len(empty_hash) == len(set(empty_hash)), empty_hash


# --- observing the whole stack -------------------------------------------------------------------------


def snapshot(stack: Any) -> dict[str, Any]:
    """Everything a delivery could change, except sync_failed audit entries (returned as a set of ids)."""
    snap: dict[str, Any] = {}
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        for table in ("agent_jobs", "agent_decisions", "rate_limits"):
            snap[table] = conn.execute(
                f"SELECT count(*), md5(coalesce(string_agg(to_jsonb(t)::text, ',' ORDER BY id), '')) "
                f"FROM public.{table} t").fetchone()
        snap["audit_log"] = conn.execute(
            "SELECT count(*), md5(coalesce(string_agg(to_jsonb(a)::text, ',' ORDER BY id), '')) FROM audit_log a "
            "WHERE action <> 'sync_failed'").fetchone()
        snap["outbox"] = conn.execute(
            "SELECT count(*), coalesce(max(id), 0), md5(coalesce(string_agg(to_jsonb(o)::text, ',' ORDER BY id), '')) "
            "FROM zsync.outbox o").fetchone()
        snap["pg_net"] = conn.execute(
            "SELECT (SELECT count(*) FROM net.http_request_queue), (SELECT count(*) FROM net._http_response)"
        ).fetchone()
        snap["sync_failed"] = {r[0] for r in conn.execute("SELECT id FROM audit_log WHERE action = 'sync_failed'")}
    stats = stack.tables.stats()
    snap["tables"] = {"writes": stats["writes"], "api_requests": stats["api_requests"],
                      "deliveries": stats["deliveries"]}
    return snap


def unchanged_apart_from_audit(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return [key for key in before if key != "sync_failed" and before[key] != after[key]]


def audit_entries(stack: Any, ids: set[str]) -> list[dict]:
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT to_jsonb(a) FROM audit_log a WHERE id = ANY(%s)", (list(ids),))]


def already_audited(stack: Any, function: str, body: bytes) -> bool:
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM audit_log WHERE action = 'sync_failed' AND actor = %s "
            "AND metadata->>'body_sha256' = %s", (f"zsync/{function}", hashlib.sha256(body).hexdigest()),
        ).fetchone()[0] > 0


class LogTail:
    """The lines a function process writes to its log file from now on."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size

    def new_lines(self) -> list[str]:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        return data.decode("utf-8", "replace").splitlines()

    def wait_lines(self, function: str, events: int, timeout_s: float = 10.0) -> list[str]:
        """New lines once ``events`` structured events are there: a fresh function process writes the lines
        of its first answers shortly after them, when google-cloud-logging has been imported
        (shared/platform/logs.py)."""
        deadline = time.monotonic() + timeout_s
        while len(structured(lines := self.new_lines(), function)) < events and time.monotonic() < deadline:
            time.sleep(0.05)
        return lines


def structured(lines: list[str], function: str) -> list[dict]:
    """The function's own structured events (JSON lines with an "event" and its function label)."""
    found = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "event" in entry:
            assert entry["logging.googleapis.com/labels"]["function"] == function, entry
            found.append(entry)
    return found


def deliver(stack: Any, case: Case, secret: str | None = None) -> requests.Response:
    headers = {DEFAULT_SECRET_HEADER: secret or stack.secret}
    if case.content_type is not None:
        headers["Content-Type"] = case.content_type
    body = case.body()
    data: bytes | Iterator[bytes] = body
    if case.chunked:
        data = iter([body[i:i + 65536] for i in range(0, len(body), 65536)])
    return requests.post(stack.functions[case.function].url, data=data, headers=headers, timeout=30)


def assert_no_leak(text: str, secret: str) -> None:
    assert secret not in text
    for marker in TRACEBACK_MARKERS:
        assert marker not in text, marker


# --- the corpus, case by case ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", params(BAD))
def test_bad_delivery_is_rejected_clearly_and_changes_nothing(stack, case: Case):
    stack.wait_quiet(settle_s=0.05)  # bad deliveries start nothing: once quiet, the stack stays quiet
    log = LogTail(stack.functions[case.function].log_path)
    audited_before = already_audited(stack, case.function, case.audited_body())
    before = snapshot(stack)

    r = deliver(stack, case)

    assert_no_leak(r.text, stack.secret)
    assert r.status_code == case.status, (case.spec["description"], r.status_code, r.text[:500])
    assert r.headers["Content-Type"].startswith("application/json")
    answer = r.json()
    assert answer["outcome"] == "rejected" and answer["function"] == case.function
    problems = answer["problems"]
    assert any(p["field"] == case.spec["expect_field"] and case.spec["expect_problem_substring"] in p["problem"]
               for p in problems), (case.spec["expect_field"], case.spec["expect_problem_substring"], problems)
    assert answer.get("id") == case.spec.get("expect_id", answer.get("id"))
    assert answer["audited"] is True

    after = snapshot(stack)
    assert unchanged_apart_from_audit(before, after) == []
    new_failed = after["sync_failed"] - before["sync_failed"]
    assert len(new_failed) == (0 if audited_before else 1), (audited_before, new_failed)
    for entry in audit_entries(stack, new_failed):
        meta = entry["metadata"]
        assert entry["actor"] == f"zsync/{case.function}" and entry["severity"] == "error"
        assert entry["resource_type"] == FUNCTIONS[case.function].table.resource_type
        assert entry["resource_id"] == answer.get("id")
        assert meta["status"] == case.status and meta["problems"] == problems
        assert meta["body_sha256"] == hashlib.sha256(case.audited_body()).hexdigest()
        assert stack.secret not in json.dumps(entry)

    lines = log.wait_lines(case.function, 1)
    events = structured(lines, case.function)
    assert [e["event"] for e in events] == ["delivery"], lines
    assert events[0]["status"] == case.status and events[0]["problems"] == problems
    assert events[0]["severity"] == "WARNING"
    log_text = "\n".join(lines)  # (the logging library's one-off diagnostic line names site-packages: fine)
    assert stack.secret not in log_text and "Traceback" not in log_text


@pytest.mark.parametrize("case", params(VALID))
def test_hostile_looking_valid_data_is_stored_verbatim_on_both_sides(stack, case: Case):
    fn = FUNCTIONS[case.function]
    spec = fn.table
    stack.wait_quiet()
    before = snapshot(stack)
    r = deliver(stack, case)
    assert_no_leak(r.text, stack.secret)
    assert r.status_code == 200, r.text
    assert r.json()["outcome"] == "applied" and r.json()["id"] == case.spec["expect_id"]
    stack.wait_quiet()

    supabase, tables = Supabase(stack), Tables(stack)
    record_id = case.spec["expect_id"]
    stored = supabase.row(spec.name, record_id)
    assert stored is not None
    for field, value in case.spec["expect_stored"].items():
        assert stored[field] == value, (field, stored[field], value)
    after = snapshot(stack)
    for name in ("agent_jobs", "agent_decisions", "rate_limits"):  # nothing dropped, nothing else touched
        expected = before[name][0] + (1 if name == spec.name else 0)
        assert after[name][0] == expected, name
    if Direction.TO_TABLES in spec.directions:
        # A delivery to *_to_supabase is what Tables holds, so the sync writes nothing back; this one was
        # posted by hand: send Supabase's row to Tables (a repair, through the outbox) to check that side.
        if fn.direction is Direction.TO_SUPABASE:
            assert tables.find(spec.name, record_id) is None
            assert supabase.query("SELECT zsync.requeue(%s, %s, 'UPDATE')", (spec.name, record_id)) == [(True,)]
            stack.wait_quiet()
        found = tables.find(spec.name, record_id)
        assert found is not None
        assert parse_tables_record(spec, found["data"]) == parse_supabase_record(spec, stored)
        for field, value in case.spec["expect_stored"].items():
            if isinstance(value, str):
                assert found["data"][field] == value, field
    else:
        assert spec is TABLES["audit_log"]


# --- redelivery and attribution -------------------------------------------------------------------------


def test_redelivered_bad_delivery_is_logged_each_time_and_audited_once(stack):
    case = Case(CORPUS / "agent_jobs_to_supabase" / "redelivery.json", {
        "description": "a bad record redelivered three times (Zapier autoreplay)",
        "function": "agent_jobs_to_supabase",
        "json": {"id": "bi-redelivered-1", "created_at": "2025-02-31T00:00:00Z", "nonce": "redelivery-test"},
        "expect_status": 400,
    })
    stack.wait_quiet()
    log = LogTail(stack.functions[case.function].log_path)
    before = snapshot(stack)
    answers = [deliver(stack, case) for _ in range(3)]
    assert [a.status_code for a in answers] == [400, 400, 400]
    after = snapshot(stack)
    assert unchanged_apart_from_audit(before, after) == []
    new_failed = after["sync_failed"] - before["sync_failed"]
    assert len(new_failed) == 1
    [entry] = audit_entries(stack, new_failed)
    assert entry["resource_id"] == "bi-redelivered-1"
    events = structured(log.wait_lines(case.function, 3), case.function)
    assert [(e["event"], e["status"]) for e in events] == [("delivery", 400)] * 3


def test_unauthenticated_bad_delivery_is_neither_audited_nor_read(stack):
    """A 401 comes before the body is read: nothing is attributed or stored for it."""
    case = next(c for c in BAD if c.name == "agent_jobs_to_supabase/created_at_feb_31")
    stack.wait_quiet()
    log = LogTail(stack.functions[case.function].log_path)
    before = snapshot(stack)
    r = deliver(stack, case, secret="not-the-secret")
    assert r.status_code == 401 and "problems" not in r.json()
    after = snapshot(stack)
    assert unchanged_apart_from_audit(before, after) == [] and after["sync_failed"] == before["sync_failed"]
    events = structured(log.wait_lines(case.function, 1), case.function)
    assert [(e["event"], e["status"]) for e in events] == [("delivery", 401)]


# --- known bug: distinct oversized deliveries share one audit entry ----------------------------------


@pytest.fixture
def inprocess(monkeypatch: pytest.MonkeyPatch, database_url: str) -> Iterator[None]:
    import os

    from shared.platform.settings import reset_settings

    for key in list(os.environ):
        if key.startswith("ZSYNC_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("ZSYNC_DATABASE_URL", database_url)
    monkeypatch.setenv("ZSYNC_WEBHOOK_SECRET", "bad-input-secret")
    monkeypatch.setenv("ZSYNC_RETRY_BUDGET_S", "1")
    reset_settings()
    yield
    reset_settings()


def test_distinct_rejected_deliveries_are_each_audited(inprocess, database_url):
    from functions_framework import create_app

    main = str(Path(__file__).resolve().parent.parent / "functions" / "main.py")
    client = create_app("rate_limits_to_supabase", main).test_client()
    headers = {DEFAULT_SECRET_HEADER: "bad-input-secret", "Content-Type": "application/json"}
    answers = [
        client.post("/", data=b"", headers=headers).status_code,
        client.post("/", data=sized_body(300_000), headers=headers).status_code,
        client.post("/", data=sized_body(400_000), headers=headers).status_code,
    ]
    assert answers == [400, 413, 413]
    with psycopg.connect(database_url) as conn:
        entries = conn.execute(
            "SELECT count(*) FROM audit_log WHERE action = 'sync_failed' AND actor = 'zsync/rate_limits_to_supabase'"
        ).fetchone()[0]
    assert entries == 3
