"""The local Supabase Database Webhooks stand-in (infra/local/pg_net.sql + pgnet_sender.py).

Real Postgres (pgserver, one per test module and xdist worker), a real HTTP receiver on
127.0.0.1, and the exact trigger SQL that runs on Supabase.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pgserver
import psycopg
import pytest
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Request, Response

from infra.local.pgnet_http import ERR_COULDNT_CONNECT
from infra.local.pgnet_sender import PgNetSender
from infra.local.pgnet_sql import IN_FLIGHT_LOCK_KEY, apply_pg_net_sql, queue_depth, wait_idle

REPO_ROOT = Path(__file__).resolve().parent.parent
SLOW_HANDLER_S = 1.0

# ----------------------------------------------------------------------------------------------
# HTTP receiver
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """Records every request. The last path segment picks the answer: ok (200), fail (500), slow."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self._lock = threading.Lock()
        self._server: BaseWSGIServer = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def hits_for(self, prefix: str) -> list[Hit]:
        with self._lock:
            return [h for h in self.hits if h.path.startswith(prefix)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @Request.application  # type: ignore[misc]
    def _app(self, request: Request) -> Response:
        hit = Hit(
            method=request.method,
            path=request.path,
            query=parse_qs(request.query_string.decode()),
            headers=dict(request.headers.items()),
            body=request.get_data(),
        )
        with self._lock:
            self.hits.append(hit)
        behaviour = request.path.rstrip("/").rsplit("/", 1)[-1]
        if behaviour == "fail":
            return Response('{"error": "boom"}', status=500, content_type="application/json")
        if behaviour == "slow":
            time.sleep(SLOW_HANDLER_S)
        return Response('{"ok": true}', status=200, content_type="application/json")


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------


def _start_pg(tmp_dir: Path) -> pgserver.PostgresServer:
    return pgserver.get_server(tmp_dir, cleanup_mode="stop")


@pytest.fixture(scope="module")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    srv = _start_pg(tmp_path_factory.mktemp("pgnet_pg"))
    url = srv.get_uri()
    with psycopg.connect(url, autocommit=True) as conn:
        # The server default is NOT UTC, to prove pg_net.sql makes the database UTC like Supabase.
        conn.execute("ALTER SYSTEM SET timezone TO 'America/New_York'")
        conn.execute("SELECT pg_reload_conf()")
    apply_pg_net_sql(url)
    apply_pg_net_sql(url)  # idempotent
    yield url
    srv.cleanup()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    rec = Receiver()
    yield rec
    rec.close()


@pytest.fixture(scope="module")
def sender(pg_url: str) -> Iterator[PgNetSender]:
    s = PgNetSender(pg_url, poll_interval_s=0.1)
    s.start()
    assert s.wait_connected(10)
    yield s
    s.stop()


@pytest.fixture
def conn(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_url, autocommit=True) as c:
        yield c


DEMO_COLUMNS = """
    id integer primary key,
    name text,
    meta jsonb,
    tags text[],
    happened_at timestamptz,
    score double precision,
    n integer
"""

MakeTable = Callable[..., str]


def _create_demo(c: psycopg.Connection[Any], name: str | None = None) -> str:
    table = name or f"demo_{uuid.uuid4().hex[:8]}"
    c.execute(f"CREATE TABLE public.{table} ({DEMO_COLUMNS})")
    return table


def _add_trigger(c: psycopg.Connection[Any], table: str, trigger: str, *args: str) -> None:
    """The same statement a Supabase Database Webhook creates."""
    quoted = ", ".join("'" + a.replace("'", "''") + "'" for a in args)
    c.execute(
        f"CREATE TRIGGER {trigger} AFTER INSERT OR UPDATE ON public.{table} "
        f"FOR EACH ROW EXECUTE FUNCTION supabase_functions.http_request({quoted})"
    )


@pytest.fixture
def make_table(conn: psycopg.Connection[Any]) -> MakeTable:
    def make(*triggers: tuple[str, ...]) -> str:
        table = _create_demo(conn)
        for i, args in enumerate(triggers):
            _add_trigger(conn, table, f"{table}_hook_{i}", *args)
        return table

    return make


def _prefix() -> str:
    return f"/{uuid.uuid4().hex[:12]}"


def _insert_row(c: psycopg.Connection[Any], table: str, row_id: int = 1) -> None:
    c.execute(
        f"INSERT INTO public.{table} (id, name, meta, tags, happened_at, score, n) "
        "VALUES (%s, 'alpha', '{\"a\": {\"b\": [1, 2]}, \"s\": \"x\"}', ARRAY['x', 'y'], "
        "'2025-12-22 10:00:00+00', 0.5, 3)",
        (row_id,),
    )


def _responses(c: psycopg.Connection[Any], request_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    rows = c.execute(
        "SELECT id, status_code, content_type, headers, content, timed_out, error_msg "
        "FROM net._http_response WHERE id = ANY(%s) ORDER BY id",
        (request_ids,),
    ).fetchall()
    out: dict[int, list[dict[str, Any]]] = {i: [] for i in request_ids}
    for r in rows:
        out[r[0]].append(
            {
                "status_code": r[1],
                "content_type": r[2],
                "headers": r[3],
                "content": r[4],
                "timed_out": r[5],
                "error_msg": r[6],
            }
        )
    return out


def _hook_request_ids(c: psycopg.Connection[Any], table: str) -> list[int]:
    rows = c.execute(
        "SELECT request_id FROM supabase_functions.hooks WHERE hook_table_id = %s::regclass::oid ORDER BY id",
        (f"public.{table}",),
    ).fetchall()
    return [r[0] for r in rows]


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------


def test_grants_are_pg_nets_and_supabases(pg_url: str, conn: psycopg.Connection[Any]) -> None:
    """pg_net (0.12+) grants USAGE on net and ALL on its tables and sequences to PUBLIC: any role reads and
    changes a queued request, headers included; Supabase's grant_pg_net_access() lets postgres, anon,
    authenticated and service_role (not PUBLIC) execute http_get / http_post."""
    role = "pgnet_nobody_" + uuid.uuid4().hex[:8]
    conn.execute(f"CREATE ROLE {role} LOGIN")
    for api in ("anon", "authenticated", "service_role"):
        conn.execute(f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{api}') THEN "
                     f"CREATE ROLE {api} NOLOGIN; END IF; END $$")
    apply_pg_net_sql(conn)  # the API roles exist now: they get what Supabase gives them
    for relation in ("net.http_request_queue", "net._http_response"):
        for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE"):
            assert conn.execute("SELECT has_table_privilege(%s, %s, %s)", (role, relation, privilege)).fetchone()[0]
    assert conn.execute("SELECT has_sequence_privilege(%s, 'net.http_request_queue_id_seq', 'USAGE')",
                        (role,)).fetchone()[0]
    post = "net.http_post(text, jsonb, jsonb, jsonb, integer)"
    assert not conn.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')", (role, post)).fetchone()[0]
    for api in ("anon", "authenticated", "service_role"):
        assert conn.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE') AND "
                            "has_schema_privilege(%s, 'net', 'USAGE')", (api, post, api)).fetchone()[0]
    # What that means: whoever queues a request reads its headers back, and changes them, before commit.
    with psycopg.connect(pg_url) as writer:
        writer.execute("SET LOCAL ROLE anon")
        rid = writer.execute("SELECT net.http_post('http://127.0.0.1:9/x', '{}'::jsonb, '{}'::jsonb, "
                             "'{\"X-Example\": \"visible\"}'::jsonb)").fetchone()[0]
        assert writer.execute("UPDATE net.http_request_queue SET url = 'http://127.0.0.1:9/y' WHERE id = %s "
                              "RETURNING headers", (rid,)).fetchone()[0]["X-Example"] == "visible"
        writer.rollback()


def test_sql_is_idempotent_unlogged_security_definer_and_utc(pg_url: str, conn: psycopg.Connection[Any]) -> None:
    apply_pg_net_sql(conn)  # a third time, on a caller's connection
    persistence = dict(
        conn.execute(
            "SELECT relname, relpersistence FROM pg_class "
            "WHERE relnamespace = 'net'::regnamespace AND relkind = 'r' ORDER BY relname"
        ).fetchall()
    )
    assert persistence == {"_http_response": "u", "http_request_queue": "u"}
    funcs = conn.execute(
        "SELECT n.nspname || '.' || p.proname, p.prosecdef, p.proconfig FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE (n.nspname, p.proname) IN (('net', 'http_post'), ('net', 'http_get'), "
        "('supabase_functions', 'http_request'))"
    ).fetchall()
    assert sorted((f[0], f[1], f[2]) for f in funcs) == [
        ("net.http_get", True, ["search_path=net"]),
        ("net.http_post", True, ["search_path=net"]),
        ("supabase_functions.http_request", True, ["search_path=supabase_functions"]),
    ]
    defaults = conn.execute(
        "SELECT pg_get_function_arguments('net.http_post(text,jsonb,jsonb,jsonb,integer)'::regprocedure)"
    ).fetchone()
    assert defaults is not None
    assert "timeout_milliseconds integer DEFAULT 5000" in defaults[0]
    assert """'{"Content-Type": "application/json"}'::jsonb""" in defaults[0]
    # Server default is America/New_York (fixture); the database default set by pg_net.sql wins.
    with psycopg.connect(pg_url) as fresh:
        tz = fresh.execute("SHOW timezone").fetchone()
    assert tz == ("UTC",)
    assert (
        conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname IN ('net', 'supabase_functions')").fetchone()[0]
        == 2
    )


def test_insert_and_update_deliver_supabase_payload(
    conn: psycopg.Connection[Any],
    receiver: Receiver,
    sender: PgNetSender,
    make_table: MakeTable,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="zsync.pgnet_sender")
    prefix = _prefix()
    headers = '{"Content-Type":"application/json","X-Zsync-Secret":"s3"}'
    table = make_table((receiver.url(f"{prefix}/ok"), "POST", headers, "{}", "5000"))

    _insert_row(conn, table)
    sender.wait_idle(10)
    record = {
        "id": 1,
        "name": "alpha",
        "meta": {"a": {"b": [1, 2]}, "s": "x"},
        "tags": ["x", "y"],
        "happened_at": "2025-12-22T10:00:00+00:00",
        "score": 0.5,
        "n": 3,
    }
    hits = receiver.hits_for(prefix)
    assert len(hits) == 1
    assert hits[0].method == "POST"
    assert hits[0].headers["X-Zsync-Secret"] == "s3"
    assert hits[0].headers["Content-Type"] == "application/json"
    assert hits[0].json() == {
        "type": "INSERT",
        "table": table,
        "schema": "public",
        "record": record,
        "old_record": None,
    }

    conn.execute(f"UPDATE public.{table} SET name = 'beta', score = 1.25, tags = '{{}}' WHERE id = 1")
    sender.wait_idle(10)
    hits = receiver.hits_for(prefix)
    assert len(hits) == 2
    assert hits[1].json() == {
        "type": "UPDATE",
        "table": table,
        "schema": "public",
        "record": {**record, "name": "beta", "score": 1.25, "tags": []},
        "old_record": record,
    }

    hooks = conn.execute(
        "SELECT hook_table_id, hook_name, request_id FROM supabase_functions.hooks "
        "WHERE hook_table_id = %s::regclass::oid ORDER BY id",
        (f"public.{table}",),
    ).fetchall()
    oid = conn.execute("SELECT %s::regclass::oid::int", (f"public.{table}",)).fetchone()
    assert oid is not None
    assert [(h[0], h[1]) for h in hooks] == [(oid[0], f"{table}_hook_0")] * 2
    assert "-> HTTP 200" in caplog.text
    assert "s3" not in caplog.text  # header values are never logged
    responses = _responses(conn, [h[2] for h in hooks])
    for rows in responses.values():
        assert len(rows) == 1
        assert rows[0]["status_code"] == 200
        assert rows[0]["timed_out"] is False
        assert rows[0]["error_msg"] is None
        assert rows[0]["content"] == '{"ok": true}'
        assert rows[0]["content_type"] == "application/json"


def test_session_timezone_shapes_the_payload_like_on_supabase(
    conn: psycopg.Connection[Any], receiver: Receiver, sender: PgNetSender, make_table: MakeTable
) -> None:
    """Documented caveat: a client that changes its session TimeZone changes the timestamps sent."""
    prefix = _prefix()
    table = make_table((receiver.url(f"{prefix}/ok"), "POST"))
    conn.execute("SET timezone TO 'Europe/Paris'")
    _insert_row(conn, table)
    sender.wait_idle(10)
    assert receiver.hits_for(prefix)[0].json()["record"]["happened_at"] == "2025-12-22T11:00:00+01:00"


def test_failures_are_recorded_once_and_never_retried(
    conn: psycopg.Connection[Any], receiver: Receiver, sender: PgNetSender, make_table: MakeTable
) -> None:
    prefix = _prefix()
    with socket.socket() as closed:  # bound but not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        refused_url = f"http://127.0.0.1:{closed.getsockname()[1]}{prefix}/refused"
        before = sender.stats()
        table = make_table(
            (receiver.url(f"{prefix}/fail"), "POST", "null", "null", "5000"),
            (refused_url, "POST", "null", "null", "5000"),
            (receiver.url(f"{prefix}/slow"), "POST", "null", "null", "300"),
        )
        started = time.monotonic()
        _insert_row(conn, table)
        sender.wait_idle(10)
        elapsed = time.monotonic() - started
        time.sleep(0.6)  # several poll intervals: a retry would show up now
    assert elapsed < SLOW_HANDLER_S  # the slow receiver was cut off at 300 ms, not waited for

    fail_id, refused_id, slow_id = _hook_request_ids(conn, table)
    assert len(receiver.hits_for(f"{prefix}/fail")) == 1
    assert len(receiver.hits_for(f"{prefix}/slow")) == 1
    responses = _responses(conn, [fail_id, refused_id, slow_id])
    assert [len(responses[i]) for i in (fail_id, refused_id, slow_id)] == [1, 1, 1]

    fail = responses[fail_id][0]
    assert (fail["status_code"], fail["error_msg"], fail["timed_out"]) == (500, None, False)
    assert fail["content"] == '{"error": "boom"}'

    refused = responses[refused_id][0]  # pg_net records transport failures as (id, error_msg) only
    assert (refused["status_code"], refused["timed_out"], refused["error_msg"]) == (None, None, ERR_COULDNT_CONNECT)

    slow = responses[slow_id][0]
    assert slow["status_code"] is None and slow["timed_out"] is None
    assert slow["error_msg"].startswith("Timeout of 300 ms reached. Total time: ")

    assert queue_depth(conn) == 0
    after = sender.stats()
    assert after["http_errors"] - before["http_errors"] == 1
    assert after["failed"] - before["failed"] == 1
    assert after["timed_out"] - before["timed_out"] == 1


def test_default_arguments_params_and_get(
    conn: psycopg.Connection[Any], receiver: Receiver, sender: PgNetSender, make_table: MakeTable
) -> None:
    prefix = _prefix()
    table = make_table(
        (receiver.url(f"{prefix}/missing/ok"), "POST"),
        (receiver.url(f"{prefix}/nulls/ok"), "POST", "null", "null", "null"),
        (receiver.url(f"{prefix}/params/ok"), "POST", "null", '{"source": "zsync test", "n": "1"}', "null"),
        (receiver.url(f"{prefix}/get/ok?x=1"), "GET", '{"X-Zsync-Secret": "s3"}', '{"y": "a&b"}', "2000"),
    )
    with conn.transaction():  # the queued rows are visible to the inserting transaction only
        _insert_row(conn, table)
        queued = conn.execute(
            "SELECT q.method, q.url, q.headers, q.timeout_milliseconds, q.body IS NULL FROM net.http_request_queue q "
            "JOIN supabase_functions.hooks h ON h.request_id = q.id "
            "WHERE h.hook_table_id = %s::regclass::oid ORDER BY h.id",
            (f"public.{table}",),
        ).fetchall()
    json_ct = {"Content-Type": "application/json"}
    assert queued == [
        ("POST", receiver.url(f"{prefix}/missing/ok"), json_ct, 1000, False),
        ("POST", receiver.url(f"{prefix}/nulls/ok"), json_ct, 1000, False),
        ("POST", receiver.url(f"{prefix}/params/ok?n=1&source=zsync%20test"), json_ct, 1000, False),
        ("GET", receiver.url(f"{prefix}/get/ok?x=1&y=a%26b"), {"X-Zsync-Secret": "s3"}, 2000, True),
    ]
    sender.wait_idle(10)
    by_path = {h.path.removeprefix(prefix): h for h in receiver.hits_for(prefix)}
    assert set(by_path) == {"/missing/ok", "/nulls/ok", "/params/ok", "/get/ok"}
    for path in ("/missing/ok", "/nulls/ok", "/params/ok"):
        assert by_path[path].headers["Content-Type"] == "application/json"
        assert by_path[path].json()["type"] == "INSERT"
    assert by_path["/params/ok"].query == {"n": ["1"], "source": ["zsync test"]}
    get = by_path["/get/ok"]
    assert (get.method, get.body, get.query) == ("GET", b"", {"x": ["1"], "y": ["a&b"]})
    assert get.headers["X-Zsync-Secret"] == "s3"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("null", "POST"), "url argument is missing"),
        (("http://127.0.0.1:9/x",), "method argument is missing"),
        (("http://127.0.0.1:9/x", "null"), "method argument is missing"),
        (("http://127.0.0.1:9/x", "PUT"), "method argument PUT is invalid"),
    ],
)
def test_argument_errors_abort_the_write(
    conn: psycopg.Connection[Any], make_table: MakeTable, args: tuple[str, ...], message: str
) -> None:
    table = make_table(args)
    with pytest.raises(psycopg.errors.RaiseException, match=message):
        _insert_row(conn, table)
    assert conn.execute(f"SELECT count(*) FROM public.{table}").fetchone() == (0,)


def test_post_refuses_non_json_content_type(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.RaiseException, match='Content-Type header must be "application/json"'):
        conn.execute("""SELECT net.http_post('http://127.0.0.1:9/', '{}', '{}', '{"content-type": "text/plain"}')""")


def test_burst_of_500_inserts_in_one_transaction_is_all_delivered(
    conn: psycopg.Connection[Any], receiver: Receiver, sender: PgNetSender, make_table: MakeTable
) -> None:
    prefix = _prefix()
    table = make_table((receiver.url(f"{prefix}/ok"), "POST", "null", "null", "5000"))
    before = sender.stats()
    with conn.transaction():
        conn.execute(
            f"INSERT INTO public.{table} (id, name, tags, happened_at) "
            "SELECT g, 'row ' || g, ARRAY['t'], '2025-12-22T10:00:00Z'::timestamptz FROM generate_series(1, 500) g"
        )
    sender.wait_idle(15)
    hits = receiver.hits_for(prefix)
    assert sorted(h.json()["record"]["id"] for h in hits) == list(range(1, 501))
    after = sender.stats()
    assert after["batches"] - before["batches"] >= 3  # 200 + 200 + 100
    assert after["largest_batch"] == 200
    statuses = conn.execute(
        "SELECT r.status_code, count(*) FROM supabase_functions.hooks h JOIN net._http_response r "
        "ON r.id = h.request_id WHERE h.hook_table_id = %s::regclass::oid GROUP BY 1",
        (f"public.{table}",),
    ).fetchall()
    assert statuses == [(200, 500)]


def test_bad_rows_are_recorded_and_do_not_stop_the_sender(
    conn: psycopg.Connection[Any], receiver: Receiver, sender: PgNetSender
) -> None:
    prefix = _prefix()
    bad = conn.execute(
        "INSERT INTO net.http_request_queue (method, url, headers, body, timeout_milliseconds) VALUES "
        "('POST', 'not a url', '{}', NULL, 1000), "
        "('POST', %s, '[1, 2]', NULL, 1000), "
        "('POST', %s, '{}', NULL, -5), "
        "('POST', 'ftp://127.0.0.1/x', '{}', NULL, 1000) RETURNING id",
        (receiver.url(f"{prefix}/bad-headers"), receiver.url(f"{prefix}/bad-timeout")),
    ).fetchall()
    good = conn.execute(
        "SELECT net.http_post(%s, '{\"hello\": \"w\\u00f6rld\"}'::jsonb, '{}'::jsonb, "
        """'{"Content-Type": "application/json", "X-Count": 3}'::jsonb)""",
        (receiver.url(f"{prefix}/ok"),),
    ).fetchone()
    assert good is not None
    sender.wait_idle(10)
    ids = [r[0] for r in bad]
    responses = _responses(conn, [*ids, good[0]])
    for i in ids:
        assert len(responses[i]) == 1
        assert responses[i][0]["status_code"] is None and responses[i][0]["error_msg"]
    assert responses[good[0]][0]["status_code"] == 200
    hits = receiver.hits_for(prefix)
    assert [h.path for h in hits] == [f"{prefix}/ok"]
    assert hits[0].json() == {"hello": "wörld"}
    assert hits[0].headers["X-Count"] == "3"
    assert sender.running


def test_wait_idle_waits_for_a_batch_in_flight(pg_url: str, sender: PgNetSender) -> None:
    sender.wait_idle(10)
    with psycopg.connect(pg_url, autocommit=True) as holder:
        # What a sender holds from taking a batch until its outcomes are recorded.
        holder.execute("SELECT pg_advisory_lock_shared(%s)", (IN_FLIGHT_LOCK_KEY,))
        with pytest.raises(TimeoutError, match="a batch is in flight"):
            wait_idle(pg_url, 0.2)
    wait_idle(pg_url, 5)
    with psycopg.connect(pg_url) as in_tx:
        in_tx.execute("SELECT 1")
        with pytest.raises(ValueError, match="outside any transaction"):
            wait_idle(in_tx, 1)


def _restart(srv: pgserver.PostgresServer, down_s: float) -> None:
    """Stop the server (fast shutdown) and start it again on the same data dir and socket."""
    pg_ctl = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_ctl"
    subprocess.run(
        [str(pg_ctl), "-D", str(srv.pgdata), "-m", "fast", "-w", "stop"],
        check=True,
        user=srv.system_user,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=30,
    )
    time.sleep(down_s)
    srv.ensure_postgres_running()


def test_sender_reconnects_after_postgres_restart(tmp_path: Path, receiver: Receiver) -> None:
    srv = _start_pg(tmp_path / "pg")
    try:
        url = srv.get_uri()
        apply_pg_net_sql(url)
        prefix = _prefix()
        with psycopg.connect(url, autocommit=True) as c:
            table = _create_demo(c)
            _add_trigger(c, table, "hook", receiver.url(f"{prefix}/ok"), "POST", "null", "null", "5000")
            _insert_row(c, table, 1)
            with pytest.raises(TimeoutError, match="1 request"):  # no sender yet
                wait_idle(c, 0.2)
        with PgNetSender(url, poll_interval_s=0.1, reconnect_max_s=0.3) as sender:
            assert sender.wait_connected(10)
            sender.wait_idle(10)
            assert len(receiver.hits_for(prefix)) == 1

            _restart(srv, down_s=0.7)
            assert srv.get_uri() == url
            deadline = time.monotonic() + 10
            while sender.stats()["connects"] < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sender.stats()["connects"] >= 2

            with psycopg.connect(url, autocommit=True) as c:
                _insert_row(c, table, 2)
            sender.wait_idle(10)
            ids = [h.json()["record"]["id"] for h in receiver.hits_for(prefix)]
            assert ids == [1, 2]
    finally:
        srv.cleanup()


def test_cli_help_and_sigterm(pg_url: str) -> None:
    help_out = subprocess.run(
        [sys.executable, "-m", "infra.local.pgnet_sender", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "--database-url" in help_out.stdout

    def sender_sessions() -> int:
        with psycopg.connect(pg_url, autocommit=True) as c:
            row = c.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'zsync_pgnet_sender'"
            ).fetchone()
        return int(row[0]) if row else 0

    baseline = sender_sessions()  # the module's in-process sender may be connected too
    proc = subprocess.Popen(
        [sys.executable, "-m", "infra.local.pgnet_sender", "--database-url", pg_url, "--apply-sql"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and sender_sessions() <= baseline:
            time.sleep(0.05)
        assert sender_sessions() > baseline
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert "received SIGTERM" in stderr
