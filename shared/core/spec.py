"""The one declarative description of what zsync keeps in sync.

Everything else (pydantic models, mapping, the seven function targets, webhook trigger SQL, the
Zapier setup checklist, serverless.yml checks, reconcile) is derived from ``TABLES``. Adding a fifth
table is a ``TableSpec`` here plus a migration that creates the Postgres table.

Field kinds and how each side stores them:

========== ============================== =====================================
kind       Supabase (Postgres)            Zapier Tables
========== ============================== =====================================
text       text                           ``text`` field (a string)
int        integer                        ``number`` field
float      double precision               ``decimal`` field
json       jsonb (nested JSON)            ``json`` field (a JSON value; JSON text accepted)
timestamp  timestamptz                    ``datetime`` field (ISO-8601 string, UTC "Z")
text_array text[]                         ``multiple_string`` field (an array; comma text accepted)
========== ============================== =====================================

``ZAPIER_FIELD_TYPES`` is the one place that decides the Zapier Tables field type of each kind: setup,
doctor, the local Tables service and value formatting (:mod:`shared.core.mapping`) all derive from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Kind(StrEnum):
    TEXT = "text"
    INT = "int"
    FLOAT = "float"
    JSON = "json"
    TIMESTAMP = "timestamp"
    TEXT_ARRAY = "text_array"


class Direction(StrEnum):
    TO_SUPABASE = "to_supabase"  # Zapier Tables -> Supabase (Zaps 3A, 3C, 3E, 3F)
    TO_TABLES = "to_tables"  # Supabase -> Zapier Tables (Zaps 3B, 3D, 3G)


# Zapier Tables field type of each kind (see the table above).
ZAPIER_FIELD_TYPES: dict[Kind, str] = {
    Kind.TEXT: "text",
    Kind.INT: "number",
    Kind.FLOAT: "decimal",
    Kind.JSON: "json",
    Kind.TIMESTAMP: "datetime",
    Kind.TEXT_ARRAY: "multiple_string",
}


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind = Kind.TEXT
    default: Any = None
    required: bool = False
    max_length: int | None = None

    @property
    def zapier_type(self) -> str:
        """The Zapier Tables field type this field is created with."""
        return ZAPIER_FIELD_TYPES[self.kind]


ID_MAX_LENGTH = 128
TEXT_MAX_LENGTH = 100_000


@dataclass(frozen=True, eq=False)  # identity equality: specs are singletons, usable as cache keys
class TableSpec:
    name: str
    fields: tuple[Field, ...]
    resource_type: str  # audit_log.resource_type for entries about this table
    seed_zaps: dict[Direction, str] = field(default_factory=dict)  # which seed Zap each direction replaces
    append_only: bool = False  # audit_log: insert once per source record, never update
    key: str = "id"
    version: str | None = "updated_at"  # None: no last-writer-wins (append-only tables)
    sync_deletes: bool = True  # a delete on one side deletes the other copy (tombstones); False: ignored

    @property
    def directions(self) -> tuple[Direction, ...]:
        return tuple(self.seed_zaps)

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def zapier_fields(self) -> list[dict[str, Any]]:
        """The ``new_fields`` body that creates this table's fields in Zapier Tables."""
        return [{"type": f.zapier_type, "name": f.name, "options": {}, "config": {}} for f in self.fields]

    def fields_of(self, kind: Kind) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.kind is kind)

    @property
    def synced_action(self) -> str:
        """audit_log.action written when a change to this table is applied ("agent_jobs_synced")."""
        return f"{self.name}_synced"

    def function_name(self, direction: Direction) -> str:
        return f"{self.name}_{direction.value}"


def _id() -> Field:
    return Field("id", Kind.TEXT, required=True, max_length=ID_MAX_LENGTH)


def _ts(name: str) -> Field:
    return Field(name, Kind.TIMESTAMP)


AGENT_JOBS = TableSpec(
    name="agent_jobs",
    resource_type="job",
    seed_zaps={Direction.TO_SUPABASE: "3A", Direction.TO_TABLES: "3B"},
    fields=(
        _id(),
        Field("job_type"),
        Field("status"),
        Field("initiated_by"),
        Field("initiated_by_type"),
        Field("parameters", Kind.JSON),
        Field("results", Kind.JSON),
        Field("error_message"),
        Field("retry_count", Kind.INT, default=0),
        _ts("created_at"),
        _ts("started_at"),
        _ts("completed_at"),
        _ts("updated_at"),
    ),
)

AGENT_DECISIONS = TableSpec(
    name="agent_decisions",
    resource_type="decision",
    seed_zaps={Direction.TO_SUPABASE: "3C", Direction.TO_TABLES: "3D"},
    fields=(
        _id(),
        Field("lead_id"),
        Field("decision_type"),
        Field("agent_name"),
        Field("agent_type"),
        Field("decision"),
        Field("confidence", Kind.FLOAT),
        Field("reasoning"),
        Field("metadata", Kind.JSON),
        Field("overridden_by"),
        Field("override_reason"),
        _ts("overridden_at"),
        _ts("created_at"),
        _ts("updated_at"),  # not in the seed; added so both directions can compare versions
    ),
)

AUDIT_LOG = TableSpec(
    name="audit_log",
    resource_type="audit_entry",
    seed_zaps={Direction.TO_SUPABASE: "3E"},
    append_only=True,
    version=None,
    fields=(
        _id(),  # the Zapier Tables record id: one Supabase row per source record
        _ts("timestamp"),
        Field("actor"),
        Field("actor_type"),
        Field("action"),
        Field("resource_type"),
        Field("resource_id"),
        Field("metadata", Kind.JSON),
        Field("ip_address"),
        Field("user_agent"),
        Field("session_id"),
        Field("severity", default="info"),
        Field("data_classification"),
        Field("compliance_tags", Kind.TEXT_ARRAY, default=()),
        Field("retention_days", Kind.INT, default=2555),
    ),
)

RATE_LIMITS = TableSpec(
    name="rate_limits",
    resource_type="rate_limit",
    seed_zaps={Direction.TO_SUPABASE: "3F", Direction.TO_TABLES: "3G"},
    fields=(
        _id(),
        Field("service_name"),
        _ts("window_start"),
        Field("request_count", Kind.INT, default=0),
        Field("quota_limit", Kind.INT),
        _ts("reset_at"),
        Field("metadata", Kind.JSON),
        _ts("created_at"),
        _ts("updated_at"),
    ),
)

TABLES: dict[str, TableSpec] = {t.name: t for t in (AGENT_JOBS, AGENT_DECISIONS, AUDIT_LOG, RATE_LIMITS)}


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    table: TableSpec
    direction: Direction

    @property
    def seed_zap(self) -> str:
        return self.table.seed_zaps[self.direction]


FUNCTIONS: dict[str, FunctionSpec] = {
    spec.function_name(d): FunctionSpec(spec.function_name(d), spec, d)
    for spec in TABLES.values()
    for d in spec.directions
}

# Tables whose Supabase changes are pushed to Zapier Tables by a Database Webhook.
WEBHOOK_TABLES: tuple[str, ...] = tuple(t.name for t in TABLES.values() if Direction.TO_TABLES in t.directions)
