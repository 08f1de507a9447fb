"""TablesClient and CatchHookWriter against the real local service and a real HTTP receiver."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from infra.local.tables_service import TablesService
from shared.settings import Settings
from shared.zapier_tables import (
    CatchHookWriter,
    Record,
    RetryPolicy,
    TablesAuthError,
    TablesClient,
    TablesDuplicate,
    TablesNotFound,
    TablesRejected,
    TablesUnavailable,
    catch_hook_writer_from_settings,
    client_from_settings,
)
from tests.test_tables_service import AUDIT, JOBS, TOKEN, Api, Receiver, receiver, service  # noqa: F401

FAST = RetryPolicy(max_attempts=4, backoff_factor=0.05, backoff_max=0.2, backoff_jitter=0.05)


@pytest.fixture
def client(service: TablesService) -> Iterator[TablesClient]:  # noqa: F811
    with TablesClient(service.url, TOKEN, timeout_s=2.0, retry_budget_s=5.0, retry=FAST) as c:
        yield c


@pytest.fixture
def api(service: TablesService) -> Api:  # noqa: F811
    Api(service.url).admin("POST", "stats/reset")
    return Api(service.url)


# --- CRUD -------------------------------------------------------------------------------------------------


def test_create_get_update_find_delete(client: TablesClient) -> None:
    rec = client.create(JOBS, {"id": "job-1", "status": "queued", "retry_count": 0})
    assert isinstance(rec, Record) and rec.id.startswith("rec_")
    assert rec.data["id"] == "job-1" and rec.created_at and rec.updated_at
    assert "created_at" in rec.data and rec.created_at.endswith("Z")  # a stamped field and system metadata

    assert client.get(JOBS, rec.id) == rec
    assert client.find_by_field(JOBS, "id", "job-1") == rec
    assert client.find_by_field(JOBS, "id", "job-404") is None
    assert client.find_by_field(JOBS, "retry_count", 0) == rec

    updated = client.update(JOBS, rec.id, {"status": "running"})
    assert updated.data["status"] == "running" and updated.data["retry_count"] == 0

    client.delete(JOBS, rec.id)
    with pytest.raises(TablesNotFound) as err:
        client.get(JOBS, rec.id)
    assert err.value.status == 404
    client.delete(JOBS, rec.id, missing_ok=True)
    with pytest.raises(TablesNotFound):
        client.delete(JOBS, rec.id)


def test_find_by_field_refuses_duplicates(client: TablesClient) -> None:
    first = client.create(JOBS, {"id": "dup"})
    second = client.create(JOBS, {"id": "dup"})
    with pytest.raises(TablesDuplicate) as err:
        client.find_by_field(JOBS, "id", "dup")
    assert err.value.record_ids == [first.id, second.id] and "more than one" in str(err.value)


def test_unknown_table_and_flat_values_only(client: TablesClient) -> None:
    with pytest.raises(TablesNotFound):
        client.create("tbl_nope", {"a": "1"})
    with pytest.raises(ValueError, match="JSON goes as a string"):
        client.create(JOBS, {"parameters": {"metro": "Austin"}})


def test_many_records_batches_and_paging(client: TablesClient, api: Api) -> None:
    rows = [{"n": i, "parity": "even" if i % 2 == 0 else "odd"} for i in range(255)]
    created = client.create_many(AUDIT, rows)
    assert [r.data for r in created] == rows
    assert api.stats()["api_requests"] == 3  # chunks of 100

    assert [r.data["n"] for r in client.iter_records(AUDIT, page_size=100)] == list(range(255))
    evens = list(client.iter_records(AUDIT, page_size=50, filters={"parity": "even"}))
    assert [r.data["n"] for r in evens] == list(range(0, 255, 2))
    assert [r.data["n"] for r in client.iter_records(AUDIT, filters={"parity": "odd", "n": 7})] == [7]

    updated = client.update_many(AUDIT, [(r.id, {"parity": "seen"}) for r in created[:150]])
    assert len(updated) == 150 and all(r.data["parity"] == "seen" for r in updated)
    assert len(list(client.iter_records(AUDIT, page_size=1000, filters={"parity": "seen"}))) == 150
    with pytest.raises(ValueError):
        list(client.iter_records(AUDIT, page_size=0))


# --- errors and secrecy -----------------------------------------------------------------------------------


def test_wrong_token_is_an_auth_error_without_the_token(service: TablesService) -> None:  # noqa: F811
    bad_token = "bad-" + TOKEN
    with TablesClient(service.url, bad_token, 2.0, 5.0, retry=FAST) as bad:
        assert bad_token not in repr(bad)
        with pytest.raises(TablesAuthError) as err:
            bad.get(JOBS, "rec_x")
    assert err.value.status == 401
    assert bad_token not in str(err.value) and TOKEN not in str(err.value)
    with pytest.raises(ValueError):
        TablesClient(service.url, "")


def test_bad_request_is_rejected_and_not_retried(client: TablesClient, api: Api) -> None:
    with pytest.raises(TablesRejected) as err:
        client.create(JOBS, {"bad-name": "x"})
    assert err.value.status == 400 and "invalid field name" in err.value.message
    assert api.stats()["api_requests"] == 1


# --- retries ----------------------------------------------------------------------------------------------


def test_429_waits_for_retry_after_then_succeeds(client: TablesClient, api: Api) -> None:
    api.admin("POST", "faults", {"status": 429, "count": 1, "retry_after": 1})
    started = time.monotonic()
    rec = client.create(JOBS, {"id": "after-429"})
    assert time.monotonic() - started >= 1.0
    assert rec.data["id"] == "after-429"
    assert api.stats()["api_requests"] == 2 and api.stats()["writes"][JOBS] == 1


def test_503_twice_then_success(client: TablesClient, api: Api) -> None:
    api.admin("POST", "faults", {"status": 503, "count": 2})
    assert client.update_many(JOBS, []) == []  # no request at all
    rec = client.create(JOBS, {"id": "after-503"})
    assert rec.data["id"] == "after-503"
    assert api.stats()["api_requests"] == 3


def test_persistent_5xx_ends_unavailable_after_max_attempts(client: TablesClient, api: Api) -> None:
    api.admin("POST", "faults", {"status": 500, "count": 100})
    with pytest.raises(TablesUnavailable) as err:
        client.find_by_field(JOBS, "id", "x")
    assert err.value.status == 500 and "injected fault" in err.value.message
    assert api.stats()["api_requests"] == FAST.max_attempts


def test_retry_after_beyond_the_budget_gives_up_at_once(client: TablesClient, api: Api) -> None:
    api.admin("POST", "faults", {"status": 429, "count": 5, "retry_after": 60})
    started = time.monotonic()
    with pytest.raises(TablesUnavailable) as err:
        client.create(JOBS, {"id": "never"})
    assert time.monotonic() - started < 1.0
    assert err.value.status == 429 and err.value.retry_after == 60
    assert api.stats()["api_requests"] == 1


def test_connection_refused_ends_unavailable_within_budget() -> None:
    closed = Receiver()  # bound, not listening: connection refused
    policy = RetryPolicy(max_attempts=50, backoff_factor=0.05, backoff_max=0.2, backoff_jitter=0.05)
    try:
        with TablesClient(closed.url, TOKEN, timeout_s=0.5, retry_budget_s=1.5, retry=policy) as c:
            started = time.monotonic()
            with pytest.raises(TablesUnavailable) as err:
                c.create(JOBS, {"id": "x"})
            elapsed = time.monotonic() - started
    finally:
        closed.stop()
    assert 0.5 < elapsed <= 1.5 + 0.5  # slack for a loaded machine
    assert err.value.status is None and "NewConnectionError" in err.value.message and TOKEN not in str(err.value)


def test_slow_server_read_timeouts_stay_within_budget() -> None:
    slow = Receiver().start()
    slow.delay_s = 1.0
    try:
        with TablesClient(slow.url, TOKEN, timeout_s=0.3, retry_budget_s=1.0, retry=FAST) as c:
            started = time.monotonic()
            with pytest.raises(TablesUnavailable) as err:
                c.update(JOBS, "rec_1", {"a": "b"})
            elapsed = time.monotonic() - started
    finally:
        slow.stop()
    assert elapsed <= 1.0 + 0.5  # slack for a loaded machine
    assert "ReadTimeout" in err.value.message
    assert 1 < len(slow.requests) <= FAST.max_attempts  # PATCH was retried after read timeouts


# --- catch hook writer ------------------------------------------------------------------------------------


def test_catch_hook_writer_posts_flat_fields_and_retries_5xx(receiver: Receiver) -> None:  # noqa: F811
    hooks = {"agent_jobs": receiver.url + "/hooks/catch/123/abc/"}
    writer = CatchHookWriter(hooks, timeout_s=2.0, retry_budget_s=5.0, retry=FAST)
    receiver.statuses.append(503)
    fields = {"id": "job-1", "status": "queued", "parameters": '{"metro": "Austin"}', "retry_count": 0}
    writer.send("agent_jobs", fields)
    got = receiver.wait_for(2)
    assert [r.body for r in got] == [fields, fields]
    assert got[0].path == "/hooks/catch/123/abc/" and got[0].headers["Content-Type"] == "application/json"

    receiver.statuses.append(410)
    with pytest.raises(TablesRejected) as err:
        writer.send("agent_jobs", fields)
    assert err.value.status == 410 and "abc" not in str(err.value) and "agent_jobs" in str(err.value)
    with pytest.raises(ValueError, match="no catch hook"):
        writer.send("rate_limits", fields)
    writer.close()


def test_catch_hook_writer_unreachable_hook_hides_url() -> None:
    closed = Receiver()
    try:
        writer = CatchHookWriter({"agent_jobs": closed.url + "/hooks/catch/secret-hook/"}, 0.5, 0.5, retry=FAST)
        with pytest.raises(TablesUnavailable) as err:
            writer.send("agent_jobs", {"id": "x"})
    finally:
        closed.stop()
    assert "secret-hook" not in str(err.value) and str(closed.port) not in str(err.value)


# --- settings ---------------------------------------------------------------------------------------------


def test_built_from_settings(service: TablesService, tmp_path: Path) -> None:  # noqa: F811
    settings = Settings(tables_api_url=service.url, tables_token=TOKEN, http_timeout_s=2, retry_budget_s=3)
    with client_from_settings(settings) as c:
        assert c.timeout_s == 2 and c.retry_budget_s == 3
        assert c.create(JOBS, {"id": "from-settings"}).data["id"] == "from-settings"
    with pytest.raises(ValueError, match="ZSYNC_TABLES_TOKEN"):
        client_from_settings(Settings(tables_token=None))
    writer = catch_hook_writer_from_settings(Settings(catch_hook_urls={"agent_jobs": "https://hooks.example/1"}))
    assert "hooks.example" not in repr(writer)
    with pytest.raises(ValueError, match="ZSYNC_CATCH_HOOK_URLS"):
        catch_hook_writer_from_settings(Settings(catch_hook_urls={}))
    assert requests.get(service.url + "/_admin/health", timeout=2).ok
