"""``zsync monitor``: the scheduled alert check run by hand, from cron, or by the local stack on a timer.

The evaluation, the alert state and the Slack post are :mod:`shared.services.alerts` (the same code the scheduled
``monitor`` Lambda runs); this module adds the dead-letter depth from SQS and the terminal output.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from shared.platform.settings import Settings
from shared.services.alerts import CheckResult, check_and_notify

# Operator runs log as plain Python logging (stderr, warnings and up by default): stdout stays the
# command's own output (e.g. `zsync monitor --json`). The deployed function logs JSON lines on stdout.
logger = logging.getLogger("zsync_cli.monitor")  # not "zsync.monitor": that is the function's JSON logger


def run_check(database_url: str, settings: Settings, window: timedelta = timedelta(hours=1),
              slack: bool = True) -> CheckResult:
    """One check: DLQ depth (when a queue is configured), thresholds, transitions posted to Slack."""
    from infra.status import dead_letters

    depth, problem = dead_letters(settings)
    if problem and settings.dlq_url:
        logger.warning("dead-letter queue %s", problem)
    url = settings.slack_webhook_url.get_secret_value() if slack and settings.slack_webhook_url else None
    return check_and_notify(database_url, url, dead_letters=depth, window=window, logger=logger)


class MonitorTimer:
    """The local stack's scheduler: :func:`run_check` every ``interval_s`` in a daemon thread."""

    def __init__(self, database_url: str, settings: Settings, interval_s: float = 300.0):
        self.database_url, self.settings, self.interval_s = database_url, settings, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zsync-monitor", daemon=True)
        self.runs = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                run_check(self.database_url, self.settings)
            except Exception as exc:  # keep the timer alive; the next run tries again
                logger.warning("monitor check failed: %s", str(exc)[:200])
            self.runs += 1
