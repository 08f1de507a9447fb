"""What each inbox drain has leased, kept in Supabase (``zsync.tables_leased``), so a record's Tables edits are
taken in one at a time even when the drain holding the first one died with it leased.

A delivery carries the whole Tables record at its edit's time (Tables keeps no per-field times): applied before
an earlier edit of the same record, it would carry that edit's fields at its own, later time. So a drain records
its lease (:func:`hold`, committed on its own, before anything is applied) and applies a lease's deliveries only
when no other lease holds an earlier edit of their records (:func:`waiting`, in the apply's transaction, which
also removes the applied deliveries' entries). See migration ``20261206200101_zsync_deliveries_in_order.sql``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import psycopg

from shared.adapters.supabase_db import Database, DatabaseUnavailable, ts_json
from shared.core.spec import TableSpec

HOLD_WAIT_S = 3.0  # how long a delivery waits for another drain to apply an earlier edit of its record
HOLD_POLL_S = 0.1  # how often it looks while it waits (:func:`still_waiting`)


@dataclass(frozen=True)
class Leased:
    """One leased delivery: the inbox message, the record it edits, the time of that edit (Zapier's)."""

    message: str
    record_id: str
    edited_at: datetime


@dataclass(frozen=True)
class Lease:
    """A lease's deliveries, as :func:`shared.services.from_tables.apply_many_from_tables` checks them."""

    lease_id: str
    items: tuple[Leased, ...]


class HeldBack(Exception):
    """Deliveries of these records wait: another lease holds an earlier edit of each (nothing was applied).
    ``returned``: those whose earlier edits are all back in the inbox (their leases over: no drain holds them)."""

    def __init__(self, waiting: dict[str, bool]) -> None:
        super().__init__(f"an earlier edit is leased elsewhere: {', '.join(sorted(waiting))}")
        self.record_ids = frozenset(waiting)
        self.returned = frozenset(rid for rid, back in waiting.items() if back)


def _items(items: Sequence[Leased]) -> str:
    return "[" + ",".join(f'{{"message":{json.dumps(i.message)},"id":{json.dumps(i.record_id)},'
                          f'"edited_at":{ts_json(i.edited_at)}}}' for i in items) + "]"


def hold(db: Database, spec: TableSpec, lease: Lease, seconds: float) -> bool:
    """zsync.hold_leased, committed on its own (``Database.aside``): what this drain leased, for ``seconds``.
    -> False when it could not be recorded (the drain applies as before; nothing else waits for it)."""
    if not lease.items:
        return True
    try:
        db.aside(lambda conn: conn.execute("SELECT zsync.hold_leased(%s, %s, %s, %s::jsonb)",
                                           (spec.name, lease.lease_id, seconds, _items(lease.items))))
    except (DatabaseUnavailable, psycopg.Error):
        return False
    return True


def waiting(conn: psycopg.Connection, spec: TableSpec, lease: Lease, *, take: bool) -> dict[str, bool]:
    """zsync.leased_before: of the lease's deliveries, the records with an earlier edit leased elsewhere -> whether
    those edits are all back in the inbox. With ``take`` and none waiting, the deliveries' entries are removed in
    ``conn``'s transaction (the apply's)."""
    if not lease.items:
        return {}
    found = conn.execute("SELECT zsync.leased_before(%s, %s, %s::jsonb, %s)",
                         (spec.name, lease.lease_id, _items(lease.items), take)).fetchone()
    return dict(found[0]) if found and found[0] else {}


def forget(db: Database, spec: TableSpec, messages: Sequence[str]) -> None:
    """zsync.forget_leased, on a connection of its own: messages acked without being applied (dead-lettered),
    which no later edit of their records should wait for. Best effort: an entry left ends with its lease."""
    with contextlib.suppress(DatabaseUnavailable, psycopg.Error):
        db.aside(lambda conn: conn.execute("SELECT zsync.forget_leased(%s, %s::text[])", (spec.name, list(messages))))


def still_waiting(db: Database, spec: TableSpec, lease: Lease) -> dict[str, bool]:
    """:func:`waiting` without taking, on a connection of its own: what a drain polls while it waits."""
    try:
        return db.aside(lambda conn: waiting(conn, spec, lease, take=False))
    except (DatabaseUnavailable, psycopg.Error):
        return {i.record_id: False for i in lease.items}


__all__ = ["HOLD_POLL_S", "HOLD_WAIT_S", "HeldBack", "Lease", "Leased", "forget", "hold", "still_waiting", "waiting"]
