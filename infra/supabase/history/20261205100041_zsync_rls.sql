-- zsync: row level security on the four tables, and a pinned search_path on every zsync function, so
-- Supabase's database linter (splinter; the dashboard's Security Advisor) reports no error and no warning
-- on our objects.
--
-- On Supabase anon, authenticated and service_role get ALL on every table created in public (default
-- privileges), and the Data API exposes public: without RLS the four tables were readable and writable
-- with the anon key (lints rls_disabled_in_public, and sensitive_columns_exposed for audit_log.session_id).
--
-- * RLS is enabled (not forced) on agent_jobs, agent_decisions, audit_log and rate_limits, with no policy
--   for anon or authenticated: through the Data API those keys see and change no row. The table owner
--   (postgres: migrations, `zsync wire`, pg_cron's sweep) is not subject to RLS, service_role has
--   BYPASSRLS, and SECURITY DEFINER functions run as the owner.
-- * The sync's role zsync_sync (its LOGIN member zsync_fn is what the functions connect as) gets one
--   permissive policy per table, `zsync_sync_all`: every row, for what its grants allow (SELECT, INSERT,
--   UPDATE; audit_log SELECT, INSERT). A Claude agent that writes with a user key needs its own policy:
--   docs/security.md shows one.
-- * TRUNCATE, TRIGGER and REFERENCES (which RLS does not govern; the Data API never needs them) are
--   revoked from anon and authenticated on the four tables.
-- * Every function in schema zsync without a search_path setting gets search_path = pg_catalog, pg_temp
--   (their bodies schema-qualify every object). At the time of writing: append_audit, append_audit_each,
--   append_audit_many, canonical_json, canonical_row, content_hash, enable_sync, record_outbox_batch,
--   reject_audit_change, sweep_outbox, sync_apply, sync_apply_many, sync_apply_many_set, sync_upsert,
--   version_cmp, version_cmp_many, version_exprs, version_of, version_of_typed. A later migration that
--   creates or replaces a function must pin it itself (tests/test_supabase_advisors.py checks it).

DO $$
DECLARE
    t text;
    api text;
BEGIN
    FOREACH t IN ARRAY ARRAY['agent_jobs', 'agent_decisions', 'audit_log', 'rate_limits'] LOOP
        EXECUTE format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', t);
        IF NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = format('public.%I', t)::regclass
                                                  AND polname = 'zsync_sync_all') THEN
            EXECUTE format('CREATE POLICY zsync_sync_all ON public.%I AS PERMISSIVE FOR ALL TO zsync_sync '
                           'USING (true) WITH CHECK (true)', t);
        END IF;
        FOREACH api IN ARRAY ARRAY['anon', 'authenticated'] LOOP
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = api) THEN
                EXECUTE format('REVOKE TRUNCATE, TRIGGER, REFERENCES ON public.%I FROM %I', t, api);
            END IF;
        END LOOP;
    END LOOP;
END
$$;

DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'zsync'
          AND NOT EXISTS (SELECT 1 FROM unnest(coalesce(p.proconfig, '{}')) c WHERE c LIKE 'search_path=%')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f);
    END LOOP;
END
$$;
