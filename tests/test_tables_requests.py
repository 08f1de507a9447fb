"""Issue 21 item 3: the Tables requests the sync makes per change, counted in the Tables stand-in's request
log (``bench/tables_requests.py``, the same code as `make bench`'s figure): Tables -> Supabase 0 per change
(the sync applied it; confirming the echo of its own apply is no reason to read Tables), Supabase -> Tables at
most 1 per single change and at most 0.02 per record in a burst. Before the echo-free path: a person's cell
edit cost 2 (a find to confirm the echo, and a write of the new version's updated_at back to Tables), an
agent's single change 2 (find + write)."""

from __future__ import annotations

import pytest

from bench.tables_requests import BLIND_EDITED, GOALS, measure, report


@pytest.fixture(scope="module")
def counts(stack):
    return measure(stack, singles=6, burst=100)


NOT_MET = pytest.mark.xfail(strict=True, reason=(
    "issue 21 item 3, open by default: with zsync.config blind_writes off (the default) a single Supabase change "
    "costs a find and a write (2). With it on, 1 (the next figure), but the suite's soak with it on by default still "
    "lost fields on a hot record (14 writes in 14 s): a Tables edit's delivery applied whole over a later Supabase "
    "change that had not reached Tables yet (see docs/design-decisions.md, 'The switch')."))


@pytest.mark.parametrize("figure", [pytest.param(f, marks=NOT_MET) if f == "to_tables single" else f for f in GOALS])
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
