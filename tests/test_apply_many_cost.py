"""Migration 20261129820000 (the batch apply's cost) keeps what it replaced: the statement-level outbox capture
writes the entries the row trigger wrote, for every kind of statement; the inline canonical form of a jsonb
object in the generated version expressions is zsync.canonical_json's."""

from __future__ import annotations

import random
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from shared.adapters.migrations import HISTORY_DIR


def _entries(db: psycopg.Connection, since: int) -> list[tuple]:
    return db.execute("SELECT record_id, op, record_updated_at::text FROM zsync.outbox "
                      "WHERE table_name = 'agent_jobs' AND id > %s ORDER BY id", (since,)).fetchall()


def _last(db: psycopg.Connection) -> int:
    return db.execute("SELECT coalesce(max(id), 0) FROM zsync.outbox").fetchone()[0]


def test_statement_capture_writes_one_entry_per_changed_row(db: psycopg.Connection) -> None:
    triggers = {r[0] for r in db.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = 'public.agent_jobs'::regclass "
                                         "AND tgname LIKE 'zsync_outbox%%'")}
    assert triggers == {"zsync_outbox_insert", "zsync_outbox_update", "zsync_outbox_delete"}
    start = _last(db)
    db.execute("INSERT INTO agent_jobs (id, status, updated_at) VALUES "
               "('cap-b', 'x', '2026-01-01T00:00:00Z'), ('cap-a', 'x', '2026-01-01T00:00:01Z')")
    got = _entries(db, start)
    assert [(r[0], r[1]) for r in got] == [("cap-b", "INSERT"), ("cap-a", "INSERT")]
    stored = dict(db.execute("SELECT id, updated_at::text FROM agent_jobs WHERE id LIKE 'cap-%%'").fetchall())
    assert {r[0]: r[2] for r in got} == stored

    start = _last(db)
    db.execute("UPDATE agent_jobs SET status = 'y' WHERE id LIKE 'cap-%%'")
    stored = dict(db.execute("SELECT id, updated_at::text FROM agent_jobs WHERE id LIKE 'cap-%%'").fetchall())
    assert sorted(_entries(db, start)) == sorted((k, "UPDATE", v) for k, v in stored.items())

    start = _last(db)  # an upsert: one row inserted, one updated, in one statement
    db.execute("INSERT INTO agent_jobs (id, status) VALUES ('cap-a', 'z'), ('cap-c', 'z') "
               "ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status")
    stored = dict(db.execute("SELECT id, updated_at::text FROM agent_jobs WHERE id LIKE 'cap-%%'").fetchall())
    assert sorted(_entries(db, start)) == [("cap-a", "UPDATE", stored["cap-a"]), ("cap-c", "INSERT", stored["cap-c"])]

    start = _last(db)
    db.execute("UPDATE agent_jobs SET status = 'none' WHERE id = 'no-such-id'")
    db.execute("DELETE FROM agent_jobs WHERE id IN ('cap-a', 'cap-b')")
    tombs = dict(db.execute("SELECT record_id, version::text FROM zsync.tombstones "
                            "WHERE table_name = 'agent_jobs' AND record_id LIKE 'cap-%%'").fetchall())
    assert sorted(_entries(db, start)) == sorted((k, "DELETE", v) for k, v in tombs.items())
    assert set(tombs) == {"cap-a", "cap-b"}


def test_inline_canonical_object_is_canonical_json(db: psycopg.Connection) -> None:
    values = [{}, {"n": 0}, {"n": -0.0}, {"n": 12.50}, {"n": 1e-301}, {"n": 1e301}, {"n": 123456789012345678901234},
              {"a": [1.0, {"b": 2.50}], "s": "1", "t": True, "z": None}, {"o": {"p": {"q": 1e2}}}, [1.50, "x"], 7,
              "s", {"k": "no numbers"}]
    exprs = db.execute("SELECT hash_expr FROM zsync.version_exprs('public.agent_jobs', 'x')").fetchone()[0]
    for value in values:
        row = Jsonb({"id": "h", "parameters": value})
        want = db.execute("SELECT v.hash FROM zsync.version_of('public.agent_jobs', %s::jsonb) v", (row,)).fetchone()
        got = db.execute(f"SELECT {exprs} FROM jsonb_populate_record(NULL::public.agent_jobs, %s::jsonb) x",
                         (row,)).fetchone()
        assert got == want, value
    # the numeric literal as sent (Python's json would round it through a float)
    raw = db.execute("SELECT zsync.canonical_json('{\"n\": 1e-400, \"m\": 1e400, \"k\": 1.10}'::jsonb)::text, "
                     "zsync.canonical_json('[1e-400, 1.10]'::jsonb)::text").fetchone()
    assert raw == ('{"k": 1.1, "m": 1' + "0" * 400 + ', "n": 0.' + "0" * 399 + '1}', '[0.' + "0" * 399 + '1, 1.1]')


def test_canonical_json_is_the_previous_one(db: psycopg.Connection) -> None:
    """zsync.canonical_json against 20261129810000's definition (as a temporary function) on random values."""
    source = (HISTORY_DIR / "20261129810000_zsync_single_path.sql").read_text()
    start = source.index("CREATE OR REPLACE FUNCTION zsync.canonical_json")
    previous = source[start:source.index("$$;", start) + 3].replace("zsync.canonical_json", "pg_temp.canonical_json_0")
    rnd = random.Random(11)
    scalars = [0, -0.0, 1, -7, 12.5, 1e-301, 1e301, 2**70, 0.1, "", "x", True, False, None]

    def value(depth: int) -> Any:
        kind = rnd.random()
        if depth > 2 or kind < 0.4:
            return rnd.choice(scalars)
        if kind < 0.7:
            return [value(depth + 1) for _ in range(rnd.randrange(4))]
        return {f"k{i}": value(depth + 1) for i in range(rnd.randrange(4))}

    with db.transaction():
        db.execute(previous)
        for _ in range(300):
            v = Jsonb(value(0))
            got = db.execute("SELECT zsync.canonical_json(%s::jsonb), pg_temp.canonical_json_0(%s::jsonb)",
                             (v, v)).fetchone()
            assert got[0] == got[1], v.obj
