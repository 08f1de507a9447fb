"""What ``zsync reconcile`` reports: per table the counts of what it found and did, with each phase's wall
time (:class:`TableReport`), the whole run's result (:class:`ReconcileResult`: in sync or not), and the
lines it keeps on the CLI's progress display while it works (:class:`ProgressTasks`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rich.progress import Progress, TaskID


@dataclass
class TableReport:
    """What reconcile found and did for one table."""

    table: str
    compared: int = 0
    in_sync: int = 0
    missing_in_supabase: int = 0
    missing_in_tables: int = 0
    stale_in_supabase: int = 0
    stale_in_tables: int = 0
    repaired: int = 0
    unresolved: int = 0  # drift left (a batch failed, or a newer write raced the repair: the sync has it)
    invalid_in_tables: int = 0  # Tables records that cannot be parsed (and have no Supabase row to restore)
    duplicates_in_tables: int = 0  # extra Tables records sharing an id (older ones; removed unless dry run)
    invalid_in_supabase: int = 0  # Supabase rows the sync cannot deliver (parked; left alone)
    deleted_in_tables: int = 0  # Tables copies of records deleted in Supabase (tombstoned): deleted, not re-inserted
    trashed_in_tables: int = 0  # Supabase rows whose Tables copy is only in the Tables trash: deleted in Tables
    deleted_in_supabase: int = 0  # of those, deleted in Supabase (the others were newer there: re-created)
    errors: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per phase (see infra.reconcile)

    @property
    def drift(self) -> int:
        return self.missing_in_supabase + self.missing_in_tables + self.stale_in_supabase + self.stale_in_tables \
            + self.trashed_in_tables


@dataclass
class ReconcileResult:
    dry_run: bool
    since: datetime | None
    tables: dict[str, TableReport] = field(default_factory=dict)

    def total(self, name: str) -> int:
        return sum(getattr(t, name) for t in self.tables.values())

    @property
    def in_sync(self) -> bool:
        """After a repair run: nothing left unrepaired. After a dry run: nothing to repair."""
        if self.dry_run:
            return self.total("drift") == 0 and self.total("duplicates_in_tables") == 0
        return self.total("unresolved") == 0 and not any(t.errors for t in self.tables.values())


class ProgressTasks:
    """Reconcile's lines on a rich progress display; nothing happens without one."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress

    def add(self, description: str, total: float | None = None) -> TaskID | None:
        return self.progress.add_task(description, total=total) if self.progress else None

    def advance(self, task: TaskID | None, n: float = 1, **kw: Any) -> None:
        if self.progress is not None and task is not None:
            self.progress.update(task, advance=n, **kw)
