"""The sync against a Tables stand-in as harsh as Zapier (docs/local-stand-ins.md): Zapier stores only the
fields a writer sends (no ``updated_at`` is filled in) and leaves empty cells out of a record's ``data``.

* a record created without our ``id`` gets one id (its Zapier record id), written into that same record,
  and one Supabase row; no second Tables record;
* a record created without ``updated_at`` is versioned at Zapier's ``edited_at``: one write each side;
* a person's cell edit that leaves ``updated_at`` as it was wins through ``edited_at`` even when the
  content hash alone would make it lose (fails when the edited_at handling is switched off).

End to end over the local stack (default trigger-inbox path), driven as users do: the Tables API, SQL.
"""

from __future__ import annotations

from datetime import datetime

import psycopg

from shared.adapters import supabase_db
from shared.core.mapping import normalize_timestamp, parse_supabase_record
from shared.core.spec import TABLES
from tests.e2e import eventually, uid

JOBS = TABLES["agent_jobs"]


def _ms(value: str | datetime) -> datetime:
    ts = normalize_timestamp(value)
    assert ts is not None
    return ts.replace(microsecond=ts.microsecond // 1000 * 1000)


def test_record_created_without_id_gets_one_id_in_that_record_and_one_row(stack, tables, supabase):
    marker = uid("no-id")
    before = tables.writes("agent_jobs")
    rec = tables.create("agent_jobs", {"job_type": marker, "status": "queued"})
    assert "id" not in rec["data"]  # an empty cell
    rid = rec["id"]  # the Zapier record id (ULID) becomes our id
    eventually(lambda: supabase.row("agent_jobs", rid))
    stack.wait_quiet()
    eventually(lambda: tables.find("agent_jobs", rid))
    stack.wait_quiet()

    assert supabase.query("SELECT id FROM agent_jobs WHERE job_type = %s", (marker,)) == [(rid,)]
    same = tables.find_all("agent_jobs", rid)
    assert [r["id"] for r in same] == [rid]  # the id went into the same record: no second one
    assert same[0]["data"]["job_type"] == marker and same[0]["data"]["id"] == rid
    assert supabase.writes("agent_jobs", rid) == 1  # the sync's insert only
    assert tables.writes("agent_jobs") - before == 2  # the user's create + the sync writing the id once
    row = supabase.row("agent_jobs", rid)
    assert same[0]["data"]["updated_at"] and _ms(same[0]["data"]["updated_at"]) == _ms(row["updated_at"])


def test_record_created_without_updated_at_is_versioned_at_edited_at(stack, tables, supabase):
    rid = uid("no-ts")
    before = tables.writes("rate_limits")
    rec = tables.create("rate_limits", {"id": rid, "service_name": "x", "quota_limit": 5})
    assert "updated_at" not in rec["data"]
    row = eventually(lambda: supabase.row("rate_limits", rid))
    stack.wait_quiet()
    assert _ms(row["updated_at"]) == _ms(rec["edited_at"])  # Zapier's time of the change, not the arrival
    assert supabase.writes("rate_limits", rid) == 1
    assert tables.writes("rate_limits") - before == 1  # the same version: nothing written back
    assert "updated_at" not in tables.find("rate_limits", rid)["data"]


def _losing_status(database_url: str, stored: dict) -> str:
    """A status that, at the stored ``updated_at``, is an older version than the stored row by the
    content hash alone (zsync.version_cmp): without the edited_at rule such an edit loses the tie.

    A candidate loses when its hash is below the stored row's, which depends on the row (its random id, its
    created_at): when that hash is small, few candidates do. With 64 candidates none did in 1 row in 65
    (E[(1 - h)^64]); so candidates are compared 1,024 at a time (zsync.version_cmp_many) until one loses."""
    base = parse_supabase_record(JOBS, stored)
    with psycopg.connect(database_url, autocommit=True) as conn:
        for start in range(0, 1 << 20, 1024):
            candidates = [f"edited-{n}" for n in range(start, start + 1024)]
            cmps = supabase_db.version_cmp_many(conn, JOBS, [(dict(base, status=c), base) for c in candidates])
            for candidate, cmp in zip(candidates, cmps, strict=True):
                if cmp < 0:
                    return candidate
    raise AssertionError("no candidate loses the hash tie")


def test_cell_edit_keeping_updated_at_wins_through_edited_at(stack, tables, supabase):
    """A person edits one cell in Tables; ``updated_at`` stays as it was (Zapier fills nothing in). The
    edit must reach Supabase and stay in Tables, although at that ``updated_at`` its content hash loses
    to the stored version: only Zapier's ``edited_at`` (shared/services/from_tables.py, zsync.sync_apply) makes it
    newer."""
    rid = uid("cell-edit")
    given = "2025-12-22T10:00:00Z"
    tables.create("agent_jobs", {"id": rid, "job_type": "discovery", "status": "queued", "updated_at": given})
    stored = eventually(lambda: supabase.row("agent_jobs", rid))
    stack.wait_quiet()
    edit = _losing_status(stack.database_url, stored)

    edited = tables.update("agent_jobs", rid, {"status": edit})
    assert edited["data"]["updated_at"] == given  # not advanced
    eventually(lambda: supabase.row("agent_jobs", rid)["status"] == edit, timeout_s=10)
    stack.wait_quiet()
    row = supabase.row("agent_jobs", rid)
    assert row["status"] == edit
    assert _ms(row["updated_at"]) >= _ms(edited["edited_at"]) > _ms(given)  # versioned at edited_at
    final = tables.find("agent_jobs", rid)
    assert final["data"]["status"] == edit  # not overwritten by a push-back of the old version
    # The sync does not write its own apply back (no Tables request for it): Tables keeps its updated_at, and
    # the base remembers it, so the next cell edit at that same updated_at is a change again and wins.
    assert final["data"]["updated_at"] == given
    assert not supabase.audit(rid, "sync_skipped_stale_data")
    again = tables.update("agent_jobs", rid, {"status": "edited-again"})
    assert again["data"]["updated_at"] == given
    eventually(lambda: supabase.row("agent_jobs", rid)["status"] == "edited-again", timeout_s=10)
    stack.wait_quiet()
    assert tables.find("agent_jobs", rid)["data"]["status"] == "edited-again"
    assert not supabase.audit(rid, "sync_skipped_stale_data")


def test_old_version_pushed_to_tables_does_not_overwrite_a_cell_edit(stack, tables, supabase):
    """The other half of the rule (shared/services/to_tables.py ``_tables_version``): Supabase's webhook for the version
    both sides share arrives after a person's cell edit in Tables and before that edit's own delivery (its
    inbox wake-up is late). At the same ``updated_at`` the old content wins the hash tie; only the edit's
    ``edited_at`` makes the Tables copy newer: it is kept and pushed to Supabase, never overwritten."""
    from shared.adapters.trigger_inbox import InboxClient

    rid = uid("cell-race")
    given = "2025-12-22T11:00:00Z"
    tables.create("agent_jobs", {"id": rid, "job_type": "discovery", "status": "queued", "updated_at": given})
    stored = eventually(lambda: supabase.row("agent_jobs", rid))
    stack.wait_quiet()
    edit = _losing_status(stack.database_url, stored)
    client = InboxClient.for_tables(stack.tables_client())
    inbox_id = stack.inboxes["agent_jobs_to_supabase"]
    url = client.get(inbox_id).notification_url
    client.update(inbox_id, None)  # the edit's wake-up is late: its message waits in the inbox
    try:
        tables.update("agent_jobs", rid, {"status": edit})
        # Supabase re-sends the version both sides share (a repair: zsync.requeue, as a stale delivery does).
        assert supabase.query("SELECT zsync.requeue('agent_jobs', %s, 'UPDATE')", (rid,)) == [(True,)]
        eventually(lambda: supabase.row("agent_jobs", rid)["status"] == edit, timeout_s=10)  # pushed back
        assert tables.find("agent_jobs", rid)["data"]["status"] == edit  # not overwritten
    finally:
        client.update(inbox_id, url)
    stack.safety_drain()
    stack.wait_quiet()
    row, final = supabase.row("agent_jobs", rid), tables.find("agent_jobs", rid)
    assert row["status"] == final["data"]["status"] == edit
    assert _ms(row["updated_at"]) > _ms(given)  # versioned at the edit's edited_at
    assert final["data"]["updated_at"] == given  # the push-back is not written back to Tables (it holds it)


def test_single_path_writes_the_id_into_the_record_that_lacked_it(stack, tables, supabase):
    """The one-record path (shared/services/to_tables.py ``_write_if_newer``: replay, a webhook outside a batch)
    finds the id-less record by its Zapier id too, and writes the id into it instead of creating a second record."""
    from shared.adapters.trigger_inbox import InboxClient
    from shared.core.spec import FUNCTIONS
    from shared.platform.settings import Settings
    from shared.services.sync import SupabaseWebhook, SyncContext
    from shared.services.to_tables import apply_from_supabase

    marker = uid("no-id-one")
    client = InboxClient.for_tables(stack.tables_client())
    inbox_id = stack.inboxes["agent_jobs_to_supabase"]
    url = client.get(inbox_id).notification_url
    client.update(inbox_id, None)  # the record's own delivery waits: only the path under test runs
    try:
        rec = tables.create("agent_jobs", {"job_type": marker, "status": "queued"})
        rid = rec["id"]
        hook = SupabaseWebhook.model_validate({"type": "INSERT", "table": "agent_jobs", "schema": "public",
                                               "record": {"id": rid, "job_type": marker, "status": "queued",
                                                          "updated_at": rec["edited_at"]}})
        ctx = SyncContext(settings=Settings(database_url=stack.function_database_url,
                                            zapier_base_url=stack.tables.url, tables_token=stack.token,
                                            table_ids=stack.table_ids))
        result = apply_from_supabase(ctx, FUNCTIONS["agent_jobs_to_tables"], hook)
        assert str(result.outcome) == "applied"  # the same version, written once to put the id in
        found = tables.find_all("agent_jobs", rid)
        assert [r["id"] for r in found] == [rid] and found[0]["data"]["job_type"] == marker
        assert str(apply_from_supabase(ctx, FUNCTIONS["agent_jobs_to_tables"], hook).outcome) == "unchanged"
    finally:
        client.update(inbox_id, url)
    stack.safety_drain()
    stack.wait_quiet()
    assert supabase.query("SELECT id FROM agent_jobs WHERE job_type = %s", (marker,)) == [(rid,)]
    assert len(tables.client.find_many(tables.ids["agent_jobs"], "job_type", [marker])) == 1


def test_trashed_record_without_id_is_deleted_under_its_zapier_id(stack, tables, supabase):
    """A record created without our id and deleted in Tables before its delivery arrived: the trash check
    reads its id as the Zapier record id (the id its delivery carries), so the late delivery is refused as
    deleted instead of inserting a row for a record that no longer exists."""
    from shared.adapters.trigger_inbox import InboxClient

    marker = uid("no-id-del")
    client = InboxClient.for_tables(stack.tables_client())
    inbox_id = stack.inboxes["agent_jobs_to_supabase"]
    url = client.get(inbox_id).notification_url
    with stack.trash_paused():
        client.update(inbox_id, None)  # its delivery is late
        try:
            rec = tables.create("agent_jobs", {"job_type": marker, "status": "queued"})
            tables.client.delete(tables.ids["agent_jobs"], rec["id"])  # a person's delete, to the trash
            answer = stack.check_trash()["agent_jobs_to_supabase"]
            assert answer["status"] == 200, answer
        finally:
            client.update(inbox_id, url)
    stack.safety_drain()
    stack.wait_quiet()
    assert supabase.query("SELECT id FROM agent_jobs WHERE job_type = %s", (marker,)) == []
    assert supabase.query("SELECT count(*) FROM zsync.tombstones WHERE table_name = 'agent_jobs' "
                          "AND record_id = %s", (rec["id"],)) == [(1,)]
    assert tables.client.find_many(tables.ids["agent_jobs"], "job_type", [marker]) == []
