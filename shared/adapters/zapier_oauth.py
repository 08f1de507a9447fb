"""The Zapier OAuth token: where a Tables or trigger-inbox call gets its ``Authorization: Bearer`` header.

``POST https://zapier.com/oauth/token/`` (form: ``grant_type=client_credentials``, ``client_id``,
``client_secret``, ``scope=external``, ``audience=zapier.com``) answers ``{"access_token", "expires_in"}``.
:class:`TokenSource` keeps one token per process (per token URL and client id), fetches a new one
:data:`TOKEN_REFRESH_MARGIN_S` before expiry and drops it after a 401; a token made by the user is used as
it is. :class:`TokenSourceAuth` turns it into the header for :class:`shared.adapters.zapier_tables.TablesClient`
and :class:`shared.adapters.trigger_inbox.InboxClient`. The token never appears in exception messages,
reprs or logs.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from urllib3.util.retry import Retry

from shared.adapters.zapier_errors import TablesAuthError, TablesProtocolError, TablesUnavailable, raise_for_status
from shared.platform.http_client import Pool, TransportError, json_of

DEFAULT_TOKEN_URL = "https://zapier.com/oauth/token/"
DEFAULT_TOKEN_TTL_S = 3600.0
TOKEN_REFRESH_MARGIN_S = 300.0  # fetch a new token this long before the old one expires


@dataclass
class _CachedToken:
    value: str
    expires_at: float  # time.monotonic()


_TOKENS: dict[tuple[str, str], _CachedToken] = {}  # per process: (token URL, client id) -> token
_TOKENS_LOCK = threading.Lock()


class TokenSource:
    """Where the bearer token comes from: a fixed token, or OAuth client credentials (cached per process,
    refreshed :data:`TOKEN_REFRESH_MARGIN_S` before expiry, dropped by :meth:`invalidate` after a 401)."""

    def __init__(
        self,
        *,
        token: str | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
        token_url: str = DEFAULT_TOKEN_URL,
        timeout_s: float = 10.0,
    ) -> None:
        if not token and not (client_id and client_secret):
            raise ValueError("Zapier Tables needs ZSYNC_ZAPIER_CLIENT_ID + ZSYNC_ZAPIER_CLIENT_SECRET "
                             "(or a token in ZSYNC_TABLES_TOKEN)")
        self._static = token
        self._client_id, self._client_secret = client_id, client_secret
        self.token_url = token_url
        self._timeout_s = timeout_s
        self._pool: Pool | None = None  # made at the first fetch (a static token never needs it)
        self.fetches = 0

    @property
    def refreshable(self) -> bool:
        return self._static is None

    def __repr__(self) -> str:
        return f"TokenSource(client_id={self._client_id!r}, secret=***)"

    def get(self) -> str:
        if self._static is not None:
            return self._static
        key = (self.token_url, self._client_id or "")
        with _TOKENS_LOCK:
            cached = _TOKENS.get(key)
            if cached is not None and cached.expires_at - TOKEN_REFRESH_MARGIN_S > time.monotonic():
                return cached.value
            cached = self._fetch()
            _TOKENS[key] = cached
            return cached.value

    def close(self) -> None:
        """Drop the token endpoint's connections (the pool reconnects if a fetch follows)."""
        if self._pool is not None:
            self._pool.close()

    def invalidate(self) -> None:
        if self._static is None:
            with _TOKENS_LOCK:
                _TOKENS.pop((self.token_url, self._client_id or ""), None)

    def _fetch(self) -> _CachedToken:
        self.fetches += 1
        form = {"grant_type": "client_credentials", "client_id": self._client_id,
                "client_secret": self._client_secret, "scope": "external", "audience": "zapier.com"}
        if self._pool is None:
            self._pool = Pool(Retry(0, read=False, redirect=False), [self.token_url])  # one attempt, as before
        try:
            response = self._pool.request("POST", self.token_url, form=form, timeout=self._timeout_s)
        except TransportError as exc:
            raise TablesUnavailable(None, f"token endpoint: {exc.cause}") from None
        if response.status in (400, 401, 403):
            raise TablesAuthError(response.status, "token endpoint refused the client credentials "
                                  "(check ZSYNC_ZAPIER_CLIENT_ID / ZSYNC_ZAPIER_CLIENT_SECRET)")
        raise_for_status(response, "token endpoint", 0.0)
        try:
            payload = json_of(response)
            token = payload["access_token"]
            expires_in = float(payload.get("expires_in") or DEFAULT_TOKEN_TTL_S)
        except (ValueError, KeyError, TypeError):
            raise TablesProtocolError(response.status, "token endpoint: no access_token in the answer") from None
        if not isinstance(token, str) or not token:
            raise TablesProtocolError(response.status, "token endpoint: access_token is not a string")
        return _CachedToken(token, time.monotonic() + expires_in)


class TokenSourceAuth:
    """``Authorization: Bearer <token>`` from a token provider with ``get()``, ``invalidate()`` and
    ``refreshable`` (a :class:`TokenSource`): a :class:`shared.platform.http_client.Auth` for the Tables and inbox
    clients."""

    def __init__(self, source: TokenSource) -> None:
        self.source = source

    def authorization(self) -> str:
        return f"Bearer {self.source.get()}"

    def __repr__(self) -> str:
        return "<TokenSourceAuth ***>"
