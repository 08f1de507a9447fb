"""The conflict rule, in one place: last writer wins, deterministically.

A row's version is ``(updated_at, content_hash)`` - see ``zsync.version_cmp`` in
``infra/supabase/migrations/`` (the baseline), which both directions call, so
Supabase and Zapier Tables always agree on the winner:

* the later ``updated_at`` wins (the seed's ``should_update``: ``source_time > dest_time``);
* on an exact tie the larger content hash wins, so simultaneous writes converge to the same value on
  both sides instead of swapping;
* the same version means the same content (an empty text and no value count as equal, since a Zap
  sends "" for an empty field): that is an echo of the sync's own write (or a redelivery) and is
  dropped, which is what stops sync loops without relying on a ``sync_source`` marker;
* a record without ``updated_at`` is older than any record with one.

Supabase applies the rule inside ``zsync.sync_upsert`` (row lock, no read-then-write race); the Tables
side calls :func:`compare` / :func:`compare_many` while holding the record's lock.

Field-level merge (on by default; ``zsync.config`` ``field_merge`` = ``"off"``, or ``SET zsync.field_merge =
'off'`` for a session, gives the whole-record rule above back). Per record the sync knows its *base*: the last
content both sides held (the Supabase row itself while Supabase has not changed since that version - marked by
its acknowledged outbox entry - else the copy ``zsync.sync_base`` keeps). When a change meets the other side's
version, ``zsync.merge_decide`` (both directions) compares each side with the base:

* only one side changed since the base -> that side's version, whole (the rule above, except that an unchanged
  side never wins just by carrying a later time: a late echo of the base, a stale delivery);
* both changed -> ``zsync.merge3``, per field: a field changed on one side only takes that side's value; a field
  both changed to different values takes its later change (Supabase's writers stamp the fields they change;
  Tables' change counts at its record's version; equal times: the later whole version); JSON and array fields
  are whole values. When the result takes fields from both sides it is a new version ``merged``,
  timed 1 ms after the later input, written to Supabase and Tables once, audited once with the fields by side;
* the same content on both sides (an echo of the sync's own write) is never a change.

The rule is symmetric and deterministic, so both directions compute the same merged record. Supabase applies
it inside ``zsync.sync_apply`` under the row lock; the Tables side asks ``zsync.merge_decide_many`` (through
:func:`shared.services.to_tables.decide_merges`) for the pairs whose versions differ, after :func:`compare_many`.

The SQL is the rule's one full statement. Because a version is compared time first, two versions whose
times differ are decided by their times alone, whatever their hashes: :func:`compare_many` decides those
here (:func:`version_time` is ``zsync.version_of``'s time part) and asks ``zsync.version_cmp_many`` only
for ties, which the content hash decides. A test holds the two to the same answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg

from shared.adapters import supabase_db
from shared.core.spec import TableSpec

SQL_BATCH = 1000  # pairs per zsync.version_cmp_many call
_SQL_DECIDES = object()  # a version time this module cannot state exactly: only the SQL decides


def version_time(spec: TableSpec, row: Mapping[str, Any]) -> datetime | object | None:
    """The time part of ``zsync.version_of``: the version column at millisecond precision, None for no
    value (older than any time); ``_SQL_DECIDES`` when this module cannot state it exactly (a table without a
    version column, a value that is not a timezone-aware datetime), so that only the SQL decides."""
    if spec.version != "updated_at":  # the SQL reads updated_at; a table without versions: hash only
        return _SQL_DECIDES
    ts = row.get("updated_at")
    if ts is None:
        return None
    if not isinstance(ts, datetime) or ts.tzinfo is None:
        return _SQL_DECIDES
    return ts.replace(microsecond=ts.microsecond - ts.microsecond % 1000)


def _by_time(spec: TableSpec, a: Mapping[str, Any], b: Mapping[str, Any]) -> int | None:
    """1 / -1 when the times alone decide, None when the hash must (equal times) or the SQL must."""
    ta, tb = version_time(spec, a), version_time(spec, b)
    if ta is _SQL_DECIDES or tb is _SQL_DECIDES or ta == tb:
        return None
    if tb is None:
        return 1
    if ta is None:
        return -1
    return 1 if ta > tb else -1  # type: ignore[operator]


def compare(conn: psycopg.Connection, spec: TableSpec, incoming: Mapping[str, Any],
            stored: Mapping[str, Any] | None) -> int:
    """1 if ``incoming`` should replace ``stored`` (always, when nothing is stored), 0 same, -1 older."""
    if stored is None:
        return 1
    decided = _by_time(spec, incoming, stored)
    return decided if decided is not None else supabase_db.version_cmp(conn, spec, incoming, stored)


def compare_many(conn: psycopg.Connection, spec: TableSpec,
                 pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> list[int]:
    """:func:`compare` of each ``(a, b)`` pair (``b`` stored): pairs the times decide here, ties in
    ``zsync.version_cmp_many`` calls of up to :data:`SQL_BATCH` pairs."""
    out: list[int] = []
    tied: list[int] = []
    for i, (a, b) in enumerate(pairs):
        decided = _by_time(spec, a, b)
        if decided is None:
            tied.append(i)
        out.append(decided or 0)
    for start in range(0, len(tied), SQL_BATCH):
        chunk = tied[start:start + SQL_BATCH]
        for i, cmp in zip(chunk, supabase_db.version_cmp_many(conn, spec, [pairs[i] for i in chunk]), strict=True):
            out[i] = cmp
    return out
