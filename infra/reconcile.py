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

This module runs the command, table by table; the rooms of each step: reading the two sides
(:mod:`infra.reconcile_read`), comparing them (:mod:`infra.reconcile_compare`), repairing the drift
(:mod:`infra.reconcile_repair`), and the report with its progress lines (:mod:`infra.reconcile_report`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from concurrent.futures import Future
from datetime import UTC, datetime

from rich.progress import Progress

from infra.reconcile_compare import compare, in_scope, missing_in_supabase
from infra.reconcile_read import DB_ERRORS, SideReader, TablesSide
from infra.reconcile_repair import Repairer
from infra.reconcile_report import ProgressTasks, ReconcileResult, TableReport
from shared.adapters.zapier_errors import TablesError
from shared.core.spec import TABLES, TableSpec
from shared.services.sync import SyncContext


class _Reconciler:
    def __init__(self, ctx: SyncContext, since: datetime | None, dry_run: bool, progress: Progress | None):
        self.ctx = ctx
        self.since = since
        self.dry_run = dry_run
        tasks = ProgressTasks(progress)
        self.reader = SideReader(ctx, since, tasks)
        self.repairer = Repairer(ctx, tasks)

    def table(self, spec: TableSpec) -> TableReport:
        """One table: read both sides (Supabase in a second thread), compare, repair unless a dry run.
        ``timings``: read_tables, read_supabase (what was left after Tables), compare, repair, to_supabase."""
        report = TableReport(spec.name)
        fetched = None if spec.append_only else self.reader.fetch_supabase(spec)
        try:
            started = time.perf_counter()
            tables_side = self.reader.read_tables(spec, report)
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
            self.repairer.remove_duplicates(spec, tables_side.duplicates, tables_side.owner, report)
        return report

    def _append_only(self, spec: TableSpec, side: TablesSide, report: TableReport) -> None:
        missing = missing_in_supabase(self.ctx, spec, side, self.since, report)
        if missing and not self.dry_run:
            self.repairer.to_supabase(spec, missing, report)

    def _versioned(self, spec: TableSpec, side: TablesSide, report: TableReport,
                   fetched: Future[list[dict]]) -> None:
        t_scope = [i for i, r in side.rows.items() if in_scope(spec, r, self.since)]
        try:
            started = time.perf_counter()
            supa = self.reader.read_supabase(spec, t_scope + list(side.unreadable), fetched)
            report.timings["read_supabase"] = time.perf_counter() - started  # what was left after Tables
        except DB_ERRORS as exc:
            report.errors.append(f"reading Supabase: {type(exc).__name__}")
            return
        bad = self.reader.unreadable_in_supabase.get(spec.name, {})
        drift = compare(self.ctx, spec, side, supa, t_scope, bad, self.since, report)
        report.timings["compare"] = time.perf_counter() - started - report.timings["read_supabase"]
        if not self.dry_run:
            self.repairer.repair(spec, drift, side, report)
            self.repairer.mark_agreed(spec, drift.agreed, report)


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
