"""The local trigger-inbox stand-in keeps Zapier's documented bounds (``/work/shared/reference/
zapier-public-api.md`` 2.8-2.12): lease_limit 1-100 (default 10), lease_seconds 1-3600 (default 300),
anything else a 400 naming the member; ack/release take 1-100 message ids; a quarantine threshold tests
set low; the notification body ``{inbox_id, received_message_count, redelivery}``. Over real HTTP, with
our own inbox client (shared/adapters/trigger_inbox.py)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from infra.local.trigger_inbox_service import QUARANTINE_AFTER
from shared.adapters.trigger_inbox import InboxClient, InboxError, LeaseExpired, Subscription
from shared.services.inbox_consumer import POISON_LEASE_COUNT
from tests.tables_local import LocalTables, start_local_tables
from tests.test_tables_service import Receiver

LEASE = "/api/v0/sdk/trigger-inbox/api/v1/inboxes/{}/messages/lease"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalTables]:
    with start_local_tables(tmp_path / "tables.sqlite3", names=["agent_jobs"]) as lt:
        yield lt


@pytest.fixture
def client(local: LocalTables) -> Iterator[InboxClient]:
    c = InboxClient.for_tables(local.client())
    yield c
    c.close()


def _inbox(local: LocalTables, client: InboxClient, url: str | None) -> str:
    sub = Subscription("TableCLIAPI@1.0.0", "new_or_updated_record", {"table_id": local.ids["agent_jobs"]})
    return client.create(f"test-{uuid.uuid4().hex[:8]}", sub, url).id


def _put(local: LocalTables, inbox_id: str, n: int) -> None:
    for i in range(n):
        r = requests.post(f"{local.url}/_admin/inboxes/{inbox_id}/messages",
                          json={"payload": {"id": f"R{i}", "data": {"status": "x"}}}, timeout=10)
        assert r.status_code == 200, r.text


def _lease(local: LocalTables, client: InboxClient, inbox_id: str, body: dict) -> requests.Response:
    token = client._auth.authorization()  # the same OAuth token our client uses
    return requests.post(local.url + LEASE.format(inbox_id), json=body, headers={"Authorization": token},
                         timeout=10)


def test_lease_defaults_to_10_messages_for_300_seconds(local, client):
    inbox_id = _inbox(local, client, None)
    _put(local, inbox_id, 12)
    answer = _lease(local, client, inbox_id, {})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["results"]) == 10
    until = datetime.fromisoformat(body["leased_until"]).astimezone(UTC)
    assert 295 <= (until - datetime.now(UTC)).total_seconds() <= 301


@pytest.mark.parametrize("member,value", [
    ("lease_limit", 0), ("lease_limit", 101), ("lease_limit", "5"), ("lease_limit", 2.5), ("lease_limit", True),
    ("lease_limit", None), ("lease_seconds", 0), ("lease_seconds", 3601), ("lease_seconds", "60"),
    ("lease_seconds", -1),
])
def test_lease_outside_the_documented_bounds_is_a_400_naming_the_member(local, client, member, value):
    inbox_id = _inbox(local, client, None)
    _put(local, inbox_id, 1)
    answer = _lease(local, client, inbox_id, {member: value})
    assert answer.status_code == 400, answer.text
    assert member in answer.json()["errors"][0]["detail"]
    assert client.lease(inbox_id, 1, 30).messages  # nothing was leased by the refused request


def test_lease_at_the_bounds_is_accepted(local, client):
    inbox_id = _inbox(local, client, None)
    _put(local, inbox_id, 101)
    lease = client.lease(inbox_id, 100, 3600)
    assert len(lease.messages) == 100
    assert len(client.lease(inbox_id, 1, 1).messages) == 1


def test_ack_and_release_take_1_to_100_message_ids(local, client):
    inbox_id = _inbox(local, client, None)
    _put(local, inbox_id, 2)
    lease = client.lease(inbox_id, 2, 30)
    for bad in ([], [str(uuid.uuid4())] * 101, ["not-a-uuid"]):
        with pytest.raises(InboxError) as err:
            client.ack(inbox_id, lease.lease_id, bad)
        assert err.value.status == 400 and "message_ids" in str(err.value)
    with pytest.raises(InboxError) as err:
        client.ack(inbox_id, "not-a-lease", None)
    assert err.value.status == 400 and "lease_id" in str(err.value)
    client.ack(inbox_id, lease.lease_id, [lease.messages[0].id])
    client.release(inbox_id, lease.lease_id)  # the rest of the lease
    with pytest.raises(LeaseExpired):  # nothing of that lease is left to settle
        client.ack(inbox_id, lease.lease_id)
    with pytest.raises(LeaseExpired):
        client.release(inbox_id, str(uuid.uuid4()))  # a lease that never existed
    assert [m.id for m in client.lease(inbox_id, 10, 30).messages] == [lease.messages[1].id]


def test_default_quarantine_leaves_room_for_the_consumers_dead_letter_rule():
    # shared.services.inbox_consumer dead-letters a message itself once it was leased more than POISON_LEASE_COUNT
    # times; Zapier's own threshold is not published. The stand-in's default is the lowest that allows it.
    assert QUARANTINE_AFTER == POISON_LEASE_COUNT + 1


def test_a_message_leased_quarantine_after_times_is_quarantined(local, client):
    inbox_id = _inbox(local, client, None)
    r = requests.post(f"{local.url}/_admin/inbox/faults", json={"quarantine_after": 2}, timeout=10)
    assert r.json() == {"quarantine_after": 2}
    _put(local, inbox_id, 1)
    for n in (1, 2):
        lease = client.lease(inbox_id, 10, 30)
        assert [m.lease_count for m in lease.messages] == [n]
        client.release(inbox_id, lease.lease_id)  # a release still counts as a lease
    third = client.lease(inbox_id, 10, 30)
    assert third.messages == [] and third.lease_id is None and third.leased_until is None
    listed = client.messages(inbox_id)
    assert [m["status"] for m in listed] == ["quarantined"]
    assert "leased 2 times" in listed[0]["message_attributes"]["error_message"]
    backlog = client.backlog(inbox_id)
    assert (backlog.pending, backlog.other) == (0, 1)  # what zsync status / doctor read


def test_notification_body_is_the_documented_one(local, client, receiver):
    inbox_id = _inbox(local, client, receiver.url + "/wake")
    _put(local, inbox_id, 1)
    got = receiver.wait_for(1)[0]
    assert got.body == {"inbox_id": inbox_id, "received_message_count": 1, "redelivery": False}
    assert not any(k.lower().startswith("x-zsync") or k.lower() == "authorization" for k in got.headers)


def test_notifications_waiting_to_be_sent_are_coalesced_and_counted(local, client, receiver):
    receiver.delay_s = 0.5  # the first POST is slow: the next messages' wake-ups wait behind it
    inbox_id = _inbox(local, client, receiver.url + "/wake")
    _put(local, inbox_id, 1)
    receiver.wait_for(1)
    _put(local, inbox_id, 3)
    got = receiver.wait_for(2)
    time.sleep(0.7)
    bodies = [r.body for r in receiver.requests]
    assert sum(b["received_message_count"] for b in bodies) == 4
    assert all(b["inbox_id"] == inbox_id for b in bodies) and len(got) >= 2
    assert len(bodies) < 4  # some were coalesced


def test_a_redelivery_wakeup_says_so_and_counts_one(local, client, receiver):
    """Zapier's manual re-send after a delivery outage: ``redelivery: true``, the count a placeholder."""
    requests.post(f"{local.url}/_admin/inbox/faults", json={"drop_notifications": 3}, timeout=10)
    inbox_id = _inbox(local, client, receiver.url + "/wake")
    _put(local, inbox_id, 3)  # their wake-ups are lost (the outage)
    assert requests.post(f"{local.url}/_admin/inboxes/{inbox_id}/redeliver", timeout=10).status_code == 200
    got = receiver.wait_for(1)[0]
    assert got.body == {"inbox_id": inbox_id, "received_message_count": 1, "redelivery": True}


def test_the_deletes_capable_trigger_delivers_deletes_and_the_other_does_not(local, client):
    table = local.ids["agent_jobs"]
    plain = _inbox(local, client, None)
    sub = Subscription("TableCLIAPI@1.0.0", "new_updated_or_deleted_record", {"table_id": table})
    with_deletes = client.create(f"test-{uuid.uuid4().hex[:8]}", sub, None).id
    tables = local.client()
    rec = tables.create(table, {"id": "del-1", "status": "queued"})
    tables.delete(table, rec.id)
    plain_events = [m.payload for m in client.lease(plain, 10, 30).messages]
    events = [m.payload for m in client.lease(with_deletes, 10, 30).messages]
    assert len(plain_events) == 1 and "event" not in plain_events[0]  # the create only
    assert [e["event"] for e in events] == ["added", "deleted"]
    assert events[0]["deleted_at"] is None and events[1]["deleted_at"] and events[1]["id"] == rec.id
    assert events[1]["data"] == events[0]["data"]  # the record as it was


# --- our client on the public Trigger Inbox API: prefix and lease bounds ------------------------------------


@pytest.mark.parametrize("prefix", ["/trigger-inbox/api/v1", "/trigger-inbox/v1"])
def test_the_client_speaks_either_documented_prefix(local, prefix):
    tables = local.client()
    with InboxClient.for_tables(tables, prefix=prefix) as client:
        inbox_id = _inbox(local, client, None)
        _put(local, inbox_id, 2)
        lease = client.lease(inbox_id, 10, 30)
        client.ack(inbox_id, lease.lease_id)
    paths = [r["path"] for r in requests.get(f"{local.url}/_admin/requests", timeout=10).json()["data"]]
    assert f"{prefix}/inboxes/{inbox_id}/messages/lease" in paths
    assert not any(p.startswith("/api/v0/sdk/trigger-inbox") for p in paths)


def test_lease_bounds_are_refused_before_any_request_and_at_settings_load(client, monkeypatch):
    from pydantic import ValidationError

    from shared.platform.settings import Settings

    for limit, seconds in ((0, 300), (101, 300), (10, 0), (10, 3601)):
        with pytest.raises(ValueError, match="expected an integer from 1 to"):
            client.lease("00000000-0000-0000-0000-000000000000", limit, seconds)
    with pytest.raises(ValueError, match="prefix"):
        InboxClient("http://127.0.0.1:9", client._auth, prefix="/api/v0/sdk/trigger-inbox/api/v1")
    # ours, inside the bounds: a lease is one batch of 100; a killed drain holds its messages back a minute
    assert (Settings().inbox_lease_limit, Settings().inbox_lease_seconds) == (100, 60)
    for name, value, bounds in (("ZSYNC_INBOX_LEASE_LIMIT", "101", "1 to 100"),
                                ("ZSYNC_INBOX_LEASE_LIMIT", "ten", "1 to 100"),
                                ("ZSYNC_INBOX_LEASE_SECONDS", "3601", "1 to 3600"),
                                ("ZSYNC_INBOX_LEASE_SECONDS", "0", "1 to 3600")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValidationError) as err:
            Settings()
        assert name in str(err.value) and repr(value) in str(err.value) and bounds in str(err.value)
        monkeypatch.delenv(name)
    monkeypatch.setenv("ZSYNC_INBOX_PATH_PREFIX", "/trigger-inbox/v2")
    with pytest.raises(ValidationError, match="ZSYNC_INBOX_PATH_PREFIX"):
        Settings()
    monkeypatch.setenv("ZSYNC_INBOX_PATH_PREFIX", "/trigger-inbox/v1")
    assert Settings().inbox_path_prefix == "/trigger-inbox/v1"
