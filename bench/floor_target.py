"""The floor a delivery is compared with (``bench/lag.py``): functions-framework targets with no sync logic,
served exactly like the functions (``python -m functions_framework --source bench/floor_target.py``).

* ``floor_to_supabase``: one INSERT and COMMIT of the body, the least a Tables -> Supabase delivery does.
* ``floor_to_tables``: one record created through the Zapier Tables client's public ``create`` plus one
  INSERT and COMMIT (the outbox acknowledgement), the least a Supabase -> Tables delivery does.

Settings: ZSYNC_* as for the functions, plus ZSYNC_BENCH_DATABASE_URL (a role that may write bench_floor).
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from typing import Any

import flask
import psycopg

_local = threading.local()
TABLE_SQL = "CREATE TABLE IF NOT EXISTS public.bench_floor (id text PRIMARY KEY, body jsonb NOT NULL)"


def _conn() -> psycopg.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = _local.conn = psycopg.connect(os.environ["ZSYNC_BENCH_DATABASE_URL"])
    return conn


def _insert(body: bytes) -> None:
    conn = _conn()
    conn.execute("INSERT INTO public.bench_floor (id, body) VALUES (%s, %s)", (uuid.uuid4().hex, body.decode()))
    conn.commit()


def floor_to_supabase(request: flask.Request) -> tuple[dict[str, Any], int]:
    _insert(request.get_data())
    return {"outcome": "applied"}, 200


def _tables() -> Any:
    client = getattr(_local, "tables", None)
    if client is None:
        from shared.adapters.zapier_tables import client_from_settings
        from shared.platform.settings import get_settings

        client = _local.tables = client_from_settings(get_settings())
    return client


def floor_to_tables(request: flask.Request) -> tuple[dict[str, Any], int]:
    body = request.get_data()
    record = json.loads(body)["record"]
    table_id = json.loads(os.environ["ZSYNC_TABLE_IDS"])[os.environ["ZSYNC_BENCH_TABLE"]]
    _tables().create(table_id, {k: v for k, v in record.items() if k in ("id", "decision", "confidence")})
    _insert(body)
    return {"outcome": "applied"}, 200
