"""The scheduled alert check (the ``monitor`` Lambda every 5 minutes; ``zsync monitor`` and the local stack
run the same code): evaluate the seed's thresholds and the backlog ones, post to Slack once when an alert
opens and once when it resolves.

Alerts (key: condition):

* ``failure_rate``: sync failures > 5 % of deliveries in the last hour (seed);
* ``avg_lag``: average live delivery lag > 30 s in the last hour (seed; replays/reconciles excluded);
* ``conflicts``: conflict resolutions (stale data skipped) > 10 per hour (seed);
* ``outbox_backlog``: outbox rows unacknowledged for more than 5 minutes;
* ``dead_letters``: any message in the dead-letter queue.

State lives in ``zsync.alert_state``; ``zsync.transition_alerts`` serialises concurrent checks (an advisory
lock held until commit), and only the transitions Slack took are committed (when a post fails, the ones
posted before it are recorded and the rest left for the next check), so an alert is posted exactly once per
opening/resolution even when two checks run at the same time or a post fails.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from shared.platform.logs import get_logger, log_event
from shared.platform.settings import Settings

FAILURE_RATE_MAX = 0.05
AVG_LAG_MAX_S = 30.0
CONFLICTS_PER_HOUR_MAX = 10
OUTBOX_MAX_AGE_S = 300
ALERTS = ("failure_rate", "avg_lag", "conflicts", "outbox_backlog", "dead_letters")
CHANNEL_HINT = "#rise-pipeline"


class SlackError(RuntimeError):
    """Slack did not take the message (the URL is never part of the message)."""


@dataclass
class Health:
    window_s: float = 3600.0
    applied: int = 0
    failed: int = 0
    conflicts: int = 0
    live_lag_avg_s: float | None = None
    live_lag_n: int = 0
    repairs: int = 0
    outbox_pending: int = 0
    outbox_oldest_age_s: float | None = None
    outbox_older_than_5m: int = 0
    dead_letters: int | None = None  # None: no queue configured / not readable
    problems: list[str] = field(default_factory=list)

    @property
    def failure_rate(self) -> float:
        total = self.applied + self.failed
        return self.failed / total if total else 0.0

    @property
    def conflicts_per_hour(self) -> float:
        return self.conflicts / (self.window_s / 3600)

    def firing(self) -> dict[str, str]:
        """``{alert: message}`` for every alert whose threshold is crossed now."""
        out: dict[str, str] = {}
        if self.failure_rate > FAILURE_RATE_MAX:
            out["failure_rate"] = (f"Sync failure rate {self.failure_rate:.1%} > {FAILURE_RATE_MAX:.0%} "
                                   f"({self.failed} failed of {self.applied + self.failed})")
        if self.live_lag_avg_s is not None and self.live_lag_avg_s > AVG_LAG_MAX_S:
            out["avg_lag"] = f"Average sync lag {self.live_lag_avg_s:.1f} s > {AVG_LAG_MAX_S:.0f} s"
        if self.conflicts_per_hour > CONFLICTS_PER_HOUR_MAX:
            out["conflicts"] = (f"{self.conflicts_per_hour:.0f} conflict resolutions per hour > "
                                f"{CONFLICTS_PER_HOUR_MAX}: investigate concurrent writers")
        if self.outbox_older_than_5m > 0:
            out["outbox_backlog"] = (f"{self.outbox_older_than_5m} outbox change(s) unacknowledged for more than "
                                     f"{OUTBOX_MAX_AGE_S // 60} min (oldest {self.outbox_oldest_age_s or 0:.0f} s)")
        if self.dead_letters:
            out["dead_letters"] = f"{self.dead_letters} delivery(ies) in the dead-letter queue: run `zsync replay`"
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"failure_rate": self.failure_rate, "conflicts_per_hour": self.conflicts_per_hour}


def read_health(conn: psycopg.Connection, window: timedelta = timedelta(hours=1)) -> Health:
    row = conn.execute("SELECT * FROM zsync.sync_health(%s)", (window,)).fetchone()
    (applied, failed, conflicts, lag, lag_n, repairs, pending, oldest, old) = row
    return Health(window_s=window.total_seconds(), applied=applied, failed=failed, conflicts=conflicts,
                  live_lag_avg_s=lag, live_lag_n=lag_n, repairs=repairs, outbox_pending=pending or 0,
                  outbox_oldest_age_s=oldest, outbox_older_than_5m=old or 0)


def dead_letter_depth(settings: Settings) -> int | None:
    """Messages in the dead-letter queue (SQS approximate counts), None without a queue."""
    if not settings.dlq_url:
        return None
    from shared.adapters.dead_letter import DeadLetterQueue

    return DeadLetterQueue(settings).approximate_depth()


def post_to_slack(webhook_url: str, text: str, timeout_s: float = 10.0) -> None:
    """POST ``{"text": ...}`` to a Slack incoming webhook, retried on 429/5xx/connection errors.
    Raises :class:`SlackError` without the URL (it is a secret: whoever has it can post)."""
    session = requests.Session()
    retry = Retry(total=4, backoff_factor=0.5, backoff_jitter=0.3, status_forcelist=(429, 500, 502, 503, 504),
                  allowed_methods=None, respect_retry_after_header=True, raise_on_status=False)
    session.mount("https://", HTTPAdapter(max_retries=retry))
    session.mount("http://", HTTPAdapter(max_retries=retry))
    try:
        response = session.post(webhook_url, json={"text": text}, timeout=timeout_s)
    except requests.RequestException as exc:
        raise SlackError(f"Slack unreachable ({type(exc).__name__})") from None
    finally:
        session.close()
    if response.status_code >= 300:
        raise SlackError(f"Slack answered {response.status_code}: {response.text[:200]}")


def message(alert: str, transition: str, detail: str | None) -> str:
    if transition == "opened":
        return f":rotating_light: zsync alert ({CHANNEL_HINT}) {alert}: {detail}"
    return f":white_check_mark: zsync resolved ({CHANNEL_HINT}) {alert}: was {detail}"


@dataclass
class CheckResult:
    health: Health
    firing: dict[str, str]
    posted: list[tuple[str, str]]  # (alert, opened|resolved) sent this run
    skipped: str | None = None  # why nothing was posted although transitions happened


def _transition(conn: psycopg.Connection, firing: dict[str, str]) -> list[tuple[str, str, str | None]]:
    return [tuple(r) for r in conn.execute(  # type: ignore[misc]
        "SELECT alert, transition, detail FROM zsync.transition_alerts(%s::jsonb, %s)",
        (json.dumps(firing), list(ALERTS))).fetchall()]


def _only_posted(firing: dict[str, str], transitions: list[tuple[str, str, str | None]],
                 posted: list[tuple[str, str]]) -> dict[str, str]:
    """The ``firing`` that makes zsync.transition_alerts record only the ``posted`` transitions: an opening that
    was not posted is left closed, a resolution that was not posted is left open (with its detail)."""
    out = dict(firing)
    for alert, transition, detail in transitions:
        if (alert, transition) in posted:
            continue
        if transition == "opened":
            out.pop(alert, None)
        else:
            out[alert] = detail or ""
    return out


def check_and_notify(database_url: str, slack_url: str | None, *, dead_letters: int | None = None,
                     window: timedelta = timedelta(hours=1), post: Callable[[str, str], None] = post_to_slack,
                     logger: logging.Logger | None = None) -> CheckResult:
    """Evaluate, record transitions, post them. Without a Slack URL the state is not changed (so the
    first run that can post still announces what is open)."""
    log = logger or get_logger("monitor")
    with psycopg.connect(database_url, prepare_threshold=None, connect_timeout=10) as conn:
        health = read_health(conn, window)
        health.dead_letters = dead_letters
        firing = health.firing()
        # zsync.transition_alerts' own lock, taken before the savepoint so that it is held until commit even
        # when the transitions are rolled back to it (a concurrent check waits and then sees what was posted).
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('zsync.transition_alerts'))")
        conn.execute("SAVEPOINT zsync_alerts")
        transitions = _transition(conn, firing)
        if transitions and not slack_url:
            conn.rollback()
            log_event(log, logging.WARNING, "alerts_not_posted", reason="ZSYNC_SLACK_WEBHOOK_URL is not set",
                      firing=sorted(firing))
            return CheckResult(health, firing, [], skipped="no Slack webhook URL")
        posted: list[tuple[str, str]] = []
        try:
            for alert, transition, detail in transitions:
                post(slack_url or "", message(alert, transition, detail))
                posted.append((alert, transition))
        except SlackError as exc:
            # Record exactly what Slack took: the transitions posted before the failure are committed (never
            # posted again), the others stay as they were, so the next check posts them.
            conn.execute("ROLLBACK TO SAVEPOINT zsync_alerts")
            recorded = _transition(conn, _only_posted(firing, transitions, posted))
            conn.commit()
            log_event(log, logging.ERROR, "alert_post_failed", problem=str(exc),
                      posted=[f"{a}:{t}" for a, t in posted], recorded=len(recorded),
                      pending=[t[0] for t in transitions if (t[0], t[1]) not in posted])
            raise
        conn.commit()
    for alert, transition in posted:
        log_event(log, logging.WARNING if transition == "opened" else logging.INFO, f"alert_{transition}", alert=alert)
    log_event(log, logging.INFO, "health_checked", firing=sorted(firing), **{
        k: v for k, v in health.as_dict().items() if k != "problems"})
    return CheckResult(health, firing, posted)


def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The scheduled ``monitor`` function (EventBridge, every 5 minutes)."""
    from shared.platform.aws_secrets import load_into_environment
    from shared.platform.settings import get_settings

    load_into_environment()
    settings = get_settings()
    if settings.database_url is None:
        raise RuntimeError("ZSYNC_DATABASE_URL is not set")
    log = get_logger("monitor")
    try:
        depth = dead_letter_depth(settings)
    except Exception as exc:  # the DLQ unreadable must not stop the database alerts
        log_event(log, logging.ERROR, "dead_letter_depth_failed", problem=f"{type(exc).__name__}")
        depth = None
    slack = settings.slack_webhook_url.get_secret_value() if settings.slack_webhook_url else None
    result = check_and_notify(settings.database_url.get_secret_value(), slack, dead_letters=depth, logger=log)
    return {"firing": sorted(result.firing), "posted": result.posted, "skipped": result.skipped}
