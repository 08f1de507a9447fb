"""Mapping between Zapier Tables fields, Supabase records and rows (the seed's parsing rules)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from shared.core.mapping import (
    InvalidRecord,
    normalize_timestamp,
    parse_supabase_record,
    parse_tables_record,
    to_tables_fields,
)
from shared.core.spec import FUNCTIONS, TABLES, Kind

JOBS, DECISIONS, AUDIT, LIMITS = (TABLES[n] for n in ("agent_jobs", "agent_decisions", "audit_log", "rate_limits"))


def problems(spec, record):
    with pytest.raises(InvalidRecord) as info:
        parse_tables_record(spec, record)
    return {p["field"]: p["problem"] for p in info.value.problems}


def test_spec_derives_the_seven_functions():
    assert sorted(FUNCTIONS) == sorted([
        "agent_jobs_to_supabase", "agent_jobs_to_tables", "agent_decisions_to_supabase",
        "agent_decisions_to_tables", "audit_log_to_supabase", "rate_limits_to_supabase", "rate_limits_to_tables",
    ])
    assert {f.seed_zap for f in FUNCTIONS.values()} == {"3A", "3B", "3C", "3D", "3E", "3F", "3G"}
    assert AUDIT.append_only and "audit_log_to_tables" not in FUNCTIONS


def test_seed_3a_record_parses_json_fields_and_timestamps():
    row = parse_tables_record(JOBS, {
        "id": "abc-123-def-456", "job_type": "discovery", "status": "queued",
        "initiated_by": "zapier_discovery_coordinator", "initiated_by_type": "zapier_agent",
        "parameters": "{\"metro\": \"Austin\", \"radius\": 15}", "created_at": "2025-12-22T10:00:00Z",
    })
    assert row["parameters"] == {"metro": "Austin", "radius": 15}
    assert row["results"] is None
    assert row["retry_count"] == 0  # the seed's default
    assert row["created_at"] == datetime(2025, 12, 22, 10, tzinfo=UTC)
    assert set(row) == set(JOBS.field_names)


def test_record_wrapper_and_coercions():
    row = parse_tables_record(DECISIONS, {"id": "d1", "confidence": "0.87", "metadata": ""})
    assert row["confidence"] == 0.87 and row["metadata"] is None
    limits = parse_tables_record(LIMITS, {"id": "r1", "request_count": "12", "quota_limit": 100.0})
    assert limits["request_count"] == 12 and limits["quota_limit"] == 100


def test_audit_log_defaults_and_compliance_tags():
    row = parse_tables_record(AUDIT, {"id": "rec1", "compliance_tags": "gdpr, soc2,,hipaa", "action": "x"})
    assert row["compliance_tags"] == ["gdpr", "soc2", "hipaa"]
    assert row["severity"] == "info" and row["retention_days"] == 2555
    assert parse_tables_record(AUDIT, {"id": "rec2"})["compliance_tags"] == []


@pytest.mark.parametrize("value,expected", [
    ("2025-12-22T10:00:00Z", datetime(2025, 12, 22, 10, tzinfo=UTC)),
    ("2025-12-22T12:00:00+02:00", datetime(2025, 12, 22, 10, tzinfo=UTC)),
    ("2025-12-22T10:00:00", datetime(2025, 12, 22, 10, tzinfo=UTC)),  # naive = UTC
    ("2025-12-22 10:00:00.123456789", datetime(2025, 12, 22, 10, 0, 0, 123456, tzinfo=UTC)),
    ("2025-12-22", datetime(2025, 12, 22, tzinfo=UTC)),
    (datetime(2025, 12, 22, 5, tzinfo=timezone(timedelta(hours=-5))), datetime(2025, 12, 22, 10, tzinfo=UTC)),
    ("", None),
    (None, None),
])
def test_timestamp_normalisation(value, expected):
    assert normalize_timestamp(value) == expected
    assert normalize_timestamp(normalize_timestamp(value)) == expected


@pytest.mark.parametrize("record,field,fragment", [
    ({"id": "x", "parameters": "{not json"}, "parameters", "invalid JSON"),
    ({"id": "x", "results": "[1, 2"}, "results", "invalid JSON"),
    ({"id": "x", "parameters": "NaN"}, "parameters", "not valid JSON"),
    ({"id": "x", "created_at": "garbage"}, "created_at", "not a timestamp"),
    ({"id": "x", "created_at": "2025-02-31T00:00:00Z"}, "created_at", "day is out of range"),
    ({"id": "x", "started_at": "2025-13-01T00:00:00Z"}, "started_at", "not a valid timestamp"),
    ({"id": "x", "retry_count": "three"}, "retry_count", "whole number"),
    ({"id": "x", "retry_count": True}, "retry_count", "boolean"),
    ({"id": "x", "retry_count": 2**40}, "retry_count", "out of range"),
    ({"id": 42}, "id", "must be text"),
    ({"id": ""}, "id", "empty"),
    ({"id": "x" * 129}, "id", "longer than 128"),
    ({}, "id", "required"),
    ({"id": "x", "status": "a\x00b"}, "status", "NUL"),
    ({"id": "x", "status": "\ud800"}, "status", "surrogate"),
])
def test_bad_input_names_the_field(record, field, fragment):
    found = problems(JOBS, record)
    assert field in found, found
    assert fragment in found[field]


def test_several_problems_are_reported_together():
    found = problems(JOBS, {"id": "x", "parameters": "{", "created_at": "nope", "retry_count": "1.5"})
    assert set(found) == {"parameters", "created_at", "retry_count"}


def test_nan_confidence_rejected():
    assert "finite" in problems(DECISIONS, {"id": "d", "confidence": "NaN"})["confidence"]
    assert "finite" in problems(DECISIONS, {"id": "d", "confidence": "inf"})["confidence"]


def test_supabase_record_to_tables_fields_is_typed():
    record = {"id": "j", "parameters": {"lead_id": "lead-xyz-789"}, "results": None, "retry_count": 2,
              "created_at": "2025-12-22T10:05:00+00:00", "updated_at": "2025-12-22T10:05:00.5+00:00"}
    fields = to_tables_fields(JOBS, parse_supabase_record(JOBS, record))
    assert fields["parameters"] == {"lead_id": "lead-xyz-789"}  # a json field takes the JSON value
    assert fields["results"] is None
    assert fields["created_at"] == "2025-12-22T10:05:00Z"
    assert fields["updated_at"] == "2025-12-22T10:05:00.500000Z"


def test_round_trip_supabase_to_tables_to_supabase_is_exact():
    record = {"id": "j", "status": "", "parameters": {}, "results": "just a string", "retry_count": 0,
              "created_at": "2025-12-22T10:05:00.000001+00:00", "updated_at": "2025-12-22T10:05:01+00:00"}
    row = parse_supabase_record(JOBS, record)
    assert parse_tables_record(JOBS, to_tables_fields(JOBS, row)) == row


def test_json_and_lists_arrive_in_either_form_with_the_same_version():
    from shared.core.mapping import parse_supabase_record as sup
    audit = TABLES["audit_log"]
    base = {"id": "a", "timestamp": "2025-12-22T10:00:00Z", "metadata": {"k": [1, 2]},
            "compliance_tags": ["gdpr", "sox"]}
    as_values = parse_tables_record(audit, to_tables_fields(audit, sup(audit, base)))
    as_text = parse_tables_record(audit, base | {"metadata": '{"k": [1, 2]}', "compliance_tags": "gdpr, sox"})
    assert as_values == as_text
    assert to_tables_fields(audit, as_values)["compliance_tags"] == ["gdpr", "sox"]
    # A JSON *string* value goes as JSON text, so it reads back as the same string whatever the form.
    row = parse_supabase_record(JOBS, {"id": "j", "results": "ok"})
    assert to_tables_fields(JOBS, row)["results"] == '"ok"'
    assert parse_tables_record(JOBS, to_tables_fields(JOBS, row))["results"] == "ok"


def test_json_kinds_are_described():
    assert JOBS.fields_of(Kind.JSON) == ("parameters", "results")
