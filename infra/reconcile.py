"""``zsync reconcile``: compare Zapier Tables and Supabase record by record and repair the drift.

For each table both sides are read in bulk (Tables through the records API, page by page, the next page
read ahead in a second thread; Supabase at the same time in another, as ``json_agg`` chunks), every record
is parsed into the canonical row (:mod:`shared.core.mapping`, without the pydantic model for valid records: the
same rows and errors), and the two versions of each id are compared under ``zsync.version_cmp`` - the same
last-writer-wins rule the functions apply: identical rows are equal, a version is (``updated_at`` at
millisecond precision, content hash) so differing times decide on their own, and ties go to
``zsync.version_cmp_many`` in batched SQL (:func:`shared.services.conflict.compare_many`). Then:

* missing in Supabase, or Tables newer  -> ``zsync.sync_apply_many`` (one multi-row conditional upsert
  per batch of 1,000, one transaction; the functions' rule - versions, tombstones - so a newer write that
  landed meanwhile is never overwritten and a deleted record is never re-inserted);
* missing in Tables, or Supabase newer  -> ``TablesClient.create_many`` / ``update_many`` (batches of 100),
  under the per-record advisory locks the ``*_to_tables`` functions take, acknowledging the outbox;
* ``audit_log`` is one-way (append-only): only Tables entries missing in Supabase are inserted.

The two directions touch disjoint ids and run at the same time (Supabase's batches in a second thread);
with many Tables batches a second writer with its own client overlaps one batch's database work with the
next one's request. Audit entries go in one set-based insert per batch (``zsync.append_audit_many``),
outbox acks in one statement (``zsync.ack_outbox_set``, ``zsync.ack_outbox``'s rule). ``TableReport.timings``
holds each phase's wall time.

Deletes are never undone: an id missing in Supabase and tombstoned there (or present only in the Tables
trash) is not re-created; a Supabase row whose Tables copy is only in the Tables trash is a delete made
in Tables, applied with ``zsync.apply_tables_delete`` (the trash check's rule: unless Supabase holds a
newer version, which then wins and is re-created in Tables). See :mod:`shared.services.tables_trash`.

Every repair writes the ``<table>_synced`` audit entry the live sync would have written (same stable id,
``metadata.origin = "reconcile"``, also kept as ``metadata.via``), so a later delivery of the same version
adds nothing. A Tables write that races with a repair is not lost: its own trigger delivery carries it to
Supabase, whose newer version is then pushed back. Run on an empty side, reconcile is the initial backfill.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from psycopg_pool import PoolTimeout
from rich.progress import Progress, TaskID

from shared.adapters import supabase_db
from shared.adapters.zapier_errors import TablesError
from shared.adapters.zapier_tables import BATCH_MAX, Record, TablesClient, client_from_settings
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
from shared.core.spec import FUNCTIONS, TABLES, Direction, Kind, TableSpec
from shared.services import conflict
from shared.services.deletes import restored_row
from shared.services.sync import SyncContext, isolate
from shared.services.tables_trash import deletes_checked

PAGE_SIZE = 1000  # the query endpoint's maximum page
SUPABASE_BATCH = 1000  # rows per zsync.sync_apply_many call (one transaction)
PIPELINE_MIN_BATCHES = 8  # Tables write batches from which more writers (one more client each) pay off
TABLES_WRITERS = 2  # concurrent Tables write batches (one transaction each) for many batches
VIA = "reconcile"
DB_ERRORS = (supabase_db.DatabaseUnavailable, psycopg.Error, PoolTimeout)
T = TypeVar("T")


@dataclass
class TableReport:
    """What reconcile found and did for one table."""

    table: str
    compared: int = 0
    in_sync: int = 0
    missing_in_supabase: int = 0
    missing_in_tables: int = 0
    stale_in_supabase: int = 0
    stale_in_tables: int = 0
    repaired: int = 0
    unresolved: int = 0  # drift left (a batch failed, or a newer write raced the repair: the sync has it)
    invalid_in_tables: int = 0  # Tables records that cannot be parsed (and have no Supabase row to restore)
    duplicates_in_tables: int = 0  # extra Tables records sharing an id (older ones; removed unless dry run)
    invalid_in_supabase: int = 0  # Supabase rows the sync cannot deliver (parked; left alone)
    deleted_in_tables: int = 0  # Tables copies of records deleted in Supabase (tombstoned): deleted, not re-inserted
    trashed_in_tables: int = 0  # Supabase rows whose Tables copy is only in the Tables trash: deleted in Tables
    deleted_in_supabase: int = 0  # of those, deleted in Supabase (the others were newer there: re-created)
    errors: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per phase (see _Reconciler.table)

    @property
    def drift(self) -> int:
        return self.missing_in_supabase + self.missing_in_tables + self.stale_in_supabase + self.stale_in_tables \
            + self.trashed_in_tables


@dataclass
class ReconcileResult:
    dry_run: bool
    since: datetime | None
    tables: dict[str, TableReport] = field(default_factory=dict)

    def total(self, name: str) -> int:
        return sum(getattr(t, name) for t in self.tables.values())

    @property
    def in_sync(self) -> bool:
        """After a repair run: nothing left unrepaired. After a dry run: nothing to repair."""
        if self.dry_run:
            return self.total("drift") == 0 and self.total("duplicates_in_tables") == 0
        return self.total("unresolved") == 0 and not any(t.errors for t in self.tables.values())


@dataclass
class _TablesSide:
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> parsed row
    record_ids: dict[str, str] = field(default_factory=dict)  # id -> Tables record id
    unreadable: dict[str, str] = field(default_factory=dict)  # id -> record id of an unparseable record
    duplicates: list[str] = field(default_factory=list)  # record ids to remove
    trashed: dict[str, datetime] = field(default_factory=dict)  # id only in the Tables trash -> latest deleted_at
    edited: dict[str, datetime | None] = field(default_factory=dict)  # id -> Zapier's edited_at of the kept record
    owner: dict[str, str] = field(default_factory=dict)  # Tables record id of a duplicate -> our id


def _in_background(fn: Callable[[], T], name: str) -> Future[T]:
    """``fn()`` in a thread of its own; the future's ``result()`` waits and returns its value or raises."""
    executor = ThreadPoolExecutor(1, thread_name_prefix=name)
    try:
        return executor.submit(fn)
    finally:
        executor.shutdown(wait=False)  # the thread ends once fn has returned


def _prefetched(records: Iterator[Record], page: int, name: str) -> Iterator[Record]:
    """``records``, read ahead a page at a time in a second thread (the next page is on its way over HTTP
    while this one is parsed). Errors are raised where the records stop."""
    pages: queue.Queue[list[Record] | BaseException | None] = queue.Queue(maxsize=2)
    stop = threading.Event()

    def produce() -> None:
        try:
            batch: list[Record] = []
            for record in records:
                batch.append(record)
                if len(batch) >= page:
                    pages.put(batch)
                    batch = []
                    if stop.is_set():
                        return
            pages.put(batch)
            pages.put(None)
        except BaseException as exc:  # raised in the consumer
            pages.put(exc)

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while (item := pages.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield from item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue, then let it finish
            with contextlib.suppress(queue.Empty):
                pages.get(timeout=0.05)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def apply_many(conn: psycopg.Connection, spec: TableSpec, rows: Sequence[dict],
               edited: dict[str, datetime | None] | None = None,
               refused: list[tuple[str, list[dict[str, str]]]] | None = None) -> list[tuple[str, str, dict | None]]:
    """``zsync.sync_apply_many`` (the functions' rule: versions, tombstones; ``edited``: Zapier's edited_at by
    id, where given): -> (id, outcome, stored before) per applied row. A row the database refuses
    (:func:`shared.services.sync.isolate`) is left out and added to ``refused`` with its problems; the others
    are applied."""
    def upsert(c: psycopg.Connection, part: list[dict]) -> list[Any]:
        return supabase_db.sync_apply_many(c, spec, [(r, (edited or {}).get(r["id"])) for r in part])

    done, bad = isolate(conn, list(rows), upsert, lambda r: r)
    if refused is not None:
        refused += [(r["id"], problems) for r, problems in bad]
    return [(r["id"], outcome, stored) for r, (outcome, stored, _) in done]


def _identical(json_fields: tuple[str, ...], a: dict, b: dict) -> bool:
    """``row_to_json(a) == row_to_json(b)``, cheaper: parsed rows of one table hold the same field types
    (text, int, UTC datetime, list of text) except floats (``0.0 == -0.0``) and JSON values, where ``1``,
    ``1.0`` and ``true`` are equal in Python but not the same JSON: those are compared as JSON text."""
    if a != b:
        return False
    return all(a[f] is None or json.dumps(a[f]) == json.dumps(b[f]) for f in json_fields)


def _synced_entry(spec: TableSpec, direction: Direction, row: dict, now: datetime,
                  stored: dict | None = None) -> dict:
    entry = audit.sync_entry(FUNCTIONS[spec.function_name(direction)], row, Outcome.APPLIED, now, stored,
                             origin="reconcile")
    entry["metadata"]["via"] = VIA
    return entry


def _in_scope(spec: TableSpec, row: dict, since: datetime | None) -> bool:
    if since is None:
        return True
    ts = row.get(spec.version or "timestamp")
    return ts is not None and ts >= since


class _Reconciler:
    def __init__(self, ctx: SyncContext, since: datetime | None, dry_run: bool, progress: Progress | None):
        self.ctx = ctx
        self.unreadable_in_supabase: dict[str, dict[str, str]] = {}
        self.since = since
        self.dry_run = dry_run
        self.progress = progress
        self._owner: dict[str, str] = {}  # Tables record id of a duplicate -> our id

    # -- progress --

    def _task(self, description: str, total: float | None = None) -> TaskID | None:
        return self.progress.add_task(description, total=total) if self.progress else None

    def _advance(self, task: TaskID | None, n: float = 1, **kw: Any) -> None:
        if self.progress is not None and task is not None:
            self.progress.update(task, advance=n, **kw)

    # -- reading --

    def read_tables(self, spec: TableSpec, report: TableReport) -> _TablesSide:
        side = _TablesSide()
        task = self._task(f"{spec.name}: reading Zapier Tables")
        by_id: dict[str, list[tuple[Record, dict]]] = {}
        now, skew = datetime.now(UTC), self.ctx.settings.max_future_skew_s
        records = self.ctx.tables.iter_records(self.ctx.table_id(spec), page_size=PAGE_SIZE)
        for record in _prefetched(records, PAGE_SIZE, f"reconcile-{spec.name}-tables-read"):
            data = dict(record.data)
            if data.get("id") in (None, ""):  # what the trigger sends (see tables_service.trigger_payload)
                data["id"] = record.id
            try:
                received = normalize_timestamp(record.edited_at) if record.edited_at else None
                row = parse_tables_record(spec, data, received_at=received, fast=True)
                check_version_skew(spec, row, now, skew)  # a version from the future: as unreadable
            except (InvalidRecord, ValueError):
                rid = data.get("id")
                if isinstance(rid, str) and rid:
                    side.unreadable.setdefault(rid, record.id)
                report.invalid_in_tables += 1
                continue
            by_id.setdefault(row["id"], []).append((record, row))
            side.edited.setdefault(row["id"], received)  # replaced by the kept duplicate's below
            self._advance(task)
        dupes = {k: v for k, v in by_id.items() if len(v) > 1}
        if dupes and not spec.append_only:
            self._resolve_duplicates(spec, dupes, side)
        for key, found in by_id.items():
            if key not in dupes or spec.append_only:
                record, row = found[0]
                side.rows[key], side.record_ids[key] = row, record.id
            if key in dupes:
                report.duplicates_in_tables += len(found) - 1
        for key in side.rows:
            side.unreadable.pop(key, None)
        if deletes_checked(spec):
            side.trashed = self._read_trash(spec, side)
        self._advance(task, 0, description=f"{spec.name}: {len(side.rows)} Tables records")
        return side

    def _read_trash(self, spec: TableSpec, side: _TablesSide) -> dict[str, datetime]:
        """Ids whose only Tables records are in the trash (deleted in Tables), with the latest deleted_at."""
        found: list[tuple[str, str, datetime]] = []
        for record in self.ctx.tables.iter_records(self.ctx.table_id(spec), page_size=PAGE_SIZE, trash="only"):
            rid = record.data.get("id")
            try:
                deleted_at = normalize_timestamp(record.deleted_at)
            except ValueError:
                continue
            if isinstance(rid, str) and rid and deleted_at and rid not in side.rows and rid not in side.unreadable:
                found.append((rid, record.id, deleted_at))
        # The records the sync trashed itself (zsync.sync_trashed) are not deletes made in Tables.
        own = self.ctx.db.run(lambda conn: supabase_db.sync_trashed_ids(conn, spec, [z for _, z, _ in found]))
        out: dict[str, datetime] = {}
        for rid, zid, deleted_at in found:
            if zid not in own:
                out[rid] = max(deleted_at, out.get(rid, deleted_at))
        return out

    def _resolve_duplicates(self, spec: TableSpec, dupes: dict[str, list[tuple[Record, dict]]],
                            side: _TablesSide) -> None:
        """Several records with one id: keep the newest version (the sync's own rule), remove the others."""
        with self.ctx.db.transaction() as conn:
            for key, found in dupes.items():
                keep = found[0]
                for candidate in found[1:]:
                    if conflict.compare(conn, spec, candidate[1], keep[1]) > 0:
                        keep = candidate
                side.rows[key], side.record_ids[key] = keep[1], keep[0].id
                side.edited[key] = normalize_timestamp(keep[0].edited_at) if keep[0].edited_at else None
                side.duplicates += [r.id for r, _ in found if r.id != keep[0].id]
                side.owner |= {r.id: key for r, _ in found if r.id != keep[0].id}

    def fetch_supabase(self, spec: TableSpec) -> Future[list[dict]]:
        """Rows changed since ``since`` (all without it), read in a second thread while Tables is read."""
        return _in_background(lambda: self.ctx.db.run(lambda conn: supabase_db.fetch_rows_bulk(conn, spec, self.since)),
                           f"reconcile-{spec.name}-supabase-read")

    def read_supabase(self, spec: TableSpec, extra_ids: Sequence[str], fetched: Future[list[dict]]
                      ) -> dict[str, dict]:
        """The rows of :meth:`fetch_supabase` plus the rows of ``extra_ids``, parsed."""
        def work(conn: psycopg.Connection) -> list[dict]:
            rows = fetched.result()
            have = {r["id"] for r in rows}
            wanted = [i for i in extra_ids if i not in have]
            if wanted:
                rows += [r[0] for r in conn.execute(
                    f'SELECT to_jsonb(t) FROM public."{spec.name}" t WHERE t.id = ANY(%s)', (wanted,))]
            return rows

        parsed: dict[str, dict] = {}
        for r in self.ctx.db.run(work):
            try:
                parsed[r["id"]] = parse_supabase_record(spec, r, fast=True)
            except InvalidRecord as exc:  # refused by the functions too: parked, repaired by hand
                self.unreadable_in_supabase.setdefault(spec.name, {})[r["id"]] = str(exc)[:200]
        return parsed

    # -- one table --

    def table(self, spec: TableSpec) -> TableReport:
        report = TableReport(spec.name)
        fetched = None if spec.append_only else self.fetch_supabase(spec)
        try:
            started = time.perf_counter()
            tables_side = self.read_tables(spec, report)
            report.timings["read_tables"] = time.perf_counter() - started
        except TablesError as exc:
            report.errors.append(f"reading Zapier Tables: {exc}")
            if fetched is not None:
                with contextlib.suppress(DB_ERRORS):
                    fetched.result()
            return report
        if fetched is None:
            self._append_only(spec, tables_side, report)
        else:
            self._versioned(spec, tables_side, report, fetched)
        if tables_side.duplicates and not self.dry_run:
            self._owner = tables_side.owner
            self._remove(spec, tables_side.duplicates, report)
        return report

    def _append_only(self, spec: TableSpec, side: _TablesSide, report: TableReport) -> None:
        rows = [r for r in side.rows.values() if _in_scope(spec, r, self.since) or r.get("timestamp") is None]
        ids = [r["id"] for r in rows]

        def present(conn: psycopg.Connection) -> set[str]:
            found = conn.execute(f'SELECT id FROM public."{spec.name}" WHERE id = ANY(%s)', (ids,)).fetchall()
            return {r[0] for r in found}

        have = self.ctx.db.run(present) if ids else set()
        missing = [r for r in rows if r["id"] not in have]
        report.compared, report.in_sync, report.missing_in_supabase = len(rows), len(rows) - len(missing), len(missing)
        if missing and not self.dry_run:
            self._to_supabase(spec, missing, report)

    def _versioned(self, spec: TableSpec, side: _TablesSide, report: TableReport,
                   fetched: Future[list[dict]]) -> None:
        t_scope = [i for i, r in side.rows.items() if _in_scope(spec, r, self.since)]
        try:
            started = time.perf_counter()
            supa = self.read_supabase(spec, t_scope + list(side.unreadable), fetched)
            report.timings["read_supabase"] = time.perf_counter() - started  # what was left after Tables
        except DB_ERRORS as exc:
            report.errors.append(f"reading Supabase: {type(exc).__name__}")
            return
        bad = self.unreadable_in_supabase.get(spec.name, {})
        report.invalid_in_supabase = len(bad)
        scope = sorted((set(t_scope) | {i for i, r in supa.items() if _in_scope(spec, r, self.since)}) - set(bad))
        to_supabase: list[dict] = []
        creates: list[dict] = []
        updates: list[tuple[str, dict]] = []
        pairs: list[tuple[str, dict, dict]] = []
        trashed: list[dict] = []
        missing: dict[str, datetime | None] = {}  # id missing in Supabase -> its Tables record's edited_at
        for rid in scope:
            t_row, s_row = side.rows.get(rid), supa.get(rid)
            if s_row is None and t_row is not None:
                to_supabase.append(t_row)
                missing[rid] = side.edited.get(rid)  # a change after a Tables delete is not refused (restore)
                report.missing_in_supabase += 1
            elif t_row is None and s_row is not None:
                if rid in side.trashed:  # deleted in Tables: a delete, not a missing copy (decided below)
                    trashed.append(s_row)
                    report.trashed_in_tables += 1
                elif rid in side.unreadable:  # unparseable in Tables: overwrite it with Supabase's version
                    updates.append((side.unreadable[rid], s_row))
                    report.stale_in_tables += 1
                else:
                    creates.append(s_row)
                    report.missing_in_tables += 1
            elif t_row is not None and s_row is not None:
                pairs.append((rid, t_row, s_row))
        report.compared = len(scope)
        # Identical rows are the same version (version_cmp of equal inputs is 0): only the others go to SQL.
        json_fields = spec.fields_of(Kind.JSON) + spec.fields_of(Kind.FLOAT)
        differing = [p for p in pairs if not _identical(json_fields, p[1], p[2])]
        report.in_sync += len(pairs) - len(differing)
        cmps = self.ctx.db.run(lambda conn: conflict.compare_many(conn, spec, [(t, s) for _, t, s in differing]))
        report.timings["compare"] = time.perf_counter() - started - report.timings["read_supabase"]
        for (rid, t_row, s_row), cmp in zip(differing, cmps, strict=True):
            if cmp > 0:
                to_supabase.append(t_row)
                report.stale_in_supabase += 1
            elif cmp < 0:
                updates.append((side.record_ids[rid], s_row))
                report.stale_in_tables += 1
            else:
                report.in_sync += 1
        if self.dry_run:
            return
        started = time.perf_counter()
        if trashed:  # before the creates: a Supabase row newer than the Tables delete is re-created there
            creates += self._tables_deletes(spec, trashed, side.trashed, report)
        # The two directions touch disjoint ids: Supabase's batches run in a second thread (its time is
        # spent in Postgres) while this one writes to Tables; each keeps its own counts, merged after.
        deleted: list[str] = []
        failed: list[BaseException] = []
        sub = TableReport(spec.name)
        worker = None
        connections = self.ctx.settings.db_pool_max  # each thread below holds one while it works
        if to_supabase:
            def to_supabase_side() -> None:
                try:
                    began = time.perf_counter()
                    deleted.extend(self._to_supabase(spec, to_supabase, sub, missing))
                    sub.timings["to_supabase"] = time.perf_counter() - began
                except BaseException as exc:  # raised again in this thread below
                    failed.append(exc)

            if connections >= 2:
                worker = _in_background(to_supabase_side, f"reconcile-{spec.name}-supabase")
            else:  # one pooled connection: one thing at a time
                to_supabase_side()
        writers = max(1, min(TABLES_WRITERS, connections - (worker is not None)))
        try:
            if (creates or updates) and not failed:
                self._to_tables(spec, creates, updates, report, writers)
        finally:
            if worker is not None:
                worker.result()  # to_supabase_side keeps its own exception in `failed`
            report.repaired += sub.repaired
            report.unresolved += sub.unresolved
            report.errors += sub.errors
        if failed:
            raise failed[0]
        report.timings["repair"] = time.perf_counter() - started
        report.timings["to_supabase"] = sub.timings.get("to_supabase", 0.0)
        if deleted:  # deleted in Supabase (tombstone as new or newer): delete the Tables copy instead
            self._delete_copies(spec, {side.record_ids[i]: i for i in deleted if i in side.record_ids}, report, side)

    # -- repairs --

    def _to_supabase(self, spec: TableSpec, rows: list[dict], report: TableReport,
                     edited: dict[str, datetime | None] | None = None) -> list[str]:
        """``edited``: Zapier's edited_at of rows missing in Supabase (a change made in Tables after a delete
        there wins over its tombstone, as on the live path). -> the ids refused because they were deleted in
        Supabase (never resurrected)."""
        task = self._task(f"{spec.name}: -> Supabase", total=len(rows))
        deleted: list[str] = []

        def work(conn: psycopg.Connection, chunk: Sequence[dict]) -> tuple[int, int, list]:
            now = datetime.now(UTC)
            if spec.append_only:
                inserted = supabase_db.append_audit_many(conn, list(chunk))
                return inserted, 0, []
            by_id = {r["id"]: r for r in chunk}
            entries, applied, raced = [], 0, 0
            refused: list[tuple[str, list[dict[str, str]]]] = []
            for rid, outcome, stored in apply_many(conn, spec, chunk, edited, refused):
                if outcome == Outcome.APPLIED:
                    applied += 1
                    entries.append(_synced_entry(spec, Direction.TO_SUPABASE, by_id[rid], now, stored))
                elif outcome == Outcome.SKIPPED_STALE:
                    raced += 1  # a newer write arrived since we read: the live sync carries it
                elif outcome == Outcome.DELETED:
                    deleted.append(rid)
            supabase_db.append_audit_many(conn, entries)
            return applied, raced, refused

        for chunk in _chunks(rows, SUPABASE_BATCH):
            try:
                applied, raced, refused = self.ctx.db.run(lambda conn, chunk=chunk: work(conn, chunk))
            except DB_ERRORS as exc:
                report.errors.append(f"Supabase batch of {len(chunk)}: {type(exc).__name__}")
                report.unresolved += len(chunk)
                self._advance(task, len(chunk))
                continue
            report.repaired += applied
            report.unresolved += raced + len(refused)
            for rid, problems in refused:  # Supabase refuses this Tables version: left as it is, reported
                report.errors.append(f"{rid}: " + "; ".join(f"{p['field']}: {p['problem']}" for p in problems)[:300])
            self._advance(task, len(chunk))
        return deleted

    def _tables_deletes(self, spec: TableSpec, rows: list[dict], trashed: dict[str, datetime],
                        report: TableReport) -> list[dict]:
        """Apply deletes made in Tables (zsync.apply_tables_delete, audited like the trash check), in batches.
        -> the rows Supabase keeps (newer than the delete, or inserted and not yet in Tables): to re-create."""
        fn = FUNCTIONS[spec.function_name(Direction.TO_SUPABASE)]
        keep: list[dict] = []

        def work(conn: psycopg.Connection, chunk: Sequence[dict]) -> tuple[list[dict], int]:
            ids = sorted(r["id"] for r in chunk)
            pending = {r[0] for r in conn.execute("SELECT zsync.trash_insert_pending(%s, %s)", (spec.name, ids))}
            kept, deleted = [], 0
            for row in chunk:
                if row["id"] in pending:
                    kept.append(row)
                    continue
                supabase_db.lock_record(conn, spec, row["id"])
                outcome = Outcome(supabase_db.apply_tables_delete(conn, spec, row["id"], trashed[row["id"]]))
                if outcome in (Outcome.APPLIED, Outcome.SKIPPED_STALE):
                    entry = audit.delete_entry(fn, row["id"], trashed[row["id"]], datetime.now(UTC), outcome,
                                               origin="reconcile")
                    entry["metadata"]["via"] = VIA
                    supabase_db.append_audit(conn, entry)
                if outcome is Outcome.APPLIED:
                    deleted += 1
                elif outcome is Outcome.SKIPPED_STALE:
                    kept.append(row)
            return kept, deleted

        for chunk in _chunks(rows, BATCH_MAX):
            try:
                kept, deleted = self.ctx.db.run(lambda conn, chunk=chunk: work(conn, chunk))
            except DB_ERRORS as exc:
                report.errors.append(f"Supabase delete batch of {len(chunk)}: {type(exc).__name__}")
                report.unresolved += len(chunk)
                continue
            keep += kept
            report.deleted_in_supabase += deleted
            report.repaired += deleted
        return keep

    def _delete_copies(self, spec: TableSpec, record_ids: dict[str, str], report: TableReport,
                       side: _TablesSide) -> None:
        """``record_ids``: Tables record id -> our id. A copy the sync trashed itself that is live again was
        restored by a person after the delete: applied to Supabase as a later change, not deleted again."""
        restored = self.ctx.db.run(lambda conn: supabase_db.sync_trashed_ids(conn, spec, list(record_ids)))
        if restored:
            self._restore(spec, [record_ids[z] for z in restored], side, report)
            record_ids = {z: ours for z, ours in record_ids.items() if z not in restored}
        table_id = self.ctx.table_id(spec)
        done: dict[str, str] = {}
        try:
            for rid, ours in record_ids.items():
                self.ctx.tables.delete(table_id, rid, missing_ok=True)
                done[rid] = ours
                report.deleted_in_tables += 1
        except TablesError as exc:
            report.errors.append(f"deleting copies of deleted records: {exc}")
        self._note_trashed(spec, done)

    def _restore(self, spec: TableSpec, ids: list[str], side: _TablesSide, report: TableReport) -> None:
        def work(conn: psycopg.Connection) -> int:
            now, done, entries = datetime.now(UTC), 0, []
            for rid in ids:
                supabase_db.lock_record(conn, spec, rid)
                tomb = supabase_db.tombstone_version(conn, spec, rid)
                row = restored_row(spec, side.rows[rid], tomb, side.edited.get(rid)) if tomb else side.rows[rid]
                stored, before = supabase_db.sync_upsert(conn, spec, row)
                if stored == Outcome.APPLIED:
                    done += 1
                    entries.append(_synced_entry(spec, Direction.TO_SUPABASE, row, now, before))
            supabase_db.append_audit_many(conn, entries)
            return done

        try:
            report.repaired += self.ctx.db.run(work)
        except DB_ERRORS as exc:
            report.errors.append(f"restored records: {type(exc).__name__}")
            report.unresolved += len(ids)

    def _note_trashed(self, spec: TableSpec, trashed: dict[str, str]) -> None:
        """The Tables records reconcile moved to the trash: never a delete made in Tables (zsync.sync_trashed)."""
        def work(conn: psycopg.Connection) -> None:
            for rid, ours in trashed.items():
                supabase_db.note_sync_trashed(conn, spec, ours, [rid])

        if trashed:
            self.ctx.db.run(work)

    def _to_tables(self, spec: TableSpec, creates: list[dict], updates: list[tuple[str, dict]],
                   report: TableReport, writers: int = 1) -> None:
        """Batches of :data:`BATCH_MAX`, each in its own transaction: per-record advisory locks (as the
        ``*_to_tables`` functions take), the Tables write, the audit entries, the outbox ack. With many
        batches a second writer (its own client) sends one while the other records its previous one, so
        our database work overlaps Zapier's answer time; the first failure stops both (a rerun resumes)."""
        table_id = self.ctx.table_id(spec)
        task = self._task(f"{spec.name}: -> Zapier Tables", total=len(creates) + len(updates))
        batches: list[tuple[str, Sequence[Any]]] = [("create", c) for c in _chunks(creates, BATCH_MAX)]
        batches += [("update", c) for c in _chunks(updates, BATCH_MAX)]
        pending = iter(range(len(batches)))
        lock = threading.Lock()
        stopped = threading.Event()

        def write(client: TablesClient, kind: str, chunk: Sequence[Any]) -> None:
            rows = list(chunk) if kind == "create" else [row for _, row in chunk]
            fields = [to_tables_fields(spec, r) for r in rows]
            ids = sorted(r["id"] for r in rows)
            # Not retried as a whole (a create must not run twice); the HTTP calls retry themselves.
            with self.ctx.db.transaction() as conn:
                conn.execute("SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0))) "
                             "FROM (SELECT unnest(%s::text[]) AS k ORDER BY 1) s",
                             ([f"{spec.name}:{i}" for i in ids],))
                if kind == "create":
                    client.create_many(table_id, fields)
                else:
                    client.update_many(table_id, [(rid, f) for (rid, _), f in zip(chunk, fields, strict=True)])
                now = datetime.now(UTC)
                supabase_db.append_audit_many(conn, [_synced_entry(spec, Direction.TO_TABLES, r, now) for r in rows])
                self._ack(conn, spec, rows)

        def writer(client: TablesClient) -> None:
            while not stopped.is_set():
                with lock:
                    index = next(pending, None)
                if index is None:
                    return
                kind, chunk = batches[index]
                try:
                    write(client, kind, chunk)
                except (TablesError, *DB_ERRORS) as exc:
                    with lock:
                        stopped.set()
                        report.errors.append(f"Tables {kind} batch of {len(chunk)}: {type(exc).__name__}: "
                                             f"{str(exc)[:200]}")
                        report.unresolved += len(chunk)
                    self._advance(task, len(chunk))
                    return  # a dependency is failing: stop this table's repairs, a rerun resumes
                with lock:
                    report.repaired += len(chunk)
                self._advance(task, len(chunk))

        extra: list[Future[None]] = []
        if len(batches) >= PIPELINE_MIN_BATCHES:
            def other_writer() -> None:
                with client_from_settings(self.ctx.settings) as client:
                    writer(client)

            extra = [_in_background(other_writer, f"reconcile-{spec.name}-tables-write-{n}")
                     for n in range(1, writers)]
        try:
            writer(self.ctx.tables)
        finally:
            for other in extra:
                other.result()
        left = sum(len(chunk) for _, chunk in (batches[i] for i in pending))  # never started (after a failure)
        report.unresolved += left
        self._advance(task, left)

    @staticmethod
    def _ack(conn: psycopg.Connection, spec: TableSpec, rows: Sequence[dict]) -> None:
        supabase_db.ack_outbox_set(conn, spec, [(r["id"], r.get(spec.version) if spec.version else None, "applied")
                                                for r in rows])

    def _remove(self, spec: TableSpec, record_ids: list[str], report: TableReport) -> None:
        table_id = self.ctx.table_id(spec)
        done: dict[str, str] = {}
        try:
            for rid in record_ids:
                self.ctx.tables.delete(table_id, rid, missing_ok=True)
                done[rid] = self._owner.get(rid, "")
        except TablesError as exc:
            report.errors.append(f"removing duplicates: {exc}")
        self._note_trashed(spec, done)


def reconcile(ctx: SyncContext, tables: Sequence[str] | None = None, *, since: datetime | None = None,
              dry_run: bool = False, progress: Progress | None = None) -> ReconcileResult:
    """Compare and (unless ``dry_run``) repair ``tables`` (default: all four). See the module docstring."""
    names = list(tables or TABLES)
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        raise ValueError(f"unknown table(s) {unknown}; one of {sorted(TABLES)}")
    since = since.astimezone(UTC) if since else None
    result = ReconcileResult(dry_run=dry_run, since=since)
    worker = _Reconciler(ctx, since, dry_run, progress)
    for name in names:
        try:
            result.tables[name] = worker.table(TABLES[name])
        except DB_ERRORS as exc:
            report = result.tables.setdefault(name, TableReport(name))
            report.errors.append(f"Supabase: {type(exc).__name__}")
    return result
