"""One delivery through the sync, whatever brought it (a Zap's POST, a trigger-inbox lease, a Database
Webhook's signed payload, a replay): parse it, apply it (:mod:`shared.services.sync`, or the outbox batch for a
live ``*_to_tables`` webhook), and when it cannot be applied, say why in a ``sync_failed`` audit entry and keep
it for ``zsync replay`` (the dead-letter queue). The HTTP edge (:mod:`shared.edge.handler`), the inbox drain and
replay call it; it knows nothing of HTTP.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from pydantic import ValidationError

from shared.adapters import supabase_db
from shared.core import audit
from shared.core.mapping import InvalidRecord
from shared.core.spec import Direction, FunctionSpec
from shared.platform.logs import get_logger, log_event
from shared.platform.settings import Settings
from shared.services.from_tables import apply_from_tables
from shared.services.sync import (
    ConfigurationError,
    SupabaseWebhook,
    SyncContext,
    SyncResult,
    change_time,
    unwrap_tables_payload,
)
from shared.services.to_tables import apply_from_supabase

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


def _webhook(payload: dict[str, Any]) -> SupabaseWebhook:
    try:
        return SupabaseWebhook.model_validate(payload)
    except ValidationError as exc:
        problems = [
            {"field": ".".join(map(str, e["loc"])) or "body", "problem": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise Rejected(400, problems) from None


def record_id_of(payload: Any) -> str | None:
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
            from shared.services.outbox_batch import deliver

            return deliver(ctx, fn, hook, origin=origin)
        return apply_from_supabase(ctx, fn, hook, origin=origin)
    except InvalidRecord as exc:
        raise Rejected(400, exc.problems, record_id_of(payload)) from None


def tables_errors() -> tuple[type[Exception], ...]:
    """The Tables errors, once their module is loaded: a function that never loaded it cannot have raised one.
    The module can be in ``sys.modules`` half imported (another request's thread is importing it, e.g. the
    first scheduled trash check): its classes not defined yet, so none of them can have been raised either.
    (Reading the attribute then raised AttributeError inside the ``except`` clause: a 500, no dead letter.)"""
    error = getattr(sys.modules.get("shared.adapters.zapier_errors"), "TablesError", None)
    return (error,) if error is not None else ()


def tables_rejected(exc: Exception) -> bool:
    rejected = getattr(sys.modules.get("shared.adapters.zapier_errors"), "TablesRejected", None)
    return rejected is not None and isinstance(exc, rejected)


def record_failure(fn: FunctionSpec, ctx: SyncContext, body: bytes, rejected: Rejected,
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
    if fn.direction is Direction.TO_SUPABASE and record_id is not None:
        # Tables' copy now holds what was refused: the next write of the record finds it first (never blind)
        supabase_db.forget_tables(conn, fn.table, [record_id])
    if fn.direction is Direction.TO_TABLES and record_id is not None:
        reason = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)[:2000]
        if supabase_db.outbox_failed(conn, fn.table, record_id, reason):
            log_event(logging.getLogger("zsync"), logging.ERROR, "outbox_parked", table=fn.table.name,
                      id=record_id, reason=reason)


def dead_letter_delivery(fn: FunctionSpec, ctx: SyncContext, payload: dict[str, Any], exc: Exception,
                         started: float) -> bool:
    """A delivery that could not be applied after the in-function retries: write a best-effort
    ``sync_failed`` audit entry (skipped when the database itself is down: it was just given its whole retry
    budget) and store the delivery whole in the dead-letter queue for ``zsync replay``. A 4xx the Tables API
    answered to our own write is not dead-lettered (replaying it would fail the same way). -> stored?"""
    from shared.adapters import dead_letter

    received_at = datetime.now(UTC) - timedelta(seconds=time.perf_counter() - started)
    record_id = record_id_of(payload)
    audited = False
    if not isinstance(exc, supabase_db.DatabaseUnavailable):
        problems = [{"field": "dependency", "problem": f"{type(exc).__name__}: {str(exc)[:200]}"}]
        body = dead_letter.canonical_json(payload).encode("utf-8", "surrogatepass")
        entry = audit.failed_entry(fn, body, problems, datetime.now(UTC), record_id, 503)
        rejected = tables_rejected(exc)

        def work(conn: psycopg.Connection) -> None:
            supabase_db.append_audit(conn, entry)
            if rejected:  # Zapier Tables refuses this version: a re-send fails the same way
                _count_failure(conn, fn, record_id, problems)

        try:
            ctx.db.run(work)
            audited = True
        except (supabase_db.DatabaseUnavailable, ConfigurationError, psycopg.Error):
            pass
    if tables_rejected(exc):
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
