"""Structured logs: one JSON line per event on stdout through google-cloud-logging's
``StructuredLogHandler`` with the function name as a label. Cloud Run/Cloud Functions and CloudWatch
both ingest these lines as structured entries. Each line's ``logging.googleapis.com/sourceLocation``
names the code that called :func:`log_event` (not this module).

``google.cloud.logging.Client`` is deliberately never constructed: off Google Cloud it probes the
metadata server. Secrets never reach a log line: callers log ids, outcomes and problems, and
:func:`log_event` refuses field names that look like secrets.

Cold start: importing google-cloud-logging costs more than anything a delivery does, so it is kept out
of the first response. Importing this module is cheap; the first log line starts importing the library
on a background thread, and lines logged until it is ready are held (in order, with their own time and
caller) and written as soon as it is. :func:`prepare` imports it synchronously instead (the Lambda
adapter calls it during the init phase, which SnapStart snapshots). The library's own switch
``GOOGLE_CLOUD_DISABLE_GRPC`` keeps its generated gRPC API clients out of the import: nothing here sends
logs through the API.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys
import threading
from typing import Any

_SECRET_WORDS = ("secret", "token", "password", "authorization", "database_url", "apikey")

_lock = threading.RLock()
_structured_cls: type[logging.StreamHandler] | None = None  # google-cloud-logging's StructuredLogHandler
_pending: list[tuple[StructuredStdoutHandler, logging.LogRecord]] = []
_loader: threading.Thread | None = None


def _import_structured_log_handler() -> type[logging.StreamHandler]:
    os.environ.setdefault("GOOGLE_CLOUD_DISABLE_GRPC", "true")
    from google.cloud.logging.handlers import StructuredLogHandler

    return StructuredLogHandler


def _set_ready(cls: type[logging.StreamHandler]) -> None:
    """Install the handler class and write the held lines, in order, before any newer one."""
    global _structured_cls
    with _lock:
        if _structured_cls is None:
            _structured_cls = cls
        held = _pending[:]
        _pending.clear()
        for handler, record in held:
            handler.write(record)


def _load_in_background() -> None:
    _set_ready(_import_structured_log_handler())


def prepare() -> None:
    """Import google-cloud-logging now (init phase) and write anything held."""
    _set_ready(_structured_cls or _import_structured_log_handler())


def _after_fork_in_child() -> None:
    """A forked worker (gunicorn) starts its own import if needed; held lines belong to the parent."""
    global _lock, _loader
    _lock = threading.RLock()
    _loader = None
    _pending.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def flush() -> None:
    """Wait for the background import and write held lines (at exit, or before a process is frozen)."""
    loader = _loader
    if loader is not None and loader is not threading.current_thread():
        loader.join(30)
    if _pending:
        prepare()


class StructuredStdoutHandler(logging.Handler):
    """Writes each record to the current ``sys.stdout`` through a ``StructuredLogHandler``."""

    def __init__(self, labels: dict[str, str]) -> None:
        super().__init__()
        self.labels = labels
        self._structured: logging.StreamHandler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        global _loader
        try:
            with _lock:
                if _structured_cls is None and (_loader is None or _loader.is_alive()):
                    _pending.append((self, record))
                    if _loader is None:
                        _loader = threading.Thread(target=_load_in_background, name="zsync-logs-import",
                                                   daemon=True)
                        _loader.start()
                    return
                if _structured_cls is not None:
                    self.write(record)
                    return
            prepare()  # the background import failed: import here, so the failure is reported, not hidden
            self.write(record)
        except Exception:
            self.handleError(record)

    def write(self, record: logging.LogRecord) -> None:
        if self._structured is None:
            assert _structured_cls is not None
            self._structured = _structured_cls(labels=self.labels, stream=sys.stdout)
        self._structured.stream = sys.stdout  # follows redirection (tests, captured output)
        self._structured.handle(record)


def get_logger(function_name: str) -> logging.Logger:
    logger = logging.getLogger(f"zsync.{function_name}")
    if not logger.handlers:
        logger.addHandler(StructuredStdoutHandler(labels={"function": function_name}))
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


@functools.cache
def _loggable(name: str) -> bool:
    """A field name that does not look like a secret's (checked once per name)."""
    return not any(word in name.lower() for word in _SECRET_WORDS)


# the fields StructuredLogHandler writes itself: a field of the same name is overwritten, silently (the inbox's
# message ids were lost so from every ``inbox_message`` line)
_HANDLER_FIELDS = frozenset({"message", "severity", "httpRequest"})


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log ``event`` with ``fields`` as JSON fields of the same line, attributed to the caller."""
    for name in fields:
        if not _loggable(name):
            raise ValueError(f"refusing to log a field named {name!r}")
        if name in _HANDLER_FIELDS or name.startswith("logging.googleapis.com/"):
            raise ValueError(f"{name!r} is a field the log handler writes itself: it would overwrite this one")
    logger.log(level, event, extra={"json_fields": {"event": event, **fields}}, stacklevel=2)


__all__ = ["StructuredStdoutHandler", "flush", "get_logger", "log_event", "prepare"]
