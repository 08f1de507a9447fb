"""The Zaps' record triggers, as the Tables stand-in plays them: after a create, or an update that changes
the data, :func:`trigger_payload` (the record's fields by name, its id, ``edited_at``) is POSTed to the
table's trigger URL with the shared secret header, once per change, by :class:`TriggerDispatcher`'s
background workers, which replay failures on the ``autoreplay`` schedule (Zapier's is 5 min, 30 min, 1 h,
3 h, 6 h), log each attempt, and can lose a share of attempts in transit (``drop_share``)."""

from __future__ import annotations

import heapq
import itertools
import queue
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import requests

from infra.local.tables_service.values import Data, Rec, utc_now_iso

DELIVERY_LOG_MAX = 10_000


@dataclass
class Delivery:
    url: str
    table_id: str
    record_id: str
    payload: Data
    attempt: int = 1


def trigger_payload(record: Rec, names: Mapping[str, str]) -> Data:
    """What a Zap's "new or updated record" trigger hands to its webhook step: the fields by name, the
    record id as ``id`` when the record has no ``id`` value (no such field, or the cell is empty: left out of
    ``data``), and Zapier's ``edited_at``."""
    payload = {names.get(k, k): v for k, v in record["data"].items()}
    payload.setdefault("id", record["id"])
    payload["edited_at"] = record["edited_at"]
    return payload


class TriggerDispatcher:
    """Delivers trigger payloads from a queue with worker threads; replays failures on a schedule."""

    def __init__(
        self,
        secret_header: str,
        secret: str | None,
        autoreplay: Sequence[float] = (),
        timeout_s: float = 10.0,
        workers: int = 4,
    ) -> None:
        self._headers = {"Content-Type": "application/json"} | ({secret_header: secret} if secret else {})
        self._autoreplay = tuple(float(d) for d in autoreplay)
        self._timeout_s = timeout_s
        self._queue: queue.Queue[Delivery | None] = queue.Queue()
        self._cond = threading.Condition()
        self._replays: list[tuple[float, int, Delivery]] = []
        self._tiebreak = itertools.count()
        self._pending = 0
        self._counts: Counter[str] = Counter()
        self._log: deque[Data] = deque(maxlen=DELIVERY_LOG_MAX)
        self._stopping = threading.Event()
        # Fault knob (soak / chaos tests): the share of delivery attempts lost in transit (never POSTed,
        # logged with error "dropped"). A dropped attempt is a failed one: Autoreplay re-sends it when
        # configured (``autoreplay``), as Zapier does on paid plans; without it, it is lost.
        self.drop_share = 0.0
        self._drop_rng = random.Random()
        self._threads = [threading.Thread(target=self._work, name=f"trigger-{i}", daemon=True) for i in range(workers)]
        self._threads.append(threading.Thread(target=self._schedule_replays, name="trigger-replay", daemon=True))
        for thread in self._threads:
            thread.start()

    def enqueue(self, delivery: Delivery) -> None:
        with self._cond:
            self._pending += 1
        self._queue.put(delivery)

    def wait_idle(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "sent": self._counts["sent"],
                "failed": self._counts["failed"],
                "pending": self._pending,
                "attempts": self._counts["attempts"],
                "dropped": self._counts["dropped"],
            }

    def outcomes(self) -> list[Data]:
        with self._cond:
            return list(self._log)

    def reset(self) -> None:
        with self._cond:
            self._counts.clear()
            self._log.clear()

    def stop(self) -> None:
        """Stop the workers; queued and scheduled deliveries are dropped."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        for _ in range(len(self._threads) - 1):
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=self._timeout_s + 2)

    def _work(self) -> None:
        while True:
            delivery = self._queue.get()
            if delivery is None or self._stopping.is_set():
                return
            self._attempt(delivery)

    def _attempt(self, delivery: Delivery) -> None:
        with self._cond:
            drop = self.drop_share > 0 and self._drop_rng.random() < self.drop_share
            if drop:
                self._counts["dropped"] += 1
        status, error = (None, "dropped") if drop else self._post(delivery)
        ok = status is not None and 200 <= status < 300
        retriable = status is None or status == 429 or status >= 500
        replay_in = self._autoreplay[delivery.attempt - 1] if delivery.attempt <= len(self._autoreplay) else None
        with self._cond:
            self._counts["attempts"] += 1
            self._log.append(
                {
                    "url": delivery.url,
                    "table_id": delivery.table_id,
                    "record_id": delivery.record_id,
                    "attempt": delivery.attempt,
                    "status": status,
                    "error": error,
                    "ok": ok,
                    "at": utc_now_iso(),
                }
            )
            if not ok and retriable and replay_in is not None:
                delivery.attempt += 1
                heapq.heappush(self._replays, (time.monotonic() + replay_in, next(self._tiebreak), delivery))
            else:
                self._counts["sent" if ok else "failed"] += 1
                self._pending -= 1
            self._cond.notify_all()

    def _post(self, delivery: Delivery) -> tuple[int | None, str | None]:
        try:
            response = requests.post(
                delivery.url,
                json=delivery.payload,
                headers=self._headers,
                timeout=self._timeout_s,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            return None, type(exc).__name__
        response.close()
        return response.status_code, None

    def _schedule_replays(self) -> None:
        with self._cond:
            while not self._stopping.is_set():
                now = time.monotonic()
                if self._replays and self._replays[0][0] <= now:
                    self._queue.put(heapq.heappop(self._replays)[2])
                    continue
                self._cond.wait(timeout=(self._replays[0][0] - now) if self._replays else None)
