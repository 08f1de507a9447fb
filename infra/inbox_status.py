"""The inbox path's backlog: per ``*_to_supabase`` function, its trigger inbox's state, how many messages
wait in it and how old the oldest is (``zsync status``, ``zsync doctor``).

A message older than :data:`shared.services.alerts.OUTBOX_MAX_AGE_S` means the function is not draining its inbox
(notifications lost and the scheduled drain not running, or every drain failing): the same threshold as
the Supabase outbox's backlog alert.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from shared.core.spec import TABLES, Direction
from shared.platform.settings import Settings
from shared.services.alerts import OUTBOX_MAX_AGE_S


def zapier_configured(settings: Settings) -> bool:
    return bool(settings.tables_token or (settings.zapier_client_id and settings.zapier_client_secret))


def _age_s(created_at: str | None, now: datetime) -> float | None:
    if not created_at:
        return None
    try:
        created = datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    except ValueError:
        return None
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return max((now - created).total_seconds(), 0.0)


def backlog(settings: Settings, stage: str) -> list[dict[str, Any]]:
    """One row per ``*_to_supabase`` function: ``{function, key, inbox_id, status, paused_reason,
    notification_url, pending,
    more, oldest_created_at, oldest_age_s, alert, error}``. ``alert``: missing, not active, unreadable, or
    a message waiting longer than :data:`OUTBOX_MAX_AGE_S`."""
    from shared.services.inbox_consumer import client_from_settings, inbox_key

    client = client_from_settings(settings)
    now = datetime.now(UTC)
    rows = []
    try:
        for table in TABLES.values():
            fn = table.function_name(Direction.TO_SUPABASE)
            row: dict[str, Any] = {"function": fn, "key": inbox_key(stage, fn), "inbox_id": None, "status": None,
                                   "notification_url": None,
                                   "paused_reason": None, "pending": None, "more": False, "oldest_created_at": None,
                                   "oldest_age_s": None, "alert": True, "error": None}
            try:
                inbox = client.find(row["key"])
                if inbox is None:
                    row["error"] = "missing: run `zsync wire zapier`"
                else:
                    found = client.backlog(inbox.id)
                    age = _age_s(found.oldest_created_at, now)
                    row |= {"inbox_id": inbox.id, "status": inbox.status, "paused_reason": inbox.paused_reason,
                            "notification_url": inbox.notification_url,
                            "pending": found.pending, "more": found.more, "oldest_created_at": found.oldest_created_at,
                            "oldest_age_s": age,
                            "alert": inbox.status != "active" or (age is not None and age > OUTBOX_MAX_AGE_S)}
            except Exception as exc:  # InboxError, token errors: say which and go on
                row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            rows.append(row)
    finally:
        client.close()
    return rows


def describe(row: dict[str, Any]) -> str:
    """``3 pending, oldest 12.0 s`` / ``paused (authentication); 3 pending`` / the error."""
    if row["error"]:
        return row["error"]
    pending = f"{row['pending']}{'+' if row['more'] else ''} pending"
    if row["oldest_age_s"] is not None:
        age = row["oldest_age_s"]
        pending += f", oldest {age * 1000:.0f} ms" if age < 1 else f", oldest {age:.1f} s"
    if row["status"] != "active":
        return f"{row['status']} (paused_reason: {row['paused_reason']}); {pending}"
    return pending
