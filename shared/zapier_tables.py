"""The one module that knows the shape of the Zapier Tables records API (and of the seed's catch hooks).

**The public Zapier Tables REST API could not be confirmed** (see ``/work/shared/reference/zapier.md``):
public code that calls Tables guesses between several endpoint shapes. We follow the seed's path
(``POST https://tables.zapier.com/api/v1/tables/{table_id}/records``), address fields by name, and keep
every detail of the shape here, so that switching to the real shape is a change to this file only.
``infra/local/tables_service.py`` implements the same contract for local runs and tests.

Contract::

    Authorization: Bearer <token>                      -> 401 {"error": ...} when missing or wrong
    record = {"id": "rec_...", "data": {field: value}, "created_at": iso, "updated_at": iso}
    GET    /api/v1/tables/{tid}/records?limit=N&cursor=C&filter[<field>]=<value>
                                                       -> 200 {"data": [record], "next_cursor": str|null}
    GET    /api/v1/tables/{tid}/records/{rid}          -> 200 record | 404
    POST   /api/v1/tables/{tid}/records {"data": {...}} (or flat fields)           -> 201 record
    POST   /api/v1/tables/{tid}/records {"records": [{"data": {...}}]} (<= 100)    -> 201 {"data": [record]}
    PATCH  /api/v1/tables/{tid}/records/{rid} {"data": {...}} (partial)           -> 200 record
    PATCH  /api/v1/tables/{tid}/records {"records": [{"id": rid, "data": {...}}]}  -> 200 {"data": [record]}
    DELETE /api/v1/tables/{tid}/records/{rid}          -> 204
    errors: {"error": "<message>"}; 400, 404, 413, 429 (Retry-After seconds), 5xx

Field values are flat scalars (text, number, boolean, null): JSON kinds travel as strings (see
:mod:`shared.spec`). The top-level ``created_at``/``updated_at`` are Zapier's system metadata, distinct
from the fields of the same name inside ``data``.

Retries and the time budget
---------------------------
Both writers use a ``requests.Session`` with a urllib3 :class:`Retry` mounted: a bounded number of
attempts (``max_attempts``), exponential backoff with jitter (``backoff_factor``, ``backoff_max``,
``backoff_jitter``), retries on connect errors, read timeouts and 429/500/502/503/504 for *all* methods
(our writes are idempotent by design: callers find the record by its ``id`` field first), honouring
``Retry-After``; other 4xx are never retried.

On top of the attempt count, each call gets a deadline ``start + retry_budget_s``. A retry is started
only if ``now + planned wait + timeout_s <= deadline``, where the planned wait is the Retry-After value
or the largest possible backoff (jitter included). Every attempt is bounded by ``timeout_s`` (connect,
and each socket read), so **one call takes at most ``max(timeout_s, retry_budget_s)``**, whatever the
server says: a Retry-After that does not fit in the budget ends the call at once with
:class:`TablesUnavailable` (``retry_after`` set) instead of sleeping past the caller's Lambda timeout.
With the settings' defaults (10 s timeout, 20 s budget) a call ends within 20 s, inside a 30 s Lambda.
The budget is per HTTP call: :meth:`TablesClient.iter_records` and the ``*_many`` methods make several.

Retrying a POST after a read timeout can create the record twice if the first attempt was applied;
:meth:`TablesClient.find_by_field` then raises :class:`TablesDuplicate` so the duplicate is noticed.

The token never appears in exception messages, reprs or logs; catch-hook URLs (which are credentials
too) are never put in messages either.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote

import requests
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase
from urllib3.exceptions import InvalidHeader, MaxRetryError, ResponseError
from urllib3.util.retry import Retry

if TYPE_CHECKING:
    from types import TracebackType

    from urllib3.connectionpool import ConnectionPool
    from urllib3.response import BaseHTTPResponse

    from shared.settings import Settings

log = logging.getLogger(__name__)

Scalar = str | int | float | bool | None

API_PREFIX = "/api/v1/tables"
BATCH_MAX = 100  # records per batch create/update request
PAGE_DEFAULT = 100
PAGE_MAX = 1000
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_MESSAGE_MAX = 300


# --- exceptions ----------------------------------------------------------------------------------------


class TablesError(Exception):
    """Base error of this module. ``status`` is the HTTP status (None without a response)."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})" if status is not None else message)
        self.status = status
        self.message = message


class TablesAuthError(TablesError):
    """401/403: the token is missing, wrong or lacks access. Not retriable."""


class TablesNotFound(TablesError):
    """404: unknown table or record."""


class TablesRejected(TablesError):
    """Any other 4xx (bad body, too large, ...): retrying the same request will not help."""


class TablesUnavailable(TablesError):
    """429/5xx/connection error/timeout after retries were exhausted or the time budget ran out.

    Retriable later. ``retry_after`` is the server's Retry-After in seconds when it sent one.
    """

    def __init__(self, status: int | None, message: str, retry_after: float | None = None) -> None:
        super().__init__(status, message)
        self.retry_after = retry_after


class TablesDuplicate(TablesError):
    """More than one record matched a lookup that must be unique (``find_by_field``)."""

    def __init__(self, message: str, record_ids: list[str]) -> None:
        super().__init__(None, message)
        self.record_ids = record_ids


class TablesProtocolError(TablesError):
    """A 2xx answer whose body does not have the documented shape."""


# --- model ---------------------------------------------------------------------------------------------


class Record(BaseModel):
    """One Zapier Tables record. ``created_at``/``updated_at`` are system metadata (ISO strings)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    data: dict[str, Any]
    created_at: str | None = None
    updated_at: str | None = None


# --- retry policy with a per-call time budget ----------------------------------------------------------


@dataclass(frozen=True)
class _Budget:
    deadline: float  # time.monotonic() after which no attempt may still be running
    attempt_s: float  # worst-case duration of one attempt (the request timeout)


_BUDGET: ContextVar[_Budget | None] = ContextVar("zapier_tables_budget", default=None)


class BudgetRetry(Retry):
    """urllib3 ``Retry`` that also refuses a retry which could end after the current call's deadline.

    The deadline is set per call (and per thread) by :func:`_call_budget`; without one this is a plain
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


def _session(policy: RetryPolicy) -> requests.Session:
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=policy.build())
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class _CallBudget:
    """Context manager: arm the retry deadline for the HTTP call made inside it (this thread only)."""

    def __init__(self, budget_s: float, attempt_s: float) -> None:
        self._budget = _Budget(time.monotonic() + budget_s, attempt_s)
        self.started = time.monotonic()

    def __enter__(self) -> Self:
        self._token = _BUDGET.set(self._budget)
        return self

    def __exit__(self, *exc: object) -> None:
        _BUDGET.reset(self._token)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class _BearerAuth(AuthBase):
    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "<BearerAuth ***>"


# --- response handling shared by both writers ----------------------------------------------------------


def _error_text(response: requests.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        text = payload["error"]
    else:
        text = response.text.strip() or response.reason or "no message"
    return text[:_MESSAGE_MAX]


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None


def _raise_for_status(response: requests.Response, what: str, elapsed_s: float) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    text = f"{what}: {_error_text(response)}"
    if status in (401, 403):
        raise TablesAuthError(status, text)
    if status == 404:
        raise TablesNotFound(status, text)
    if status == 429 or status >= 500:
        raise TablesUnavailable(status, f"{text} (gave up after {elapsed_s:.1f}s)", _retry_after(response))
    raise TablesRejected(status, text)


def _root_cause(exc: requests.RequestException) -> str:
    """A short reason without URLs (a catch-hook URL is a credential)."""
    cause: BaseException = exc
    arg = exc.args[0] if exc.args else None
    if isinstance(arg, MaxRetryError) and arg.reason is not None:
        cause = arg.reason
    elif isinstance(arg, BaseException):
        cause = arg
    return type(cause).__name__


def _check_flat(fields: Mapping[str, Any]) -> None:
    for name, value in fields.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"field names must be non-empty strings, got {name!r}")
        if value is not None and not isinstance(value, str | int | float | bool):
            raise ValueError(f"field {name!r} must be a string, number, boolean or null (JSON goes as a string)")


def filter_text(value: Scalar) -> str:
    """How a value is written in a ``filter[field]=`` query parameter (the service compares text)."""
    if value is None:
        raise ValueError("cannot filter on null")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- the records API client ----------------------------------------------------------------------------


class TablesClient:
    """Client for the Zapier Tables records API (contract in the module docstring).

    ``timeout_s`` bounds each attempt; ``retry_budget_s`` bounds a whole call including retries, so a
    call ends within ``max(timeout_s, retry_budget_s)``. The deadline is kept per thread (a context
    variable), so concurrent calls from several threads each get their own budget; one client per
    Lambda container is the intended use.
    """

    def __init__(
        self,
        base_url: str,
        token: str | SecretStr,
        timeout_s: float = 10.0,
        retry_budget_s: float = 20.0,
        *,
        retry: RetryPolicy | None = None,
    ) -> None:
        secret = token.get_secret_value() if isinstance(token, SecretStr) else token
        if not secret:
            raise ValueError("a Zapier Tables token is required")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.retry_budget_s = retry_budget_s
        self._session = _session(retry or RetryPolicy())
        self._session.auth = _BearerAuth(secret)

    def __repr__(self) -> str:
        return f"TablesClient(base_url={self.base_url!r}, token=***)"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    # -- single records --

    def get(self, table_id: str, rid: str) -> Record:
        """The record ``rid``; :class:`TablesNotFound` when the table or record does not exist."""
        return self._record(self._call("GET", self._record_path(table_id, rid)))

    def find_by_field(self, table_id: str, field: str, value: Scalar) -> Record | None:
        """The one record whose ``field`` equals ``value``, None if none; :class:`TablesDuplicate` if several."""
        params = {"limit": "2", f"filter[{field}]": filter_text(value)}
        found = self._records(self._call("GET", self._records_path(table_id), params=params))
        if len(found) > 1:
            ids = [r.id for r in found]
            raise TablesDuplicate(f"table {table_id}: more than one record has {field} = {value!r}: {ids}", ids)
        return found[0] if found else None

    def create(self, table_id: str, data: Mapping[str, Scalar]) -> Record:
        _check_flat(data)
        return self._record(self._call("POST", self._records_path(table_id), body={"data": dict(data)}))

    def update(self, table_id: str, rid: str, data: Mapping[str, Scalar]) -> Record:
        """Change only the given fields of record ``rid``."""
        _check_flat(data)
        return self._record(self._call("PATCH", self._record_path(table_id, rid), body={"data": dict(data)}))

    def delete(self, table_id: str, rid: str, *, missing_ok: bool = False) -> None:
        try:
            self._call("DELETE", self._record_path(table_id, rid))
        except TablesNotFound:
            if not missing_ok:
                raise

    # -- many records --

    def iter_records(
        self, table_id: str, page_size: int = PAGE_DEFAULT, filters: Mapping[str, Scalar] | None = None
    ) -> Iterator[Record]:
        """Every record (matching all ``filters``, by equality) in creation order, following cursors."""
        if not 1 <= page_size <= PAGE_MAX:
            raise ValueError(f"page_size must be 1..{PAGE_MAX}")
        params = {"limit": str(page_size)} | {f"filter[{k}]": filter_text(v) for k, v in (filters or {}).items()}
        cursor: str | None = None
        while True:
            page_params = params | ({"cursor": cursor} if cursor else {})
            page = self._call("GET", self._records_path(table_id), params=page_params)
            yield from self._records(page)
            cursor = page.get("next_cursor")
            if not cursor:
                return
            if not isinstance(cursor, str):
                raise TablesProtocolError(None, f"table {table_id}: next_cursor is not a string")

    def create_many(self, table_id: str, rows: Iterable[Mapping[str, Scalar]]) -> list[Record]:
        """Create records in batches of :data:`BATCH_MAX` (each batch is atomic, the whole call is not)."""
        rows = [dict(r) for r in rows]
        for row in rows:
            _check_flat(row)
        created: list[Record] = []
        for chunk in _chunks(rows, BATCH_MAX):
            body = {"records": [{"data": row} for row in chunk]}
            created += self._records(self._call("POST", self._records_path(table_id), body=body))
        return created

    def update_many(self, table_id: str, updates: Iterable[tuple[str, Mapping[str, Scalar]]]) -> list[Record]:
        """Apply ``(record id, fields)`` partial updates in batches of :data:`BATCH_MAX`."""
        items = [(rid, dict(data)) for rid, data in updates]
        for _, data in items:
            _check_flat(data)
        updated: list[Record] = []
        for chunk in _chunks(items, BATCH_MAX):
            body = {"records": [{"id": rid, "data": data} for rid, data in chunk]}
            updated += self._records(self._call("PATCH", self._records_path(table_id), body=body))
        return updated

    # -- plumbing --

    def _records_path(self, table_id: str) -> str:
        return f"{API_PREFIX}/{quote(table_id, safe='')}/records"

    def _record_path(self, table_id: str, rid: str) -> str:
        return f"{self._records_path(table_id)}/{quote(rid, safe='')}"

    def _call(
        self, method: str, path: str, *, params: Mapping[str, str] | None = None, body: object = None
    ) -> dict[str, Any]:
        what = f"{method} {path}"
        with _CallBudget(self.retry_budget_s, self.timeout_s) as budget:
            try:
                response = self._session.request(
                    method,
                    self.base_url + path,
                    params=params,
                    json=body,
                    timeout=self.timeout_s,
                    allow_redirects=False,
                )
            except requests.RequestException as exc:
                raise TablesUnavailable(
                    None, f"{what}: {_root_cause(exc)} (gave up after {budget.elapsed():.1f}s)"
                ) from None
            _raise_for_status(response, what, budget.elapsed())
        return self._json(response, what)

    @staticmethod
    def _json(response: requests.Response, what: str) -> dict[str, Any]:
        if response.status_code == 204:
            return {}
        try:
            payload = response.json()
        except ValueError:
            raise TablesProtocolError(response.status_code, f"{what}: response is not JSON") from None
        if not isinstance(payload, dict):
            raise TablesProtocolError(response.status_code, f"{what}: response is not a JSON object")
        return payload

    @staticmethod
    def _record(payload: Mapping[str, Any]) -> Record:
        try:
            return Record.model_validate(payload)
        except ValidationError as exc:
            raise TablesProtocolError(None, f"unexpected record shape: {exc.error_count()} error(s)") from None

    @classmethod
    def _records(cls, payload: Mapping[str, Any]) -> list[Record]:
        items = payload.get("data")
        if not isinstance(items, list):
            raise TablesProtocolError(None, "expected {'data': [records]}")
        return [cls._record(item) for item in items]


# --- the seed's 3B path: POST to a per-table catch hook -------------------------------------------------


class CatchHookWriter:
    """Writes a record by POSTing its flat, formatted fields to the table's Zapier catch hook.

    This is the seed's Zap 3B path (chosen with ``ZSYNC_TABLES_WRITER=catch_hook``): the Zap behind each
    hook runs "Find or Create Record" with ``id`` as the search field. Its limits, compared with the
    records API (:class:`TablesClient`):

    * Zapier answers 200 as soon as the hook *received* the request, before the Zap runs, so a
      successful :meth:`send` means "accepted", never "applied"; a Zap step that fails later is only
      visible in Zap history.
    * No version comparison happens on the Tables side: the last delivery wins, so deliveries that
      arrive out of order can regress a record to an older state.
    * No read access: nothing here can check what Tables holds, so reconcile needs the records API.
    * Under load catch hooks may process a request minutes after answering 200.

    Retries follow the same policy and time budget as :class:`TablesClient`. Hook URLs are credentials:
    they never appear in exception messages (the table name does).
    """

    def __init__(
        self,
        hook_urls: Mapping[str, str],
        timeout_s: float = 10.0,
        retry_budget_s: float = 20.0,
        *,
        retry: RetryPolicy | None = None,
    ) -> None:
        for table, url in hook_urls.items():
            if not url.startswith(("https://", "http://")):
                raise ValueError(f"catch hook URL for {table!r} must be an http(s) URL")
        self._hook_urls = dict(hook_urls)
        self.timeout_s = timeout_s
        self.retry_budget_s = retry_budget_s
        self._session = _session(retry or RetryPolicy())

    def __repr__(self) -> str:
        return f"CatchHookWriter(tables={sorted(self._hook_urls)!r})"

    def close(self) -> None:
        self._session.close()

    def send(self, table_name: str, fields: Mapping[str, Scalar]) -> None:
        """POST ``fields`` (already formatted for Tables: flat, JSON as strings) to the table's hook."""
        url = self._hook_urls.get(table_name)
        if url is None:
            raise ValueError(f"no catch hook URL configured for table {table_name!r}")
        _check_flat(fields)
        what = f"catch hook for {table_name}"
        with _CallBudget(self.retry_budget_s, self.timeout_s) as budget:
            try:
                response = self._session.post(url, json=dict(fields), timeout=self.timeout_s, allow_redirects=False)
            except requests.RequestException as exc:
                raise TablesUnavailable(
                    None, f"{what}: {_root_cause(exc)} (gave up after {budget.elapsed():.1f}s)"
                ) from None
            _raise_for_status(response, what, budget.elapsed())


# --- construction from settings ------------------------------------------------------------------------


def client_from_settings(settings: Settings) -> TablesClient:
    """A :class:`TablesClient` for ``ZSYNC_TABLES_API_URL`` / ``ZSYNC_TABLES_TOKEN``."""
    if settings.tables_token is None:
        raise ValueError("ZSYNC_TABLES_TOKEN is not set")
    return TablesClient(
        settings.tables_api_url, settings.tables_token, settings.http_timeout_s, settings.retry_budget_s
    )


def catch_hook_writer_from_settings(settings: Settings) -> CatchHookWriter:
    """A :class:`CatchHookWriter` for ``ZSYNC_CATCH_HOOK_URLS`` (used when ``tables_writer=catch_hook``)."""
    if not settings.catch_hook_urls:
        raise ValueError("ZSYNC_CATCH_HOOK_URLS is not set")
    return CatchHookWriter(settings.catch_hook_urls, settings.http_timeout_s, settings.retry_budget_s)
