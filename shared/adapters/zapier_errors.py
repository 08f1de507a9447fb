"""The Zapier errors: what a Tables, token-endpoint or catch-hook call raises, and the mapping from an HTTP
status to one of them.

:class:`TablesError` is the base of them all (the trigger-inbox client also catches it: its token comes
from :class:`shared.adapters.zapier_oauth.TokenSource`). Messages name the table or path, never the token
or a catch-hook URL (both are credentials), and carry at most the first 300 characters of the server's text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shared.platform.http_client import json_of, text_of

if TYPE_CHECKING:
    from urllib3.response import BaseHTTPResponse

_MESSAGE_MAX = 300
FIELD_KEY = re.compile(r"(?<![0-9A-Za-z])f(\d+)(?![0-9A-Za-z])")  # a field id in an error text


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
    record's ``errors``): retrying the same request will not help. ``fields``: the refused fields (the Tables
    client turns the ``f<n>`` a v2 error names into our names)."""

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


def _payload(response: BaseHTTPResponse) -> Any:
    try:
        return json_of(response)
    except ValueError:
        return None


def _error_text(payload: Any, response: BaseHTTPResponse) -> str:
    """The server's message: the public API's envelope ``{"detail", "code", "errors": [{"detail", "code"}]}``
    (its ``code`` named), the SDK path's ``{"error"}``, or the body as text."""
    text = None
    if isinstance(payload, dict):
        errors = payload.get("errors")
        first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
        detail = payload.get("detail") or first.get("detail") or first.get("title")
        code = payload.get("code") or first.get("code")
        if isinstance(detail, str) and detail:
            text = f"{detail} ({code})" if isinstance(code, str) and code else detail
        elif isinstance(payload.get("error"), str):
            text = payload["error"]
    if text is None:
        text = text_of(response).strip() or response.reason or "no message"
    return text[:_MESSAGE_MAX]


def _field_keys(payload: Any) -> list[str]:
    """The field ids (``f<n>``) a v2 error envelope names in its ``meta`` (the envelope's ``meta`` and each
    error's; keys or values, e.g. ``{"fields": {"0.f5": ...}}``): their shape is not published, so any
    ``f<n>`` token found there counts."""
    if not isinstance(payload, dict):
        return []
    metas = [payload.get("meta")] + [e.get("meta") for e in payload.get("errors") or [] if isinstance(e, dict)]
    found: set[str] = set()
    for meta in metas:
        if isinstance(meta, dict):
            found.update(FIELD_KEY.findall(json.dumps(meta, default=str)))
    return sorted(f"f{n}" for n in found)


def named_refusal(exc: TablesRejected, name_of: Callable[[str], str]) -> TablesRejected:
    """``exc`` with the field ids (``f<n>``) of its message and ``fields`` given as our field names."""
    names = {key: name_of(key) for key in exc.fields}
    message = FIELD_KEY.sub(lambda m: names.get(m.group(0), m.group(0)), exc.message)
    return TablesRejected(exc.status, message, fields=sorted(set(names.values())))


def _retry_after(response: BaseHTTPResponse) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None


def raise_for_status(response: BaseHTTPResponse, what: str, elapsed_s: float) -> None:
    """Nothing for a 2xx; otherwise the :class:`TablesError` its status means (``elapsed_s``: time spent on
    the call, named in a 429/5xx message)."""
    status = response.status
    if 200 <= status < 300:
        return
    payload = _payload(response)
    text = f"{what}: {_error_text(payload, response)}"
    if status in (401, 403):
        raise TablesAuthError(status, text)
    if status == 404:
        raise TablesNotFound(status, text)
    if status == 429 or status >= 500:
        raise TablesUnavailable(status, f"{text} (gave up after {elapsed_s:.1f}s)", _retry_after(response))
    raise TablesRejected(status, text, fields=_field_keys(payload))

