-- Local stand-in for what every hosted Supabase project has before our migrations run: the API roles and
-- the default grants in schema public (supabase/postgres, migrations/db/init-scripts/00000000000000-
-- initial-schema.sql). NEVER apply this to a real Supabase project: it already has all of it.
--
-- * anon (the anon key), authenticated (a signed-in user's key), service_role (the service key, BYPASSRLS),
--   authenticator (PostgREST logs in as it and switches to one of the three), supabase_admin.
-- * USAGE on schema public, and default privileges: ALL on every table, sequence and function that the
--   migration role (and supabase_admin) creates in public goes to anon, authenticated and service_role.
--   So a table our migrations create is readable and writable with the anon key unless RLS says no -
--   exactly as on Supabase, which is what the tests must meet.
-- * Apply BEFORE our migrations (default privileges only reach objects created after them), and before
--   pg_net.sql (which grants pg_net's functions to these roles, as Supabase's grant_pg_net_access() does).
-- Idempotent. Roles are cluster-wide: creating one is safe when two databases of one cluster prepare at
-- the same time; the grants are per database.

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT * FROM (VALUES
            ('anon', 'NOLOGIN NOINHERIT'),
            ('authenticated', 'NOLOGIN NOINHERIT'),
            ('service_role', 'NOLOGIN NOINHERIT BYPASSRLS'),
            ('authenticator', 'LOGIN NOINHERIT'),
            ('supabase_admin', 'NOLOGIN')) AS v(name, options)
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r.name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I %s', r.name, r.options);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created concurrently by another database of this cluster
            END;
        END IF;
    END LOOP;
END
$$;

DO $$
BEGIN
    GRANT anon, authenticated, service_role TO authenticator;
EXCEPTION WHEN unique_violation OR duplicate_object THEN
    NULL;  -- concurrent grant from another database of this cluster
END
$$;

ALTER ROLE anon SET statement_timeout = '3s';
ALTER ROLE authenticated SET statement_timeout = '8s';

GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA public GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA public GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
