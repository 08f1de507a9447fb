"""Child process of ``bench.coldstart``: a fresh interpreter that loads one function the way
functions-framework does (``create_app`` on functions/main.py), answers its first delivery, and prints
JSON timings on its last line. With ``--warm N`` it then answers N more deliveries in-process and reports
the request thread's CPU per delivery (no I/O wait counted) and where the wall time and the CPU went
(parse, DB, Tables, log, the rest), per delivery.

    python bench/probe.py TARGET BODIES.jsonl [--warm N] [--lambda] [--insert] [--source FILE]

BODIES.jsonl: one JSON body per line (the first is the cold delivery). Settings come from ZSYNC_* as for a
function process. Imports nothing of zsync before the function itself. With ``--insert`` the warm bodies are
Supabase webhooks whose record is first inserted for real (``insert_webhook``, as the owner
``$ZSYNC_BENCH_OWNER_URL``), so a ``*_to_tables`` delivery takes the path a real webhook takes: the change
is in the outbox and the function drains it.
"""

from __future__ import annotations

import time

STARTED = time.time()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MAIN = REPO / "functions" / "main.py"


def _headers() -> dict[str, str]:
    return {os.environ.get("ZSYNC_SECRET_HEADER", "X-Zsync-Secret"): os.environ["ZSYNC_WEBHOOK_SECRET"],
            "Content-Type": "application/json"}


def _lambda_event(body: str) -> dict:
    return {"version": "2.0", "rawPath": "/", "rawQueryString": "", "isBase64Encoded": False,
            "headers": {k.lower(): v for k, v in _headers().items()} | {"host": "x.lambda-url.on.aws"},
            "requestContext": {"http": {"method": "POST", "path": "/", "protocol": "HTTP/1.1",
                                        "sourceIp": "127.0.0.1", "userAgent": "bench"}},
            "body": body}


def insert_webhook(conn: Any, template: str) -> str:
    """Insert the template webhook's record as a Supabase client would (its triggers version it and capture it
    in the outbox) and return the webhook Supabase sends for that insert: the stored row."""
    hook = json.loads(template)
    table, record = hook["table"], hook["record"]
    cols = ", ".join(f'"{c}"' for c in record)
    row = conn.execute(f'INSERT INTO public."{table}" AS t ({cols}) SELECT {cols} FROM '
                       f'jsonb_populate_record(NULL::public."{table}", %s::jsonb) RETURNING to_jsonb(t)',
                       (json.dumps(record),)).fetchone()[0]
    return json.dumps(hook | {"record": row})


def _no_insert(body: str) -> str:
    return body


class Breakdown:
    """Exclusive wall time and CPU time of the request thread per category (a DB transaction that calls
    Tables counts the Tables call once)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._stack: list[list[float]] = []

    @contextlib.contextmanager
    def timing(self, category: str) -> Iterator[None]:
        """Count the block's wall and CPU time to ``category``, less that of timed blocks nested inside it."""
        self._stack.append([0.0, 0.0])
        start, cpu_start = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
            inner, inner_cpu = self._stack.pop()
            self.totals[category] = self.totals.get(category, 0.0) + elapsed - inner
            self.cpu[category] = self.cpu.get(category, 0.0) + cpu - inner_cpu
            if self._stack:
                self._stack[-1][0] += elapsed
                self._stack[-1][1] += cpu

    def wrap(self, owner: object, name: str, category: str) -> None:
        original = getattr(owner, name, None)
        if original is None or not callable(original):
            return

        def timed(*args, **kwargs):
            with self.timing(category):
                return original(*args, **kwargs)

        setattr(owner, name, timed)


def instrument() -> Breakdown:
    """Wrap the entry points of each part (looked up by name; a renamed one is simply not split out). DB is
    the time spent in psycopg and its pool (connections, BEGIN/COMMIT, statements, reading results); our own
    code inside a transaction (planning a batch, audit entries) counts as the rest."""
    import logging

    import psycopg
    import psycopg_pool

    import shared.edge.handler
    import shared.platform.logs
    import shared.services.sync

    b = Breakdown()
    b.wrap(shared.edge.handler, "read_json_body", "parse")
    for module in (shared.services.sync, sys.modules.get("shared.services.outbox_batch")):
        for name in ("parse_tables_record", "parse_supabase_record", "to_tables_fields", "unwrap_tables_payload"):
            b.wrap(module, name, "parse")  # a module not loaded (None) or without the name: not split out
    for owner, names in ((psycopg.Connection, ("execute", "commit", "rollback")),
                         (psycopg.Cursor, ("execute", "fetchone", "fetchall", "fetchmany")),
                         (psycopg.Transaction, ("__enter__", "__exit__")),
                         (psycopg_pool.ConnectionPool, ("getconn", "putconn"))):
        for name in names:
            b.wrap(owner, name, "db")
    for module_name, cls_name in (("shared.adapters.zapier_tables", "TablesClient"),
                                  ("shared.adapters.catch_hook", "CatchHookWriter")):
        if (module := sys.modules.get(module_name)) is not None:
            cls = getattr(module, cls_name, None)
            for attr in [a for a in dir(cls) if cls is not None and not a.startswith("_")]:
                if callable(getattr(cls, attr, None)) and not isinstance(getattr(cls, attr), type):
                    b.wrap(cls, attr, "tables")
    b.wrap(getattr(shared.platform.logs, "StructuredStdoutHandler", logging.Handler), "handle", "log")
    return b


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("bodies", type=Path)
    parser.add_argument("--warm", type=int, default=0)
    parser.add_argument("--lambda", dest="via_lambda", action="store_true", help="through functions/lambda_adapter")
    parser.add_argument("--insert", action="store_true", help="insert each warm webhook's record first")
    parser.add_argument("--source", type=Path, default=MAIN, help="the functions-framework source (a floor target)")
    args = parser.parse_args()
    bodies = args.bodies.read_text().splitlines()
    sys.path.insert(0, str(REPO))

    if args.via_lambda:
        os.environ["ZSYNC_FUNCTION"] = args.target
        from functions.lambda_adapter import handler

        imported = time.time()

        def deliver(body: str) -> int:
            return handler(_lambda_event(body), None)["statusCode"]
    else:
        import functions_framework

        app = functions_framework.create_app(target=args.target, source=str(args.source))
        client = app.test_client()
        imported = time.time()

        def deliver(body: str) -> int:
            return client.post("/", data=body, headers=_headers()).status_code

    status = deliver(bodies[0])
    first = time.time()
    cpu_first = time.process_time()
    print("PROBE first answer", file=sys.stderr, flush=True)  # -X importtime lines after this are not counted
    result = {"started": STARTED, "imported": imported, "first": first, "status": status,
              "cpu_first": cpu_first}  # the whole process's CPU so far (interpreter start included)

    if args.warm:
        warm = bodies[1:1 + args.warm]
        prepare = _no_insert
        if args.insert:  # after the cold answer: the function has imported psycopg already
            import psycopg

            owner = psycopg.connect(os.environ["ZSYNC_BENCH_OWNER_URL"], autocommit=True)

            def prepare(body: str) -> str:
                return insert_webhook(owner, body)

        half = len(warm) // 2
        cpu, statuses = [], []
        for template in warm[:half]:  # CPU of the request thread, uninstrumented
            body = prepare(template)  # before the clock starts
            c0 = time.thread_time()
            statuses.append(deliver(body))
            cpu.append(time.thread_time() - c0)
        breakdown = instrument()
        wall, cpu_split = [], []
        for template in warm[half:]:  # where the wall time and the CPU go
            body = prepare(template)
            before = dict(breakdown.cpu)
            w0, c0 = time.perf_counter(), time.thread_time()
            statuses.append(deliver(body))
            wall.append(time.perf_counter() - w0)
            cpu_split.append({"total": time.thread_time() - c0} | {
                k: v - before.get(k, 0.0) for k, v in breakdown.cpu.items()})
        result.update(cpu=cpu, wall=wall, breakdown=breakdown.totals, cpu_split=cpu_split,
                      statuses=sorted(set(statuses)))

    from shared.platform import logs

    getattr(logs, "flush", lambda: None)()  # lines held while google-cloud-logging imports
    print("PROBE " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
