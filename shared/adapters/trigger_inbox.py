"""Client for Zapier's trigger inboxes: the public Trigger Inbox API (``https://api.zapier.com`` +
``{prefix}/inboxes``; reference ``zapier-public-api.md`` section 2).

The docs show two prefixes (``/trigger-inbox/api/v1``: guides and white-label pages, the default here;
``/trigger-inbox/v1``: the OpenAPI files): ``prefix`` chooses (setting ``ZSYNC_INBOX_PATH_PREFIX``). Leases
keep the documented bounds (``lease_limit`` 1-100, ``lease_seconds`` 1-3600; a value outside is refused here
before any request). The app-metadata lookups that find the Tables trigger's action key have no public
endpoint: they stay on the SDK's host and path (``sdk_url``, default the same origin).

A trigger inbox subscribes to an app's trigger (here: Zapier Tables' deletes-capable or new-or-updated
record trigger of one table, ``infra/deploy/wire.py``) and keeps its events in a queue on Zapier's side;
the consumer leases messages, applies them and acknowledges them (at-least-once). See also
``/work/shared/reference/zapier-tables-api.md``, section "Trigger inboxes"; the bodies follow the public
docs and ``@zapier/zapier-sdk`` (0.67.0 sends ``PUT`` with
``name`` to ensure an inbox and lists with ``?name=``; newer versions ``POST`` with ``key`` and list with
``?key=``). This client sends the newer form and reads either.

Authentication: :meth:`InboxClient.for_tables` shares the Zapier Tables client's OAuth client-credentials
token provider (:class:`shared.adapters.zapier_oauth.TokenSource`: one token per process, refreshed before expiry,
fetched again once after a 401); any object with ``authorization()`` returning the header value (e.g.
:class:`BearerToken`) also works. Requests go through :class:`shared.platform.http_client.Pool` (urllib3 directly).

Retries follow the SDK: 429/500/502/503/504 are retried for GET/PUT/DELETE, only 429 for POST/PATCH
(a lease retried after a lost answer would lease other messages; the first lease's messages come back
when it expires), honouring ``Retry-After``, a bounded number of attempts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from urllib3.util.retry import Retry

from shared.adapters.trigger_payload import (  # noqa: F401  (re-exported: the payload side of an inbox)
    TriggerDelete,
    TriggerRecord,
    UnreadablePayload,
    is_delete_event,
    read_delete,
    read_payload,
)
from shared.adapters.zapier_errors import TablesError
from shared.adapters.zapier_oauth import TokenSourceAuth
from shared.platform.http_client import Auth, Pool, TransportError, json_of, text_of

if TYPE_CHECKING:
    from urllib3.response import BaseHTTPResponse

INBOX_PATH = "/api/v0/sdk/trigger-inbox/api/v1/inboxes"  # the SDK's (served by the stand-in; not used here)
INBOX_PREFIXES = ("/trigger-inbox/api/v1", "/trigger-inbox/v1")  # the public API's two documented prefixes
DEFAULT_PREFIX = INBOX_PREFIXES[0]
LEASE_LIMIT_MAX = 100
LEASE_SECONDS_MAX = 3600
DEFAULT_LEASE_LIMIT = 10
IMPLEMENTATIONS_PATH = "/api/v0/sdk/zapier/api/v4/implementations/"
IMPLEMENTATIONS_LOOKUP_PATH = "/api/v0/sdk/zapier/api/v4/implementations-meta/lookup/"
TABLES_IMPLEMENTATION = "TableCLIAPI"
TABLES_APP_SLUG = "zapier_tables"
DEFAULT_LEASE_SECONDS = 300
_IDEMPOTENT = frozenset({"GET", "PUT", "DELETE", "HEAD", "OPTIONS"})
_MESSAGE_MAX = 300


class InboxError(Exception):
    """Base error. ``status`` is the HTTP status (None without a response); ``code`` an API error code."""

    def __init__(self, status: int | None, message: str, code: str | None = None) -> None:
        super().__init__(f"{message} (HTTP {status})" if status is not None else message)
        self.status = status
        self.message = message
        self.code = code


class InboxUnavailable(InboxError):
    """429/5xx/connection error after the retries: try later."""


class InboxConflict(InboxError):
    """409: an inbox with this key has another subscription, or leasing from a paused, drained inbox."""


class InboxNotFound(InboxError):
    """404."""


class LeaseExpired(InboxError):
    """400 ``lease_expired``: the lease ran out before the ack/release (its messages come back)."""


class InboxProtocolError(InboxError):
    """A 2xx answer without the documented shape."""


class BearerToken:
    """``Authorization: Bearer <token>``; the token may be a string or a callable returning one."""

    def __init__(self, token: str | Any) -> None:
        self._token = token

    def authorization(self) -> str:
        token = self._token() if callable(self._token) else self._token
        return f"Bearer {token}"

    def __repr__(self) -> str:
        return "<BearerToken ***>"


class _SdkRetry(Retry):
    """Like the SDK: statuses are retried for idempotent methods, only 429 for POST/PATCH."""

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        if method.upper() not in _IDEMPOTENT and status_code != 429:
            return False
        return super().is_retry(method, status_code, has_retry_after)


def _session(origins: list[str], max_attempts: int, backoff_factor: float) -> Pool:
    retry = _SdkRetry(total=max(max_attempts - 1, 0), connect=None, read=None, status=None, other=0,
                      redirect=False, allowed_methods=None, status_forcelist=(429, 500, 502, 503, 504),
                      backoff_factor=backoff_factor, backoff_max=4.0, respect_retry_after_header=True,
                      raise_on_status=False)
    return Pool(retry, origins)


def api_origin(url: str) -> str:
    """``https://sdkapi.zapier.com`` from any URL on that host (the SDK sends its paths to the origin)."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"not an absolute URL: {url!r}")
    return f"{parts.scheme}://{parts.netloc}"


# --- model ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subscription:
    app_key: str  # "<implementation>@<version>", e.g. "TableCLIAPI@1.4.0"
    action_key: str
    inputs: dict[str, Any]
    connection_id: str | int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"app_key": self.app_key, "action_key": self.action_key, "inputs": dict(self.inputs),
                "connection_id": self.connection_id}


@dataclass(frozen=True)
class Inbox:
    id: str
    key: str | None
    status: str
    paused_reason: str | None
    notification_url: str | None
    subscription: dict[str, Any]

    @classmethod
    def from_json(cls, data: Any) -> Inbox:
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise InboxProtocolError(None, "inbox answer without an id")
        key = data.get("key", data.get("name"))
        return cls(id=data["id"], key=key if isinstance(key, str) else None, status=str(data.get("status")),
                   paused_reason=data.get("paused_reason"), notification_url=data.get("notification_url"),
                   subscription=data.get("subscription") or {})


@dataclass(frozen=True)
class Message:
    id: str
    created_at: str | None
    lease_count: int
    possible_duplicate_data: bool
    error_message: str | None
    payload: dict[str, Any]

    @classmethod
    def from_json(cls, data: Any) -> Message:
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise InboxProtocolError(None, "leased message without an id")
        attrs = data.get("message_attributes") or {}
        payload = data.get("payload")
        return cls(id=data["id"], created_at=data.get("created_at"), lease_count=int(attrs.get("lease_count") or 0),
                   possible_duplicate_data=bool(attrs.get("possible_duplicate_data")),
                   error_message=attrs.get("error_message"), payload=payload if isinstance(payload, dict) else {})


@dataclass(frozen=True)
class Backlog:
    pending: int  # available + leased (at least this many when ``more``)
    oldest_created_at: str | None
    more: bool  # more messages than were counted
    other: int = 0  # messages in another state (e.g. quarantined)


@dataclass(frozen=True)
class Lease:
    lease_id: str | None
    leased_until: str | None
    messages: list[Message]
    status: str | None
    paused_reason: str | None


@dataclass(frozen=True)
class Notification:
    """A wake-up's body (``POST notification_url``, reference 2.12): ``{"inbox_id", "received_message_count",
    "redelivery"}``. ``redelivery`` true: Zapier re-sent the notification by hand after a delivery outage, and
    ``received_message_count`` is then a placeholder, not a count: the backlog may be any size."""

    inbox_id: str | None
    received_message_count: int | None
    redelivery: bool

    @classmethod
    def read(cls, body: bytes) -> Notification | None:
        """The notification in ``body``, or None when it is not one (a wake-up is never refused for its body:
        it only says "look in your inbox")."""
        try:
            data = json.loads(body) if body else None
        except ValueError:
            return None
        if not isinstance(data, dict) or not any(k in data for k in ("inbox_id", "received_message_count",
                                                                      "redelivery")):
            return None
        count = data.get("received_message_count")
        inbox = data.get("inbox_id")
        return cls(inbox if isinstance(inbox, str) else None,
                   count if isinstance(count, int) and not isinstance(count, bool) else None,
                   data.get("redelivery") is True)

    def expected(self) -> int | None:
        """How many messages the wake-up announces: None for a redelivery (the count is a placeholder)."""
        return None if self.redelivery else self.received_message_count


# --- client --------------------------------------------------------------------------------------------


class InboxClient:
    """``base_url``: the public API's host; ``prefix``: one of :data:`INBOX_PREFIXES`; ``sdk_url``: the SDK's
    host, for the app-metadata lookups only (default ``base_url``)."""

    def __init__(self, base_url: str, auth: Auth, *, timeout_s: float = 10.0, max_attempts: int = 4,
                 backoff_factor: float = 0.5, prefix: str = DEFAULT_PREFIX, sdk_url: str | None = None) -> None:
        if prefix.rstrip("/") not in INBOX_PREFIXES:
            raise ValueError(f"inbox path prefix {prefix!r}: expected one of {', '.join(INBOX_PREFIXES)}")
        self.base_url = api_origin(base_url)
        self.sdk_url = api_origin(sdk_url) if sdk_url else self.base_url
        self.inbox_path = prefix.rstrip("/") + "/inboxes"
        self._auth = auth
        self._timeout_s = timeout_s
        self._session = _session(list(dict.fromkeys([self.base_url, self.sdk_url])), max_attempts, backoff_factor)

    @classmethod
    def for_tables(cls, tables: Any, **kwargs: Any) -> InboxClient:
        """An inbox client on the public API host and OAuth token provider of a
        :class:`shared.adapters.zapier_tables.TablesClient` (its SDK host for the app lookups)."""
        kwargs.setdefault("timeout_s", tables.timeout_s)
        kwargs.setdefault("sdk_url", tables.base_url)
        return cls(getattr(tables, "api_url", tables.base_url), TokenSourceAuth(tables.tokens), **kwargs)

    def __repr__(self) -> str:
        return f"InboxClient({self.base_url!r}, {self.inbox_path!r})"

    def __enter__(self) -> InboxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    # inboxes
    def list(self, key: str | None = None, limit: int = 100) -> list[Inbox]:
        params: dict[str, Any] = {"limit": limit}
        if key is not None:
            params["key"] = key
        data = self._call("GET", self.inbox_path, "list inboxes", params=params)
        results = data.get("results")
        if not isinstance(results, list):
            raise InboxProtocolError(None, "list inboxes: no results list")
        return [Inbox.from_json(r) for r in results]

    def find(self, key: str) -> Inbox | None:
        found = [i for i in self.list(key=key, limit=2) if i.key == key]
        return found[0] if found else None

    def create(self, key: str, subscription: Subscription, notification_url: str | None) -> Inbox:
        body = {"key": key, "subscription": subscription.to_json(), "notification_url": notification_url}
        return Inbox.from_json(self._call("POST", self.inbox_path, "create inbox", json=body))

    def get(self, inbox_id: str) -> Inbox:
        return Inbox.from_json(self._call("GET", self._inbox(inbox_id), "get inbox"))

    def update(self, inbox_id: str, notification_url: str | None) -> Inbox:
        return Inbox.from_json(self._call("PATCH", self._inbox(inbox_id), "update inbox",
                                          json={"notification_url": notification_url}))

    def delete(self, inbox_id: str) -> None:
        self._call("DELETE", self._inbox(inbox_id), "delete inbox")

    def pause(self, inbox_id: str) -> Inbox:
        return Inbox.from_json(self._call("POST", self._inbox(inbox_id) + "/pause", "pause inbox"))

    def resume(self, inbox_id: str) -> Inbox:
        return Inbox.from_json(self._call("POST", self._inbox(inbox_id) + "/resume", "resume inbox"))

    # messages
    def messages(self, inbox_id: str, limit: int = 100) -> list[dict[str, Any]]:
        data = self._call("GET", self._inbox(inbox_id) + "/messages", "list messages", params={"limit": limit})
        return list(data.get("results") or [])

    def backlog(self, inbox_id: str, limit: int = 1000) -> Backlog:
        """How many messages wait in the inbox (available or leased; counted up to ``limit``) and when the
        oldest arrived: the inbox path's backlog, for ``zsync status`` and ``zsync doctor``."""
        data = self._call("GET", self._inbox(inbox_id) + "/messages", "list messages", params={"limit": limit})
        results = [m for m in data.get("results") or [] if isinstance(m, dict)]
        waiting = [m for m in results if m.get("status") in (None, "available", "leased")]
        created = sorted(str(m["created_at"]) for m in waiting if m.get("created_at"))
        return Backlog(len(waiting), created[0] if created else None, bool(data.get("next")),
                       len(results) - len(waiting))

    def lease(self, inbox_id: str, limit: int = DEFAULT_LEASE_LIMIT, lease_seconds: int = DEFAULT_LEASE_SECONDS
              ) -> Lease:
        """Lease up to ``limit`` (1-100) messages for ``lease_seconds`` (1-3600); outside: ValueError, no request."""
        for name, value, high in (("lease_limit", limit, LEASE_LIMIT_MAX), ("lease_seconds", lease_seconds,
                                                                              LEASE_SECONDS_MAX)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise ValueError(f"{name}: expected an integer from 1 to {high}, got {value!r}")
        data = self._call("POST", self._inbox(inbox_id) + "/messages/lease", "lease messages",
                          json={"lease_limit": limit, "lease_seconds": lease_seconds})
        attrs = data.get("inbox_attributes") or {}
        return Lease(lease_id=data.get("lease_id"), leased_until=data.get("leased_until"),
                     messages=[Message.from_json(m) for m in data.get("results") or []],
                     status=attrs.get("status"), paused_reason=attrs.get("paused_reason"))

    def ack(self, inbox_id: str, lease_id: str, message_ids: list[str] | None = None) -> None:
        self._settle("ack", inbox_id, lease_id, message_ids)

    def release(self, inbox_id: str, lease_id: str, message_ids: list[str] | None = None) -> None:
        self._settle("release", inbox_id, lease_id, message_ids)

    def _settle(self, op: str, inbox_id: str, lease_id: str, message_ids: list[str] | None) -> None:
        body: dict[str, Any] = {"lease_id": lease_id}
        if message_ids is not None:
            body["message_ids"] = message_ids
        self._call("POST", self._inbox(inbox_id) + f"/messages/{op}", f"{op} messages", json=body)

    # app actions (to find the Tables trigger's action key)
    def tables_implementation(self) -> str:
        """``TableCLIAPI@<version>``: the current version of the Zapier Tables app."""
        data = self._call("GET", IMPLEMENTATIONS_LOOKUP_PATH, "look up the Zapier Tables app", sdk=True,
                          params={"selected_apis": TABLES_IMPLEMENTATION})
        for item in data.get("results") or []:
            ident = item.get("id") or item.get("current_implementation_id")
            if isinstance(ident, str) and ident.startswith(TABLES_IMPLEMENTATION + "@"):
                return ident
        raise InboxProtocolError(None, f"the app lookup did not return {TABLES_IMPLEMENTATION}@<version>")

    def read_actions(self, selected_api: str) -> list[dict[str, Any]]:
        """The app's actions of type ``read`` (its triggers): ``[{key, name, description, ...}]``."""
        data = self._call("GET", IMPLEMENTATIONS_PATH, "list the app's actions", sdk=True,
                          params={"global": "true", "public_only": "false", "selected_apis": selected_api})
        actions = []
        for impl in data.get("results") or []:
            for action in impl.get("actions") or []:
                if isinstance(action, dict) and action.get("type") == "read" and isinstance(action.get("key"), str):
                    actions.append(action)
        return actions

    # plumbing
    def _inbox(self, inbox_id: str) -> str:
        return f"{self.inbox_path}/{quote(inbox_id, safe='')}"

    def _call(self, method: str, path: str, what: str, *, sdk: bool = False, **kwargs: Any) -> dict[str, Any]:
        source = getattr(self._auth, "source", None)
        origin = self.sdk_url if sdk else self.base_url
        for attempt in (1, 2):
            try:
                headers = {"Authorization": self._auth.authorization()}
                response = self._session.request(method, origin + path, headers=headers,
                                                 timeout=self._timeout_s, **kwargs)
            except TransportError as exc:
                raise InboxUnavailable(None, f"{what}: {exc.cause}") from None
            except TablesError as exc:  # from the token provider (token endpoint down, credentials refused)
                status = getattr(exc, "status", None)
                kind = InboxUnavailable if status is None or status == 429 or status >= 500 else InboxError
                raise kind(status, f"{what}: token: {exc}") from None
            if response.status == 401 and attempt == 1 and getattr(source, "refreshable", False):
                source.invalidate()  # expired or revoked: fetch a new token once
                continue
            return self._answer(response, what)
        raise AssertionError("unreachable")

    @staticmethod
    def _answer(response: BaseHTTPResponse, what: str) -> dict[str, Any]:
        status = response.status
        try:
            data = json_of(response) if response.data else {}
        except ValueError:
            data = None
        if 200 <= status < 300:
            if status == 204:
                return {}
            if not isinstance(data, dict):
                raise InboxProtocolError(status, f"{what}: answer is not a JSON object")
            return data
        text, code = _error_of(data, response)
        message = f"{what}: {text}"
        if status == 400 and code == "lease_expired":
            raise LeaseExpired(status, message, code)
        if status == 404:
            raise InboxNotFound(status, message, code)
        if status == 409:
            paused = (data or {}).get("inbox_attributes", {}) if isinstance(data, dict) else {}
            reason = paused.get("paused_reason") if isinstance(paused, dict) else None
            raise InboxConflict(status, message + (f" (paused_reason: {reason})" if reason else ""), code)
        if status == 429 or status >= 500:
            raise InboxUnavailable(status, message, code)
        raise InboxError(status, message, code)


def _error_of(data: Any, response: BaseHTTPResponse) -> tuple[str, str | None]:
    """The message and code of an error answer: ``{"errors": [{"code", "detail"}]}``, ``{"detail"}`` or
    ``{"error"}``."""
    if isinstance(data, dict):
        errors = data.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            first = errors[0]
            return str(first.get("detail") or first.get("title") or first.get("code"))[:_MESSAGE_MAX], first.get("code")
        for key in ("detail", "error"):
            if isinstance(data.get(key), str):
                return data[key][:_MESSAGE_MAX], data.get("code")
    return (text_of(response).strip() or response.reason or "no message")[:_MESSAGE_MAX], None
