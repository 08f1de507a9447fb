-- zsync roles: the least-privileged database role the seven functions connect as.
--
-- zsync_sync (NOLOGIN) holds exactly what the sync needs:
--   * USAGE on the schemas public, zsync (and net, where pg_net is installed);
--   * SELECT, INSERT, UPDATE on the two-way tables agent_jobs, agent_decisions, rate_limits;
--   * INSERT, SELECT on audit_log (append-only: no UPDATE, and its triggers reject changes anyway);
--   * SELECT on zsync.schema_migrations (the signed ping reports whether migrations are current);
--   * EXECUTE on the zsync functions the functions (and replay/reconcile, which run with the same
--     settings) call: sync_upsert, sync_upsert_many, version_cmp (and content_hash, which
--     it uses), append_audit, ack_outbox, announce.
-- It gets no CREATE on any schema (no DDL), no DELETE or TRUNCATE anywhere, and no access to
-- zsync.webhook_endpoints (which holds the shared secret) or to zsync.outbox: the outbox is written by
-- the capture trigger, acknowledged by zsync.ack_outbox and read by zsync.announce, all three
-- SECURITY DEFINER (run as their owner, the migration role) with a fixed search_path.
--
-- Production: create a LOGIN user that is a member of zsync_sync and use it in the functions'
-- connection string (ZSYNC_DATABASE_URL; on the Supabase pooler the user name is
-- "<user>.<project-ref>"), e.g. as the project owner:
--
--     CREATE ROLE zsync_fn LOGIN PASSWORD '<generated>' IN ROLE zsync_sync;
--
-- Migrations, `zsync wire` and pg_cron's sweeper keep running as the owner (postgres). A migration that
-- adds a synced table must also GRANT SELECT, INSERT, UPDATE ON it TO zsync_sync; a migration that
-- re-creates capture_change/ack_outbox/announce must keep them SECURITY DEFINER with a fixed
-- search_path (CREATE OR REPLACE resets both) - tests/test_security.py checks both.
--
-- Roles are cluster-wide: creating the role is idempotent (and safe if two databases of one cluster
-- migrate at the same time); the grants are per database.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'zsync_sync') THEN
        CREATE ROLE zsync_sync NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- created concurrently by a migration of another database in the same cluster
END
$$;

-- Schemas: lookup only. (PUBLIC has no CREATE on public since Postgres 15; make sure of it on older
-- servers too, so no role that merely inherits PUBLIC can create objects there.)
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO zsync_sync;
GRANT USAGE ON SCHEMA zsync TO zsync_sync;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'net') THEN
        GRANT USAGE ON SCHEMA net TO zsync_sync;
    END IF;
END
$$;

-- Tables.
GRANT SELECT, INSERT, UPDATE ON public.agent_jobs, public.agent_decisions, public.rate_limits TO zsync_sync;
GRANT SELECT, INSERT ON public.audit_log TO zsync_sync;
GRANT SELECT ON zsync.schema_migrations TO zsync_sync;

-- The outbox is touched only through these, running as their owner. A fixed search_path (their bodies
-- schema-qualify everything) keeps a caller's objects from being picked up in place of the real ones.
ALTER FUNCTION zsync.capture_change() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION zsync.ack_outbox(text, text, timestamptz, text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION zsync.announce(text, text, text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Functions: nothing in zsync is callable by PUBLIC (it has no USAGE on the schema either); the sync
-- role gets the ones it calls. Trigger functions need no EXECUTE grant to fire.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA zsync FROM PUBLIC;
ALTER DEFAULT PRIVILEGES IN SCHEMA zsync REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    zsync.sync_upsert(regclass, jsonb),
    zsync.version_cmp(regclass, jsonb, jsonb),
    zsync.content_hash(jsonb),
    zsync.append_audit(jsonb),
    zsync.ack_outbox(text, text, timestamptz, text),
    zsync.announce(text, text, text)
TO zsync_sync;
DO $$
BEGIN
    IF to_regprocedure('zsync.sync_upsert_many(regclass, jsonb)') IS NOT NULL THEN  -- reconcile's batch path
        GRANT EXECUTE ON FUNCTION zsync.sync_upsert_many(regclass, jsonb) TO zsync_sync;
    END IF;
END
$$;
