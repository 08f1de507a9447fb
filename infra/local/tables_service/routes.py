"""The Tables stand-in's HTTP API, the same paths and shapes as ``https://sdkapi.zapier.com``: Zapier's
OAuth token endpoint (client credentials), the tables/fields/records endpoints under :data:`API_PREFIX`,
the profile the SDK reads, a quiet 204 for anything else (the SDK's telemetry); the gate every Tables API
and trigger-inbox request passes (count, injected faults, auth, per-table rate limit); reading request
bodies; and how errors are answered (an error status with Zapier's body, or a refusal inside a 200)."""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from typing import Any, NoReturn

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from infra.local.tables_service.context import ServiceContext
from infra.local.tables_service.errors import ApiError, RefusedRequest
from infra.local.tables_service.public_api import (
    PUBLIC_PREFIX,
    api_error_as_v2,
    is_public_path,
    refused_as_v2,
    v2_error_response,
)
from infra.local.tables_service.store import USER_ID
from infra.local.tables_service.values import Data, uuid_to_ulid
from infra.local.trigger_inbox_service import INBOX_PATH, META_PATH, PUBLIC_INBOX_PATHS

log = logging.getLogger(__name__)

API_PREFIX = "/api/v0/sdk/tables/api/v1"
TOKEN_PATH = "/oauth/token/"
BATCH_MAX = 100
MAX_BODY_BYTES = 1024 * 1024
MAX_FIELDS = 200


# --- request parsing and validation --------------------------------------------------------------------


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _json_body() -> Any:
    raw = request.get_data(cache=True)
    if not raw:
        raise ApiError(400, "request body is empty; expected a JSON object")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {str(exc)[:120]}") from None


def object_body() -> Data:
    body = _json_body()
    if not isinstance(body, dict):
        raise ApiError(400, "expected a JSON object")
    return body


def _list_of(body: Data, key: str, limit: int = BATCH_MAX) -> list[Any]:
    items = body.get(key)
    if not isinstance(items, list) or not 1 <= len(items) <= limit:
        raise ApiError(400, f"{key} must be a list of 1 to {limit} items")
    return items


def _record_data(item: Any, where: str) -> Data:
    data = item.get("data") if isinstance(item, dict) else None
    if not isinstance(data, dict):
        raise ApiError(400, f'{where} must be {{"data": {{"f<id>": value}}}}')
    if len(data) > MAX_FIELDS:
        raise ApiError(400, f"{where}.data has more than {MAX_FIELDS} fields")
    return data


def _trash() -> str:
    trash = request.args.get("trash", "exclude")
    if trash not in ("exclude", "include", "only"):
        raise ApiError(400, "trash must be exclude, include or only")
    return trash


def _int_arg(name: str, default: int, high: int) -> int:
    value = request.args.get(name)
    if value is None:
        return default
    if not value.isdigit() or int(value) > high:
        raise ApiError(400, f"{name} must be an integer from 0 to {high}")
    return int(value)


def _drain_input(limit: int = 16 * MAX_BODY_BYTES) -> None:
    """Read (and drop) an oversized body so the client sees our 413 instead of a connection reset."""
    stream = request.environ.get("wsgi.input")
    remaining = min(request.content_length or 0, limit)
    while stream is not None and remaining > 0:
        chunk = stream.read(min(remaining, 65536))
        if not chunk:
            return
        remaining -= len(chunk)


# --- answering errors ----------------------------------------------------------------------------------


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    if is_public_path(request.path):
        return v2_error_response(status, "error", message, headers=dict(headers or {}))
    response = jsonify(errors=[{"status": status, "title": message}], error=message)
    response.status_code = status
    response.headers.update(dict(headers or {}))
    return response


def _refused(exc: RefusedRequest) -> Response:
    return jsonify(data=[], meta={"errors": [exc.error]})


def register_errors(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        if is_public_path(request.path):
            return api_error_as_v2(exc)
        return _error(exc.status, exc.message, exc.headers)

    @app.errorhandler(RefusedRequest)
    def _refused_request(exc: RefusedRequest) -> Response:
        return refused_as_v2(exc) if is_public_path(request.path) else _refused(exc)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge) -> Response:
        _drain_input()
        return _error(413, f"request body larger than {app.config['MAX_CONTENT_LENGTH']} bytes")

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return _error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("tables service: unexpected error")
        return _error(500, "internal error")


# --- the gate, the token endpoint and the Tables API ---------------------------------------------------


def _check_auth(ctx: ServiceContext) -> None:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() not in ("bearer", "jwt") or not ctx.token_ok(given.strip()):
        raise ApiError(401, "missing, invalid or expired token", {"WWW-Authenticate": "Bearer"})


# Tables API (SDK path and public v2), trigger inboxes (both) and the app metadata the inbox setup reads:
# all need a token.
_GATED = (API_PREFIX + "/", PUBLIC_PREFIX + "/", INBOX_PATH, *PUBLIC_INBOX_PATHS, META_PATH + "/implementations")
_TABLE_IN_PATH = re.compile(
    f"(?:{re.escape(API_PREFIX)}|{re.escape(PUBLIC_PREFIX)})" + r"/tables/([0-9A-Za-z-]{26,36})(?:/|$)")


def _gate(ctx: ServiceContext) -> None:
    """Runs before every Tables API request: count, read the body, faults, auth, rate limit."""
    ctx.stats.count_request()
    request.get_data(cache=True)  # read the body first: an early error must not leave it unread
    if ctx.stopped:
        raise ApiError(503, "service is stopping")
    fault = ctx.faults.take(request.method)
    if fault is not None and fault.slow:
        time.sleep(fault.hang_s)  # a request that reaches Zapier late: it runs as usual, after the wait
    elif fault is not None and fault.lose_response:
        g.lose_response = fault  # the request runs; its answer is lost on the way back (register_gate)
    elif fault is not None:
        if fault.hang_s:
            time.sleep(fault.hang_s)
        if fault.status == 200:  # refused inside a 200, as Zapier does: meta.errors, nothing changed
            raise RefusedRequest("injected refusal", {"fault": "injected"})
        headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
        raise ApiError(fault.status, f"injected fault {fault.status}", headers)
    _check_auth(ctx)
    table = _TABLE_IN_PATH.match(request.path)
    table_id = uuid_to_ulid(table.group(1)) if table else None  # one limit per table, whichever path and form
    wait = ctx.limiter.take(table_id) if table_id else None
    if wait is not None:
        raise ApiError(429, f"rate limit: {ctx.limiter.limit} requests per {ctx.limiter.window_s:g}s per table",
                       {"Retry-After": str(max(1, math.ceil(wait))), "X-RateLimit-Limit": str(ctx.limiter.limit),
                        "X-RateLimit-Remaining": "0"})


def register_token_endpoint(app: Flask, ctx: ServiceContext) -> None:
    @app.post(TOKEN_PATH)
    def token() -> Response | tuple[Response, int]:
        form = request.form
        if form.get("grant_type") != "client_credentials":
            return jsonify(error="unsupported_grant_type"), 400
        ok_id = hmac.compare_digest(form.get("client_id", "").encode(), ctx.client_id.encode())
        ok_secret = hmac.compare_digest(form.get("client_secret", "").encode(), ctx.client_secret.encode())
        if not (ok_id and ok_secret):
            return jsonify(error="invalid_client"), 401
        return jsonify(access_token=ctx.issue_token(), token_type="Bearer", expires_in=ctx.token_ttl_s,
                       scope=form.get("scope", "external"))


def register_gate(app: Flask, ctx: ServiceContext) -> None:
    """The gate, as a before-request hook (register it before anything that must run behind it)."""

    @app.before_request
    def _before() -> None:
        if request.path.startswith(_GATED):
            _gate(ctx)

    @app.after_request  # registered before the Idempotency-Key cache's: runs after it (it kept the real answer)
    def _lose_response(response: Response) -> Response:
        fault = g.pop("lose_response", None)
        if fault is None:
            return response
        if fault.hang_s:
            time.sleep(fault.hang_s)  # past the client's timeout: it never sees an answer
        lost = ApiError(fault.status, f"injected fault {fault.status} (the request was applied; its answer lost)")
        return api_error_as_v2(lost) if is_public_path(request.path) else _error(lost.status, lost.message)


def register_tables_api(app: Flask, ctx: ServiceContext) -> None:
    engine = ctx.engine
    tables = API_PREFIX + "/tables"
    records = tables + "/<table_id>/records"

    @app.get(tables)
    def list_tables() -> Response:
        found, more = engine.list_tables(_int_arg("limit", 100, 1000) or 100, _int_arg("offset", 0, 10**9),
                                         request.args.get("q"))
        offset = _int_arg("offset", 0, 10**9) + len(found)
        return jsonify(data=found, links={"next": f"{request.base_url}?offset={offset}" if more else None})

    @app.post(tables)
    def create_table() -> tuple[Response, int]:
        body = object_body()
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ApiError(400, "name must be a non-empty string")
        return jsonify(data=engine.create_table(name, body.get("description"))), 201

    @app.get(tables + "/<table_id>")
    def get_table(table_id: str) -> Response:
        return jsonify(data=engine.schema(table_id).table)

    @app.delete(tables + "/<table_id>")
    def delete_table(table_id: str) -> tuple[str, int]:
        engine.delete_table(table_id)
        return "", 204

    @app.get(tables + "/<table_id>/fields")
    def list_fields(table_id: str) -> Response:
        return jsonify(data=list(engine.schema(table_id).fields.values()))

    @app.post(tables + "/<table_id>/fields")
    def create_fields(table_id: str) -> tuple[Response, int]:
        created = engine.create_fields(table_id, _list_of(object_body(), "new_fields", MAX_FIELDS))
        return jsonify(data=[{"new": f, "old": None, "kind": "created"} for f in created],
                       meta={"did_change": bool(created)}), 201

    @app.delete(tables + "/<table_id>/fields")
    def delete_fields(table_id: str) -> tuple[str, int]:
        ids = _list_of(object_body(), "field_ids", MAX_FIELDS)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ApiError(400, "field_ids must be integers")
        engine.delete_fields(table_id, ids)
        return "", 204

    @app.post(records + "/query")
    def query(table_id: str) -> Response:
        body = object_body() if request.get_data(cache=True) else {}
        found, pagination = engine.query(table_id, body, _trash())
        return jsonify(data=found, meta={"pagination": pagination})

    @app.get(records + "/<rid>")
    def get_record(table_id: str, rid: str) -> Response:
        return jsonify(data=engine.get(table_id, rid))

    @app.post(records)
    def create_records(table_id: str) -> tuple[Response, int]:
        items = _list_of(object_body(), "new_records")
        changes = engine.create_many(table_id, [_record_data(i, f"new_records[{n}]") for n, i in enumerate(items)])
        ctx.after_change(table_id, changes)
        return jsonify(data=changes), 201

    @app.patch(records)
    def update_records(table_id: str) -> Response:
        updates = []
        for n, item in enumerate(_list_of(object_body(), "updated_records")):
            rid = item.get("id") if isinstance(item, dict) else None
            updates.append((rid, _record_data(item, f"updated_records[{n}]")))
        changes = engine.update_many(table_id, updates)
        ctx.after_change(table_id, changes)
        return jsonify(data=changes)

    @app.delete(records)
    def delete_records(table_id: str) -> tuple[str, int]:
        rids = _list_of(object_body(), "record_ids")
        engine.delete_many(table_id, rids)
        ctx.after_delete(table_id, rids)
        return "", 204

    @app.get("/api/v0/sdk/zapier/api/v4/profile/")
    def profile() -> Response:
        return jsonify(id=USER_ID, public_id=str(USER_ID), email="local@example.invalid")

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    @app.route("/<path:path>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def anything_else(path: str) -> tuple[str, int]:
        """The SDK's telemetry and anything else Zapier would answer: quietly accepted, not acted on."""
        if path.startswith((API_PREFIX.lstrip("/") + "/", PUBLIC_PREFIX.lstrip("/") + "/", "trigger-inbox/",
                            "_admin/")):
            raise ApiError(404, f"no such endpoint: {request.method} /{path[:80]}")
        return "", 204
