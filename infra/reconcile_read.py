"""Reading both sides for ``zsync reconcile``: Zapier Tables through the records API, page by page, the
next page read ahead in a second thread (:func:`_prefetched`), each record parsed into the canonical row,
duplicates of one id resolved to the newest version, ids found only in the Tables trash (deletes made in
Tables) noted (:class:`TablesSide`); Supabase at the same time in another thread, as ``json_agg`` chunks,
plus the rows of the ids read in Tables. Also the thread helper the repairs reuse (:func:`in_background`)
and the database errors reconcile records instead of raising (:data:`DB_ERRORS`)."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from psycopg_pool import PoolTimeout

from infra.reconcile_report import ProgressTasks, TableReport
from shared.adapters import supabase_db
from shared.adapters.zapier_tables import Record
from shared.core.mapping import (
    InvalidRecord,
    check_version_skew,
    normalize_timestamp,
    parse_supabase_record,
    parse_tables_record,
)
from shared.core.spec import TableSpec
from shared.services import conflict
from shared.services.sync import SyncContext
from shared.services.tables_trash import deletes_checked

PAGE_SIZE = 1000  # the query endpoint's maximum page
DB_ERRORS = (supabase_db.DatabaseUnavailable, psycopg.Error, PoolTimeout)
T = TypeVar("T")


@dataclass
class TablesSide:
    """One table's Zapier Tables side, parsed."""

    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> parsed row
    record_ids: dict[str, str] = field(default_factory=dict)  # id -> Tables record id
    unreadable: dict[str, str] = field(default_factory=dict)  # id -> record id of an unparseable record
    duplicates: list[str] = field(default_factory=list)  # record ids to remove
    trashed: dict[str, datetime] = field(default_factory=dict)  # id only in the Tables trash -> latest deleted_at
    edited: dict[str, datetime | None] = field(default_factory=dict)  # id -> Zapier's edited_at of the kept record
    owner: dict[str, str] = field(default_factory=dict)  # Tables record id of a duplicate -> our id


def in_background(fn: Callable[[], T], name: str) -> Future[T]:
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


class SideReader:
    """Reads one table's two sides (see the module docstring)."""

    def __init__(self, ctx: SyncContext, since: datetime | None, tasks: ProgressTasks) -> None:
        self.ctx = ctx
        self.since = since
        self.tasks = tasks
        self.unreadable_in_supabase: dict[str, dict[str, str]] = {}  # table -> id -> why the sync refuses it

    def read_tables(self, spec: TableSpec, report: TableReport) -> TablesSide:
        side = TablesSide()
        task = self.tasks.add(f"{spec.name}: reading Zapier Tables")
        by_id: dict[str, list[tuple[Record, dict]]] = {}
        now, skew = datetime.now(UTC), self.ctx.settings.max_future_skew_s
        records = self.ctx.tables.iter_records(self.ctx.table_id(spec), page_size=PAGE_SIZE)
        for record in _prefetched(records, PAGE_SIZE, f"reconcile-{spec.name}-tables-read"):
            data = dict(record.data)
            if data.get("id") in (None, ""):  # what the trigger sends (see tables_service.triggers.trigger_payload)
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
            self.tasks.advance(task)
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
        self.tasks.advance(task, 0, description=f"{spec.name}: {len(side.rows)} Tables records")
        return side

    def _read_trash(self, spec: TableSpec, side: TablesSide) -> dict[str, datetime]:
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
                            side: TablesSide) -> None:
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
        return in_background(lambda: self.ctx.db.run(lambda conn: supabase_db.fetch_rows_bulk(conn, spec, self.since)),
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
