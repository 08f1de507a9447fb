"""How hard a Zapier call retries: the urllib3 retry policy with a per-call time budget, shared by the
Tables records client (:mod:`shared.adapters.zapier_tables`) and the catch-hook writer
(:mod:`shared.adapters.catch_hook`).

Both writers send through :class:`shared.platform.http_client.Pool` (urllib3 directly: keep-alive connections,
proxy and CA settings read once) with a urllib3 :class:`Retry`: a bounded number of
attempts (``max_attempts``), exponential backoff with jitter (``backoff_factor``, ``backoff_max``,
``backoff_jitter``), retries on connect errors, read timeouts and 429/500/502/503/504 for *all* methods
(our writes are idempotent by design: callers find the record by its ``id`` field first), honouring
``Retry-After``; other 4xx are never retried.

On top of the attempt count, each call gets a deadline ``start + retry_budget_s``. A retry is started
only if ``now + planned wait + timeout_s <= deadline``, where the planned wait is the Retry-After value
or the largest possible backoff (jitter included). Every attempt is bounded by ``timeout_s`` (connect,
and each socket read), so **one call takes at most ``max(timeout_s, retry_budget_s)``**, whatever the
server says: a Retry-After that does not fit in the budget ends the call at once with
:class:`shared.adapters.zapier_errors.TablesUnavailable` (``retry_after`` set) instead of sleeping past the
caller's Lambda timeout. With the settings' defaults (10 s timeout, 20 s budget) a call ends within 20 s,
inside a 30 s Lambda. The budget is per HTTP call: :meth:`shared.adapters.zapier_tables.TablesClient.iter_records`
and the ``*_many`` methods make several; :func:`shared_budget` puts a batch of calls under one deadline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from urllib3.exceptions import InvalidHeader, MaxRetryError, ResponseError
from urllib3.util.retry import Retry

if TYPE_CHECKING:
    from types import TracebackType

    from urllib3.connectionpool import ConnectionPool
    from urllib3.response import BaseHTTPResponse

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


# --- retry policy with a per-call time budget ----------------------------------------------------------


@dataclass(frozen=True)
class _Budget:
    deadline: float  # time.monotonic() after which no attempt may still be running
    attempt_s: float  # worst-case duration of one attempt (the request timeout)


_BUDGET: ContextVar[_Budget | None] = ContextVar("zapier_tables_budget", default=None)


class BudgetRetry(Retry):
    """urllib3 ``Retry`` that also refuses a retry which could end after the current call's deadline.

    The deadline is set per call (and per thread) by :class:`CallBudget`; without one this is a plain
    ``Retry``. Unparseable Retry-After headers fall back to the backoff instead of raising.
    """

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: ConnectionPool | None = None,
        _stacktrace: TracebackType | None = None,
    ) -> Self:
        new = super().increment(method, url, response, error, _pool, _stacktrace)
        budget = _BUDGET.get()
        if budget is not None and time.monotonic() + new.planned_wait(response) + budget.attempt_s > budget.deadline:
            reason = error or ResponseError("retry time budget exhausted")
            raise MaxRetryError(_pool, url, reason) from reason  # type: ignore[arg-type]
        return new

    def planned_wait(self, response: BaseHTTPResponse | None) -> float:
        """Upper bound of the sleep before the next attempt (what :meth:`sleep` will do at most)."""
        if self.respect_retry_after_header and response is not None:
            retry_after = self.get_retry_after(response)
            if retry_after:
                return retry_after
        return self.max_backoff()

    def max_backoff(self) -> float:
        errors = 0
        for entry in reversed(self.history):
            if entry.redirect_location is not None:
                break
            errors += 1
        if errors <= 1:
            return 0.0
        return float(min(self.backoff_max, self.backoff_factor * (2 ** (errors - 1)) + self.backoff_jitter))

    def get_retry_after(self, response: BaseHTTPResponse) -> float | None:
        try:
            return super().get_retry_after(response)
        except InvalidHeader:
            return None


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to retry. The defaults suit a Lambda; tests pass tiny backoffs."""

    max_attempts: int = 5
    backoff_factor: float = 0.5  # sleeps: 0, 1, 2, 4 s ... (the first retry is immediate)
    backoff_max: float = 4.0
    backoff_jitter: float = 0.5

    def build(self) -> BudgetRetry:
        return BudgetRetry(
            total=max(self.max_attempts - 1, 0),
            connect=None,
            read=None,
            status=None,
            other=0,
            redirect=False,
            allowed_methods=None,  # all methods, POST/PATCH included
            status_forcelist=RETRY_STATUSES,
            backoff_factor=self.backoff_factor,
            backoff_max=self.backoff_max,
            backoff_jitter=self.backoff_jitter,
            respect_retry_after_header=True,
            raise_on_status=False,  # hand back the last 429/5xx so we can read its body and Retry-After
        )


_SHARED_DEADLINE: ContextVar[float | None] = ContextVar("zapier_tables_shared_deadline", default=None)


@contextmanager
def shared_budget(budget_s: float) -> Iterator[None]:
    """Every call made inside (this thread) shares one deadline ``now + budget_s`` on top of its own
    budget: a batch of requests honours 429 / Retry-After as one budget, not per request. A Retry-After
    that does not fit ends the call at once with :class:`TablesUnavailable` (``retry_after`` set)."""
    token = _SHARED_DEADLINE.set(time.monotonic() + budget_s)
    try:
        yield
    finally:
        _SHARED_DEADLINE.reset(token)


class CallBudget:
    """Context manager: arm the retry deadline for the HTTP call made inside it (this thread only)."""

    def __init__(self, budget_s: float, attempt_s: float) -> None:
        deadline = time.monotonic() + budget_s
        shared = _SHARED_DEADLINE.get()
        self._budget = _Budget(deadline if shared is None else min(deadline, shared), attempt_s)
        self.started = time.monotonic()

    def __enter__(self) -> Self:
        self._token = _BUDGET.set(self._budget)
        return self

    def __exit__(self, *exc: object) -> None:
        _BUDGET.reset(self._token)

    def elapsed(self) -> float:
        return time.monotonic() - self.started
