"""shared.services.conflict against the SQL that states the rule (zsync.version_cmp / version_cmp_many): the pairs
it decides by time alone must get the SQL's answer, and only ties may cost a query."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import psycopg
import pytest

from shared.adapters import supabase_db
from shared.core.mapping import parse_record
from shared.core.spec import TABLES, Kind, TableSpec
from shared.services import conflict

TIMES = [None, "2025-12-22T10:00:00Z", "2025-12-22T10:00:00.000400Z", "2025-12-22T10:00:00.000900Z",
         "2025-12-22T10:00:00.001Z", "2025-12-22T09:59:59.999999+00:00", "2025-12-22T11:00:00.0005+01:00",
         "1960-01-01T00:00:00.0005Z"]


def _rows(spec: TableSpec) -> list[dict]:
    """Rows of one id: every time above (where the table has ``updated_at``) times two contents."""
    text = next(f.name for f in spec.fields if f.kind is Kind.TEXT and f.name != "id")
    times = TIMES if any(f.name == "updated_at" for f in spec.fields) else [None]
    return [parse_record(spec, {"id": "x", text: content} | ({"updated_at": ts} if ts else {}), "tables")
            for ts in times for content in ("a", "b")]


@pytest.fixture
def closed(database_url: str) -> Iterator[psycopg.Connection]:
    """A connection that fails any query: a compare that reaches the database raises."""
    conn = psycopg.connect(database_url)
    conn.close()
    yield conn


@pytest.mark.parametrize("table", sorted(TABLES))
def test_compare_many_is_version_cmp_many(db: psycopg.Connection, table: str) -> None:
    spec = TABLES[table]
    rows = _rows(spec)
    pairs = [(a, b) for a in rows for b in rows]
    expected = supabase_db.version_cmp_many(db, spec, pairs)
    assert conflict.compare_many(db, spec, pairs) == expected
    assert [conflict.compare(db, spec, a, b) for a, b in pairs[:40]] == expected[:40]
    assert set(expected) == {-1, 0, 1}  # 0: the same content within one millisecond (the same version)


def test_times_that_differ_are_decided_without_a_query(db: psycopg.Connection, closed: psycopg.Connection) -> None:
    spec = TABLES["agent_jobs"]
    t = datetime(2025, 12, 22, 10, tzinfo=UTC)
    old = parse_record(spec, {"id": "x", "status": "zzz", "updated_at": t.isoformat()}, "tables")
    new = old | {"status": "aaa", "updated_at": t + timedelta(milliseconds=1)}
    none = old | {"updated_at": None}
    other_zone = old | {"updated_at": (t + timedelta(seconds=1)).astimezone(timezone(timedelta(hours=-5)))}
    pairs = [(new, old), (old, new), (old, none), (none, old), (other_zone, old)]
    assert conflict.compare_many(closed, spec, pairs) == [1, -1, 1, -1, 1]
    assert conflict.compare_many(db, spec, pairs) == supabase_db.version_cmp_many(db, spec, pairs)
    assert conflict.compare(closed, spec, new, old) == 1
    assert conflict.compare(closed, spec, new, None) == 1  # nothing stored: always applied
    with pytest.raises(psycopg.OperationalError):  # a tie within the millisecond: the hash, in SQL
        conflict.compare_many(closed, spec, [(old | {"updated_at": t + timedelta(microseconds=900)}, old)])
    with pytest.raises(psycopg.OperationalError):  # a table without versions: only the SQL decides
        conflict.compare_many(closed, TABLES["audit_log"], [({"id": "x"}, {"id": "x"})])


def test_ties_go_to_sql_in_batches(db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = TABLES["agent_jobs"]
    rows = [parse_record(spec, {"id": "x", "status": str(i), "updated_at": "2025-12-22T10:00:00Z"}, "tables")
            for i in range(7)]
    pairs = [(a, b) for a in rows for b in rows]
    calls: list[int] = []
    real = supabase_db.version_cmp_many

    def counted(conn, spec_, chunk):
        calls.append(len(chunk))
        return real(conn, spec_, chunk)

    monkeypatch.setattr(conflict, "SQL_BATCH", 10)
    monkeypatch.setattr(supabase_db, "version_cmp_many", counted)
    assert conflict.compare_many(db, spec, pairs) == real(db, spec, pairs)
    assert calls == [10, 10, 10, 10, 9]
