"""Cell values as Zapier Tables treats them: the field types and whether a value fits one
(:func:`check_value`), empty cells, the index text that ``exact``/``in`` compare, the query filters'
operators (:func:`matches`) and sort order; plus ULIDs, timestamps and paging cursors."""

from __future__ import annotations

import base64
import binascii
import json
import math
import secrets
import time
from datetime import UTC, datetime
from typing import Any

from infra.local.tables_service.errors import ApiError

Data = dict[str, Any]  # a JSON object
Rec = dict[str, Any]  # a record as the API answers it: id, data, created_at, edited_at, ...

FIELD_TYPES = frozenset({
    "string", "text", "number", "decimal", "boolean", "datetime", "json", "uuid", "email", "link",
    "currency", "phone_number", "multiple_string", "multiple_email", "multiple_link", "multiple_number",
})
OPERATORS = frozenset({"exact", "different", "contains", "icontains", "gte", "gt", "lt", "lte", "in", "isnull",
                       "startswith"})
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def utc_now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_ulid() -> str:
    """A ULID: 48-bit millisecond time + 80 random bits, Crockford base32, 26 characters."""
    value = (time.time_ns() // 1_000_000) << 80 | secrets.randbits(80)
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def ulid_to_uuid(ulid: str) -> str:
    """The UUID form of a ULID (the public API v2's ids): the same 128 bits as 8-4-4-4-12 lowercase hex."""
    value = 0
    for char in ulid:
        value = value << 5 | _CROCKFORD.index(char)
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def uuid_to_ulid(given: Any) -> str | None:
    """The ULID of a UUID-form id (a ULID passes through); None when ``given`` is neither."""
    if not isinstance(given, str):
        return None
    if len(given) == 26 and all(c in _CROCKFORD for c in given) and given[0] in "01234567":
        return given
    hexed = given.replace("-", "").lower()
    if len(given) != 36 or len(hexed) != 32 or any(c not in "0123456789abcdef" for c in hexed) or [
            len(p) for p in given.split("-")] != [8, 4, 4, 4, 12]:
        return None
    value = int(hexed, 16)
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def index_text(value: Any) -> str | None:
    """The text an ``exact``/``in`` filter compares (numbers canonical, so 3 and 3.0 match)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        number = float(value)
        return str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def encode_cursor(position: dict[str, int]) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode().rstrip("=")


def decode_cursor(cursor: Any) -> dict[str, int]:
    try:
        if not isinstance(cursor, str):
            raise ValueError(cursor)
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(value, dict) or not all(isinstance(v, int) for v in value.values()):
            raise ValueError(cursor)
        return value
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "invalid cursor") from None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _datetime_ok(value: str) -> bool:
    try:
        datetime.fromisoformat(value.strip())
    except ValueError:
        return False
    return True


def check_value(ftype: str, value: Any) -> tuple[Any, str | None]:
    """``(stored value, None)`` or ``(None, problem)`` for a value written to a field of ``ftype``; an empty
    value (null, "", []) empties the cell whatever the type."""
    if is_empty_cell(value):
        return None, None
    match ftype:
        case "number" | "decimal" | "currency":
            number = _number(value)
            if number is None:
                return None, f"{value!r:.60} is not a number"
            if isinstance(value, int | float) and not isinstance(value, bool):
                return value, None
            return (int(number) if number.is_integer() else number), None
        case "boolean":
            return (value, None) if isinstance(value, bool) else (None, f"{value!r:.60} is not a boolean")
        case "datetime":
            if isinstance(value, str) and _datetime_ok(value):
                return value, None
            return None, f"{value!r:.60} is not an ISO-8601 datetime"
        case "json":
            return value, None  # any JSON value (JSON text stays text)
        case _ if ftype.startswith("multiple_"):
            if isinstance(value, list) and all(isinstance(v, str | int | float) and not isinstance(v, bool)
                                               for v in value):
                return value, None
            return None, f"{value!r:.60} is not a list"
        case _:
            if isinstance(value, str):
                return value, None
            if isinstance(value, int | float) and not isinstance(value, bool):
                return str(value), None
            return None, f"{value!r:.60} is not text"


def matches(op: str, stored: Any, wanted: Any) -> bool:
    if op == "isnull":
        is_null = stored is None or stored == "" or stored == []
        return is_null == bool(wanted)
    if op == "in":
        return isinstance(wanted, list) and index_text(stored) in {index_text(w) for w in wanted}
    if op == "exact":
        return stored is not None and index_text(stored) == index_text(wanted)
    if op == "different":
        return index_text(stored) != index_text(wanted)
    if stored is None:
        return False
    if op in ("contains", "icontains", "startswith"):
        text, part = str(index_text(stored)), str(index_text(wanted))
        if op == "icontains":
            return part.lower() in text.lower()
        return text.startswith(part) if op == "startswith" else part in text
    a, b = _number(stored), _number(wanted)
    if a is None or b is None:
        a, b = index_text(stored), index_text(wanted)  # ISO datetimes and text compare as text
    return {"gt": a > b, "gte": a >= b, "lt": a < b, "lte": a <= b}[op]  # type: ignore[operator]


def is_empty_cell(value: Any) -> bool:
    """A value Zapier shows as an empty cell and leaves out of a record's ``data``."""
    return value is None or value == "" or value == []


def sort_key(value: Any) -> tuple[int, Any]:
    number = _number(value) if not isinstance(value, str) else None
    if value is None:
        return (2, "")
    return (0, number) if number is not None else (1, str(index_text(value)))
