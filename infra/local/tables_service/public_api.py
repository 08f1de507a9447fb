"""Zapier's public Tables API v2 (``https://api.zapier.com/tables/v2/...``, see
``/work/shared/reference/zapier-public-api.md`` section 1) over the same store as the SDK paths, so a record
written through one is read through the other.

* Records: create ``POST``, update ``PATCH``, delete ``DELETE`` (JSON body) on
  ``/tables/v2/tables/{table_id}/records``; get ``GET .../records/{record_id}``; query
  ``POST .../records/query?cursor=``. Answers ``{"results": [record], "meta": {...}}`` (+ ``links`` on query).
* Ids: a record's ``id`` is the UUID form of its ULID (the same 128 bits, 8-4-4-4-12 hex); a ``table_id`` or
  ``record_id`` is taken in either form.
* Refusals are HTTP errors with the documented envelope ``{detail, code, meta, errors[], message,
  support_id}``: a value that does not fit its field or an unknown field id refuses the whole request (422;
  create and update are all-or-nothing), an unknown ``change_options`` member or value 400, an unknown
  table or record 404.
* ``Idempotency-Key`` on writes (:class:`IdempotencyCache`): a retry after the first request finished, with
  the same key and the same method, path and body, is answered the original (2xx) response, header
  ``Idempotent-Replayed: true``, and nothing is written again; the same key with another payload is a 422
  ``idempotency_key_reused`` naming the key (the reference is silent on that case). Requests racing with
  one key both run, as documented. Only successful responses are kept (a refused write changed nothing).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any
from urllib.parse import urlencode

from flask import Flask, Response, jsonify, request

from infra.local.tables_service.context import ServiceContext
from infra.local.tables_service.errors import ApiError, RefusedRequest
from infra.local.tables_service.values import Data, Rec, check_value, ulid_to_uuid, uuid_to_ulid

PUBLIC_PREFIX = "/tables/v2"
BATCH_MAX = 100  # maxItems is not published; the SDK path's 100 (reference 1.3)
PREV_KEEP = 100  # pages a query token remembers for links.prev
IDEMPOTENCY_KEEP = 10_000  # finished responses kept (oldest dropped first)
_ON_CONFLICT = ("block",)  # the default is "absent"; the value naming the default is not published


class V2Error(Exception):
    """A public-API refusal: ``status`` with the documented error envelope."""

    def __init__(self, status: int, code: str, detail: str, meta: Data | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.meta = status, code, detail, dict(meta or {})


def v2_error_response(status: int, code: str, detail: str, meta: Data | None = None,
                      headers: dict[str, str] | None = None) -> Response:
    title = detail.split(":")[0][:80]
    body = {"detail": detail, "code": code, "meta": meta or {},
            "errors": [{"title": title, "status": status, "code": code, "detail": detail, "meta": meta or {}}],
            "message": detail, "support_id": ""}
    response = jsonify(body)
    response.status_code = status
    response.headers.update(headers or {})
    return response


_CODES = {400: "invalid", 401: "not_authenticated", 404: "not_found", 409: "conflict", 413: "too_large",
          422: "invalid", 429: "throttled", 503: "unavailable"}


def api_error_as_v2(exc: ApiError) -> Response:
    """An error the shared code raised (engine, gate, faults), in the v2 envelope."""
    return v2_error_response(exc.status, _CODES.get(exc.status, "error"), exc.message, headers=exc.headers)


def refused_as_v2(exc: RefusedRequest) -> Response:
    """A refusal the SDK path answers inside a 200 (an unknown field id): a 422 here."""
    return v2_error_response(422, "invalid", exc.error["title"], exc.error["meta"])


def is_public_path(path: str) -> bool:
    return path.startswith(PUBLIC_PREFIX + "/")


# --- ids and shapes -------------------------------------------------------------------------------------


def _ulid(given: Any, what: str) -> str:
    ulid = uuid_to_ulid(given)
    if ulid is None:
        raise V2Error(404, "not_found", f"{what} {str(given)[:40]!r} not found")
    return ulid


def v2_record(record: Rec) -> Data:
    return {"id": ulid_to_uuid(record["id"]), "data": record["data"], "created_at": record["created_at"],
            "edited_at": record["edited_at"], "deleted_at": record.get("deleted_at"), "is_source_record": False,
            "errors": record.get("errors") or {}}


def _body() -> Data:
    try:
        body = json.loads(request.get_data(cache=True) or b"null")
    except ValueError:
        raise V2Error(400, "invalid", "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise V2Error(400, "invalid", "expected a JSON object")
    return body


def _items(body: Data, key: str) -> list[Any]:
    items = body.get(key)
    if not isinstance(items, list) or not 1 <= len(items) <= BATCH_MAX:
        raise V2Error(400, "invalid", f"{key}: expected a list of 1 to {BATCH_MAX} items")
    return items


def _change_options(body: Data, allowed: dict[str, tuple[str, ...]]) -> None:
    options = body.get("change_options")
    if options is None:
        return
    if not isinstance(options, dict):
        raise V2Error(400, "invalid", "change_options: expected an object")
    for name, value in options.items():
        if name not in allowed or value not in allowed[name]:
            raise V2Error(400, "invalid_change_options",
                          f"change_options: {name}={str(value)[:40]!r} is not published by this operation")


def _check_data(ctx: ServiceContext, table_id: str, rows: list[Data]) -> None:
    """All-or-nothing: every field id known and every value fitting its field, or the request is refused."""
    fields = ctx.engine.schema(table_id).fields
    problems: Data = {}
    for n, data in enumerate(rows):
        for key, value in data.items():
            fid = int(key[1:]) if isinstance(key, str) and key[1:].isdigit() and key[:1] == "f" else None
            if fid not in fields:
                problems[f"{n}.{str(key)[:40]}"] = "unknown field id"
                continue
            problem = check_value(fields[fid]["type"], value)[1]
            if problem is not None:
                problems[f"{n}.{key}"] = problem
    if problems:
        first = next(iter(problems.items()))
        raise V2Error(422, "invalid_record", f"record {first[0]}: {first[1]}", {"fields": problems})


def _data(item: Any, where: str) -> Data:
    data = item.get("data") if isinstance(item, dict) else None
    if not isinstance(data, dict):
        raise V2Error(400, "invalid", f'{where}: expected {{"data": {{"f<id>": value}}}}')
    return data


def _page(start: str | None, back: list[str | None]) -> str:
    """A v2 page token: where the page starts (the store's cursor; None: the first page) and where the
    pages before it started (the newest :data:`PREV_KEEP`), so ``links.prev`` can go back."""
    raw = json.dumps({"s": start, "b": back[-PREV_KEEP:]}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page(token: str | None) -> tuple[str | None, list[str | None]]:
    if token is None:
        return None, []
    try:
        page = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        start, back = page["s"], page["b"]
        if not isinstance(back, list) or not all(isinstance(c, str | None) for c in [start, *back]):
            raise ValueError(token)
        return start, back
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise V2Error(400, "invalid", f"cursor {token[:40]!r} is not a page token of this query") from None


def _query_int(name: str, low: int, high: int, default: int) -> int:
    given = request.args.get(name)
    if given is None:
        return default
    if not given.isdigit() or not low <= int(given) <= high:
        raise V2Error(400, "invalid", f"{name}: expected an integer from {low} to {high}, got {given[:40]!r}")
    return int(given)


# --- Idempotency-Key ------------------------------------------------------------------------------------


class IdempotencyCache:
    """Finished write responses by Idempotency-Key, with a digest of the request they answered."""

    def __init__(self, keep: int = IDEMPOTENCY_KEEP) -> None:
        self._lock = threading.Lock()
        self._keep = keep
        self._done: OrderedDict[str, tuple[str, int, bytes, str]] = OrderedDict()

    @staticmethod
    def digest() -> str:
        return hashlib.sha256(b"\0".join([request.method.encode(), request.path.encode(),
                                          request.get_data(cache=True)])).hexdigest()

    def lookup(self, key: str) -> Response | None:
        with self._lock:
            done = self._done.get(key)
        if done is None:
            return None
        digest, status, body, mimetype = done
        if digest != self.digest():
            raise V2Error(422, "idempotency_key_reused",
                          f"Idempotency-Key {key[:80]!r} was already used with a different request",
                          {"idempotency_key": key[:200]})
        return Response(body, status=status, mimetype=mimetype, headers={"Idempotent-Replayed": "true"})

    def store(self, key: str, response: Response) -> None:
        with self._lock:
            self._done[key] = (self.digest(), response.status_code, response.get_data(), response.mimetype)
            self._done.move_to_end(key)
            while len(self._done) > self._keep:
                self._done.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._done.clear()


# --- routes ---------------------------------------------------------------------------------------------


def register_public_api(app: Flask, ctx: ServiceContext, cache: IdempotencyCache) -> None:
    engine = ctx.engine
    records = PUBLIC_PREFIX + "/tables/<table_id>/records"
    writes = ("POST", "PATCH", "DELETE")

    @app.before_request
    def _replay() -> Response | None:  # after the gate (registered later): only an authenticated caller replays
        key = request.headers.get("Idempotency-Key")
        if not key or request.method not in writes or not is_public_path(request.path):
            return None
        return cache.lookup(key)

    @app.after_request
    def _keep(response: Response) -> Response:
        key = request.headers.get("Idempotency-Key")
        if (key and request.method in writes and is_public_path(request.path) and 200 <= response.status_code < 300
                and "Idempotent-Replayed" not in response.headers):
            cache.store(key, response)
        return response

    @app.errorhandler(V2Error)
    def _v2_error(exc: V2Error) -> Response:
        return v2_error_response(exc.status, exc.code, exc.detail, exc.meta)

    @app.post(records)
    def v2_create(table_id: str) -> tuple[Response, int]:
        table = _ulid(table_id, "table")
        body = _body()
        _change_options(body, {})
        rows = [_data(item, f"new_records[{n}]") for n, item in enumerate(_items(body, "new_records"))]
        _check_data(ctx, table, rows)
        changes = engine.create_many(table, rows)
        ctx.after_change(table, changes)
        return jsonify(results=[v2_record(c["new"]) for c in changes], meta={}), 201

    @app.patch(records)
    def v2_update(table_id: str) -> Response:
        table = _ulid(table_id, "table")
        body = _body()
        _change_options(body, {"on_conflict": _ON_CONFLICT})
        updates = []
        for n, item in enumerate(_items(body, "updated_records")):
            rid = item.get("id") if isinstance(item, dict) else None
            updates.append((_ulid(rid, "record"), _data(item, f"updated_records[{n}]")))
        _check_data(ctx, table, [data for _, data in updates])
        changes = engine.update_many(table, updates)
        ctx.after_change(table, changes)
        return jsonify(results=[v2_record(c["new"]) for c in changes], meta={})

    @app.delete(records)
    def v2_delete(table_id: str) -> Response:
        table = _ulid(table_id, "table")
        body = _body()
        _change_options(body, {"on_conflict": _ON_CONFLICT})
        rids = [_ulid(rid, "record") for rid in _items(body, "record_ids")]
        engine.delete_many(table, rids)  # refuses the whole request if any record does not exist
        ctx.after_delete(table, rids)
        return jsonify(results=[v2_record(engine.get(table, rid)) for rid in rids], meta={})

    @app.get(records + "/<record_id>")
    def v2_get(table_id: str, record_id: str) -> Response:
        record = engine.get(_ulid(table_id, "table"), _ulid(record_id, "record"))
        if record.get("deleted_at"):
            raise V2Error(404, "not_found", f"record {record_id} not found")
        return jsonify(v2_record(record))

    @app.post(records + "/query")
    def v2_query(table_id: str) -> Response:
        table = _ulid(table_id, "table")
        body = _body() if request.get_data(cache=True) else {}
        orders = body.get("orders")
        if orders == [{"key": "id", "direction": "asc"}] or orders == [{"key": "id"}]:
            orders = None  # the default order: the table's stored one
        cursor = request.args.get("cursor") or None
        start, back = _decode_page(cursor)
        inner = {"limit": body.get("limit", 100), "filters": body.get("filters"), "orders": orders,
                 "cursor_query": {"start_cursor": start} if start else None}
        found, pagination = engine.query(table, inner, "exclude")
        next_cursor = _page(pagination["end_cursor"], [*back, start]) if pagination["has_more"] else None
        prev_cursor = _page(back[-1], back[:-1]) if back else None
        link = request.base_url + "?"
        return jsonify(results=[v2_record(r) for r in found],
                       meta={"limit": inner["limit"], "cursor": cursor, "next_cursor": next_cursor},
                       links={"next": link + urlencode({"cursor": next_cursor}) if next_cursor else None,
                              "prev": link + urlencode({"cursor": prev_cursor}) if prev_cursor else None})

    @app.get(PUBLIC_PREFIX + "/tables/<table_id>/fields")
    def v2_fields(table_id: str) -> Response:
        found = list(engine.schema(_ulid(table_id, "table")).fields.values())
        limit, offset = _query_int("limit", 1, 1000, 100), _query_int("offset", 0, 10**9, 0)
        return jsonify(results=found[offset:offset + limit], meta={"limit": limit, "offset": offset,
                                                                    "count": len(found)})
