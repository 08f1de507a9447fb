"""``zsync replay``: drain the dead-letter queue through the functions' own code path.

Every message is run through the functions' own code: :func:`shared.services.deliveries.process` for a Supabase ->
Tables delivery, :func:`shared.services.from_tables.apply_many_from_tables` for the Tables -> Supabase deliveries of one
receive round (one multi-row conditional upsert and one audit insert per function, the same outcome per
delivery as one by one). Same parsing, conflict rule, audit and outbox acknowledgement as a live delivery,
so replay is idempotent: replaying a delivery that was since
applied, or an older version than the one stored, changes nothing.

What happens to a message:

* applied / merged / unchanged / skipped_stale / ignored -> deleted. A delivery that failed while the database was
  down (so no ``sync_failed`` entry could be written then) gets that entry now, dated when it failed.
* another copy of a key already done in this run -> deleted (``duplicates``).
* rejected (invalid record, or a 4xx from the Tables API to our own write) -> ``sync_failed`` audit entry,
  appended whole to the rejected file (JSON lines) and deleted: replaying cannot succeed, an operator
  fixes the record at its source or re-sends the line once fixed.
* dependency still down -> left in the queue, compacted into one message per key with ``attempts`` + 1.
  Once the database is found down nothing more is attempted (every function needs it); once Zapier
  Tables is, only Supabase-bound deliveries still are.
* unreadable (not a dead letter, unknown function) -> left, reported.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from shared.adapters import supabase_db
from shared.adapters.dead_letter import (
    DeadLetter,
    DeadLetterError,
    DeadLetterQueue,
    Received,
    canonical_json,
    iso,
)
from shared.adapters.trigger_inbox import UnreadablePayload
from shared.adapters.zapier_errors import TablesError, TablesRejected
from shared.core import audit
from shared.core.outcome import Outcome
from shared.core.spec import FUNCTIONS, Direction
from shared.platform.logs import get_logger
from shared.platform.settings import Settings
from shared.services.deliveries import Rejected, process
from shared.services.from_tables import apply_many_from_tables
from shared.services.inbox_consumer import INBOX_LETTER_KEYS, _field_names_of, inbox_letter_delivery
from shared.services.sync import ConfigurationError, SyncContext

COLUMNS = ("applied", "merged", "unchanged", "skipped_stale", "ignored", "duplicates", "rejected", "left")


@dataclass
class ReplayReport:
    """What a replay did, per function (``counts[function][column]``, columns :data:`COLUMNS`)."""

    dry_run: bool = False
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    left: list[dict[str, Any]] = field(default_factory=list)
    inventory: list[dict[str, Any]] = field(default_factory=list)  # dry run: one entry per key
    stopped: str | None = None
    remaining: int | None = None  # approximate queue depth after the run

    def add(self, function: str, column: str, n: int = 1) -> None:
        row = self.counts.setdefault(function, dict.fromkeys(COLUMNS, 0))
        row[column] = row.get(column, 0) + n  # an outcome without a column of its own is still counted

    def total(self, column: str) -> int:
        return sum(row[column] for row in self.counts.values())

    @property
    def ok(self) -> bool:
        return self.total("left") == 0 and not self.stopped


@dataclass
class _Group:
    """The copies of one delivery (one key) held back during a run."""

    messages: dict[str, Received] = field(default_factory=dict)  # by SQS message id
    attempted: bool = False
    error: BaseException | None = None
    reason: str = ""

    def letter(self) -> DeadLetter:
        letters = [m.letter for m in self.messages.values() if m.letter is not None]
        merged = letters[0]
        for other in letters[1:]:
            merged = merged.merged(other)
        return merged


class _Run:
    """One replay run: the queue, the sync context, and what was decided per key."""

    def __init__(self, settings: Settings, ctx: SyncContext | None, dry_run: bool, rejected_file: Path | None):
        self.queue = DeadLetterQueue(settings)
        self.ctx = ctx or SyncContext(settings=settings, logger=get_logger("replay"))
        self.report = ReplayReport(dry_run=dry_run)
        self.rejected_file = rejected_file
        self.done: dict[str, str] = {}
        self.held: dict[str, _Group] = {}
        self.unreadable: list[Received] = []
        self.down: set[str] = set()
        # Tables -> Supabase deliveries of one receive round, applied per function in one batch (flush)
        self.pending: dict[str, dict[str, list[Received]]] = {}  # function -> key -> copies (first is applied)
        self.deliveries: dict[str, dict[str, Any]] = {}  # key -> the delivery its letter holds (delivery_of)

    @property
    def halted(self) -> bool:
        return "database" in self.down or self.report.stopped is not None

    def hold(self, message: Received, reason: str, error: BaseException | None = None,
             attempted: bool = False) -> None:
        assert message.letter is not None
        group = self.held.setdefault(message.letter.key, _Group())
        group.messages[message.message_id] = message
        group.attempted |= attempted
        group.error = error or group.error
        group.reason = group.reason or reason

    def audit_failure(self, letter: DeadLetter, problems: list[dict[str, str]], status: int,
                      when: datetime) -> bool:
        """Best-effort ``sync_failed`` entry, with the handler's id for the same delivery (never twice)."""
        body = canonical_json(letter.payload).encode("utf-8", "surrogatepass")
        entry = audit.failed_entry(FUNCTIONS[letter.function], body, problems, when, letter.record_id, status)
        try:
            self.ctx.db.run(lambda conn: supabase_db.append_audit(conn, entry))
            return True
        except (supabase_db.DatabaseUnavailable, psycopg.Error):
            return False

    def reject(self, message: Received, problems: list[dict[str, str]], status: int) -> None:
        letter = message.letter
        assert letter is not None
        self.audit_failure(letter, problems, status, datetime.now(UTC))
        self.report.rejected.append({"function": letter.function, "key": letter.key, "record_id": letter.record_id,
                                     "problems": problems[:20]})
        if self.rejected_file is not None:
            self.rejected_file.parent.mkdir(parents=True, exist_ok=True)
            line = {**json.loads(letter.to_body()), "problems": problems[:20], "rejected_at": iso(datetime.now(UTC))}
            with self.rejected_file.open("a", encoding="utf-8") as out:
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.queue.delete([message])
        self.done[letter.key] = "rejected"
        self.report.add(letter.function, "rejected")

    def handle(self, message: Received) -> None:
        letter = message.letter
        fn = FUNCTIONS.get(letter.function) if letter is not None else None
        if letter is None or fn is None:
            message.problem = message.problem or f"unknown function {letter.function if letter else None!r}"
            self.unreadable.append(message)
            return
        if self.report.dry_run:
            self.hold(message, "dry run")
        elif letter.key in self.done:
            self.queue.delete([message])
            self.report.add(fn.name, "duplicates")
        elif letter.key in self.held:
            self.hold(message, self.held[letter.key].reason)
        elif self.halted:
            self.hold(message, "not attempted: " + (self.report.stopped or "the database is unreachable"))
        elif fn.direction is Direction.TO_TABLES and "tables" in self.down:
            self.hold(message, "not attempted: Zapier Tables is unreachable")
        elif fn.direction is Direction.TO_SUPABASE:
            try:
                self.deliveries[letter.key] = self.delivery_of(letter)
            except UnreadablePayload as exc:
                self.reject(message, exc.problems, 400)
                return
            except (ConfigurationError, TablesError) as exc:  # the field names of an inbox event: Tables needed
                self.hold(message, f"the inbox event's field names could not be read: {type(exc).__name__}", exc)
                return
            self.pending.setdefault(fn.name, {}).setdefault(letter.key, []).append(message)
        else:
            self.attempt(message, letter)

    def delivery_of(self, letter: DeadLetter) -> dict[str, Any]:
        """The Tables -> Supabase delivery a dead letter holds, whatever shape the code wrote it in: a Zap's
        body (flat fields, or ``{"record", "edited_at"}``) as it is; a trigger inbox message in the inbox's own
        shape (``{"inbox_message", "payload"}``) read as the inbox consumer reads it. UnreadablePayload if not."""
        payload = letter.payload
        if set(payload) != INBOX_LETTER_KEYS:
            return payload
        fn = FUNCTIONS[letter.function]
        return inbox_letter_delivery(payload, _field_names_of(self.ctx, fn))

    def flush(self) -> None:
        """Apply the pending Tables -> Supabase deliveries: one apply_many_from_tables per function (one
        multi-row upsert and one audit insert), with the outcome the one-by-one path would give each."""
        pending, self.pending = self.pending, {}
        for name, by_key in pending.items():
            fn = FUNCTIONS[name]
            firsts = [copies[0] for copies in by_key.values()]
            letters = [m.letter for m in firsts]
            if self.halted:
                for copies in by_key.values():
                    for message in copies:
                        self.hold(message, "not attempted: " + (self.report.stopped or "the database is unreachable"))
                continue
            try:
                results = apply_many_from_tables(self.ctx, fn, [self.deliveries[lt.key] for lt in letters],
                                                 received_at=[lt.received_at for lt in letters], origin="replay")
            except supabase_db.DatabaseUnavailable as exc:
                self.down.add("database")
                for copies in by_key.values():
                    for i, message in enumerate(copies):
                        self.hold(message, "the database is unreachable", exc, attempted=i == 0)
                continue
            except ConfigurationError as exc:
                self.report.stopped = f"misconfigured: {exc}"
                for copies in by_key.values():
                    for message in copies:
                        self.hold(message, self.report.stopped)
                continue
            for copies, result in zip(by_key.values(), results, strict=True):
                first, letter = copies[0], copies[0].letter
                if result.outcome is Outcome.REJECTED:
                    self.reject(first, result.problems or [{"field": "record", "problem": result.detail or ""}], 400)
                else:
                    self.queue.delete([first])
                    self.done[letter.key] = str(result.outcome)
                    self.report.add(fn.name, str(result.outcome))
                    if not letter.audited:
                        problem = f"{letter.error_type}: {letter.error_message}"[:300]
                        self.audit_failure(letter, [{"field": "dependency", "problem": problem}], 503,
                                           letter.first_seen)
                if copies[1:]:
                    self.queue.delete(copies[1:])
                    self.report.add(fn.name, "duplicates", len(copies) - 1)

    def attempt(self, message: Received, letter: DeadLetter) -> None:
        fn = FUNCTIONS[letter.function]
        try:
            result = process(fn, self.ctx, letter.payload, received_at=letter.received_at, origin="replay")
        except Rejected as exc:
            self.reject(message, exc.problems, exc.status)
            return
        except TablesRejected as exc:
            self.reject(message, [{"field": "tables", "problem": str(exc)[:300]}], 422)
            return
        except supabase_db.DatabaseUnavailable as exc:
            self.down.add("database")
            self.hold(message, "the database is unreachable", exc, attempted=True)
            return
        except TablesError as exc:
            self.down.add("tables")
            self.hold(message, f"Zapier Tables: {type(exc).__name__}", exc, attempted=True)
            return
        except ConfigurationError as exc:
            self.report.stopped = f"misconfigured: {exc}"
            self.hold(message, self.report.stopped)
            return
        self.queue.delete([message])
        self.done[letter.key] = str(result.outcome)
        self.report.add(fn.name, str(result.outcome))
        if not letter.audited:  # it failed while the database was down: record that failure now
            problem = f"{letter.error_type}: {letter.error_message}"[:300]
            self.audit_failure(letter, [{"field": "dependency", "problem": problem}], 503, letter.first_seen)

    def finish(self) -> ReplayReport:
        report = self.report
        for message in self.unreadable:
            function = message.letter.function if message.letter else "?"
            report.left.append({"function": function, "message_id": message.message_id, "reason": message.problem})
            report.add(function, "left")
        if self.unreadable:
            self.queue.release(self.unreadable)
        for key, group in self.held.items():
            letter = group.letter()
            if report.dry_run:
                report.inventory.append({
                    "function": letter.function, "key": key, "record_id": letter.record_id,
                    "copies": len(group.messages), "attempts": letter.attempts, "first_seen": iso(letter.first_seen),
                    "last_seen": iso(letter.last_seen), "error": f"{letter.error_type}: {letter.error_message}"})
                self.queue.release(list(group.messages.values()))
                continue
            report.add(letter.function, "left", len(group.messages))
            report.left.append({"function": letter.function, "key": key, "record_id": letter.record_id,
                                "copies": len(group.messages), "reason": group.reason})
            _keep(self.queue, group, letter)
        if "database" in self.down:
            report.stopped = report.stopped or "the database is unreachable"
        try:
            report.remaining = self.queue.approximate_depth()
        except DeadLetterError:
            report.remaining = None
        return report


def replay(settings: Settings, *, max_messages: int | None = None, dry_run: bool = False,
           rejected_file: Path | None = None, visibility_timeout_s: int = 300,
           ctx: SyncContext | None = None) -> ReplayReport:
    """Drain (up to ``max_messages`` of) the dead-letter queue; see the module docstring.

    ``dry_run`` applies and deletes nothing: it lists what is queued (one entry per key) and makes every
    message visible again. Raises :class:`DeadLetterError` if the queue is not configured or unreachable.
    """
    run = _Run(settings, ctx, dry_run, rejected_file)
    taken = 0
    while max_messages is None or taken < max_messages:
        want = 10 if max_messages is None else min(10, max_messages - taken)
        batch = run.queue.receive(want, visibility_timeout_s)
        if not batch:
            break
        taken += len(batch)
        for message in batch:
            run.handle(message)
        run.flush()
        if run.halted:
            break
    return run.finish()


def _keep(queue: DeadLetterQueue, group: _Group, letter: DeadLetter) -> None:
    """Leave a delivery in the queue as one message (``attempts`` + 1 if it was tried again)."""
    messages = list(group.messages.values())
    if not group.attempted and len(messages) == 1:
        queue.release(messages)
        return
    if group.attempted:
        letter = DeadLetter(
            function=letter.function, payload=letter.payload,
            error_type=type(group.error).__name__ if group.error else letter.error_type,
            error_message=str(group.error) if group.error else letter.error_message,
            received_at=letter.received_at, first_seen=letter.first_seen, last_seen=datetime.now(UTC),
            attempts=letter.attempts + 1, table=letter.table, record_id=letter.record_id, audited=letter.audited,
            key=letter.key)
    try:
        queue.send(letter)
    except DeadLetterError:
        queue.release(messages)  # could not compact: keep the copies as they are
        return
    with contextlib.suppress(DeadLetterError):  # a stale receipt handle: a duplicate the next run deletes
        queue.delete(messages)
