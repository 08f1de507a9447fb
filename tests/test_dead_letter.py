"""Dead-letter queue and ``zsync replay`` against a real moto SQS server, a real Postgres and the real local
Zapier Tables service; the functions run in-process through functions-framework's own app."""

from __future__ import annotations

import json
import sys
import time
import types
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import psycopg
import pytest
import requests
from functions_framework import create_app
from moto.server import ThreadedMotoServer
from typer.testing import CliRunner

from infra import replay
from infra.cli import app
from infra.local.stack import free_port
from shared.adapters import dead_letter
from shared.adapters.dead_letter import DeadLetter, DeadLetterQueue, delivery_key
from shared.platform.settings import get_settings, reset_settings
from shared.services.inbox_consumer import DrainReport
from tests.e2e import uid
from tests.tables_local import LocalTables, start_local_tables

MAIN = str(Path(__file__).resolve().parent.parent / "functions" / "main.py")
SECRET = "dlq-test-secret"
DOWN_DB = "postgresql://zsync:hunter2@127.0.0.1:9/nowhere"


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def queue_url(moto_endpoint: str) -> str:
    sqs = boto3.client("sqs", endpoint_url=moto_endpoint, region_name="us-east-1", aws_access_key_id="local",
                       aws_secret_access_key="local")
    return sqs.create_queue(QueueName=f"dlq-{uuid.uuid4().hex[:12]}")["QueueUrl"]


@pytest.fixture(scope="module")
def tables_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTables]:
    with start_local_tables(tmp_path_factory.mktemp("tables") / "t.sqlite3") as local:
        yield local


@pytest.fixture
def env(zsync_env, database_url: str, queue_url: str, moto_endpoint: str,
        tables_service: LocalTables) -> pytest.MonkeyPatch:
    return zsync_env(database_url=database_url, webhook_secret=SECRET, retry_budget_s="1", db_connect_timeout_s="1",
                     http_timeout_s="1", dlq_url=queue_url, aws_endpoint_url=moto_endpoint,
                     **tables_service.env())  # Zapier base URL, token URL, client credentials, table ids


def post(target: str, body: object):
    return create_app(target, MAIN).test_client().post("/", json=body, headers={"X-Zsync-Secret": SECRET})


def drain(url: str) -> list[dead_letter.Received]:
    q = DeadLetterQueue(get_settings(), url)
    got = list(q.iter_receive(visibility_timeout_s=1))
    q.release(got)
    return got


def letter(function: str, payload: dict, *, received_at: datetime | None = None, audited: bool = False) -> DeadLetter:
    at = received_at or datetime.now(UTC)
    return DeadLetter(function=function, payload=payload, error_type="DatabaseUnavailable",
                      error_message="database unreachable: OperationalError", received_at=at, first_seen=at,
                      last_seen=at, record_id=payload.get("id"), audited=audited)


def enqueue(*letters: DeadLetter) -> None:
    q = DeadLetterQueue(get_settings())
    for item in letters:
        q.send(item)


def query(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []




# --- the message --------------------------------------------------------------------------------------------


def test_key_is_canonical_and_per_function():
    a = delivery_key("agent_jobs_to_supabase", {"id": "x", "status": "queued", "n": [1, {"b": 2, "a": 1}]})
    b = delivery_key("agent_jobs_to_supabase", {"n": [1, {"a": 1, "b": 2}], "status": "queued", "id": "x"})
    assert a == b and len(a) == 64
    assert a != delivery_key("rate_limits_to_supabase", {"id": "x", "status": "queued", "n": [1, {"a": 1, "b": 2}]})


def test_body_round_trip_and_merge():
    t0 = datetime(2025, 12, 22, 10, tzinfo=UTC)
    one = letter("agent_jobs_to_supabase", {"id": "j1"}, received_at=t0)
    two = letter("agent_jobs_to_supabase", {"id": "j1"}, received_at=t0 + timedelta(minutes=5))
    assert DeadLetter.from_body(one.to_body()) == one
    odd = letter("agent_jobs_to_supabase", {"id": "j\ud800", "status": "\ufffe 😀 ünïcode"}, received_at=t0)
    assert odd.to_body().isascii() and DeadLetter.from_body(odd.to_body()) == odd
    merged = one.merged(two)
    assert (merged.attempts, merged.first_seen, merged.last_seen) == (2, t0, t0 + timedelta(minutes=5))
    with pytest.raises(ValueError):
        DeadLetter.from_body('{"v": 99}')


def test_sqs_unreachable_is_reported_quickly(env):
    env.setenv("ZSYNC_AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    reset_settings()
    dead_letter.reset_clients()
    started = time.monotonic()
    problem = dead_letter.dead_letter(get_settings(), letter("agent_jobs_to_supabase", {"id": "x"}))
    assert problem and "EndpointConnectionError" in problem and time.monotonic() - started < 10
    dead_letter.reset_clients()


# --- the functions dead-letter what they cannot apply --------------------------------------------------------


def test_database_down_is_dead_lettered_whole(env, queue_url):
    env.setenv("ZSYNC_DATABASE_URL", DOWN_DB)
    reset_settings()
    body = {"id": "dl-1", "status": "queued \ufffe 😀", "parameters": '{"metro": "Austin"}'}
    r = post("agent_jobs_to_supabase", body)
    assert r.status_code == 503
    assert r.json["outcome"] == "failed" and r.json["dead_lettered"] is True
    [msg] = drain(queue_url)
    raw = json.loads(msg.letter.to_body())
    assert raw["function"] == "agent_jobs_to_supabase" and raw["payload"] == body and raw["attempts"] == 1
    assert raw["error"]["type"] == "DatabaseUnavailable" and raw["audited"] is False
    assert raw["key"] == delivery_key("agent_jobs_to_supabase", body) and raw["record_id"] == "dl-1"
    assert "hunter2" not in json.dumps(raw) and "hunter2" not in r.get_data(as_text=True)


def test_database_down_is_dead_lettered_while_another_thread_imports_the_tables_client(env, queue_url):
    """The Tables errors half imported (another request's thread, e.g. the first scheduled trash check, is
    importing the Tables client, shared.adapters.zapier_errors first) when the database is found down: still 503
    and dead-lettered. Reading
    ``TablesError`` off the half-imported module raised AttributeError in the ``except`` clause: a 500, no
    dead letter, the delivery lost (tests/test_faults.py::test_a_postgres_down_during_tables_burst under load:
    two rate_limits deliveries answered 500, the records then only in Tables)."""
    env.setenv("ZSYNC_DATABASE_URL", DOWN_DB)
    reset_settings()
    half = types.ModuleType("shared.adapters.zapier_errors")  # in sys.modules, no classes defined yet
    env.setitem(sys.modules, "shared.adapters.zapier_errors", half)
    body = {"id": "rl-half-import", "service_name": "openai"}
    r = post("rate_limits_to_supabase", body)
    assert r.status_code == 503 and r.json["dead_lettered"] is True
    [msg] = drain(queue_url)
    assert msg.letter is not None and msg.letter.payload == body


def test_sqs_down_still_answers_503(env, queue_url):
    env.setenv("ZSYNC_DATABASE_URL", DOWN_DB)
    env.setenv("ZSYNC_AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    reset_settings()
    r = post("rate_limits_to_supabase", {"id": "rl-sqs-down"})
    assert r.status_code == 503 and r.json["dead_lettered"] is False
    dead_letter.reset_clients()


def test_tables_down_is_dead_lettered_and_audited(env, queue_url, database_url):
    env.setenv("ZSYNC_ZAPIER_BASE_URL", f"http://127.0.0.1:{free_port()}")
    reset_settings()
    hook = {"type": "INSERT", "table": "agent_jobs", "schema": "public", "old_record": None,
            "record": {"id": uid("tdown"), "status": "queued", "updated_at": "2025-12-22T10:00:00+00:00"}}
    r = post("agent_jobs_to_tables", hook)
    assert r.status_code == 503 and r.json["dead_lettered"] is True
    [msg] = drain(queue_url)
    assert msg.letter.error_type == "TablesUnavailable" and msg.letter.audited is True
    rid = hook["record"]["id"]
    [(meta,)] = query(database_url, "SELECT metadata FROM audit_log WHERE action = 'sync_failed' AND resource_id = %s",
                      (rid,))
    assert meta["status"] == 503 and "TablesUnavailable" in meta["problems"][0]["problem"]


def test_tables_4xx_to_our_write_is_not_dead_lettered(env, queue_url, tables_service, database_url):
    requests.post(f"{tables_service.url}/_admin/faults", json={"status": 422, "count": 1}, timeout=5)
    rid = uid("t4xx")
    hook = {"type": "INSERT", "table": "rate_limits", "schema": "public", "old_record": None,
            "record": {"id": rid, "updated_at": "2025-12-22T10:00:00+00:00"}}
    r = post("rate_limits_to_tables", hook)
    assert r.status_code == 502 and r.json["dead_lettered"] is False and "rejected" in r.json["error"]
    assert drain(queue_url) == []
    assert query(database_url, "SELECT count(*) FROM audit_log WHERE action = 'sync_failed' AND resource_id = %s",
                 (rid,)) == [(1,)]


# --- replay ---------------------------------------------------------------------------------------------------


def test_replay_applies_dedupes_and_audits_the_outage(env, queue_url, database_url):
    rid = uid("rp")
    first_seen = datetime.now(UTC) - timedelta(minutes=10)
    v1 = {"id": rid, "status": "queued", "updated_at": "2025-12-22T10:00:00Z"}
    v2 = {"id": rid, "status": "running", "updated_at": "2025-12-22T10:05:00Z"}
    copies = [letter("agent_jobs_to_supabase", v2, received_at=first_seen) for _ in range(3)]
    enqueue(*copies, letter("agent_jobs_to_supabase", v1, received_at=first_seen))  # older one last
    report = replay.replay(get_settings())
    assert report.ok and report.counts["agent_jobs_to_supabase"] == {
        "applied": 1, "merged": 0, "unchanged": 0, "skipped_stale": 1, "ignored": 0, "duplicates": 2, "rejected": 0,
        "left": 0}
    assert report.remaining == 0
    assert query(database_url, "SELECT status FROM agent_jobs WHERE id = %s", (rid,)) == [("running",)]
    synced = query(database_url, "SELECT count(*) FROM audit_log WHERE action = 'agent_jobs_synced' AND "
                   "resource_id = %s", (rid,))
    failed = query(database_url, "SELECT timestamp FROM audit_log WHERE action = 'sync_failed' AND resource_id = %s "
                   "ORDER BY timestamp", (rid,))
    assert synced == [(1,)] and len(failed) == 2  # one per distinct failed delivery, dated when it failed
    assert all(abs((ts - first_seen).total_seconds()) < 1 for (ts,) in failed)
    again = replay.replay(get_settings())  # the queue is empty; replaying twice changes nothing
    assert again.total("applied") == 0 and again.ok


def test_replay_keeps_the_original_arrival_as_version(env, queue_url, database_url):
    """A Tables record without updated_at is versioned by its arrival, not by the replay time."""
    rid = uid("arrival")
    arrived = datetime(2025, 12, 22, 9, 0, 0, tzinfo=UTC)
    enqueue(letter("agent_jobs_to_supabase", {"record": {"id": rid, "status": "queued"}}, received_at=arrived))
    assert replay.replay(get_settings()).total("applied") == 1
    assert query(database_url, "SELECT updated_at FROM agent_jobs WHERE id = %s", (rid,)) == [(arrived,)]


def test_replay_rejects_invalid_keeps_it_aside(env, queue_url, database_url, tmp_path):
    rid = uid("bad")
    enqueue(letter("rate_limits_to_supabase", {"id": rid, "request_count": "many"}))
    out = tmp_path / "rejected.jsonl"
    report = replay.replay(get_settings(), rejected_file=out)
    assert report.total("rejected") == 1 and report.ok and report.remaining == 0
    [line] = out.read_text().splitlines()
    kept = json.loads(line)
    assert kept["payload"] == {"id": rid, "request_count": "many"} and kept["problems"][0]["field"] == "request_count"
    assert query(database_url, "SELECT metadata->>'status' FROM audit_log WHERE action = 'sync_failed' "
                 "AND resource_id = %s", (rid,)) == [("400",)]


def test_replay_leaves_what_still_fails_compacted(env, queue_url):
    rid = uid("left")
    enqueue(*(letter("agent_decisions_to_supabase", {"id": rid, "decision": "x"}) for _ in range(2)),
            letter("rate_limits_to_supabase", {"id": rid}))
    env.setenv("ZSYNC_DATABASE_URL", DOWN_DB)
    reset_settings()
    report = replay.replay(get_settings())
    assert not report.ok and report.total("left") == 3 and report.stopped
    left = drain(queue_url)
    assert sorted(m.letter.function for m in left) == ["agent_decisions_to_supabase", "rate_limits_to_supabase"]
    # The two copies became one message (attempts 1 + 1), and the one delivery tried again got + 1.
    assert sum(m.letter.attempts for m in left) == 4


def test_replay_to_tables_writes_tables_and_acks_the_outbox(env, queue_url, database_url, tables_service):
    rid = uid("rt")
    query(database_url, "INSERT INTO agent_decisions (id, decision, updated_at) VALUES (%s, 'qualified', "
          "'2025-12-22T10:00:00Z')", (rid,))
    [(record,)] = query(database_url, "SELECT to_jsonb(t) FROM agent_decisions t WHERE id = %s", (rid,))
    hook = {"type": "INSERT", "table": "agent_decisions", "schema": "public", "record": record, "old_record": None}
    enqueue(letter("agent_decisions_to_tables", hook), letter("agent_decisions_to_tables", hook))
    report = replay.replay(get_settings())
    assert report.counts["agent_decisions_to_tables"]["applied"] == 1
    assert report.counts["agent_decisions_to_tables"]["duplicates"] == 1
    with tables_service.client() as client:
        found = list(client.iter_records(tables_service.ids["agent_decisions"], filters={"id": rid}))
    assert [r.data["decision"] for r in found] == ["qualified"]
    assert query(database_url, "SELECT count(*) FROM zsync.outbox WHERE record_id = %s AND acked_at IS NULL",
                 (rid,)) == [(0,)]


def test_cli_dry_run_max_and_exit_codes(env, queue_url, tmp_path):
    enqueue(*(letter("rate_limits_to_supabase", {"id": uid("cli")}) for _ in range(3)))
    runner = CliRunner()
    dry = runner.invoke(app, ["replay", "--dry-run", "--stack-file", str(tmp_path / "none.json")])
    assert dry.exit_code == 0, dry.output
    assert "queued deliveries" in dry.output and "in the queue now: ~3" in dry.output
    assert len(drain(queue_url)) == 3  # nothing deleted
    one = runner.invoke(app, ["replay", "--max", "1", "--stack-file", str(tmp_path / "none.json")])
    assert one.exit_code == 0, one.output
    assert len(drain(queue_url)) == 2
    env.setenv("ZSYNC_DATABASE_URL", DOWN_DB)
    reset_settings()
    down = runner.invoke(app, ["replay", "--stack-file", str(tmp_path / "none.json")])
    assert down.exit_code == 1 and "left" in down.output
    env.delenv("ZSYNC_DLQ_URL")
    reset_settings()
    none = runner.invoke(app, ["replay", "--stack-file", str(tmp_path / "none.json")])
    assert none.exit_code == 2


# --- every dead-letter shape the code writes, replayed (issue 18 item 4) ----------------------------------------


def test_replay_reads_every_dead_letter_shape_the_code_writes(env, queue_url, database_url, tables_service, tmp_path):
    """Each shape is written by the code that writes it (the handler with a dependency down, the inbox consumer's
    poison path) or, for the inbox's own shape that older versions wrote, as they wrote it; one replay applies
    every readable one and rejects only the unreadable one, with its problems."""
    from shared.adapters.trigger_inbox import Message
    from shared.core.spec import FUNCTIONS
    from shared.services.inbox_consumer import InboxConsumer, _field_names_of
    from shared.services.sync import SyncContext

    ids = {name: uid(f"shape-{name}") for name in ("flat", "wrapped", "inbox", "legacy", "legacy_ids", "hook")}
    ts = "2025-12-22T10:00:00Z"
    # 1-2. a Zap's body, flat and wrapped, while the database is down (deliveries.dead_letter_delivery)
    env.setenv("ZSYNC_DATABASE_URL", DOWN_DB)
    reset_settings()
    assert post("agent_jobs_to_supabase", {"id": ids["flat"], "status": "flat", "updated_at": ts}).status_code == 503
    assert post("agent_jobs_to_supabase", {"record": {"id": ids["wrapped"], "status": "wrapped"},
                                           "edited_at": ts}).status_code == 503
    env.setenv("ZSYNC_DATABASE_URL", database_url)
    reset_settings()
    # 3. a webhook while Zapier Tables is down (deliveries.dead_letter_delivery, *_to_tables)
    query(database_url, "INSERT INTO agent_jobs (id, status, updated_at) VALUES (%s, 'hook', %s)", (ids["hook"], ts))
    [(record,)] = query(database_url, "SELECT to_jsonb(t) FROM agent_jobs t WHERE id = %s", (ids["hook"],))
    env.setenv("ZSYNC_ZAPIER_BASE_URL", f"http://127.0.0.1:{free_port()}")
    env.setenv("ZSYNC_OUTBOX_BATCHES", "false")  # (with batches the outbox keeps it pending instead)
    reset_settings()
    hook = {"type": "UPDATE", "table": "agent_jobs", "schema": "public", "record": record, "old_record": None}
    assert post("agent_jobs_to_tables", hook).status_code == 503
    env.setenv("ZSYNC_ZAPIER_BASE_URL", tables_service.url)
    env.delenv("ZSYNC_OUTBOX_BATCHES")
    reset_settings()
    # 4. an inbox message leased too often (InboxConsumer._poison), keyed by field ids as Zapier sends them
    fn = FUNCTIONS["agent_jobs_to_supabase"]
    ctx = SyncContext(settings=get_settings())
    with tables_service.client() as c:
        keys = {f.name: f.key for f in c.field_map(tables_service.ids["agent_jobs"]).fields}
    event = {"id": "01KINBOXRECORD", "edited_at": ts,
             "data": {keys["id"]: ids["inbox"], keys["status"]: "inbox", keys["updated_at"]: ts}}
    message = Message(id="m-inbox", created_at=ts, lease_count=6, possible_duplicate_data=True, error_message=None,
                      payload=event)
    consumer = InboxConsumer(fn, ctx, None, "inbox-id", field_names=_field_names_of(ctx, fn))  # type: ignore[arg-type]
    consumer._poison(message, DrainReport("inbox-id"))
    # 5-6. the inbox's own shape, as earlier versions wrote every poison message (by name, by field id)
    legacy = {"id": "01KLEGACY", "edited_at": ts, "data": {"id": ids["legacy"], "status": "legacy", "updated_at": ts}}
    legacy_ids = {"id": "01KLEGACYIDS", "edited_at": ts,
                  "data": {keys["id"]: ids["legacy_ids"], keys["status"]: "legacy_ids", keys["updated_at"]: ts}}
    unreadable = {"id": "01KUNREADABLE", "data": {"f999": "who?"}}
    enqueue(*(letter("agent_jobs_to_supabase", {"inbox_message": f"m-{n}", "payload": p})
              for n, p in (("legacy", legacy), ("legacy_ids", legacy_ids), ("unreadable", unreadable))))

    letters = [m.letter for m in drain(queue_url)]
    assert len(letters) == 7 and all(DeadLetter.from_body(lt.to_body()) == lt for lt in letters)  # each round-trips
    poisoned = next(lt for lt in letters if lt.record_id == ids["inbox"])
    assert poisoned.payload == {"id": ids["inbox"], "status": "inbox", "updated_at": ts, "edited_at": ts}

    out = tmp_path / "rejected.jsonl"
    report = replay.replay(get_settings(), rejected_file=out)
    assert report.total("applied") == 6 and report.total("rejected") == 1 and report.total("left") == 0, report
    for name, rid in ids.items():
        assert query(database_url, "SELECT status FROM agent_jobs WHERE id = %s", (rid,)) == [(name,)], name
    with tables_service.client() as client:
        found = list(client.iter_records(tables_service.ids["agent_jobs"], filters={"id": ids["hook"]}))
    assert [r.data["status"] for r in found] == ["hook"]
    [line] = out.read_text().splitlines()
    assert json.loads(line)["problems"][0]["field"] == "payload.data.f999"
