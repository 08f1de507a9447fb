"""Structured logs: one JSON line per event on stdout through google-cloud-logging's
``StructuredLogHandler`` with the function name as a label. Cloud Run/Cloud Functions and CloudWatch
both ingest these lines as structured entries.

``google.cloud.logging.Client`` is deliberately never constructed: off Google Cloud it probes the
metadata server. Secrets never reach a log line: callers log ids, outcomes and problems, and
:func:`log_event` refuses field names that look like secrets.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from google.cloud.logging.handlers import StructuredLogHandler

_SECRET_WORDS = ("secret", "token", "password", "authorization", "database_url", "apikey")


def get_logger(function_name: str) -> logging.Logger:
    logger = logging.getLogger(f"zsync.{function_name}")
    if not logger.handlers:
        handler = StructuredLogHandler(labels={"function": function_name}, stream=sys.stdout)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log ``event`` with ``fields`` as JSON fields of the same line."""
    for name in fields:
        if any(word in name.lower() for word in _SECRET_WORDS):
            raise ValueError(f"refusing to log a field named {name!r}")
    logger.log(level, event, extra={"json_fields": {"event": event, **fields}})
