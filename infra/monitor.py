"""The seed's monitoring: sync lag, failure rate and conflict frequency from ``audit_log``, with its
alert thresholds, posted to Slack.

* Alert 1: sync failure rate > 5% over the window;
* Alert 2: average sync lag > 30 s (the seed expects < 5 s);
* Alert 3: conflict resolutions (stale data skipped) > 10 per hour: investigate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import psycopg
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from shared.audit import FAILED_ACTION, SKIPPED_ACTION

FAILURE_RATE_MAX = 0.05
AVG_LAG_MAX_S = 30.0
CONFLICTS_PER_HOUR_MAX = 10
EXPECTED_AVG_LAG_S = 5.0

_LAG_SQL = """
SELECT action, avg((metadata->>'lag_seconds')::double precision), count(*)
FROM audit_log
WHERE action LIKE '%%\\_synced' AND "timestamp" > now() - %(window)s AND metadata ? 'lag_seconds'
GROUP BY action ORDER BY action
"""
_COUNTS_SQL = """
SELECT count(*) FILTER (WHERE action LIKE '%%\\_synced'),
       count(*) FILTER (WHERE action = %(failed)s),
       count(*) FILTER (WHERE action = %(skipped)s)
FROM audit_log
WHERE actor_type = 'zapier_sync' AND "timestamp" > now() - %(window)s
"""


@dataclass
class Health:
    window: timedelta
    lag_by_action: dict[str, tuple[float, int]] = field(default_factory=dict)  # action -> (avg s, count)
    synced: int = 0
    failed: int = 0
    conflicts: int = 0

    @property
    def failure_rate(self) -> float:
        total = self.synced + self.failed
        return self.failed / total if total else 0.0

    @property
    def avg_lag_s(self) -> float | None:
        n = sum(c for _, c in self.lag_by_action.values())
        return sum(a * c for a, c in self.lag_by_action.values()) / n if n else None

    @property
    def conflicts_per_hour(self) -> float:
        return self.conflicts / (self.window.total_seconds() / 3600)

    def alerts(self) -> list[str]:
        out = []
        if self.failure_rate > FAILURE_RATE_MAX:
            out.append(f"Sync failure rate {self.failure_rate:.1%} > {FAILURE_RATE_MAX:.0%} "
                       f"({self.failed} failed of {self.synced + self.failed})")
        lag = self.avg_lag_s
        if lag is not None and lag > AVG_LAG_MAX_S:
            out.append(f"Average sync lag {lag:.1f} s > {AVG_LAG_MAX_S:.0f} s")
        if self.conflicts_per_hour > CONFLICTS_PER_HOUR_MAX:
            out.append(f"{self.conflicts_per_hour:.0f} conflict resolutions per hour > {CONFLICTS_PER_HOUR_MAX}: "
                       "investigate concurrent writers")
        return out


def check(database_url: str, window: timedelta = timedelta(hours=1)) -> Health:
    health = Health(window=window)
    with psycopg.connect(database_url, autocommit=True, prepare_threshold=None) as conn:
        for action, avg, count in conn.execute(_LAG_SQL, {"window": window}):
            health.lag_by_action[action] = (float(avg), int(count))
        synced, failed, skipped = conn.execute(
            _COUNTS_SQL, {"window": window, "failed": FAILED_ACTION, "skipped": SKIPPED_ACTION}
        ).fetchone()
    health.synced, health.failed, health.conflicts = synced, failed, skipped
    return health


def post_to_slack(webhook_url: str, alerts: list[str], channel_hint: str = "#rise-pipeline",
                  timeout_s: float = 10.0) -> None:
    """Post the alerts to a Slack incoming webhook (retried on 429/5xx/connection errors)."""
    session = requests.Session()
    retry = Retry(total=4, backoff_factor=0.5, backoff_jitter=0.3, status_forcelist=(429, 500, 502, 503, 504),
                  allowed_methods=None, respect_retry_after_header=True)
    session.mount("https://", HTTPAdapter(max_retries=retry))
    session.mount("http://", HTTPAdapter(max_retries=retry))
    text = f"zsync alerts ({channel_hint}):\n" + "\n".join(f"• {a}" for a in alerts)
    response = session.post(webhook_url, json={"text": text}, timeout=timeout_s)
    response.raise_for_status()
