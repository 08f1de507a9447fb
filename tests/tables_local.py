"""Test helpers: the local Tables service with the four spec tables made through the API (as
``zsync setup zapier`` makes them), and clients for it. Used by the tests that need Zapier Tables
without the whole stack."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.deploy.tables_setup import ensure_tables, table_ids
from infra.local.tables_service import TableConfig, TablesService, start_tables_service
from shared.adapters.zapier_retry import RetryPolicy
from shared.adapters.zapier_tables import TablesClient
from shared.core.spec import TABLES
from shared.platform.settings import Settings

CLIENT_ID = "zsync-test"
CLIENT_SECRET = "cs-" + os.urandom(8).hex()
FAST = RetryPolicy(max_attempts=4, backoff_factor=0.05, backoff_max=0.2, backoff_jitter=0.05)


@dataclass
class LocalTables:
    service: TablesService
    ids: dict[str, str]  # table name -> ULID

    @property
    def url(self) -> str:
        return self.service.url

    def client(self, **kwargs: Any) -> TablesClient:
        kwargs.setdefault("timeout_s", 5.0)
        kwargs.setdefault("retry_budget_s", 5.0)
        return TablesClient(self.url, None, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                            token_url=self.url + "/oauth/token/", **kwargs)

    def settings(self, **kwargs: Any) -> Settings:
        """Settings pointing the sync at this service (OAuth client credentials, table ids)."""
        return Settings(zapier_base_url=self.url, zapier_token_url=self.url + "/oauth/token/",
                        zapier_client_id=CLIENT_ID, zapier_client_secret=CLIENT_SECRET, table_ids=self.ids,
                        **kwargs)

    def env(self) -> dict[str, str]:
        import json
        return {"ZSYNC_ZAPIER_BASE_URL": self.url, "ZSYNC_ZAPIER_TOKEN_URL": self.url + "/oauth/token/",
                "ZSYNC_ZAPIER_CLIENT_ID": CLIENT_ID, "ZSYNC_ZAPIER_CLIENT_SECRET": CLIENT_SECRET,
                "ZSYNC_TABLE_IDS": json.dumps(self.ids)}

    def stop(self) -> None:
        self.service.stop()

    def __enter__(self) -> LocalTables:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_local_tables(
    db: Path,
    trigger_urls: Mapping[str, str | None] | None = None,
    names: Sequence[str] | None = None,
    **kwargs: Any,
) -> LocalTables:
    """Start the service and make the spec tables ``names`` (default: all four) with their typed fields.

    ``trigger_urls`` by table name."""
    names = list(names or TABLES)
    configs = [TableConfig(n, (trigger_urls or {}).get(n)) for n in names]
    kwargs.setdefault("client_id", CLIENT_ID)
    kwargs.setdefault("client_secret", CLIENT_SECRET)
    service = start_tables_service(db, configs, **kwargs)
    local = LocalTables(service, {})
    try:
        with local.client() as client:
            local.ids = table_ids(ensure_tables(client, [TABLES[n] for n in names]))
    except BaseException:
        service.stop()
        raise
    return local
