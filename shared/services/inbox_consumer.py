"""Drain a ``*_to_supabase`` function's own trigger inbox (the inbox path from Zapier Tables to Supabase).

Woken by a notification (a POST to the function URL carrying no data and no secret) or by the scheduled
safety drain, the function leases from its own inbox with its own credentials and applies each message
through the same code as a Zap delivery (:func:`shared.services.deliveries.process`). Per message:

* applied / unchanged / skipped as stale -> ack;
* unreadable or invalid (a 400 for a Zap) -> a ``sync_failed`` audit entry, then ack (retrying would fail
  the same way);
* a dependency is down (database, Tables) -> release: it comes back; the drain leases once more after a
  second (a blip), then stops (the next notification or the scheduled drain picks it up);
* a record with an earlier edit leased by another drain (:mod:`shared.adapters.lease_ledger`: each drain records
  what it leased before applying it) -> waits up to ``hold_wait_s`` for that drain to apply it; when that edit is
  back in the inbox (a drain that died with it), released to be leased again after it; else left leased (neither
  acked nor released): it comes back when this lease ends, after the other one's;
* leased more than ``poison_lease_count`` times already (it kept failing, or it kept killing the
  function) -> stored whole in the dead-letter queue, then ack, so it cannot block the inbox.

It keeps leasing until the inbox is empty or the time budget (the invocation's timeout minus a margin)
would be exceeded. Leases make concurrent drains safe: a message leased by one is invisible to another;
a drain killed mid-way leaves its messages leased until the lease expires, then they come back
(``possible_duplicate_data``; applying is idempotent).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from shared.adapters import dead_letter, lease_ledger, supabase_db
from shared.adapters.trigger_inbox import (
    BearerToken,
    InboxClient,
    InboxConflict,
    InboxError,
    InboxNotFound,
    LeaseExpired,
    Message,
    Notification,
    TriggerDelete,
    UnreadablePayload,
    is_delete_event,
    read_delete,
    read_payload,
)
from shared.adapters.zapier_errors import TablesError
from shared.core.mapping import coerce_id, normalize_timestamp
from shared.core.spec import FunctionSpec
from shared.platform.logs import log_event

if TYPE_CHECKING:
    from shared.platform.settings import Settings
    from shared.services.sync import SyncContext

POISON_LEASE_COUNT = 5  # a message leased this many times without an ack goes to the dead-letter queue
LEASE_LIMIT = 100  # messages per lease: applied to Supabase as one batch
DEPENDENCY_PAUSE_S = 1.0  # after a dependency error, wait this long and lease again (once)
DEFAULT_BUDGET_S = 10.0  # a 15 s Lambda: stop leasing with 5 s to spare
HOLD_WAIT_S, HOLD_POLL_S = lease_ledger.HOLD_WAIT_S, lease_ledger.HOLD_POLL_S  # (a direct delivery waits as long)
RELEASE_FOR_ORDER_MAX = 1  # a waiting delivery is released to come after its earlier edit only on its first lease


def inbox_key(stage: str, function: str) -> str:
    """The key (``name`` for older SDKs) of a function's inbox: ``zsync-<stage>-<function>``."""
    return f"zsync-{stage}-{function}"


def client_from_settings(settings: Settings) -> InboxClient:
    """An inbox client for operator tools (wire, doctor, status): ``ZSYNC_ZAPIER_BASE_URL`` with the OAuth
    client credentials (or ``ZSYNC_TABLES_TOKEN``), through the Tables client's token provider."""
    from shared.adapters.zapier_tables import client_from_settings as tables_client

    return InboxClient.for_tables(tables_client(settings), prefix=settings.inbox_path_prefix)


_clients: WeakKeyDictionary[Any, InboxClient] = WeakKeyDictionary()
_clients_lock = threading.Lock()


def inbox_client(ctx: SyncContext) -> InboxClient:
    """The function's inbox client: one per process (per Tables client), sharing the Tables client's OAuth
    token provider, so a warm function neither fetches a token nor opens a connection per wake-up."""
    tables = ctx.tables
    with _clients_lock:
        client = _clients.get(tables)
        if client is None:
            client = _clients[tables] = InboxClient.for_tables(tables, prefix=ctx.settings.inbox_path_prefix)
        return client


@dataclass
class DrainReport:
    inbox: str
    counts: Counter[str] = field(default_factory=Counter)
    stopped: str = "empty"  # empty | budget | dependency | paused | not_found
    redelivery: bool = False  # woken by a notification Zapier re-sent after a delivery outage

    def as_json(self) -> dict[str, Any]:
        extra = {"redelivery": True} if self.redelivery else {}
        return {"inbox": self.inbox, "stopped": self.stopped, **extra, **dict(sorted(self.counts.items()))}


def _received_at(record_edited_at: str | None, message: Message, max_skew_s: float | None = None) -> datetime | None:
    """The version to give a record without ``updated_at``: Zapier's time of the change, not our arrival
    (a message can wait in the inbox for a long time). A time further ahead of the clock than ``max_skew_s``
    is not taken (it would become a version from the future: the arrival is used instead)."""
    latest = datetime.now(UTC) + timedelta(seconds=max_skew_s) if max_skew_s is not None else None
    for text in (record_edited_at, message.created_at):
        if text:
            try:
                found = dead_letter.parse_iso(text)
            except (ValueError, OverflowError):
                continue
            if latest is None or found <= latest:
                return found
    return None


INBOX_LETTER_KEYS = frozenset({"inbox_message", "payload"})


def inbox_letter_delivery(payload: Mapping[str, Any], field_names: Callable[[bool], Mapping[str, str]] | None
                          ) -> dict[str, Any]:
    """The delivery inside a dead letter of the inbox's own shape ``{"inbox_message": id, "payload": the
    trigger event}`` (written by older versions, and now for a message that could not be read when it was
    dead-lettered): the record as a Zap would POST it. ``field_names``: field id -> name, for an event keyed by
    field ids. Raises :class:`UnreadablePayload`."""
    raw = payload.get("payload")
    if not isinstance(raw, dict):
        raise UnreadablePayload([{"field": "payload", "problem": "the dead letter holds no trigger event object"}])
    if is_delete_event(raw):
        raise UnreadablePayload([{"field": "payload", "problem": "a delete event: not replayed as a record (the "
                                  "trash check applies the delete)"}])
    try:
        return read_payload(raw).as_delivery()
    except UnreadablePayload as exc:
        if field_names is None or not any("unknown field" in p["problem"] for p in exc.problems):
            raise
    return read_payload(raw, field_names(False)).as_delivery()


@dataclass
class InboxConsumer:
    fn: FunctionSpec
    ctx: SyncContext
    client: InboxClient
    inbox_id: str
    field_names: Callable[[bool], Mapping[str, str]] | None = None  # field id -> name (refresh?), when needed
    poison_lease_count: int = POISON_LEASE_COUNT
    lease_limit: int = LEASE_LIMIT
    lease_seconds: int = 60
    dependency_retries: int = 1
    hold_wait_s: float = HOLD_WAIT_S
    _names: Mapping[str, str] | None = None
    _deadline: float = 0.0
    _requeue: list[str] = field(default_factory=list)  # released to come after an earlier edit (not a failure)

    def drain(self, budget_s: float = DEFAULT_BUDGET_S) -> DrainReport:
        deadline = self._deadline = time.monotonic() + budget_s
        report = DrainReport(self.inbox_id)
        retries = 0
        while time.monotonic() < deadline:
            try:
                lease = self.client.lease(self.inbox_id, self.lease_limit, self.lease_seconds)
            except InboxConflict as exc:  # paused and drained
                report.stopped = "paused"
                log_event(self.ctx.logger, logging.WARNING, "inbox_paused", inbox=self.inbox_id, error=str(exc))
                return report
            if not lease.messages or not lease.lease_id:
                report.stopped = "empty"
                return report
            ack, release = self._apply_lease(lease.messages, report, lease.lease_id)
            if ack:
                self._settle("ack", lease.lease_id, ack, report)
            if self._requeue:  # leased again at once, after the earlier edits they wait for
                requeue, self._requeue = self._requeue, []
                self._settle("release", lease.lease_id, requeue, report)
                report.counts["released_for_order"] += len(requeue)
            if release:
                self._settle("release", lease.lease_id, release, report)
                # A released message gets no new notification: try once more after a pause (a blip),
                # then leave it to the next wake-up or the scheduled drain (a real outage).
                retries += 1
                if retries > self.dependency_retries or time.monotonic() + DEPENDENCY_PAUSE_S >= deadline:
                    report.stopped = "dependency"
                    return report
                time.sleep(DEPENDENCY_PAUSE_S)
        report.stopped = "budget"
        return report

    def _settle(self, op: str, lease_id: str, ids: list[str], report: DrainReport) -> None:
        try:
            (self.client.ack if op == "ack" else self.client.release)(self.inbox_id, lease_id, ids)
            report.counts["acked" if op == "ack" else "released"] += len(ids)  # (was "releaseed")
        except LeaseExpired:  # the messages come back; applying again is harmless
            report.counts["lease_expired"] += len(ids)
            log_event(self.ctx.logger, logging.WARNING, "inbox_lease_expired", inbox=self.inbox_id, op=op, n=len(ids))

    def _apply_lease(self, messages: list[Message], report: DrainReport, lease_id: str = ""
                     ) -> tuple[list[str], list[str]]:
        """Apply a lease's messages -> (ids to ack, ids to release; the others wait for their lease to end).
        The readable ones go to Supabase in one batch (:func:`shared.services.from_tables.apply_many_from_tables`:
        one multi-row conditional upsert, one audit insert), recorded as leased first (:meth:`_hold`), with the
        outcome each would get alone; a poison message goes whole to the dead-letter queue, an unreadable one is
        rejected and audited; a dependency failure releases the batch (it comes back)."""
        ack: list[str] = []
        release: list[str] = []
        batch: list[tuple[Message, dict[str, Any], datetime | None]] = []
        deletes: list[tuple[Message, TriggerDelete]] = []
        poisoned: list[str] = []
        for message in messages:
            if message.lease_count > self.poison_lease_count:
                (poisoned if self._poison(message, report) == "ack" else release).append(message.id)
                continue
            try:
                gone = self._read(message, read_delete)
                record = self._read(message) if gone is None else None
            except UnreadablePayload as exc:
                self._reject(message, exc.problems, report)
                ack.append(message.id)
                continue
            if gone is not None:  # the deletes-capable trigger's delete event: applied after the batch
                deletes.append((message, gone))
                continue
            assert record is not None
            batch.append((message, record.as_delivery(),
                          _received_at(record.edited_at, message, self.ctx.settings.max_future_skew_s)))
        if poisoned and not self.fn.table.append_only:  # dead-lettered: no later edit of its record waits for it
            lease_ledger.forget(self.ctx.db, self.fn.table, poisoned)
        ack += poisoned
        if batch and not self._hold(lease_id, batch):  # released unapplied: they come back, in order
            report.counts["dependency_errors"] += 1
            done: tuple[list[str], list[str]] = ([], [m.id for m, _, _ in batch])
        else:
            done = self._apply_batch(batch, report, lease_id) if batch else ([], [])
        gone_done = self._apply_deletes(deletes, report) if deletes else ([], [])
        return ack + done[0] + gone_done[0], release + done[1] + gone_done[1]

    def _reject(self, message: Message, problems: list[dict[str, str]], report: DrainReport) -> None:
        """An unreadable message: a ``sync_failed`` audit entry (as a Zap delivery's 400), then acked."""
        from shared.services.deliveries import Rejected, record_failure

        body = dead_letter.canonical_json(message.payload).encode("utf-8", "surrogatepass")
        audited = record_failure(self.fn, self.ctx, body, Rejected(400, problems))
        report.counts["rejected"] += 1
        log_event(self.ctx.logger, logging.WARNING, "inbox_message", inbox=self.inbox_id, message_id=message.id,
                  outcome="rejected", status=400, problems=problems, audited=audited)

    def _apply_deletes(self, deletes: list[tuple[Message, TriggerDelete]], report: DrainReport
                       ) -> tuple[list[str], list[str]]:
        """Delete events, through the trash check's own rules (:func:`shared.services.tables_trash.apply_deletes`:
        the sync's own deletes and ids still live in Tables left out, tombstones, a newer Supabase version wins):
        a delete the trash check finds later is ``unchanged`` there, and the other way round."""
        from shared.services.sync import is_empty_id
        from shared.services.tables_trash import apply_deletes, deletes_checked

        spec = self.fn.table
        if not deletes_checked(spec):
            report.counts["delete_ignored"] += len(deletes)
            return [m.id for m, _ in deletes], []
        ack: list[str] = []
        found: list[tuple[Message, str, str | None, datetime]] = []
        for message, gone in deletes:
            try:
                ours = gone.fields.get("id")
                rid = coerce_id(gone.record_id if is_empty_id(ours) else ours, spec.field("id").max_length or 128)
                at = normalize_timestamp(gone.deleted_at) or _received_at(None, message) or datetime.now(UTC)
            except ValueError as exc:
                self._reject(message, [{"field": "payload", "problem": f"delete event: {exc}"}], report)
                ack.append(message.id)
                continue
            found.append((message, rid, gone.record_id, at))
        try:
            verdicts = apply_deletes(self.ctx, spec, [(rid, zid, at) for _, rid, zid, at in found])
        except (supabase_db.DatabaseUnavailable, TablesError, InboxError) as exc:
            report.counts["dependency_errors"] += 1
            log_event(self.ctx.logger, logging.ERROR, "dependency_unavailable", inbox=self.inbox_id,
                      messages=len(found), error_type=type(exc).__name__, error=str(exc)[:300])
            return ack, [m.id for m, _, _, _ in found]
        for message, rid, zid, _ in found:
            verdict = verdicts.get(rid, "own")  # left out: a copy the sync trashed itself
            report.counts[f"delete_{verdict}"] += 1
            log_event(self.ctx.logger, logging.INFO, "inbox_message", inbox=self.inbox_id, message_id=message.id,
                      outcome=f"delete_{verdict}", id=rid, tables_record=zid, lease_count=message.lease_count)
            ack.append(message.id)
        return ack, []

    def _ticket(self, lease_id: str, batch: list[tuple[Message, dict[str, Any], datetime | None]]
                ) -> lease_ledger.Lease | None:
        """The batch as the lease ledger knows it: each delivery's message, record id and edit time (None for the
        audit log, whose entries are only ever added, or without a lease id)."""
        if not lease_id or self.fn.table.append_only:
            return None
        items = tuple(lease_ledger.Leased(m.id, str(d["id"]), at) for m, d, at in batch
                      if at is not None and d.get("id") not in (None, ""))
        return lease_ledger.Lease(lease_id, items)

    def _hold(self, lease_id: str, batch: list[tuple[Message, dict[str, Any], datetime | None]]) -> bool:
        """Record what this drain leased before applying any of it, on a connection of its own: if the drain
        dies, other drains' later edits of these records wait for these messages to come back. -> False when
        that record could not be made (the database down, as a rule): the batch is then released unapplied -
        applied, and the drain killed while it held them, other drains would apply later edits of these records
        first, unaware (a soak with Postgres restarts lost a field so)."""
        ticket = self._ticket(lease_id, batch)
        if ticket is not None and not lease_ledger.hold(self.ctx.db, self.fn.table, ticket, self.lease_seconds):
            log_event(self.ctx.logger, logging.WARNING, "inbox_lease_unrecorded", inbox=self.inbox_id,
                      messages=len(ticket.items), hint="released unapplied: the record of what this drain leased "
                      "could not be made; they come back to this drain's retry or the next one")
            return False
        return True

    def _apply_batch(self, batch: list[tuple[Message, dict[str, Any], datetime | None]], report: DrainReport,
                     lease_id: str = "") -> tuple[list[str], list[str]]:
        from shared.services.from_tables import apply_many_from_tables

        ack: list[str] = []
        release: list[str] = []
        try:
            results = apply_many_from_tables(self.ctx, self.fn, [d for _, d, _ in batch],
                                             received_at=[r for _, _, r in batch],
                                             lease=self._ticket(lease_id, batch))
        except lease_ledger.HeldBack as held:
            return self._apply_after(batch, held, report, lease_id)
        except (supabase_db.DatabaseUnavailable, TablesError, InboxError) as exc:
            report.counts["dependency_errors"] += 1
            log_event(self.ctx.logger, logging.ERROR, "dependency_unavailable", inbox=self.inbox_id,
                      messages=len(batch), error_type=type(exc).__name__, error=str(exc)[:300])
            return ack, release + [m.id for m, _, _ in batch]
        except Exception as exc:  # one message broke the batch in a way no check foresaw
            log_event(self.ctx.logger, logging.ERROR, "inbox_batch_failed", inbox=self.inbox_id, messages=len(batch),
                      error_type=type(exc).__name__, error=str(exc)[:300], resolution="each message applied alone")
            results = None
        if results is None:  # isolate: each message alone; the one that still fails comes back (then the DLQ)
            one_ack, one_release = self._apply_each(batch, report, lease_id)
            return ack + one_ack, release + one_release
        for (message, _, _), result in zip(batch, results, strict=True):
            self._applied(message, result, report)
            ack.append(message.id)
        return ack, release

    def _apply_after(self, batch: list[tuple[Message, dict[str, Any], datetime | None]], held: lease_ledger.HeldBack,
                     report: DrainReport, lease_id: str) -> tuple[list[str], list[str]]:
        """Another lease holds an earlier edit of the ``held`` records: apply the rest now, then wait (up to
        ``hold_wait_s``, inside the drain's budget) for those edits to be applied - a live drain's are, in a
        moment. What no longer waits is applied. A delivery whose earlier edits are back in the inbox (their
        leases over: a drain that died with them) is released, to be leased again after them (oldest first);
        one still waiting is left leased: it comes back when this lease ends, after the other lease's."""
        ids = held.record_ids

        def waits(d: dict[str, Any]) -> bool:
            return str(d.get("id")) in ids

        ack, release = self._apply_batch([b for b in batch if not waits(b[1])], report, lease_id)
        waiting = [b for b in batch if waits(b[1])]
        ticket = self._ticket(lease_id, waiting)
        returned = set(held.returned)
        until = min(time.monotonic() + self.hold_wait_s, self._deadline or float("inf"))
        while ticket is not None and len(returned) < len(ids) and time.monotonic() + HOLD_POLL_S < until:
            time.sleep(HOLD_POLL_S)
            still = lease_ledger.still_waiting(self.ctx.db, self.fn.table, ticket)
            if set(still) != ids:
                more_ack, more_release = self._apply_batch(waiting, report, lease_id)
                return ack + more_ack, release + more_release
            returned = {rid for rid, back in still.items() if back}
        # (released once at most: leased again without the earlier edit - an inbox that is not oldest first, an
        # edit that never comes back - it waits out a lease instead of spending its leases on the poison rule)
        after = [m.id for m, d, _ in waiting if str(d.get("id")) in returned and m.lease_count <= RELEASE_FOR_ORDER_MAX]
        left = [m.id for m, d, _ in waiting if m.id not in after]
        self._requeue += after
        report.counts["held_back"] += len(left)
        log_event(self.ctx.logger, logging.WARNING, "inbox_held_back", inbox=self.inbox_id, ids=sorted(ids),
                  left_leased=left, released=after,
                  hint="an earlier edit of these records is leased by another drain: released to come after it when "
                       "it is back in the inbox, else left leased until this lease ends")
        return ack, release

    def _applied(self, message: Message, result: Any, report: DrainReport) -> None:
        report.counts[str(result.outcome)] += 1
        log_event(self.ctx.logger, logging.INFO, "inbox_message", inbox=self.inbox_id, message_id=message.id,
                  outcome=str(result.outcome), id=result.id, lease_count=message.lease_count,
                  possible_duplicate=message.possible_duplicate_data,
                  **({"problems": result.problems} if result.problems else {}))

    def _apply_each(self, batch: list[tuple[Message, dict[str, Any], datetime | None]], report: DrainReport,
                    lease_id: str = "") -> tuple[list[str], list[str]]:
        """The batch failed as a whole: apply its messages one by one, so the others are applied (acked) and
        only the message that fails alone is released (after ``poison_lease_count`` leases it is dead-lettered)."""
        from shared.services.from_tables import apply_many_from_tables

        ack: list[str] = []
        release: list[str] = []
        for n, (message, delivery, received) in enumerate(batch):
            try:
                [result] = apply_many_from_tables(self.ctx, self.fn, [delivery], received_at=[received],
                                                  lease=self._ticket(lease_id, [(message, delivery, received)]))
            except lease_ledger.HeldBack:  # left leased: it comes back after the earlier edit
                report.counts["held_back"] += 1
                continue
            except (supabase_db.DatabaseUnavailable, TablesError, InboxError) as exc:  # down: the rest comes back
                report.counts["dependency_errors"] += 1
                log_event(self.ctx.logger, logging.ERROR, "dependency_unavailable", inbox=self.inbox_id,
                          messages=len(batch) - n, error_type=type(exc).__name__, error=str(exc)[:300])
                return ack, release + [m.id for m, _, _ in batch[n:]]
            except Exception as exc:  # released: it comes back, and goes to the DLQ if it keeps failing
                report.counts["failed"] += 1
                log_event(self.ctx.logger, logging.ERROR, "inbox_message", inbox=self.inbox_id, message_id=message.id,
                          outcome="failed", error_type=type(exc).__name__, error=str(exc)[:300],
                          lease_count=message.lease_count)
                release.append(message.id)
                continue
            self._applied(message, result, report)
            ack.append(message.id)
        return ack, release

    def _field_names(self, message: Message, refresh: bool = False) -> Mapping[str, str] | None:
        data = message.payload.get("data", message.payload)
        uses_ids = isinstance(data, dict) and any(str(k)[:1] == "f" and str(k)[1:].isdigit() for k in data)
        if uses_ids and self.field_names is not None and (self._names is None or refresh):
            self._names = self.field_names(refresh)
        return self._names

    def _read(self, message: Message, reader: Callable[..., Any] = read_payload) -> Any:
        """The payload read by ``reader`` (a record; with :func:`read_delete`, a delete event or None); a field
        id we do not know lists the table's fields again once."""
        try:
            return reader(message.payload, self._field_names(message))
        except UnreadablePayload as exc:
            if self.field_names is None or not any("unknown field" in p["problem"] for p in exc.problems):
                raise
        return reader(message.payload, self._field_names(message, refresh=True))

    def _poison(self, message: Message, report: DrainReport) -> str:
        """Store the message in the dead-letter queue in the shape ``zsync replay`` applies: the delivery a
        Zap would POST (the record's fields flat, ``edited_at``); a message that cannot be read keeps the
        inbox's own shape ``{"inbox_message", "payload"}``, which replay reads too
        (:func:`inbox_letter_delivery`) or rejects with its problems."""
        error = RuntimeError(f"trigger inbox message {message.id} leased {message.lease_count} times without an ack"
                             + (f": {message.error_message}" if message.error_message else ""))
        payload: dict[str, Any] = {"inbox_message": message.id, "payload": message.payload}
        edited_at: str | None = None
        try:
            if not is_delete_event(message.payload):  # a delete keeps the inbox's shape: never replayed as a record
                record = self._read(message)
                payload, edited_at = record.as_delivery(), record.edited_at
        except (UnreadablePayload, TablesError):
            pass
        record_id = payload.get("id") if isinstance(payload.get("id"), str) else None
        received = _received_at(edited_at, message, self.ctx.settings.max_future_skew_s) or datetime.now(UTC)
        letter = dead_letter.DeadLetter.new(self.fn.name, payload, error, received_at=received,
                                            table=self.fn.table.name, record_id=record_id)
        problem = dead_letter.dead_letter(self.ctx.settings, letter)
        if problem is not None:  # keep it in the inbox rather than lose it
            log_event(self.ctx.logger, logging.ERROR, "dead_letter_failed", inbox=self.inbox_id, message_id=message.id,
                      problem=problem)
            report.counts["poison_kept"] += 1
            return "release"
        report.counts["dead_lettered"] += 1
        log_event(self.ctx.logger, logging.WARNING, "dead_lettered", inbox=self.inbox_id, message_id=message.id,
                  key=letter.key, lease_count=message.lease_count)
        return "ack"


def _field_names_of(ctx: SyncContext, fn: FunctionSpec) -> Callable[[bool], Mapping[str, str]]:
    """Field id (``f<n>``) -> our field name, from the Tables client's field map (listed once per process;
    ``refresh`` lists the fields again, e.g. after a message named a field added since)."""

    def names(refresh: bool = False) -> dict[str, str]:
        fmap = ctx.tables.field_map(ctx.table_id(fn.table), refresh=refresh)
        return {f.key: f.name for f in fmap.fields}

    return names


_inbox_ids: dict[str, str] = {}


def _inbox_id(client: InboxClient, key: str) -> str | None:
    """The id of the inbox with ``key`` (cached per process); None when there is none."""
    inbox_id = _inbox_ids.get(key)
    if inbox_id is None:
        inbox = client.find(key)
        if inbox is None:
            return None
        inbox_id = _inbox_ids[key] = inbox.id
    return inbox_id


def drain_function(fn: FunctionSpec, ctx: SyncContext, budget_s: float = DEFAULT_BUDGET_S,
                   notification: Notification | None = None) -> DrainReport:
    """Find this function's inbox (by key ``zsync-<stage>-<function>``, cached) and drain it, leasing
    ``ZSYNC_INBOX_LEASE_LIMIT`` messages for ``ZSYNC_INBOX_LEASE_SECONDS`` at a time. The drain goes on until
    the inbox is empty (or the budget ends), never counting on the wake-up's ``received_message_count``: after
    a ``redelivery`` (Zapier re-sent the wake-up after a delivery outage) that count is only a placeholder,
    and the backlog can be anything. A redelivery is logged and reported; a backlog it leaves (the budget
    ended) is drained by the next wake-up or the scheduled drain."""
    key = inbox_key(ctx.settings.stage, fn.name)
    client = inbox_client(ctx)
    inbox_id = _inbox_id(client, key)
    if inbox_id is None:
        report = DrainReport(key)
        report.stopped = "not_found"
        log_event(ctx.logger, logging.ERROR, "inbox_not_found", inbox=key,
                  hint="run `zsync wire zapier` for this stage")
        return report
    redelivery = notification is not None and notification.redelivery
    if redelivery:
        log_event(ctx.logger, logging.WARNING, "inbox_redelivery", inbox=key,
                  hint="Zapier re-sent a wake-up after a delivery outage: draining the whole backlog")
    consumer = InboxConsumer(fn, ctx, client, inbox_id, field_names=_field_names_of(ctx, fn),
                             lease_limit=ctx.settings.inbox_lease_limit,
                             lease_seconds=ctx.settings.inbox_lease_seconds)
    try:
        report = consumer.drain(budget_s)
    except InboxNotFound:  # the inbox was deleted and made again: look it up next time
        _inbox_ids.pop(key, None)
        raise
    report.redelivery = redelivery
    log_event(ctx.logger, logging.INFO, "inbox_drained", **report.as_json())
    return report


def pull_deliveries(fn: FunctionSpec, ctx: SyncContext, budget_s: float = 2.0) -> DrainReport | None:
    """Drain ``fn``'s inbox now, for a *_to_tables drain that left records to the deliveries of recent Tables
    edits (``merge_deferred``): those may wait there for the next wake-up or the every-minute drain (a lost
    notification), holding the other direction of those records back with them. None when ``fn`` has no inbox
    (Zaps deliver instead) or it cannot be reached now (the scheduled drain still comes)."""
    key = inbox_key(ctx.settings.stage, fn.name)
    try:
        if _inbox_id(inbox_client(ctx), key) is None:
            return None
        return drain_function(fn, ctx, budget_s)
    except (InboxError, TablesError, supabase_db.DatabaseUnavailable) as exc:
        log_event(ctx.logger, logging.WARNING, "inbox_pull_failed", inbox=key, error_type=type(exc).__name__,
                  error=str(exc)[:300])
        return None


__all__ = ["BearerToken", "DrainReport", "InboxConsumer", "drain_function", "inbox_key", "pull_deliveries"]
