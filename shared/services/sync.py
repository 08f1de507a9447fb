"""What every sync operation shares: the context a function runs in (:class:`SyncContext`), the shapes it
reads (a Supabase webhook, a Tables record read back with its version), the isolation of a record the
database refuses (:func:`isolate`), and the push of a newer Tables version back into Supabase
(:func:`push_back`). The operations themselves: :mod:`shared.services.from_tables`,
:mod:`shared.services.to_tables`, :mod:`shared.services.deletes`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import psycopg
from pydantic import BaseModel, ConfigDict
from pydantic import Field as PydanticField

from shared.adapters import supabase_db
from shared.core import audit
from shared.core.mapping import (
    InvalidRecord,
    check_version_skew,
    normalize_timestamp,
    parse_supabase_record,
    parse_tables_record,
    to_tables_fields,
)
from shared.core.outcome import Outcome
from shared.core.spec import FUNCTIONS, Direction, TableSpec
from shared.platform.logs import log_event
from shared.platform.settings import Settings
from shared.services import conflict

if TYPE_CHECKING:  # imported where used: a *_to_supabase function never loads the Tables client (cold start)
    from shared.adapters.catch_hook import CatchHookWriter
    from shared.adapters.zapier_tables import Record, TablesClient


class ConfigurationError(RuntimeError):
    """The deployment is missing a setting this function needs (never caused by the request)."""


class SupabaseWebhook(BaseModel):
    """What a Supabase Database Webhook POSTs (see ../shared/reference/supabase-webhooks.md)."""

    # Built on first use: only the *_to_tables functions validate webhooks (cold start of the others).
    model_config = ConfigDict(extra="ignore", populate_by_name=True, defer_build=True)

    type: Literal["INSERT", "UPDATE", "DELETE"]
    table: str
    schema_: str = PydanticField(alias="schema")
    record: dict[str, Any] | None = None
    old_record: dict[str, Any] | None = None


@dataclass
class SyncResult:
    """What one delivery came to (internal: the handler turns it into the JSON answer)."""

    outcome: Outcome
    function: str
    table: str
    id: str | None = None
    detail: str | None = None
    lag_ms: float | None = None  # delivery lag (see shared.core.audit.sync_entry); None when the change time is unknown
    problems: list[dict[str, str]] | None = None  # why rejected (batches)

    def __post_init__(self) -> None:
        self.outcome = Outcome(self.outcome)  # SQL answers the outcome as text


EDITED_AT = "edited_at"  # top-level key of a Zap delivery: when Zapier saw the record change
_ZAPIER_ID = re.compile(r"^[0-9A-Z]{26}$")  # a Zapier Tables record id (ULID)


def _lag_ms(changed_at: datetime | None, now: datetime) -> float | None:
    return round((now - changed_at).total_seconds() * 1000, 1) if changed_at else None


def change_time(payload: Mapping[str, Any], received_at: datetime) -> tuple[datetime, str]:
    """When a Tables -> Supabase change happened as the system saw it: Zapier's ``edited_at`` when the
    delivery carries one (ISO 8601 with a zone), else its arrival. -> (time, "edited_at" | "received")."""
    raw = payload.get(EDITED_AT)
    if isinstance(raw, str):
        try:
            parsed = datetime.fromisoformat(raw.strip())
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed.astimezone(UTC), EDITED_AT
    return received_at, "received"


@dataclass
class SyncContext:
    """What the functions of one process share: settings and lazily built clients."""

    settings: Settings
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("zsync"))
    # What a *_to_tables drain calls when it left records to the deliveries of recent Tables edits (the merge's
    # 'deferred'): drain the table's *_to_supabase inbox now (set by the edge, which may import the inbox
    # consumer; None: the deliveries come with the next wake-up or the scheduled drain).
    pull_deliveries: Callable[[str], object] | None = None

    @cached_property
    def db(self) -> supabase_db.Database:
        if self.settings.database_url is None:
            raise ConfigurationError("ZSYNC_DATABASE_URL is not set")
        return supabase_db.Database(
            self.settings.database_url.get_secret_value(),
            max_size=self.settings.db_pool_max,
            connect_timeout_s=self.settings.db_connect_timeout_s,
            retry_budget_s=self.settings.retry_budget_s,
        )

    @cached_property
    def tables(self) -> TablesClient:
        from shared.adapters.zapier_tables import client_from_settings

        try:
            return client_from_settings(self.settings)
        except ValueError as exc:  # a required setting is missing
            raise ConfigurationError(str(exc)) from None

    @cached_property
    def hooks(self) -> CatchHookWriter:
        from shared.adapters.catch_hook import catch_hook_writer_from_settings

        try:
            return catch_hook_writer_from_settings(self.settings)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None

    def table_id(self, spec: TableSpec) -> str:
        try:
            return self.settings.table_ids[spec.name]
        except KeyError:
            raise ConfigurationError(f"ZSYNC_TABLE_IDS has no Zapier table id for {spec.name!r}") from None


def unwrap_tables_payload(payload: Mapping[str, Any]) -> Any:
    """A Zap sends the record's fields flat; ``{"record": {...}}`` (optionally with ``edited_at``) too.
    The wrapper's ``edited_at`` then counts as the record's own (lag and version, as in the flat form)
    unless the record carries one."""
    if "record" in payload and set(payload) <= {"record", EDITED_AT}:
        record = payload["record"]
        if EDITED_AT in payload and isinstance(record, Mapping) and EDITED_AT not in record:
            return {**record, EDITED_AT: payload[EDITED_AT]}
        return record
    return payload


def _edited_at(value: Any) -> datetime | None:
    """Zapier Tables' own time of a record's last change (``edited_at``), if given and readable."""
    try:
        return normalize_timestamp(value)
    except ValueError:
        return None


# A statement refused because of a value in the record (a CHECK, NOT NULL, a value out of range, the future-
# skew trigger's 22008, a validation trigger's RAISE EXCEPTION): retrying cannot help and no other record is at
# fault. Connection errors, deadlocks and serialisation failures (OperationalError) are not among them: those
# are retried as a whole.
RECORD_ERRORS: tuple[type[psycopg.Error], ...] = (psycopg.errors.IntegrityError, psycopg.errors.DataError,
                                                  psycopg.errors.RaiseException)


def _constraint_column(constraint: str, row: Mapping[str, Any]) -> str | None:
    """The column a CHECK is about, by its name: ``zsync_<column>_syncable`` (ours), ``<table>_<column>_check``
    (Postgres' default name), else the longest column name the constraint's name contains."""
    if constraint.startswith("zsync_") and constraint.endswith("_syncable"):
        return constraint.removeprefix("zsync_").removesuffix("_syncable")
    named = [c for c in row if c in constraint]
    return max(named, key=len) if named else None


def db_problems(exc: psycopg.Error, row: Mapping[str, Any]) -> list[dict[str, str]]:
    """``[{"field", "problem"}]`` for a statement the database refused because of ``row``: the column (the
    error's own, else the one its constraint names: :func:`_constraint_column`), its value and the message."""
    diag = exc.diag
    column = diag.column_name or _constraint_column(diag.constraint_name or "", row)
    value = row.get(column) if column else None
    shown = value.isoformat() if isinstance(value, datetime) else value
    what = (diag.message_primary or str(exc)).splitlines()[0][:300]
    suffix = f" (value {json.dumps(shown, default=str, ensure_ascii=False)[:200]})" if column else ""
    return [{"field": column or "record", "problem": f"refused by the database: {what}{suffix}"}]


def _body(payload: Any) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str).encode("utf-8", "surrogatepass")


T = TypeVar("T")


def _halves(items: list[T], row_of: Callable[[T], Mapping[str, Any]]) -> tuple[list[T], list[T]]:
    """Split a refused batch in two, keeping the versions of one id together while there are several ids."""
    ids = list(dict.fromkeys(row_of(d)["id"] for d in items))
    if len(ids) == 1:
        return items[:len(items) // 2], items[len(items) // 2:]
    first = set(ids[:len(ids) // 2])
    return [d for d in items if row_of(d)["id"] in first], [d for d in items if row_of(d)["id"] not in first]


Refused = list[dict[str, str]]  # the problems of a record the database refused


def isolate(conn: psycopg.Connection, items: list[T], apply: Callable[[psycopg.Connection, list[T]], list[Any]],
            row_of: Callable[[T], Mapping[str, Any]]) -> tuple[list[tuple[T, Any]], list[tuple[T, Refused]]]:
    """``apply`` a batch in a savepoint; when the database refuses a value of one record (a CHECK the parser
    does not mirror, the future-skew trigger, a validation trigger), split the batch in halves until the refused
    records stand alone: they are refused, every other record is applied (``log2(n)`` extra statements per
    refused record). -> ([(item, its result)], [(item, problems)])."""
    if not items:
        return [], []
    try:
        with conn.transaction():
            return list(zip(items, apply(conn, items), strict=True)), []
    except RECORD_ERRORS as exc:
        if len(items) == 1:
            return [], [(items[0], db_problems(exc, row_of(items[0])))]
    done: list[tuple[T, Any]] = []
    refused: list[tuple[T, list[dict[str, str]]]] = []
    for half in _halves(items, row_of):
        d, r = isolate(conn, half, apply, row_of)
        done += d
        refused += r
    return done, refused


def tables_version_row(ctx: SyncContext, spec: TableSpec, record: Record) -> dict[str, Any]:
    """A Tables record as it is read to compare its version (:func:`tables_row`), refused (InvalidRecord) when
    its version is further ahead of the clock than ``max_future_skew_s`` (never compared, so it cannot win)."""
    row = tables_row(spec, record)
    check_version_skew(spec, row, datetime.now(UTC), ctx.settings.max_future_skew_s)
    return row


def tables_row(spec: TableSpec, record: Record) -> dict[str, Any]:
    """A record read from the Tables API -> row, as its trigger delivery is read: an empty ``id`` cell
    reads as the record's Zapier id (see :func:`idless_record`), a record without ``updated_at`` is
    versioned at Zapier's ``edited_at``. Raises InvalidRecord."""
    data = record.data
    if is_empty_id(data.get("id")):
        data = dict(data, id=record.id)
    return parse_tables_record(spec, data, received_at=_edited_at(record.edited_at))


def is_empty_id(value: Any) -> bool:
    return value is None or value == ""


def idless_record(ctx: SyncContext, table_id: str, record_id: str) -> Record | None:
    """The Tables record whose Zapier id is ``record_id`` and whose ``id`` cell is empty, if any.

    A record created in Tables without our ``id`` reaches Supabase under its Zapier record id (the trigger
    delivers that as ``id``); the Supabase row's way back must find that same record (and write the id into
    it), not create a second one."""
    from shared.adapters.zapier_errors import TablesNotFound

    if not _ZAPIER_ID.match(record_id):
        return None
    try:
        record = ctx.tables.get(table_id, record_id)
    except TablesNotFound:
        return None
    if record.deleted_at or not is_empty_id(record.data.get("id")):
        return None
    return record


def _readable(ctx: SyncContext, spec: TableSpec, record: Record) -> dict[str, Any] | None:
    try:
        return tables_version_row(ctx, spec, record)
    except InvalidRecord:
        return None


def _remove_duplicates(ctx: SyncContext, conn: psycopg.Connection, spec: TableSpec, table_id: str,
                       record_id: str) -> Record:
    """Several Tables records carry one id (a create retried after a lost response, or a hand-made copy):
    keep the one with the newest version, delete the others."""
    records = list(ctx.tables.iter_records(table_id, filters={"id": record_id}))

    def row_of(record: Record) -> dict[str, Any] | None:
        return _readable(ctx, spec, record)

    keep = records[0]
    for candidate in records[1:]:
        a, b = row_of(candidate), row_of(keep)
        if a is not None and (b is None or conflict.compare(conn, spec, a, b) > 0):
            keep = candidate
    removed = [r.id for r in records if r.id != keep.id]
    for rid in removed:
        ctx.tables.delete(table_id, rid, missing_ok=True)
    supabase_db.note_sync_trashed(conn, spec, record_id, removed)
    log_event(ctx.logger, logging.WARNING, "tables_duplicates_removed", record_id=record_id, kept=keep.id,
              removed=removed)
    return keep


def _tables_edited_at(record: Record) -> datetime | None:
    return _edited_at(getattr(record, "edited_at", None) or record.data.get("edited_at"))


def push_back(ctx: SyncContext, conn: psycopg.Connection, spec: TableSpec, current: dict[str, Any],
              edited_at: datetime | None = None) -> None:
    """Tables holds a newer version than Supabase was sending: make sure Supabase has it too (its own
    delivery may have been lost; conditional, so a no-op when Supabase is current; ``edited_at``: Zapier's, as
    a delivery carries it, where the record's version may be a cell edit's), in a savepoint: a value
    Supabase refuses leaves Supabase as it is, with a ``sync_failed`` entry holding the Tables fields, and
    never fails the transaction it runs in (an outbox claim of the whole table)."""
    back = FUNCTIONS[spec.function_name(Direction.TO_SUPABASE)]
    try:
        with conn.transaction():
            pushed, _, applied, merge = supabase_db.sync_apply(conn, spec, current, edited_at)
    except RECORD_ERRORS as exc:
        problems = db_problems(exc, current)
        log_event(ctx.logger, logging.ERROR, "push_back_refused", record_id=current.get("id"), problems=problems)
        supabase_db.append_audit(conn, audit.failed_entry(back, _body(to_tables_fields(spec, current)), problems,
                                                          datetime.now(UTC), current.get("id"), 400, keep_body=True))
        return
    if pushed == Outcome.APPLIED:
        supabase_db.append_audit(conn, audit.sync_entry(back, current, Outcome.APPLIED, datetime.now(UTC),
                                                        origin="repair"))
    elif pushed == Outcome.MERGED and applied:  # Supabase changed other fields meanwhile: merged (and queued)
        supabase_db.append_audit(conn, audit.sync_entry(back, parse_supabase_record(spec, applied), Outcome.MERGED,
                                                        datetime.now(UTC), origin="repair", merge=merge))


def _unreadable_is_older(spec: TableSpec, record: Record, edited_at: datetime | None,
                         incoming: Mapping[str, Any]) -> bool:
    """An unparseable Tables record may be overwritten only when it is provably older than ``incoming``:
    its own ``updated_at`` (and Zapier's ``edited_at``, when known) readable and before incoming's."""
    if not spec.version or incoming.get(spec.version) is None:
        return False
    try:
        ts = normalize_timestamp(record.data.get(spec.version))
    except ValueError:
        return False
    if ts is None:
        return False
    latest = max(ts, edited_at) if edited_at else ts
    return latest < incoming[spec.version]


def _run_recorded(ctx: SyncContext, lock: Callable[[psycopg.Connection], None],
                  work: Callable[[psycopg.Connection], tuple[Outcome, Any]],
                  record: Callable[[psycopg.Connection, Outcome, Any], None],
                  recovered: Callable[[psycopg.Connection, Outcome, Any], None] | None = None) -> Outcome:
    """Run ``work`` (which calls Zapier Tables under the per-record lock) and ``record`` its outcome (audit,
    outbox ack) in the same transaction. The outcome is recorded exactly once whatever fails after the Tables
    write: a retried attempt reuses the outcome instead of calling Tables again (where it would now look
    "unchanged"), and if the transaction still fails, the outcome is recorded in a fresh one - under the lock
    again, followed by ``recovered`` (what the lost transaction's lock kept out may have happened meanwhile).
    A retried attempt is such a recovery too: its lock is new, so ``recovered`` follows it as well."""
    done: list[tuple[Outcome, Any]] = []

    def again(conn: psycopg.Connection) -> Outcome:  # the Tables write is made, its transaction lost: a recovery
        outcome, extra = done[0]
        lock(conn)
        record(conn, outcome, extra)
        if recovered is not None:
            recovered(conn, outcome, extra)
        return outcome

    def attempt(conn: psycopg.Connection) -> Outcome:
        if done:
            return again(conn)
        lock(conn)
        outcome, extra = work(conn)
        done.append((outcome, extra))
        record(conn, outcome, extra)
        return outcome

    try:
        return ctx.db.run(attempt)
    except (supabase_db.DatabaseUnavailable, psycopg.Error):
        if not done:
            raise
        return ctx.db.run(again)
