"""The HTTP edge shared by the seven functions: authenticate, read and parse the body, call
:mod:`shared.sync`, answer JSON. Every answer names the outcome; every error names what was wrong and
where, and never echoes a secret or a stack trace.

Status codes: 200 applied / unchanged / skipped_stale / ignored / ping; 400 invalid record or payload;
401 missing or wrong secret (except the two wake-ups, which carry none and read nothing: ``?zsync_wake=inbox``
on a ``*_to_supabase`` function, ``?zsync_wake=outbox`` on a ``*_to_tables`` function - docs/security.md);
405 not POST; 413 body too large; 415 not JSON; 500 misconfigured or
internal error; 502 Zapier Tables refused our write; 503 a dependency was unreachable (the delivery was
dead-lettered for replay).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import flask
import psycopg
from psycopg_pool import PoolTimeout
from pydantic import ValidationError

from shared import audit, supabase_db
from shared.conflict import Outcome
from shared.logs import get_logger, log_event
from shared.mapping import InvalidRecord
from shared.settings import Settings, get_settings
from shared.spec import FUNCTIONS, Direction, FunctionSpec
from shared.sync import (
    ConfigurationError,
    SupabaseWebhook,
    SyncContext,
    SyncResult,
    apply_from_supabase,
    apply_from_tables,
    change_time,
    unwrap_tables_payload,
)

# Cold start: only what a delivery needs is imported with this module. The dead-letter queue (errors), the
# migration check (the signed ping) and the Zapier Tables client (only *_to_tables functions use it) are
# imported where they are used.
PING = "zsync_ping"
WAKE_PARAM = "zsync_wake"  # notification_url = <function URL>?zsync_wake=inbox (see shared.inbox_consumer)
OUTBOX_WAKE = "outbox"  # the Database Webhook: <*_to_tables URL>?zsync_wake=outbox (see shared.webhook_sql)
_contexts: dict[str, SyncContext] = {}


class Rejected(Exception):
    def __init__(self, status: int, problems: list[dict[str, str]], record_id: str | None = None):
        self.status = status
        self.problems = problems
        self.record_id = record_id
        super().__init__(problems)


def context_for(fn: FunctionSpec, settings: Settings) -> SyncContext:
    ctx = _contexts.get(fn.name)
    if ctx is None or ctx.settings is not settings:
        ctx = _contexts[fn.name] = SyncContext(settings=settings, logger=get_logger(fn.name))
    return ctx


def is_authorized(request: flask.Request, settings: Settings) -> bool:
    """Constant-time comparison against every accepted secret (two during a rotation)."""
    given = request.headers.get(settings.secret_header, "").encode("utf-8", "surrogateescape")
    ok = False
    for secret in settings.accepted_secrets():
        ok |= hmac.compare_digest(given, secret.encode("utf-8"))
    return ok


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_json_body(request: flask.Request, max_bytes: int) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > max_bytes:
        raise Rejected(413, [{"field": "body", "problem": f"larger than the {max_bytes}-byte limit"}])
    body = request.stream.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise Rejected(413, [{"field": "body", "problem": f"larger than the {max_bytes}-byte limit"}])
    request.environ["zsync.body"] = body
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        got = mimetype or "none"
        raise Rejected(415, [{"field": "Content-Type", "problem": f"expected application/json, got {got!r}"}])
    if not body.strip():
        raise Rejected(400, [{"field": "body", "problem": "empty body; expected a JSON object"}])
    try:
        payload = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise Rejected(400, [{"field": "body", "problem": f"not UTF-8 at byte {exc.start}"}]) from None
    except json.JSONDecodeError as exc:
        problem = f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        raise Rejected(400, [{"field": "body", "problem": problem}]) from None
    except (ValueError, RecursionError) as exc:
        raise Rejected(400, [{"field": "body", "problem": str(exc)[:200]}]) from None
    if not isinstance(payload, dict):
        raise Rejected(400, [{"field": "body", "problem": f"expected a JSON object, got {type(payload).__name__}"}])
    return payload


def _webhook(payload: dict[str, Any]) -> SupabaseWebhook:
    try:
        return SupabaseWebhook.model_validate(payload)
    except ValidationError as exc:
        problems = [
            {"field": ".".join(map(str, e["loc"])) or "body", "problem": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise Rejected(400, problems) from None


def _record_id(payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return None
    """The id a rejected delivery is attributed to: only one that can be stored (audit_log.resource_id)."""
    record = payload.get("record")
    if record is None and isinstance(payload.get("old_record"), dict):  # a DELETE webhook: the deleted row's id
        record = payload["old_record"]
    candidate = record.get("id") if isinstance(record, dict) else payload.get("id")
    if not isinstance(candidate, str) or len(candidate) > 200 or "\x00" in candidate:
        return None
    try:
        candidate.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return None
    return candidate


def process(fn: FunctionSpec, ctx: SyncContext, payload: dict[str, Any],
            received_at: datetime | None = None, origin: str = "live") -> SyncResult:
    """Run one parsed delivery through the sync (also used by replay, with the original arrival time and
    ``origin="replay"``)."""
    try:
        if fn.direction is Direction.TO_SUPABASE:
            changed_at, source = change_time(payload, received_at or datetime.now(UTC))
            return apply_from_tables(ctx, fn, unwrap_tables_payload(payload), received_at, changed_at=changed_at,
                                     changed_at_source=source, origin=origin)
        hook = _webhook(payload)
        if ctx.settings.outbox_batches and origin == "live":
            from shared.outbox_batch import deliver

            return deliver(ctx, fn, hook, origin=origin)
        return apply_from_supabase(ctx, fn, hook, origin=origin)
    except InvalidRecord as exc:
        raise Rejected(400, exc.problems, _record_id(payload)) from None


def _tables_errors() -> tuple[type[Exception], ...]:
    """The Tables client's errors, once it is loaded: a function that never loaded it cannot have raised one.
    The module can be in ``sys.modules`` half imported (another request's thread is importing it, e.g. the
    first scheduled trash check): its classes not defined yet, so none of them can have been raised either.
    (Reading the attribute then raised AttributeError inside the ``except`` clause: a 500, no dead letter.)"""
    error = getattr(sys.modules.get("shared.zapier_tables"), "TablesError", None)
    return (error,) if error is not None else ()


def _tables_rejected(exc: Exception) -> bool:
    rejected = getattr(sys.modules.get("shared.zapier_tables"), "TablesRejected", None)
    return rejected is not None and isinstance(exc, rejected)


_TRACE_ID = re.compile(r"[0-9a-fA-F]{16,32}|1-[0-9a-f]{8}-[0-9a-f]{24}")


def trace_id(request: flask.Request) -> str:
    """The delivery's correlation id: the caller's trace (W3C ``traceparent``, Google's
    ``X-Cloud-Trace-Context``, AWS's ``X-Amzn-Trace-Id`` Root) when it sends one, else a fresh one."""
    candidates = [
        (request.headers.get("traceparent") or "").split("-")[1:2],
        (request.headers.get("X-Cloud-Trace-Context") or "").split("/")[:1],
        [part[5:] for part in (request.headers.get("X-Amzn-Trace-Id") or "").split(";") if part.startswith("Root=")],
    ]
    for found in candidates:
        if found and _TRACE_ID.fullmatch(found[0]):
            return found[0]
    return uuid.uuid4().hex


def _record_failure(fn: FunctionSpec, ctx: SyncContext, body: bytes, rejected: Rejected,
                    declared_bytes: int | None = None) -> bool:
    """Best effort ``sync_failed`` audit entry; the log line is written either way, and a failure to audit
    never turns the 4xx into a 500."""
    try:
        entry = audit.failed_entry(fn, body, rejected.problems, datetime.now(UTC), rejected.record_id,
                                   rejected.status, declared_bytes)

        def work(conn: psycopg.Connection) -> None:
            supabase_db.append_audit(conn, entry)
            _count_failure(conn, fn, rejected.record_id, rejected.problems)

        ctx.db.run(work)
        return True
    except (supabase_db.DatabaseUnavailable, ConfigurationError, psycopg.Error, ValueError):
        return False


def _count_failure(conn: psycopg.Connection, fn: FunctionSpec, record_id: str | None,
                   problems: list[dict[str, str]]) -> None:
    """A Supabase change this function cannot deliver (its retry would fail the same way): count it on the
    record's outbox entries, which are parked (``dead_letter``, with the reason) after a few attempts, so the
    sweeper stops re-sending them. The ``sync_failed`` entry makes it visible to the monitor."""
    if fn.direction is Direction.TO_TABLES and record_id is not None:
        reason = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)[:2000]
        if supabase_db.outbox_failed(conn, fn.table, record_id, reason):
            log_event(logging.getLogger("zsync"), logging.ERROR, "outbox_parked", table=fn.table.name,
                      id=record_id, reason=reason)


def _dead_letter(fn: FunctionSpec, ctx: SyncContext, payload: dict[str, Any], exc: Exception, started: float) -> bool:
    """A delivery that could not be applied after the in-function retries: write a best-effort
    ``sync_failed`` audit entry (skipped when the database itself is down: it was just given its whole retry
    budget) and store the delivery whole in the dead-letter queue for ``zsync replay``. A 4xx the Tables API
    answered to our own write is not dead-lettered (replaying it would fail the same way). -> stored?"""
    from shared import dead_letter

    received_at = datetime.now(UTC) - timedelta(seconds=time.perf_counter() - started)
    record_id = _record_id(payload)
    audited = False
    if not isinstance(exc, supabase_db.DatabaseUnavailable):
        problems = [{"field": "dependency", "problem": f"{type(exc).__name__}: {str(exc)[:200]}"}]
        body = dead_letter.canonical_json(payload).encode("utf-8", "surrogatepass")
        entry = audit.failed_entry(fn, body, problems, datetime.now(UTC), record_id, 503)
        rejected = _tables_rejected(exc)

        def work(conn: psycopg.Connection) -> None:
            supabase_db.append_audit(conn, entry)
            if rejected:  # Zapier Tables refuses this version: a re-send fails the same way
                _count_failure(conn, fn, record_id, problems)

        try:
            ctx.db.run(work)
            audited = True
        except (supabase_db.DatabaseUnavailable, ConfigurationError, psycopg.Error):
            pass
    if _tables_rejected(exc):
        return False
    letter = dead_letter.DeadLetter.new(fn.name, payload, exc, received_at=received_at, table=fn.table.name,
                                        record_id=record_id, audited=audited)
    problem = dead_letter.dead_letter(ctx.settings, letter)
    if problem is None:
        log_event(ctx.logger, logging.WARNING, "dead_lettered", key=letter.key, id=record_id, audited=audited)
    else:
        log_event(ctx.logger, logging.ERROR, "dead_letter_failed", key=letter.key, id=record_id, problem=problem,
                  safety_net="outbox sweeper / Zapier autoreplay")
    return problem is None


def _migrations_current(ctx: SyncContext) -> bool | None:
    """For the signed ping (``zsync doctor``): True/False, or None when the database can't be asked."""
    from shared import migrate

    try:
        with ctx.db.transaction() as conn:
            return not migrate.pending_on(conn)
    except (psycopg.Error, PoolTimeout, ConfigurationError, migrate.MigrationError):
        return None


def handle(function_name: str, request: flask.Request) -> tuple[dict[str, Any], int]:
    fn = FUNCTIONS[function_name]
    settings = get_settings()
    ctx = context_for(fn, settings)
    log = ctx.logger
    started = time.perf_counter()
    base = {"function": fn.name, "table": fn.table.name}
    trace = trace_id(request)

    def answer(status: int, outcome: Outcome | str, lag_ms: float | None = None, *, quiet: bool = False,
               **extra: Any) -> tuple[dict[str, Any], int]:
        body = {**base, "outcome": str(outcome), **{k: v for k, v in extra.items() if v is not None}}
        # One delivery line: function, table, record_id, outcome, lag_ms, duration_ms, trace_id (queryable
        # as jsonPayload.* in Cloud Logging and as fields in CloudWatch Logs Insights).
        level = logging.DEBUG if quiet else logging.INFO if status < 400 else logging.WARNING
        log_event(log, level, "delivery", status=status,
                  duration_ms=round((time.perf_counter() - started) * 1000, 1), record_id=body.get("id"),
                  lag_ms=lag_ms, trace_id=trace, **body)
        return body, status

    if request.method != "POST":
        return answer(405, Outcome.REJECTED, error="use POST")
    if WAKE_PARAM in request.args and fn.direction is Direction.TO_SUPABASE:
        return _wake(fn, ctx, answer)
    if request.args.get(WAKE_PARAM) == OUTBOX_WAKE and fn.direction is Direction.TO_TABLES:
        return _wake_outbox(fn, ctx, answer)
    if not settings.accepted_secrets():
        log_event(log, logging.ERROR, "misconfigured", problem="ZSYNC_WEBHOOK_SECRET is not set; refusing all")
        return answer(401, Outcome.REJECTED, error=f"missing or invalid {settings.secret_header} header")
    if not is_authorized(request, settings):
        return answer(401, Outcome.REJECTED, error=f"missing or invalid {settings.secret_header} header")

    payload: dict[str, Any] = {}
    try:
        payload = read_json_body(request, settings.max_body_bytes)
        if payload.get(PING) is True:
            return answer(200, "ping", migrations_current=_migrations_current(ctx))
        if payload == {"zsync": "check_trash"} and fn.direction is Direction.TO_SUPABASE:  # scheduled trash check
            from shared.tables_trash import idle_check, run_check

            checked, ok = run_check(fn.name, ctx)
            return answer(200 if ok else 503, checked.pop("outcome"), quiet=ok and idle_check(checked),
                          **{k: v for k, v in checked.items() if k not in base})
        result = process(fn, ctx, payload)
        return answer(200, result.outcome, lag_ms=result.lag_ms, id=result.id, detail=result.detail)
    except Rejected as exc:
        audited = _record_failure(fn, ctx, request.environ.get("zsync.body", b""), exc, request.content_length)
        return answer(exc.status, Outcome.REJECTED, id=exc.record_id, problems=exc.problems, audited=audited)
    except ConfigurationError as exc:
        log_event(log, logging.ERROR, "misconfigured", problem=str(exc))
        return answer(500, Outcome.FAILED, error="function is misconfigured; see its logs")
    except (supabase_db.DatabaseUnavailable, *_tables_errors()) as exc:
        log_event(log, logging.ERROR, "dependency_unavailable", error_type=type(exc).__name__,
                  error=str(exc)[:300])
        stored = _dead_letter(fn, ctx, payload, exc, started)
        if _tables_rejected(exc):  # upstream refused our write: retrying will not help
            return answer(502, Outcome.FAILED, dead_lettered=stored, error="Zapier Tables rejected the record; not "
                          "dead-lettered (a replay would fail the same way)")
        return answer(503, Outcome.FAILED, error="a dependency is unavailable; the delivery was not applied",
                      dead_lettered=stored)
    except Exception:
        log.exception("unexpected error", extra={"json_fields": {"event": "internal_error", **base}})
        return answer(500, Outcome.FAILED, error="internal error; see the function's logs")


def _wake(fn: FunctionSpec, ctx: SyncContext, answer: Callable[..., tuple[dict[str, Any], int]]
          ) -> tuple[dict[str, Any], int]:
    """A trigger-inbox notification: a wake-up only. It needs no secret because its body is never read:
    the function leases from its own inbox with its own credentials, so a caller can only make it drain
    what is already there."""
    from shared import inbox_consumer
    from shared.trigger_inbox import InboxError

    try:
        report = inbox_consumer.drain_function(fn, ctx, ctx.settings.inbox_drain_budget_s)
    except (ConfigurationError, ValueError) as exc:
        log_event(ctx.logger, logging.ERROR, "misconfigured", problem=str(exc))
        return answer(500, Outcome.FAILED, error="function is misconfigured; see its logs")
    except InboxError as exc:
        log_event(ctx.logger, logging.ERROR, "dependency_unavailable", error_type=type(exc).__name__,
                  error=str(exc)[:300])
        return answer(503, Outcome.FAILED, error="the trigger inbox is unavailable; messages stay in it")
    return answer(200, "drained", **report.as_json())


def _wake_outbox(fn: FunctionSpec, ctx: SyncContext, answer: Callable[..., tuple[dict[str, Any], int]]
                 ) -> tuple[dict[str, Any], int]:
    """A Database Webhook (or sweeper) wake-up of a *_to_tables function: it carries no secret, and nothing in
    it is read or trusted. The function drains its own table's outbox (the work queue Supabase's triggers fill
    in the writer's transaction), rate-limited per instance (:func:`shared.outbox_batch.wake`); the answer holds
    counts only."""
    from shared.outbox_batch import wake

    try:
        report = wake(ctx, fn)
    except ConfigurationError as exc:
        log_event(ctx.logger, logging.ERROR, "misconfigured", problem=str(exc))
        return answer(500, Outcome.FAILED, error="function is misconfigured; see its logs")
    except (supabase_db.DatabaseUnavailable, psycopg.Error, *_tables_errors()) as exc:
        log_event(ctx.logger, logging.ERROR, "dependency_unavailable", error_type=type(exc).__name__,
                  error=str(exc)[:300])
        return answer(503, Outcome.FAILED, error="a dependency is unavailable; the changes stay in the outbox")
    return answer(200, "drained", **report.as_json())


def make_target(function_name: str) -> Callable[[flask.Request], tuple[dict[str, Any], int]]:
    """A functions-framework HTTP target for one of :data:`shared.spec.FUNCTIONS`."""
    if function_name not in FUNCTIONS:
        raise KeyError(f"unknown function {function_name!r}")

    def target(request: flask.Request) -> tuple[dict[str, Any], int]:
        return handle(function_name, request)

    target.__name__ = target.__qualname__ = function_name
    target.__doc__ = f"Zap {FUNCTIONS[function_name].seed_zap}: {function_name.replace('_', ' ')}"
    return target
