"""What keeping a record's Tables edits in order across inbox drains costs (the lease ledger,
:mod:`shared.adapters.lease_ledger`), measured with and without it in one run on embedded Postgres.

The same inbox consumer applies the same kind of lease - ``--size`` agent_jobs deliveries, each a newer version of
its record - once as a drain does now (the lease recorded on a connection of its own before anything is applied,
then the ledger checked and the entries taken in the apply's transaction) and once without a lease id (the
ledger skipped: the path before), alternately, ``--rounds`` times each; the figures are the ratio of the medians
and the time added per delivery. Budget: at most 0.05 ms added per delivery in a lease of 100 (the ledger's own
rows: one insert committed apart, one check and delete in the apply's transaction); the ratio is shown with it
(1.13-1.17x on the 2-core machine: the price of the guard, see docs/benchmarks.md).

    python -m bench.lease_ledger_cost [--rounds 60] [--size 100]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.databases import migrated_database
from infra.local.postgres import start_postgres
from shared.adapters.trigger_inbox import Message
from shared.core.spec import FUNCTIONS
from shared.platform.settings import Settings
from shared.services.inbox_consumer import DrainReport, InboxConsumer
from shared.services.sync import SyncContext

BUDGET_MS = 0.05  # added per delivery, in a lease of --size


def _lease(n: int, prefix: str, version: datetime) -> list[tuple[Message, dict, datetime]]:
    at = version.isoformat()
    return [(Message(str(uuid.uuid4()), at, 1, False, None, {}),
             {"id": f"{prefix}-{i:04d}", "status": "running", "retry_count": i, "updated_at": at, "edited_at": at},
             version) for i in range(n)]


def measure(url: str, size: int, rounds: int) -> tuple[float, float]:
    """Median seconds per lease of ``size`` deliveries: (with the ledger, without)."""
    ctx = SyncContext(settings=Settings(database_url=url, retry_budget_s=5))
    consumer = InboxConsumer(FUNCTIONS["agent_jobs_to_supabase"], ctx, None, "bench-inbox")  # type: ignore[arg-type]
    base = datetime.now(UTC) - timedelta(hours=1)
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for ledger in (r % 2 == 0, r % 2 == 1):  # alternate which goes first
            batch = _lease(size, f"lc-{size}-{int(ledger)}", base + timedelta(milliseconds=r + 1))
            lease_id = str(uuid.uuid4()) if ledger else ""
            report = DrainReport("bench-inbox")
            start = time.perf_counter()
            if ledger:
                consumer._hold(lease_id, batch)
            ack, release = consumer._apply_batch(batch, report, lease_id)
            times[ledger].append(time.perf_counter() - start)
            assert len(ack) == size and not release, (report.counts, release)
    return statistics.median(times[True]), statistics.median(times[False])


def run(rounds: int = 60, size: int = 100) -> list[tuple[str, str, str]]:
    """Rows for `make bench`'s SUMMARY: (figure, measured, goal), each also printed."""
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="zsync-leasecost-"))
    server = start_postgres(tmp / "pg")
    try:
        url = migrated_database(server.get_uri(), tmp)
        measure(url, 5, 5)  # warm the pools and plans
        for n in (1, size):
            on, off = measure(url, n, rounds)
            added = (on - off) * 1000 / n
            verdict = ("ok" if added <= BUDGET_MS else "OVER") if n == size else "(info)"
            print(f"lease ledger, leases of {n:<4} {on * 1000:8.2f} ms vs {off * 1000:8.2f} ms without: "
                  f"{on / off:.3f}x, {added:.3f} ms added per delivery {verdict}")
            rows.append((f"lease ledger cost, leases of {n}", f"{on / off:.3f}x, +{added:.3f} ms/delivery {verdict}",
                         f"<= {BUDGET_MS:g} ms added per delivery (lease of {size})" if n == size else "(info)"))
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60, help="leases applied each way per size")
    parser.add_argument("--size", type=int, default=100, help="deliveries in the large lease")
    args = parser.parse_args(argv)
    run(args.rounds, args.size)


if __name__ == "__main__":
    main()
