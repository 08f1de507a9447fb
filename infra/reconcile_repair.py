"""Repairing the drift ``zsync reconcile`` found, under the functions' rules:

* to Supabase (missing there, or Tables newer): ``zsync.sync_apply_many``, one multi-row conditional upsert
  per batch of 1,000 in one transaction (versions, tombstones: a newer write that landed meanwhile is never
  overwritten, a deleted record never re-inserted), in a second thread; ``audit_log`` entries appended;
* to Zapier Tables (missing there, or Supabase newer): ``TablesClient.create_many`` / ``update_many`` in
  batches of 100 under the per-record advisory locks the ``*_to_tables`` functions take, acknowledging the
  outbox; with many batches a second writer with its own client;
* deletes: one made in Tables (the copy only in the trash) applied with ``zsync.apply_tables_delete``
  unless Supabase is newer (then re-created in Tables); the Tables copy of a record deleted in Supabase
  deleted (or, restored by a person after the sync trashed it, applied to Supabase); duplicates removed.

Each repair writes the ``<table>_synced`` audit entry the live sync would have (``metadata.origin`` and
``metadata.via`` = ``"reconcile"``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

import psycopg

from infra.reconcile_compare import Drift
from infra.reconcile_read import DB_ERRORS, TablesSide, in_background
from infra.reconcile_report import ProgressTasks, TableReport
from shared.adapters import supabase_db
from shared.adapters.zapier_errors import TablesError
from shared.adapters.zapier_tables import BATCH_MAX, TablesClient, client_from_settings
from shared.core import audit
from shared.core.mapping import parse_supabase_record, to_tables_fields
from shared.core.outcome import Outcome
from shared.core.spec import FUNCTIONS, Direction, TableSpec
from shared.services.deletes import restored_row
from shared.services.sync import SyncContext, isolate

SUPABASE_BATCH = 1000  # rows per zsync.sync_apply_many call (one transaction)
PIPELINE_MIN_BATCHES = 8  # Tables write batches from which more writers (one more client each) pay off
TABLES_WRITERS = 2  # concurrent Tables write batches (one transaction each) for many batches
VIA = "reconcile"


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def apply_many(conn: psycopg.Connection, spec: TableSpec, rows: Sequence[dict],
               edited: dict[str, datetime | None] | None = None,
               refused: list[tuple[str, list[dict[str, str]]]] | None = None,
               merges: dict[str, tuple[dict, dict]] | None = None) -> list[tuple[str, str, dict | None]]:
    """``zsync.sync_apply_many`` (the functions' rule: versions, tombstones; ``edited``: Zapier's edited_at by
    id, where given): -> (id, outcome, stored before) per applied row. A row the database refuses
    (:func:`shared.services.sync.isolate`) is left out and added to ``refused`` with its problems; the others
    are applied. ``merges``: filled with (merged row, which fields came from where) of the rows merged."""
    merges = {} if merges is None else merges

    def upsert(c: psycopg.Connection, part: list[dict]) -> list[Any]:
        return supabase_db.sync_apply_many(c, spec, [(r, (edited or {}).get(r["id"])) for r in part])

    done, bad = isolate(conn, list(rows), upsert, lambda r: r)
    if refused is not None:
        refused += [(r["id"], problems) for r, problems in bad]
    merges.update({r["id"]: (applied, merge) for r, (outcome, _, applied, merge) in done if outcome == Outcome.MERGED})
    return [(r["id"], outcome, stored) for r, (outcome, stored, *_) in done]


def _synced_entry(spec: TableSpec, direction: Direction, row: dict, now: datetime,
                  stored: dict | None = None) -> dict:
    entry = audit.sync_entry(FUNCTIONS[spec.function_name(direction)], row, Outcome.APPLIED, now, stored,
                             origin="reconcile")
    entry["metadata"]["via"] = VIA
    return entry


class Repairer:
    """Writes one table's repairs to both sides (see the module docstring)."""

    def __init__(self, ctx: SyncContext, tasks: ProgressTasks) -> None:
        self.ctx = ctx
        self.tasks = tasks

    def repair(self, spec: TableSpec, drift: Drift, side: TablesSide, report: TableReport) -> None:
        """Both directions of a versioned table's ``drift``; deletes made in Tables first."""
        started = time.perf_counter()
        if drift.trashed:  # before the creates: a Supabase row newer than the Tables delete is re-created there
            drift.creates += self._tables_deletes(spec, drift.trashed, side.trashed, report)
        # The two directions touch disjoint ids: Supabase's batches run in a second thread (its time is
        # spent in Postgres) while this one writes to Tables; each keeps its own counts, merged after.
        deleted: list[str] = []
        failed: list[BaseException] = []
        sub = TableReport(spec.name)
        worker = None
        connections = self.ctx.settings.db_pool_max  # each thread below holds one while it works
        if drift.to_supabase:
            def to_supabase_side() -> None:
                try:
                    began = time.perf_counter()
                    deleted.extend(self.to_supabase(spec, drift.to_supabase, sub, drift.missing | drift.edited))
                    sub.timings["to_supabase"] = time.perf_counter() - began
                except BaseException as exc:  # raised again in this thread below
                    failed.append(exc)

            if connections >= 2:
                worker = in_background(to_supabase_side, f"reconcile-{spec.name}-supabase")
            else:  # one pooled connection: one thing at a time
                to_supabase_side()
        writers = max(1, min(TABLES_WRITERS, connections - (worker is not None)))
        try:
            if (drift.creates or drift.updates) and not failed:
                self._to_tables(spec, drift.creates, drift.updates, report, writers)
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

    def to_supabase(self, spec: TableSpec, rows: list[dict], report: TableReport,
                    edited: dict[str, datetime | None] | None = None) -> list[str]:
        """``edited``: Zapier's edited_at of rows missing in Supabase (a change made in Tables after a delete
        there wins over its tombstone, as on the live path). -> the ids refused because they were deleted in
        Supabase (never resurrected)."""
        task = self.tasks.add(f"{spec.name}: -> Supabase", total=len(rows))
        deleted: list[str] = []

        def work(conn: psycopg.Connection, chunk: Sequence[dict]) -> tuple[int, int, list]:
            now = datetime.now(UTC)
            if spec.append_only:
                inserted = supabase_db.append_audit_many(conn, list(chunk))
                return inserted, 0, []
            by_id = {r["id"]: r for r in chunk}
            entries, applied, raced = [], 0, 0
            refused: list[tuple[str, list[dict[str, str]]]] = []
            merges: dict[str, tuple[dict, dict]] = {}
            for rid, outcome, stored in apply_many(conn, spec, chunk, edited, refused, merges):
                if outcome == Outcome.MERGED:  # Supabase holds the merged record and sends it on to Tables
                    applied += 1
                    row, merge = merges[rid]
                    entry = audit.sync_entry(FUNCTIONS[spec.function_name(Direction.TO_SUPABASE)],
                                             parse_supabase_record(spec, row), Outcome.MERGED, now, stored,
                                             origin="reconcile", merge=merge)
                    entry["metadata"]["via"] = VIA
                    entries.append(entry)
                elif outcome == Outcome.APPLIED:
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
                self.tasks.advance(task, len(chunk))
                continue
            report.repaired += applied
            report.unresolved += raced + len(refused)
            for rid, problems in refused:  # Supabase refuses this Tables version: left as it is, reported
                report.errors.append(f"{rid}: " + "; ".join(f"{p['field']}: {p['problem']}" for p in problems)[:300])
            self.tasks.advance(task, len(chunk))
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
                       side: TablesSide) -> None:
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

    def _restore(self, spec: TableSpec, ids: list[str], side: TablesSide, report: TableReport) -> None:
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
        task = self.tasks.add(f"{spec.name}: -> Zapier Tables", total=len(creates) + len(updates))
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
                    self.tasks.advance(task, len(chunk))
                    return  # a dependency is failing: stop this table's repairs, a rerun resumes
                with lock:
                    report.repaired += len(chunk)
                self.tasks.advance(task, len(chunk))

        extra: list[Future[None]] = []
        if len(batches) >= PIPELINE_MIN_BATCHES:
            def other_writer() -> None:
                with client_from_settings(self.ctx.settings) as client:
                    writer(client)

            extra = [in_background(other_writer, f"reconcile-{spec.name}-tables-write-{n}")
                     for n in range(1, writers)]
        try:
            writer(self.ctx.tables)
        finally:
            for other in extra:
                other.result()
        left = sum(len(chunk) for _, chunk in (batches[i] for i in pending))  # never started (after a failure)
        report.unresolved += left
        self.tasks.advance(task, left)

    @staticmethod
    def _ack(conn: psycopg.Connection, spec: TableSpec, rows: Sequence[dict]) -> None:
        supabase_db.ack_outbox_set(conn, spec, [(r["id"], r.get(spec.version) if spec.version else None, "applied")
                                                for r in rows])
        supabase_db.agree(conn, spec, list(rows))  # both sides hold these rows: the field merge's base

    def mark_agreed(self, spec: TableSpec, agreed: list[tuple[str, datetime]], report: TableReport) -> None:
        """Records found equal on both sides: their versions are agreed, the field merge's base for records whose
        agreement left no mark (older than the merge: zsync.mark_agreed adds one only where none is)."""
        try:
            for chunk in _chunks(agreed, SUPABASE_BATCH):
                self.ctx.db.run(lambda conn, chunk=chunk: supabase_db.mark_agreed(conn, spec, list(chunk)))
        except DB_ERRORS as exc:
            report.errors.append(f"marking agreed versions: {type(exc).__name__}")

    def remove_duplicates(self, spec: TableSpec, record_ids: list[str], owner: dict[str, str],
                          report: TableReport) -> None:
        """Remove the older Tables records sharing an id (``owner``: record id -> our id)."""
        table_id = self.ctx.table_id(spec)
        done: dict[str, str] = {}
        try:
            for rid in record_ids:
                self.ctx.tables.delete(table_id, rid, missing_ok=True)
                done[rid] = owner.get(rid, "")
        except TablesError as exc:
            report.errors.append(f"removing duplicates: {exc}")
        self._note_trashed(spec, done)
