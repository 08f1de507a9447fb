"""The Zapier errors: what a Tables, token-endpoint or catch-hook call raises, and the mapping from an HTTP
status to one of them.

:class:`TablesError` is the base of them all (the trigger-inbox client also catches it: its token comes
from :class:`shared.adapters.zapier_oauth.TokenSource`). Messages name the table or path, never the token
or a catch-hook URL (both are credentials), and carry at most the first 300 characters of the server's text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.platform.http_client import json_of, text_of

if TYPE_CHECKING:
    from urllib3.response import BaseHTTPResponse

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
    """Any other 4xx (bad body, too large, ...), or a write refused inside a 200 (``meta.errors``, a
    record's ``errors``): retrying the same request will not help. ``fields``: our names of refused fields."""

    def __init__(self, status: int | None, message: str, fields: list[str] | None = None) -> None:
        super().__init__(status, message)
        self.fields = fields or []


class TablesFieldMissing(TablesError):
    """The Zapier table has no field of this name: a configuration error (run ``zsync setup zapier``)."""

    def __init__(self, table_id: str, field: str) -> None:
        super().__init__(None, f"Zapier table {table_id} has no field named {field!r}: "
                               "run `zsync setup zapier` (or add the field in Zapier Tables)")
        self.table_id = table_id
        self.field = field


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


# --- HTTP status -> error (every Zapier client) -----------------------------------------------------------


def _error_text(response: BaseHTTPResponse) -> str:
    try:
        payload = json_of(response)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        text = payload["error"]
    else:
        text = text_of(response).strip() or response.reason or "no message"
    return text[:_MESSAGE_MAX]


def _retry_after(response: BaseHTTPResponse) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None


def raise_for_status(response: BaseHTTPResponse, what: str, elapsed_s: float) -> None:
    """Nothing for a 2xx; otherwise the :class:`TablesError` its status means (``elapsed_s``: time spent on
    the call, named in a 429/5xx message)."""
    status = response.status
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

