"""Local stand-in for Zapier Tables (the API the official SDK speaks) and for the Zaps' record triggers.

It serves the same paths as ``https://sdkapi.zapier.com`` (``/api/v0/sdk/tables/api/v1/...``, see
``/work/shared/reference/zapier-tables-api.md`` and :mod:`shared.adapters.zapier_tables`) over real HTTP, plus
Zapier's OAuth token endpoint (``POST /oauth/token/``, client credentials), so both our client and
Zapier's official SDK (``@zapier/zapier-sdk``, pointed at this base URL) can use it. Anything else
(the SDK's telemetry, ``/api/v4/tracking/event/``) gets a quiet 204. State is a SQLite file (WAL, one
connection, one lock): restarting on the same file keeps tables, fields and records.

Emulated Zapier behaviour:

* Tables and records have 26-character ULID ids; fields have integer ids (``f<n>`` in record data) and
  a type. Values that do not fit a field's type are refused per record (``errors`` on the record, the
  field left unset); an unknown field id refuses the whole request (``meta.errors``), both in a 200.
* Query (``POST .../records/query``): filters exact/different/contains/icontains/gt/gte/lt/lte/in/
  isnull/startswith, orders, cursor paging (``meta.pagination``), ``trash=exclude|include|only``.
  ``exact`` and ``in`` use an index of field values, so a find by id costs the same at any table size.
* Writes answer changesets; ``edited_at`` is set on every change; delete moves records to the trash.
* As harsh as Zapier: a write stores only the fields the caller sends (no ``created_at`` / ``updated_at``
  field is ever filled in; ``edited_at`` is Zapier's own record metadata), and an empty cell (``null``,
  ``""``, ``[]``) is left out of ``data``: writing one empties the cell.
* Rate limit: ``rate_limit`` requests per ``rate_window_s`` per table (default Zapier's 100 per 5 s),
  429 with ``Retry-After`` beyond it.
* Triggers: after a create, or an update that changes the data, the record is POSTed to the table's
  ``trigger_url`` (configured by table *name*) as its fields by name, plus ``"id": <record id>`` when it
  has no ``id`` field, plus ``"edited_at"``, with the shared secret header; once per change, in
  background workers, with ``autoreplay`` (Zapier's is 5 min, 30 min, 1 h, 3 h, 6 h).
* Trigger inboxes (:mod:`infra.local.trigger_inbox_service`) are mounted on the same app, at the SDK's
  path and at the public Trigger Inbox API's two documented prefixes.
* Zapier's public Tables API v2 (``/tables/v2/...``, :mod:`.public_api`) over the same store: UUID-form
  record ids, ``results``/``meta``/``links``, the documented error envelope, ``Idempotency-Key`` replay.

Fault injection, a person's actions in Zapier's UI (restore from the trash, empty the trash) and the
counters are ``/_admin`` endpoints: :mod:`.faults` and :mod:`.admin` say which.

This module starts and stops the service (:func:`start_tables_service`, :class:`TablesService`, the
keep-alive HTTP server, the Flask app); the rooms:

* :mod:`.routes` - the HTTP API (token, tables, fields, records), the request gate, error answers;
* :mod:`.public_api` - the public Tables API v2 records endpoints and the Idempotency-Key cache;
* :mod:`.admin` - the ``/_admin`` endpoints;
* :mod:`.store` - tables, fields and records in SQLite, and the API's behaviour over them;
* :mod:`.values` - cell values: field types, empty cells, filter operators, sort order, ids, cursors;
* :mod:`.triggers` - the Zaps' record triggers (payloads, delivery workers, autoreplay);
* :mod:`.context` - one running service's shared state, and what follows a change;
* :mod:`.counters` - request and write counters, the per-table rate limiter;
* :mod:`.faults` - fault injection;
* :mod:`.errors` - the API's two ways of saying no;
* :mod:`.__main__` - the command line.

Run it: ``python -m infra.local.tables_service --db PATH --config JSON_FILE --port N`` (see ``--help``),
or from Python with :func:`start_tables_service`.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from flask import Flask
from waitress import wasyncore
from waitress.server import BaseWSGIServer, create_server

from infra.local.tables_service.admin import FLUSH_DEFAULT_S, register_admin
from infra.local.tables_service.context import TOKEN_TTL_S, ServiceContext
from infra.local.tables_service.counters import RateLimiter, ServiceStats
from infra.local.tables_service.public_api import IdempotencyCache, register_public_api
from infra.local.tables_service.routes import (
    MAX_BODY_BYTES,
    register_errors,
    register_gate,
    register_tables_api,
    register_token_endpoint,
)
from infra.local.tables_service.store import RecordEngine, RecordStore
from infra.local.tables_service.triggers import TriggerDispatcher
from infra.local.tables_service.values import Data
from infra.local.trigger_inbox_service import PUBLIC_INBOX_PATHS, QUARANTINE_AFTER, InboxService, inbox_blueprint

log = logging.getLogger(__name__)

RATE_LIMIT = 100  # requests per table per window (Zapier's documented limit for Zap steps)
RATE_WINDOW_S = 5.0
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@dataclass(frozen=True)
class TableConfig:
    """How the service behaves for the table of this *name* (tables themselves are made through the API)."""

    name: str
    trigger_url: str | None = None


def create_app(ctx: ServiceContext, max_body_bytes: int = MAX_BODY_BYTES,
               public_inbox_paths: tuple[str, ...] = PUBLIC_INBOX_PATHS) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    register_errors(app)
    register_token_endpoint(app, ctx)
    register_admin(app, ctx)  # first of the before-request hooks: the request log sees every request
    register_gate(app, ctx)
    register_public_api(app, ctx, IdempotencyCache())  # after the gate: only an authenticated caller replays
    if ctx.inboxes is not None:
        app.register_blueprint(inbox_blueprint(ctx.inboxes, public_inbox_paths))
    register_tables_api(app, ctx)  # last: it holds the catch-all route
    return app


# --- running it ----------------------------------------------------------------------------------------


SERVER_THREADS = 32  # requests served at once (a hung request, see the faults, holds one)


class _KeepAliveServer:
    """The service's HTTP server: waitress, HTTP/1.1 with keep-alive, as zapier.com answers. (Werkzeug's
    development server closes every connection, which would add a TCP handshake to each of our requests
    that the real API does not cost.) Its event loop runs in one thread; stopping closes every connection
    in that same thread."""

    def __init__(self, app: Flask, host: str, port: int) -> None:
        self.server: BaseWSGIServer = create_server(
            app, host=host, port=port, threads=SERVER_THREADS, ident="zapier-tables-local",
            expose_tracebacks=False, channel_timeout=120)
        self.port: int = self.server.effective_port  # type: ignore[attr-defined]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tables-service", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sockets = self.server._map  # waitress keeps its channels in the server's socket map
        while not self._stopping.is_set():
            wasyncore.loop(timeout=0.05, map=sockets, count=1)
        # Workers first: a finishing request wakes the loop through the trigger, which must still be open.
        self.server.task_dispatcher.shutdown(timeout=2)
        for channel in list(sockets.values()):
            if channel is not self.server:
                channel.handle_close()  # an open connection, or waitress's wake-up trigger
        self.server.close()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()


class TablesService:
    """A running service: ``url``, ``stop()``; also a context manager."""

    def __init__(self, server: _KeepAliveServer, ctx: ServiceContext, host: str) -> None:
        self._server = server
        self.ctx = ctx
        display_host = f"[{host}]" if ":" in host else host
        self.url = f"http://{display_host}:{server.port}"
        self.port = server.port
        self._stopped = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def client_id(self) -> str:
        return self.ctx.client_id

    @property
    def client_secret(self) -> str:
        return self.ctx.client_secret

    def table_ids(self) -> dict[str, str]:
        """The live tables' ids by name."""
        return self.ctx.engine.table_ids_by_name()

    def stats(self) -> Data:
        ctx = self.ctx
        return ctx.stats.snapshot() | {"deliveries": ctx.dispatcher.stats(), "faults": ctx.faults.stats(),
                                       "query_rows_read": ctx.engine.rows_read}

    def deliveries(self) -> list[Data]:
        return self.ctx.dispatcher.outcomes()

    def flush(self, timeout_s: float = FLUSH_DEFAULT_S) -> bool:
        return self.ctx.dispatcher.wait_idle(timeout_s)

    def stop(self) -> None:
        """Stop serving, drop pending deliveries, join the threads and close the database."""
        if self._stopped:
            return
        self._stopped = True
        self.ctx.stopped = True
        self._server.stop()
        self.ctx.dispatcher.stop()
        if self.ctx.inboxes is not None:
            self.ctx.inboxes.close()
        self.ctx.engine.store.close()


def start_tables_service(
    db_path: str | Path,
    tables: Sequence[TableConfig],
    token: str | None = None,
    secret_header: str = "X-Zsync-Secret",
    secret: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    autoreplay: Sequence[float] = (),
    *,
    client_id: str = "zsync-local",
    client_secret: str | None = None,
    rate_limit: int | None = RATE_LIMIT,
    rate_window_s: float = RATE_WINDOW_S,
    token_ttl_s: int = TOKEN_TTL_S,
    max_body_bytes: int = MAX_BODY_BYTES,
    delivery_timeout_s: float = 10.0,
    delivery_workers: int = 4,
    inbox_quarantine_after: int = QUARANTINE_AFTER,
    public_inbox_paths: Sequence[str] = PUBLIC_INBOX_PATHS,
) -> TablesService:
    """Start the service in background threads and return once it accepts connections.

    ``tables`` configure behaviour per table *name* (trigger URL); the tables themselves are
    created through the API (``zsync setup zapier``, :func:`infra.deploy.tables_setup.ensure_tables`).
    Callers authenticate with ``client_id``/``client_secret`` at ``/oauth/token/`` or with the static
    ``token`` (a token "made by the user"); ``rate_limit=None`` turns the per-table rate limit off;
    ``inbox_quarantine_after``: leases a trigger-inbox message may have before it is quarantined;
    ``public_inbox_paths``: where the public Trigger Inbox API is served besides the SDK's path (default both
    documented prefixes, ``/trigger-inbox/api/v1/inboxes`` and ``/trigger-inbox/v1/inboxes``).
    """
    if host not in _LOOPBACK:
        log.warning("tables service bound to %s: its /_admin endpoints have no authentication", host)
    engine = RecordEngine(RecordStore(Path(db_path)))
    dispatcher = TriggerDispatcher(secret_header, secret, autoreplay, delivery_timeout_s, delivery_workers)
    ctx = ServiceContext(
        engine,
        dispatcher,
        client_id,
        client_secret or secrets.token_urlsafe(24),
        token,
        ServiceStats([]),
        RateLimiter(rate_limit, rate_window_s),
        token_ttl_s=token_ttl_s,
        triggers={t.name: t.trigger_url for t in tables},
        inboxes=InboxService(Path(db_path).with_suffix(".inboxes.sqlite3"), engine.table_exists,
                             quarantine_after=inbox_quarantine_after),
    )
    try:
        server = _KeepAliveServer(create_app(ctx, max_body_bytes, tuple(public_inbox_paths)), host, port)
    except BaseException:
        dispatcher.stop()
        engine.store.close()
        raise
    return TablesService(server, ctx, host)
