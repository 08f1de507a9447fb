-- zsync:baseline replaces 20251222100000 20251222100100 20251222100200 20251222100300 20251222100400 20261129100000 20261129100100 20261129200000 20261129200100 20261129500000 20261129600000 20261129700000 20261129800000 20261129810000 20261129820000 20261129830000 20261205100040 20261205100041 20261205300000 20261205400000 20261205500000
-- zsync baseline: the schema the migration chain above built, one definition per object, grouped
-- by concern (written by `zsync squash` from a schema-only dump of the chain; the chain itself is in
-- infra/supabase/history/). Later changes are new migrations again.
--
-- 1. Bookkeeping
-- 2. The synced tables
-- 3. Versions and the conflict rule
-- 4. Deletes
-- 5. Applying changes
-- 6. Audit
-- 7. Outbox and delivery
-- 8. Metrics and alerts
-- 9. Roles and grants
-- 10. Schedule

SET LOCAL check_function_bodies = false;  -- bodies refer to objects defined further down

-- The functions' role (cluster-wide; idempotent, and safe when two databases of one cluster migrate at once).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'zsync_sync') THEN
        CREATE ROLE zsync_sync NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

-- 1. Bookkeeping ----------------------------------------------------------------------------------
-- the zsync schema and zsync.schema_migrations: created by `zsync migrate` itself before any migration runs (shared/adapters/migrations.py)

-- 2. The synced tables ----------------------------------------------------------------------------
-- the four tables the sync keeps equal on both sides, their checks and row security

CREATE TABLE public.agent_decisions (
    id text NOT NULL,
    lead_id text,
    decision_type text,
    agent_name text,
    agent_type text,
    decision text,
    confidence double precision,
    reasoning text,
    metadata jsonb,
    overridden_by text,
    override_reason text,
    overridden_at timestamp with time zone,
    created_at timestamp with time zone DEFAULT now(),
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT agent_decisions_id_check CHECK (((length(id) >= 1) AND (length(id) <= 128)))
);

CREATE TABLE public.agent_jobs (
    id text NOT NULL,
    job_type text,
    status text,
    initiated_by text,
    initiated_by_type text,
    parameters jsonb,
    results jsonb,
    error_message text,
    retry_count integer DEFAULT 0,
    created_at timestamp with time zone DEFAULT now(),
    started_at timestamp with time zone,
    completed_at timestamp with time zone,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT agent_jobs_id_check CHECK (((length(id) >= 1) AND (length(id) <= 128)))
);

CREATE TABLE public.audit_log (
    id text DEFAULT (gen_random_uuid())::text NOT NULL,
    "timestamp" timestamp with time zone DEFAULT now() NOT NULL,
    actor text,
    actor_type text,
    action text,
    resource_type text,
    resource_id text,
    metadata jsonb,
    ip_address text,
    user_agent text,
    session_id text,
    severity text DEFAULT 'info'::text NOT NULL,
    data_classification text,
    compliance_tags text[] DEFAULT '{}'::text[] NOT NULL,
    retention_days integer DEFAULT 2555 NOT NULL,
    CONSTRAINT audit_log_id_check CHECK (((length(id) >= 1) AND (length(id) <= 200)))
);

CREATE TABLE public.rate_limits (
    id text NOT NULL,
    service_name text,
    window_start timestamp with time zone,
    request_count integer DEFAULT 0,
    quota_limit integer,
    reset_at timestamp with time zone,
    metadata jsonb,
    created_at timestamp with time zone DEFAULT now(),
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT rate_limits_id_check CHECK (((length(id) >= 1) AND (length(id) <= 128)))
);

ALTER TABLE ONLY public.agent_decisions
    ADD CONSTRAINT agent_decisions_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.agent_jobs
    ADD CONSTRAINT agent_jobs_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.audit_log
    ADD CONSTRAINT audit_log_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.rate_limits
    ADD CONSTRAINT rate_limits_pkey PRIMARY KEY (id);

ALTER TABLE public.agent_decisions
    ADD CONSTRAINT zsync_agent_name_syncable CHECK ((length(agent_name) <= 100000)) NOT VALID;

ALTER TABLE public.agent_decisions
    ADD CONSTRAINT zsync_agent_type_syncable CHECK ((length(agent_type) <= 100000)) NOT VALID;

ALTER TABLE public.agent_jobs
    ADD CONSTRAINT zsync_completed_at_syncable CHECK (((completed_at > '0001-01-02 00:00:00+00'::timestamp with time zone) AND (completed_at < '9999-12-31 00:00:00+00'::timestamp with time zone))) NOT VALID;

ALTER TABLE public.agent_decisions
    ADD CONSTRAINT zsync_confidence_syncable CHECK ((confidence <> ALL (ARRAY['NaN'::double precision, 'Infinity'::double precision, '-Infinity'::double precision]))) NOT VALID;

ALTER TABLE public.agent_jobs
    ADD CONSTRAINT zsync_created_at_syncable CHECK (((created_at > '0001-01-02 00:00:00+00'::timestamp with time zone) AND (created_at < '9999-12-31 00:00:00+00'::timestamp with time zone))) NOT VALID;

ALTER TABLE public.agent_decisions
    ADD CONSTRAINT zsync_created_at_syncable CHECK (((created_at > '0001-01-02 00:00:00+00'::timestamp with time zone) AND (created_at < '9999-12-31 00:00:00+00'::timestamp with time zone))) NOT VALID;

ALTER TABLE public.rate_limits
    ADD CONSTRAINT zsync_created_at_syncable CHECK (((created_at > '0001-01-02 00:00:00+00'::timestamp with time zone) AND (created_at < '9999-12-31 00:00:00+00'::timestamp with time zone))) NOT VALID;

ALTER TABLE public.agent_decisions
    ADD CONSTRAINT zsync_decision_syncable CHECK ((length(decision) <= 100000)) NOT VALID;

ALTER TABLE public.agent_decisions
    ADD CONSTRAINT zsync_decision_type_syncable CHECK ((length(decision_type) <= 100000)) NOT VALID;

ALTER TABLE public.agent_jobs
    ADD CONSTRAINT zsync_error_message_syncable CHECK ((length(error_message) <= 100000)) NOT VALID;

ALTER TABLE public.agent_jobs
    ADD CONSTRAINT zsync_id_syncable CHECK (((id ~ '\S'::text) AND (id !~ '[\x01-\x1f\x7f]'::text))) NOT VALID;

ALTER TABLE public.agent_decisions
    ADD CONSTRAINT zsync_id_syncable CHECK (((id ~ '\S'::text) AND (id !~ '[\x01-\x1f\x7f]'::text))) NOT VALID;

ALTER TABLE public.rate_limits
    ADD CONSTRAINT zsync_id_syncable CHECK (((id ~ '\S'::text) AND (id !~ '[\x01-\x1f\x7f]'::text))) NOT VALID;

ALTER TABLE public.agent_jobs
    ADD CONSTRAINT zsync_initiated_by_syncable CHECK ((length(initiated_by) <= 100000)) NOT VALID;

ALTER TABLE public.agent_jobs
    ADD CONSTRAINT zsync_initiated_by_type_syncable CHECK ((length(initiated_by_type) <= 100000)) NOT VALID;

ALTER TABLE public.agent_jobs
    ADD CONSTRAINT zsync_job_type_syncable CHECK ((length(job_type) <= 100000)) NOT VALID;

ALTER TABLE public.agent_decisions
    ADD CONSTRAINT zsync_lead_id_syncable CHECK ((length(lead_id) <= 100000)) NOT VALID;

ALTER TABLE public.agent_decisions
    ADD CONSTRAINT zsync_overridden_at_syncable CHECK (((overridden_at > '0001-01-02 00:00:00+00'::timestamp with time zone) AND (overridden_at < '9999-12-31 00:00:00+00'::timestamp with time zone))) NOT VALID;

ALTER TABLE public.agent_decisions
    ADD CONSTRAINT zsync_overridden_by_syncable CHECK ((length(overridden_by) <= 100000)) NOT VALID;

ALTER TABLE public.agent_decisions
    ADD CONSTRAINT zsync_override_reason_syncable CHECK ((length(override_reason) <= 100000)) NOT VALID;

ALTER TABLE public.agent_decisions
    ADD CONSTRAINT zsync_reasoning_syncable CHECK ((length(reasoning) <= 100000)) NOT VALID;

ALTER TABLE public.rate_limits
    ADD CONSTRAINT zsync_reset_at_syncable CHECK (((reset_at > '0001-01-02 00:00:00+00'::timestamp with time zone) AND (reset_at < '9999-12-31 00:00:00+00'::timestamp with time zone))) NOT VALID;

ALTER TABLE public.rate_limits
    ADD CONSTRAINT zsync_service_name_syncable CHECK ((length(service_name) <= 100000)) NOT VALID;

ALTER TABLE public.agent_jobs
    ADD CONSTRAINT zsync_started_at_syncable CHECK (((started_at > '0001-01-02 00:00:00+00'::timestamp with time zone) AND (started_at < '9999-12-31 00:00:00+00'::timestamp with time zone))) NOT VALID;

ALTER TABLE public.agent_jobs
    ADD CONSTRAINT zsync_status_syncable CHECK ((length(status) <= 100000)) NOT VALID;

ALTER TABLE public.agent_jobs
    ADD CONSTRAINT zsync_updated_at_syncable CHECK (((updated_at > '0001-01-02 00:00:00+00'::timestamp with time zone) AND (updated_at < '9999-12-31 00:00:00+00'::timestamp with time zone))) NOT VALID;

ALTER TABLE public.agent_decisions
    ADD CONSTRAINT zsync_updated_at_syncable CHECK (((updated_at > '0001-01-02 00:00:00+00'::timestamp with time zone) AND (updated_at < '9999-12-31 00:00:00+00'::timestamp with time zone))) NOT VALID;

ALTER TABLE public.rate_limits
    ADD CONSTRAINT zsync_updated_at_syncable CHECK (((updated_at > '0001-01-02 00:00:00+00'::timestamp with time zone) AND (updated_at < '9999-12-31 00:00:00+00'::timestamp with time zone))) NOT VALID;

ALTER TABLE public.rate_limits
    ADD CONSTRAINT zsync_window_start_syncable CHECK (((window_start > '0001-01-02 00:00:00+00'::timestamp with time zone) AND (window_start < '9999-12-31 00:00:00+00'::timestamp with time zone))) NOT VALID;

CREATE INDEX audit_log_action_timestamp_idx ON public.audit_log USING btree (action, "timestamp");

CREATE INDEX audit_log_resource_idx ON public.audit_log USING btree (resource_type, resource_id);

CREATE INDEX audit_log_sync_timestamp_idx ON public.audit_log USING btree ("timestamp") WHERE (actor_type = 'zapier_sync'::text);

ALTER TABLE public.agent_decisions ENABLE ROW LEVEL SECURITY;

ALTER TABLE public.agent_jobs ENABLE ROW LEVEL SECURITY;

ALTER TABLE public.audit_log ENABLE ROW LEVEL SECURITY;

ALTER TABLE public.rate_limits ENABLE ROW LEVEL SECURITY;

CREATE POLICY zsync_sync_all ON public.agent_decisions TO zsync_sync USING (true) WITH CHECK (true);

CREATE POLICY zsync_sync_all ON public.agent_jobs TO zsync_sync USING (true) WITH CHECK (true);

CREATE POLICY zsync_sync_all ON public.audit_log TO zsync_sync USING (true) WITH CHECK (true);

CREATE POLICY zsync_sync_all ON public.rate_limits TO zsync_sync USING (true) WITH CHECK (true);

-- 3. Versions and the conflict rule ---------------------------------------------------------------
-- a row's version (updated_at, content hash), its canonical form, the comparison both directions use, and updated_at kept current for writers that forget it

CREATE TABLE zsync.config (
    key text NOT NULL,
    value jsonb NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL
);

ALTER TABLE ONLY zsync.config
    ADD CONSTRAINT config_pkey PRIMARY KEY (key);

CREATE FUNCTION zsync.canonical_json(v jsonb) RETURNS jsonb
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    n numeric;
BEGIN
    CASE jsonb_typeof(v)
        WHEN 'number' THEN
            n := v::numeric;
            IF n = 0 OR abs(n) BETWEEN 1e-300 AND 1e300 THEN
                RETURN to_jsonb(n::float8);
            END IF;
            RETURN to_jsonb(trim_scale(n));
        WHEN 'object' THEN
            IF NOT jsonb_path_exists(v, 'strict $.** ? (@.type() == "number")') THEN
                RETURN v;
            END IF;
            RETURN coalesce((
                SELECT jsonb_object_agg(e.key,
                           CASE jsonb_typeof(e.value)
                               WHEN 'number' THEN
                                   CASE WHEN e.value::numeric = 0 OR abs(e.value::numeric) BETWEEN 1e-300 AND 1e300
                                            THEN to_jsonb(e.value::numeric::float8)
                                        ELSE to_jsonb(trim_scale(e.value::numeric)) END
                               WHEN 'object' THEN zsync.canonical_json(e.value)
                               WHEN 'array' THEN zsync.canonical_json(e.value)
                               ELSE e.value END)
                FROM jsonb_each(v) e), '{}'::jsonb);
        WHEN 'array' THEN
            IF NOT jsonb_path_exists(v, 'strict $.** ? (@.type() == "number")') THEN
                RETURN v;
            END IF;
            RETURN coalesce((
                SELECT jsonb_agg(CASE jsonb_typeof(e.value)
                                     WHEN 'number' THEN
                                         CASE WHEN e.value::numeric = 0 OR abs(e.value::numeric) BETWEEN 1e-300 AND 1e300
                                                  THEN to_jsonb(e.value::numeric::float8)
                                              ELSE to_jsonb(trim_scale(e.value::numeric)) END
                                     WHEN 'object' THEN zsync.canonical_json(e.value)
                                     WHEN 'array' THEN zsync.canonical_json(e.value)
                                     ELSE e.value END ORDER BY e.ord)
                FROM jsonb_array_elements(v) WITH ORDINALITY AS e(value, ord)), '[]'::jsonb);
        ELSE
            RETURN v;
    END CASE;
END
$_$;

-- plpgsql (not sql) so the query's plan is cached for the session: a SQL function called from plpgsql is
-- planned again on every call.
CREATE FUNCTION zsync.canonical_row(p_table regclass, p_row jsonb) RETURNS jsonb
    LANGUAGE plpgsql STABLE
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    RETURN (SELECT coalesce(jsonb_object_agg(a.attname,
               CASE WHEN a.atttypid = 'timestamptz'::regtype AND jsonb_typeof(c.v) = 'string'
                        THEN to_jsonb(date_trunc('milliseconds', (c.v #>> '{}')::timestamptz))
                    WHEN a.atttypid = 'jsonb'::regtype THEN zsync.canonical_json(c.v)
                    ELSE c.v END), '{}'::jsonb)
    FROM pg_attribute a, LATERAL (SELECT p_row -> a.attname::text AS v) c
    WHERE a.attrelid = p_table AND a.attnum > 0 AND NOT a.attisdropped
      -- An empty text/array is no value; an empty JSON array in a jsonb column is a value.
      AND c.v IS NOT NULL AND c.v NOT IN ('null'::jsonb, '""'::jsonb)
      AND NOT (c.v = '[]'::jsonb AND a.atttypid <> 'jsonb'::regtype));
END
$$;

-- Writes made by the sync run with zsync.origin = 'sync' (transaction-local) so the updated_at
-- maintenance below leaves the version they carry untouched.
-- Empty text and null hash alike: a Zap sends "" for an empty field that the other side stores as
-- NULL, and the two must count as the same version (else every such record costs an extra write).
CREATE FUNCTION zsync.content_hash(p_row jsonb) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT md5(coalesce(
        (SELECT jsonb_object_agg(key, value) FROM jsonb_each(p_row - 'updated_at')
         WHERE value NOT IN ('null'::jsonb, '""'::jsonb))::text,
        '{}'))
$$;

-- Hybrid-logical updated_at (see 20261129100000_zsync_versions_hlc.sql), plus the skew rule above.
CREATE FUNCTION zsync.maintain_updated_at() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_skew  interval := zsync.max_future_skew();
    v_limit timestamptz := clock_timestamp() + v_skew;
    v_sync  boolean := coalesce(current_setting('zsync.origin', true), '') = 'sync';
    v_set   timestamptz;  -- the version this write sets (not one it leaves as it was)
    v_floor timestamptz;
BEGIN
    IF v_sync OR TG_OP = 'INSERT' THEN
        v_set := NEW.updated_at;
    ELSIF NEW.updated_at IS DISTINCT FROM OLD.updated_at THEN
        v_set := NEW.updated_at;
    END IF;
    -- (a time the zsync_updated_at_syncable CHECK refuses - infinity, year 9999 - is left to it)
    IF v_set > v_limit AND v_set < '9999-12-31 00:00:00+00' THEN
        RAISE EXCEPTION 'zsync: %.updated_at % (id %) is % ahead of the database clock; at most % is allowed',
            TG_TABLE_NAME, v_set, NEW.id, date_trunc('seconds', v_set - clock_timestamp()), v_skew
            USING ERRCODE = '22008', COLUMN = 'updated_at', TABLE = TG_TABLE_NAME,
                  HINT = 'set updated_at to now() or leave it unchanged (zsync.config max_future_skew_s)';
    END IF;
    IF v_sync THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'INSERT' THEN
        NEW.updated_at := coalesce(NEW.updated_at, clock_timestamp());
        SELECT date_trunc('milliseconds', t.version) + interval '1 millisecond' INTO v_floor
        FROM zsync.tombstones t WHERE t.table_name = TG_TABLE_NAME AND t.record_id = NEW.id
          AND t.version <= v_limit;  -- a tombstone from the future is no floor
        IF v_floor IS NOT NULL THEN
            NEW.updated_at := greatest(NEW.updated_at, v_floor);
        END IF;
    ELSIF to_jsonb(NEW) IS DISTINCT FROM to_jsonb(OLD) THEN
        IF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at OR NEW.updated_at IS NULL THEN
            NEW.updated_at := clock_timestamp();
        END IF;
        IF OLD.updated_at <= v_limit THEN  -- a version stored beyond the skew (before this rule) pins nothing
            NEW.updated_at := greatest(NEW.updated_at,
                                       date_trunc('milliseconds', OLD.updated_at) + interval '1 millisecond');
        END IF;
    END IF;
    RETURN NEW;
END
$$;

-- Called by the trigger function (SECURITY DEFINER, as the owner): no other role needs to execute it.
CREATE FUNCTION zsync.max_future_skew() RETURNS interval
    LANGUAGE sql STABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT make_interval(secs => coalesce((SELECT (c.value #>> '{}')::float8 FROM zsync.config c
                                           WHERE c.key = 'max_future_skew_s'), 300))
$$;

CREATE FUNCTION zsync.set_max_future_skew(p_seconds double precision) RETURNS void
    LANGUAGE sql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    INSERT INTO zsync.config (key, value, updated_at) VALUES ('max_future_skew_s', to_jsonb(p_seconds), now())
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at
    WHERE zsync.config.value IS DISTINCT FROM EXCLUDED.value
$$;

CREATE FUNCTION zsync.version_cmp(p_table regclass, a jsonb, b jsonb) RETURNS integer
    LANGUAGE plpgsql STABLE
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    va record;
    vb record;
BEGIN
    SELECT * INTO va FROM zsync.version_of(p_table, a);
    SELECT * INTO vb FROM zsync.version_of(p_table, b);
    IF va.ts = vb.ts AND va.hash = vb.hash THEN
        RETURN 0;
    ELSIF (va.ts, va.hash) > (vb.ts, vb.hash) THEN
        RETURN 1;
    END IF;
    RETURN -1;
END
$$;

-- 20261129700000's zsync.version_cmp_many, with a few pairs compared through zsync.version_cmp (same result;
-- one pair: ~0.2 ms instead of ~0.9 ms, most of it planning the generated statement).
CREATE FUNCTION zsync.version_cmp_many(p_table regclass, p_pairs jsonb) RETURNS TABLE(ord integer, cmp integer)
    LANGUAGE plpgsql STABLE
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    x record;
    y record;
BEGIN
    IF jsonb_typeof(p_pairs) = 'array'
       AND jsonb_array_length(p_pairs) <= coalesce(nullif(current_setting('zsync.small_batch', true), '')::integer, 4) THEN
        RETURN QUERY SELECT e.n::integer, zsync.version_cmp(p_table, e.pair -> 'a', e.pair -> 'b')
                     FROM jsonb_array_elements(p_pairs) WITH ORDINALITY AS e(pair, n) ORDER BY e.n;
        RETURN;
    END IF;
    SELECT * INTO x FROM zsync.version_exprs(p_table, 'x');
    SELECT * INTO y FROM zsync.version_exprs(p_table, 'y');
    RETURN QUERY EXECUTE format($q$
        WITH h AS (
            SELECT e.ord::integer AS ord, %2$s AS ta, %3$s AS ha, %4$s AS tb, %5$s AS hb
            FROM jsonb_array_elements($1) WITH ORDINALITY AS e(pair, ord),
                 LATERAL jsonb_populate_record(NULL::%1$s, e.pair -> 'a') x,
                 LATERAL jsonb_populate_record(NULL::%1$s, e.pair -> 'b') y)
        SELECT h.ord, CASE WHEN h.ta = h.tb AND h.ha = h.hb THEN 0
                           WHEN (h.ta, h.ha) > (h.tb, h.hb) THEN 1 ELSE -1 END
        FROM h ORDER BY h.ord
    $q$, p_table, x.ts_expr, x.hash_expr, y.ts_expr, y.hash_expr) USING p_pairs;
END
$_$;

-- As 20261129700000's zsync.version_exprs, with zsync.canonical_json of a jsonb object column written out in the
-- generated expression (same jsonb as zsync.canonical_json: its object branch, one level, inline).
CREATE FUNCTION zsync.version_exprs(p_table regclass, p_alias text, OUT ts_expr text, OUT hash_expr text) RETURNS record
    LANGUAGE plpgsql STABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    c     record;
    col   text;
    parts text[] := '{}';
    -- zsync.canonical_json($v) for an object, its first level in the query itself (no plpgsql call per row);
    -- anything else, and nested containers, through zsync.canonical_json.
    canon text := $c$CASE WHEN jsonb_typeof($v) <> 'object' THEN zsync.canonical_json($v) $c$
        || $c$WHEN NOT jsonb_path_exists($v, 'strict $.** ? (@.type() == "number")') THEN $v $c$
        || $c$ELSE coalesce((SELECT jsonb_object_agg(e.key, CASE jsonb_typeof(e.value) $c$
        || $c$WHEN 'number' THEN CASE WHEN e.value::numeric = 0 OR abs(e.value::numeric) BETWEEN 1e-300 AND 1e300 $c$
        || $c$THEN to_jsonb(e.value::numeric::float8) ELSE to_jsonb(trim_scale(e.value::numeric)) END $c$
        || $c$WHEN 'object' THEN zsync.canonical_json(e.value) WHEN 'array' THEN zsync.canonical_json(e.value) $c$
        || $c$ELSE e.value END) FROM jsonb_each($v) e), '{}'::jsonb) END$c$;
BEGIN
    ts_expr := 'date_trunc(''milliseconds'', timestamptz ''-infinity'')';
    FOR c IN SELECT a.attname::text AS name, a.atttypid AS typ, t.typcategory AS cat
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
             WHERE a.attrelid = p_table AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum LOOP
        col := format('%I.%I', p_alias, c.name);
        IF c.name = 'updated_at' THEN
            ts_expr := format('date_trunc(''milliseconds'', coalesce((%s)::timestamptz, ''-infinity''))', col);
            CONTINUE;
        END IF;
        IF c.typ = 'timestamptz'::regtype THEN
            parts := parts || format('CASE WHEN %1$s IS NULL THEN ''{}''::jsonb ELSE jsonb_build_object(%2$L, '
                                     'date_trunc(''milliseconds'', %1$s)) END', col, c.name);
        ELSIF c.typ = 'jsonb'::regtype THEN
            parts := parts || format('CASE WHEN %1$s IS NULL OR %1$s IN (''null''::jsonb, ''""''::jsonb) THEN ''{}''::jsonb '
                                     'ELSE jsonb_build_object(%2$L, %3$s) END', col, c.name,
                                     replace(canon, '$v', col));
        ELSIF c.typ IN ('text'::regtype, 'varchar'::regtype) THEN
            parts := parts || format('CASE WHEN %1$s IS NULL OR %1$s = '''' THEN ''{}''::jsonb '
                                     'ELSE jsonb_build_object(%2$L, %1$s) END', col, c.name);
        ELSIF c.cat IN ('N', 'B') THEN  -- numbers, booleans: only NULL is no value
            parts := parts || format('CASE WHEN %1$s IS NULL THEN ''{}''::jsonb ELSE jsonb_build_object(%2$L, %1$s) END',
                                     col, c.name);
        ELSE
            parts := parts || format('CASE WHEN %1$s IS NULL OR to_jsonb(%1$s) IN (''null''::jsonb, ''""''::jsonb, ''[]''::jsonb) '
                                     'THEN ''{}''::jsonb ELSE jsonb_build_object(%2$L, %1$s) END', col, c.name);
        END IF;
    END LOOP;
    hash_expr := format('md5((%s)::text)', array_to_string('{"''{}''::jsonb"}'::text[] || parts, ' || '));
END
$_$;

-- The version of a row of p_table given in any JSON shape Postgres can cast to the column types:
-- (updated_at at millisecond precision, md5 of the canonical content without updated_at).
CREATE FUNCTION zsync.version_of(p_table regclass, p_row jsonb, OUT ts timestamp with time zone, OUT hash text) RETURNS record
    LANGUAGE plpgsql STABLE
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    v jsonb;
BEGIN
    EXECUTE format('SELECT to_jsonb(x) FROM jsonb_populate_record(NULL::%s, $1) x', p_table) INTO v USING p_row;
    ts := date_trunc('milliseconds', coalesce((v ->> 'updated_at')::timestamptz, '-infinity'));
    hash := md5(zsync.canonical_row(p_table, v - 'updated_at')::text);
END
$_$;

-- The version of a row of p_table as (updated_at at millisecond precision, md5 of its canonical form
-- without updated_at), from p_row as to_jsonb of the row type (no cast needed: zsync.sync_apply's stored row).
CREATE FUNCTION zsync.version_of_typed(p_table regclass, p_row jsonb, OUT ts timestamp with time zone, OUT hash text) RETURNS record
    LANGUAGE plpgsql STABLE
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    ts := date_trunc('milliseconds', coalesce((p_row ->> 'updated_at')::timestamptz, '-infinity'));
    hash := md5(zsync.canonical_row(p_table, p_row - 'updated_at')::text);
END
$$;

CREATE TRIGGER zsync_maintain_updated_at BEFORE INSERT OR UPDATE ON public.agent_decisions FOR EACH ROW EXECUTE FUNCTION zsync.maintain_updated_at();

CREATE TRIGGER zsync_maintain_updated_at BEFORE INSERT OR UPDATE ON public.agent_jobs FOR EACH ROW EXECUTE FUNCTION zsync.maintain_updated_at();

CREATE TRIGGER zsync_maintain_updated_at BEFORE INSERT OR UPDATE ON public.rate_limits FOR EACH ROW EXECUTE FUNCTION zsync.maintain_updated_at();

-- 4. Deletes --------------------------------------------------------------------------------------
-- tombstones, deletes made in Zapier Tables and the trash check's watermarks

CREATE TABLE zsync.sync_trashed (
    table_name text NOT NULL,
    tables_record_id text NOT NULL,
    record_id text NOT NULL,
    trashed_at timestamp with time zone DEFAULT now() NOT NULL
);

CREATE TABLE zsync.tombstones (
    table_name text NOT NULL,
    record_id text NOT NULL,
    version timestamp with time zone NOT NULL,
    deleted_at timestamp with time zone DEFAULT now() NOT NULL,
    origin text NOT NULL
);

CREATE TABLE zsync.trash_watermarks (
    table_name text NOT NULL,
    watermark timestamp with time zone,
    checked_at timestamp with time zone NOT NULL,
    seen integer DEFAULT 0 NOT NULL,
    applied integer DEFAULT 0 NOT NULL
);

ALTER TABLE ONLY zsync.sync_trashed
    ADD CONSTRAINT sync_trashed_pkey PRIMARY KEY (table_name, tables_record_id);

ALTER TABLE ONLY zsync.tombstones
    ADD CONSTRAINT tombstones_pkey PRIMARY KEY (table_name, record_id);

ALTER TABLE ONLY zsync.trash_watermarks
    ADD CONSTRAINT trash_watermarks_pkey PRIMARY KEY (table_name);

CREATE INDEX sync_trashed_trashed_at_idx ON zsync.sync_trashed USING btree (trashed_at);

CREATE INDEX tombstones_deleted_at_idx ON zsync.tombstones USING btree (deleted_at);

-- The entry point for a delete made in Zapier Tables (the trash check calls it with the record's id and
-- Zapier's deleted_at): delete the Supabase row unless it holds a version newer than the delete, and
-- keep a tombstone either way (so the Tables copy's stale deliveries are not re-inserted).
-- Returns 'applied' (row deleted), 'unchanged' (already deleted / tombstoned) or 'skipped_stale'
-- (Supabase holds a newer version, which wins; the caller pushes it back to Tables).
CREATE FUNCTION zsync.apply_tables_delete(p_table regclass, p_record_id text, p_deleted_at timestamp with time zone) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    v_name   text := (SELECT relname FROM pg_class WHERE oid = p_table);
    v_stored jsonb;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = p_table AND tgname = 'zsync_tombstone') THEN
        RAISE EXCEPTION 'apply_tables_delete: % is not a two-way synced table', p_table USING ERRCODE = '22023';
    END IF;
    IF p_deleted_at IS NULL OR NOT isfinite(p_deleted_at) THEN
        RAISE EXCEPTION 'apply_tables_delete: deleted_at must be a finite timestamp' USING ERRCODE = '22023';
    END IF;
    PERFORM set_config('zsync.origin', 'sync', true);
    EXECUTE format('SELECT to_jsonb(t) FROM %s t WHERE t.id = $1 FOR UPDATE', p_table) INTO v_stored USING p_record_id;
    IF v_stored IS NULL THEN
        INSERT INTO zsync.tombstones (table_name, record_id, version, origin)
        VALUES (v_name, p_record_id, p_deleted_at, 'tables')
        ON CONFLICT (table_name, record_id) DO UPDATE SET version = greatest(zsync.tombstones.version, EXCLUDED.version);
        RETURN 'unchanged';
    END IF;
    IF date_trunc('milliseconds', (v_stored ->> 'updated_at')::timestamptz) > date_trunc('milliseconds', p_deleted_at) THEN
        RETURN 'skipped_stale';
    END IF;
    PERFORM set_config('zsync.delete_version', p_deleted_at::text, true);
    EXECUTE format('DELETE FROM %s t WHERE t.id = $1', p_table) USING p_record_id;
    PERFORM set_config('zsync.delete_version', '', true);
    RETURN 'applied';
END
$_$;

-- Tombstones whose delete both sides agree on (no unacknowledged outbox entry of the record) and that are
-- older than p_retention: removed, with the sync's trash notes of the same age. The retention outlives every
-- way a stale version can still arrive (the dead-letter queue keeps deliveries 14 days; Zapier's autoreplay
-- about 11 hours; an unacknowledged trigger-inbox message is dead-lettered after 5 leases). -> tombstones removed.
CREATE FUNCTION zsync.expire_tombstones(p_retention interval DEFAULT '30 days'::interval) RETURNS integer
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_n integer;
BEGIN
    IF p_retention IS NULL OR p_retention < interval '0' THEN
        RAISE EXCEPTION 'expire_tombstones: retention must be a non-negative interval' USING ERRCODE = '22023';
    END IF;
    DELETE FROM zsync.tombstones t
    WHERE t.deleted_at < now() - p_retention
      AND NOT EXISTS (SELECT 1 FROM zsync.outbox o
                      WHERE o.table_name = t.table_name AND o.record_id = t.record_id AND o.acked_at IS NULL);
    GET DIAGNOSTICS v_n = ROW_COUNT;
    DELETE FROM zsync.sync_trashed WHERE trashed_at < now() - p_retention;
    RETURN v_n;
END
$$;

-- Remember Tables records the sync moved to the trash itself. -> how many were new.
CREATE FUNCTION zsync.note_sync_trashed(p_table text, p_record_id text, p_tables_ids text[]) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_n integer;
BEGIN
    INSERT INTO zsync.sync_trashed (table_name, tables_record_id, record_id)
    SELECT p_table, t, p_record_id FROM unnest(p_tables_ids) t WHERE t IS NOT NULL
    ON CONFLICT (table_name, tables_record_id) DO NOTHING;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$$;

-- Of p_tables_ids (Zapier record ids of trashed records), those the sync trashed itself.
CREATE FUNCTION zsync.sync_trashed_ids(p_table text, p_tables_ids text[]) RETURNS SETOF text
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT s.tables_record_id FROM zsync.sync_trashed s
    WHERE s.table_name = p_table AND s.tables_record_id = ANY (p_tables_ids)
$$;

-- The tombstone of a record (version and origin), NULLs when it is not deleted.
CREATE FUNCTION zsync.tombstone_of(p_table text, p_record_id text, OUT version timestamp with time zone, OUT origin text) RETURNS record
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT t.version, t.origin FROM zsync.tombstones t WHERE t.table_name = p_table AND t.record_id = p_record_id
$$;

-- The tombstone of a record, if it is deleted (NULL otherwise).
CREATE FUNCTION zsync.tombstone_version(p_table text, p_record_id text) RETURNS timestamp with time zone
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT version FROM zsync.tombstones WHERE table_name = p_table AND record_id = p_record_id
$$;

-- --- deletes -------------------------------------------------------------------------------------------
-- A DELETE on a two-way table leaves a tombstone (its version: later than the deleted row's, by the
-- same hybrid-logical rule as zsync.maintain_updated_at), goes to the outbox, and reaches the
-- *_to_tables function as a DELETE webhook, which deletes the Tables copy. Re-inserting the id clears
-- the tombstone. A delete made by the sync (zsync.apply_tables_delete) carries Zapier's deleted_at.
CREATE FUNCTION zsync.track_tombstone() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_version timestamptz;
    v_origin  text := 'supabase';
BEGIN
    IF TG_OP = 'INSERT' THEN
        DELETE FROM zsync.tombstones WHERE table_name = TG_TABLE_NAME AND record_id = NEW.id;
        RETURN NEW;
    END IF;
    v_version := nullif(current_setting('zsync.delete_version', true), '')::timestamptz;
    IF v_version IS NOT NULL THEN
        v_origin := 'tables';
    ELSE
        v_version := greatest(clock_timestamp(), date_trunc('milliseconds', OLD.updated_at) + interval '1 millisecond');
    END IF;
    INSERT INTO zsync.tombstones (table_name, record_id, version, origin)
    VALUES (TG_TABLE_NAME, OLD.id, v_version, v_origin)
    ON CONFLICT (table_name, record_id) DO UPDATE
        SET version = greatest(zsync.tombstones.version, EXCLUDED.version), deleted_at = now(), origin = EXCLUDED.origin;
    RETURN OLD;
END
$$;

-- Record a complete check. The watermark never moves back (two checks may overlap).
CREATE FUNCTION zsync.trash_checked(p_table text, p_watermark timestamp with time zone, p_seen integer, p_applied integer) RETURNS void
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    INSERT INTO zsync.trash_watermarks (table_name, watermark, checked_at, seen, applied)
    VALUES (p_table, p_watermark, now(), p_seen, p_applied)
    ON CONFLICT (table_name) DO UPDATE
        SET watermark = CASE WHEN zsync.trash_watermarks.watermark IS NULL THEN EXCLUDED.watermark
                             WHEN EXCLUDED.watermark IS NULL THEN zsync.trash_watermarks.watermark
                             ELSE greatest(zsync.trash_watermarks.watermark, EXCLUDED.watermark) END,
            checked_at = EXCLUDED.checked_at, seen = EXCLUDED.seen, applied = EXCLUDED.applied
$$;

-- Of p_ids, those whose Supabase row was (re)inserted and has not reached Zapier Tables yet (an INSERT
-- still unacknowledged in the outbox): a trashed Tables record with such an id is a copy of an earlier
-- incarnation (e.g. the sync's own delete of it), never a delete of this row. The check skips them; the
-- overlap re-reads them on the next run.
CREATE FUNCTION zsync.trash_insert_pending(p_table text, p_ids text[]) RETURNS SETOF text
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT DISTINCT o.record_id FROM zsync.outbox o
    WHERE o.table_name = p_table AND o.record_id = ANY (p_ids) AND o.acked_at IS NULL AND o.op = 'INSERT'
$$;

CREATE FUNCTION zsync.trash_watermark(p_table text) RETURNS timestamp with time zone
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT watermark FROM zsync.trash_watermarks WHERE table_name = p_table
$$;

CREATE TRIGGER zsync_tombstone BEFORE INSERT OR DELETE ON public.agent_decisions FOR EACH ROW EXECUTE FUNCTION zsync.track_tombstone();

CREATE TRIGGER zsync_tombstone BEFORE INSERT OR DELETE ON public.agent_jobs FOR EACH ROW EXECUTE FUNCTION zsync.track_tombstone();

CREATE TRIGGER zsync_tombstone BEFORE INSERT OR DELETE ON public.rate_limits FOR EACH ROW EXECUTE FUNCTION zsync.track_tombstone();

-- 5. Applying changes -----------------------------------------------------------------------------
-- the atomic last-writer-wins upsert, one row and many, and enabling a table

CREATE FUNCTION zsync.enable_sync(p_table regclass) RETURNS void
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS zsync_maintain_updated_at ON %s', p_table);
    EXECUTE format('CREATE TRIGGER zsync_maintain_updated_at BEFORE INSERT OR UPDATE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION zsync.maintain_updated_at()', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS zsync_tombstone ON %s', p_table);
    EXECUTE format('CREATE TRIGGER zsync_tombstone BEFORE INSERT OR DELETE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION zsync.track_tombstone()', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS zsync_outbox ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS zsync_outbox_insert ON %s', p_table);
    EXECUTE format('CREATE TRIGGER zsync_outbox_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS zsync_new_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION zsync.capture_change()', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS zsync_outbox_update ON %s', p_table);
    EXECUTE format('CREATE TRIGGER zsync_outbox_update AFTER UPDATE ON %s REFERENCING NEW TABLE AS zsync_new_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION zsync.capture_change()', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS zsync_outbox_delete ON %s', p_table);
    EXECUTE format('CREATE TRIGGER zsync_outbox_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS zsync_old_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION zsync.capture_change()', p_table);
END
$$;

-- As 20261129810000's zsync.sync_apply; only the tombstone refusal changed (see the header).
CREATE FUNCTION zsync.sync_apply(p_table regclass, p_row jsonb, p_edited_at timestamp with time zone, OUT outcome text, OUT stored jsonb, OUT applied jsonb) RETURNS record
    LANGUAGE plpgsql
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    v_id   text := p_row->>'id';
    v_cols text;
    v_n    integer;
    v_tomb timestamptz;
    v_origin text;
    i_ts   timestamptz;
    i_hash text;
    s_ts   timestamptz;
    s_hash text;
BEGIN
    IF v_id IS NULL THEN
        RAISE EXCEPTION 'sync_upsert: row has no id' USING ERRCODE = '22023';
    END IF;
    PERFORM set_config('zsync.origin', 'sync', true);
    LOOP
        EXECUTE format('SELECT to_jsonb(t) FROM %s t WHERE t.id = $1 FOR UPDATE', p_table) INTO stored USING v_id;
        IF stored IS NULL THEN
            SELECT b.version, b.origin INTO v_tomb, v_origin
            FROM zsync.tombstone_of((SELECT relname::text FROM pg_class WHERE oid = p_table), v_id) b;
            IF v_tomb IS NOT NULL AND coalesce(current_setting('zsync.ignore_tombstones', true), '') <> 'on'
               AND (SELECT v.ts FROM zsync.version_of(p_table, p_row) v) <= v_tomb THEN
                IF v_origin = 'tables' AND p_edited_at IS NOT NULL
                   AND date_trunc('milliseconds', p_edited_at) > date_trunc('milliseconds', v_tomb) THEN
                    -- Changed in Tables after its delete there (restored from the trash, re-created): a new
                    -- change, versioned after the delete as a re-insert in Supabase is.
                    p_row := p_row || jsonb_build_object('updated_at', greatest(
                        date_trunc('milliseconds', p_edited_at), date_trunc('milliseconds', v_tomb) + interval '1 millisecond'));
                ELSE
                    outcome := 'deleted';
                    RETURN;
                END IF;
            END IF;
            EXECUTE format('INSERT INTO %1$s SELECT * FROM jsonb_populate_record(NULL::%1$s, $1) ON CONFLICT (id) DO NOTHING',
                           p_table) USING p_row;
            GET DIAGNOSTICS v_n = ROW_COUNT;
            IF v_n = 1 THEN
                outcome := 'applied';
                applied := p_row;
                RETURN;
            END IF;
            CONTINUE;  -- a concurrent insert won the race: lock that row and compare
        END IF;
        SELECT * INTO i_ts, i_hash FROM zsync.version_of(p_table, p_row);
        SELECT * INTO s_ts, s_hash FROM zsync.version_of_typed(p_table, stored);
        IF p_edited_at IS NOT NULL AND i_ts = s_ts AND i_hash <> s_hash
           AND date_trunc('milliseconds', p_edited_at) > i_ts THEN
            -- Edited in Tables after the version both sides share, without a new updated_at.
            i_ts := greatest(date_trunc('milliseconds', p_edited_at), s_ts + interval '1 millisecond');
            p_row := p_row || jsonb_build_object('updated_at', i_ts);
        END IF;
        IF i_ts = s_ts AND i_hash = s_hash THEN
            outcome := 'unchanged';
        ELSIF (i_ts, i_hash) > (s_ts, s_hash) THEN
            SELECT string_agg(format('%I', attname), ', ' ORDER BY attnum) INTO v_cols
            FROM pg_attribute
            WHERE attrelid = p_table AND attnum > 0 AND NOT attisdropped AND attgenerated = '' AND attname <> 'id';
            EXECUTE format('UPDATE %1$s t SET (%2$s) = (SELECT %2$s FROM jsonb_populate_record(NULL::%1$s, $1)) WHERE t.id = $2',
                           p_table, v_cols) USING p_row, v_id;
            outcome := 'applied';
            applied := p_row;
        ELSE
            outcome := 'skipped_stale';
        END IF;
        RETURN;
    END LOOP;
END
$_$;

-- As 20261129810000's zsync.sync_apply_many, without the lock step before the per-row calls of a small
-- batch: zsync.sync_apply locks (or inserts) each row in turn, in id order.
CREATE FUNCTION zsync.sync_apply_many(p_table regclass, p_rows jsonb) RETURNS TABLE(ord integer, record_id text, outcome text, stored jsonb, applied jsonb)
    LANGUAGE plpgsql
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_small integer := coalesce(nullif(current_setting('zsync.small_batch', true), '')::integer, 4);
    v_ids   text[];
    e       record;
    u       record;
BEGIN
    IF jsonb_typeof(p_rows) IS DISTINCT FROM 'array' OR jsonb_array_length(p_rows) > v_small THEN
        RETURN QUERY SELECT * FROM zsync.sync_apply_many_set(p_table, p_rows);
        RETURN;
    END IF;
    SELECT array_agg(x.value -> 'row' ->> 'id' ORDER BY x.value -> 'row' ->> 'id') INTO v_ids
    FROM jsonb_array_elements(p_rows) x;
    IF array_position(v_ids, NULL) IS NOT NULL OR cardinality(v_ids) <> (SELECT count(DISTINCT i) FROM unnest(v_ids) i) THEN
        RETURN QUERY SELECT * FROM zsync.sync_apply_many_set(p_table, p_rows);  -- no id (its error), duplicates
        RETURN;
    END IF;
    FOR e IN SELECT x.ord::integer AS ord, x.v -> 'row' AS row, (x.v ->> 'edited_at')::timestamptz AS edited_at
             FROM jsonb_array_elements(p_rows) WITH ORDINALITY AS x(v, ord) ORDER BY x.v -> 'row' ->> 'id' LOOP
        SELECT * INTO u FROM zsync.sync_apply(p_table, e.row, e.edited_at);
        ord := e.ord;
        record_id := e.row ->> 'id';
        outcome := u.outcome;
        stored := u.stored;
        applied := u.applied;
        RETURN NEXT;
    END LOOP;
END
$$;

CREATE FUNCTION zsync.sync_apply_many_set(p_table regclass, p_rows jsonb) RETURNS TABLE(ord integer, record_id text, outcome text, stored jsonb, applied jsonb)
    LANGUAGE plpgsql
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    v_name     text := (SELECT relname::text FROM pg_class WHERE oid = p_table);
    v_ignore   boolean := coalesce(current_setting('zsync.ignore_tombstones', true), '') = 'on';
    v_ids      text[];
    x          record;
    t          record;
    v_cols     text;
    v_inserted jsonb;
    v_locked   text[];
    v_try      integer := 0;
    v_lost     boolean;
    a_ord      integer[];
    a_id       text[];
    a_action   text[];
    a_stored   jsonb[];
    a_input    jsonb[];
    a_edited   timestamptz[];
    a_row      jsonb[];
    r_outcome  text[];
    r_stored   jsonb[];
    r_applied  jsonb[];
    i          integer;
    u          record;
BEGIN
    IF jsonb_typeof(p_rows) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'sync_apply_many: expected a JSON array of {"row", "edited_at"}' USING ERRCODE = '22023';
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(p_rows) e WHERE e.value -> 'row' ->> 'id' IS NULL) THEN
        RAISE EXCEPTION 'sync_apply_many: a row has no id' USING ERRCODE = '22023';
    END IF;
    IF jsonb_array_length(p_rows) = 0 THEN
        RETURN;
    END IF;
    PERFORM set_config('zsync.origin', 'sync', true);
    SELECT * INTO x FROM zsync.version_exprs(p_table, 'x');
    SELECT * INTO t FROM zsync.version_exprs(p_table, 't');
    v_ids := (SELECT array_agg(DISTINCT e.value -> 'row' ->> 'id') FROM jsonb_array_elements(p_rows) e);
    LOOP
        v_try := v_try + 1;
        BEGIN
            -- Lock first (id order); only rows locked here are compared set-based.
            EXECUTE format('SELECT coalesce(array_agg(l.id), ''{}'') FROM '
                           '(SELECT t.id FROM %s t WHERE t.id = ANY ($1) ORDER BY t.id FOR UPDATE) l', p_table)
                INTO v_locked USING v_ids;
            EXECUTE format($q$
                WITH inc AS (
                    SELECT e.ord::integer AS ord, e.v -> 'row' AS row, (e.v ->> 'edited_at')::timestamptz AS edited_at,
                           e.v -> 'row' ->> 'id' AS id, %2$s AS ts, %3$s AS hash
                    FROM jsonb_array_elements($1) WITH ORDINALITY AS e(v, ord),
                         LATERAL jsonb_populate_record(NULL::%1$s, e.v -> 'row') x),
                ranked AS (
                    SELECT inc.*, row_number() OVER (PARTITION BY inc.id ORDER BY inc.ts DESC, inc.hash DESC, inc.ord) AS rn
                    FROM inc),
                cur AS MATERIALIZED (
                    SELECT t.id, to_jsonb(t) AS stored, %4$s AS ts, %5$s AS hash
                    FROM %1$s t WHERE t.id = ANY ($4)),
                j AS (
                    SELECT r.*, c.stored, c.ts AS s_ts, c.hash AS s_hash,
                           CASE WHEN c.id IS NULL AND r.rn = 1 THEN zsync.tombstone_version($2, r.id) END AS tomb,
                           CASE WHEN c.id IS NOT NULL AND r.edited_at IS NOT NULL AND r.ts = c.ts AND r.hash <> c.hash
                                     AND date_trunc('milliseconds', r.edited_at) > r.ts
                                THEN greatest(date_trunc('milliseconds', r.edited_at), c.ts + interval '1 millisecond') END AS bumped
                    FROM ranked r LEFT JOIN cur c ON c.id = r.id AND r.rn = 1),
                d AS (
                    SELECT j.*,
                           CASE WHEN j.rn > 1 THEN 'later'
                                WHEN j.stored IS NULL THEN
                                    CASE WHEN j.tomb IS NOT NULL AND NOT $3 AND j.ts <= j.tomb THEN
                                             -- changed in Tables after the delete? zsync.sync_apply decides (origin)
                                             CASE WHEN j.edited_at IS NOT NULL
                                                       AND date_trunc('milliseconds', j.edited_at) > j.tomb
                                                  THEN 'later' ELSE 'deleted' END
                                         ELSE 'insert' END
                                WHEN coalesce(j.bumped, j.ts) = j.s_ts AND j.hash = j.s_hash THEN 'unchanged'
                                WHEN (coalesce(j.bumped, j.ts), j.hash) > (j.s_ts, j.s_hash) THEN 'update'
                                ELSE 'skipped_stale' END AS action
                    FROM j)
                SELECT array_agg(d.ord ORDER BY d.rn, d.ord), array_agg(d.id ORDER BY d.rn, d.ord),
                       array_agg(d.action ORDER BY d.rn, d.ord), array_agg(d.stored ORDER BY d.rn, d.ord),
                       array_agg(d.row ORDER BY d.rn, d.ord), array_agg(d.edited_at ORDER BY d.rn, d.ord),
                       array_agg(CASE WHEN d.bumped IS NULL THEN d.row ELSE d.row || jsonb_build_object('updated_at', d.bumped) END
                                 ORDER BY d.rn, d.ord)
                FROM d
            $q$, p_table, x.ts_expr, x.hash_expr, t.ts_expr, t.hash_expr)
                INTO a_ord, a_id, a_action, a_stored, a_input, a_edited, a_row USING p_rows, v_name, v_ignore, v_locked;

            -- In id order; waits only for a concurrent insert of the same id (which holds no lower id it
            -- inserted after this transaction's lock step: inserts run in id order too).
            EXECUTE format('WITH ins AS (INSERT INTO %1$s SELECT p.* FROM unnest($1, $2, $3) AS u(id, action, row), '
                           'LATERAL jsonb_populate_record(NULL::%1$s, u.row) p WHERE u.action = ''insert'' ORDER BY u.id '
                           'ON CONFLICT (id) DO NOTHING RETURNING id) SELECT coalesce(jsonb_object_agg(ins.id, true), ''{}'') FROM ins',
                           p_table)
                INTO v_inserted USING a_id, a_action, a_row;
            v_lost := EXISTS (SELECT 1 FROM unnest(a_id, a_action) AS l(id, action)
                              WHERE l.action = 'insert' AND NOT v_inserted ? l.id);
            IF v_lost AND v_try < 5 THEN
                -- Another transaction inserted one of these ids since the lock step: release what this
                -- attempt locked and inserted, and lock again (now that row too) in id order.
                RAISE EXCEPTION 'zsync: insert race' USING ERRCODE = 'ZS409';
            END IF;
        EXCEPTION WHEN SQLSTATE 'ZS409' THEN
            CONTINUE;
        END;
        EXIT;
    END LOOP;

    IF 'update' = ANY (a_action) THEN
        SELECT string_agg(format('%I', attname), ', ' ORDER BY attnum) INTO v_cols
        FROM pg_attribute
        WHERE attrelid = p_table AND attnum > 0 AND NOT attisdropped AND attgenerated = '' AND attname <> 'id';
        EXECUTE format('UPDATE %1$s t SET (%2$s) = (SELECT %2$s FROM jsonb_populate_record(NULL::%1$s, u.row)) '
                       'FROM (SELECT v.id, v.row FROM unnest($1, $2, $3) AS v(id, action, row) '
                       '      WHERE v.action = ''update'') u WHERE t.id = u.id', p_table, v_cols)
            USING a_id, a_action, a_row;
    END IF;

    -- The rows applied one by one (older versions of an id, and - after 5 lost races - lost inserts), in id
    -- order (each id's versions newest first, as in result order).
    r_outcome := array_fill(NULL::text, ARRAY[cardinality(a_ord)]);
    r_stored := array_fill(NULL::jsonb, ARRAY[cardinality(a_ord)]);
    r_applied := array_fill(NULL::jsonb, ARRAY[cardinality(a_ord)]);
    FOR i IN SELECT l.n FROM unnest(a_id, a_action) WITH ORDINALITY AS l(id, action, n)
             WHERE l.action = 'later' OR (l.action = 'insert' AND NOT v_inserted ? l.id)
             ORDER BY l.id, l.n LOOP
        SELECT * INTO u FROM zsync.sync_apply(p_table, a_input[i], a_edited[i]);
        r_outcome[i] := u.outcome;
        r_stored[i] := u.stored;
        r_applied[i] := u.applied;
    END LOOP;

    FOR i IN 1 .. cardinality(a_ord) LOOP
        ord := a_ord[i];
        record_id := a_id[i];
        stored := a_stored[i];
        applied := NULL;
        IF r_outcome[i] IS NOT NULL THEN
            outcome := r_outcome[i];
            stored := r_stored[i];
            applied := r_applied[i];
        ELSIF a_action[i] IN ('insert', 'update') THEN
            outcome := 'applied';
            applied := a_row[i];
        ELSE
            outcome := a_action[i];
        END IF;
        RETURN NEXT;
    END LOOP;
END
$_$;

CREATE FUNCTION zsync.sync_upsert(p_table regclass, p_row jsonb, OUT outcome text, OUT stored jsonb) RETURNS record
    LANGUAGE sql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT a.outcome, a.stored FROM zsync.sync_apply(p_table, p_row, NULL) a
$$;

-- 6. Audit ----------------------------------------------------------------------------------------
-- the append-only audit log's writers and guards

-- Insert an audit entry once: a redelivered entry (same id) is a no-op. Columns absent or null in
-- p_row take the table's defaults. Returns true if a row was inserted.
CREATE FUNCTION zsync.append_audit(p_row jsonb) RETURNS boolean
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    v_cols text;
    v_n    integer;
BEGIN
    SELECT string_agg(format('%I', a.attname), ', ' ORDER BY a.attnum) INTO v_cols
    FROM pg_attribute a
    WHERE a.attrelid = 'public.audit_log'::regclass AND a.attnum > 0 AND NOT a.attisdropped
      AND p_row ? a.attname AND jsonb_typeof(p_row -> a.attname) <> 'null';
    IF v_cols IS NULL THEN
        RAISE EXCEPTION 'append_audit: empty entry' USING ERRCODE = '22023';
    END IF;
    EXECUTE format('INSERT INTO public.audit_log (%1$s) SELECT %1$s FROM jsonb_populate_record(NULL::public.audit_log, $1) '
                   'ON CONFLICT (id) DO NOTHING', v_cols) USING p_row;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n = 1;
END
$_$;

-- As 20261129700000's zsync.append_audit_each, inserting in id order (two transactions appending the same
-- entries in different orders waited for each other's inserts); results in input order.
CREATE FUNCTION zsync.append_audit_each(p_entries jsonb) RETURNS TABLE(ord integer, inserted boolean)
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    e record;
    v_done boolean[] := '{}';
BEGIN
    FOR e IN SELECT x.ord::integer AS n, x.v FROM jsonb_array_elements(p_entries) WITH ORDINALITY AS x(v, ord)
             ORDER BY x.v ->> 'id', x.ord LOOP
        v_done[e.n] := zsync.append_audit(e.v);
    END LOOP;
    RETURN QUERY SELECT d.n::integer, d.ok FROM unnest(v_done) WITH ORDINALITY AS d(ok, n) ORDER BY d.n;
END
$$;

-- As 20261129800000's zsync.append_audit_many (same rows: a key that is absent or null takes the column's
-- default), in one statement in id order instead of one statement per set of keys in input order: two
-- transactions appending the same entries (a stable id: the same sync_failed entry of a payload two batches
-- rejected) waited for each other's inserts in their own orders.
CREATE FUNCTION zsync.append_audit_many(p_entries jsonb) RETURNS integer
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    v_cols text;
    v_vals text;
    v_n    integer;
BEGIN
    IF jsonb_typeof(p_entries) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'append_audit_many: expected a JSON array of audit_log rows' USING ERRCODE = '22023';
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(p_entries) x
               WHERE jsonb_typeof(x.value) IS DISTINCT FROM 'object'
                  OR NOT EXISTS (SELECT 1 FROM jsonb_each(x.value) j, pg_attribute a
                                 WHERE a.attrelid = 'public.audit_log'::regclass AND a.attnum > 0
                                   AND NOT a.attisdropped AND a.attname = j.key AND jsonb_typeof(j.value) <> 'null')) THEN
        RAISE EXCEPTION 'append_audit: empty entry' USING ERRCODE = '22023';
    END IF;
    SELECT string_agg(format('%I', a.attname), ', ' ORDER BY a.attnum),
           string_agg(CASE WHEN d.adbin IS NULL THEN format('r.%I', a.attname)
                           ELSE format('coalesce(r.%I, %s)', a.attname, pg_get_expr(d.adbin, d.adrelid)) END,
                      ', ' ORDER BY a.attnum)
    INTO v_cols, v_vals
    FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attrelid = 'public.audit_log'::regclass AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '';
    EXECUTE format('INSERT INTO public.audit_log (%s) SELECT %s FROM jsonb_populate_recordset(NULL::public.audit_log, $1) r '
                   'ORDER BY r.id ON CONFLICT (id) DO NOTHING', v_cols, v_vals) USING p_entries;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$_$;

-- audit_log is append-only: the database itself rejects UPDATE, DELETE and TRUNCATE.
CREATE FUNCTION zsync.reject_audit_change() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP USING ERRCODE = '42501';
END
$$;

CREATE TRIGGER zsync_audit_log_append_only BEFORE DELETE OR UPDATE ON public.audit_log FOR EACH ROW EXECUTE FUNCTION zsync.reject_audit_change();

CREATE TRIGGER zsync_audit_log_no_truncate BEFORE TRUNCATE ON public.audit_log FOR EACH STATEMENT EXECUTE FUNCTION zsync.reject_audit_change();

-- 7. Outbox and delivery --------------------------------------------------------------------------
-- every change captured in the same transaction, claimed, acknowledged, swept and announced to the *_to_tables functions through Database Webhooks

CREATE TABLE zsync.outbox (
    id bigint NOT NULL,
    table_name text NOT NULL,
    record_id text NOT NULL,
    op text NOT NULL,
    record_updated_at timestamp with time zone,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    last_sent_at timestamp with time zone,
    acked_at timestamp with time zone,
    ack_outcome text,
    failures integer DEFAULT 0 NOT NULL,
    last_error text,
    repair boolean DEFAULT false NOT NULL
)
WITH (autovacuum_analyze_scale_factor='0', autovacuum_analyze_threshold='2000', autovacuum_vacuum_scale_factor='0', autovacuum_vacuum_threshold='5000');

CREATE SEQUENCE zsync.outbox_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

CREATE TABLE zsync.sweeper_runs (
    id boolean DEFAULT true NOT NULL,
    last_at timestamp with time zone NOT NULL,
    sent integer NOT NULL,
    CONSTRAINT sweeper_runs_id_check CHECK (id)
);

CREATE TABLE zsync.webhook_endpoints (
    table_name text NOT NULL,
    url text NOT NULL,
    headers jsonb NOT NULL,
    timeout_ms integer DEFAULT 5000 NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL
);

ALTER SEQUENCE zsync.outbox_id_seq OWNED BY zsync.outbox.id;

ALTER TABLE ONLY zsync.outbox ALTER COLUMN id SET DEFAULT nextval('zsync.outbox_id_seq'::regclass);

ALTER TABLE ONLY zsync.outbox
    ADD CONSTRAINT outbox_pkey PRIMARY KEY (id);

ALTER TABLE ONLY zsync.sweeper_runs
    ADD CONSTRAINT sweeper_runs_pkey PRIMARY KEY (id);

ALTER TABLE ONLY zsync.webhook_endpoints
    ADD CONSTRAINT webhook_endpoints_pkey PRIMARY KEY (table_name);

CREATE INDEX outbox_pending_created_idx ON zsync.outbox USING btree (created_at) WHERE (acked_at IS NULL);

CREATE INDEX outbox_pending_record_idx ON zsync.outbox USING btree (table_name, record_id) WHERE (acked_at IS NULL);

CREATE INDEX outbox_pending_table_id_idx ON zsync.outbox USING btree (table_name, id) WHERE (acked_at IS NULL);

CREATE INDEX outbox_record_version_idx ON zsync.outbox USING btree (table_name, record_id, record_updated_at);

-- Called by *_to_tables once it has processed (applied, found unchanged, or skipped as stale) the
-- version p_updated_at of a record: every pending entry of that record up to that version is done.
CREATE FUNCTION zsync.ack_outbox(p_table text, p_record_id text, p_updated_at timestamp with time zone, p_outcome text) RETURNS integer
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    WITH done AS (
        UPDATE zsync.outbox SET acked_at = now(), ack_outcome = p_outcome
        WHERE table_name = p_table AND record_id = p_record_id AND acked_at IS NULL
          AND (record_updated_at IS NULL OR record_updated_at <= p_updated_at)
        RETURNING 1)
    SELECT count(*)::integer FROM done
$$;

CREATE FUNCTION zsync.ack_outbox_many(p_table text, p_acks jsonb) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET plan_cache_mode TO 'force_custom_plan'
    AS $$
DECLARE
    v_n integer;
BEGIN
    WITH todo AS (
        SELECT o.id, a.outcome
        FROM jsonb_to_recordset(p_acks) AS a(record_id text, updated_at timestamptz, outcome text)
        JOIN zsync.outbox o ON o.table_name = p_table AND o.record_id = a.record_id AND o.acked_at IS NULL
                           AND (o.record_updated_at IS NULL OR a.updated_at IS NULL OR o.record_updated_at <= a.updated_at)
        FOR UPDATE OF o SKIP LOCKED),
    done AS (
        UPDATE zsync.outbox o SET acked_at = now(), ack_outcome = todo.outcome
        FROM todo WHERE o.id = todo.id
        RETURNING 1)
    SELECT count(*)::integer INTO v_n FROM done;
    RETURN v_n;
END
$$;

-- zsync.ack_outbox for many records in one statement, with exactly its rule (unlike zsync.ack_outbox_many,
-- which skips entries another transaction holds): p_acks = [{"record_id", "updated_at", "outcome"}]; every
-- pending entry of a record up to that version is acknowledged (a null updated_at: only entries without a
-- version). -> how many entries were acknowledged.
CREATE FUNCTION zsync.ack_outbox_set(p_table text, p_acks jsonb) RETURNS integer
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    WITH a AS (
        SELECT DISTINCT ON (x.record_id) x.record_id, x.updated_at, x.outcome
        FROM jsonb_to_recordset(p_acks) AS x(record_id text, updated_at timestamptz, outcome text)
        ORDER BY x.record_id, x.updated_at DESC NULLS LAST),
    done AS (
        UPDATE zsync.outbox o SET acked_at = now(), ack_outcome = a.outcome
        FROM a
        WHERE o.table_name = p_table AND o.record_id = a.record_id AND o.acked_at IS NULL
          AND (o.record_updated_at IS NULL OR o.record_updated_at <= a.updated_at)
        RETURNING 1)
    SELECT count(*)::integer FROM done
$$;

-- The sweeper's and the repairs' re-send: a wake-up when there is something to deliver (the row, or its
-- tombstone); false when the row is gone without a tombstone or the table is not wired (same contract
-- as before: zsync.sweep_outbox acknowledges such an entry as row_deleted).
CREATE FUNCTION zsync.announce(p_table text, p_record_id text, p_op text DEFAULT 'UPDATE'::text) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    v_found boolean;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM zsync.webhook_endpoints WHERE table_name = p_table) THEN
        RETURN false;
    END IF;
    EXECUTE format('SELECT true FROM public.%I t WHERE t.id = $1', p_table) INTO v_found USING p_record_id;
    IF NOT coalesce(v_found, false)
       AND NOT EXISTS (SELECT 1 FROM zsync.tombstones WHERE table_name = p_table AND record_id = p_record_id) THEN
        RETURN false;
    END IF;
    RETURN zsync.wake(p_table);
END
$_$;

CREATE FUNCTION zsync.capture_change() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    IF TG_LEVEL = 'STATEMENT' THEN
        IF TG_OP = 'DELETE' THEN
            INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at)
            SELECT TG_TABLE_NAME, o.id, 'DELETE', t.version
            FROM zsync_old_rows o JOIN zsync.tombstones t ON t.table_name = TG_TABLE_NAME AND t.record_id = o.id;
        ELSE
            INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at)
            SELECT TG_TABLE_NAME, n.id, TG_OP, n.updated_at FROM zsync_new_rows n;
        END IF;
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at)
        SELECT TG_TABLE_NAME, OLD.id, 'DELETE', t.version
        FROM zsync.tombstones t WHERE t.table_name = TG_TABLE_NAME AND t.record_id = OLD.id;
        RETURN OLD;
    END IF;
    INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at)
    VALUES (TG_TABLE_NAME, NEW.id, TG_OP, NEW.updated_at);
    RETURN NEW;
END
$$;

-- zsync.claim_outbox and zsync.ack_outbox_many in plpgsql, same queries: a LANGUAGE sql function is parsed and
-- planned again on every call from another function, a plpgsql one keeps its parsed queries for the session.
-- plan_cache_mode = force_custom_plan: as the sql functions were, planned for the actual table name and
-- limit every call (a generic plan for "any table" may not pick the partial pending index).
CREATE FUNCTION zsync.claim_outbox(p_table text, p_limit integer DEFAULT 1000, p_exclude text[] DEFAULT '{}'::text[]) RETURNS TABLE(record_id text, changes integer, captured_at timestamp with time zone)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET plan_cache_mode TO 'force_custom_plan'
    AS $$
BEGIN
    RETURN QUERY
    WITH claimed AS (
        SELECT o.id, o.record_id, o.created_at FROM zsync.outbox o
        WHERE o.table_name = p_table AND o.acked_at IS NULL AND NOT (o.record_id = ANY (p_exclude))
        ORDER BY o.id
        LIMIT greatest(p_limit, 1)
        FOR UPDATE SKIP LOCKED)
    SELECT c.record_id, count(*)::integer, min(c.created_at)
    FROM claimed c GROUP BY c.record_id ORDER BY min(c.id);
END
$$;

-- zsync.claim_outbox, then a try-lock of each claimed record (the advisory lock the functions take:
-- hashtextextended('<table>:<id>', 0); never waits), then - in a later snapshot, after the locks - the
-- current row of each record locked here and, for a row that is gone, its tombstone.
-- -> (record id, entries, earliest capture time, locked here, row as to_jsonb | NULL, tombstone | NULL).
CREATE FUNCTION zsync.claim_outbox_rows(p_table text, p_limit integer DEFAULT 1000, p_exclude text[] DEFAULT '{}'::text[]) RETURNS TABLE(record_id text, changes integer, captured_at timestamp with time zone, locked boolean, current_row jsonb, tombstone timestamp with time zone)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET plan_cache_mode TO 'force_custom_plan'
    AS $_$
DECLARE
    v_ids    text[];
    v_counts integer[];
    v_caps   timestamptz[];
    v_locks  boolean[];
    v_rows   jsonb;
BEGIN
    IF to_regclass(format('public.%I', p_table)) IS NULL THEN
        RAISE EXCEPTION 'claim_outbox_rows: no table public.%', p_table USING ERRCODE = '22023';
    END IF;
    SELECT coalesce(array_agg(c.record_id ORDER BY c.n), '{}'), coalesce(array_agg(c.changes ORDER BY c.n), '{}'),
           coalesce(array_agg(c.captured_at ORDER BY c.n), '{}'),
           coalesce(array_agg(pg_try_advisory_xact_lock(hashtextextended(p_table || ':' || c.record_id, 0))
                              ORDER BY c.n), '{}')
    INTO v_ids, v_counts, v_caps, v_locks
    FROM zsync.claim_outbox(p_table, p_limit, p_exclude) WITH ORDINALITY AS c(record_id, changes, captured_at, n);
    IF cardinality(v_ids) = 0 THEN
        RETURN;
    END IF;
    EXECUTE format('SELECT coalesce(jsonb_object_agg(t.id, to_jsonb(t)), ''{}'') FROM public.%I t WHERE t.id = ANY ($1)',
                   p_table) INTO v_rows USING (SELECT array_agg(u.id) FROM unnest(v_ids, v_locks) AS u(id, locked) WHERE u.locked);
    RETURN QUERY
    SELECT u.id, u.changes, u.captured_at, u.locked, v_rows -> u.id,
           CASE WHEN u.locked AND NOT v_rows ? u.id THEN
               (SELECT b.version FROM zsync.tombstones b WHERE b.table_name = p_table AND b.record_id = u.id) END
    FROM unnest(v_ids, v_counts, v_caps, v_locks) WITH ORDINALITY AS u(id, changes, captured_at, locked, n)
    ORDER BY u.n;
END
$_$;

-- When the change a *_to_tables delivery carries was captured (the earliest unacknowledged outbox entry
-- of that record up to that version); NULL if none is pending (a re-send of an acknowledged change).
CREATE FUNCTION zsync.outbox_capture_time(p_table text, p_record_id text, p_updated_at timestamp with time zone) RETURNS timestamp with time zone
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT min(o.created_at) FROM zsync.outbox o
    WHERE o.table_name = p_table AND o.record_id = p_record_id AND o.acked_at IS NULL
      AND (o.record_updated_at IS NULL OR p_updated_at IS NULL OR o.record_updated_at <= p_updated_at)
$$;

CREATE FUNCTION zsync.outbox_claimable(p_table text, p_exclude text[] DEFAULT '{}'::text[]) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET plan_cache_mode TO 'force_custom_plan'
    AS $$
BEGIN
    PERFORM 1 FROM zsync.outbox o
    WHERE o.table_name = p_table AND o.acked_at IS NULL AND NOT (o.record_id = ANY (p_exclude))
    LIMIT 1 FOR UPDATE SKIP LOCKED;
    RETURN FOUND;
END
$$;

-- Called by *_to_tables when it rejects (400) a delivery of this record: every pending entry counts
-- one more failure; after p_max failures the entries are parked (acknowledged with outcome
-- 'dead_letter' and the reason), so the sweeper stops re-sending. Returns true if it parked entries.
CREATE FUNCTION zsync.outbox_failed(p_table text, p_record_id text, p_reason text, p_max integer DEFAULT 3) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_parked integer;
BEGIN
    UPDATE zsync.outbox SET failures = failures + 1, last_error = left(p_reason, 2000)
    WHERE table_name = p_table AND record_id = p_record_id AND acked_at IS NULL;
    WITH parked AS (
        UPDATE zsync.outbox SET acked_at = now(), ack_outcome = 'dead_letter'
        WHERE table_name = p_table AND record_id = p_record_id AND acked_at IS NULL AND failures >= p_max
        RETURNING 1)
    SELECT count(*) INTO v_parked FROM parked;
    RETURN v_parked > 0;
END
$$;

CREATE FUNCTION zsync.outbox_state(p_table text, p_record_id text, p_updated_at timestamp with time zone) RETURNS text
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT CASE
        WHEN EXISTS (SELECT 1 FROM zsync.outbox o
                     WHERE o.table_name = p_table AND o.record_id = p_record_id AND o.acked_at IS NULL
                       AND (o.record_updated_at IS NULL OR p_updated_at IS NULL OR o.record_updated_at <= p_updated_at))
            THEN 'pending'
        WHEN p_updated_at IS NOT NULL AND EXISTS (
                SELECT 1 FROM zsync.outbox o
                WHERE o.table_name = p_table AND o.record_id = p_record_id AND o.acked_at IS NOT NULL
                  AND o.ack_outcome IN ('applied', 'unchanged', 'skipped_stale') AND o.record_updated_at >= p_updated_at)
            THEN 'delivered'
        ELSE 'none' END
$$;

-- What a batch of the work queue records, in one call: its audit entries (zsync.append_audit_many), its
-- acks (zsync.ack_outbox_many), then whether this table still has a pending entry another claim could take
-- now (not in p_exclude, not held by another transaction): the drain claims again only then.
CREATE FUNCTION zsync.record_outbox_batch(p_table text, p_entries jsonb, p_acks jsonb, p_exclude text[] DEFAULT '{}'::text[], OUT inserted integer, OUT acked integer, OUT pending boolean) RETURNS record
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    inserted := CASE WHEN jsonb_array_length(p_entries) > 0 THEN zsync.append_audit_many(p_entries) ELSE 0 END;
    acked := CASE WHEN jsonb_array_length(p_acks) > 0 THEN zsync.ack_outbox_many(p_table, p_acks) ELSE 0 END;
    pending := zsync.outbox_claimable(p_table, p_exclude);
END
$$;

CREATE FUNCTION zsync.requeue(p_table text, p_record_id text, p_op text DEFAULT 'UPDATE'::text) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    v_version timestamptz;
    v_found   boolean := false;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM zsync.webhook_endpoints WHERE table_name = p_table) THEN
        RETURN false;
    END IF;
    EXECUTE format('SELECT t.updated_at, true FROM public.%I t WHERE t.id = $1', p_table)
        INTO v_version, v_found USING p_record_id;
    IF coalesce(v_found, false) THEN
        INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at, repair)
        VALUES (p_table, p_record_id, 'UPDATE', v_version, true);
    ELSE
        SELECT version INTO v_version FROM zsync.tombstones WHERE table_name = p_table AND record_id = p_record_id;
        IF v_version IS NULL THEN
            RETURN false;
        END IF;
        INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at, repair)
        VALUES (p_table, p_record_id, 'DELETE', v_version, true);
    END IF;
    RETURN zsync.announce(p_table, p_record_id, p_op);
END
$_$;

CREATE FUNCTION zsync.sweep_outbox(p_min_age interval DEFAULT '00:00:30'::interval, p_limit integer DEFAULT 200) RETURNS integer
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    r      record;
    v_sent integer := 0;
BEGIN
    DELETE FROM zsync.outbox WHERE acked_at < now() - interval '7 days';
    FOR r IN
        SELECT o.id, o.table_name, o.record_id, o.op
        FROM zsync.outbox o
        JOIN zsync.webhook_endpoints e USING (table_name)
        WHERE o.acked_at IS NULL
          AND coalesce(o.last_sent_at, o.created_at) < now() - p_min_age * power(2, least(o.attempts, 6))
          AND NOT EXISTS (SELECT 1 FROM zsync.outbox n
                          WHERE n.table_name = o.table_name AND n.record_id = o.record_id
                            AND n.acked_at IS NULL AND n.id > o.id)
        ORDER BY o.id
        LIMIT p_limit
        FOR UPDATE OF o SKIP LOCKED
    LOOP
        IF zsync.announce(r.table_name, r.record_id, r.op) THEN
            UPDATE zsync.outbox SET attempts = attempts + 1, last_sent_at = now() WHERE id = r.id;
            v_sent := v_sent + 1;
        ELSE  -- deleted since, without a tombstone: nothing to send
            UPDATE zsync.outbox SET acked_at = now(), ack_outcome = 'row_deleted' WHERE id = r.id;
        END IF;
    END LOOP;
    INSERT INTO zsync.sweeper_runs (id, last_at, sent) VALUES (true, now(), v_sent)
    ON CONFLICT (id) DO UPDATE SET last_at = EXCLUDED.last_at, sent = EXCLUDED.sent;
    RETURN v_sent;
END
$$;

-- One wake-up per table per transaction; false when the table is not wired.
CREATE FUNCTION zsync.wake(p_table text) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    e zsync.webhook_endpoints;
BEGIN
    SELECT * INTO e FROM zsync.webhook_endpoints WHERE table_name = p_table;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF current_setting('zsync.woken_' || p_table, true) = 'on' THEN
        RETURN true;  -- this transaction already queued one: the drain takes every entry it commits
    END IF;
    PERFORM net.http_post(
        e.url || CASE WHEN position('?' IN e.url) > 0 THEN '&' ELSE '?' END || 'zsync_wake=outbox',
        jsonb_build_object('zsync_wake', 'outbox', 'table', p_table),
        '{}'::jsonb, '{"Content-Type": "application/json"}'::jsonb, e.timeout_ms);
    PERFORM set_config('zsync.woken_' || p_table, 'on', true);
    RETURN true;
END
$$;

-- The Database Webhook trigger (AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW): a wake-up.
CREATE FUNCTION zsync.webhook_request() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    PERFORM zsync.wake(TG_TABLE_NAME);
    RETURN NULL;
END
$$;

CREATE VIEW zsync.outbox_backlog AS
 SELECT table_name,
    count(*) AS pending,
    min(created_at) AS oldest_pending_at,
    (EXTRACT(epoch FROM (now() - min(created_at))))::double precision AS oldest_age_s,
    count(*) FILTER (WHERE (created_at < (now() - '00:05:00'::interval))) AS older_than_5m,
    max(attempts) AS max_attempts
   FROM zsync.outbox
  WHERE (acked_at IS NULL)
  GROUP BY table_name;

CREATE TRIGGER zsync_outbox_delete AFTER DELETE ON public.agent_decisions REFERENCING OLD TABLE AS zsync_old_rows FOR EACH STATEMENT EXECUTE FUNCTION zsync.capture_change();

CREATE TRIGGER zsync_outbox_delete AFTER DELETE ON public.agent_jobs REFERENCING OLD TABLE AS zsync_old_rows FOR EACH STATEMENT EXECUTE FUNCTION zsync.capture_change();

CREATE TRIGGER zsync_outbox_delete AFTER DELETE ON public.rate_limits REFERENCING OLD TABLE AS zsync_old_rows FOR EACH STATEMENT EXECUTE FUNCTION zsync.capture_change();

CREATE TRIGGER zsync_outbox_insert AFTER INSERT ON public.agent_decisions REFERENCING NEW TABLE AS zsync_new_rows FOR EACH STATEMENT EXECUTE FUNCTION zsync.capture_change();

CREATE TRIGGER zsync_outbox_insert AFTER INSERT ON public.agent_jobs REFERENCING NEW TABLE AS zsync_new_rows FOR EACH STATEMENT EXECUTE FUNCTION zsync.capture_change();

CREATE TRIGGER zsync_outbox_insert AFTER INSERT ON public.rate_limits REFERENCING NEW TABLE AS zsync_new_rows FOR EACH STATEMENT EXECUTE FUNCTION zsync.capture_change();

CREATE TRIGGER zsync_outbox_update AFTER UPDATE ON public.agent_decisions REFERENCING NEW TABLE AS zsync_new_rows FOR EACH STATEMENT EXECUTE FUNCTION zsync.capture_change();

CREATE TRIGGER zsync_outbox_update AFTER UPDATE ON public.agent_jobs REFERENCING NEW TABLE AS zsync_new_rows FOR EACH STATEMENT EXECUTE FUNCTION zsync.capture_change();

CREATE TRIGGER zsync_outbox_update AFTER UPDATE ON public.rate_limits REFERENCING NEW TABLE AS zsync_new_rows FOR EACH STATEMENT EXECUTE FUNCTION zsync.capture_change();

-- 8. Metrics and alerts ---------------------------------------------------------------------------
-- what status, monitor and the alert check read

CREATE TABLE zsync.alert_state (
    alert text NOT NULL,
    is_open boolean DEFAULT false NOT NULL,
    opened_at timestamp with time zone,
    resolved_at timestamp with time zone,
    detail text,
    last_checked_at timestamp with time zone DEFAULT now() NOT NULL
);

ALTER TABLE ONLY zsync.alert_state
    ADD CONSTRAINT alert_state_pkey PRIMARY KEY (alert);

-- The figures the seed's alerts (and the backlog alerts) are evaluated on, over p_window.
CREATE FUNCTION zsync.sync_health(p_window interval DEFAULT '01:00:00'::interval) RETURNS TABLE(applied bigint, failed bigint, conflicts bigint, live_lag_avg_s double precision, live_lag_n bigint, repairs bigint, outbox_pending bigint, outbox_oldest_age_s double precision, outbox_older_than_5m bigint)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    WITH ev AS (SELECT * FROM zsync.sync_events WHERE at > now() - p_window),
         ob AS (SELECT count(*) AS pending, extract(epoch FROM now() - min(created_at))::double precision AS age,
                       count(*) FILTER (WHERE created_at < now() - interval '5 minutes') AS old
                FROM zsync.outbox WHERE acked_at IS NULL)
    SELECT count(*) FILTER (WHERE outcome = 'applied' AND origin <> 'reconcile'),
           count(*) FILTER (WHERE outcome IN ('rejected', 'failed')),
           count(*) FILTER (WHERE outcome = 'skipped_stale' AND origin = 'live'),
           avg(lag_s) FILTER (WHERE origin = 'live' AND lag_s IS NOT NULL),
           count(lag_s) FILTER (WHERE origin = 'live'),
           count(*) FILTER (WHERE origin <> 'live'),
           (SELECT pending FROM ob), (SELECT age FROM ob), (SELECT old FROM ob)
    FROM ev
$$;

-- Record which alerts fire now (p_firing: {"alert": "detail", ...}; p_known: every alert evaluated) and
-- return the transitions: 'opened' for a newly firing alert, 'resolved' for one that stopped. It takes a
-- transaction-level advisory lock, so concurrent checks serialise: the caller posts the transitions and
-- then commits (or rolls back when the post failed, so the next check posts them again).
CREATE FUNCTION zsync.transition_alerts(p_firing jsonb, p_known text[]) RETURNS TABLE(alert text, transition text, detail text)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    k text;
    s zsync.alert_state;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('zsync.transition_alerts'));
    FOREACH k IN ARRAY p_known LOOP
        SELECT * INTO s FROM zsync.alert_state a WHERE a.alert = k FOR UPDATE;
        IF p_firing ? k THEN
            IF s.alert IS NULL OR NOT s.is_open THEN
                INSERT INTO zsync.alert_state AS a (alert, is_open, opened_at, detail, last_checked_at)
                VALUES (k, true, now(), p_firing->>k, now())
                ON CONFLICT ON CONSTRAINT alert_state_pkey DO UPDATE
                SET is_open = true, opened_at = now(), detail = EXCLUDED.detail, last_checked_at = now();
                alert := k; transition := 'opened'; detail := p_firing->>k;
                RETURN NEXT;
            ELSE
                UPDATE zsync.alert_state a SET detail = p_firing->>k, last_checked_at = now() WHERE a.alert = k;
            END IF;
        ELSIF s.alert IS NOT NULL AND s.is_open THEN
            UPDATE zsync.alert_state a SET is_open = false, resolved_at = now(), last_checked_at = now()
            WHERE a.alert = k;
            alert := k; transition := 'resolved'; detail := s.detail;
            RETURN NEXT;
        ELSIF s.alert IS NOT NULL THEN
            UPDATE zsync.alert_state a SET last_checked_at = now() WHERE a.alert = k;
        END IF;
    END LOOP;
END
$$;

CREATE VIEW zsync.sync_events AS
 SELECT a."timestamp" AS at,
    regexp_replace((a.metadata ->> 'function'::text), '_to_(supabase|tables)$'::text, ''::text) AS table_name,
    (a.metadata ->> 'sync_direction'::text) AS direction,
    COALESCE((a.metadata ->> 'origin'::text), 'live'::text) AS origin,
        CASE
            WHEN (a.action = 'sync_failed'::text) THEN
            CASE
                WHEN (COALESCE(((a.metadata ->> 'status'::text))::integer, 500) < 500) THEN 'rejected'::text
                ELSE 'failed'::text
            END
            WHEN (a.action = 'sync_skipped_stale_data'::text) THEN 'skipped_stale'::text
            ELSE 'applied'::text
        END AS outcome,
        CASE
            WHEN (a.action ~~ '%\_synced'::text) THEN ((a.metadata ->> 'lag_seconds'::text))::double precision
            ELSE NULL::double precision
        END AS lag_s,
    a.resource_id AS record_id,
    (a.metadata -> 'problems'::text) AS problems
   FROM public.audit_log a
  WHERE ((a.actor_type = 'zapier_sync'::text) AND (a.metadata ? 'function'::text))
UNION ALL
 SELECT o.acked_at AS at,
    o.table_name,
    'supabase_to_tables'::text AS direction,
    'live'::text AS origin,
    'unchanged'::text AS outcome,
    NULL::double precision AS lag_s,
    o.record_id,
    NULL::jsonb AS problems
   FROM zsync.outbox o
  WHERE (o.ack_outcome = 'unchanged'::text);

CREATE VIEW zsync.sync_metrics_5m AS
 SELECT date_bin('00:05:00'::interval, at, '2000-01-01 00:00:00+00'::timestamp with time zone) AS bucket,
    table_name,
    direction,
    origin,
    count(*) FILTER (WHERE (outcome = 'applied'::text)) AS applied,
    count(*) FILTER (WHERE (outcome = 'unchanged'::text)) AS unchanged,
    count(*) FILTER (WHERE (outcome = 'skipped_stale'::text)) AS skipped_stale,
    count(*) FILTER (WHERE (outcome = 'rejected'::text)) AS rejected,
    count(*) FILTER (WHERE (outcome = 'failed'::text)) AS failed,
    count(*) FILTER (WHERE (outcome = 'skipped_stale'::text)) AS conflicts,
    percentile_cont((0.5)::double precision) WITHIN GROUP (ORDER BY lag_s) AS lag_p50_s,
    percentile_cont((0.95)::double precision) WITHIN GROUP (ORDER BY lag_s) AS lag_p95_s,
    max(lag_s) AS lag_max_s,
    avg(lag_s) AS lag_avg_s
   FROM zsync.sync_events
  GROUP BY (date_bin('00:05:00'::interval, at, '2000-01-01 00:00:00+00'::timestamp with time zone)), table_name, direction, origin;

CREATE VIEW zsync.sync_metrics_hourly AS
 SELECT date_trunc('hour'::text, at) AS bucket,
    table_name,
    direction,
    origin,
    count(*) FILTER (WHERE (outcome = 'applied'::text)) AS applied,
    count(*) FILTER (WHERE (outcome = 'unchanged'::text)) AS unchanged,
    count(*) FILTER (WHERE (outcome = 'skipped_stale'::text)) AS skipped_stale,
    count(*) FILTER (WHERE (outcome = 'rejected'::text)) AS rejected,
    count(*) FILTER (WHERE (outcome = 'failed'::text)) AS failed,
    count(*) FILTER (WHERE (outcome = 'skipped_stale'::text)) AS conflicts,
    percentile_cont((0.5)::double precision) WITHIN GROUP (ORDER BY lag_s) AS lag_p50_s,
    percentile_cont((0.95)::double precision) WITHIN GROUP (ORDER BY lag_s) AS lag_p95_s,
    max(lag_s) AS lag_max_s,
    avg(lag_s) AS lag_avg_s
   FROM zsync.sync_events
  GROUP BY (date_trunc('hour'::text, at)), table_name, direction, origin;

-- 9. Roles and grants -----------------------------------------------------------------------------
-- who may read, write and call what; nothing for PUBLIC, anon or authenticated

-- The API roles (Supabase's anon, authenticated, service_role) get the synced tables through Supabase's default
-- privileges in schema public, not from here; RLS (above) gives anon and authenticated no row, and what RLS does
-- not govern is taken back from them. Where those roles do not exist (a plain Postgres) nothing is granted.
DO $$
DECLARE
    t text;
    api text;
BEGIN
    FOREACH t IN ARRAY ARRAY['agent_jobs', 'agent_decisions', 'audit_log', 'rate_limits'] LOOP
        FOREACH api IN ARRAY ARRAY['anon', 'authenticated'] LOOP
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = api) THEN
                EXECUTE format('REVOKE TRUNCATE, TRIGGER, REFERENCES ON public.%I FROM %I', t, api);
            END IF;
        END LOOP;
    END LOOP;
END
$$;

-- No role that merely inherits PUBLIC creates objects in public; nothing in zsync is callable by PUBLIC.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO zsync_sync;
ALTER DEFAULT PRIVILEGES IN SCHEMA zsync REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'net') THEN
        GRANT USAGE ON SCHEMA net TO zsync_sync;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA zsync TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.ack_outbox(p_table text, p_record_id text, p_updated_at timestamp with time zone, p_outcome text) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.ack_outbox(p_table text, p_record_id text, p_updated_at timestamp with time zone, p_outcome text) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.ack_outbox_many(p_table text, p_acks jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.ack_outbox_many(p_table text, p_acks jsonb) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.ack_outbox_set(p_table text, p_acks jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.ack_outbox_set(p_table text, p_acks jsonb) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.announce(p_table text, p_record_id text, p_op text) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.announce(p_table text, p_record_id text, p_op text) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.append_audit(p_row jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.append_audit(p_row jsonb) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.append_audit_each(p_entries jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.append_audit_each(p_entries jsonb) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.append_audit_many(p_entries jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.append_audit_many(p_entries jsonb) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.apply_tables_delete(p_table regclass, p_record_id text, p_deleted_at timestamp with time zone) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.apply_tables_delete(p_table regclass, p_record_id text, p_deleted_at timestamp with time zone) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.canonical_json(v jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.canonical_json(v jsonb) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.canonical_row(p_table regclass, p_row jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.canonical_row(p_table regclass, p_row jsonb) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.capture_change() FROM PUBLIC;

REVOKE ALL ON FUNCTION zsync.claim_outbox(p_table text, p_limit integer, p_exclude text[]) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.claim_outbox(p_table text, p_limit integer, p_exclude text[]) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.claim_outbox_rows(p_table text, p_limit integer, p_exclude text[]) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.claim_outbox_rows(p_table text, p_limit integer, p_exclude text[]) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.content_hash(p_row jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.content_hash(p_row jsonb) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.enable_sync(p_table regclass) FROM PUBLIC;

REVOKE ALL ON FUNCTION zsync.expire_tombstones(p_retention interval) FROM PUBLIC;

REVOKE ALL ON FUNCTION zsync.maintain_updated_at() FROM PUBLIC;

REVOKE ALL ON FUNCTION zsync.max_future_skew() FROM PUBLIC;

REVOKE ALL ON FUNCTION zsync.note_sync_trashed(p_table text, p_record_id text, p_tables_ids text[]) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.note_sync_trashed(p_table text, p_record_id text, p_tables_ids text[]) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.outbox_capture_time(p_table text, p_record_id text, p_updated_at timestamp with time zone) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.outbox_capture_time(p_table text, p_record_id text, p_updated_at timestamp with time zone) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.outbox_claimable(p_table text, p_exclude text[]) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.outbox_claimable(p_table text, p_exclude text[]) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.outbox_failed(p_table text, p_record_id text, p_reason text, p_max integer) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.outbox_failed(p_table text, p_record_id text, p_reason text, p_max integer) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.outbox_state(p_table text, p_record_id text, p_updated_at timestamp with time zone) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.outbox_state(p_table text, p_record_id text, p_updated_at timestamp with time zone) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.record_outbox_batch(p_table text, p_entries jsonb, p_acks jsonb, p_exclude text[], OUT inserted integer, OUT acked integer, OUT pending boolean) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.record_outbox_batch(p_table text, p_entries jsonb, p_acks jsonb, p_exclude text[], OUT inserted integer, OUT acked integer, OUT pending boolean) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.reject_audit_change() FROM PUBLIC;

REVOKE ALL ON FUNCTION zsync.requeue(p_table text, p_record_id text, p_op text) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.requeue(p_table text, p_record_id text, p_op text) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.set_max_future_skew(p_seconds double precision) FROM PUBLIC;

REVOKE ALL ON FUNCTION zsync.sweep_outbox(p_min_age interval, p_limit integer) FROM PUBLIC;

REVOKE ALL ON FUNCTION zsync.sync_apply(p_table regclass, p_row jsonb, p_edited_at timestamp with time zone, OUT outcome text, OUT stored jsonb, OUT applied jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.sync_apply(p_table regclass, p_row jsonb, p_edited_at timestamp with time zone, OUT outcome text, OUT stored jsonb, OUT applied jsonb) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.sync_apply_many(p_table regclass, p_rows jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.sync_apply_many(p_table regclass, p_rows jsonb) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.sync_apply_many_set(p_table regclass, p_rows jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.sync_apply_many_set(p_table regclass, p_rows jsonb) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.sync_health(p_window interval) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.sync_health(p_window interval) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.sync_trashed_ids(p_table text, p_tables_ids text[]) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.sync_trashed_ids(p_table text, p_tables_ids text[]) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.sync_upsert(p_table regclass, p_row jsonb, OUT outcome text, OUT stored jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.sync_upsert(p_table regclass, p_row jsonb, OUT outcome text, OUT stored jsonb) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.tombstone_of(p_table text, p_record_id text, OUT version timestamp with time zone, OUT origin text) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.tombstone_of(p_table text, p_record_id text, OUT version timestamp with time zone, OUT origin text) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.tombstone_version(p_table text, p_record_id text) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.tombstone_version(p_table text, p_record_id text) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.track_tombstone() FROM PUBLIC;

REVOKE ALL ON FUNCTION zsync.transition_alerts(p_firing jsonb, p_known text[]) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.transition_alerts(p_firing jsonb, p_known text[]) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.trash_checked(p_table text, p_watermark timestamp with time zone, p_seen integer, p_applied integer) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.trash_checked(p_table text, p_watermark timestamp with time zone, p_seen integer, p_applied integer) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.trash_insert_pending(p_table text, p_ids text[]) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.trash_insert_pending(p_table text, p_ids text[]) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.trash_watermark(p_table text) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.trash_watermark(p_table text) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.version_cmp(p_table regclass, a jsonb, b jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.version_cmp(p_table regclass, a jsonb, b jsonb) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.version_cmp_many(p_table regclass, p_pairs jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.version_cmp_many(p_table regclass, p_pairs jsonb) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.version_exprs(p_table regclass, p_alias text, OUT ts_expr text, OUT hash_expr text) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.version_exprs(p_table regclass, p_alias text, OUT ts_expr text, OUT hash_expr text) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.version_of(p_table regclass, p_row jsonb, OUT ts timestamp with time zone, OUT hash text) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.version_of(p_table regclass, p_row jsonb, OUT ts timestamp with time zone, OUT hash text) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.version_of_typed(p_table regclass, p_row jsonb, OUT ts timestamp with time zone, OUT hash text) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.version_of_typed(p_table regclass, p_row jsonb, OUT ts timestamp with time zone, OUT hash text) TO zsync_sync;

REVOKE ALL ON FUNCTION zsync.wake(p_table text) FROM PUBLIC;

REVOKE ALL ON FUNCTION zsync.webhook_request() FROM PUBLIC;

GRANT SELECT ON TABLE zsync.schema_migrations TO zsync_sync;

GRANT SELECT,INSERT,UPDATE ON TABLE public.agent_decisions TO zsync_sync;

GRANT SELECT,INSERT,UPDATE ON TABLE public.agent_jobs TO zsync_sync;

GRANT SELECT,INSERT ON TABLE public.audit_log TO zsync_sync;

GRANT SELECT,INSERT,UPDATE ON TABLE public.rate_limits TO zsync_sync;

-- 10. Schedule --------------------------------------------------------------------------------------
-- Settings the database's own checks read (zsync migrate writes ZSYNC_MAX_FUTURE_SKEW_S over this default).
INSERT INTO zsync.config (key, value) VALUES ('max_future_skew_s', '300') ON CONFLICT (key) DO NOTHING;

-- Schedule: Supabase ships pg_cron; enable it here and sweep the outbox every 30 seconds. Where pg_cron is
-- not available (the local embedded Postgres) the local stack runs the sweep itself.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron')
       AND EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_cron') THEN
        BEGIN
            CREATE EXTENSION pg_cron;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'zsync: could not enable pg_cron (%); enable it in the dashboard '
                          '(Database > Extensions)', SQLERRM;
        END;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
        PERFORM cron.schedule('zsync-sweep-outbox', '30 seconds', 'SELECT zsync.sweep_outbox()');
        -- tombstones past their retention, once both sides agree (zsync.expire_tombstones)
        PERFORM cron.schedule('zsync-expire-tombstones', '17 * * * *', 'SELECT zsync.expire_tombstones()');
    END IF;
END
$$;
