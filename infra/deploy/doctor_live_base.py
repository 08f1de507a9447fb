"""What the checks of ``zsync doctor --live`` share (:mod:`infra.deploy.doctor_live` runs them):
:data:`ASSUMPTIONS` (the list of ``docs/zapier-assumptions.md``: key -> what is assumed, whether a
difference breaks the sync), :class:`Finding` and its three statuses, :class:`Options`, ULID <-> UUID ids,
the scratch table (:class:`Scratch`: made with the field types the specs use, removed with its inboxes).

The Tables calls go through :class:`shared.adapters.zapier_tables.TablesClient`'s public methods; what needs
raw HTTP (the token response, the public API v2 paths, Idempotency-Key, deleting the scratch table) goes
through :class:`Raw` (requests, the same bearer token).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from shared.adapters.zapier_tables import API_PREFIX, TablesClient
from shared.core.spec import Field, Kind, TableSpec
from shared.platform.settings import Settings

OK = "ok"
DIFFERENT = "different"
UNCHECKED = "could not check"
PREFIX = "zsync-doctor-"
PUBLIC_API_URL = "https://api.zapier.com"
V2_PREFIX = "/tables/v2"
INBOX_PREFIXES = ("/trigger-inbox/api/v1/inboxes", "/trigger-inbox/v1/inboxes")
RAW_429_BUDGET_S = 20.0  # a raw request waits out 429s this long at most (the client's retry budget)
CLEANUP_BUDGET_S = 60.0  # removing the scratch table waits out a 429 (the rate-limit burst) this long at most

# key -> (what zsync assumes, does a difference break the sync). docs/zapier-assumptions.md explains each.
ASSUMPTIONS: dict[str, tuple[str, bool]] = {
    "token_lifetime": ("a client-credentials token lives `expires_in` s (3600 assumed when absent), longer "
                       "than the 300 s refresh margin", False),
    "round_trip": ("create, get, find by `id` (exact on a text field), update and delete work, by field id", True),
    "exact_indexed": ("a find by `id` (exact on a text field) is served by an index, at any table size", False),
    "value_text": ("a text value reads back as the sync wrote it", True),
    "value_number": ("a number value (int) reads back as the sync wrote it", True),
    "value_decimal": ("a decimal value (float) reads back as the sync wrote it", True),
    "value_json": ("a json value reads back as the sync wrote it", True),
    "value_datetime": ("a datetime value reads back as the same instant (ms)", True),
    "value_multiple_string": ("a multiple_string value reads back as the same list", True),
    "value_empty": ("writing null (or an empty list) empties a cell", True),
    "batch_100": ("a write may carry 100 records (create on the SDK path, delete on v2)", True),
    "page_1000": ("a query may ask for 1000 records a page (reconcile, the trash check)", True),
    "refusal": ("a value that does not fit its field is refused visibly (errors in a 200 or a 4xx), "
                "nothing stored", True),
    "edited_at_moves": ("`edited_at` moves on an update that leaves `updated_at` as it was", True),
    "edited_at_no_change": ("an update that changes nothing leaves `edited_at` as it was", False),
    "trash": ("a delete moves the record to the trash: trash=only/include return it with `deleted_at`", True),
    "restore": ("a restore from the trash moves `edited_at` and fires the trigger", False),
    "idempotency_replay": ("Idempotency-Key: the same key and payload again answers the original, "
                           "no second record", True),
    "idempotency_reuse": ("Idempotency-Key: the same key with another payload is refused", False),
    "ids": ("a v2 record id is the UUID form of the SDK path's ULID (the same 128 bits)", True),
    "table_id_forms": ("the v2 API takes a table id as the ULID and as its UUID form", False),
    "trigger_new_or_updated": ("the Tables app lists a trigger for added or updated records (new-or-updated, "
                               "or added/updated/deleted) for the inboxes", True),
    "trigger_pick": ("`zsync wire zapier` picks that trigger without --trigger-key", False),
    "trigger_deleted": ("an added/updated/deleted trigger is optional: without one the trash check applies "
                        "deletes made in Tables; whether the app lists one is shown", False),
    "payload_change": ("a change's inbox message carries the record: its id, fields (by id or name), "
                       "`edited_at`", True),
    "payload_delete": ("a delete: the added/updated/deleted trigger sends a message naming the record, marked "
                       "as a delete; the new-or-updated one sends nothing", False),
    "lease_bounds": ("a lease of 100 messages for 300 s (the consumer's) is accepted; out of bounds is a 400",
                     True),
    "lease_count": ("a message can be leased 6 times (the consumer dead-letters a poison message on its 6th)",
                    False),
    "lease_order": ("a record's changes are leased oldest first (one lease of one message at a time)", False),
    "inbox_prefixes": ("the public Trigger Inbox API answers at /trigger-inbox/api/v1 and /trigger-inbox/v1",
                       False),
    "rate_limit": ("about 100 requests / 5 s per table, then 429 with Retry-After", False),
    "cleanup": ("the scratch table and inboxes are removed", False),
}


@dataclass(frozen=True)
class Finding:
    key: str
    observed: str
    status: str  # OK | DIFFERENT | UNCHECKED

    @property
    def assumption(self) -> str:
        return ASSUMPTIONS[self.key][0]

    @property
    def breaks(self) -> bool:
        return ASSUMPTIONS[self.key][1]

    @property
    def fails(self) -> bool:
        """A sync-breaking assumption that differs or could not be checked: the run exits 1."""
        return self.breaks and self.status != OK


def found(key: str, ok: bool, observed: str) -> Finding:
    return Finding(key, observed, OK if ok else DIFFERENT)


def unchecked(key: str, why: str) -> Finding:
    return Finding(key, why, UNCHECKED)


def exit_code(findings: Iterable[Finding]) -> int:
    return 1 if any(f.fails for f in findings) else 0


@dataclass
class Options:
    keep: bool = False  # leave the scratch table and inboxes (debugging)
    rate_limit: bool = True  # the bounded burst (False: not checked)
    rate_burst: int = 120  # requests at most in the burst (stops at the first 429)
    trigger_wait_s: float = 30.0  # how long to wait for a change's inbox message
    check_timeout_s: float = 90.0  # each check's bound
    api_url: str | None = None  # the public API's origin (default: api.zapier.com for zapier.com hosts)


# --- ids: ULID <-> UUID form ------------------------------------------------------------------------------

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def id_bits(value: Any) -> int | None:
    """The 128 bits of a ULID or of a UUID-form id; None for anything else."""
    if not isinstance(value, str):
        return None
    if len(value) == 26 and all(c in _CROCKFORD for c in value.upper()):
        bits = 0
        for char in value.upper():
            bits = bits << 5 | _CROCKFORD.index(char)
        return bits if bits < 1 << 128 else None
    hexed = value.replace("-", "")
    if len(value) == 36 and [len(p) for p in value.split("-")] == [8, 4, 4, 4, 12]:
        try:
            return int(hexed, 16)
        except ValueError:
            return None
    return None


def uuid_form(ulid: str) -> str:
    bits = id_bits(ulid)
    if bits is None:
        raise ValueError(f"not a ULID: {ulid!r}")
    text = f"{bits:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def id_form(value: Any) -> str:
    if isinstance(value, str) and len(value) == 26 and id_bits(value) is not None:
        return "ULID"
    return "UUID" if id_bits(value) is not None else f"other ({str(value)[:40]!r})"


# --- raw HTTP (token response, public API v2, cleanup) ----------------------------------------------------


class Raw:
    """requests with the client's bearer token, bounded by ``timeout_s`` per request; never retries."""

    def __init__(self, client: TablesClient, api_url: str, timeout_s: float) -> None:
        self.client = client
        self.api_url = api_url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()

    def call(self, method: str, url: str, *, body: Any = None, headers: dict[str, str] | None = None,
             params: dict[str, str] | None = None, wait_429: bool = True) -> requests.Response:
        """One request; a 429 is waited out (its Retry-After) up to :data:`RAW_429_BUDGET_S` in all, unless
        ``wait_429`` is false (the rate-limit burst wants to see it)."""
        deadline = time.monotonic() + RAW_429_BUDGET_S
        while True:
            auth = {"Authorization": f"Bearer {self.client.tokens.get()}"}
            response = self.session.request(method, url, json=body, headers=auth | (headers or {}), params=params,
                                            timeout=self.timeout_s, allow_redirects=False)
            wait = _retry_after(response)
            if response.status_code != 429 or not wait_429 or time.monotonic() + wait > deadline:
                return response
            time.sleep(wait)

    def v2(self, method: str, table_id: str, suffix: str = "", **kwargs: Any) -> requests.Response:
        return self.call(method, f"{self.api_url}{V2_PREFIX}/tables/{quote(table_id, safe='')}/records{suffix}",
                         **kwargs)

    def close(self) -> None:
        self.session.close()


def public_api_url(settings: Settings, given: str | None) -> str:
    """``given``, else the settings' public API URL (``ZSYNC_ZAPIER_API_URL``, where the settings have one),
    else ``https://api.zapier.com`` when the SDK base URL is a zapier.com host, else the SDK base URL's origin
    (the local stand-in serves both APIs)."""
    given = given or getattr(settings, "zapier_api_url", None)
    if given:
        return given.rstrip("/")
    parts = urlsplit(settings.zapier_base_url)
    if (parts.hostname or "").endswith("zapier.com"):
        return PUBLIC_API_URL
    return f"{parts.scheme}://{parts.netloc}"


def brief(response: requests.Response) -> str:
    """``HTTP 422 invalid_record`` (the code of a v2 error envelope or an inbox error, when there is one)."""
    code = None
    try:
        body = response.json()
        if isinstance(body, dict):
            errors = body.get("errors")
            first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
            code = body.get("code") or first.get("code") or first.get("title")
    except ValueError:
        pass
    return f"HTTP {response.status_code}" + (f" {code}" if code else "")


# --- the scratch table -----------------------------------------------------------------------------------


def scratch_spec(name: str) -> TableSpec:
    """A table like the specs' (every field kind they use), named ``name``."""
    return TableSpec(
        name=name, resource_type="doctor",
        fields=(Field("id", Kind.TEXT, required=True, max_length=128), Field("status"),
                Field("retry_count", Kind.INT), Field("score", Kind.FLOAT), Field("parameters", Kind.JSON),
                Field("tags", Kind.TEXT_ARRAY), Field("updated_at", Kind.TIMESTAMP)),
    )


@dataclass
class Scratch:
    """What the checks share: the clients, the scratch table and what is to be removed."""

    settings: Settings
    options: Options
    client: TablesClient
    raw: Raw
    suffix: str
    table_id: str | None = None
    keys: dict[str, str] = field(default_factory=dict)  # our field name -> "f<n>"
    inbox_ids: list[str] = field(default_factory=list)
    stopping: bool = False  # set (under ``lock``) when the removal starts: nothing is made after it
    lock: threading.Lock = field(default_factory=threading.Lock)
    _inbox: Any = None
    _serial: int = 0

    @property
    def name(self) -> str:
        return PREFIX + self.suffix

    @property
    def spec(self) -> TableSpec:
        return scratch_spec(self.name)

    @property
    def table(self) -> str:
        if self.table_id is None:
            raise RuntimeError("no scratch table")
        return self.table_id

    def inbox(self) -> Any:  # shared.adapters.trigger_inbox.InboxClient, made at first use
        if self._inbox is None:
            from shared.adapters.trigger_inbox import InboxClient

            self._inbox = InboxClient.for_tables(self.client)
        return self._inbox

    def new_id(self, what: str) -> str:
        self._serial += 1
        return f"{self.name}-{what}-{self._serial}"

    @contextmanager
    def making(self) -> Iterator[None]:
        """Held while making something the removal must find: a check still running after Ctrl-C makes
        nothing once the removal started (:meth:`remove` sets ``stopping`` under the same lock)."""
        with self.lock:
            if self.stopping:
                raise RuntimeError("the scratch table is being removed")
            yield

    def create(self) -> None:
        with self.making():
            made = self.client.create_table(self.name, "zsync doctor --live: scratch table, removed after the run")
            self.table_id = str(made["id"])
        fields = self.client.create_fields(self.table_id, self.spec.zapier_fields())
        self.keys = {f.name: f.key for f in fields}

    def remove(self) -> Finding:
        """Delete the scratch inboxes and table (waiting out a 429 up to :data:`CLEANUP_BUDGET_S`)."""
        with self.lock:  # waits for a table or inbox being made right now (one request)
            self.stopping = True
        problems, removed = [], []
        for inbox_id in self.inbox_ids:
            try:
                self.inbox().delete(inbox_id)
                removed.append(f"inbox {inbox_id}")
            except Exception as exc:  # report it, go on removing
                problems.append(f"inbox {inbox_id}: {type(exc).__name__}: {str(exc)[:120]}")
        if self.table_id is not None:
            outcome = self._delete_table()
            (removed if outcome is None else problems).append(f"table {self.table_id}" if outcome is None
                                                               else f"table {self.table_id}: {outcome}")
        if problems:
            return found("cleanup", False, "NOT removed (delete by hand): " + "; ".join(problems))
        return found("cleanup", True, "removed " + (", ".join(removed) or "nothing (none was made)"))

    def _delete_table(self) -> str | None:
        url = f"{self.client.base_url}{API_PREFIX}/tables/{quote(self.table, safe='')}"
        deadline = time.monotonic() + CLEANUP_BUDGET_S
        while True:
            try:
                response = self.raw.call("DELETE", url)
            except requests.RequestException as exc:
                return f"{type(exc).__name__}"
            if response.status_code < 300 or response.status_code == 404:
                return None
            wait = _retry_after(response)
            if response.status_code not in (429, 502, 503, 504) or time.monotonic() + wait > deadline:
                return brief(response)
            time.sleep(wait)

    def close(self) -> None:
        if self._inbox is not None:
            self._inbox.close()
        self.raw.close()
        self.client.close()


def _retry_after(response: requests.Response, default: float = 1.0) -> float:
    try:
        return min(max(float(response.headers.get("Retry-After", default)), 0.0), 30.0)
    except ValueError:
        return default


# (the keys it reports: each is "could not check" when it fails to run or leaves one out, the check)
Check = tuple[tuple[str, ...], Callable[["Scratch"], list[Finding]]]
