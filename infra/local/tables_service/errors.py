"""The two ways the Tables stand-in says no: :class:`ApiError` (an HTTP error status with Zapier's error
body) and :class:`RefusedRequest` (a 200 with ``meta.errors`` and nothing changed, as Zapier refuses)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ApiError(Exception):
    """An error answered as ``{"errors": [{"title": message}], "error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class RefusedRequest(Exception):
    """A request Zapier answers 200 with ``meta.errors`` and no change."""

    def __init__(self, title: str, meta: Mapping[str, Any]) -> None:
        super().__init__(title)
        self.error = {"title": title, "human_title": title, "meta": dict(meta)}
