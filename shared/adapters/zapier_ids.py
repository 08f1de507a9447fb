"""Record ids and Idempotency-Keys for Zapier's public Tables API v2 (:mod:`shared.adapters.zapier_tables`).

Ids: zsync keeps Zapier's record ids in their ULID form everywhere (Supabase rows of id-less Tables records
are keyed by it, trash bookkeeping stores it). The public API publishes "the UUID form" of the same id
(reference ``zapier-public-api.md`` section 4: the same 128 bits, 8-4-4-4-12 hex). The Tables client converts
at its edge and nowhere else: :func:`to_uuid` for every record id it sends (paths, ``updated_records[].id``,
``record_ids``), :func:`to_ulid` for every record id it reads back.

Idempotency-Keys: :func:`idempotency_key` derives the key from the change itself (table, operation, the
canonical body, and what the caller adds), never from time or chance, so every retry of the same change
sends the same key: urllib3's retry of a lost answer, a tenacity retry, a redelivered webhook, a re-run
outbox batch. Zapier then answers a finished write's retry with its original response and writes nothing
again (a create is never made twice).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_HEX = frozenset("0123456789abcdef")
KEY_PREFIX = "zsync-"
MEMORY_KEEP = 10_000  # records / lookups a client remembers for its keys (oldest forgotten first)


def is_ulid(value: object) -> bool:
    return (isinstance(value, str) and len(value) == 26 and value[0] in "01234567"
            and all(c in _CROCKFORD for c in value.upper()))


def is_uuid(value: object) -> bool:
    if not isinstance(value, str) or len(value) != 36:
        return False
    return [len(p) for p in value.split("-")] == [8, 4, 4, 4, 12] and set(value.replace("-", "").lower()) <= _HEX


def to_uuid(record_id: str) -> str:
    """The UUID form of a ULID; anything else (already a UUID, an id of another shape) unchanged."""
    if not is_ulid(record_id):
        return record_id
    value = 0
    for char in record_id.upper():
        value = value << 5 | _CROCKFORD.index(char)
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def to_ulid(record_id: Any) -> Any:
    """The ULID form of a UUID-form id; anything else unchanged."""
    if not is_uuid(record_id):
        return record_id
    value = int(record_id.replace("-", ""), 16)
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def canonical(value: Any) -> Any:
    """``value`` with every object's members in sorted order: sent as the body, the same change is the same
    bytes (Zapier replays a key only for the same payload)."""
    if isinstance(value, dict):
        return {str(k): canonical(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def idempotency_key(table_id: str, operation: str, body: Any, extra: Any = None) -> str:
    """``zsync-`` + 40 hex digits of SHA-256 over (table, operation, canonical body, extra)."""
    material = json.dumps([table_id, operation, canonical(body), canonical(extra)], sort_keys=True,
                          separators=(",", ":"), ensure_ascii=False, default=str)
    return KEY_PREFIX + hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


class ChangeMemory:
    """What one client last saw, for the part of an Idempotency-Key the body cannot hold: the same body can be
    a new change. An update or delete names each record's ``edited_at`` as last read (a record changed or
    restored since is a new change, not a replay of an earlier identical write); a create names the records the
    last lookup of its ``id`` found, trashed ones included (a record a person deleted, re-created from the same
    Supabase version, is a new record, not a replay of its first creation). A retry of the same change - in the
    call, or after a new lookup that finds the same - gets the same key; the callers look up before they write."""

    def __init__(self, keep: int = MEMORY_KEEP) -> None:
        self._lock = threading.Lock()
        self._keep = keep
        self._read: OrderedDict[str, str | None] = OrderedDict()  # record id -> edited_at
        self._found: OrderedDict[tuple[str, str], list[list[Any]]] = OrderedDict()  # (table, id) -> records

    def read(self, record_id: str, edited_at: str | None) -> None:
        with self._lock:
            self._read[record_id] = edited_at
            self._trim(self._read, record_id)

    def found(self, table_id: str, values: list[Any], records: list[tuple[str, Any, str | None]]) -> None:
        """A lookup by ``id`` of ``values`` found ``records`` (``(record id, its id value, deleted_at)``)."""
        by_value: dict[str, list[list[Any]]] = {_text(v): [] for v in values}
        for rid, value, deleted_at in records:
            by_value.setdefault(_text(value), []).append([rid, deleted_at])
        with self._lock:
            for value, found in by_value.items():
                self._found[(table_id, value)] = sorted(found, key=str)
                self._trim(self._found, (table_id, value))

    def extra(self, table_id: str, method: str, items: list[tuple[str | None, dict | None]]) -> list[Any]:
        """The key's extra part for a write of ``items`` (``(record id or None, our fields or None)``)."""
        with self._lock:
            if method == "POST":
                return [self._found.get((table_id, _text((data or {}).get("id")))) for _, data in items]
            return [self._read.get(rid) if rid is not None else None for rid, _ in items]

    def _trim(self, memory: OrderedDict[Any, Any], key: Any) -> None:
        memory.move_to_end(key)
        while len(memory) > self._keep:
            memory.popitem(last=False)
