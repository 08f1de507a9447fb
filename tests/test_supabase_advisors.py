"""Supabase's Security Advisor (its database linter, github supabase/splinter) on our objects: the catalog
facts its lints check, with our own queries, on a database that has Supabase's roles and default grants
(infra/local/supabase_roles.sql: anon, authenticated and service_role get ALL on every table created in
public), plus what those facts mean for the roles that use the tables.

Lints covered: rls_disabled_in_public and sensitive_columns_exposed (ERROR), function_search_path_mutable,
anon/authenticated_security_definer_function_executable and rls_policy_always_true (WARN),
rls_enabled_no_policy (INFO; our tables have the sync's policy).
"""

from __future__ import annotations

import psycopg
import pytest

from shared.core.spec import TABLES

API_ROLES = ("anon", "authenticated")
EXPOSED = "public"  # pgrst.db_schemas on Supabase: public (and graphql_public, which holds none of ours)
OUR_SCHEMAS = ("public", "zsync")


def test_supabase_roles_and_default_grants_are_there(db):
    """The stand-in is as open as Supabase: without RLS the anon key would read and write our tables."""
    roles = dict(db.execute("SELECT rolname, rolbypassrls FROM pg_roles "
                            "WHERE rolname IN ('anon', 'authenticated', 'service_role', 'authenticator')").fetchall())
    assert roles == {"anon": False, "authenticated": False, "service_role": True, "authenticator": False}
    for table in TABLES:
        for role in (*API_ROLES, "service_role"):
            for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE"):
                assert db.execute("SELECT has_table_privilege(%s, %s, %s)",
                                  (role, f"public.{table}", privilege)).fetchone()[0], (role, table, privilege)


def test_every_exposed_table_readable_by_the_api_roles_has_rls(db):
    """rls_disabled_in_public and sensitive_columns_exposed (audit_log.session_id): no table in the exposed
    schema that anon or authenticated may SELECT is without RLS."""
    open_tables = db.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND n.nspname = %s AND NOT c.relrowsecurity "
        "AND (has_table_privilege('anon', c.oid, 'SELECT') OR has_table_privilege('authenticated', c.oid, 'SELECT'))",
        (EXPOSED,)).fetchall()
    assert open_tables == []
    rls = dict(db.execute("SELECT c.relname, c.relrowsecurity FROM pg_class c "
                          "WHERE c.oid = ANY(%s::regclass[])", ([f"public.{t}" for t in TABLES],)).fetchall())
    assert rls == {t: True for t in TABLES}


def test_no_policy_lets_the_api_roles_in(db):
    """No policy for anon, authenticated or PUBLIC on our tables (so rls_policy_always_true has nothing to
    flag), and each table has the sync's own policy (so rls_enabled_no_policy neither)."""
    policies = db.execute(
        "SELECT c.relname, p.polname, array(SELECT CASE WHEN r = 0 THEN 'public' ELSE r::regrole::text END "
        "FROM unnest(p.polroles) r) FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid "
        "WHERE c.oid = ANY(%s::regclass[])", ([f"public.{t}" for t in TABLES],)).fetchall()
    for table, name, roles in policies:
        assert not set(roles) & {"public", *API_ROLES}, (table, name, roles)
    assert {(t, n, tuple(r)) for t, n, r in policies if n == "zsync_sync_all"} == {
        (t, "zsync_sync_all", ("zsync_sync",)) for t in TABLES}
    for table in TABLES:  # what RLS does not govern, the API roles do not hold
        for privilege in ("TRUNCATE", "TRIGGER", "REFERENCES"):
            for role in API_ROLES:
                assert not db.execute("SELECT has_table_privilege(%s, %s, %s)",
                                      (role, f"public.{table}", privilege)).fetchone()[0], (role, table, privilege)


def test_every_function_of_ours_has_a_pinned_search_path(db):
    """function_search_path_mutable: every function in public and zsync sets search_path (proconfig)."""
    mutable = db.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = ANY(%s) AND NOT EXISTS "
        "(SELECT 1 FROM unnest(coalesce(p.proconfig, '{}')) c WHERE c LIKE 'search_path=%%')",
        (list(OUR_SCHEMAS),)).fetchall()
    assert mutable == []
    assert db.execute("SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                      "WHERE n.nspname = 'zsync'").fetchone()[0] > 30


def test_no_security_definer_function_is_executable_by_the_api_roles(db):
    """anon/authenticated_security_definer_function_executable, in every schema of ours (splinter looks at the
    exposed ones only)."""
    found = db.execute(
        "SELECT p.oid::regprocedure::text, r FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace, "
        "unnest(%s::text[]) r "
        "WHERE p.prosecdef AND n.nspname = ANY(%s) AND has_function_privilege(r, p.oid, 'EXECUTE')",
        (list(API_ROLES), list(OUR_SCHEMAS))).fetchall()
    assert found == []
    for role in API_ROLES:
        assert not db.execute("SELECT has_schema_privilege(%s, 'zsync', 'USAGE')", (role,)).fetchone()[0]


@pytest.mark.parametrize("role", API_ROLES)
def test_the_api_roles_read_and_write_no_row(db, role):
    """What the facts mean: with the anon or a user key (no policy for them) no row is visible, none can be
    inserted, updated or deleted."""
    db.execute("INSERT INTO agent_jobs (id, status) VALUES ('advisor-row', 'queued') ON CONFLICT (id) DO NOTHING")
    with db.transaction():
        db.execute(f"SET LOCAL ROLE {role}")
        for table in TABLES:
            assert db.execute(f"SELECT count(*) FROM public.{table}").fetchone() == (0,), table
        assert db.execute("UPDATE agent_jobs SET status = 'x'").rowcount == 0
        assert db.execute("DELETE FROM agent_jobs").rowcount == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege), db.transaction():
            db.execute("INSERT INTO agent_jobs (id, status) VALUES ('advisor-forged', 'queued')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege), db.transaction():
            db.execute("TRUNCATE agent_jobs")
    assert db.execute("SELECT status FROM agent_jobs WHERE id = 'advisor-row'").fetchone() == ("queued",)


def test_service_role_keeps_working(db):
    """service_role (BYPASSRLS) reads and writes every row, as before RLS; its writes are synced like any
    other (the capture trigger runs)."""
    db.execute("INSERT INTO agent_jobs (id, status) VALUES ('advisor-svc', 'queued') ON CONFLICT (id) DO NOTHING")
    with db.transaction():
        db.execute("SET LOCAL ROLE service_role")
        assert db.execute("SELECT count(*) FROM agent_jobs WHERE id = 'advisor-svc'").fetchone() == (1,)
        assert db.execute("UPDATE agent_jobs SET status = 'running' WHERE id = 'advisor-svc'").rowcount == 1
        db.execute("INSERT INTO agent_jobs (id, status) VALUES ('advisor-svc-2', 'queued')")
    assert db.execute("SELECT count(*) FROM zsync.outbox WHERE record_id IN ('advisor-svc', 'advisor-svc-2') "
                      "AND acked_at IS NULL").fetchone()[0] >= 2


AGENT_CLAIMS = '{"app_metadata": {"role": "claude_agent"}}'


def test_the_documented_claude_agent_policy_works_and_stays_clean(database_url):
    """docs/security.md's policy for a Claude agent writing with a user key, applied as written (with a stand-in
    for Supabase's auth.jwt(), which reads PostgREST's request.jwt.claims): the agent reads, inserts and updates,
    its write is captured for the sync, another signed-in user sees nothing, and no advisor fact breaks (the
    auth call is wrapped in a SELECT: auth_rls_initplan)."""
    from pathlib import Path

    from infra.local.postgres import create_database, prepare_database, with_database

    doc = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text(encoding="utf-8")
    policy_sql = doc.split("```sql", 1)[1].split("```", 1)[0]
    url = create_database(with_database(database_url, "postgres"))
    prepare_database(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS auth")
        conn.execute("CREATE OR REPLACE FUNCTION auth.jwt() RETURNS jsonb LANGUAGE sql STABLE SET search_path = '' "
                     "AS $$ SELECT coalesce(nullif(current_setting('request.jwt.claims', true), ''), '{}')::jsonb $$")
        conn.execute("GRANT USAGE ON SCHEMA auth TO anon, authenticated")
        conn.execute(policy_sql)
        conn.execute("INSERT INTO agent_jobs (id, status) VALUES ('doc-agent-1', 'queued')")
        with conn.transaction():
            conn.execute("SET LOCAL ROLE authenticated")
            conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (AGENT_CLAIMS,))
            assert conn.execute("SELECT count(*) FROM agent_jobs").fetchone() == (1,)
            assert conn.execute("UPDATE agent_jobs SET status = 'running' WHERE id = 'doc-agent-1'").rowcount == 1
            conn.execute("INSERT INTO agent_jobs (id, status) VALUES ('doc-agent-2', 'queued')")
            conn.execute("SELECT set_config('request.jwt.claims', %s, true)", ('{"user_metadata": '
                                                                              '{"role": "claude_agent"}}',))
            assert conn.execute("SELECT count(*) FROM agent_jobs").fetchone() == (0,)  # not a claim users set
        captured = conn.execute("SELECT count(*) FROM zsync.outbox WHERE record_id LIKE 'doc-agent-%'").fetchone()
        assert captured == (3,)  # the owner's insert, the agent's update and insert
        quals = [q for (q,) in conn.execute(
            "SELECT coalesce(qual, '') || ' ' || coalesce(with_check, '') FROM pg_policies "
            "WHERE tablename = 'agent_jobs' AND 'authenticated' = ANY(roles)")]
        assert len(quals) == 3 and all("select auth.jwt()" in q.lower() for q in quals), quals
        assert all(q.replace(" ", "").lower() not in ("true", "(true)") for q in quals)
