"""The Zapier Tables records client: the one module that knows the shape of the Zapier Tables API.

Records go through Zapier's **public Tables API v2** (``https://api.zapier.com/tables/v2``, the API Zapier
documents for integrators; the project's reference ``zapier-public-api.md`` holds its paths and shapes).
What v2 does not document stays on the path Zapier's SDK speaks (``https://sdkapi.zapier.com/api/v0/sdk/
tables/api/v1``, reference ``zapier-tables-api.md``): listing and creating tables, creating fields, and a
query that includes the trash (``trash=include|only``: the deletes and the trash check need it; v2 has no
``trash`` parameter). ``infra/local/tables_service/`` serves both over one store; ``tests/test_sdk_conformance.py``
runs the SDK against it.

Contract, public v2 (host :func:`public_api_url`)::

    Authorization: Bearer <token>   (one OAuth client-credentials token for both APIs, zapier_oauth)
    GET    /tables/v2/tables/{t}/fields?limit&offset                 -> {"results": [{"id": 3, "name", "type"}]}
    POST   /tables/v2/tables/{t}/records/query?cursor= {"limit", "filters": [{"key": "f3", "operator", "value"}]}
           -> {"results": [record], "meta": {"next_cursor"}, "links": {"next"}}  (next page: the SAME body,
              with ``cursor`` = meta.next_cursor, or the cursor links.next carries; the link's host is not used)
    GET    /tables/v2/tables/{t}/records/{uuid}                      -> record
    POST   /tables/v2/tables/{t}/records  {"new_records": [{"data": {"f3": v}}]} (<= 100)      -> {"results"}
    PATCH  /tables/v2/tables/{t}/records  {"updated_records": [{"id": uuid, "data"}]} (<= 100) -> {"results"}
    DELETE /tables/v2/tables/{t}/records  {"record_ids": [uuid]}                              -> {"results"}
    every write: Idempotency-Key (zapier_ids.idempotency_key: derived from the change, so a retry reuses it)
    record = {"id": UUID, "data": {"f3": v}, "created_at", "edited_at", "deleted_at", "errors"}
    error  = HTTP 4xx/5xx {"detail", "code", "meta", "errors": [{"title", "status", "code", "detail", "meta"}]}

SDK path (``/api/v0/sdk/tables/api/v1``): ``GET/POST /tables``, ``POST /tables/{t}/fields {"new_fields"}``,
``POST /tables/{t}/records/query?trash=include|only`` (``{"data": [record]}``, ``meta.pagination``).

Ids: zsync keeps ULIDs (Supabase rows of id-less Tables records are keyed by them). This client converts at
its edge (:mod:`shared.adapters.zapier_ids`): a record id sent to v2 becomes its UUID form, a record id read
back its ULID form; :class:`Record` ids are always ULIDs, whichever API answered.

Refusals: a v2 4xx raises :class:`TablesRejected` (``fields``: our names of the fields it names) or another
:class:`shared.adapters.zapier_errors.TablesError`; a 200 with ``meta.errors`` or a record with ``errors`` is a
refusal too (the SDK path's way; tolerated on both). An unknown field id re-lists the fields and re-sends once.

The public methods take and return OUR field names: the client lists each table's fields once (cached,
listed again when Zapier refuses a field id) and maps names <-> ``f<n>``. A name the table lacks raises
:class:`TablesFieldMissing`. Next door: the errors (:mod:`.zapier_errors`), the retry policy and its per-call
time budget (:mod:`.zapier_retry`), the OAuth token (:mod:`.zapier_oauth`), ids and keys (:mod:`.zapier_ids`),
the seed's catch-hook writer (:mod:`.catch_hook`). The token never appears in exception messages or logs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import parse_qs, quote, urlsplit

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from shared.adapters.zapier_errors import (
    TablesDuplicate,
    TablesFieldMissing,
    TablesNotFound,
    TablesProtocolError,
    TablesRejected,
    TablesUnavailable,
    named_refusal,
    raise_for_status,
)
from shared.adapters.zapier_ids import ChangeMemory, canonical, idempotency_key, to_ulid, to_uuid
from shared.adapters.zapier_oauth import DEFAULT_TOKEN_URL, TokenSource, TokenSourceAuth
from shared.adapters.zapier_retry import CallBudget, RetryPolicy
from shared.platform.http_client import Pool, TransportError, json_of

if TYPE_CHECKING:
    from urllib3.response import BaseHTTPResponse

    from shared.platform.settings import Settings

Scalar = str | int | float | bool | None

API_PREFIX = "/api/v0/sdk/tables/api/v1"  # the SDK's path: tables, field creation, trash queries
PUBLIC_PREFIX = "/tables/v2"  # the public API: records, field listing
DEFAULT_BASE_URL = "https://sdkapi.zapier.com"
DEFAULT_API_URL = "https://api.zapier.com"
BATCH_MAX = 100  # records per batch create/update request
PAGE_DEFAULT = 100
PAGE_MAX = 1000
FIELDS_PAGE = 100


def public_api_url(base_url: str, api_url: str | None = None) -> str:
    """Where the public API lives: ``api_url`` when given; ``https://api.zapier.com`` for Zapier's SDK host;
    otherwise the base URL itself (the local stand-in serves both APIs on one host)."""
    if api_url:
        return api_url.rstrip("/")
    host = urlsplit(base_url).hostname or ""
    return DEFAULT_API_URL if host == "sdkapi.zapier.com" else base_url.rstrip("/")


# --- model ---------------------------------------------------------------------------------------------


class Record(BaseModel):
    """One Zapier Tables record, ``data`` keyed by OUR field names, ``id`` the ULID form. ``created_at``/
    ``edited_at``/``deleted_at`` are Zapier's system metadata (ISO strings), distinct from fields of that name."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    data: dict[str, Any]
    created_at: str | None = None
    edited_at: str | None = None
    deleted_at: str | None = None
    schema_revision_id: int | None = None


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- field ids -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableField:
    key: str  # "f3"
    name: str
    type: str


@dataclass
class FieldMap:
    """One table's fields: our names <-> Zapier's ``f<n>`` keys."""

    table_id: str
    fields: tuple[TableField, ...]
    revision: int | None = None  # the schema_revision_id records had when this map was loaded

    def __post_init__(self) -> None:
        self.by_name = {}
        for f in self.fields:
            self.by_name.setdefault(f.name, f)  # first match wins, as in the SDK
        self.by_key = {f.key: f for f in self.fields}

    def name_of(self, key: str) -> str:
        return self.by_key[key].name if key in self.by_key else key


# --- the Tables API client -------------------------------------------------------------------------------


class TablesClient:
    """Client for the Zapier Tables API (contract in the module docstring), by OUR field names.

    ``timeout_s`` bounds each attempt; ``retry_budget_s`` bounds a whole call including retries, so a
    call ends within ``max(timeout_s, retry_budget_s)`` (plus one token fetch and one re-try after a
    401). The deadline is kept per thread, so concurrent calls from several threads each get their own
    budget; one client per Lambda container is the intended use. ``api_url``: the public API's host
    (default :func:`public_api_url`).
    """

    def __init__(
        self,
        base_url: str,
        token: str | SecretStr | None = None,
        timeout_s: float = 10.0,
        retry_budget_s: float = 20.0,
        *,
        retry: RetryPolicy | None = None,
        client_id: str | None = None,
        client_secret: str | SecretStr | None = None,
        token_url: str | None = None,
        api_url: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_url = public_api_url(self.base_url, api_url)
        self.timeout_s = timeout_s
        self.retry_budget_s = retry_budget_s
        self.tokens = TokenSource(
            token=_secret(token), client_id=client_id, client_secret=_secret(client_secret),
            token_url=token_url or DEFAULT_TOKEN_URL, timeout_s=timeout_s,
        )
        self._session = Pool((retry or RetryPolicy()).build(), list(dict.fromkeys([self.base_url, self.api_url])))
        self._auth = TokenSourceAuth(self.tokens)
        self._maps: dict[str, FieldMap] = {}
        self._maps_lock = threading.Lock()
        self._changes = ChangeMemory()  # what an Idempotency-Key names besides the body

    def __repr__(self) -> str:
        return f"TablesClient(base_url={self.base_url!r}, api_url={self.api_url!r}, credentials=***)"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()
        self.tokens.close()

    # -- tables and fields (setup, doctor) --

    def list_tables(self, query: str | None = None) -> list[dict[str, Any]]:
        """Every table (``{"id", "name", ...}``) visible to these credentials, following ``offset`` paging
        (SDK path: v2 documents no table listing)."""
        out: list[dict[str, Any]] = []
        while True:
            params = {"limit": "100", "offset": str(len(out))} | ({"q": query} if query else {})
            page = self._call("GET", f"{API_PREFIX}/tables", params=params)
            items = page.get("data")
            if not isinstance(items, list):
                raise TablesProtocolError(None, "GET tables: expected {'data': [...]}")
            out += items
            if not items or not (page.get("links") or {}).get("next"):
                return out

    def create_table(self, name: str, description: str | None = None) -> dict[str, Any]:
        """SDK path (v2 documents no table creation)."""
        answer = self._call("POST", f"{API_PREFIX}/tables", body={"name": name, "description": description})
        return _data_object(answer, "POST tables")

    def list_fields(self, table_id: str) -> list[TableField]:
        """The table's fields (public v2, ``limit``/``offset`` paging)."""
        items: list[Any] = []
        while True:
            params = {"limit": str(FIELDS_PAGE), "offset": str(len(items))}
            answer = self._call("GET", self._table_path(table_id) + "/fields", params=params)
            page = answer.get("results", answer.get("data"))
            if not isinstance(page, list):
                raise TablesProtocolError(None, f"table {table_id}: expected {{'results': [fields]}}")
            items += page
            if len(page) < FIELDS_PAGE:
                break
        try:
            return [TableField(f"f{int(f['id'])}", str(f["name"]), str(f["type"])) for f in items]
        except (KeyError, TypeError, ValueError):
            raise TablesProtocolError(None, f"table {table_id}: unexpected field shape") from None

    def create_fields(self, table_id: str, new_fields: list[Mapping[str, Any]]) -> list[TableField]:
        """SDK path (v2's field creation body is not published)."""
        self._call("POST", f"{API_PREFIX}/tables/{quote(table_id, safe='')}/fields",
                   body={"new_fields": [dict(f) for f in new_fields]})
        self.forget_fields(table_id)
        return self.field_map(table_id).fields

    def field_map(self, table_id: str, *, refresh: bool = False) -> FieldMap:
        """The table's fields, listed once per process (client) and cached; ``refresh`` lists them again."""
        with self._maps_lock:
            cached = self._maps.get(table_id)
        if cached is not None and not refresh:
            return cached
        fresh = FieldMap(table_id, tuple(self.list_fields(table_id)))
        with self._maps_lock:
            self._maps[table_id] = fresh
        return fresh

    def forget_fields(self, table_id: str) -> None:
        with self._maps_lock:
            self._maps.pop(table_id, None)

    # -- single records --

    def get(self, table_id: str, rid: str) -> Record:
        """The record ``rid``; :class:`TablesNotFound` when the table or record does not exist (v2: a trashed
        record too)."""
        answer = self._call("GET", f"{self._records_path(table_id)}/{quote(to_uuid(rid), safe='')}")
        item: Any = answer  # the record itself; tolerated: {"results": [record]} and the SDK's {"data": record}
        if isinstance(answer.get("results"), list) and len(answer["results"]) == 1:
            item = answer["results"][0]
        elif "id" not in answer and isinstance(answer.get("data"), dict):
            item = answer["data"]
        return self._record(table_id, item)

    def find_by_field(self, table_id: str, field: str, value: Scalar) -> Record | None:
        """The one record whose ``field`` equals ``value``, None if none; :class:`TablesDuplicate` if several."""
        found = self._query(table_id, [(field, "exact", value)], limit=2)[0]
        if len(found) > 1:
            ids = [r.id for r in found]
            raise TablesDuplicate(f"table {table_id}: more than one record has {field} = {value!r}: {ids}", ids)
        return found[0] if found else None

    def find_many(self, table_id: str, field: str, values: Iterable[Scalar], *, trash: str = "exclude"
                  ) -> list[Record]:
        """Every record whose ``field`` is one of ``values`` (``in`` queries of <= 1000 values, paged);
        ``trash`` as in :meth:`iter_records` (``include``: trashed records too, with ``deleted_at``)."""
        wanted = list(dict.fromkeys(v for v in values if v is not None))
        out: list[Record] = []
        for chunk in chunks(wanted, PAGE_MAX):
            out += self.iter_records(table_id, PAGE_MAX, trash=trash, _conditions=[(field, "in", chunk)])
        if field == "id":
            self._changes.found(table_id, wanted, [(r.id, r.data.get("id"), r.deleted_at) for r in out])
        return out

    def create(self, table_id: str, data: Mapping[str, Any], *, change: str | None = None) -> Record:
        """Create one record. ``change`` (every write takes it): names the change in its Idempotency-Key when
        the body and what this client last read do not (e.g. identical records made on purpose); a retry of
        the change must pass the same value."""
        return self.create_many(table_id, [data], change=change)[0]

    def update(self, table_id: str, rid: str, data: Mapping[str, Any], *, change: str | None = None) -> Record:
        """Change only the given fields of record ``rid``."""
        return self.update_many(table_id, [(rid, data)], change=change)[0]

    def delete(self, table_id: str, rid: str, *, missing_ok: bool = False, change: str | None = None) -> None:
        """Move record ``rid`` to the trash (its Idempotency-Key: :meth:`ChangeMemory.extra`)."""
        try:
            self._write(table_id, "DELETE", "record_ids", [(rid, None)], change)
        except TablesNotFound:
            if not missing_ok:
                raise

    # -- many records --

    def iter_records(
        self,
        table_id: str,
        page_size: int = PAGE_DEFAULT,
        filters: Mapping[str, Scalar] | None = None,
        trash: str = "exclude",
        *,
        _conditions: list[tuple[str, str, Any]] | None = None,
    ) -> Iterator[Record]:
        """Every record (matching all ``filters``, by equality) in creation order, following cursors.

        ``trash``: ``exclude`` (default: public v2), ``include`` or ``only`` deleted records (SDK path)."""
        if not 1 <= page_size <= PAGE_MAX:
            raise ValueError(f"page_size must be 1..{PAGE_MAX}")
        if trash not in ("exclude", "include", "only"):
            raise ValueError("trash must be exclude, include or only")
        conditions = [(k, "exact", v) for k, v in (filters or {}).items()] + list(_conditions or [])
        cursor: str | None = None
        while True:
            records, cursor = self._query(table_id, conditions, page_size, cursor, trash)
            yield from records
            if not cursor:
                return

    def create_many(self, table_id: str, rows: Iterable[Mapping[str, Any]], *, change: str | None = None
                    ) -> list[Record]:
        """Create records in batches of :data:`BATCH_MAX` (each batch is atomic, the whole call is not)."""
        rows = [dict(r) for r in rows]
        created: list[Record] = []
        for chunk in chunks(rows, BATCH_MAX):
            created += self._write(table_id, "POST", "new_records", [(None, row) for row in chunk], change)
        return created

    def update_many(self, table_id: str, updates: Iterable[tuple[str, Mapping[str, Any]]], *,
                    change: str | None = None, read_at: Mapping[str, str | None] | None = None) -> list[Record]:
        """Apply ``(record id, fields)`` partial updates in batches of :data:`BATCH_MAX`. ``read_at``: record id ->
        the ``edited_at`` the caller knows the record to have (kept outside this client, e.g. in Supabase): the
        Idempotency-Key names it instead of what this client last read, so a retry of the same write from any
        process - after a crash lost its answer - sends the same key and Zapier replays the first answer."""
        items = [(rid, dict(data)) for rid, data in updates]
        updated: list[Record] = []
        for chunk in chunks(items, BATCH_MAX):
            updated += self._write(table_id, "PATCH", "updated_records", chunk, change, read_at)
        return updated

    # -- plumbing --

    def _table_path(self, table_id: str) -> str:
        return f"{PUBLIC_PREFIX}/tables/{quote(table_id, safe='')}"

    def _records_path(self, table_id: str) -> str:
        return self._table_path(table_id) + "/records"

    def _keys(self, table_id: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Our field names -> ``f<n>`` (a name the table lacks is a configuration error)."""
        fmap = self.field_map(table_id)
        if any(name not in fmap.by_name for name in data):
            fmap = self.field_map(table_id, refresh=True)
        out = {}
        for name, value in data.items():
            f = fmap.by_name.get(name)
            if f is None:
                raise TablesFieldMissing(table_id, name)
            out[f.key] = value
        return out

    def _key(self, table_id: str, name: str) -> str:
        return next(iter(self._keys(table_id, {name: None})))

    def _query(self, table_id: str, conditions: list[tuple[str, str, Any]], limit: int,
               cursor: str | None = None, trash: str = "exclude") -> tuple[list[Record], str | None]:
        body: dict[str, Any] = {"limit": limit}
        if conditions:
            body["filters"] = [{"key": self._key(table_id, name), "operator": op, "value": value}
                               for name, op, value in conditions]
        if trash != "exclude":
            return self._sdk_query(table_id, body, cursor, trash)
        answer = self._refusable(table_id, lambda: self._call(
            "POST", self._records_path(table_id) + "/query", params={"cursor": cursor} if cursor else None,
            body=body))
        items = answer.get("results")
        if not isinstance(items, list):
            raise TablesProtocolError(None, f"table {table_id}: query: expected {{'results': [records]}}")
        return [self._record(table_id, item) for item in items], _next_cursor(answer, table_id)

    def _sdk_query(self, table_id: str, body: dict[str, Any], cursor: str | None, trash: str
                   ) -> tuple[list[Record], str | None]:
        """A query including the trash: the SDK path (v2 documents no ``trash``)."""
        if cursor:
            body = body | {"cursor_query": {"query_type": "window", "start_cursor": cursor}}
        path = f"{API_PREFIX}/tables/{quote(table_id, safe='')}/records/query"
        answer = self._refusable(table_id, lambda: self._call(
            "POST", path, params={"allow_nested_queries": "true", "trash": trash}, body=body))
        items = answer.get("data")
        if not isinstance(items, list):
            raise TablesProtocolError(None, f"table {table_id}: query: expected {{'data': [records]}}")
        pagination = (answer.get("meta") or {}).get("pagination") or {}
        end = pagination.get("end_cursor") if pagination.get("has_more") else None
        if end is not None and not isinstance(end, str):
            raise TablesProtocolError(None, f"table {table_id}: end_cursor is not a string")
        return [self._record(table_id, item) for item in items], end

    def _write(self, table_id: str, method: str, key: str, items: list[tuple[str | None, dict | None]],
               change: str | None = None, read_at: Mapping[str, str | None] | None = None) -> list[Record]:
        """One v2 write of ``items`` (``(record id or None, our fields or None)``), with an Idempotency-Key
        derived from the change (the body and :meth:`ChangeMemory.extra`, or ``read_at`` when the caller names
        what each record held). A refused field id lists the fields again and re-sends once (a new body, so a
        new key)."""
        held = (self._changes.extra(table_id, method, items) if read_at is None
                else [read_at.get(rid) if rid is not None else None for rid, _ in items])
        extra = [held] + ([change] if change is not None else [])

        def send() -> dict[str, Any]:
            if key == "record_ids":
                body: dict[str, Any] = {key: [to_uuid(rid) for rid, _ in items if rid is not None]}
            else:
                body = {key: [({"id": to_uuid(rid)} if rid is not None else {})
                              | {"data": self._keys(table_id, data or {})} for rid, data in items]}
            body = canonical(body)
            idem = idempotency_key(table_id, f"{method} records", body, extra)
            return self._call(method, self._records_path(table_id), body=body, headers={"Idempotency-Key": idem})

        answer = self._refusable(table_id, send)
        results = answer.get("results")
        if not isinstance(results, list) or len(results) != len(items):
            raise TablesProtocolError(None, f"table {table_id}: {method}: expected one result per record")
        return [self._record(table_id, item, refuse_errors=key != "record_ids") for item in results]

    def _refusable(self, table_id: str, send: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Send; a refusal naming a field (a 4xx, or ``meta.errors`` in a 200) re-lists the fields and re-sends
        once; a refusal's field ids become our names (:attr:`TablesRejected.fields`)."""
        for attempt in (1, 2):
            try:
                answer = send()
            except TablesRejected as exc:
                if attempt == 1 and "unknown field" in exc.message.lower():
                    self.field_map(table_id, refresh=True)
                    continue
                raise named_refusal(exc, self.field_map(table_id).name_of) from None
            errors = (answer.get("meta") or {}).get("errors") or []
            if not errors:
                return answer
            text = "; ".join(str(e.get("human_title") or e.get("title") or e)[:200] if isinstance(e, dict) else str(e)
                             for e in errors)
            if attempt == 1 and "field" in text.lower():
                self.field_map(table_id, refresh=True)
                continue
            raise TablesRejected(200, f"table {table_id}: Zapier refused the request: {text}")
        raise AssertionError("unreachable")

    def _record(self, table_id: str, item: Any, *, refuse_errors: bool = False) -> Record:
        if not isinstance(item, dict) or not isinstance(item.get("data"), dict):
            raise TablesProtocolError(None, f"table {table_id}: unexpected record shape")
        fmap = self.field_map(table_id)
        revision = item.get("schema_revision_id")
        stale = isinstance(revision, int) and fmap.revision is not None and revision > fmap.revision
        if stale or any(k not in fmap.by_key for k in item["data"]):
            fmap = self.field_map(table_id, refresh=True)
        if isinstance(revision, int) and (fmap.revision is None or revision > fmap.revision):
            fmap.revision = revision
        data = {fmap.name_of(k): v for k, v in item["data"].items()}
        if refuse_errors and item.get("errors"):
            refused = {fmap.name_of(k): e for k, e in item["errors"].items()
                       if not isinstance(e, dict) or e.get("s", "error") == "error"}
            if refused:
                detail = "; ".join(f"{name}: {(e.get('h') or e.get('e')) if isinstance(e, dict) else e}"[:200]
                                   for name, e in refused.items())
                raise TablesRejected(200, f"table {table_id}: Zapier refused field value(s): {detail}",
                                     fields=sorted(refused))
        try:
            record = Record.model_validate(item | {"id": to_ulid(item.get("id")), "data": data})
        except ValidationError as exc:
            raise TablesProtocolError(None, f"unexpected record shape: {exc.error_count()} error(s)") from None
        self._changes.read(record.id, record.edited_at)
        return record

    def _call(
        self, method: str, path: str, *, params: Mapping[str, str] | None = None, body: object = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        what = f"{method} {path}"
        origin = self.api_url if path.startswith(PUBLIC_PREFIX + "/") else self.base_url
        for attempt in (1, 2):
            with CallBudget(self.retry_budget_s, self.timeout_s) as budget:
                try:
                    response = self._session.request(
                        method,
                        origin + path,
                        params=params,
                        json=body,
                        headers={"Authorization": self._auth.authorization(), **(headers or {})},
                        timeout=self.timeout_s,
                    )
                except TransportError as exc:
                    raise TablesUnavailable(
                        None, f"{what}: {exc.cause} (gave up after {budget.elapsed():.1f}s)"
                    ) from None
                if response.status == 401 and attempt == 1 and self.tokens.refreshable:
                    self.tokens.invalidate()  # expired or revoked: fetch a new token once
                    continue
                raise_for_status(response, what, budget.elapsed())
            return self._json(response, what)
        raise AssertionError("unreachable")

    @staticmethod
    def _json(response: BaseHTTPResponse, what: str) -> dict[str, Any]:
        if response.status == 204 or not response.data:
            return {}
        try:
            payload = json_of(response)
        except ValueError:
            raise TablesProtocolError(response.status, f"{what}: response is not JSON") from None
        if not isinstance(payload, dict):
            raise TablesProtocolError(response.status, f"{what}: response is not a JSON object")
        return payload


def _next_cursor(answer: Mapping[str, Any], table_id: str) -> str | None:
    """The next page's cursor: ``meta.next_cursor``, else the ``cursor`` that ``links.next`` carries (only the
    token is taken: the same body goes to our own host, never to a host named in a response)."""
    cursor = (answer.get("meta") or {}).get("next_cursor")
    if cursor is None:
        link = (answer.get("links") or {}).get("next")
        if isinstance(link, str) and link:
            found = parse_qs(urlsplit(link).query).get("cursor") or [None]
            cursor = found[0]
            if cursor is None:
                raise TablesProtocolError(None, f"table {table_id}: links.next carries no cursor")
    if cursor is not None and not isinstance(cursor, str):
        raise TablesProtocolError(None, f"table {table_id}: next_cursor is not a string")
    return cursor or None


def _secret(value: str | SecretStr | None) -> str | None:
    return value.get_secret_value() if isinstance(value, SecretStr) else value or None


def _data_object(answer: Mapping[str, Any], what: str) -> dict[str, Any]:
    data = answer.get("data")
    if not isinstance(data, dict):
        raise TablesProtocolError(None, f"{what}: expected {{'data': {{...}}}}")
    return data


# --- construction from settings ------------------------------------------------------------------------


def client_from_settings(settings: Settings) -> TablesClient:
    """A :class:`TablesClient` for ``ZSYNC_ZAPIER_BASE_URL`` (SDK path) and ``ZSYNC_ZAPIER_API_URL`` (public
    API; default :func:`public_api_url`) with the OAuth client credentials (``ZSYNC_ZAPIER_CLIENT_ID`` /
    ``ZSYNC_ZAPIER_CLIENT_SECRET``) or a user-made ``ZSYNC_TABLES_TOKEN``."""
    return TablesClient(
        settings.zapier_base_url,
        settings.tables_token,
        settings.http_timeout_s,
        settings.retry_budget_s,
        client_id=settings.zapier_client_id,
        client_secret=settings.zapier_client_secret,
        token_url=settings.zapier_token_url,
        api_url=settings.zapier_api_url,
    )
