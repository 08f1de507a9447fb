"""What applying a delivery did: the outcome every answer, audit entry and report names, and the outcome of a
version comparison (the rule itself is :mod:`shared.services.conflict` and ``zsync.version_cmp``)."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    APPLIED = "applied"  # the incoming version was newer and is now stored
    UNCHANGED = "unchanged"  # the same version was already stored (echo or redelivery)
    SKIPPED_STALE = "skipped_stale"  # the stored version is newer; nothing written
    MERGED = "merged"  # both sides changed different fields since their base: the merged record is stored
    DELETED = "deleted"  # the record was deleted with a version as new or newer: not re-inserted
    PARKED = "parked"  # cannot be applied without a person (unreadable Tables record): sync_failed written
    IGNORED = "ignored"  # not a change we sync (deletes on a table that ignores them, pings)
    REJECTED = "rejected"  # invalid input; nothing written
    FAILED = "failed"  # could not be applied now (dependency down); dead-lettered for replay
    QUEUED = "queued"  # a woken *_to_tables function: another invocation is delivering this change (batches)


def outcome_of(cmp: int) -> Outcome:
    """Outcome of applying a version that compares ``cmp`` (1 / 0 / -1) to the stored one."""
    if cmp > 0:
        return Outcome.APPLIED
    return Outcome.UNCHANGED if cmp == 0 else Outcome.SKIPPED_STALE
