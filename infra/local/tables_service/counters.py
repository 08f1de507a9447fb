"""What the Tables stand-in counts and limits: :class:`ServiceStats` (API requests, writes and same-version
writes per table, read by ``GET /_admin/stats``), :func:`same_version_updates` (a write of the version a
record already held: the sync's echo) and :class:`RateLimiter` (the per-table sliding-window rate limit)."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from infra.local.tables_service.values import Data


class RequestLog:
    """The API requests served, oldest first (``GET /_admin/requests``): method, path, and whether an
    ``Idempotency-Key`` header was sent (and its value). The newest ``keep`` are kept."""

    def __init__(self, keep: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._entries: deque[Data] = deque(maxlen=keep)

    def add(self, method: str, path: str, idempotency_key: str | None) -> None:
        with self._lock:
            self._entries.append({"method": method, "path": path, "idempotency_key": idempotency_key is not None,
                                  "idempotency_key_value": idempotency_key})

    def entries(self) -> list[Data]:
        with self._lock:
            return list(self._entries)

    def reset(self) -> None:
        with self._lock:
            self._entries.clear()


class RateLimiter:
    """At most ``limit`` requests per ``window_s`` per key (a sliding window); None: unlimited."""

    def __init__(self, limit: int | None, window_s: float) -> None:
        self.limit, self.window_s = limit, window_s
        self._lock = threading.Lock()
        self._seen: dict[str, deque[float]] = {}

    def take(self, key: str) -> float | None:
        """None when allowed, else the seconds until a request would be."""
        if self.limit is None:
            return None
        now = time.monotonic()
        with self._lock:
            seen = self._seen.setdefault(key, deque())
            while seen and seen[0] <= now - self.window_s:
                seen.popleft()
            if len(seen) >= self.limit:
                return seen[0] + self.window_s - now
            seen.append(now)
            return None


class ServiceStats:
    def __init__(self, table_ids: Sequence[str]) -> None:
        self._lock = threading.Lock()
        self._table_ids = list(table_ids)
        self._writes: Counter[str] = Counter({t: 0 for t in self._table_ids})
        self._same_version: Counter[str] = Counter({t: 0 for t in self._table_ids})
        self._same_version_ids: deque[str] = deque(maxlen=20)  # the records of the latest such writes
        self._requests = 0

    def reset(self) -> None:
        with self._lock:
            self._writes = Counter({t: 0 for t in self._table_ids})
            self._same_version = Counter({t: 0 for t in self._table_ids})
            self._same_version_ids.clear()
            self._requests = 0

    def count_request(self) -> None:
        with self._lock:
            self._requests += 1

    def count_writes(self, table_id: str, n: int) -> None:
        with self._lock:
            self._writes[table_id] += n

    def count_same_version(self, table_id: str, record_ids: Sequence[str]) -> None:
        with self._lock:
            self._same_version[table_id] += len(record_ids)
            self._same_version_ids.extend(record_ids)

    def snapshot(self) -> Data:
        with self._lock:
            return {"writes": dict(self._writes), "same_version_writes": dict(self._same_version),
                    "same_version_records": list(self._same_version_ids), "api_requests": self._requests}


def _version_time(value: Any) -> Any:
    """A record's ``updated_at`` at millisecond precision (as the sync compares it); else the value as is."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return value
        if parsed.tzinfo is not None:
            return parsed.astimezone(UTC).replace(microsecond=parsed.microsecond // 1000 * 1000)
    return value


def same_version_updates(changes: Sequence[Data], updated_at_key: str | None, id_key: str | None = None
                         ) -> list[str]:
    """Updates that left a record's ``updated_at`` where it was (changed or not): a write of the version the
    record already held - the sync's echo, unless a person edited a cell without touching ``updated_at``.
    -> the records' ``id`` cells (their Zapier id when the cell is empty)."""
    if updated_at_key is None:
        return []
    same = []
    for c in changes:
        before = c["old"]["data"].get(updated_at_key) if c["old"] is not None else None
        if before is not None and _version_time(before) == _version_time(c["new"]["data"].get(updated_at_key)):
            same.append(str((c["new"]["data"].get(id_key) if id_key else None) or c["new"].get("id", "")))
    return same
