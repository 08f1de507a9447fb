"""The Tables client on Zapier's public Tables API v2, against the local stand-in over real HTTP: which API
each call uses, UUID ids at the edge and ULIDs inside, paging, and the Idempotency-Key derived from the
change (a create whose answer is lost, retried by urllib3 or re-run by a new process: one record)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from infra.local.tables_service import TablesService
from shared.adapters.zapier_errors import TablesUnavailable
from shared.adapters.zapier_ids import idempotency_key, to_ulid, to_uuid
from shared.adapters.zapier_tables import TablesClient, _next_cursor, public_api_url
from tests.test_tables_service import AUDIT, JOBS, Api, receiver, service  # noqa: F401
from tests.test_zapier_tables import oauth_client

V2 = "/tables/v2/tables/"
SDK = "/api/v0/sdk/tables/api/v1/tables/"


@pytest.fixture
def api(service: TablesService) -> Api:  # noqa: F811
    return Api(service.url).setup()


@pytest.fixture
def client(service: TablesService, api: Api) -> Iterator[TablesClient]:  # noqa: F811
    with oauth_client(service.url) as c:
        c.field_map(api.ids[JOBS])
        c.field_map(api.ids[AUDIT])
        api.admin("DELETE", "requests")
        yield c


def served(api: Api) -> list[dict[str, Any]]:
    return [r for r in api.admin("GET", "requests").json()["data"] if not r["path"].startswith("/oauth")]


def lose_answers(api: Api, count: int, method: str = "POST") -> None:
    armed = api.admin("POST", "faults", {"status": 502, "count": count, "method": method, "lose_response": True})
    assert armed.status_code == 200, armed.text


def jobs_with_id(client: TablesClient, api: Api, value: str) -> list[Any]:
    return list(client.iter_records(api.ids[JOBS], filters={"id": value}))


# --- ids and paths ---------------------------------------------------------------------------------------


def test_ids_are_converted_at_the_edge() -> None:
    assert to_uuid("01ARZ3NDEKTSV4RRFFQ69G5FAV") == "01563e3a-b5d3-d676-4c61-efb99302bd5b"  # the reference's pair
    assert to_ulid("01979d6c-b958-eac5-f32e-58651f0ead82") == "01JYEPSEARXB2Z6BJRCMFGXBC2"
    assert to_ulid(to_uuid("01JYEPSEARXB2Z6BJRCMFGXBC2")) == "01JYEPSEARXB2Z6BJRCMFGXBC2"
    assert to_uuid("job-1") == "job-1" and to_ulid("job-1") == "job-1"  # not an id of either form: unchanged
    assert public_api_url("https://sdkapi.zapier.com") == "https://api.zapier.com"
    assert public_api_url("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"  # the stand-in serves both
    assert public_api_url("https://sdkapi.zapier.com", "https://api.example/") == "https://api.example"


def test_records_go_through_v2_with_uuid_ids_and_records_keep_ulids(client: TablesClient, api: Api) -> None:
    jobs = api.ids[JOBS]
    rec = client.create(jobs, {"id": "v2-1", "status": "queued"})
    assert len(rec.id) == 26 and to_ulid(to_uuid(rec.id)) == rec.id  # a ULID inside zsync
    assert client.get(jobs, rec.id) == rec
    client.update(jobs, rec.id, {"status": "done"})
    assert [r.id for r in jobs_with_id(client, api, "v2-1")] == [rec.id]
    client.delete(jobs, rec.id)
    assert [r.id for r in client.iter_records(jobs, filters={"id": "v2-1"}, trash="only")] == [rec.id]
    log = served(api)
    assert [(r["method"], r["path"].replace(jobs, "T")) for r in log] == [
        ("POST", V2 + "T/records"),
        ("GET", V2 + f"T/records/{to_uuid(rec.id)}"),
        ("PATCH", V2 + "T/records"),
        ("POST", V2 + "T/records/query"),
        ("DELETE", V2 + "T/records"),
        ("POST", SDK + "T/records/query"),  # the trash: not in v2, the SDK path
    ]
    writes = [r for r in log if r["method"] in ("POST", "PATCH", "DELETE") and not r["path"].endswith("/query")]
    assert all(r["idempotency_key"] for r in writes) and len({r["idempotency_key_value"] for r in writes}) == 3
    assert not any(r["idempotency_key"] for r in log if r["path"].endswith("/query"))


def test_query_pages_by_next_cursor_resending_the_same_body(client: TablesClient, api: Api) -> None:
    audit = api.ids[AUDIT]
    client.create_many(audit, [{"n": i, "parity": "even" if i % 2 == 0 else "odd"} for i in range(120)])
    api.admin("DELETE", "requests")
    evens = list(client.iter_records(audit, page_size=25, filters={"parity": "even"}))
    assert [r.data["n"] for r in evens] == list(range(0, 120, 2))
    pages = served(api)
    assert len(pages) == 3 and all(p["path"] == V2 + audit + "/records/query" for p in pages)


def test_next_page_from_meta_or_from_the_links_cursor_only() -> None:
    assert _next_cursor({"meta": {"next_cursor": "abc"}, "links": {"next": "x"}}, "t") == "abc"
    # links.next alone: its cursor is taken, its host never used (the token is not sent elsewhere)
    assert _next_cursor({"meta": {}, "links": {"next": "https://elsewhere.example/q?cursor=p2"}}, "t") == "p2"
    assert _next_cursor({"meta": {"next_cursor": None}, "links": {"next": None}}, "t") is None


# --- Idempotency-Key ---------------------------------------------------------------------------------------


def test_a_create_whose_answer_is_lost_is_retried_with_its_key_one_record(client: TablesClient, api: Api) -> None:
    """The first POST is applied but its answer is lost (a 502 instead); urllib3 retries with the same
    Idempotency-Key, Zapier replays the original answer: one record, and the client gets it."""
    lose_answers(api, 1)
    rec = client.create(api.ids[JOBS], {"id": "lost-1", "status": "queued"})
    assert rec.data["id"] == "lost-1"
    assert [r.id for r in jobs_with_id(client, api, "lost-1")] == [rec.id]
    posts = [r for r in served(api) if r["method"] == "POST" and r["path"].endswith("/records")]
    assert len(posts) == 2 and posts[0]["idempotency_key_value"] == posts[1]["idempotency_key_value"]
    assert api.stats()["writes"].get(api.ids[JOBS], 0) == 1


def test_a_rerun_of_the_same_change_in_another_process_reuses_the_key(service: TablesService,  # noqa: F811
                                                                       client: TablesClient, api: Api) -> None:
    """Every answer lost until the call gives up (a batch that will be re-run: a redelivered webhook, the
    outbox drained again): a new client sending the same change gets the original answer, no second copy."""
    audit = api.ids[AUDIT]
    rows = [{"n": 1000 + i, "parity": "rerun"} for i in range(5)]
    lose_answers(api, 100)
    with pytest.raises(TablesUnavailable):
        client.create_many(audit, rows)
    api.admin("DELETE", "faults")
    with oauth_client(service.url) as other:
        again = other.create_many(audit, [dict(reversed(list(r.items()))) for r in rows])  # any member order
    assert sorted(r.data["n"] for r in again) == [1000, 1001, 1002, 1003, 1004]
    assert len(list(client.iter_records(audit, filters={"parity": "rerun"}))) == 5
    keys = {r["idempotency_key_value"] for r in served(api) if r["method"] == "POST" and r["path"].endswith("/records")}
    assert len(keys) == 1


def test_other_changes_get_other_keys(client: TablesClient, api: Api) -> None:
    """A key is the change: another version is another key; so is deleting a record restored since."""
    jobs = api.ids[JOBS]
    a = idempotency_key(jobs, "POST records", {"new_records": [{"data": {"f1": "x", "f2": "v1"}}]})
    assert a == idempotency_key(jobs, "POST records", {"new_records": [{"data": {"f2": "v1", "f1": "x"}}]})
    assert a != idempotency_key(jobs, "POST records", {"new_records": [{"data": {"f1": "x", "f2": "v2"}}]})
    assert a != idempotency_key(api.ids[AUDIT], "POST records", {"new_records": [{"data": {"f1": "x", "f2": "v1"}}]})

    rec = client.create(jobs, {"id": "restored-1"})
    client.delete(jobs, rec.id)
    assert api.admin("POST", f"tables/{jobs}/records/{rec.id}/restore").status_code == 200
    [live] = jobs_with_id(client, api, "restored-1")  # read again (as deletes.py does before deleting)
    client.delete(jobs, live.id)
    assert jobs_with_id(client, api, "restored-1") == []  # deleted again, not a replay of the first delete
    deletes = [r["idempotency_key_value"] for r in served(api) if r["method"] == "DELETE"]
    assert len(deletes) == 2 and deletes[0] != deletes[1]


def test_without_a_key_a_lost_answer_would_make_two_records(client: TablesClient, api: Api) -> None:
    """The harm the key prevents, shown on the stand-in: the same lost-answer POST, sent without a key."""
    import requests

    from tests.test_tables_service import TOKEN

    lose_answers(api, 1)
    url = f"{api.url}{V2}{api.ids[JOBS]}/records"
    body = {"new_records": [{"data": api.enc(JOBS, {"id": "nokey-1"})}]}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.post(url, json=body, headers=headers, timeout=5).status_code == 502
    assert requests.post(url, json=body, headers=headers, timeout=5).status_code == 201
    assert len(jobs_with_id(client, api, "nokey-1")) == 2


def test_the_same_body_after_the_record_changed_is_a_new_change(client: TablesClient, api: Api) -> None:
    """The body alone cannot tell a retry from a new change: a record a person deleted, re-created from the
    same Supabase version (the newer version won over the delete), is a new record; the same update pushed
    again after someone changed the record is written again. The client names what it last read in the key."""
    jobs = api.ids[JOBS]
    row = {"id": "again-1", "status": "claude", "updated_at": "2026-01-01T00:00:00Z"}
    assert client.find_many(jobs, "id", ["again-1"], trash="include") == []  # what to_tables does first
    first = client.create(jobs, row)
    client.delete(jobs, first.id)  # a person's delete
    [trashed] = client.find_many(jobs, "id", ["again-1"], trash="include")
    assert trashed.deleted_at
    second = client.create(jobs, row)  # the same version re-created
    assert second.id != first.id and [r.id for r in jobs_with_id(client, api, "again-1")] == [second.id]

    pushed = {"status": "claude", "updated_at": "2026-01-01T00:00:00Z"}
    client.update(jobs, second.id, pushed)
    client.update(jobs, second.id, {"status": "stale agent write"})  # someone else's write meanwhile
    client.find_many(jobs, "id", ["again-1"], trash="include")  # read again, as the push-back does
    assert client.update(jobs, second.id, pushed).data["status"] == "claude"
    assert client.get(jobs, second.id).data["status"] == "claude"  # written, not a replay of the first update


def test_identical_records_made_on_purpose_name_their_change(client: TablesClient, api: Api) -> None:
    audit = api.ids[AUDIT]
    row = {"n": 4242, "parity": "twins"}
    client.create(audit, row)
    client.create(audit, row)  # the same change again (a retry): one record
    assert len(list(client.iter_records(audit, filters={"parity": "twins"}))) == 1
    client.create(audit, row, change="second twin")
    client.create(audit, row, change="second twin")  # its retry
    assert len(list(client.iter_records(audit, filters={"parity": "twins"}))) == 2


def test_a_slow_request_is_held_then_runs_and_lands_after_a_later_one(client: TablesClient, api: Api) -> None:
    """``{"slow": true, "hang_s": h}``: the next request (of the method) is held, then runs and is answered as
    usual - stamped when it runs, so a write sent later lands, and is stamped, first."""
    jobs = api.ids[JOBS]
    rec = client.create(jobs, {"id": "slow-1", "status": "queued"})
    for wrong in ({"slow": True, "status": 503, "hang_s": 1}, {"slow": True, "count": 1}, {"slow": "yes"}):
        assert api.admin("POST", "faults", wrong).status_code == 400, wrong
    assert api.admin("POST", "faults", {"slow": True, "hang_s": 1.0, "count": 1, "method": "PATCH"}).status_code == 200
    first: list[Any] = []
    held = threading.Thread(target=lambda: first.append(client.update(jobs, rec.id, {"status": "first"})))
    held.start()
    deadline = time.monotonic() + 10
    while api.admin("GET", "stats").json()["faults"]["served"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    second = client.update(jobs, rec.id, {"status": "second"})  # sent later, lands first
    held.join(15)
    assert first and first[0].data["status"] == "first"  # answered as usual, after the wait
    assert client.get(jobs, rec.id).data["status"] == "first"
    assert first[0].edited_at > second.edited_at
