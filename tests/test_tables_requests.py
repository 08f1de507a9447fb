"""Issue 21 item 3: the Tables requests the sync makes per change, counted in the Tables stand-in's request
log (``bench/tables_requests.py``, the same code as `make bench`'s figure): Tables -> Supabase 0 per change
(the sync applied it; confirming the echo of its own apply is no reason to read Tables), Supabase -> Tables at
most 1 per single change (a PATCH by the Zapier id the sync remembered: blind writes, on by default) and at
most 0.02 per record in a burst. Before the echo-free path: a person's cell
edit cost 2 (a find to confirm the echo, and a write of the new version's updated_at back to Tables), an
agent's single change 2 (find + write)."""

from __future__ import annotations

import pytest

from bench.tables_requests import BLIND_EDITED, FOUND, GOALS, measure, report


@pytest.fixture(scope="module")
def counts(stack):
    return measure(stack, singles=6, burst=100)


@pytest.mark.parametrize("figure", list(GOALS))
def test_tables_requests_per_change_meet_the_goal(counts, figure):
    c = counts[figure]
    report({figure: c})
    assert c.per_change() <= GOALS[figure], (
        f"{figure}: {c.records_api} records-API requests for {c.changes} changes "
        f"({c.per_change():.3f}/change, goal <= {GOALS[figure]:g}): {dict(c.paths or {})}")


def test_the_count_sees_the_sync_and_not_the_people(stack, counts):
    """The count cannot be vacuous: every direction's changes arrived (measure waits for them), the single
    Supabase changes needed at least one write each, and none of the people's marked writes is counted."""
    assert counts["to_tables single"].records_api >= counts["to_tables single"].changes
    assert counts["to_tables burst"].records_api >= 1
    assert all(c.other == 0 for c in counts.values())


def test_a_record_just_edited_in_tables_is_found_before_it_is_written(counts):
    """The other side of the one-request path: a record people edited in Tables less than blind_quiet_s ago is
    found first (a find and a write), so an edit of theirs still on its way is read, not overwritten."""
    c = counts[BLIND_EDITED]
    assert c.records_api == 2 * c.changes, dict(c.paths or {})


def test_with_blind_writes_off_every_single_change_is_found_first(counts):
    """zsync.config blind_writes off (on by default since 20261206200301): a find and a write per change."""
    c = counts[FOUND]
    assert c.records_api == 2 * c.changes, dict(c.paths or {})
