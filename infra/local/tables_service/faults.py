"""Fault injection for the Tables stand-in (:class:`FaultInjector`, armed through ``/_admin/faults``).

``POST /_admin/faults`` ``{"status": 503, "count": N}`` answers the next N records-API requests with that
status (``"retry_after"`` adds the header); ``"for_s": S`` makes it every request for S seconds instead;
``"hang_s": H`` waits H seconds before answering (a hang past the client's timeout); ``"status": 200``
refuses inside a 200 (``meta.errors``, nothing changed); ``"method": "DELETE"`` limits the fault to
requests of that method; ``"lose_response": true`` lets the request run (a write is applied, and kept for an
Idempotency-Key replay) and then answers the fault's status instead of its answer (after ``hang_s``, if
given): an answer lost on the way back. ``"slow": true`` (with ``hang_s``, no status) holds each request that
long and then runs and answers it: a write that reaches Zapier late, after writes sent later (the order two
writers' requests land in). ``DELETE /_admin/faults`` disarms it. (Lost trigger deliveries are the
dispatcher's ``drop_share``, :mod:`infra.local.tables_service.triggers`.)"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from infra.local.tables_service.values import Data


@dataclass
class _Fault:
    status: int
    count: int
    retry_after: int | None
    until: float | None = None  # time.monotonic() deadline: the fault lasts until then (count not used)
    hang_s: float = 0.0  # wait this long before answering (past the client's timeout: a hang)
    method: str | None = None  # only requests of this HTTP method (None: every request)
    lose_response: bool = False  # run the request, then answer the fault instead (the answer is lost)
    slow: bool = False  # hold the request hang_s, then run and answer it as usual


class FaultInjector:
    """Makes the next N records-API requests (or every request for ``for_s`` seconds) answer a given
    status, optionally after hanging ``hang_s`` seconds first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fault: _Fault | None = None
        self._served = 0

    def stats(self) -> Data:
        with self._lock:
            if self._fault and self._fault.until is not None:
                return {"served": self._served, "left": 1 if time.monotonic() < self._fault.until else 0}
            return {"served": self._served, "left": self._fault.count if self._fault else 0}

    def arm(self, status: int, count: int, retry_after: int | None, *, for_s: float | None = None,
            hang_s: float = 0.0, method: str | None = None, lose_response: bool = False,
            slow: bool = False) -> None:
        with self._lock:
            until = time.monotonic() + for_s if for_s is not None else None
            self._fault = _Fault(status, count, retry_after, until, hang_s, method, lose_response, slow)

    def clear(self) -> None:
        with self._lock:
            self._fault = None

    def take(self, method: str | None = None) -> _Fault | None:
        with self._lock:
            fault = self._fault
            if fault is None or (fault.method is not None and fault.method != method):
                return None
            if fault.until is not None:
                if time.monotonic() >= fault.until:
                    self._fault = None
                    return None
            elif fault.count <= 0:
                return None
            else:
                fault.count -= 1
            self._served += 1
            return fault
