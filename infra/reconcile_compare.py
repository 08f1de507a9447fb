"""Comparing the two sides for ``zsync reconcile``: which ids are in scope (``--since``), which are missing
on one side, deleted in Tables, or differ - and which version wins under ``zsync.version_cmp``, the
functions' last-writer-wins rule (identical rows are equal without asking; the others in batched SQL,
:func:`shared.services.conflict.compare_many`). The result is the :class:`Drift` to repair, by direction;
``audit_log`` (append-only) only asks which Tables entries Supabase lacks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

import psycopg

from infra.reconcile_read import TablesSide
from infra.reconcile_report import TableReport
from shared.core.spec import Kind, TableSpec
from shared.services import conflict
from shared.services.sync import SyncContext
from shared.services.to_tables import decide_merges


@dataclass
class Drift:
    """What to repair in one versioned table, by direction."""

    to_supabase: list[dict] = field(default_factory=list)  # Tables rows missing or older in Supabase
    creates: list[dict] = field(default_factory=list)  # Supabase rows missing in Tables
    updates: list[tuple[str, dict]] = field(default_factory=list)  # (Tables record id, newer Supabase row)
    trashed: list[dict] = field(default_factory=list)  # Supabase rows whose Tables copy is only in the trash
    missing: dict[str, datetime | None] = field(default_factory=dict)  # id missing in Supabase -> edited_at
    agreed: list[tuple[str, datetime]] = field(default_factory=list)  # (id, version) equal on both sides
    edited: dict[str, datetime | None] = field(default_factory=dict)  # id -> edited_at, of Tables rows the merge sends


def _identical(json_fields: tuple[str, ...], a: dict, b: dict) -> bool:
    """``row_to_json(a) == row_to_json(b)``, cheaper: parsed rows of one table hold the same field types
    (text, int, UTC datetime, list of text) except floats (``0.0 == -0.0``) and JSON values, where ``1``,
    ``1.0`` and ``true`` are equal in Python but not the same JSON: those are compared as JSON text."""
    if a != b:
        return False
    return all(a[f] is None or json.dumps(a[f]) == json.dumps(b[f]) for f in json_fields)


def in_scope(spec: TableSpec, row: dict, since: datetime | None) -> bool:
    if since is None:
        return True
    ts = row.get(spec.version or "timestamp")
    return ts is not None and ts >= since


def missing_in_supabase(ctx: SyncContext, spec: TableSpec, side: TablesSide, since: datetime | None,
                        report: TableReport) -> list[dict]:
    """An append-only table (``audit_log``): the Tables entries in scope that Supabase lacks."""
    rows = [r for r in side.rows.values() if in_scope(spec, r, since) or r.get("timestamp") is None]
    ids = [r["id"] for r in rows]

    def present(conn: psycopg.Connection) -> set[str]:
        found = conn.execute(f'SELECT id FROM public."{spec.name}" WHERE id = ANY(%s)', (ids,)).fetchall()
        return {r[0] for r in found}

    have = ctx.db.run(present) if ids else set()
    missing = [r for r in rows if r["id"] not in have]
    report.compared, report.in_sync, report.missing_in_supabase = len(rows), len(rows) - len(missing), len(missing)
    return missing


def compare(ctx: SyncContext, spec: TableSpec, side: TablesSide, supa: dict[str, dict], t_scope: list[str],
            bad: dict[str, str], since: datetime | None, report: TableReport) -> Drift:
    """``t_scope``: the Tables ids in scope; ``supa``: Supabase's rows; ``bad``: Supabase rows the sync cannot
    deliver (left alone). Counts what it finds in ``report``."""
    report.invalid_in_supabase = len(bad)
    scope = sorted((set(t_scope) | {i for i, r in supa.items() if in_scope(spec, r, since)}) - set(bad))
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
    differing, agreed = [], []  # agreed: (id, version) of identical rows, the field merge's agreed versions
    for p in pairs:
        if not _identical(json_fields, p[1], p[2]):
            differing.append(p)
        elif spec.version and p[2].get(spec.version) is not None:
            agreed.append((p[0], p[2][spec.version]))
    report.in_sync += len(pairs) - len(differing)
    cmps = ctx.db.run(lambda conn: conflict.compare_many(conn, spec, [(t, s) for _, t, s in differing]))
    # The field merge, as the functions decide it (zsync.merge_decide_many; "none" where there is no base)
    items = [(t_row, side.edited.get(rid), s_row) for rid, t_row, s_row in differing]
    decisions = ctx.db.run(lambda conn: decide_merges(conn, spec, items)) if items else []
    edited: dict[str, datetime | None] = {}
    for n, ((rid, _, _), decision) in enumerate(zip(differing, decisions, strict=True)):
        # applied to Supabase as its delivery would be (deferred: a drain would wait for the deliveries of a recent
        # Tables edit; reconcile does not wait - the record goes through zsync.sync_apply's merge, as before)
        if decision.action in ("tables", "merged", "deferred"):
            cmps[n], edited[rid] = 1, side.edited.get(rid)
        elif decision.action in ("supabase", "same"):
            cmps[n] = -1 if decision.action == "supabase" else 0
    for (rid, t_row, s_row), cmp in zip(differing, cmps, strict=True):
        if cmp > 0:
            to_supabase.append(t_row)
            report.stale_in_supabase += 1
        elif cmp < 0:
            updates.append((side.record_ids[rid], s_row))
            report.stale_in_tables += 1
        else:
            report.in_sync += 1
    return Drift(to_supabase, creates, updates, trashed, missing, agreed, edited)
