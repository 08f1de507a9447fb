"""The Zapier clients' HTTP layer: urllib3 directly (now) against ``requests.Session`` (before), in one run.

* CPU per Tables API call (``time.thread_time`` of the calling thread, so waiting for the server is not
  counted): ``TablesClient.find_many`` + ``create_many`` of one record each, as every ``*_to_tables``
  delivery makes, against the local Tables service on 127.0.0.1 (keep-alive, rate limit off). The same
  client is measured with its :class:`shared.platform.http_client.Pool` and with a ``requests.Session`` put in its
  place (``trust_env=False``, the urllib3 ``Retry`` mounted: what the client sent through before).
* import: fresh ``python -X importtime`` processes loading ``functions/main.py`` as functions-framework
  does (``create_app``) plus the Zapier clients a ``*_to_tables`` delivery imports; now, and with
  ``requests`` imported too (what the clients imported before); whether ``requests`` got imported.

    python -m bench.http_client [--calls 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from infra.deploy.tables_setup import ensure_tables, table_ids
from infra.local.tables_service import start_tables_service
from shared.adapters.zapier_tables import TablesClient
from shared.core.spec import TABLES
from shared.platform.http_client import Pool

ROOT = Path(__file__).resolve().parents[1]
CLIENT_ID, CLIENT_SECRET = "zsync-bench", "bench-secret"
TABLE = "agent_jobs"


class _Answer:
    """The urllib3 response attributes the clients read, from a ``requests.Response``."""

    def __init__(self, response: requests.Response) -> None:
        self.status = response.status_code
        self.data = response.content
        self.headers = response.headers
        self.reason = response.reason


class RequestsPool:
    """The previous transport: a ``requests.Session`` (environment read once, Retry mounted)."""

    def __init__(self, pool: Pool) -> None:
        self.session = requests.Session()
        self.session.trust_env = False
        adapter = HTTPAdapter(max_retries=pool.retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def request(self, method: str, url: str, *, params: Any = None, json: Any = None, headers: Any = None,
                timeout: float, **_: Any) -> _Answer:
        return _Answer(self.session.request(method, url, params=params, json=json, headers=headers,
                                            timeout=timeout, allow_redirects=False))

    def close(self) -> None:
        self.session.close()


def cpu_per_call(client: TablesClient, table_id: str, calls: int) -> float:
    """Milliseconds of this thread's CPU per API call (find_many + create_many of one record: 2 calls)."""
    run = uuid.uuid4().hex[:8]
    started = time.thread_time()
    for i in range(calls // 2):
        rid = f"bench-http-{run}-{i}"
        client.find_many(table_id, "id", [rid])
        client.create_many(table_id, [{"id": rid, "status": "queued"}])
    return (time.thread_time() - started) * 1000 / (calls // 2 * 2)


IMPORT_PROBE = """
import sys
from functions_framework import create_app
create_app("agent_jobs_to_tables", "functions/main.py")
import shared.adapters.zapier_tables, shared.adapters.trigger_inbox, shared.services.sync
print("requests" in sys.modules)
"""


def _import_run(code: str) -> tuple[float, str]:
    """(sum of the top-level modules' cumulative import ms of a fresh process, its stdout)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    total = 0
    for line in out.stderr.splitlines():
        if line.startswith("import time:") and "cumulative" not in line:
            _, cumulative, name = line.removeprefix("import time:").split("|")
            if not name.startswith("  ") and "." not in name.strip():  # top level: no indent, no dot
                total += int(cumulative)
    return total / 1000, out.stdout.strip()


def import_times(runs: int) -> dict[str, Any]:
    """The function's imports now, and with ``requests`` on top (what its first delivery imported before),
    alternating fresh processes, medians."""
    now, before, loaded = [], [], []
    for _ in range(runs):
        ms, out = _import_run(IMPORT_PROBE)
        now.append(ms)
        loaded.append(out == "True")
        before.append(_import_run("import requests\n" + IMPORT_PROBE)[0])
    return {"now_ms": statistics.median(now), "before_ms": statistics.median(before),
            "requests_loaded": any(loaded)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="API calls per measurement (default 500)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per transport (median)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        service = start_tables_service(Path(tmp) / "tables.db", [], client_id=CLIENT_ID,
                                       client_secret=CLIENT_SECRET, rate_limit=None)
        try:
            client = TablesClient(service.url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                                  token_url=service.url + "/oauth/token/")
            table_id = table_ids(ensure_tables(client, [TABLES[TABLE]]))[TABLE]
            pool = client._session
            old = RequestsPool(pool)
            cpu_per_call(client, table_id, 40)  # warm: token, field map, connections
            client._session = old
            cpu_per_call(client, table_id, 40)
            results: dict[str, list[float]] = {"requests": [], "urllib3": []}
            for _ in range(args.rounds):
                client._session = old
                results["requests"].append(cpu_per_call(client, table_id, args.calls))
                client._session = pool
                results["urllib3"].append(cpu_per_call(client, table_id, args.calls))
            old.close()
            client.close()
        finally:
            service.stop()

    before, after = (statistics.median(results[k]) for k in ("requests", "urllib3"))
    print(f"CPU per Tables API call (find_many + create_many, median of {args.rounds} x {args.calls} calls):")
    print(f"  requests.Session (before): {before:.3f} ms")
    print(f"  urllib3 Pool (now):        {after:.3f} ms   ratio now/before {after / before:.2f}, "
          f"saves {2 * (before - after):.3f} ms per delivery (2 calls)")
    imports = import_times(args.rounds)
    print(f"imports of functions/main.py (create_app) + the Zapier clients, fresh process, -X importtime, "
          f"median of {args.rounds}:")
    print(f"  with requests (before): {imports['before_ms']:.1f} ms")
    print(f"  now:                    {imports['now_ms']:.1f} ms   requests imported: {imports['requests_loaded']}")


if __name__ == "__main__":
    main()
