"""Sending one request of the local pg_net stand-in: a row taken from ``net.http_request_queue``
(:class:`QueuedRequest`) is sent exactly once, never retried (pg_net has no retries: pg_net issue 110), and
described as the :class:`Outcome` pg_net records in ``net._http_response``: an HTTP answer (any status) as
``(status_code, content, headers, content_type)``, a transport failure as ``error_msg`` only, in curl's
wording (the ``ERR_*`` texts, "Timeout of 1000 ms reached. ..."). :func:`send_request` never raises.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import requests

logger = logging.getLogger("zsync.pgnet_sender")

USER_AGENT = "pg_net/zsync-local-standin"

# curl_easy_strerror() wording, which is what pg_net stores in net._http_response.error_msg.
ERR_COULDNT_CONNECT = "Couldn't connect to server"
ERR_COULDNT_RESOLVE = "Couldn't resolve host name"
ERR_BAD_URL = "URL using bad/illegal format or missing URL"
ERR_UNSUPPORTED_PROTOCOL = "Unsupported protocol"
ERR_RECV = "Failure when receiving data from the peer"
ERR_BAD_ARGUMENT = "A libcurl function was given a bad argument"
ERR_DROPPED = "Connection lost (dropped by fault injection)"


@dataclass(frozen=True)
class QueuedRequest:
    id: int
    method: Any
    url: Any
    headers: Any
    body: bytes | None
    timeout_milliseconds: Any


@dataclass(frozen=True)
class Outcome:
    """What to record in net._http_response for one request (pg_net's two shapes)."""

    id: int
    status_code: int | None = None
    content_type: str | None = None
    headers: dict[str, str] | None = None
    content: str | None = None
    error_msg: str | None = None
    timed_out: bool = False  # for counters/logs; pg_net stores timed_out only on success (false)
    elapsed_ms: float = 0.0

    @property
    def is_response(self) -> bool:
        return self.error_msg is None


def _header_text(value: Any) -> str:
    """A jsonb header value as jsonb_each_text() renders it (what pg_net puts on the wire)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _pg_text(value: str) -> str:
    return value.replace("\x00", "")  # Postgres text cannot hold NUL


def _timeout_msg(timeout_ms: int, elapsed_ms: float) -> str:
    return f"Timeout of {timeout_ms} ms reached. Total time: {elapsed_ms:f} ms"


def send_request(req: QueuedRequest) -> Outcome:
    """Send one queued request exactly once (no retries) and describe the outcome. Never raises."""
    started = time.monotonic()

    def elapsed() -> float:
        return (time.monotonic() - started) * 1000.0

    def failure(msg: str, *, timed_out: bool = False) -> Outcome:
        return Outcome(id=req.id, error_msg=msg, timed_out=timed_out, elapsed_ms=elapsed())

    try:
        method = str(req.method).upper()
        url = str(req.url)
        if not isinstance(req.headers, dict):
            return failure(ERR_BAD_ARGUMENT)
        headers = {"User-Agent": USER_AGENT}
        for key, value in req.headers.items():
            if value is not None:
                headers[str(key)] = _header_text(value)
        timeout_ms = int(req.timeout_milliseconds)
        if timeout_ms < 0:
            return failure(ERR_BAD_ARGUMENT)
        timeout_s: float | None = timeout_ms / 1000.0 if timeout_ms > 0 else None  # curl: 0 = no timeout
        deadline = started + timeout_s if timeout_s is not None else None

        with requests.Session() as session:  # fresh connection per request: no stale keep-alive
            session.trust_env = False
            resp = session.request(
                method,
                url,
                headers=headers,
                data=req.body,
                timeout=(timeout_s, timeout_s),
                allow_redirects=False,  # pg_net does not follow redirects
                stream=True,
            )
            with resp:
                chunks: list[bytes] = []
                for chunk in resp.iter_content(chunk_size=65536):
                    chunks.append(chunk)
                    if deadline is not None and time.monotonic() > deadline:
                        return failure(_timeout_msg(timeout_ms, elapsed()), timed_out=True)
            if deadline is not None and time.monotonic() > deadline:
                return failure(_timeout_msg(timeout_ms, elapsed()), timed_out=True)
        raw = b"".join(chunks)
        content = _pg_text(raw.decode("utf-8", errors="replace")) if raw else None
        return Outcome(
            id=req.id,
            status_code=resp.status_code,
            content_type=resp.headers.get("Content-Type"),
            headers={_pg_text(k): _pg_text(v) for k, v in resp.headers.items()},
            content=content,
            elapsed_ms=elapsed(),
        )
    except requests.Timeout:
        return failure(_timeout_msg(int(req.timeout_milliseconds), elapsed()), timed_out=True)
    except (requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema):
        return failure(ERR_UNSUPPORTED_PROTOCOL if "://" in str(req.url) else ERR_BAD_URL)
    except (requests.exceptions.InvalidURL, requests.exceptions.URLRequired):
        return failure(ERR_BAD_URL)
    except requests.ConnectionError as exc:
        text = str(exc)
        if "NameResolution" in text or "Name or service not known" in text or "nodename" in text:
            return failure(ERR_COULDNT_RESOLVE)
        if "NewConnectionError" in text or "Connection refused" in text or "Failed to establish" in text:
            return failure(ERR_COULDNT_CONNECT)
        return failure(ERR_RECV)
    except Exception as exc:  # a bad row must never take the worker down
        logger.warning("pg_net request %s could not be sent: %s", req.id, type(exc).__name__)
        return failure(ERR_BAD_ARGUMENT if isinstance(exc, (TypeError, ValueError)) else ERR_RECV)
