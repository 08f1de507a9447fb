"""The conflict rule, in one place: last writer wins, deterministically.

A row's version is ``(updated_at, content_hash)`` - see ``zsync.version_cmp`` in
``infra/supabase/migrations/20251222100100_zsync_sync_logic.sql``, which both directions call, so
Supabase and Zapier Tables always agree on the winner:

* the later ``updated_at`` wins (the seed's ``should_update``: ``source_time > dest_time``);
* on an exact tie the larger content hash wins, so simultaneous writes converge to the same value on
  both sides instead of swapping;
* the same version means the same content (an empty text and no value count as equal, since a Zap
  sends "" for an empty field): that is an echo of the sync's own write (or a redelivery) and is
  dropped, which is what stops sync loops without relying on a ``sync_source`` marker;
* a record without ``updated_at`` is older than any record with one.

Supabase applies the rule inside ``zsync.sync_upsert`` (row lock, no read-then-write race); the Tables
side calls :func:`compare` while holding a per-record advisory lock.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import psycopg

from shared import supabase_db
from shared.spec import TableSpec


class Outcome(StrEnum):
    APPLIED = "applied"  # the incoming version was newer and is now stored
    UNCHANGED = "unchanged"  # the same version was already stored (echo or redelivery)
    SKIPPED_STALE = "skipped_stale"  # the stored version is newer; nothing written
    DELETED = "deleted"  # the record was deleted with a version as new or newer: not re-inserted
    PARKED = "parked"  # cannot be applied without a person (unreadable Tables record): sync_failed written
    IGNORED = "ignored"  # not a change we sync (deletes on a table that ignores them, pings)
    REJECTED = "rejected"  # invalid input; nothing written
    FAILED = "failed"  # could not be applied now (dependency down); dead-lettered for replay
    QUEUED = "queued"  # a woken *_to_tables function: another invocation is delivering this change (batches)


def outcome_of(cmp: int) -> Outcome:
    """Outcome of applying a version that compares ``cmp`` (1 / 0 / -1) to the stored one."""
    if cmp > 0:
        return Outcome.APPLIED
    return Outcome.UNCHANGED if cmp == 0 else Outcome.SKIPPED_STALE


def compare(conn: psycopg.Connection, spec: TableSpec, incoming: Mapping[str, Any],
            stored: Mapping[str, Any] | None) -> int:
    """1 if ``incoming`` should replace ``stored`` (always, when nothing is stored), 0 same, -1 older."""
    if stored is None:
        return 1
    return supabase_db.version_cmp(conn, spec, incoming, stored)
