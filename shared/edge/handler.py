"""The HTTP edge shared by the seven functions: authenticate, read and parse the body, call
:mod:`shared.services.sync`, answer JSON. Every answer names the outcome; every error names what was wrong and
where, and never echoes a secret or a stack trace.

Status codes: 200 applied / unchanged / skipped_stale / ignored / ping; 400 invalid record or payload;
401 missing or wrong secret (except the two wake-ups, which carry none and are trusted for nothing:
``?zsync_wake=inbox`` on a ``*_to_supabase`` function, whose ``redelivery`` flag is read as a hint, and
``?zsync_wake=outbox`` on a ``*_to_tables`` function - docs/security.md);
405 not POST; 413 body too large; 415 not JSON; 500 misconfigured or
internal error; 502 Zapier Tables refused our write; 503 a dependency was unreachable (the delivery was
dead-lettered for replay), or - outcome ``queued``, with ``Retry-After`` - a Tables edit's delivery waits for an
earlier edit of its record that an inbox drain holds (nothing applied: send it again).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import flask
import psycopg
from psycopg_pool import PoolTimeout

from shared.adapters import lease_ledger, supabase_db
from shared.core.outcome import Outcome
from shared.core.spec import FUNCTIONS, Direction, FunctionSpec
from shared.platform.logs import log_event
from shared.platform.settings import Settings, get_settings
from shared.services.deliveries import (
    Rejected,
    context_for,
    dead_letter_delivery,
    process,
    record_failure,
    record_id_of,
    tables_errors,
    tables_rejected,
)
from shared.services.sync import ConfigurationError, SyncContext

# Cold start: only what a delivery needs is imported with this module. The dead-letter queue (errors), the
# migration check (the signed ping) and the Zapier Tables client (only *_to_tables functions use it) are
# imported where they are used.
PING = "zsync_ping"
NOTIFICATION_MAX_BYTES = 4096  # a trigger-inbox wake-up's body: {"inbox_id", "received_message_count", "redelivery"}
WAKE_PARAM = "zsync_wake"  # notification_url = <function URL>?zsync_wake=inbox (see shared.services.inbox_consumer)
HELD_BACK_RETRY_S = 5  # a direct delivery held back behind an earlier edit an inbox drain holds: retry after
Answer = tuple[dict[str, Any], int] | tuple[dict[str, Any], int, dict[str, str]]  # (body, status[, headers])
OUTBOX_WAKE = "outbox"  # the Database Webhook: <*_to_tables URL>?zsync_wake=outbox (see infra.deploy.webhook_sql)






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








def _migrations_current(ctx: SyncContext) -> bool | None:
    """For the signed ping (``zsync doctor``): True/False, or None when the database can't be asked."""
    from shared.adapters import migrations as migrate

    try:
        with ctx.db.transaction() as conn:
            return not migrate.pending_on(conn)
    except (psycopg.Error, PoolTimeout, ConfigurationError, migrate.MigrationError):
        return None


def handle(function_name: str, request: flask.Request) -> Answer:
    fn = FUNCTIONS[function_name]
    settings = get_settings()
    ctx = context_for(fn, settings)
    if ctx.pull_deliveries is None and fn.direction is Direction.TO_TABLES:
        ctx.pull_deliveries = _puller(ctx)
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
        return _wake(fn, ctx, answer, request)
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
            from shared.services.tables_trash import idle_check, run_check

            checked, ok = run_check(fn.name, ctx)
            return answer(200 if ok else 503, checked.pop("outcome"), quiet=ok and idle_check(checked),
                          **{k: v for k, v in checked.items() if k not in base})
        result = process(fn, ctx, payload)
        return answer(200, result.outcome, lag_ms=result.lag_ms, id=result.id, detail=result.detail)
    except lease_ledger.HeldBack as exc:  # nothing applied: the sender retries (the inbox also has the edit)
        log_event(log, logging.INFO, "delivery_held_back", ids=sorted(exc.record_ids))
        body, status = answer(503, Outcome.QUEUED, id=record_id_of(payload), retry_after_s=HELD_BACK_RETRY_S,
                              error="an earlier edit of this record is still being delivered (an inbox drain "
                                    "holds it); this one was not applied - send it again after it")
        return body, status, {"Retry-After": str(HELD_BACK_RETRY_S)}
    except Rejected as exc:
        audited = record_failure(fn, ctx, request.environ.get("zsync.body", b""), exc, request.content_length)
        return answer(exc.status, Outcome.REJECTED, id=exc.record_id, problems=exc.problems, audited=audited)
    except ConfigurationError as exc:
        log_event(log, logging.ERROR, "misconfigured", problem=str(exc))
        return answer(500, Outcome.FAILED, error="function is misconfigured; see its logs")
    except (supabase_db.DatabaseUnavailable, *tables_errors()) as exc:
        log_event(log, logging.ERROR, "dependency_unavailable", error_type=type(exc).__name__,
                  error=str(exc)[:300])
        stored = dead_letter_delivery(fn, ctx, payload, exc, started)
        if tables_rejected(exc):  # upstream refused our write: retrying will not help
            return answer(502, Outcome.FAILED, dead_lettered=stored, error="Zapier Tables rejected the record; not "
                          "dead-lettered (a replay would fail the same way)")
        return answer(503, Outcome.FAILED, error="a dependency is unavailable; the delivery was not applied",
                      dead_lettered=stored)
    except Exception:
        log.exception("unexpected error", extra={"json_fields": {"event": "internal_error", **base}})
        return answer(500, Outcome.FAILED, error="internal error; see the function's logs")


def _puller(ctx: SyncContext) -> Callable[[str], object]:
    """``SyncContext.pull_deliveries`` of a *_to_tables function: drain the named *_to_supabase function's inbox
    (:func:`shared.services.inbox_consumer.pull_deliveries`, a short budget; never raises)."""
    from shared.services import inbox_consumer

    return lambda name: inbox_consumer.pull_deliveries(FUNCTIONS[name], ctx)


def _wake(fn: FunctionSpec, ctx: SyncContext, answer: Callable[..., tuple[dict[str, Any], int]],
          request: flask.Request) -> tuple[dict[str, Any], int]:
    """A trigger-inbox notification: a wake-up only. It needs no secret because nothing in it is trusted:
    the function leases from its own inbox with its own credentials, so a caller can only make it drain
    what is already there. Its body, when it is the documented notification, only says whether this is a
    ``redelivery`` (logged and reported; the drain empties the inbox either way)."""
    from shared.adapters.trigger_inbox import InboxError, Notification
    from shared.services import inbox_consumer

    body = request.stream.read(NOTIFICATION_MAX_BYTES + 1)  # a hint (redelivery), never data; bounded
    notification = Notification.read(body) if len(body) <= NOTIFICATION_MAX_BYTES else None
    try:
        report = inbox_consumer.drain_function(fn, ctx, ctx.settings.inbox_drain_budget_s, notification)
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
    in the writer's transaction), rate-limited per instance (:func:`shared.services.outbox_batch.wake`); the
    answer holds counts only."""
    from shared.services.outbox_batch import wake

    try:
        report = wake(ctx, fn)
    except ConfigurationError as exc:
        log_event(ctx.logger, logging.ERROR, "misconfigured", problem=str(exc))
        return answer(500, Outcome.FAILED, error="function is misconfigured; see its logs")
    except (supabase_db.DatabaseUnavailable, psycopg.Error, *tables_errors()) as exc:
        log_event(ctx.logger, logging.ERROR, "dependency_unavailable", error_type=type(exc).__name__,
                  error=str(exc)[:300])
        return answer(503, Outcome.FAILED, error="a dependency is unavailable; the changes stay in the outbox")
    return answer(200, "drained", **report.as_json())


def make_target(function_name: str) -> Callable[[flask.Request], Answer]:
    """A functions-framework HTTP target for one of :data:`shared.core.spec.FUNCTIONS`."""
    if function_name not in FUNCTIONS:
        raise KeyError(f"unknown function {function_name!r}")

    def target(request: flask.Request) -> Answer:
        return handle(function_name, request)

    target.__name__ = target.__qualname__ = function_name
    target.__doc__ = f"Zap {FUNCTIONS[function_name].seed_zap}: {function_name.replace('_', ' ')}"
    return target
