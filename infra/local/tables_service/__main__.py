"""The Tables stand-in's command line: ``python -m infra.local.tables_service --db PATH --config JSON_FILE
--port N`` reads the JSON config (:func:`load_config`), serves until SIGTERM or Ctrl-C, then stops."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from infra.local.tables_service import RATE_LIMIT, RATE_WINDOW_S, TableConfig, start_tables_service

_CONFIG_HELP = """\
config file (JSON):
  {
    "client_id": "zsync-local",
    "client_secret": "<default: $ZSYNC_ZAPIER_CLIENT_SECRET>",
    "token": "<optional static token; default: $ZSYNC_TABLES_TOKEN>",
    "rate_limit": 100, "rate_window_s": 5,
    "secret_header": "X-Zsync-Secret",
    "secret": "<sent with each trigger delivery; default: $ZSYNC_WEBHOOK_SECRET>",
    "autoreplay": [300, 1800, 3600, 10800, 21600],
    "tables": [
      {"name": "agent_jobs",
       "trigger_url": "http://127.0.0.1:9000/agent_jobs_to_supabase"}
    ]
  }
"""


@dataclass(frozen=True)
class CliConfig:
    token: str | None
    client_id: str
    client_secret: str
    rate_limit: int | None
    rate_window_s: float
    secret_header: str
    secret: str | None
    autoreplay: tuple[float, ...]
    tables: tuple[TableConfig, ...]


def load_config(path: Path) -> CliConfig:
    from shared.platform.settings import DEFAULT_SECRET_HEADER

    raw = json.loads(path.read_text())
    if not isinstance(raw, dict) or not isinstance(raw.get("tables"), list):
        raise ValueError('config must be a JSON object with a "tables" list')
    known = {"name", "trigger_url"}
    for n, t in enumerate(raw["tables"]):
        if not isinstance(t, dict) or "name" not in t or set(t) - known:
            extra = sorted(set(t) - known) if isinstance(t, dict) else []
            raise ValueError(f"tables[{n}]: expected {{\"name\", \"trigger_url\"?}}"
                             + (f"; unknown key(s) {extra} (Zapier fills in no field: stamp_updated_at is gone)"
                                if extra else ""))
    tables = tuple(TableConfig(**t) for t in raw["tables"])
    client_secret = raw.get("client_secret") or os.environ.get("ZSYNC_ZAPIER_CLIENT_SECRET")
    if not client_secret:
        raise ValueError('no client secret: set "client_secret" in the config or ZSYNC_ZAPIER_CLIENT_SECRET')
    return CliConfig(
        token=raw.get("token") or os.environ.get("ZSYNC_TABLES_TOKEN"),
        client_id=raw.get("client_id") or "zsync-local",
        client_secret=client_secret,
        rate_limit=raw.get("rate_limit", RATE_LIMIT),
        rate_window_s=float(raw.get("rate_window_s", RATE_WINDOW_S)),
        secret_header=raw.get("secret_header") or DEFAULT_SECRET_HEADER,
        secret=raw.get("secret") or os.environ.get("ZSYNC_WEBHOOK_SECRET"),
        autoreplay=tuple(float(d) for d in raw.get("autoreplay", ())),
        tables=tables,
    )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m infra.local.tables_service",
        description="Local stand-in for the Zapier Tables records API and the Zaps' record triggers.",
        epilog=_CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--db", required=True, type=Path, help="SQLite file holding the records (created if missing)")
    parser.add_argument("--config", required=True, type=Path, help="JSON config file (format below)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: any free port, printed at start)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; admin has no auth)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except (OSError, ValueError, TypeError) as exc:
        print(f"tables_service: bad config {args.config}: {exc}", file=sys.stderr)
        return 2
    service = start_tables_service(
        args.db,
        config.tables,
        config.token,
        config.secret_header,
        config.secret,
        host=args.host,
        port=args.port,
        autoreplay=config.autoreplay,
        client_id=config.client_id,
        client_secret=config.client_secret,
        rate_limit=config.rate_limit,
        rate_window_s=config.rate_window_s,
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print(f"tables service listening on {service.url} (db {args.db})", flush=True)
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
