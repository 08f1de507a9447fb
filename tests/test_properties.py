"""Property-based tests (hypothesis) of the mapping and of the conflict rule, the latter through the real
SQL (``zsync.version_cmp`` / ``zsync.sync_upsert`` via :mod:`shared.adapters.supabase_db`) on a migrated database.

* Round trips: every valid row survives Tables fields -> row, and Supabase (sync_upsert, then ``to_jsonb``
  as the Database Webhook serialises it) -> row, unchanged.
* Timestamp normalisation is idempotent, and the parsers fail only with their own error types.
* The version order is a total order: antisymmetric, transitive, ``cmp == 0`` exactly for the same
  ``updated_at`` and the same canonical content (an empty text counting as no value), and applying a set
  of versions with ``sync_upsert`` in any order ends with the maximum.

Versions compare JSON numbers by value (``12.50`` = ``12.5``, ``1.0`` = ``1``, at double precision) and
timestamps at millisecond precision, see :func:`canon_json` and :func:`ms`.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.adapters import supabase_db
from shared.core.mapping import (
    INT_MAX,
    INT_MIN,
    InvalidRecord,
    format_timestamp,
    normalize_timestamp,
    parse_supabase_record,
    parse_tables_record,
    to_tables_fields,
)
from shared.core.spec import TABLES, Kind, TableSpec

VERSIONED = [t for t in TABLES.values() if t.version]
AUDIT = TABLES["audit_log"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=False, print_blob=True)

# --- strategies ---------------------------------------------------------------------------------------

TEXT_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
texts = st.text(TEXT_CHARS, max_size=30)
ids = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=128).filter(str.strip)
int32 = st.integers(INT_MIN, INT_MAX)
floats = st.floats(allow_nan=False, allow_infinity=False)
timestamps = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC))
# A version ahead of the clock is refused (ZSYNC_MAX_FUTURE_SKEW_S): stored versions lie in the past.
versions = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2026, 1, 1), timezones=st.just(UTC))
offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | floats | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)
array_items = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00,"), min_size=1,
                      max_size=12).filter(lambda s: s == s.strip() and s != "")

NOT_NULL = {("audit_log", "timestamp"), ("audit_log", "severity"), ("audit_log", "compliance_tags"),
            ("audit_log", "retention_days")}


def value_of(kind: Kind) -> st.SearchStrategy[Any]:
    return {
        Kind.TEXT: texts,
        Kind.INT: int32,
        Kind.FLOAT: floats,
        Kind.JSON: json_values,
        Kind.TIMESTAMP: timestamps,
        Kind.TEXT_ARRAY: st.lists(array_items, max_size=4),
    }[kind]


def rows(spec: TableSpec) -> st.SearchStrategy[dict[str, Any]]:
    """A valid row: what the sync stores (every field; NOT NULL columns and the version always set)."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in spec.fields:
        if f.name == "id":
            fields[f.name] = ids
        elif f.name == spec.version:
            fields[f.name] = versions
        elif (spec.name, f.name) in NOT_NULL:
            fields[f.name] = value_of(f.kind)
        else:
            fields[f.name] = st.none() | value_of(f.kind)
    return st.fixed_dictionaries(fields)


any_row = st.sampled_from(list(TABLES.values())).flatmap(lambda spec: st.tuples(st.just(spec), rows(spec)))

# Versions of ONE record drawn from small pools, so ties and equal content are frequent.
T0 = datetime(2025, 12, 22, 10, 0, tzinfo=UTC)
SMALL = {
    Kind.TEXT: st.sampled_from([None, "", "a", "b", "'; DROP TABLE agent_jobs; --"]),
    Kind.INT: st.sampled_from([None, 0, 1, -1]),
    Kind.FLOAT: st.sampled_from([None, 0.0, -0.0, 0.5, 1e16]),
    Kind.JSON: st.sampled_from([None, "", {}, [], {"a": 1}, {"a": 1.0}, {"a": [1, {"b": None}]}, "x"]),
    Kind.TIMESTAMP: st.sampled_from([None, T0, T0 + timedelta(microseconds=1), T0 + timedelta(hours=1)]),
}


def small_versions(spec: TableSpec) -> st.SearchStrategy[dict[str, Any]]:
    """One record (fixed id): two text fields and the first field of every other kind vary over tiny
    pools; updated_at may be missing."""
    candidates = [f for f in spec.fields if f.name not in ("id", spec.version)]
    varying = [f for f in candidates if f.kind is Kind.TEXT][:2]
    varying += [next(f for f in candidates if f.kind is k) for k in SMALL if k is not Kind.TEXT
                and any(f.kind is k for f in candidates)]
    varying.append(spec.field("updated_at"))
    fields: dict[str, st.SearchStrategy[Any]] = {f.name: st.none() for f in spec.fields}
    fields["id"] = st.just("version-record")
    for f in varying:
        fields[f.name] = SMALL[f.kind]
    return st.fixed_dictionaries(fields)


def related_versions(spec: TableSpec, n: int) -> st.SearchStrategy[list[dict[str, Any]]]:
    """``n`` versions of one record, each a base version with 0-2 fields redrawn: near-equal versions
    (same updated_at, "" against null, 0.0 against -0.0, 1 against 1.0 ...) are common."""
    names = [f.name for f in spec.fields if f.name != "id"]

    def edit(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        changes = st.dictionaries(st.sampled_from(names).filter(lambda name: spec.field(name).kind in SMALL),
                                  st.none(), max_size=2)
        return changes.flatmap(lambda ch: st.fixed_dictionaries(
            {name: SMALL[spec.field(name).kind] for name in ch}).map(lambda new: base | new))

    return small_versions(spec).flatmap(lambda base: st.lists(edit(base), min_size=n, max_size=n))


# --- comparing rows -----------------------------------------------------------------------------------


def fixed(number: Decimal) -> str:
    """A JSON number as Postgres' numeric prints it: positional notation, no negative zero."""
    text = format(number, "f")
    return text.lstrip("-") if number == 0 else text


def canon_json(value: Any, by_value: bool = False) -> Any:
    """A JSON value with numbers as jsonb keeps them (exact decimal, scale kept), bools kept apart; with
    ``by_value``, as the version hash sees it: numbers by value at double precision (12.50 = 12.5)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if by_value and isinstance(value, int | float):
        return ("n", float(value) if abs(value) <= 1e300 else fixed(Decimal(repr(value))))
    if isinstance(value, int):
        return ("n", str(value))
    if isinstance(value, float):
        return ("n", fixed(Decimal(repr(value))))
    if isinstance(value, list):
        return ("l", tuple(canon_json(v, by_value) for v in value))
    if isinstance(value, dict):
        return ("o", tuple(sorted((k, canon_json(v, by_value)) for k, v in value.items())))
    raise TypeError(type(value))


def ms(value: datetime | None) -> datetime | None:
    """Timestamps compare at millisecond precision (a Tables field may keep no more)."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000) if value is not None else None


def canon(spec: TableSpec, row: dict[str, Any], version: bool = False) -> dict[str, Any]:
    """Exact (round trips), or with ``version`` as the version hash compares (by value, milliseconds)."""
    out = {}
    for f in spec.fields:
        value = row.get(f.name)
        if f.kind is Kind.JSON:
            out[f.name] = canon_json(value, by_value=version)
        else:
            out[f.name] = ms(value) if version and f.kind is Kind.TIMESTAMP else value
    return out


def content(spec: TableSpec, row: dict[str, Any]) -> dict[str, Any]:
    """What the version hash covers: everything but updated_at, empty text and null left out."""
    return {k: v for k, v in canon(spec, row, version=True).items()
            if k != spec.version and v is not None and v != "" and v != []}


# --- database -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True, prepare_threshold=None) as c:
        yield c


def stored_row(c: psycopg.Connection, spec: TableSpec, record_id: str) -> dict[str, Any]:
    record = supabase_db.fetch_row(c, spec, record_id)  # to_jsonb: the Database Webhook's record shape
    assert record is not None
    return parse_supabase_record(spec, record)


# --- round trips --------------------------------------------------------------------------------------


@SETTINGS
@given(any_row, offsets, st.booleans())
def test_tables_fields_round_trip_is_the_identity(spec_row, offset, as_strings):
    spec, row = spec_row
    fields = to_tables_fields(spec, row)
    assert canon(spec, parse_tables_record(spec, fields)) == canon(spec, row)
    # The same record as a Zap may send it: timestamps in another offset, numbers as numeric strings.
    for f in spec.fields:
        value = fields[f.name]
        if f.kind is Kind.TIMESTAMP and value is not None:
            fields[f.name] = normalize_timestamp(value).astimezone(offset).isoformat()
        elif f.kind in (Kind.INT, Kind.FLOAT) and value is not None and as_strings:
            fields[f.name] = repr(value)
        elif f.kind is Kind.JSON and value is not None and as_strings and not isinstance(value, str):
            fields[f.name] = json.dumps(value)  # Zapier may hand a json field back as JSON text
        elif f.kind is Kind.TEXT_ARRAY and as_strings and all(i and i == i.strip() and "," not in i for i in value):
            fields[f.name] = ", ".join(value)  # ... and a list as comma text
    assert canon(spec, parse_tables_record(spec, fields)) == canon(spec, row)


@SETTINGS
@given(any_row)
def test_tables_to_supabase_to_tables_round_trip_through_postgres(conn, spec_row):
    spec, row = spec_row
    fields = to_tables_fields(spec, row)  # as Zapier Tables holds it
    parsed = parse_tables_record(spec, fields)  # what *_to_supabase receives
    with conn.transaction(force_rollback=True):
        if spec.append_only:
            assert supabase_db.append_audit(conn, parsed)
        else:
            assert supabase_db.sync_upsert(conn, spec, parsed)[0] == "applied"
        back = stored_row(conn, spec, row["id"])  # what *_to_tables receives
    assert canon(spec, back) == canon(spec, row)
    again = parse_tables_record(spec, to_tables_fields(spec, back))  # ... and writes back to Tables
    assert canon(spec, again) == canon(spec, row)


# --- timestamps and parser robustness -------------------------------------------------------------------


def timestamp_texts(moment: datetime, offset: timezone, form: int) -> Any:
    local = moment.astimezone(offset)
    match form:
        case 0:
            return local.isoformat()
        case 1:
            return format_timestamp(moment)
        case 2:
            return local.isoformat(sep=" ")
        case 3:
            return moment.replace(tzinfo=None).isoformat()  # naive: UTC
        case 4:
            return local
        case _:
            return date(moment.year, moment.month, moment.day)


@SETTINGS
@given(timestamps, offsets, st.integers(0, 5))
def test_timestamp_normalisation_is_idempotent_and_lossless(moment, offset, form):
    value = timestamp_texts(moment, offset, form)
    once = normalize_timestamp(value)
    assert once is not None and once.tzinfo is UTC
    assert normalize_timestamp(once) == once
    assert normalize_timestamp(format_timestamp(once)) == once
    if form < 5:
        assert once == moment
    else:
        assert once == datetime(moment.year, moment.month, moment.day, tzinfo=UTC)


ISO_LIKE = r"\A\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:?\d{2})?\Z"


@SETTINGS
@given(st.text(max_size=45) | st.from_regex(ISO_LIKE))
def test_timestamp_text_is_normalised_or_rejected_with_a_value_error(text):
    try:
        once = normalize_timestamp(text)
    except ValueError:
        return
    assert once is None or normalize_timestamp(format_timestamp(once)) == once


scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.from_regex(
    r"\A-?\d{1,12}(\.\d{1,4})?\Z") | st.sampled_from(["NaN", "Infinity", "-inf", "1e400", "2025-02-31", "{", "[1,"])
hostile_values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                                           max_size=3), max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(list(TABLES.values())).flatmap(
    lambda spec: st.tuples(st.just(spec), st.dictionaries(st.sampled_from(spec.field_names), hostile_values))))
def test_parsers_fail_only_with_invalid_record(spec_record):
    spec, record = spec_record
    for parse in (lambda r: parse_tables_record(spec, r, received_at=T0), lambda r: parse_supabase_record(spec, r)):
        try:
            row = parse(record)
        except InvalidRecord as exc:
            assert exc.problems and all(set(p) == {"field", "problem"} for p in exc.problems)
            continue
        assert set(row) == set(spec.field_names)
        for f in spec.fields:
            if f.kind is Kind.FLOAT and row[f.name] is not None:
                assert math.isfinite(row[f.name])


# --- the conflict rule is a total order (real SQL) -------------------------------------------------------


def cmp(c: psycopg.Connection, spec: TableSpec, a: dict, b: dict) -> int:
    return supabase_db.version_cmp(c, spec, a, b)


versions_of = st.tuples(st.sampled_from(VERSIONED), st.integers(2, 5)).flatmap(
    lambda sn: st.tuples(st.just(sn[0]), related_versions(sn[0], sn[1])))


@SETTINGS
@given(versions_of)
def test_version_cmp_is_antisymmetric_and_zero_exactly_for_equal_versions(conn, spec_versions):
    spec, versions = spec_versions
    for a in versions:
        assert cmp(conn, spec, a, a) == 0
        for b in versions:
            ab, ba = cmp(conn, spec, a, b), cmp(conn, spec, b, a)
            assert ab in (-1, 0, 1) and ab == -ba, (a, b, ab, ba)  # never both "newer"
            same = ms(a[spec.version]) == ms(b[spec.version]) and content(spec, a) == content(spec, b)
            assert (ab == 0) == same, (a, b, ab)
            if ms(a[spec.version]) != ms(b[spec.version]):  # the later updated_at wins; a missing one is oldest
                later = max((a, b), key=lambda v: ms(v[spec.version]) or datetime.min.replace(tzinfo=UTC))
                assert ab == (1 if later is a else -1)


@SETTINGS
@given(st.sampled_from(VERSIONED).flatmap(lambda spec: st.tuples(st.just(spec), related_versions(spec, 3))))
def test_version_cmp_is_transitive(conn, spec_versions):
    spec, (a, b, c) = spec_versions
    ab, bc, ac = cmp(conn, spec, a, b), cmp(conn, spec, b, c), cmp(conn, spec, a, c)
    if ab >= 0 and bc >= 0:
        assert ac >= 0 and (ac > 0) == (ab > 0 or bc > 0), (ab, bc, ac)
    if ab <= 0 and bc <= 0:
        assert ac <= 0 and (ac < 0) == (ab < 0 or bc < 0), (ab, bc, ac)


@SETTINGS
@given(versions_of.flatmap(lambda sv: st.tuples(st.just(sv[0]), st.permutations(sv[1])))
       .filter(lambda sv: any(v[sv[0].version] for v in sv[1])))
def test_sync_upsert_in_any_order_ends_with_the_maximum(conn, spec_order):
    spec, order = spec_order
    order = [v for v in order if v[spec.version] is not None]  # the sync always carries a version
    key = functools.cmp_to_key(lambda a, b: cmp(conn, spec, a, b))
    winner = max(order, key=key)
    with conn.transaction(force_rollback=True):
        current: dict | None = None
        for version in order:
            outcome, _ = supabase_db.sync_upsert(conn, spec, version)
            expected = "applied" if current is None else {1: "applied", 0: "unchanged", -1: "skipped_stale"}[
                cmp(conn, spec, version, current)]
            assert outcome == expected
            if outcome == "applied":
                current = version
        final = stored_row(conn, spec, "version-record")
        assert cmp(conn, spec, final, winner) == 0
        assert final[spec.version] == winner[spec.version] and content(spec, final) == content(spec, winner)


EDITED = st.none() | st.sampled_from([T0 + timedelta(minutes=30), T0 + timedelta(hours=2)])


@SETTINGS
@given(versions_of.flatmap(lambda sv: st.tuples(st.just(sv[0]), st.just(sv[1]),
                                                st.lists(EDITED, min_size=len(sv[1]), max_size=len(sv[1])))))
def test_single_and_batch_paths_agree(conn, spec_versions_edited):
    """The single-record SQL (zsync.version_cmp, zsync.sync_apply) and the batch SQL (zsync.version_cmp_many,
    zsync.sync_apply_many: the generated multi-row statement, and a few rows through zsync.sync_apply) give
    the same order, outcomes and stored rows, with and without Zapier's edited_at."""
    spec, versions, edited = spec_versions_edited
    pairs = [(a, b) for a in versions for b in versions]
    one_by_one = [cmp(conn, spec, a, b) for a, b in pairs]
    assert supabase_db.version_cmp_many(conn, spec, pairs[:3]) == one_by_one[:3]  # a few: through version_cmp
    with conn.transaction(force_rollback=True):
        conn.execute("SELECT set_config('zsync.small_batch', '0', true)")  # always the generated statement
        assert supabase_db.version_cmp_many(conn, spec, pairs) == one_by_one
        assert supabase_db.version_cmp_many(conn, spec, pairs[:1]) == one_by_one[:1]
    results = {}
    for path in ("single", "batch", "small batch"):
        with conn.transaction(force_rollback=True):
            if path == "batch":
                conn.execute("SELECT set_config('zsync.small_batch', '0', true)")
            out: list[Any] = []
            for version, edited_at in zip(versions, edited, strict=True):
                if version[spec.version] is None:
                    continue  # the sync always carries a version
                if path == "single":
                    out.append(tuple(supabase_db.sync_apply(conn, spec, version, edited_at)))
                else:
                    out.append(tuple(supabase_db.sync_apply_many(conn, spec, [(version, edited_at)])[0]))
            out.append(supabase_db.fetch_row(conn, spec, "version-record"))
        results[path] = out
    assert results["single"] == results["batch"] == results["small batch"]
