"""Knobs that make the Tables stand-in differ from what zsync assumes of zapier.com, so the tests of
``zsync doctor --live`` (``tests/test_doctor_live.py``) can show each difference is noticed.

``POST /_admin/quirks`` with any of:

* ``"freeze_edited_at": true`` - an update that changes a record leaves its ``edited_at`` as it was
  (a person's cell edit keeping ``updated_at`` could then not win);
* ``"idempotency": false`` - the public API ignores ``Idempotency-Key`` (a retried create makes a second
  record);
* ``"rate_limit": n | null`` and ``"rate_window_s": s`` - the per-table rate limit (null: none);
* ``"token_ttl_s": n`` - the lifetime of the tokens issued from now on;
* ``"jwt_life_s": n | null`` - tokens issued from now on are JWT-shaped, their ``exp`` ``n`` seconds after
  their ``iat`` (whatever ``expires_in`` says); null: opaque tokens again;
* ``"next_edited_at": {"<record id>": "<ISO time>"}`` - the next update that changes that record is stamped
  with that ``edited_at`` (once): a write that stamped its time when it started, then waited for the record's
  lock while another write landed. The stand-in's writes stamp before they lock, so under load this happens
  by itself; the knob makes it happen on purpose (``tests/test_write_race.py``). ``{}`` clears them;
* ``"extra_triggers": [{"key", "name", "description"?}]`` - more read actions (triggers) in the Tables
  app's action list, as zapier.com lists six events where the stand-in has two (an inbox on one of them is
  still refused: the stand-in does not deliver them).

``GET /_admin/quirks`` answers the current values. The defaults are the faithful stand-in."""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, jsonify, request

from infra.local.tables_service.context import ServiceContext
from infra.local.tables_service.errors import ApiError
from infra.local.tables_service.routes import object_body
from infra.local.trigger_inbox_service import META_PATH


@dataclass
class Quirks:
    freeze_edited_at: bool = False
    idempotency: bool = True
    extra_triggers: list[dict[str, Any]] = field(default_factory=list)
    jwt_life_s: int | None = None
    next_edited_at: dict[str, str] = field(default_factory=dict)


def _triggers(body: dict[str, Any], current: list[dict[str, Any]]) -> list[dict[str, Any]]:
    value = body.get("extra_triggers", current)
    ok = isinstance(value, list) and all(
        isinstance(a, dict) and isinstance(a.get("key"), str) and isinstance(a.get("name"), str) for a in value)
    if not ok:
        raise ApiError(400, 'extra_triggers must be a list of {"key": str, "name": str}')
    return [{"key": a["key"], "name": a["name"], "type": "read", "description": str(a.get("description", ""))}
            for a in value]


def _flag(body: dict[str, Any], name: str, current: bool) -> bool:
    value = body.get(name, current)
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false")
    return value


def _timestamp(value: Any) -> str:
    """An ISO 8601 time with its zone, as the stand-in writes ``edited_at``."""
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else None
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise ApiError(400, f"next_edited_at: {value!r} is not an ISO 8601 time with a zone")
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # as values.utc_now_iso


def _positive(body: dict[str, Any], name: str, current: Any, *, nullable: bool = False) -> Any:
    if name not in body:
        return current
    value = body[name]
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ApiError(400, f"{name} must be a positive number" + (" or null" if nullable else ""))
    return value


def register_quirks(app: Flask, ctx: ServiceContext) -> Quirks:
    """The knobs, their ``/_admin/quirks`` endpoint and their hooks (register before the gate and the
    public API, so an ignored Idempotency-Key is gone before the replay cache looks)."""
    quirks = Quirks()
    replace = ctx.engine._replace  # the one write of a changed record's edited_at (update_many)

    def replace_keeping_edited_at(conn: sqlite3.Connection, table_id: str, record: dict[str, Any]) -> None:
        if record["id"] in quirks.next_edited_at:
            record["edited_at"] = quirks.next_edited_at.pop(record["id"])  # in place, as below
        elif quirks.freeze_edited_at:
            row = conn.execute("SELECT edited_at FROM records WHERE table_id = ? AND id = ?",
                               (table_id, record["id"])).fetchone()
            if row is not None:
                record["edited_at"] = row[0]  # in place: the answer's changeset shows it too
        replace(conn, table_id, record)

    ctx.engine._replace = replace_keeping_edited_at  # type: ignore[method-assign]
    issue = ctx.issue_token

    def issue_jwt_shaped() -> str:
        token = issue()
        if quirks.jwt_life_s is None:
            return token
        now = int(time.time())
        claims = {"iat": now, "exp": now + quirks.jwt_life_s, "scope": "external"}
        jwt = ".".join(base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")
                       for part in ({"alg": "none", "typ": "JWT"}, claims)) + "." + token
        ctx.tokens[jwt] = ctx.tokens[token]  # accepted as long as the token it wraps
        return jwt

    ctx.issue_token = issue_jwt_shaped  # type: ignore[method-assign]

    @app.before_request
    def _ignore_idempotency_key() -> None:
        if not quirks.idempotency:
            request.environ.pop("HTTP_IDEMPOTENCY_KEY", None)

    @app.after_request
    def _more_triggers(response: Response) -> Response:
        if quirks.extra_triggers and request.path == META_PATH + "/implementations/" and response.status_code == 200:
            body = response.get_json()
            for impl in body.get("results") or []:
                impl["actions"] += [a | {"selected_api": impl.get("selected_api")} for a in quirks.extra_triggers]
            response.set_data(json.dumps(body))
        return response

    @app.get("/_admin/quirks")
    def get_quirks() -> Response:
        return jsonify(asdict(quirks) | {"rate_limit": ctx.limiter.limit, "rate_window_s": ctx.limiter.window_s,
                                         "token_ttl_s": ctx.token_ttl_s})

    @app.post("/_admin/quirks")
    def set_quirks() -> Response:
        body = object_body()
        unknown = set(body) - {"freeze_edited_at", "idempotency", "rate_limit", "rate_window_s", "token_ttl_s",
                               "extra_triggers", "jwt_life_s", "next_edited_at"}
        if unknown:
            raise ApiError(400, f"unknown quirk(s): {', '.join(sorted(unknown))}")
        freeze = _flag(body, "freeze_edited_at", quirks.freeze_edited_at)
        idempotency = _flag(body, "idempotency", quirks.idempotency)
        limit = _positive(body, "rate_limit", ctx.limiter.limit, nullable=True)
        window = _positive(body, "rate_window_s", ctx.limiter.window_s)
        ttl = _positive(body, "token_ttl_s", ctx.token_ttl_s)
        quirks.extra_triggers = _triggers(body, quirks.extra_triggers)
        jwt_life = _positive(body, "jwt_life_s", quirks.jwt_life_s, nullable=True)
        quirks.jwt_life_s = int(jwt_life) if jwt_life is not None else None
        quirks.freeze_edited_at, quirks.idempotency = freeze, idempotency
        stamps = body.get("next_edited_at", quirks.next_edited_at)
        if not isinstance(stamps, dict) or not all(isinstance(k, str) for k in stamps):
            raise ApiError(400, 'next_edited_at must be {"<record id>": "<ISO time>"}')
        quirks.next_edited_at = {k: _timestamp(v) for k, v in stamps.items()}
        ctx.limiter.limit = int(limit) if limit is not None else None
        ctx.limiter.window_s, ctx.token_ttl_s = float(window), int(ttl)
        return get_quirks()

    return quirks
