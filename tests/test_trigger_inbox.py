"""Issue 9: Zapier Tables -> Supabase through trigger inboxes, end to end on the local stack.

The stack is wired by `zsync wire zapier` (infra.deploy.wire) against the local inbox service; the
*_to_supabase functions are woken by notifications (no secret, no data) and lease from their own inbox.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid

import pytest
import requests

from infra.deploy import doctor, wire
from shared.adapters import dead_letter
from shared.adapters.trigger_inbox import UnreadablePayload, read_payload
from shared.edge.handler import WAKE_PARAM
from shared.platform.settings import Settings
from shared.services.inbox_consumer import client_from_settings, inbox_key
from tests.e2e import eventually, uid

FN = "agent_jobs_to_supabase"






@pytest.fixture(scope="module")
def stack():
    """Its own stack: these tests count what is in the inboxes, so messages left by other test files on the
    shared stack (e.g. audit entries made in Tables) must not be there. Scheduled jobs run only when called."""
    import os
    from pathlib import Path

    from infra.local.stack import running_stack

    with running_stack(Path(f"/tmp/zsync-inbox-{os.getpid()}"), sweep_interval_s=3600, trash_interval_s=3600,
                       safety_drain_interval_s=3600, pgnet_poll_interval_s=0.05, retry_budget_s=3.0) as local:
        yield local


@pytest.fixture
def settings(stack) -> Settings:
    """What an operator's shell holds: the OAuth client credentials, no static token."""
    return Settings(zapier_base_url=stack.tables.url, zapier_token_url=stack.tables.url + "/oauth/token/",
                    zapier_client_id=stack.client_id, zapier_client_secret=stack.client_secret,
                    table_ids=stack.table_ids, stage="local")


@pytest.fixture
def client(settings):
    c = client_from_settings(settings)
    yield c
    c.close()


@pytest.fixture(scope="module")
def keys(stack) -> dict[str, str]:
    """agent_jobs' field ids by name (``{"status": "f3"}``): what Zapier's records are keyed by."""
    with stack.tables_client() as c:
        return {f.name: f.key for f in c.field_map(stack.table_ids["agent_jobs"]).fields}


def inbox_stats(stack) -> dict:
    return stack.tables.ctx.inboxes.stats()


def inject(stack, function: str, payload: dict) -> str:
    r = requests.post(f"{stack.tables.url}/_admin/inboxes/{stack.inboxes[function]}/messages",
                      json={"payload": payload}, timeout=10)
    r.raise_for_status()
    return r.json()["id"]


def ulid() -> str:
    return uuid.uuid4().hex[:26].upper()


def job(keys: dict[str, str], job_id: str, status: str, updated_at: str) -> dict:
    """A Tables record as Zapier's API holds it: ULID, data keyed by field id, edited_at."""
    data = {"id": job_id, "job_type": "discovery", "status": status, "updated_at": updated_at}
    return {"id": ulid(), "edited_at": updated_at, "created_at": updated_at,
            "data": {keys[name]: value for name, value in data.items()}}


# --- payload reading -----------------------------------------------------------------------------------


def test_payload_by_name_by_field_id_and_unreadable():
    by_name = read_payload({"id": "REC1", "edited_at": "2026-01-01T00:00:00Z", "data": {"status": "queued"}})
    assert by_name.record_id == "REC1" and by_name.fields == {"status": "queued"}
    # audit_log is keyed by the record id; edited_at rides along (the lag is measured from it)
    assert by_name.as_delivery() == {"status": "queued", "id": "REC1", "edited_at": "2026-01-01T00:00:00Z"}
    by_id = read_payload({"record": {"id": "REC2", "data": {"f3": "done", "f1": "j-1"}}}, {"f3": "status", "1": "id"})
    assert by_id.fields == {"status": "done", "id": "j-1"} and by_id.as_delivery()["id"] == "j-1"
    flat = read_payload({"record_id": "REC3", "id": "j-2", "status": "x"})
    assert flat.record_id == "REC3" and flat.fields == {"id": "j-2", "status": "x"}
    with pytest.raises(UnreadablePayload) as exc:
        read_payload({"id": "REC4", "data": {"f9": "?"}}, {"f3": "status"})
    assert exc.value.problems[0]["field"] == "payload.data.f9"
    with pytest.raises(UnreadablePayload):
        read_payload({"id": "REC5", "data": "nope"})


def test_delete_events_are_recognised_and_records_are_not():
    from shared.adapters.trigger_payload import is_delete_event, read_delete

    record = {"id": "01JYEPSEARXB2Z6BJRCMFGXBC2", "data": {"f1": "j-1"}, "edited_at": "2026-01-01T00:00:00Z"}
    assert read_delete(record, {"f1": "id"}) is None and read_delete(record | {"deleted_at": None}) is None
    gone = read_delete(record | {"deleted_at": "2026-01-02T00:00:00Z"}, {"f1": "id"})
    assert gone is not None and gone.fields == {"id": "j-1"} and gone.deleted_at == "2026-01-02T00:00:00Z"
    by_type = read_delete({"event_type": "record.deleted", "record": record}, {"f1": "id"})
    assert by_type is not None and by_type.deleted_at == "2026-01-01T00:00:00Z"  # no deleted_at: the event's time
    # a UUID-form record id (as the public API publishes ids) comes back as the ULID zsync keys rows by
    uuid_form = read_delete({"id": "01979d6c-b958-eac5-f32e-58651f0ead82", "data": {}, "event": "deleted"})
    assert uuid_form is not None and uuid_form.record_id == "01JYEPSEARXB2Z6BJRCMFGXBC2" and uuid_form.fields == {}
    # in a flat payload "action"/"type" are fields (audit_log has "action"): never taken for an event type
    assert not is_delete_event({"id": "a-1", "action": "delete_job", "actor": "x"})
    with pytest.raises(UnreadablePayload):
        read_delete({"data": {}, "event": "deleted"})


def test_a_dead_lettered_delete_event_is_never_replayed_as_a_record():
    from shared.services.inbox_consumer import inbox_letter_delivery

    event = {"id": "01JYEPSEARXB2Z6BJRCMFGXBC2", "data": {"id": "j-9", "status": "x"},
             "deleted_at": "2026-01-02T00:00:00Z", "event": "deleted"}
    with pytest.raises(UnreadablePayload, match="delete event"):
        inbox_letter_delivery({"inbox_message": "m", "payload": event}, None)
    live = dict(event, deleted_at=None, event="updated")
    assert inbox_letter_delivery({"inbox_message": "m", "payload": live}, None)["id"] == "j-9"


# --- wiring -------------------------------------------------------------------------------------------


def test_wire_is_idempotent_and_updates_a_changed_url(stack, client, settings):
    urls = {name: fp.url for name, fp in stack.functions.items()}
    choice = wire.choose_trigger(client, None)
    assert choice.action_key == "new_updated_or_deleted_record" and choice.deletes and "deletes" in choice.why
    again = wire.apply_inboxes(client, wire.inbox_plan(urls, settings, "local"), choice)
    assert {c.change for c in again} == {"unchanged"} and len(again) == 4
    moved = dict(urls, **{FN: urls[FN] + "moved"})
    try:
        changed = {c.function: c.change for c in wire.apply_inboxes(client, wire.inbox_plan(moved, settings, "local"),
                                                                     choice)}
        assert changed[FN] == "updated" and changed["audit_log_to_supabase"] == "unchanged"
    finally:
        wire.apply_inboxes(client, wire.inbox_plan(urls, settings, "local"), choice)
    with pytest.raises(wire.DeployError, match="not a trigger"):
        wire.choose_trigger(client, "create_record")
    # the older SDK's generation: PUT ensure by name, list by name
    inbox = client.find(inbox_key("local", FN))
    r = requests.put(f"{stack.tables.url}/api/v0/sdk/trigger-inbox/api/v1/inboxes",
                     headers={"Authorization": f"Bearer {stack.token}"},
                     json={"name": inbox.key, "subscription": inbox.subscription,
                           "notification_url": inbox.notification_url}, timeout=10)
    assert r.status_code == 200 and r.json()["id"] == inbox.id
    r = requests.get(f"{stack.tables.url}/api/v0/sdk/trigger-inbox/api/v1/inboxes",
                     params={"name": inbox.key, "limit": 1}, headers={"Authorization": f"Bearer {stack.token}"},
                     timeout=10)
    assert [i["id"] for i in r.json()["results"]] == [inbox.id]


# --- deletes through the trigger, redelivery ------------------------------------------------------------


def delete_audits(supabase, job_id: str) -> int:
    return supabase.query("SELECT count(*) FROM audit_log WHERE resource_id = %s AND metadata->>'operation' = "
                          "'delete'", (job_id,))[0][0]


def test_a_delete_in_tables_reaches_supabase_through_the_trigger_once(stack, tables, supabase):
    """The inboxes are on the deletes-capable trigger: a delete made in Tables reaches Supabase without the
    trash check (it runs hourly on this stack); the trash check, run afterwards, finds it applied."""
    job_id = uid("trigger-del")
    rec = tables.create("agent_jobs", {"id": job_id, "job_type": "discovery", "status": "queued",
                                       "updated_at": "2026-01-01T00:00:00Z"})  # versioned: no echo to catch it
    eventually(lambda: supabase.row("agent_jobs", job_id))
    stack.wait_quiet()  # the echo back to Tables is over (it would notice a delete in the trash itself)
    tables.client.delete(stack.table_ids["agent_jobs"], rec["id"])
    eventually(lambda: supabase.row("agent_jobs", job_id) is None or None)
    assert delete_audits(supabase, job_id) == 1
    checked = stack.check_trash()[FN]
    assert checked["applied"] == 0 and checked["unchanged"] >= 1  # the safety net: seen, already applied
    assert delete_audits(supabase, job_id) == 1
    stack.wait_quiet()
    assert tables.find("agent_jobs", job_id) is None and supabase.row("agent_jobs", job_id) is None


def test_the_syncs_own_delete_coming_back_as_an_event_changes_nothing(stack, tables, supabase):
    job_id = uid("own-del")
    supabase.query("INSERT INTO agent_jobs (id, job_type, status) VALUES (%s, 'discovery', 'queued')", (job_id,))
    eventually(lambda: tables.find("agent_jobs", job_id))
    supabase.query("DELETE FROM agent_jobs WHERE id = %s", (job_id,))
    eventually(lambda: tables.find("agent_jobs", job_id) is None or None)
    stack.wait_quiet()
    stack.safety_drain()
    assert supabase.row("agent_jobs", job_id) is None and tables.find("agent_jobs", job_id) is None
    assert delete_audits(supabase, job_id) <= 1  # the Supabase delete's own entry; the event adds none


def test_a_delete_event_on_the_append_only_audit_log_changes_nothing(stack, client, tables, supabase):
    fn = "audit_log_to_supabase"
    action = uid("audit-del")
    with unnotified(client, stack.inboxes[fn]):
        rec = tables.create("audit_log", {"action": action, "actor": "zapier_agent_1",
                                          "timestamp": "2026-01-01T00:00:00Z"})
        assert stack.safety_drain()[fn]["applied"] == 1
        tables.client.delete(stack.table_ids["audit_log"], rec["id"])
        report = stack.safety_drain()[fn]
    assert report["delete_ignored"] == 1 and report["acked"] == 1, report
    assert supabase.query("SELECT count(*) FROM audit_log WHERE action = %s", (action,))[0][0] == 1


def test_a_redelivered_wakeup_drains_the_whole_backlog(stack, client, supabase, keys):
    inbox_id = stack.inboxes[FN]
    ids = [uid("redeliver") for _ in range(3)]
    with unnotified(client, inbox_id):  # the outage: nobody is woken
        for job_id in ids:
            inject(stack, FN, job(keys, job_id, "queued", "2026-01-01T00:00:00Z"))
    body = {"inbox_id": inbox_id, "received_message_count": 1, "redelivery": True}  # 1: a placeholder
    answer = requests.post(f"{stack.functions[FN].url}?{WAKE_PARAM}=inbox", json=body, timeout=30).json()
    assert answer["outcome"] == "drained" and answer["redelivery"] is True and answer["stopped"] == "empty"
    assert all(supabase.row("agent_jobs", j) for j in ids)
    # any other body is only a wake-up: never refused, never a redelivery
    for other in (b"not json", b'{"redelivery": "yes"}', b'{"redelivery": true, "pad": "' + b"x" * 5000 + b'"}'):
        r = requests.post(f"{stack.functions[FN].url}?{WAKE_PARAM}=inbox", data=other, timeout=30)
        assert r.status_code == 200 and r.json()["outcome"] == "drained" and "redelivery" not in r.json(), r.text


# --- delivery -----------------------------------------------------------------------------------------


def test_tables_write_reaches_supabase_through_the_inbox(stack, tables, supabase):
    before = stack.tables.stats()["deliveries"]["attempts"]
    job_id = uid("inbox-job")
    tables.create("agent_jobs", {"id": job_id, "job_type": "discovery", "status": "queued"})
    row = eventually(lambda: supabase.row("agent_jobs", job_id))
    assert row["status"] == "queued"
    assert stack.tables.stats()["deliveries"]["attempts"] == before  # no Zap-style push
    stack.wait_quiet()
    assert inbox_stats(stack)["waiting"] == 0


def test_lost_notification_is_picked_up_by_the_safety_drain(stack, tables, supabase):
    requests.post(f"{stack.tables.url}/_admin/inbox/faults", json={"drop_notifications": 1}, timeout=10)
    job_id = uid("lost-note")
    tables.create("agent_jobs", {"id": job_id, "job_type": "discovery", "status": "queued"})
    time.sleep(1.0)
    assert supabase.row("agent_jobs", job_id) is None
    assert inbox_stats(stack)["waiting"] >= 1
    stack.safety_drain()
    assert supabase.row("agent_jobs", job_id)["status"] == "queued"


def test_a_consumer_killed_mid_drain_loses_nothing(stack, client, supabase, keys):
    """A lease that is never acked (the function died after leasing) comes back when it expires; the
    message is then applied exactly once."""
    job_id = uid("killed")
    requests.post(f"{stack.tables.url}/_admin/inbox/faults", json={"drop_notifications": 1}, timeout=10)
    inject(stack, FN, job(keys, job_id, "running", "2026-01-01T00:00:00Z"))
    lease = client.lease(stack.inboxes[FN], 10, lease_seconds=1)  # ...and then the consumer is killed
    assert [m.payload["data"][keys["id"]] for m in lease.messages] == [job_id]
    stack.safety_drain()  # still leased: nothing to do
    assert supabase.row("agent_jobs", job_id) is None
    time.sleep(1.2)
    report = stack.safety_drain()[FN]
    assert report["applied"] == 1
    assert supabase.row("agent_jobs", job_id)["status"] == "running"
    assert supabase.writes("agent_jobs", job_id) == 1


def test_a_killed_function_catches_up_after_restart(stack, tables, supabase):
    stack.kill_function(FN)
    job_id = uid("down")
    try:
        tables.create("agent_jobs", {"id": job_id, "job_type": "discovery", "status": "queued"})
        time.sleep(0.5)  # the notification met a closed port: it is lost, the message is not
    finally:
        stack.restart_function(FN)
    stack.safety_drain()
    assert supabase.row("agent_jobs", job_id)["status"] == "queued"


def test_duplicated_and_out_of_order_messages_give_one_effect_and_the_newest(stack, supabase, keys):
    job_id = uid("order")
    requests.post(f"{stack.tables.url}/_admin/inbox/faults", json={"drop_notifications": 4}, timeout=10)
    newer = job(keys, job_id, "done", "2026-02-01T00:00:00Z")
    older = job(keys, job_id, "queued", "2026-01-01T00:00:00Z")
    for payload in (newer, older, newer, older):
        inject(stack, FN, payload)
    stack.safety_drain()  # (a wake-up from the echo through Tables may drain some of them concurrently)
    eventually(lambda: (supabase.row("agent_jobs", job_id) or {}).get("status") == "done" or None)
    assert supabase.writes("agent_jobs", job_id) == 1


@contextlib.contextmanager
def unnotified(client, inbox_id: str):
    """The inbox notifies nobody meanwhile (no wake-up can race the test; an echo elsewhere cannot use up
    a dropped-notification fault meant for it); its URL is restored afterwards."""
    url = client.get(inbox_id).notification_url
    client.update(inbox_id, None)
    try:
        yield
    finally:
        client.update(inbox_id, url)


def audit_entry(action: str) -> dict:  # by field name: the consumer reads names too
    return {"id": ulid(), "edited_at": "2026-01-01T00:00:00Z",
            "data": {"action": action, "actor": "zapier_agent_1", "timestamp": "2026-01-01T00:00:00Z"}}


def test_poison_and_unreadable_messages_do_not_block_the_inbox(stack, client, supabase):
    fn = "audit_log_to_supabase"  # no echo back through Tables: nothing else drains this inbox meanwhile
    inbox_id = stack.inboxes[fn]
    poison = audit_entry(uid("poison"))
    good = audit_entry(uid("good"))
    with unnotified(client, inbox_id):
        inject(stack, fn, poison)
        for _ in range(5):  # it kept failing: leased and released five times
            lease = client.lease(inbox_id, 1, 30)
            client.release(inbox_id, lease.lease_id)
        unreadable = inject(stack, fn, {"id": "RECX", "data": {"f99": "who?"}})
        inject(stack, fn, good)
        report = stack.safety_drain()[fn]
    counts = tuple(report.get(k) for k in ("dead_lettered", "rejected", "applied")) if isinstance(report, dict) else ()
    assert counts == (1, 1, 1), report
    assert supabase.row("audit_log", good["id"]) is not None
    assert supabase.row("audit_log", poison["id"]) is None  # whole in the DLQ, for `zsync replay`
    assert unreadable not in [m["id"] for m in client.messages(inbox_id)]
    dlq = dead_letter.DeadLetterQueue(Settings(dlq_url=stack.dlq_url, aws_endpoint_url=stack.aws_endpoint_url))
    letters = [m.letter for m in dlq.receive(10, visibility_timeout_s=1) if m.letter]
    # stored as the delivery a Zap would POST (zsync replay applies it; see test_dead_letter)
    assert any(letter.payload.get("id") == poison["id"] and letter.payload["action"] == poison["data"]["action"]
               for letter in letters)
    failed = supabase.query("SELECT count(*) FROM audit_log WHERE action = 'sync_failed' "
                            "AND metadata::text LIKE '%%f99%%'")
    assert failed[0][0] >= 1


def test_paused_inbox_is_reported_by_doctor(stack, settings, client):
    inbox_id = stack.inboxes["rate_limits_to_supabase"]
    requests.post(f"{stack.tables.url}/_admin/inboxes/{inbox_id}/pause", json={"reason": "authentication"}, timeout=10)
    try:
        urls = {name: fp.url for name, fp in stack.functions.items()}
        checks = {c.target: c for c in doctor.check_inboxes(settings, urls, "local")}
        bad = checks[inbox_key("local", "rate_limits_to_supabase")]
        assert not bad.ok and "paused" in bad.detail and "authentication" in bad.detail
        assert checks[inbox_key("local", FN)].ok
    finally:
        client.resume(inbox_id)


def test_a_notification_without_credentials_writes_only_what_is_in_the_inbox(stack, supabase):
    url = stack.functions[FN].url
    forged = uid("forged")
    body = {"id": forged, "job_type": "discovery", "status": "queued", "record": {"id": forged}}
    r = requests.post(url, params={WAKE_PARAM: "inbox"}, json=body, timeout=30)
    assert r.status_code == 200 and r.json()["outcome"] == "drained"
    assert supabase.row("agent_jobs", forged) is None
    r = requests.post(url, json=body, timeout=30)  # no wake marker, no secret: the Zap path refuses it
    assert r.status_code == 401
    r = requests.post(stack.functions["agent_jobs_to_tables"].url, params={WAKE_PARAM: "inbox"}, json={}, timeout=30)
    assert r.status_code == 401  # only *_to_supabase functions have an inbox


def test_inbox_backlog_in_status_and_doctor(stack, settings, client, supabase):
    """`zsync status` / `zsync doctor` read each inbox's pending count and oldest age (infra.inbox_status)."""
    from infra import inbox_status

    fn = "audit_log_to_supabase"
    first, second = audit_entry(uid("backlog")), audit_entry(uid("backlog"))
    with unnotified(client, stack.inboxes[fn]):
        inject(stack, fn, first)
        time.sleep(0.3)
        inject(stack, fn, second)
        rows = {r["function"]: r for r in inbox_status.backlog(settings, "local")}
        checks = {c.target: c for c in doctor.check_inboxes(settings, {}, "local")}
        stack.safety_drain()
    assert set(rows) == {"agent_jobs_to_supabase", "agent_decisions_to_supabase", fn, "rate_limits_to_supabase"}
    row = rows[fn]
    assert row["status"] == "active" and row["pending"] == 2 and row["oldest_age_s"] >= 0.3, row
    assert not row["alert"] and inbox_status.describe(row).startswith("2 pending, oldest")
    assert checks[row["key"]].ok and "2 pending" in checks[row["key"]].detail
    assert {r["function"]: r for r in inbox_status.backlog(settings, "local")}[fn]["pending"] == 0
    assert supabase.row("audit_log", second["id"]) is not None
    missing = inbox_status.backlog(settings, "nosuchstage")
    assert all(r["alert"] and "zsync wire zapier" in r["error"] for r in missing)


def test_one_bad_record_never_holds_back_or_discards_the_lease(stack, client, supabase, keys):
    """Issue 18 item 4: one created_at of 9999-12-31T12:00:00Z in a lease used to fail the whole lease with a
    500 (nothing acked or released; after the 6th lease every message was dead-lettered). Now the bad messages
    are refused alone (a sync_failed entry holding the delivery, acked), the good ones applied in the same lease."""
    from datetime import UTC, datetime, timedelta

    good = [uid("lease-good") for _ in range(3)]
    bad_9999, bad_future = uid("lease-9999"), uid("lease-future")
    ahead = (datetime.now(UTC) + timedelta(days=1)).isoformat().replace("+00:00", "Z")
    inbox_id = stack.inboxes[FN]
    poison = job(keys, bad_9999, "queued", "2026-01-01T00:00:00Z")
    poison["data"][keys["created_at"]] = "9999-12-31T12:00:00Z"
    future = job(keys, bad_future, "queued", "2026-01-01T00:00:00Z")
    future["data"][keys["updated_at"]] = ahead
    with unnotified(client, inbox_id):
        injected = [inject(stack, FN, payload) for payload in (
            job(keys, good[0], "queued", "2026-01-01T00:00:00Z"), poison,
            job(keys, good[1], "queued", "2026-01-01T00:00:00Z"), future,
            job(keys, good[2], "queued", "2026-01-01T00:00:00Z"))]
        report = stack.safety_drain()[FN]
    assert isinstance(report, dict) and report.get("outcome") == "drained", report
    assert (report.get("applied"), report.get("rejected")) == (3, 2) and report.get("acked", 0) >= 5, report
    left = {m["id"] for m in client.messages(inbox_id)}  # (the applied records' echoes through Tables may be there)
    assert left.isdisjoint(injected)  # nothing left to be re-leased, nothing dead-lettered
    for rid in good:
        assert supabase.row("agent_jobs", rid)["status"] == "queued"
    for rid, field in ((bad_9999, "created_at"), (bad_future, "updated_at")):
        assert supabase.row("agent_jobs", rid) is None
        [(meta,)] = supabase.query("SELECT metadata FROM audit_log WHERE action = 'sync_failed' AND resource_id = %s",
                                   (rid,))
        assert meta["problems"][0]["field"] == field and meta["status"] == 400
        assert json.loads(meta["delivery"])["id"] == rid  # what is needed to repair and re-send it


def test_a_message_that_breaks_the_batch_unforeseen_is_applied_alone(stack, client, supabase, keys):
    """A failure no check foresaw (here a trigger raising an internal error for one value): the lease's other
    messages are applied one by one and acked; only the failing message is released (it comes back, and after
    the poison lease count it goes whole to the dead-letter queue)."""
    good, bad = uid("alone-good"), uid("alone-bad")
    supabase.query("CREATE OR REPLACE FUNCTION public.test_explode() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                   "IF NEW.job_type = 'explode' THEN RAISE EXCEPTION 'unforeseen' USING ERRCODE = 'XX001'; END IF; "
                   "RETURN NEW; END $$")
    supabase.query("CREATE TRIGGER test_explode BEFORE INSERT OR UPDATE ON agent_jobs FOR EACH ROW "
                   "EXECUTE FUNCTION public.test_explode()")
    exploding = job(keys, bad, "queued", "2026-01-01T00:00:00Z")
    exploding["data"][keys["job_type"]] = "explode"
    inbox_id = stack.inboxes[FN]
    try:
        with unnotified(client, inbox_id):
            bad_message = inject(stack, FN, exploding)
            inject(stack, FN, job(keys, good, "queued", "2026-01-01T00:00:00Z"))
            report = stack.safety_drain()[FN]
    finally:
        supabase.query("DROP TRIGGER test_explode ON agent_jobs")
        supabase.query("DROP FUNCTION public.test_explode()")
    assert isinstance(report, dict) and report.get("outcome") == "drained", report
    assert report.get("applied") == 1 and report.get("failed", 0) >= 1 and report.get("released", 0) >= 1, report
    assert supabase.row("agent_jobs", good)["status"] == "queued" and supabase.row("agent_jobs", bad) is None
    assert bad_message in {m["id"] for m in client.messages(inbox_id)}  # released: it comes back
    stack.safety_drain()  # the trigger is gone: it applies now
    assert supabase.row("agent_jobs", bad)["status"] == "queued"
