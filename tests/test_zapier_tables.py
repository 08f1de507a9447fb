"""TablesClient and CatchHookWriter against the real local service (the real Zapier Tables API shape)
and a real HTTP receiver."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from infra.local.tables_service import TablesService
from shared.adapters.catch_hook import CatchHookWriter, catch_hook_writer_from_settings
from shared.adapters.zapier_errors import (
    TablesAuthError,
    TablesDuplicate,
    TablesFieldMissing,
    TablesNotFound,
    TablesRejected,
    TablesUnavailable,
)
from shared.adapters.zapier_oauth import TOKEN_REFRESH_MARGIN_S
from shared.adapters.zapier_retry import RetryPolicy
from shared.adapters.zapier_tables import Record, TablesClient, client_from_settings
from shared.platform.settings import Settings
from tests.test_tables_service import (  # noqa: F401
    AUDIT,
    CLIENT_ID,
    CLIENT_SECRET,
    JOBS,
    TOKEN,
    Api,
    Receiver,
    receiver,
    service,
    start_service,
)

FAST = RetryPolicy(max_attempts=4, backoff_factor=0.05, backoff_max=0.2, backoff_jitter=0.05)


def oauth_client(url: str, **kw: object) -> TablesClient:
    kw = {"timeout_s": 2.0, "retry_budget_s": 5.0, "retry": FAST} | kw
    return TablesClient(url, None, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                        token_url=url + "/oauth/token/", **kw)  # type: ignore[arg-type]


@pytest.fixture
def api(service: TablesService) -> Api:  # noqa: F811
    made = Api(service.url).setup()
    made.admin("POST", "stats/reset")
    return made


@pytest.fixture
def client(service: TablesService, api: Api) -> Iterator[TablesClient]:  # noqa: F811
    with oauth_client(service.url) as c:
        c.field_map(api.ids[JOBS])  # list the fields now, so request counts below are the calls' own
        c.field_map(api.ids[AUDIT])
        api.admin("POST", "stats/reset")
        yield c


# --- CRUD -------------------------------------------------------------------------------------------------


def test_create_get_update_find_delete(client: TablesClient, api: Api) -> None:
    jobs = api.ids[JOBS]
    rec = client.create(jobs, {"id": "job-1", "status": "queued", "retry_count": 0, "parameters": {"a": [1, 2]},
                               "tags": ["x", "y"]})
    assert isinstance(rec, Record) and len(rec.id) == 26 and rec.created_at and rec.edited_at
    assert rec.data["id"] == "job-1" and rec.data["parameters"] == {"a": [1, 2]} and rec.data["tags"] == ["x", "y"]
    assert "created_at" not in rec.data and rec.created_at.endswith("Z")  # only the fields sent; system metadata
    assert not any(re.match(r"^f\d+$", k) for k in rec.data)  # our names, not Zapier's f<n>

    assert client.get(jobs, rec.id) == rec
    assert client.find_by_field(jobs, "id", "job-1") == rec
    assert client.find_by_field(jobs, "id", "job-404") is None
    assert client.find_by_field(jobs, "retry_count", 0) == rec

    updated = client.update(jobs, rec.id, {"status": "running"})
    assert updated.data["status"] == "running" and updated.data["retry_count"] == 0
    assert updated.edited_at and updated.edited_at >= rec.edited_at

    client.delete(jobs, rec.id)
    assert client.find_by_field(jobs, "id", "job-1") is None
    trashed = list(client.iter_records(jobs, filters={"id": "job-1"}, trash="only"))
    assert [r.id for r in trashed] == [rec.id] and trashed[0].deleted_at
    with pytest.raises(TablesNotFound):  # public v2: a trashed record is not found by GET (the stand-in's choice)
        client.get(jobs, rec.id)
    client.delete(jobs, rec.id, missing_ok=True)
    with pytest.raises(TablesNotFound) as err:
        client.delete(jobs, rec.id)
    assert err.value.status == 404


def test_find_by_field_refuses_duplicates(client: TablesClient, api: Api) -> None:
    first = client.create(api.ids[JOBS], {"id": "dup"})
    second = client.create(api.ids[JOBS], {"id": "dup", "status": "another change"})  # the same: one record
    with pytest.raises(TablesDuplicate) as err:
        client.find_by_field(api.ids[JOBS], "id", "dup")
    assert err.value.record_ids == [first.id, second.id] and "more than one" in str(err.value)


def test_find_many_uses_in_queries(client: TablesClient, api: Api) -> None:
    made = client.create_many(api.ids[AUDIT], [{"n": i} for i in range(30)])
    api.admin("POST", "stats/reset")
    found = client.find_many(api.ids[AUDIT], "n", [3, 7, 29, 99, None, 3])
    assert sorted(r.data["n"] for r in found) == [3, 7, 29] and {r.id for r in found} <= {r.id for r in made}
    assert api.stats()["api_requests"] == 1  # one "in" query
    assert client.find_many(api.ids[AUDIT], "n", []) == []


def test_unknown_table_and_values_json_cannot_carry(client: TablesClient) -> None:
    with pytest.raises(TablesNotFound):
        client.create("01HZZZZZZZZZZZZZZZZZZZZZZZ", {"a": "1"})
    with pytest.raises(TablesNotFound):
        client.get("01HZZZZZZZZZZZZZZZZZZZZZZZ", "01HZZZZZZZZZZZZZZZZZZZZZZZ")


def test_many_records_batches_and_paging(client: TablesClient, api: Api) -> None:
    audit = api.ids[AUDIT]
    rows = [{"n": i, "parity": "even" if i % 2 == 0 else "odd"} for i in range(255)]
    created = client.create_many(audit, rows)
    assert [r.data for r in created] == rows
    assert api.stats()["api_requests"] == 3  # batches of 100

    assert [r.data["n"] for r in client.iter_records(audit, page_size=100)] == list(range(255))
    evens = list(client.iter_records(audit, page_size=50, filters={"parity": "even"}))
    assert [r.data["n"] for r in evens] == list(range(0, 255, 2))
    assert [r.data["n"] for r in client.iter_records(audit, filters={"parity": "odd", "n": 7})] == [7]

    api.admin("POST", "stats/reset")
    updated = client.update_many(audit, [(r.id, {"parity": "seen"}) for r in created[:150]])
    assert len(updated) == 150 and all(r.data["parity"] == "seen" for r in updated)
    assert api.stats()["api_requests"] == 2
    assert len(list(client.iter_records(audit, page_size=1000, filters={"parity": "seen"}))) == 150
    with pytest.raises(ValueError):
        list(client.iter_records(audit, page_size=0))
    with pytest.raises(ValueError):
        list(client.iter_records(audit, trash="all"))


# --- refusals and configuration errors --------------------------------------------------------------------


def test_a_refused_field_value_names_our_field(client: TablesClient, api: Api) -> None:
    """Public v2: a value that does not fit refuses the whole write (a 4xx in the error envelope, nothing
    written); the refusal names our field, not Zapier's ``f<n>``."""
    with pytest.raises(TablesRejected) as err:
        client.create(api.ids[JOBS], {"id": "typed", "retry_count": "lots", "status": "ok"})
    assert err.value.fields == ["retry_count"] and err.value.status == 422
    assert "retry_count" in str(err.value) and "not a number" in str(err.value)
    assert not re.search(r"\bf\d+\b", str(err.value))
    assert client.find_by_field(api.ids[JOBS], "id", "typed") is None  # all-or-nothing: nothing written
    rec = client.create(api.ids[JOBS], {"id": "typed", "status": "ok"})
    with pytest.raises(TablesRejected) as err:
        client.update(api.ids[JOBS], rec.id, {"ok": "yes", "retry_count": "many"})
    assert err.value.fields == ["ok", "retry_count"]
    assert client.get(api.ids[JOBS], rec.id) == rec  # unchanged


def test_a_missing_field_is_a_configuration_error_naming_table_and_field(client: TablesClient, api: Api) -> None:
    jobs = api.ids[JOBS]
    with pytest.raises(TablesFieldMissing) as err:
        client.create(jobs, {"id": "x", "no_such_field": 1})
    assert err.value.table_id == jobs and err.value.field == "no_such_field"
    assert jobs in str(err.value) and "'no_such_field'" in str(err.value) and "zsync setup zapier" in str(err.value)
    with pytest.raises(TablesFieldMissing):
        client.find_by_field(jobs, "no_such_field", 1)
    assert client.find_by_field(jobs, "id", "x") is None  # nothing written


def test_a_field_deleted_in_zapier_is_noticed_through_meta_errors(client: TablesClient, api: Api) -> None:
    """The client's cached field id is refused (``meta.errors`` in a 200): it lists the fields again, and
    the field is now missing: a configuration error, not a silent drop."""
    jobs = api.ids[JOBS]
    status_id = int(api.keys[JOBS]["status"][1:])
    assert api.call("DELETE", f"/tables/{jobs}/fields", {"field_ids": [status_id]}).status_code == 204
    api.admin("POST", "stats/reset")
    with pytest.raises(TablesFieldMissing) as err:
        client.create(jobs, {"id": "x", "status": "queued"})
    assert err.value.field == "status"
    # the refused create, the fields listed again (after the refusal, and for the missing name); no resend
    assert api.stats()["api_requests"] == 3
    assert client.find_by_field(jobs, "id", "x") is None  # nothing written
    assert client.create(jobs, {"id": "x"}).data["id"] == "x"


def test_a_field_added_in_zapier_is_picked_up(client: TablesClient, api: Api) -> None:
    jobs = api.ids[JOBS]
    assert api.call("POST", f"/tables/{jobs}/fields",
                    {"new_fields": [{"name": "priority", "type": "number"}]}).status_code == 201
    rec = client.create(jobs, {"id": "p", "priority": 2})  # unknown name: the fields are listed again
    assert rec.data["priority"] == 2


# --- authentication ---------------------------------------------------------------------------------------


def test_wrong_client_secret_is_an_auth_error_without_the_secret(service: TablesService, api: Api) -> None:  # noqa: F811
    bad = TablesClient(service.url, None, 2.0, 5.0, retry=FAST, client_id=CLIENT_ID, client_secret="wrong-secret",
                       token_url=service.url + "/oauth/token/")
    with bad:
        assert "wrong-secret" not in repr(bad)
        with pytest.raises(TablesAuthError) as err:
            bad.find_by_field(api.ids[JOBS], "id", "x")
    assert err.value.status == 401 and "wrong-secret" not in str(err.value) and "CLIENT_SECRET" in str(err.value)
    with pytest.raises(ValueError):
        TablesClient(service.url, "")


def test_a_wrong_static_token_is_an_auth_error_without_the_token(service: TablesService, api: Api) -> None:  # noqa: F811
    with TablesClient(service.url, "bad-" + TOKEN, 2.0, 5.0, retry=FAST) as bad, \
            pytest.raises(TablesAuthError) as err:
        bad.get(api.ids[JOBS], "01HZZZZZZZZZZZZZZZZZZZZZZZ")
    assert err.value.status == 401 and TOKEN not in str(err.value)
    with TablesClient(service.url, TOKEN, 2.0, 5.0, retry=FAST) as good:  # a token made by the user works
        assert good.find_by_field(api.ids[JOBS], "id", "x") is None


def test_a_401_fetches_a_new_token_once(client: TablesClient, service: TablesService, api: Api) -> None:  # noqa: F811
    jobs = api.ids[JOBS]
    client.find_by_field(jobs, "id", "warm")
    fetched = client.tokens.fetches
    service.ctx.tokens.clear()  # Zapier revoked every token
    assert client.create(jobs, {"id": "after-401"}).data["id"] == "after-401"
    assert client.tokens.fetches == fetched + 1
    client.find_by_field(jobs, "id", "after-401")
    assert client.tokens.fetches == fetched + 1  # the new token is cached


def test_a_401_with_a_fresh_token_too_is_not_retried_again(tmp_path: Path) -> None:
    with start_service(tmp_path / "t.db", None, token_ttl_s=0) as svc:  # every token is expired at once
        api = Api(svc.url).setup()
        api.admin("POST", "stats/reset")
        with oauth_client(svc.url) as c:
            # tokens are cached per process by token URL and client id: a service of an earlier test on the same
            # port (ports are reused) may have left one, which would stand in for the first fetch (CI flaked so)
            c.tokens.invalidate()
            with pytest.raises(TablesAuthError) as err:
                c.find_by_field(api.ids[JOBS], "id", "x")
            assert err.value.status == 401
            assert c.tokens.fetches == 2  # the first token, and one more after the 401
        assert api.stats()["api_requests"] == 2


def test_the_token_is_refreshed_before_it_expires(tmp_path: Path) -> None:
    ttl = int(TOKEN_REFRESH_MARGIN_S) + 1  # valid at Zapier for the whole test, due for refresh after 1 s
    with start_service(tmp_path / "t.db", None, token_ttl_s=ttl) as svc:
        api = Api(svc.url).setup()
        with oauth_client(svc.url) as c:
            c.tokens.invalidate()  # no token left by an earlier service on this port (see above)
            c.find_by_field(api.ids[JOBS], "id", "x")
            c.find_by_field(api.ids[JOBS], "id", "x")
            assert c.tokens.fetches == 1
            time.sleep(1.2)
            issued = set(svc.ctx.tokens)
            api.admin("POST", "stats/reset")
            c.find_by_field(api.ids[JOBS], "id", "x")
            assert c.tokens.fetches == 2  # fetched before use, not after a 401
            assert api.stats()["api_requests"] == 1  # no refused attempt
            assert set(svc.ctx.tokens) - issued  # a new token was issued while the old one was still valid


# --- retries ----------------------------------------------------------------------------------------------


def test_429_waits_for_retry_after_then_succeeds(client: TablesClient, api: Api) -> None:
    api.admin("POST", "faults", {"status": 429, "count": 1, "retry_after": 1})
    started = time.monotonic()
    rec = client.create(api.ids[JOBS], {"id": "after-429"})
    assert time.monotonic() - started >= 1.0
    assert rec.data["id"] == "after-429"
    assert api.stats()["api_requests"] == 2 and api.writes(JOBS) == 1


def test_the_per_table_rate_limit_is_absorbed(tmp_path: Path) -> None:
    """Zapier's 429 + Retry-After at the per-table rate: the client waits and every call succeeds."""
    with start_service(tmp_path / "rl.db", None, rate_limit=5, rate_window_s=1.0) as svc:
        api = Api(svc.url).setup()
        with oauth_client(svc.url, retry_budget_s=10.0, retry=RetryPolicy(max_attempts=6)) as c:
            c.field_map(api.ids[AUDIT])
            api.admin("POST", "stats/reset")
            made = [c.create(api.ids[AUDIT], {"n": i}).id for i in range(12)]
        assert len(set(made)) == 12 and len(api.found(AUDIT, limit=100)) == 12
        assert api.stats()["api_requests"] > 12  # some attempts were answered 429 and retried


def test_503_twice_then_success(client: TablesClient, api: Api) -> None:
    api.admin("POST", "faults", {"status": 503, "count": 2})
    assert client.update_many(api.ids[JOBS], []) == []  # no request at all
    rec = client.create(api.ids[JOBS], {"id": "after-503"})
    assert rec.data["id"] == "after-503"
    assert api.stats()["api_requests"] == 3


def test_persistent_5xx_ends_unavailable_after_max_attempts(client: TablesClient, api: Api) -> None:
    api.admin("POST", "faults", {"status": 500, "count": 100})
    with pytest.raises(TablesUnavailable) as err:
        client.find_by_field(api.ids[JOBS], "id", "x")
    assert err.value.status == 500 and "injected fault" in err.value.message
    assert api.stats()["api_requests"] == FAST.max_attempts


def test_retry_after_beyond_the_budget_gives_up_at_once(client: TablesClient, api: Api) -> None:
    api.admin("POST", "faults", {"status": 429, "count": 5, "retry_after": 60})
    started = time.monotonic()
    with pytest.raises(TablesUnavailable) as err:
        client.create(api.ids[JOBS], {"id": "never"})
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
                c.get("01HZZZZZZZZZZZZZZZZZZZZZZZ", "01HZZZZZZZZZZZZZZZZZZZZZZZ")
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
                c.list_fields("01HZZZZZZZZZZZZZZZZZZZZZZZ")
            elapsed = time.monotonic() - started
    finally:
        slow.stop()
    assert elapsed <= 1.0 + 0.5  # slack for a loaded machine
    assert "ReadTimeout" in err.value.message
    assert 1 < len(slow.requests) <= FAST.max_attempts  # retried after read timeouts


# --- catch hook writer ------------------------------------------------------------------------------------


def test_catch_hook_writer_posts_fields_and_retries_5xx(receiver: Receiver) -> None:  # noqa: F811
    hooks = {"agent_jobs": receiver.url + "/hooks/catch/123/abc/"}
    writer = CatchHookWriter(hooks, timeout_s=2.0, retry_budget_s=5.0, retry=FAST)
    receiver.statuses.append(503)
    fields = {"id": "job-1", "status": "queued", "parameters": {"metro": "Austin"}, "retry_count": 0}
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


def test_built_from_settings(service: TablesService, api: Api) -> None:  # noqa: F811
    settings = Settings(zapier_base_url=service.url, zapier_token_url=service.url + "/oauth/token/",
                        zapier_client_id=CLIENT_ID, zapier_client_secret=CLIENT_SECRET, http_timeout_s=2,
                        retry_budget_s=3)
    with client_from_settings(settings) as c:
        assert c.timeout_s == 2 and c.retry_budget_s == 3 and c.tokens.refreshable
        assert c.create(api.ids[JOBS], {"id": "from-settings"}).data["id"] == "from-settings"
        assert CLIENT_SECRET not in repr(c)
    with client_from_settings(Settings(zapier_base_url=service.url, tables_token=TOKEN)) as c:
        assert not c.tokens.refreshable and c.find_by_field(api.ids[JOBS], "id", "from-settings")
    with pytest.raises(ValueError, match="ZSYNC_ZAPIER_CLIENT_ID"):
        client_from_settings(Settings(tables_token=None, zapier_client_id=None, zapier_client_secret=None))
    writer = catch_hook_writer_from_settings(Settings(catch_hook_urls={"agent_jobs": "https://hooks.example/1"}))
    assert "hooks.example" not in repr(writer)
    with pytest.raises(ValueError, match="ZSYNC_CATCH_HOOK_URLS"):
        catch_hook_writer_from_settings(Settings(catch_hook_urls={}))
    assert requests.get(service.url + "/_admin/health", timeout=2).ok
