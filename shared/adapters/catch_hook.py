"""The catch-hook writer: the seed's Zap 3B path (``ZSYNC_TABLES_WRITER=catch_hook``), which writes a record
by POSTing its flat, formatted fields to the table's Zapier catch hook instead of calling the Tables API.

Retries and the time budget are those of :mod:`shared.adapters.zapier_retry`, errors those of
:mod:`shared.adapters.zapier_errors`. Hook URLs are credentials: they are never put in messages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from shared.adapters.zapier_errors import TablesUnavailable, raise_for_status
from shared.adapters.zapier_retry import CallBudget, RetryPolicy
from shared.platform.http_client import Pool, TransportError

if TYPE_CHECKING:
    from shared.adapters.zapier_tables import Scalar
    from shared.platform.settings import Settings


def _check_json(fields: Mapping[str, Any]) -> None:
    for name in fields:
        if not isinstance(name, str) or not name:
            raise ValueError(f"field names must be non-empty strings, got {name!r}")
    json.dumps(dict(fields), allow_nan=False)  # raises ValueError/TypeError for what JSON cannot carry


class CatchHookWriter:
    """Writes a record by POSTing its flat, formatted fields to the table's Zapier catch hook.

    This is the seed's Zap 3B path (chosen with ``ZSYNC_TABLES_WRITER=catch_hook``): the Zap behind each
    hook runs "Find or Create Record" with ``id`` as the search field. Its limits, compared with the
    records API (:class:`shared.adapters.zapier_tables.TablesClient`):

    * Zapier answers 200 as soon as the hook *received* the request, before the Zap runs, so a
      successful :meth:`send` means "accepted", never "applied"; a Zap step that fails later is only
      visible in Zap history.
    * No version comparison happens on the Tables side: the last delivery wins, so deliveries that
      arrive out of order can regress a record to an older state.
    * No read access: nothing here can check what Tables holds, so reconcile needs the records API.
    * Under load catch hooks may process a request minutes after answering 200.

    Retries follow the same policy and time budget as the records API. Hook URLs are credentials:
    they never appear in exception messages (the table name does).
    """

    def __init__(
        self,
        hook_urls: Mapping[str, str],
        timeout_s: float = 10.0,
        retry_budget_s: float = 20.0,
        *,
        retry: RetryPolicy | None = None,
    ) -> None:
        for table, url in hook_urls.items():
            if not url.startswith(("https://", "http://")):
                raise ValueError(f"catch hook URL for {table!r} must be an http(s) URL")
        self._hook_urls = dict(hook_urls)
        self.timeout_s = timeout_s
        self.retry_budget_s = retry_budget_s
        self._session = Pool((retry or RetryPolicy()).build(), self._hook_urls.values())

    def __repr__(self) -> str:
        return f"CatchHookWriter(tables={sorted(self._hook_urls)!r})"

    def close(self) -> None:
        self._session.close()

    def send(self, table_name: str, fields: Mapping[str, Scalar]) -> None:
        """POST ``fields`` (formatted for Tables by :func:`shared.core.mapping.to_tables_fields`) to the
        table's hook."""
        url = self._hook_urls.get(table_name)
        if url is None:
            raise ValueError(f"no catch hook URL configured for table {table_name!r}")
        _check_json(fields)
        what = f"catch hook for {table_name}"
        with CallBudget(self.retry_budget_s, self.timeout_s) as budget:
            try:
                response = self._session.request("POST", url, json=dict(fields), timeout=self.timeout_s)
            except TransportError as exc:
                raise TablesUnavailable(
                    None, f"{what}: {exc.cause} (gave up after {budget.elapsed():.1f}s)"
                ) from None
            raise_for_status(response, what, budget.elapsed())


def catch_hook_writer_from_settings(settings: Settings) -> CatchHookWriter:
    """A :class:`CatchHookWriter` for ``ZSYNC_CATCH_HOOK_URLS`` (used when ``tables_writer=catch_hook``)."""
    if not settings.catch_hook_urls:
        raise ValueError("ZSYNC_CATCH_HOOK_URLS is not set")
    return CatchHookWriter(settings.catch_hook_urls, settings.http_timeout_s, settings.retry_budget_s)
