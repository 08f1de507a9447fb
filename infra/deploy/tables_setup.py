"""``zsync setup zapier``: create the four Zapier tables and their typed fields through the Tables API.

Idempotent: an existing table is found by name, missing fields are added, a field whose type differs
from the spec is reported (never changed: that could lose data). The table ids are written to
``TABLE_IDS_FILE`` (``.zsync/zapier_tables.json``), where ``zsync deploy``/``wire``/``doctor`` read them
when ``ZSYNC_TABLE_IDS`` is not set. Field types come from :data:`shared.core.spec.ZAPIER_FIELD_TYPES`.
``make up`` runs the same code against the local Tables service.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shared.adapters.zapier_errors import TablesError
from shared.adapters.zapier_tables import TablesClient
from shared.core.spec import TABLES, TableSpec

TABLE_IDS_FILE = Path(".zsync") / "zapier_tables.json"


@dataclass
class TableSetup:
    name: str
    table_id: str | None = None
    created: bool = False
    added_fields: list[str] = field(default_factory=list)
    type_mismatches: list[str] = field(default_factory=list)  # "field: is <type>, spec wants <type>"
    missing_fields: list[str] = field(default_factory=list)  # only when checking (doctor), not fixing
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.table_id is not None and not (self.type_mismatches or self.missing_fields or self.error)


def _layout(client: TablesClient, spec: TableSpec, result: TableSetup, *, fix: bool) -> None:
    assert result.table_id is not None
    live = {f.name: f for f in client.list_fields(result.table_id)}
    missing = [f for f in spec.fields if f.name not in live]
    result.type_mismatches = [f"{f.name}: is {live[f.name].type}, spec wants {f.zapier_type}"
                              for f in spec.fields if f.name in live and live[f.name].type != f.zapier_type]
    if missing and fix:
        names = {f.name for f in missing}
        client.create_fields(result.table_id, [d for d in spec.zapier_fields() if d["name"] in names])
        result.added_fields = [f.name for f in missing]
    elif missing:
        result.missing_fields = [f.name for f in missing]


def ensure_tables(client: TablesClient, specs: Iterable[TableSpec] = TABLES.values()) -> list[TableSetup]:
    """Find or create each table by name, then add its missing fields (see the module docstring)."""
    existing: dict[str, str] = {}
    for table in client.list_tables():
        existing.setdefault(table["name"], table["id"])
    results = []
    for spec in specs:
        result = TableSetup(spec.name, existing.get(spec.name))
        if result.table_id is None:
            result.table_id = client.create_table(spec.name, f"zsync: {spec.name} (kept in sync with Supabase)")["id"]
            result.created = True
        _layout(client, spec, result, fix=True)
        results.append(result)
    return results


def check_tables(client: TablesClient, table_ids: Mapping[str, str],
                 specs: Iterable[TableSpec] = TABLES.values()) -> list[TableSetup]:
    """The live field layout of each configured table against the spec (doctor; changes nothing)."""
    results = []
    for spec in specs:
        result = TableSetup(spec.name, table_ids.get(spec.name))
        if result.table_id is None:
            result.error = (f"no table id: add \"{spec.name}\" to ZSYNC_TABLE_IDS "
                            "(`zsync setup zapier` finds or makes the table and writes its id)")
        else:
            try:
                _layout(client, spec, result, fix=False)
            except TablesError as exc:
                result.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        results.append(result)
    return results


def table_ids(results: Iterable[TableSetup]) -> dict[str, str]:
    return {r.name: r.table_id for r in results if r.table_id}


def write_table_ids(ids: Mapping[str, str], path: Path = TABLE_IDS_FILE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(ids), indent=2) + "\n")
    return path


def read_table_ids(path: Path = TABLE_IDS_FILE) -> dict[str, str]:
    return json.loads(path.read_text()) if path.exists() else {}


def report(results: Iterable[TableSetup]) -> list[dict]:
    return [asdict(r) | {"ok": r.ok} for r in results]
