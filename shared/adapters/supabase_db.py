"""Supabase (Postgres) access for the functions: one small connection pool per process and thin
wrappers around the SQL functions in ``infra/supabase/migrations`` (where the sync logic lives).

Connections are made for the Supabase pooler in transaction mode: no prepared statements
(``prepare_threshold=None``), every unit of work in one explicit transaction. A unit of work that fails
because the database cannot be reached is retried with exponential backoff and jitter inside the
configured budget (it is idempotent: the upsert compares versions, audit entries have stable ids).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, NamedTuple, TypeVar
from weakref import WeakKeyDictionary

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_random_exponential

from shared.core.mapping import row_to_json
from shared.core.spec import TableSpec

Delivered = Sequence[tuple[Mapping[str, Any], datetime | None]]  # Tables deliveries: (row, Zapier's edited_at)

T = TypeVar("T")
TRANSIENT = (psycopg.OperationalError, PoolTimeout)

_pools: dict[tuple[str, str], ConnectionPool] = {}
_lock = threading.Lock()
ASIDE_POOL_MAX = 2  # Database.aside: announcements committed while a drain's transaction is open
ASIDE_TIMEOUT_S = 2.0
CHECK_AFTER_IDLE_S = 5.0  # a pooled connection idle longer than this is checked before use
_last_used: WeakKeyDictionary[psycopg.Connection, float] = WeakKeyDictionary()


def _check_if_idle(conn: psycopg.Connection) -> None:
    """The pool's check, skipped for a connection used in the last few seconds: back-to-back deliveries
    save a round trip each, while one that sat idle (a restarted server, a pooler that dropped it) is
    still checked and replaced before use. A connection that breaks anyway fails its unit of work, which
    :meth:`Database.run` retries on a new one."""
    if time.monotonic() - _last_used.get(conn, 0.0) > CHECK_AFTER_IDLE_S:
        ConnectionPool.check_connection(conn)


class DatabaseUnavailable(RuntimeError):
    """The database could not be reached within the retry budget."""


def _pool(database_url: str, max_size: int, connect_timeout_s: float, name: str = "zsync") -> ConnectionPool:
    with _lock:
        pool = _pools.get((database_url, name))
        if pool is None:
            pool = ConnectionPool(
                database_url,
                min_size=0,
                max_size=max_size,
                kwargs={"prepare_threshold": None, "connect_timeout": max(1, round(connect_timeout_s))},
                check=_check_if_idle,
                timeout=connect_timeout_s,
                max_idle=300,
                open=True,
                name=name,
            )
            _pools[(database_url, name)] = pool
        return pool


def close_pools() -> None:
    with _lock:
        for pool in _pools.values():
            pool.close()
        _pools.clear()


class Database:
    """Runs units of work against one database URL, retrying transient connection failures."""

    def __init__(self, database_url: str, *, max_size: int = 4, connect_timeout_s: float = 5.0,
                 retry_budget_s: float = 20.0):
        self._url = database_url
        self._max_size = max_size
        self._connect_timeout_s = connect_timeout_s
        self._retry_budget_s = retry_budget_s

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """One transaction (no retry: use :meth:`run` for retried units of work)."""
        pool = _pool(self._url, self._max_size, self._connect_timeout_s)
        with pool.connection() as conn:
            try:
                with conn.transaction():
                    yield conn
            finally:
                _last_used[conn] = time.monotonic()

    def aside(self, work: Callable[[psycopg.Connection], T]) -> T:
        """Run ``work(conn)`` in a transaction of its own, committed at once, on a connection of a small pool
        of its own (never waiting for the main pool, which the caller's open transaction may have emptied).
        No retry: a failure raises :class:`DatabaseUnavailable`, for the caller to take its safe path."""
        pool = _pool(self._url, ASIDE_POOL_MAX, min(self._connect_timeout_s, ASIDE_TIMEOUT_S), "zsync-aside")
        try:
            with pool.connection() as conn, conn.transaction():
                return work(conn)
        except TRANSIENT as exc:
            raise DatabaseUnavailable(f"database unreachable: {type(exc).__name__}") from exc

    def run(self, work: Callable[[psycopg.Connection], T]) -> T:
        """Run ``work(conn)`` in one transaction; retry it whole on connection failures."""
        retrying = Retrying(
            retry=retry_if_exception_type(TRANSIENT),
            stop=stop_after_delay(self._retry_budget_s),
            wait=wait_random_exponential(multiplier=0.2, max=5),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt, self.transaction() as conn:
                    return work(conn)
        except TRANSIENT as exc:
            raise DatabaseUnavailable(f"database unreachable: {type(exc).__name__}") from exc
        raise AssertionError("unreachable")


def ts_json(ts: datetime | None) -> str:
    """A time as a JSON value in the payloads the SQL functions parse (ISO 8601, or null)."""
    return json.dumps(ts.isoformat() if ts else None)


def _regclass(spec: TableSpec) -> str:
    return f"public.{spec.name}"


def sync_upsert(conn: psycopg.Connection, spec: TableSpec, row: Mapping[str, Any],
                edited_at: datetime | None = None) -> tuple[str, dict | None]:
    """Apply ``row`` if newer than the stored version (see zsync.sync_apply). -> (outcome, stored before)."""
    outcome, stored, _, _ = sync_apply(conn, spec, row, edited_at)
    return outcome, stored


def sync_apply(conn: psycopg.Connection, spec: TableSpec, row: Mapping[str, Any],
               edited_at: datetime | None = None) -> tuple[str, dict | None, dict | None, dict | None]:
    """zsync.sync_apply: ``row`` if newer than the stored version or tombstone, merged field by field with it
    when both changed since their base; ``edited_at`` is Zapier Tables' own time of the record's last change.
    -> (outcome, stored before, row as applied, which fields came from where when the outcome is ``merged``)."""
    if not spec.sync_deletes:
        conn.execute("SELECT set_config('zsync.ignore_tombstones', 'on', true)")
    found = conn.execute(
        "SELECT outcome, stored, applied, merge FROM zsync.sync_apply(%s::regclass, %s::jsonb, %s)",
        (_regclass(spec), row_to_json(row), edited_at),
    ).fetchone()
    _stamp_back_to_tables(conn, spec, [(row["id"], found[3])])
    return found


def _stamp_back_to_tables(conn: psycopg.Connection, spec: TableSpec, merges: list[tuple[str, dict | None]]) -> None:
    """After merges that go back to Tables (an edit a *_to_tables write overwrote): the fields taken from Tables
    count at Tables' version, not the merged row's (zsync.stamp_back_to_tables, migration 20261206200201)."""
    back = [{"id": rid, "info": info} for rid, info in merges if info and info.get("back_to_tables")]
    if back:
        conn.execute("SELECT zsync.stamp_back_to_tables(%s, %s::jsonb)", (spec.name, json.dumps(back)))


def tombstone_version(conn: psycopg.Connection, spec: TableSpec, record_id: str) -> datetime | None:
    """The version of the record's delete, if it is deleted in Supabase (zsync.tombstones)."""
    return conn.execute("SELECT zsync.tombstone_version(%s, %s)", (spec.name, record_id)).fetchone()[0]


def apply_tables_delete(conn: psycopg.Connection, spec: TableSpec, record_id: str, deleted_at: datetime) -> str:
    """A delete made in Zapier Tables at ``deleted_at``: 'applied' | 'unchanged' | 'skipped_stale'."""
    return conn.execute("SELECT zsync.apply_tables_delete(%s::regclass, %s, %s)",
                        (_regclass(spec), record_id, deleted_at)).fetchone()[0]


def outbox_failed(conn: psycopg.Connection, spec: TableSpec, record_id: str, reason: str) -> bool:
    """A delivery of this record failed in a way a retry repeats; True when its outbox entries got parked."""
    return conn.execute("SELECT zsync.outbox_failed(%s, %s, %s)", (spec.name, record_id, reason)).fetchone()[0]


def version_cmp(conn: psycopg.Connection, spec: TableSpec, a: Mapping[str, Any], b: Mapping[str, Any]) -> int:
    """1 if version a is newer than b, 0 if the same version, -1 if older (zsync.version_cmp)."""
    return conn.execute(
        "SELECT zsync.version_cmp(%s::regclass, %s::jsonb, %s::jsonb)",
        (_regclass(spec), row_to_json(a), row_to_json(b)),
    ).fetchone()[0]


def append_audit(conn: psycopg.Connection, entry: Mapping[str, Any]) -> bool:
    """Insert an audit_log entry once (same id again is a no-op). -> True if inserted."""
    return conn.execute("SELECT zsync.append_audit(%s::jsonb)", (row_to_json(entry),)).fetchone()[0]


def lock_record(conn: psycopg.Connection, spec: TableSpec, record_id: str) -> None:
    """Serialise work on one record across function instances until the transaction ends."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"{spec.name}:{record_id}",))


def lock_rows(conn: psycopg.Connection, spec: TableSpec, record_ids: list[str]) -> None:
    """Lock the existing rows of ``record_ids`` until the transaction ends, in id order: the order every
    writer of a synced table takes its rows in (see migration 20261205500000), so two never deadlock."""
    conn.execute(f'SELECT count(*) FROM (SELECT 1 FROM public."{spec.name}" t WHERE t.id = ANY(%s) '
                 "ORDER BY t.id FOR UPDATE) l", (record_ids,))


def ack_outbox(conn: psycopg.Connection, spec: TableSpec, record_id: str, updated_at: datetime | None,
               outcome: str) -> int:
    """Mark every outbox entry of this record up to ``updated_at`` as delivered."""
    return conn.execute(
        "SELECT zsync.ack_outbox(%s, %s, %s, %s)", (spec.name, record_id, updated_at, outcome)
    ).fetchone()[0]


def outbox_capture_time(conn: psycopg.Connection, spec: TableSpec, record_id: str,
                        updated_at: datetime | None) -> datetime | None:
    """When the change being delivered was captured in the outbox (its Supabase transaction); None if no
    entry up to that version is pending (a re-send of a change already acknowledged)."""
    return conn.execute("SELECT zsync.outbox_capture_time(%s, %s, %s)",
                        (spec.name, record_id, updated_at)).fetchone()[0]


def announce(conn: psycopg.Connection, spec: TableSpec, record_id: str, op: str = "UPDATE") -> bool:
    """Queue the current row (or, deleted, its DELETE) for the table's *_to_tables function: an outbox entry
    (so it is delivered like any change, and re-sent by the sweeper if the webhook is lost) and the webhook
    (zsync.requeue); False if not wired."""
    return conn.execute("SELECT zsync.requeue(%s, %s, %s)", (spec.name, record_id, op)).fetchone()[0]


def fetch_row(conn: psycopg.Connection, spec: TableSpec, record_id: str) -> dict | None:
    """The stored row as Postgres serialises it (the Database Webhook's record shape)."""
    found = conn.execute(
        f'SELECT to_jsonb(t) FROM public."{spec.name}" t WHERE t.id = %s', (record_id,)
    ).fetchone()
    return found[0] if found else None


def later_row(conn: psycopg.Connection, spec: TableSpec, row: Mapping[str, Any]) -> dict | None:
    """The stored row (Database Webhook shape) when it is a later version than ``row``, else None."""
    found = conn.execute(
        f'SELECT to_jsonb(t) FROM public."{spec.name}" t WHERE t.id = %s '
        "AND zsync.version_cmp(%s::regclass, to_jsonb(t), %s::jsonb) > 0",
        (row["id"], _regclass(spec), row_to_json(row)),
    ).fetchone()
    return found[0] if found else None


def fetch_rows(conn: psycopg.Connection, spec: TableSpec, since: datetime | None = None) -> list[dict]:
    """Every row (optionally changed since ``since``), in the Database Webhook's record shape."""
    column = spec.version or "timestamp"
    query = f'SELECT to_jsonb(t) AS row FROM public."{spec.name}" t'
    params: tuple = ()
    if since is not None:
        query += f' WHERE t."{column}" >= %s'
        params = (since,)
    with conn.cursor(row_factory=dict_row) as cur:
        return [r["row"] for r in cur.execute(query + " ORDER BY t.id", params)]


# --- batches (the outbox as the *_to_tables work queue) ------------------------------------------------


def claim_outbox(conn: psycopg.Connection, spec: TableSpec, limit: int,
                 exclude: list[str] | None = None) -> list[tuple[str, int, datetime]]:
    """Lock up to ``limit`` pending outbox entries of the table (not of ``exclude``) until the transaction
    ends, skipping those another transaction holds (zsync.claim_outbox).
    -> (record id, entries, earliest capture time), oldest first."""
    return conn.execute("SELECT record_id, changes, captured_at FROM zsync.claim_outbox(%s, %s, %s)",
                        (spec.name, limit, exclude or [])).fetchall()


def claim_outbox_rows(conn: psycopg.Connection, spec: TableSpec, limit: int, exclude: list[str] | None = None
                      ) -> list[tuple[str, int, datetime, bool, dict | None, datetime | None]]:
    """:func:`claim_outbox`, :func:`try_lock_record` of each claimed record and, for those locked here, its
    current row (``to_jsonb``) or, gone, its tombstone, in one call (zsync.claim_outbox_rows).
    -> (record id, entries, earliest capture time, locked here, row | None, tombstone | None), oldest first."""
    return conn.execute("SELECT record_id, changes, captured_at, locked, current_row, tombstone "
                        "FROM zsync.claim_outbox_rows(%s, %s, %s)", (spec.name, limit, exclude or [])).fetchall()


def record_outbox_batch(conn: psycopg.Connection, spec: TableSpec, entries: list[Mapping[str, Any]],
                        acks: list[tuple[str, datetime | None, str]], exclude: list[str]) -> bool:
    """:func:`append_audit_many` and :func:`ack_outbox_many` in one call (zsync.record_outbox_batch).
    -> whether the table still has a pending entry a claim could take now (not of ``exclude``)."""
    audit = _entries_json(entries)
    done = _acks_json(acks)
    return conn.execute("SELECT pending FROM zsync.record_outbox_batch(%s, %s::jsonb, %s::jsonb, %s)",
                        (spec.name, audit, done, exclude)).fetchone()[0]


def _entries_json(entries: list[Mapping[str, Any]]) -> str:
    """Audit entries as one JSON array (``row_to_json`` each), for the set-based audit functions."""
    return "[" + ",".join(row_to_json(e) for e in entries) + "]"


def _acks_json(acks: list[tuple[str, datetime | None, str]]) -> str:
    """``(record id, version, outcome)`` acks as the JSON array the outbox ack functions take."""
    return json.dumps([{"record_id": rid, "updated_at": ts.isoformat() if ts else None, "outcome": outcome}
                       for rid, ts, outcome in acks])


def outbox_state(conn: psycopg.Connection, spec: TableSpec, record_id: str, updated_at: datetime | None) -> str:
    """'pending' (held by another invocation), 'delivered' (this version or later) or 'none' (zsync.outbox_state)."""
    return conn.execute("SELECT zsync.outbox_state(%s, %s, %s)", (spec.name, record_id, updated_at)).fetchone()[0]


def try_lock_record(conn: psycopg.Connection, spec: TableSpec, record_id: str) -> bool:
    """:func:`lock_record` without waiting: False when another transaction works on the record."""
    return conn.execute("SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))",
                        (f"{spec.name}:{record_id}",)).fetchone()[0]


def fetch_rows_by_id(conn: psycopg.Connection, spec: TableSpec, ids: list[str]) -> dict[str, dict]:
    """The stored rows of ``ids`` (the Database Webhook's record shape), by id; absent ids are missing."""
    found = conn.execute(f'SELECT t.id, to_jsonb(t) FROM public."{spec.name}" t WHERE t.id = ANY(%s)',
                         (ids,)).fetchall()
    return {rid: row for rid, row in found}


def version_cmp_many(conn: psycopg.Connection, spec: TableSpec,
                     pairs: list[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> list[int]:
    """:func:`version_cmp` of each ``(a, b)`` pair, in one call (zsync.version_cmp_many)."""
    if not pairs:
        return []
    payload = "[" + ",".join(f'{{"a":{row_to_json(a)},"b":{row_to_json(b)}}}' for a, b in pairs) + "]"
    found = conn.execute("SELECT ord, cmp FROM zsync.version_cmp_many(%s::regclass, %s::jsonb)",
                         (_regclass(spec), payload)).fetchall()
    return [cmp for _, cmp in sorted(found)]


def append_audit_many(conn: psycopg.Connection, entries: list[Mapping[str, Any]]) -> int:
    """:func:`append_audit` for many entries in one call. -> how many were inserted."""
    if not entries:
        return 0
    payload = _entries_json(entries)
    return conn.execute("SELECT zsync.append_audit_many(%s::jsonb)", (payload,)).fetchone()[0]


def ack_outbox_many(conn: psycopg.Connection, spec: TableSpec,
                    acks: list[tuple[str, datetime | None, str]]) -> int:
    """:func:`ack_outbox` for many ``(record id, version, outcome)`` in one call; never waits for an entry
    another transaction holds (it stays pending and is claimed again)."""
    if not acks:
        return 0
    payload = _acks_json(acks)
    return conn.execute("SELECT zsync.ack_outbox_many(%s, %s::jsonb)", (spec.name, payload)).fetchone()[0]


# --- batches Tables -> Supabase (replay, reconcile, an inbox lease) --------------------------------------


def sync_apply_many(conn: psycopg.Connection, spec: TableSpec, items: list[tuple[Mapping[str, Any], datetime | None]]
                    ) -> list[tuple[str, dict | None, dict | None, dict | None]]:
    """:func:`sync_apply` of each ``(row, edited_at)`` in one call (zsync.sync_apply_many: one multi-row
    conditional upsert). -> (outcome, stored before, row as applied, merge) per item, in input order."""
    if not items:
        return []
    if not spec.sync_deletes:
        conn.execute("SELECT set_config('zsync.ignore_tombstones', 'on', true)")
    payload = "[" + ",".join(
        f'{{"row":{row_to_json(row)},"edited_at":{ts_json(ts)}}}'
        for row, ts in items) + "]"
    found = conn.execute("SELECT ord, outcome, stored, applied, merge "
                         "FROM zsync.sync_apply_many(%s::regclass, %s::jsonb)", (_regclass(spec), payload)).fetchall()
    done = [tuple(r[1:]) for r in sorted(found, key=lambda r: r[0])]
    _stamp_back_to_tables(conn, spec, [(row["id"], r[3]) for (row, _), r in zip(items, done, strict=True)])
    return done


# --- the field-level merge (zsync.merge_decide, zsync.sync_base) -----------------------------------------


def merge_decide_many(conn: psycopg.Connection, spec: TableSpec,
                      items: list[tuple[Mapping[str, Any], datetime | None, Mapping[str, Any]]]
                      ) -> list[tuple[str, dict | None, dict | None]]:
    """zsync.merge_decide of each ``(Tables record, its edited_at, Supabase row)`` in one call: -> (action,
    the winning or merged row, which fields came from where) per item, in input order; action ``none`` when
    the record has no base or the merge is off (the whole-record rule decides)."""
    if not items:
        return []
    payload = "[" + ",".join(
        f'{{"tables":{row_to_json(t)},"edited_at":{ts_json(ts)},'
        f'"supabase":{row_to_json(s)}}}' for t, ts, s in items) + "]"
    found = conn.execute("SELECT ord, action, merged, info FROM zsync.merge_decide_many(%s::regclass, %s::jsonb)",
                         (_regclass(spec), payload)).fetchall()
    return [(action, merged, info) for _, action, merged, info in sorted(found, key=lambda r: r[0])]


def mark_agreed(conn: psycopg.Connection, spec: TableSpec, agreed: list[tuple[str, datetime]]) -> int:
    """Versions found equal on both sides (reconcile): zsync.mark_agreed records each as agreed where no mark
    is (an acknowledged outbox entry). -> how many marks were added."""
    if not agreed:
        return 0
    return conn.execute("SELECT zsync.mark_agreed(%s, %s::text[], %s::timestamptz[])",
                        (spec.name, [i for i, _ in agreed], [v for _, v in agreed])).fetchone()[0]


class Replaced(NamedTuple):
    """The Tables record a ``*_to_tables`` write replaced (as read, with Zapier's ``edited_at``), and the write's
    own ``edited_at`` once Zapier answered it (Zapier's clock: an edit at or after it was made from the write)."""

    row: Mapping[str, Any]
    edited_at: datetime | None
    written_at: datetime | None = None
    blind: bool = False  # a blind write's known copy: it keeps Supabase's field times as they were (zsync.agree)


def agree(conn: psycopg.Connection, spec: TableSpec, rows: list[Mapping[str, Any]],
          replaced: Mapping[str, Replaced] | None = None) -> int:
    """Both sides hold ``rows`` now (written to Tables, or found equal there): zsync.agree drops a record's
    saved base, or makes the row its base when Supabase changed since (nothing when the merge is off).
    ``replaced``: id -> the Tables record a write replaced, kept as the base of a Tables edit made before the
    write landed."""
    if not rows:
        return 0
    payload = "[" + ",".join(row_to_json(r) for r in rows) + "]"

    prevs = "{" + ",".join(
        f'{json.dumps(rid)}:{{"row":{row_to_json(rep.row)},"edited_at":{ts_json(rep.edited_at)},'
        f'"written_at":{ts_json(rep.written_at)},"blind":{json.dumps(rep.blind)}}}'
        for rid, rep in (replaced or {}).items()) + "}"
    return conn.execute("SELECT zsync.agree(%s::regclass, %s::jsonb, %s::jsonb)",
                        (_regclass(spec), payload, prevs)).fetchone()[0]


def append_audit_each(conn: psycopg.Connection, entries: list[Mapping[str, Any]]) -> list[bool]:
    """:func:`append_audit` of each entry in one call. -> inserted? per entry, in order."""
    if not entries:
        return []
    payload = _entries_json(entries)
    return [ok for _, ok in conn.execute("SELECT ord, inserted FROM zsync.append_audit_each(%s::jsonb)",
                                         (payload,)).fetchall()]


def announce_many(conn: psycopg.Connection, spec: TableSpec, items: list[tuple[str, str]]) -> int:
    """:func:`announce` of each ``(record id, op)`` in one statement. -> how many were queued."""
    if not items:
        return 0
    payload = json.dumps([{"id": rid, "op": op} for rid, op in items])
    return conn.execute("SELECT count(*) FILTER (WHERE zsync.requeue(%s, x.id, x.op)) "
                        "FROM jsonb_to_recordset(%s::jsonb) AS x(id text, op text)", (spec.name, payload)).fetchone()[0]


def ack_outbox_set(conn: psycopg.Connection, spec: TableSpec,
                   acks: list[tuple[str, datetime | None, str]]) -> int:
    """:func:`ack_outbox` for many ``(record id, version, outcome)`` in one set-based statement, with exactly
    its rule (waits for an entry another transaction holds, like it; zsync.ack_outbox_set)."""
    if not acks:
        return 0
    payload = _acks_json(acks)
    return conn.execute("SELECT zsync.ack_outbox_set(%s, %s::jsonb)", (spec.name, payload)).fetchone()[0]


def fetch_rows_bulk(conn: psycopg.Connection, spec: TableSpec, since: datetime | None = None,
                    chunk: int = 20_000) -> list[dict]:
    """:func:`fetch_rows` for a whole table, faster: each ``chunk`` of rows (keyset by id) comes as one JSON
    array (``json_agg``), parsed in one call instead of row by row. The same values once parsed
    (:mod:`shared.core.mapping`): ``json_agg`` writes the columns as ``to_jsonb`` does, except a double precision
    in its own float text (same number) and keys in column order."""
    column = spec.version or "timestamp"
    where = f' AND t."{column}" >= %(since)s' if since is not None else ""
    query = (f'SELECT json_agg(t ORDER BY t.id)::text, max(t.id) FROM (SELECT * FROM public."{spec.name}" t '
             f'WHERE (%(after)s::text IS NULL OR t.id > %(after)s){where} ORDER BY t.id LIMIT %(limit)s) t')
    out: list[dict] = []
    after: str | None = None
    while True:
        text, last = conn.execute(query, {"after": after, "since": since, "limit": chunk}).fetchone()
        if text is None:
            return out
        rows = json.loads(text)
        out += rows
        if len(rows) < chunk:
            return out
        after = last


# --- deletes (issue 18) ------------------------------------------------------------------------------------


def note_sync_trashed(conn: psycopg.Connection, spec: TableSpec, record_id: str, tables_ids: list[str]) -> None:
    """Remember the Zapier record ids of Tables records the sync itself moved to the trash (zsync.sync_trashed):
    the trash check and the *_to_tables functions never take them for a person's delete."""
    if tables_ids:
        conn.execute("SELECT zsync.note_sync_trashed(%s, %s, %s)", (spec.name, record_id, tables_ids))


def sync_trashed_ids(conn: psycopg.Connection, spec: TableSpec, tables_ids: list[str]) -> set[str]:
    """Of ``tables_ids`` (Zapier record ids of trashed records), those the sync trashed itself."""
    if not tables_ids:
        return set()
    return {r[0] for r in conn.execute("SELECT zsync.sync_trashed_ids(%s, %s)", (spec.name, tables_ids))}


class Known(NamedTuple):
    """A state of a record's Tables copy the sync saw: its Zapier record id (None: a trigger delivery, which
    only moves a copy already known forward), the copy as a Supabase row, Zapier's ``edited_at`` of it, and
    whether it is the answer to the sync's own write."""

    tables_id: str | None
    row: Mapping[str, Any]
    edited_at: datetime | None
    ours: bool = False  # the answer to the sync's own write (not an edit made in Tables)
    read: Known | None = None  # ours: the record as the find before the write read it (remembered first)


def remember_tables(conn: psycopg.Connection, spec: TableSpec, known: Mapping[str, Known]) -> int:
    """zsync.remember_tables: what a find, a write's answer or a delivery showed of Tables copies (by our
    record id); a state older than the one known is ignored. A write's answer that follows a find remembers the
    record as read first: an edit made in Tables that the find was the first to see marks the record as being
    edited there (``edited_seen_at``) before the sync's own write moves the copy on. -> how many were written."""
    if not known:
        return 0
    reads = {rid: k.read for rid, k in known.items() if k.read is not None}
    n = remember_tables(conn, spec, reads) if reads else 0
    payload = "[" + ",".join(
        f'{{"id":{json.dumps(rid)},"tables_id":{json.dumps(k.tables_id)},"row":{row_to_json(k.row)},'
        f'"edited_at":{ts_json(k.edited_at)},"ours":{json.dumps(k.ours)}}}'
        for rid, k in sorted(known.items())) + "]"
    return n + conn.execute("SELECT zsync.remember_tables(%s, %s::jsonb)", (spec.name, payload)).fetchone()[0]


def forget_tables(conn: psycopg.Connection, spec: TableSpec, record_ids: list[str]) -> int:
    """Zapier ids found wrong (a write by them was refused): the next change of these records is found first."""
    if not record_ids:
        return 0
    return conn.execute("SELECT zsync.forget_tables(%s, %s::text[])", (spec.name, sorted(record_ids))).fetchone()[0]


def announce_blind(db: Database, spec: TableSpec, writes: Mapping[str, tuple[Known, datetime | None]]) -> bool:
    """zsync.announce_blind, committed on its own before blind writes are sent: ``writes``: record id -> (the
    known copy the write replaces, the version it sends). If the drain's transaction is then lost, the record's
    next write finds it first, and what the write replaced is recorded from that find (zsync.remember_tables).
    -> False when it could not be committed (write those records by the find path)."""
    payload = "[" + ",".join(
        f'{{"id":{json.dumps(rid)},"known":{row_to_json(k.row)},'
        f'"known_at":{ts_json(k.edited_at)},'
        f'"version":{ts_json(v)}}}'
        for rid, (k, v) in sorted(writes.items())) + "]"
    try:
        db.aside(lambda conn: conn.execute("SELECT zsync.announce_blind(%s, %s::jsonb)", (spec.name, payload)))
    except (DatabaseUnavailable, psycopg.Error):
        return False
    return True


def settle_blind(conn: psycopg.Connection, spec: TableSpec, delivered: Delivered) -> int:
    """zsync.settle_blind, before Tables deliveries are applied: each is kept as a copy of Tables' record, and
    the echo of a blind write whose drain went unrecorded records what that write replaced (an edit it overwrote
    may be in the same batch). -> how many echoes were settled."""
    return _on_deliveries(conn, spec, "settle_blind", delivered)


def base_for_raced_edits(conn: psycopg.Connection, spec: TableSpec, delivered: Delivered) -> int:
    """zsync.base_for_raced_edits, right before these deliveries are applied: a delivery stamped before a copy
    Supabase holds but made on it (two Tables edits landing in the other order than their stamps) gets the copy
    before both as its base, so it is merged rather than skipped as stale. -> how many bases were set."""
    return _on_deliveries(conn, spec, "base_for_raced_edits", delivered)


def remember_landed_on(conn: psycopg.Connection, spec: TableSpec, delivered: Delivered) -> int:
    """zsync.remember_landed_on, after :func:`remember_tables`: an edit stamped just before the write whose answer
    is the known copy, but made on it (it waited for the record), becomes the known copy. -> how many moved."""
    return _on_deliveries(conn, spec, "remember_landed_on", delivered)


def _on_deliveries(conn: psycopg.Connection, spec: TableSpec, function: str, delivered: Delivered) -> int:
    """``zsync.<function>(table, [{"id", "row", "edited_at"}])`` of the deliveries with an ``edited_at`` (or 0)."""
    items = [(row, at) for row, at in delivered if at is not None]
    if not items:
        return 0
    payload = "[" + ",".join(f'{{"id":{json.dumps(row["id"])},"row":{row_to_json(row)},'
                             f'"edited_at":{ts_json(at)}}}' for row, at in items) + "]"
    query = sql.SQL("SELECT zsync.{}(%s, %s::jsonb)").format(sql.Identifier(function))
    return conn.execute(query, (spec.name, payload)).fetchone()[0]


def tables_had(conn: psycopg.Connection, spec: TableSpec, versions: Mapping[str, datetime | None]) -> set[str]:
    """zsync.tables_had: of ``versions`` (record id -> updated_at), the records whose version Tables already had
    (its outbox entry acknowledged 'unchanged' or 'applied')."""
    ids = sorted(versions)
    return set(conn.execute("SELECT zsync.tables_had(%s, %s::text[], %s::timestamptz[])",
                            (spec.name, ids, [versions[i] for i in ids])).fetchone()[0]) if ids else set()


def blind_plan(conn: psycopg.Connection, spec: TableSpec, record_ids: list[str]) -> dict[str, Known]:
    """zsync.blind_plan: of ``record_ids``, those a ``*_to_tables`` function may write by Zapier id without a
    find -> id -> the known state of its Tables copy (empty when blind writes or the merge are off)."""
    if not record_ids:
        return {}
    found = conn.execute("SELECT record_id, tables_id, known, known_at FROM zsync.blind_plan(%s::regclass, %s::text[])",
                         (_regclass(spec), record_ids)).fetchall()
    return {rid: Known(tid, known, at) for rid, tid, known, at in found}
