-- zsync: the four agent-orchestration tables, as the seed's Zaps 3A-3G list their fields.
-- Types: JSON fields are jsonb, timestamps timestamptz, ids text (ids like "abc-123-def-456").
-- Columns the sync writes are nullable on purpose: the sync stores exactly the version it applies
-- (a database default filled in on one side only would make the two sides differ).

CREATE SCHEMA IF NOT EXISTS zsync;

CREATE TABLE IF NOT EXISTS public.agent_jobs (
    id                text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 128),
    job_type          text,
    status            text,
    initiated_by      text,
    initiated_by_type text,
    parameters        jsonb,
    results           jsonb,
    error_message     text,
    retry_count       integer DEFAULT 0,
    created_at        timestamptz DEFAULT now(),
    started_at        timestamptz,
    completed_at      timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.agent_decisions (
    id              text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 128),
    lead_id         text,
    decision_type   text,
    agent_name      text,
    agent_type      text,
    decision        text,
    confidence      double precision,
    reasoning       text,
    metadata        jsonb,
    overridden_by   text,
    override_reason text,
    overridden_at   timestamptz,
    created_at      timestamptz DEFAULT now(),
    -- Not in the seed: added so both directions can compare versions; maintained by the database.
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.audit_log (
    -- For entries synced from Zapier Tables: the Tables record id (one row per source record).
    id                  text PRIMARY KEY DEFAULT gen_random_uuid()::text CHECK (length(id) BETWEEN 1 AND 200),
    "timestamp"         timestamptz NOT NULL DEFAULT now(),
    actor               text,
    actor_type          text,
    action              text,
    resource_type       text,
    resource_id         text,
    metadata            jsonb,
    ip_address          text,
    user_agent          text,
    session_id          text,
    severity            text NOT NULL DEFAULT 'info',
    data_classification text,
    compliance_tags     text[] NOT NULL DEFAULT '{}',
    retention_days      integer NOT NULL DEFAULT 2555
);
CREATE INDEX IF NOT EXISTS audit_log_action_timestamp_idx ON public.audit_log (action, "timestamp");
CREATE INDEX IF NOT EXISTS audit_log_resource_idx ON public.audit_log (resource_type, resource_id);

CREATE TABLE IF NOT EXISTS public.rate_limits (
    id            text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 128),
    service_name  text,
    window_start  timestamptz,
    request_count integer DEFAULT 0,
    quota_limit   integer,
    reset_at      timestamptz,
    metadata      jsonb,
    created_at    timestamptz DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
