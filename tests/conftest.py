"""Shared fixtures: a real embedded Postgres per pytest worker, a fresh migrated database per test
module. Everything listens on 127.0.0.1 or a unix socket in a temp dir, so xdist workers never collide.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from infra.local.postgres import create_database, prepare_database, start_postgres


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run larger (slow) sizes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="larger size: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def zsync_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., pytest.MonkeyPatch]]:
    """A clean ``ZSYNC_*`` environment for in-process functions and commands: every ``ZSYNC_`` variable
    removed, then ``zsync_env(database_url=..., webhook_secret=...)`` sets settings (names without the prefix,
    or full ``ZSYNC_`` variable names); the cached settings are reset after each call and at the end."""
    from shared.platform.settings import reset_settings

    for key in [k for k in os.environ if k.startswith("ZSYNC_")]:
        monkeypatch.delenv(key)

    def configure(**values: str) -> pytest.MonkeyPatch:
        for key, value in values.items():
            monkeypatch.setenv(key if key.startswith("ZSYNC_") else f"ZSYNC_{key.upper()}", value)
        reset_settings()
        return monkeypatch

    yield configure
    reset_settings()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    # A short path: Postgres' unix socket path must stay under ~100 bytes.
    data_dir = Path(f"/tmp/zsync-pg-{os.getpid()}")
    server = start_postgres(data_dir)
    yield server
    server.cleanup()
    shutil.rmtree(data_dir, ignore_errors=True)  # ~800 MB a session otherwise (pgserver keeps a named directory)


@pytest.fixture(scope="module")
def database_url(pg_server: object) -> str:
    """A fresh database with pg_net stand-in and all migrations applied."""
    url = create_database(pg_server.get_uri())  # type: ignore[attr-defined]
    prepare_database(url)
    return url


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory):
    """The whole local stack (as `make up` runs it) on free ports, one per pytest worker."""
    from infra.local.stack import running_stack

    # The scheduled jobs (outbox sweep, trash check, inbox safety drain) run only when a test calls them:
    # a background run would race the tests that count what they do.
    with running_stack(Path(f"/tmp/zsync-stack-{os.getpid()}"), sweep_interval_s=3600, trash_interval_s=3600,
                       safety_drain_interval_s=3600, pgnet_poll_interval_s=0.05,
                       retry_budget_s=3.0) as local:
        yield local


@pytest.fixture
def tables(stack):
    """The Zapier side of the shared stack, through the Tables API (tests/e2e.py)."""
    from tests.e2e import Tables

    return Tables(stack)


@pytest.fixture
def supabase(stack):
    """The Supabase side of the shared stack, as SQL (tests/e2e.py)."""
    from tests.e2e import Supabase

    return Supabase(stack)
