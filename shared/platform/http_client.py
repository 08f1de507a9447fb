"""The HTTP client of the Zapier clients (Tables API, catch hooks, trigger inboxes, OAuth token): urllib3.

``requests`` adds ~0.2 ms of CPU per call (request preparation, setting merges, cookie jar, hooks,
Response building) and ~20 ms of import to a cold start; the functions make two Zapier calls per
delivery, so they talk to urllib3 (which requests uses underneath anyway) directly.

A :class:`Pool` reads its environment once, when it is made (a function's environment does not change
while it runs):

* proxies: ``<scheme>_proxy`` / ``ALL_PROXY`` (lower case first, as curl and requests do) for the origins
  the pool will call, unless ``NO_PROXY`` names the host (``*``, a domain and its subdomains, an optional
  ``:port``; read by :mod:`urllib.request`). An origin with a proxy goes through a
  ``ProxyManager`` (``CONNECT`` tunnel for https), every other URL directly;
* the CA bundle: ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE`` or ``SSL_CERT_FILE`` (a file or a directory),
  else certifi's bundle when installed (what requests used), else the system store.

:meth:`Pool.request` sends one request with the pool's urllib3 ``Retry`` (or the one given), never
follows redirects, bounds the connect and each socket read by ``timeout``, and returns the urllib3
response with its body read (the connection is back in the pool). Transport failures (connection
refused, timeouts, TLS, proxy, retries exhausted) raise :class:`TransportError`, whose ``cause`` is the
name of the underlying error without any URL (hook URLs are credentials).
"""

from __future__ import annotations

import json as jsonlib
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlencode, urlsplit
from urllib.request import getproxies_environment, proxy_bypass_environment

import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError

if TYPE_CHECKING:
    from urllib3.response import BaseHTTPResponse
    from urllib3.util.retry import Retry

USER_AGENT = f"zsync (urllib3/{urllib3.__version__})"
POOL_MAXSIZE = 10  # connections kept per host (requests' default); more threads open extra ones
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")


class TransportError(Exception):
    """No HTTP answer: connection refused, timeout, TLS or proxy failure, retries exhausted, a body that
    cannot be encoded. ``cause`` names the underlying error (e.g. ``NewConnectionError``), never a URL."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


class Auth(Protocol):
    """Something that yields the value of the ``Authorization`` header (fetched per request)."""

    def authorization(self) -> str: ...


# --- environment -----------------------------------------------------------------------------------------


def environ_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``None``: go direct, e.g. because of ``NO_PROXY``),
    read by the standard library as curl reads it: ``<scheme>_proxy`` (lower case first), ``ALL_PROXY``,
    and ``NO_PROXY`` (``*``, a host and its subdomains, an optional ``:port``)."""
    parts = urlsplit(url)
    if not parts.hostname:
        return None
    proxies = getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or proxy_bypass_environment(parts.netloc.rpartition("@")[2], proxies):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def ca_bundle() -> dict[str, str]:
    """urllib3's ``ca_certs``/``ca_cert_dir`` from the environment, else certifi's bundle, else nothing."""
    for name in CA_BUNDLE_VARIABLES:
        path = os.environ.get(name)
        if path:
            return {"ca_cert_dir": path} if os.path.isdir(path) else {"ca_certs": path}
    try:
        import certifi
    except ImportError:  # pragma: no cover - certifi comes with the dependencies
        return {}
    return {"ca_certs": certifi.where()}


def _proxy_manager(proxy: str, tls: dict[str, str]) -> urllib3.ProxyManager:
    """A manager sending through ``proxy``; ``user:password@`` in its URL becomes Proxy-Authorization."""
    parts = urlsplit(proxy)
    headers = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers = urllib3.make_headers(proxy_basic_auth=credentials)
        proxy = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    return urllib3.ProxyManager(proxy, maxsize=POOL_MAXSIZE, proxy_headers=headers, **tls)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


# --- the pool ----------------------------------------------------------------------------------------------


class Pool:
    """Keep-alive connections for the URLs a client will call, retrying with ``retry``."""

    def __init__(self, retry: Retry, urls: Iterable[str]) -> None:
        self.retry = retry
        tls = ca_bundle()
        self._direct = urllib3.PoolManager(maxsize=POOL_MAXSIZE, **tls)
        self._proxied: dict[str, urllib3.ProxyManager] = {}  # origin -> its proxy's manager
        by_proxy: dict[str, urllib3.ProxyManager] = {}
        for url in urls:
            proxy = environ_proxy(url)
            if proxy:
                if proxy not in by_proxy:
                    by_proxy[proxy] = _proxy_manager(proxy, tls)
                self._proxied[_origin(url)] = by_proxy[proxy]

    def proxy_for(self, url: str) -> str | None:
        """The proxy URL requests to ``url`` go through (None: direct)."""
        manager = self._proxied.get(_origin(url))
        return None if manager is None else str(manager.proxy.url)

    def close(self) -> None:
        self._direct.clear()
        for manager in self._proxied.values():
            manager.clear()

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: object = None,
        form: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float,
        retries: Retry | None = None,
    ) -> BaseHTTPResponse:
        """Send one request (with retries); ``json`` or ``form`` is the body, ``None`` values are left out
        of ``params`` and ``form``. Raises :class:`TransportError` when no answer came."""
        if params:
            query = urlencode([(k, v) for k, v in params.items() if v is not None])
            if query:
                url += ("&" if "?" in url else "?") + query
        all_headers = {"User-Agent": USER_AGENT, "Accept": "application/json", "Accept-Encoding": "gzip, deflate"}
        body: bytes | None = None
        if json is not None:
            try:
                body = jsonlib.dumps(json, allow_nan=False).encode()
            except (TypeError, ValueError) as exc:
                raise TransportError(type(exc).__name__) from None
            all_headers["Content-Type"] = "application/json"
        elif form is not None:
            body = urlencode([(k, v) for k, v in form.items() if v is not None]).encode()
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
        if headers:
            all_headers.update(headers)
        manager = self._proxied.get(_origin(url), self._direct) if self._proxied else self._direct
        try:
            return manager.urlopen(method, url, body=body, headers=all_headers, timeout=timeout,
                                   retries=retries or self.retry, redirect=False)
        except MaxRetryError as exc:
            raise TransportError(type(exc.reason or exc).__name__) from None
        except HTTPError as exc:
            raise TransportError(type(exc).__name__) from None
        except OSError as exc:
            raise TransportError(type(exc).__name__) from None


# --- reading answers ---------------------------------------------------------------------------------------


def text_of(response: BaseHTTPResponse) -> str:
    """The body as text (the charset of ``Content-Type``, UTF-8 by default; undecodable bytes replaced)."""
    charset = "utf-8"
    content_type = response.headers.get("Content-Type", "")
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "charset" and value:
            charset = value.strip('"')
    try:
        return response.data.decode(charset, "replace")
    except LookupError:
        return response.data.decode("utf-8", "replace")


def json_of(response: BaseHTTPResponse) -> Any:
    """The body parsed as JSON; ``ValueError`` when it is not JSON."""
    return jsonlib.loads(response.data)
