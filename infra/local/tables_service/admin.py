"""The Tables stand-in's ``/_admin`` endpoints (no token; the service binds to loopback).

``GET /_admin/health``; ``POST/DELETE /_admin/faults`` (arm or clear a fault, see
:mod:`infra.local.tables_service.faults`); ``GET /_admin/stats`` (requests, writes, same-version writes,
deliveries, faults served, records read by queries) and ``POST /_admin/stats/reset``;
``GET /_admin/deliveries`` (each trigger delivery attempt); ``PUT /_admin/tables/{table_id}/trigger``
(set or clear a table's trigger URL); ``POST /_admin/triggers/flush`` (wait until no delivery is pending);
``GET /_admin/requests`` (every request but ``/_admin`` ones, oldest first: ``{"data": [{"method", "path",
"idempotency_key": sent?, "idempotency_key_value"}]}``) and ``DELETE /_admin/requests`` (empty it).

And a person's actions in Zapier's UI that the API does not offer:
``POST /_admin/tables/{t}/records/{r}/restore`` (restore from the trash: live again, ``edited_at`` the
restore time, the trigger fires as for an update) and ``POST /_admin/tables/{t}/trash/empty`` (trashed
records gone for good, as when the trash is emptied).

``GET/POST /_admin/quirks``: knobs that make the stand-in differ from what zsync assumes (:mod:`.quirks`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask, Response, jsonify, request

from infra.local.tables_service.context import ServiceContext
from infra.local.tables_service.errors import ApiError
from infra.local.tables_service.quirks import register_quirks
from infra.local.tables_service.routes import object_body
from infra.local.tables_service.values import Data

FLUSH_DEFAULT_S = 10.0
FLUSH_MAX_S = 120.0


def _admin_number(body: Data, key: str, allowed: Callable[[Any], bool]) -> Any:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not allowed(value):
        raise ApiError(400, f"invalid {key!r}")
    return value


def register_admin(app: Flask, ctx: ServiceContext) -> None:
    @app.before_request
    def _log_request() -> None:  # registered before the gate: refused requests are logged too
        if not request.path.startswith("/_admin/"):
            ctx.requests.add(request.method, request.path, request.headers.get("Idempotency-Key"))

    register_quirks(app, ctx)  # before the gate and the public API: an ignored Idempotency-Key goes first

    @app.get("/_admin/requests")
    def requests_served() -> Response:
        return jsonify(data=ctx.requests.entries())

    @app.delete("/_admin/requests")
    def reset_requests() -> tuple[str, int]:
        ctx.requests.reset()
        return "", 204

    @app.get("/_admin/health")
    def health() -> Response:
        return jsonify(ok=True)

    @app.post("/_admin/faults")
    def arm_faults() -> Response:
        body = object_body()
        slow = body.get("slow", False)
        if not isinstance(slow, bool) or (slow and ("status" in body or not body.get("hang_s"))):
            raise ApiError(400, "invalid 'slow': true or false; true takes 'hang_s' > 0 and no 'status'")
        status = 0 if slow else _admin_number(
            body, "status", lambda v: isinstance(v, int) and (400 <= v <= 599 or v == 200))
        method = body.get("method")
        if method not in (None, "GET", "POST", "PATCH", "DELETE"):
            raise ApiError(400, "invalid 'method'")
        count = _admin_number(body, "count", lambda v: isinstance(v, int) and 0 <= v <= 1_000_000)
        retry_after = body.get("retry_after")
        if retry_after is not None:
            retry_after = _admin_number(body, "retry_after", lambda v: isinstance(v, int) and 0 <= v <= 86_400)
        for_s = body.get("for_s")
        if for_s is not None:
            for_s = _admin_number(body, "for_s", lambda v: 0 < v <= 3600)
        hang_s = _admin_number(body, "hang_s", lambda v: 0 <= v <= 600) if "hang_s" in body else 0.0
        lose = body.get("lose_response", False)
        if not isinstance(lose, bool) or (lose and status == 200):
            raise ApiError(400, "invalid 'lose_response': true or false, with an error status")
        ctx.faults.arm(status, count, retry_after, for_s=for_s, hang_s=hang_s, method=method, lose_response=lose,
                       slow=slow)
        return jsonify(status=status, count=count, retry_after=retry_after, for_s=for_s, hang_s=hang_s, method=method,
                       lose_response=lose, slow=slow)

    @app.delete("/_admin/faults")
    def clear_faults() -> tuple[str, int]:
        ctx.faults.clear()
        return "", 204

    @app.get("/_admin/stats")
    def stats() -> Response:
        return jsonify(ctx.stats.snapshot() | {"deliveries": ctx.dispatcher.stats(), "faults": ctx.faults.stats(),
                                               "query_rows_read": ctx.engine.rows_read})

    @app.post("/_admin/stats/reset")
    def reset_stats() -> tuple[str, int]:
        ctx.stats.reset()
        ctx.dispatcher.reset()
        ctx.engine.rows_read = 0
        return "", 204

    @app.get("/_admin/deliveries")
    def deliveries() -> Response:
        return jsonify(data=ctx.dispatcher.outcomes())

    @app.put("/_admin/tables/<table_id>/trigger")
    def set_trigger(table_id: str) -> Response:
        name = ctx.engine.table_name(table_id)
        body = object_body()
        url = body.get("url")
        valid = url is None or (isinstance(url, str) and url.startswith(("http://", "https://")))
        if set(body) != {"url"} or not valid:
            raise ApiError(400, 'expected {"url": "http(s)://..." | null}')
        ctx.triggers[name] = url
        return jsonify(table_id=table_id, table=name, url=url)

    @app.post("/_admin/tables/<table_id>/records/<rid>/restore")
    def restore(table_id: str, rid: str) -> Response:
        change = ctx.engine.restore(table_id, rid)
        ctx.after_change(table_id, [change])
        return jsonify(data=change["new"])

    @app.post("/_admin/tables/<table_id>/trash/empty")
    def empty_trash(table_id: str) -> Response:
        return jsonify(removed=ctx.engine.empty_trash(table_id))

    @app.post("/_admin/triggers/flush")
    def flush() -> Response:
        body = object_body() if request.get_data(cache=True) else {}
        timeout = body.get("timeout", FLUSH_DEFAULT_S)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 <= timeout <= FLUSH_MAX_S:
            raise ApiError(400, f"timeout must be a number of seconds from 0 to {FLUSH_MAX_S}")
        flushed = ctx.dispatcher.wait_idle(timeout)
        return jsonify(flushed=flushed, pending=ctx.dispatcher.stats()["pending"])
