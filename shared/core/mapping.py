"""Record mapping between Zapier Tables and Supabase, driven by :mod:`shared.core.spec`.

Three shapes of one record:

* **Tables fields** - what a Zap sends / the Tables API stores, by field name, typed as
  :data:`shared.core.spec.ZAPIER_FIELD_TYPES` says: JSON fields as JSON values (JSON text accepted),
  timestamps as ISO strings, arrays as arrays (comma text accepted), numbers (numeric text accepted).
* **Supabase record** - what a Database Webhook sends: Postgres JSON (jsonb nested, text[] arrays,
  timestamptz as ISO strings with an offset).
* **Row** - the canonical Python form both are parsed into (``datetime`` in UTC, ``dict``/``list`` for
  JSON, ``list[str]`` for arrays). Every row has every field of its table.

Parsing goes through pydantic models generated from the spec, so an invalid record is rejected with a
list of ``{"field", "problem"}`` entries and nothing half-parsed ever reaches a database.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, create_model

from shared.core.spec import TEXT_MAX_LENGTH, Field, Kind, TableSpec

Source = Literal["tables", "supabase"]
INT_MIN, INT_MAX = -(2**31), 2**31 - 1
_INT_TEXT = re.compile(r"^\s*[+-]?\d+\s*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # the id CHECK: no \x01-\x1f nor \x7f (NUL never reaches Postgres)
# The timestamp CHECKs (migration *_zsync_deletes_outbox.sql, zsync_<column>_syncable): strictly between these.
TS_MIN = datetime(1, 1, 2, tzinfo=UTC)
TS_MAX = datetime(9999, 12, 31, tzinfo=UTC)


class InvalidRecord(ValueError):
    """A record that cannot be synced; ``problems`` names each field and what is wrong with it."""

    def __init__(self, problems: list[dict[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{p['field']}: {p['problem']}" for p in problems))


# --- scalar checks --------------------------------------------------------------------------------


def _check_text(value: str, what: str = "text") -> str:
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character, which Postgres cannot store")
    if not value.isascii():  # only non-ASCII text can hold a surrogate
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{what} contains an unpaired UTF-16 surrogate (not valid Unicode)") from None
    return value


def _check_json_value(value: Any, depth: int = 0) -> None:
    if depth >= 64:
        raise ValueError("JSON nested deeper than 64 levels")
    if isinstance(value, str):
        _check_text(value, "a JSON string")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError("JSON contains NaN or Infinity, which is not valid JSON")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, "a JSON key")
            _check_json_value(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_json_value(v, depth + 1)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "number", float: "number", str: "text", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


# --- per-kind coercion ------------------------------------------------------------------------------


def coerce_text(value: Any, max_length: int | None = None) -> str | None:
    if value is None:
        return None
    if type(value) is not str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"expected text, got {_type_name(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("expected text, got NaN/Infinity")
    text = _check_text(str(value))
    limit = max_length or TEXT_MAX_LENGTH
    if len(text) > limit:
        raise ValueError(f"longer than {limit} characters ({len(text)})")
    return text


def coerce_id(value: Any, max_length: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"id must be text, got {_type_name(value)}" if value is not None else "id is missing")
    if not value.strip():
        raise ValueError("id is empty")
    if len(value) > max_length:
        raise ValueError(f"id is longer than {max_length} characters ({len(value)})")
    control = _CONTROL.search(value)
    if control:
        raise ValueError(f"id contains control characters ({control.group()!r} at position {control.start()} of "
                         f"{value[:60]!r})")
    return _check_text(value, "id")


def coerce_int(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError("expected a whole number, got a boolean")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"expected a whole number, got {value!r}")
        value = int(value)
    elif isinstance(value, str):
        if not _INT_TEXT.match(value):
            raise ValueError(f"expected a whole number, got {value[:40]!r}")
        value = int(value)
    elif not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {_type_name(value)}")
    if not INT_MIN <= value <= INT_MAX:
        raise ValueError(f"{value} is out of range for a 32-bit integer")
    return value


def coerce_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value[:40]!r}") from None
    else:
        raise ValueError(f"expected a number, got {_type_name(value)}")
    if not math.isfinite(number):
        raise ValueError("must be a finite number (NaN and Infinity are not allowed)")
    return number


def coerce_json(value: Any, source: Source) -> Any:
    """Tables: a JSON value, or a JSON document as text ("" = empty). Supabase: the jsonb value itself.

    Text from Tables is always read as JSON text, which is why :func:`to_tables_fields` sends a JSON
    *string* value as JSON text: whichever form Zapier hands back, it parses to the same value."""
    if source == "tables":
        if value is None or value == "":
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value, parse_constant=_reject_constant)
            except json.JSONDecodeError as exc:
                raise ValueError(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
            except RecursionError:
                raise ValueError("invalid JSON: nested too deeply to parse") from None
    _check_json_value(value)
    return value


def normalize_timestamp(value: Any) -> datetime | None:
    """Any accepted timestamp -> an aware UTC datetime with microsecond precision (None for empty).

    Accepts ISO-8601 text with "Z", an offset or none (naive means UTC), a space instead of "T", a bare
    date, and datetime/date objects. Idempotent: normalising a normalised value returns it unchanged.
    """
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, date):
        parsed = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        text = value.strip()
        if not 8 <= len(text) <= 40 or not text[:4].isdigit():
            raise ValueError(f"not a timestamp: {value[:40]!r} (expected ISO-8601, e.g. 2025-12-22T10:00:00Z)")
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError as exc:
            raise ValueError(f"not a valid timestamp: {value[:40]!r} ({exc})") from None
    else:
        raise ValueError(f"expected an ISO-8601 timestamp, got {_type_name(value)}")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        utc = parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"timestamp out of range: {value!r}") from None
    if not TS_MIN < utc < TS_MAX:
        raise ValueError(f"timestamp out of range: {value!r} (must be after {format_timestamp(TS_MIN)} and before "
                         f"{format_timestamp(TS_MAX)}, as the database requires)")
    return utc


def coerce_text_array(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
        return [_check_text(i, "an array item") for i in items if i]
    if isinstance(value, list | tuple):
        out = []
        for item in value:
            if not isinstance(item, str):
                raise ValueError(f"array items must be text, got {_type_name(item)}")
            out.append(_check_text(item, "an array item"))
        return out
    raise ValueError(f"expected a comma-separated text or an array, got {_type_name(value)}")


def _coercer(f: Field, source: Source):
    if f.name == "id":
        return lambda v: coerce_id(v, f.max_length or 128)
    match f.kind:
        case Kind.TEXT:
            return lambda v: coerce_text(v, f.max_length)
        case Kind.INT:
            return coerce_int
        case Kind.FLOAT:
            return coerce_float
        case Kind.JSON:
            return lambda v: coerce_json(v, source)
        case Kind.TIMESTAMP:
            return normalize_timestamp
        case Kind.TEXT_ARRAY:
            return coerce_text_array
    raise AssertionError(f.kind)


def _default(f: Field) -> Any:
    return list(f.default) if isinstance(f.default, tuple) else f.default


@cache
def record_model(spec: TableSpec, source: Source) -> type[BaseModel]:
    """The pydantic model of one table's record as ``source`` sends it (extra keys are ignored)."""
    fields: dict[str, Any] = {}
    for f in spec.fields:
        annotated = Annotated[Any, BeforeValidator(_coercer(f, source))]
        fields[f.name] = (annotated, ...) if f.required else (annotated, _default(f))
    return create_model(  # type: ignore[call-overload]
        f"{spec.name}_{source}_record",
        __config__=ConfigDict(extra="ignore", validate_default=False, frozen=True),
        **fields,
    )


def _problems(exc: ValidationError) -> list[dict[str, str]]:
    out = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in err["loc"]) or "record"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "required field is missing"
        out.append({"field": where, "problem": msg})
    return out


def parse_record(spec: TableSpec, record: Mapping[str, Any], source: Source) -> dict[str, Any]:
    """Validate and normalise a record into a row (every spec field present). Raises InvalidRecord."""
    if not isinstance(record, Mapping):
        raise InvalidRecord([{"field": "record", "problem": f"expected a JSON object, got {_type_name(record)}"}])
    try:
        model = record_model(spec, source).model_validate(dict(record))
    except ValidationError as exc:
        raise InvalidRecord(_problems(exc)) from None
    return model.model_dump()


def time_ahead(field: str, ts: Any, now: datetime, max_skew_s: float) -> list[dict[str, str]]:
    """The problem of a time ``field`` further than ``max_skew_s`` ahead of ``now`` (none, or not a time: ``[]``).

    Such a time would win every comparison until the clocks caught up (and the database's hybrid-logical rule
    would give every later write that time + 1 ms), so it is never stored or compared as a version."""
    if not isinstance(ts, datetime) or (ahead := (ts - now).total_seconds()) <= max_skew_s:
        return []
    return [{"field": field, "problem": f"{format_timestamp(ts)} is {ahead:.0f} s ahead of the clock "
             f"({format_timestamp(now)}); at most {max_skew_s:g} s allowed (ZSYNC_MAX_FUTURE_SKEW_S)"}]


def version_ahead(spec: TableSpec, row: Mapping[str, Any], now: datetime, max_skew_s: float) -> list[dict[str, str]]:
    """:func:`time_ahead` of the row's version (``updated_at``)."""
    return time_ahead(spec.version, row.get(spec.version), now, max_skew_s) if spec.version else []


def check_version_skew(spec: TableSpec, row: Mapping[str, Any], now: datetime, max_skew_s: float) -> None:
    """Raise :class:`InvalidRecord` when :func:`version_ahead` finds a problem."""
    problems = version_ahead(spec, row, now, max_skew_s)
    if problems:
        raise InvalidRecord(problems)


_MISSING = object()


@cache
def _plain_parser(spec: TableSpec, source: Source):
    """:func:`parse_record`'s result for a valid record without the pydantic model around the same
    coercers (a bulk read parses every record); anything it does not accept goes through
    :func:`parse_record`, which raises the same :class:`InvalidRecord` it always does."""
    def none_passes(coerce: Any) -> bool:  # coerce(None) is None: a null needs no call
        try:
            return coerce(None) is None
        except ValueError:
            return False

    plan = [(f.name, c, none_passes(c), f.required, f.default)
            for f in spec.fields for c in [_coercer(f, source)]]

    def parse(record: Mapping[str, Any]) -> dict[str, Any]:
        if type(record) is not dict:
            return parse_record(spec, record, source)
        row: dict[str, Any] = {}
        try:
            for name, coerce, null_ok, required, default in plan:
                value = record.get(name, _MISSING)
                if value is None and null_ok:
                    row[name] = None
                elif value is not _MISSING:
                    row[name] = coerce(value)
                elif required:
                    return parse_record(spec, record, source)
                else:
                    row[name] = list(default) if isinstance(default, tuple) else default
        except Exception:  # the model path reports (or raises) exactly what it always did
            return parse_record(spec, record, source)
        return row

    return parse


def parse_record_fast(spec: TableSpec, record: Mapping[str, Any], source: Source) -> dict[str, Any]:
    """:func:`parse_record` (same row, same errors), faster for valid records: for bulk reads."""
    return _plain_parser(spec, source)(record)


def parse_tables_record(spec: TableSpec, record: Mapping[str, Any], received_at: datetime | None = None,
                        *, fast: bool = False) -> dict:
    """A record as Zapier Tables / a Zap sends it -> row. A versioned record without ``updated_at`` is
    as new as its arrival (``received_at``). ``fast``: :func:`parse_record_fast` (same result)."""
    row = parse_record_fast(spec, record, "tables") if fast else parse_record(spec, record, "tables")
    if spec.version and row.get(spec.version) is None and received_at is not None:
        row[spec.version] = received_at.astimezone(UTC)
    return row


def parse_supabase_record(spec: TableSpec, record: Mapping[str, Any], *, fast: bool = False) -> dict[str, Any]:
    return parse_record_fast(spec, record, "supabase") if fast else parse_record(spec, record, "supabase")


# --- output -------------------------------------------------------------------------------------------


def format_timestamp(value: datetime | None) -> str | None:
    """UTC ISO-8601 with "Z" (microseconds only when non-zero): how timestamps are written to Tables."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def to_tables_fields(spec: TableSpec, row: Mapping[str, Any]) -> dict[str, Any]:
    """Row -> the fields written to Zapier Tables, by name (JSON values, ISO timestamps, arrays)."""
    out: dict[str, Any] = {}
    for f in spec.fields:
        value = row.get(f.name)
        match f.kind:
            case Kind.JSON:
                out[f.name] = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else value
            case Kind.TIMESTAMP:
                out[f.name] = format_timestamp(value)
            case Kind.TEXT_ARRAY:
                out[f.name] = list(value or [])
            case _:
                out[f.name] = value
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def row_to_json(row: Mapping[str, Any]) -> str:
    """Row -> JSON text for Postgres (``jsonb_populate_record``)."""
    return json.dumps(row, default=_json_default, ensure_ascii=False, allow_nan=False)
