"""Issue 18 items 3 and 4 against a real Postgres (and the real local Tables service for the outbox drain):

* no time pins a row: a version more than ZSYNC_MAX_FUTURE_SKEW_S (zsync.config) ahead of the clock is refused,
  by the functions (400 / sync_failed naming the field and the value) and by the database itself
  (zsync.maintain_updated_at, SQLSTATE 22008) for every writer; a version stored before the rule pins nothing;
* the parser refuses exactly what the CHECKs refuse (year 9999 at noon, before 0001-01-02, \\x7f in an id);
* one bad record never holds back or discards another: a batch (inbox lease, replay, reconcile) applies every
  other record and parks the bad one with a sync_failed entry holding the delivery; the outbox drain (the
  claim transaction of a whole table) is never blocked by one record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from infra.local.postgres import create_database, prepare_database
from shared.adapters.migrations import apply_migrations
from shared.core.mapping import InvalidRecord, parse_tables_record
from shared.core.outcome import Outcome
from shared.core.spec import FUNCTIONS, TABLES
from shared.platform.settings import Settings, reset_settings
from shared.services.from_tables import apply_from_tables, apply_many_from_tables
from shared.services.outbox_batch import drain_outbox
from shared.services.sync import SyncContext
from tests.tables_local import LocalTables, start_local_tables

JOBS = TABLES["agent_jobs"]
TO_SUPABASE = FUNCTIONS["agent_jobs_to_supabase"]
TO_TABLES = FUNCTIONS["agent_jobs_to_tables"]
PAST = "2026-01-01T00:00:00Z"


@pytest.fixture
def url(pg_server: Any) -> str:
    url = create_database(pg_server.get_uri())
    prepare_database(url)
    return url


def _ctx(url: str, **kw: Any) -> SyncContext:
    return SyncContext(settings=Settings(database_url=url, retry_budget_s=2, **kw))


def _q(url: str, sql: str, params: Any = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def _failed(url: str, rid: str) -> list[dict]:
    return [m for (m,) in _q(url, "SELECT metadata FROM audit_log WHERE action = 'sync_failed' AND resource_id = %s",
                             (rid,))]


def _iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")


# --- the parser refuses exactly what the CHECKs refuse --------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "said"), [
    ("created_at", "9999-12-31T12:00:00Z", "out of range"),
    ("created_at", "0001-01-01T12:00:00Z", "out of range"),
    ("updated_at", "9999-12-30T23:59:59Z", "ahead of the clock"),  # inside the CHECK, far ahead of the clock
    ("id", "job\x7f1", "control characters"),
])
def test_the_parser_refuses_what_the_database_refuses(url, field, value, said):
    record = {"id": "parser-1", "status": "x", "updated_at": PAST, field: value}
    with pytest.raises(InvalidRecord) as exc:
        apply_from_tables(_ctx(url), TO_SUPABASE, record)
    [problem] = exc.value.problems
    assert problem["field"] == field and said in problem["problem"], problem
    assert (repr(value) if field == "id" else value[:19]) in problem["problem"], problem  # the value, named
    assert _q(url, "SELECT count(*) FROM agent_jobs") == [(0,)]
    # ... and the database agrees: the same value written in SQL is refused by its CHECK (or the skew rule)
    row = {"id": "sql-1", "status": "x", "updated_at": PAST, field: value}
    with pytest.raises((psycopg.errors.CheckViolation, psycopg.errors.DatetimeFieldOverflow)):
        _q(url, "INSERT INTO agent_jobs SELECT * FROM jsonb_populate_record(NULL::agent_jobs, %s::jsonb)",
           (json.dumps(row),))
    # the bounds themselves are accepted on both sides
    ok = parse_tables_record(JOBS, {"id": "edge", "created_at": "0001-01-02T00:00:00.001Z",
                                    "started_at": "9999-12-30T23:59:59.999Z"})
    assert ok["created_at"].year == 1 and ok["started_at"].year == 9999


# --- no time pins a row ----------------------------------------------------------------------------------------


def test_a_tables_version_a_day_ahead_is_refused_and_pins_nothing(url):
    """The issue's reproduction: a Tables updated_at one day ahead used to be stored (86,390 s ahead), and every
    later agent write then got that time + 1 ms. Now: 400 naming the field and the value, nothing stored."""
    _q(url, "INSERT INTO agent_jobs (id, status, updated_at) VALUES ('pin', 'before', %s)", (PAST,))
    ahead = datetime.now(UTC) + timedelta(days=1)
    with pytest.raises(InvalidRecord) as exc:
        apply_from_tables(_ctx(url), TO_SUPABASE, {"id": "pin", "status": "from the future", "updated_at": _iso(ahead)})
    [problem] = exc.value.problems
    assert problem["field"] == "updated_at" and _iso(ahead)[:19] in problem["problem"]
    assert "ahead of the clock" in problem["problem"] and "300 s allowed" in problem["problem"]
    [(status, stored)] = _q(url, "SELECT status, updated_at FROM agent_jobs WHERE id = 'pin'")
    assert status == "before" and stored == datetime(2026, 1, 1, tzinfo=UTC)
    # a later agent write is versioned by the clock, not by a day ahead + 1 ms
    [(version,)] = _q(url, "UPDATE agent_jobs SET status = 'agent' WHERE id = 'pin' RETURNING updated_at")
    assert abs((version - datetime.now(UTC)).total_seconds()) < 60
    # Zapier's edited_at (the version of a cell edit) is held to the same rule
    with pytest.raises(InvalidRecord) as exc:
        apply_from_tables(_ctx(url), TO_SUPABASE, {"id": "pin", "status": "cell", "updated_at": _iso(version),
                                                   "edited_at": _iso(ahead)})
    assert exc.value.problems[0]["field"] == "edited_at"
    # within the skew is fine (clocks differ by a little)
    near = datetime.now(UTC) + timedelta(seconds=60)
    assert apply_from_tables(_ctx(url), TO_SUPABASE, {"id": "pin", "status": "near", "updated_at": _iso(near)}
                             ).outcome is Outcome.APPLIED


def test_the_database_refuses_a_future_version_from_any_writer(url):
    ahead = datetime.now(UTC) + timedelta(days=1)
    _q(url, "INSERT INTO agent_jobs (id, status, updated_at) VALUES ('w', 'x', %s)", (PAST,))
    for sql, params in [
        ("UPDATE agent_jobs SET status = 'y', updated_at = %s WHERE id = 'w'", (ahead,)),  # a Claude agent
        ("INSERT INTO agent_jobs (id, status, updated_at) VALUES ('w2', 'x', %s)", (ahead,)),
        ("SELECT zsync.sync_apply('public.agent_jobs', %s::jsonb, NULL)",  # the sync's own write (backstop)
         (json.dumps({"id": "w3", "updated_at": ahead.isoformat()}),)),
    ]:
        with pytest.raises(psycopg.errors.DatetimeFieldOverflow) as exc:
            _q(url, sql, params)
        diag = exc.value.diag
        assert diag.column_name == "updated_at" and "ahead of the database clock" in diag.message_primary
        assert str(ahead.year) in diag.message_primary and "00:05:00" in diag.message_primary
    assert _q(url, "SELECT status, updated_at FROM agent_jobs ORDER BY id") == [("x", datetime(2026, 1, 1, tzinfo=UTC))]
    # a version written before the rule (here: while the skew was raised) is no floor for the next write
    _q(url, "SELECT zsync.set_max_future_skew(1e9)")
    _q(url, "UPDATE agent_jobs SET status = 'pinned', updated_at = %s WHERE id = 'w'", (ahead,))
    _q(url, "SELECT zsync.set_max_future_skew(300)")
    [(version,)] = _q(url, "UPDATE agent_jobs SET status = 'unpinned' WHERE id = 'w' RETURNING updated_at")
    assert abs((version - datetime.now(UTC)).total_seconds()) < 60


def test_migrate_writes_the_setting_the_database_reads(url, zsync_env):
    zsync_env(max_future_skew_s="60")
    apply_migrations(url)
    assert _q(url, "SELECT value, zsync.max_future_skew() FROM zsync.config WHERE key = 'max_future_skew_s'") == [
        (60.0, timedelta(seconds=60))]
    with pytest.raises(psycopg.errors.DatetimeFieldOverflow):
        _q(url, "INSERT INTO agent_jobs (id, updated_at) VALUES ('cfg', now() + interval '2 minutes')")
    zsync_env().delenv("ZSYNC_MAX_FUTURE_SKEW_S")  # back to the default
    reset_settings()
    apply_migrations(url)
    _q(url, "INSERT INTO agent_jobs (id, updated_at) VALUES ('cfg', now() + interval '2 minutes')")
    reset_settings()


# --- one bad record never holds back or discards another: batches ------------------------------------------------


def test_a_batch_applies_every_record_but_the_ones_the_parser_refuses(url):
    """The issue's inbox reproduction at the batch level: one created_at of 9999-12-31T12:00:00Z used to fail the
    whole multi-row upsert (CheckViolation), so nothing was applied."""
    ahead = _iso(datetime.now(UTC) + timedelta(days=1))
    bad = {"bad-9999": {"created_at": "9999-12-31T12:00:00Z"}, "bad-0001": {"created_at": "0001-01-01T12:00:00Z"},
           "bad-future": {"updated_at": ahead}}
    records = [{"id": f"good-{i}", "status": "ok", "updated_at": PAST} for i in range(6)]
    for n, (rid, extra) in enumerate(bad.items()):
        records.insert(2 * n + 1, {"id": rid, "status": "bad", "updated_at": PAST, **extra})
    records.append({"id": "bad\x7fid", "status": "bad", "updated_at": PAST})
    results = apply_many_from_tables(_ctx(url), TO_SUPABASE, records)
    outcomes = {r.id: r.outcome for r in results}
    assert [r.outcome for r in results if r.outcome is not Outcome.REJECTED] == [Outcome.APPLIED] * 6
    assert {rid: outcomes[rid] for rid in bad} == dict.fromkeys(bad, Outcome.REJECTED)
    assert _q(url, "SELECT id FROM agent_jobs ORDER BY id") == [(f"good-{i}",) for i in range(6)]
    for rid, extra in bad.items():
        [meta] = _failed(url, rid)
        [field] = extra
        assert meta["status"] == 400 and meta["problems"][0]["field"] == field
        assert json.loads(meta["delivery"])["id"] == rid  # what is needed to repair and re-send it
    assert results[-1].problems[0]["field"] == "id"


def test_a_value_only_the_database_refuses_is_isolated_in_savepoints(url):
    """A CHECK the parser does not mirror (one added by hand later, a validation trigger): the batch is split
    until the refused records stand alone; every other record is applied, once."""
    _q(url, "ALTER TABLE agent_jobs ADD CHECK (status <> 'poison')")  # agent_jobs_status_check
    _q(url, "CREATE FUNCTION public.no_boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.job_type = 'boom' THEN RAISE EXCEPTION 'job_type boom is not allowed'; END IF; RETURN NEW; END $$")
    _q(url, "CREATE TRIGGER no_boom BEFORE INSERT OR UPDATE ON agent_jobs FOR EACH ROW EXECUTE FUNCTION no_boom()")
    records = [{"id": f"r{i:02d}", "status": "ok", "updated_at": PAST} for i in range(20)]
    records[3]["status"] = records[17]["status"] = "poison"
    records[11]["job_type"] = "boom"
    records.append({"id": "r05", "status": "ok", "updated_at": "2026-01-02T00:00:00Z"})  # a newer duplicate
    results = apply_many_from_tables(_ctx(url), TO_SUPABASE, records)
    refused = {r.id: r.problems for r in results if r.outcome is Outcome.REJECTED}
    assert set(refused) == {"r03", "r11", "r17"}
    assert refused["r03"][0]["field"] == "status" and '"poison"' in refused["r03"][0]["problem"]
    assert "job_type boom is not allowed" in refused["r11"][0]["problem"]
    assert _q(url, "SELECT count(*) FROM agent_jobs") == [(17,)]
    assert _q(url, "SELECT updated_at FROM agent_jobs WHERE id = 'r05'") == [(datetime(2026, 1, 2, tzinfo=UTC),)]
    assert _q(url, "SELECT count(*) FROM audit_log WHERE action = 'agent_jobs_synced'") == [(17,)]
    assert json.loads(_failed(url, "r17")[0]["delivery"])["status"] == "poison"
    # one record alone (a Zap's delivery): the database's refusal is a 400 naming the field, not a 500
    with pytest.raises(InvalidRecord) as exc:
        apply_from_tables(_ctx(url), TO_SUPABASE, {"id": "alone", "status": "poison", "updated_at": PAST})
    assert exc.value.problems[0]["field"] == "status" and "agent_jobs_status_check" in exc.value.problems[0]["problem"]


# --- the outbox drain: one record never blocks its table's queue ------------------------------------------------


@pytest.fixture
def service(tmp_path: Path) -> Iterator[LocalTables]:
    with start_local_tables(tmp_path / "t.sqlite3", names=["agent_jobs"]) as local:
        yield local


def test_a_bad_tables_copy_never_blocks_the_outbox(url, service):
    """The issue's Tables reproduction: a Tables copy newer than Supabase's row but holding created_at
    9999-12-31T12:00:00Z was pushed back inside the claim transaction: the CHECK failed it, so the whole
    Supabase -> Tables queue of the table was stuck for good. Now the copy is parked (409, the Tables fields in
    the audit entry) and every other record is delivered; a copy from the future is parked, not compared; a
    push-back only the database refuses leaves Supabase as it is, with a sync_failed entry."""
    _q(url, "ALTER TABLE agent_jobs ADD CHECK (status <> 'poison')")  # agent_jobs_status_check
    ids = ["a-good", "b-9999", "c-future", "d-poison", "e-good"]
    _q(url, "INSERT INTO agent_jobs (id, status, updated_at) SELECT x, 'supabase', %s FROM unnest(%s::text[]) x",
       (PAST, ids))
    newer = "2026-02-01T00:00:00Z"
    with service.client() as c:
        c.create_many(service.ids["agent_jobs"], [
            {"id": "b-9999", "status": "tables", "created_at": "9999-12-31T12:00:00Z", "updated_at": newer},
            {"id": "c-future", "status": "tables", "updated_at": _iso(datetime.now(UTC) + timedelta(days=1))},
            {"id": "d-poison", "status": "poison", "updated_at": newer},
        ])
    ctx = SyncContext(settings=service.settings(database_url=url, webhook_secret="x", retry_budget_s=3,
                                                http_timeout_s=2))
    results = drain_outbox(ctx, TO_TABLES).results
    assert {rid: results[rid].outcome for rid in ids} == {
        "a-good": Outcome.APPLIED, "b-9999": Outcome.PARKED, "c-future": Outcome.PARKED,
        "d-poison": Outcome.SKIPPED_STALE, "e-good": Outcome.APPLIED}
    assert _q(url, "SELECT count(*) FROM zsync.outbox WHERE acked_at IS NULL") == [(0,)]
    assert _q(url, "SELECT id, status FROM agent_jobs ORDER BY id") == [(i, "supabase") for i in ids]
    for rid, field in (("b-9999", "created_at"), ("c-future", "updated_at")):
        [meta] = _failed(url, rid)
        assert meta["status"] == 409 and meta["problems"][0]["field"] == field and "tables_record" in meta
    [meta] = _failed(url, "d-poison")
    assert meta["status"] == 400 and meta["function"] == "agent_jobs_to_supabase"
    assert meta["problems"][0]["field"] == "status" and json.loads(meta["delivery"])["status"] == "poison"
    with service.client() as c:
        tables = {r.data["id"]: r.data["status"] for r in c.iter_records(service.ids["agent_jobs"])}
    assert tables == {"a-good": "supabase", "b-9999": "tables", "c-future": "tables", "d-poison": "poison",
                      "e-good": "supabase"}
