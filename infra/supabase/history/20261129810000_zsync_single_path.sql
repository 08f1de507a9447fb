-- zsync single-record path (issue 12, performance): one delivery costs fewer statements and no per-column
-- plpgsql loop. Same values and semantics as before (tests/test_properties.py compares the single and
-- batch paths; tests/test_apply_many.py compares them delivery by delivery).
--
-- * zsync.canonical_row: one SQL query over the table's columns instead of a plpgsql loop (same jsonb).
--   zsync.version_of and zsync.version_cmp use it as they are (one cheap dynamic cast per row). The generated
--   expressions of zsync.version_exprs are NOT used for one row: planning them costs more (~0.2 ms) than the
--   loop they replace; they pay off over a batch.
-- * zsync.sync_apply: the incoming and stored versions computed once each (it computed them up to four
--   times through version_of/version_cmp, each a dynamic statement), and only when there is a stored row.
-- * zsync.claim_outbox, zsync.ack_outbox_many: the same queries in plpgsql (a sql function called from
--   another function is planned again on every call; plpgsql keeps its plans for the session).
-- * zsync.claim_outbox_rows: the *_to_tables work queue's claim, per-record lock and row read in one call
--   (they were 2 + one lock statement per claimed record).
-- * zsync.record_outbox_batch: a batch's audit entries, acks and "anything left to claim?" in one call
--   (the last one saved a whole second transaction per wake-up).
-- * zsync.sync_apply_many: a batch of a few rows (a trigger-inbox lease of one message) through
--   zsync.sync_apply, not the multi-row statement whose planning alone costs ~1.5 ms.
-- * zsync.version_cmp_many: a few pairs through zsync.version_cmp, likewise.
-- * zsync.sync_upsert_many (20251222100300) is dropped: nothing calls it since zsync.sync_apply_many.

-- plpgsql (not sql) so the query's plan is cached for the session: a SQL function called from plpgsql is
-- planned again on every call.
CREATE OR REPLACE FUNCTION zsync.canonical_row(p_table regclass, p_row jsonb)
RETURNS jsonb LANGUAGE plpgsql STABLE
SET timezone TO 'UTC'
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

-- A JSON value without numbers is its own canonical form (only numbers are rewritten): skip the walk.
CREATE OR REPLACE FUNCTION zsync.canonical_json(v jsonb)
RETURNS jsonb LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
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
            RETURN coalesce((SELECT jsonb_object_agg(key, zsync.canonical_json(value)) FROM jsonb_each(v)), '{}'::jsonb);
        WHEN 'array' THEN
            IF NOT jsonb_path_exists(v, 'strict $.** ? (@.type() == "number")') THEN
                RETURN v;
            END IF;
            RETURN coalesce((SELECT jsonb_agg(zsync.canonical_json(e.value) ORDER BY e.ord)
                             FROM jsonb_array_elements(v) WITH ORDINALITY AS e(value, ord)), '[]'::jsonb);
        ELSE
            RETURN v;
    END CASE;
END
$$;

-- The version of a row of p_table as (updated_at at millisecond precision, md5 of its canonical form
-- without updated_at), from p_row as to_jsonb of the row type (no cast needed: zsync.sync_apply's stored row).
CREATE OR REPLACE FUNCTION zsync.version_of_typed(p_table regclass, p_row jsonb, OUT ts timestamptz, OUT hash text)
LANGUAGE plpgsql STABLE
SET timezone TO 'UTC'
AS $$
BEGIN
    ts := date_trunc('milliseconds', coalesce((p_row ->> 'updated_at')::timestamptz, '-infinity'));
    hash := md5(zsync.canonical_row(p_table, p_row - 'updated_at')::text);
END
$$;

-- As 20261129100000's zsync.sync_apply (same outcomes, same rows), computing each version once.
CREATE OR REPLACE FUNCTION zsync.sync_apply(p_table regclass, p_row jsonb, p_edited_at timestamptz,
                                            OUT outcome text, OUT stored jsonb, OUT applied jsonb)
LANGUAGE plpgsql
SET timezone TO 'UTC'
AS $$
DECLARE
    v_id   text := p_row->>'id';
    v_cols text;
    v_n    integer;
    v_tomb timestamptz;
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
            v_tomb := zsync.tombstone_version((SELECT relname::text FROM pg_class WHERE oid = p_table), v_id);
            IF v_tomb IS NOT NULL AND coalesce(current_setting('zsync.ignore_tombstones', true), '') <> 'on'
               AND (SELECT v.ts FROM zsync.version_of(p_table, p_row) v) <= v_tomb THEN
                outcome := 'deleted';
                RETURN;
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
$$;

-- zsync.claim_outbox and zsync.ack_outbox_many in plpgsql, same queries: a LANGUAGE sql function is parsed and
-- planned again on every call from another function, a plpgsql one keeps its parsed queries for the session.
-- plan_cache_mode = force_custom_plan: as the sql functions were, planned for the actual table name and
-- limit every call (a generic plan for "any table" may not pick the partial pending index).
CREATE OR REPLACE FUNCTION zsync.claim_outbox(p_table text, p_limit integer DEFAULT 1000,
                                              p_exclude text[] DEFAULT '{}')
RETURNS TABLE (record_id text, changes integer, captured_at timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_custom_plan
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

CREATE OR REPLACE FUNCTION zsync.ack_outbox_many(p_table text, p_acks jsonb)
RETURNS integer LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_custom_plan
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

-- zsync.claim_outbox, then a try-lock of each claimed record (the advisory lock the functions take:
-- hashtextextended('<table>:<id>', 0); never waits), then - in a later snapshot, after the locks - the
-- current row of each record locked here and, for a row that is gone, its tombstone.
-- -> (record id, entries, earliest capture time, locked here, row as to_jsonb | NULL, tombstone | NULL).
CREATE OR REPLACE FUNCTION zsync.claim_outbox_rows(p_table text, p_limit integer DEFAULT 1000,
                                                   p_exclude text[] DEFAULT '{}')
RETURNS TABLE (record_id text, changes integer, captured_at timestamptz, locked boolean, current_row jsonb,
               tombstone timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_custom_plan
AS $$
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
$$;

-- What a batch of the work queue records, in one call: its audit entries (zsync.append_audit_many), its
-- acks (zsync.ack_outbox_many), then whether this table still has a pending entry another claim could take
-- now (not in p_exclude, not held by another transaction): the drain claims again only then.
CREATE OR REPLACE FUNCTION zsync.record_outbox_batch(p_table text, p_entries jsonb, p_acks jsonb,
                                                     p_exclude text[] DEFAULT '{}',
                                                     OUT inserted integer, OUT acked integer, OUT pending boolean)
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    inserted := CASE WHEN jsonb_array_length(p_entries) > 0 THEN zsync.append_audit_many(p_entries) ELSE 0 END;
    acked := CASE WHEN jsonb_array_length(p_acks) > 0 THEN zsync.ack_outbox_many(p_table, p_acks) ELSE 0 END;
    pending := zsync.outbox_claimable(p_table, p_exclude);
END
$$;

CREATE OR REPLACE FUNCTION zsync.outbox_claimable(p_table text, p_exclude text[] DEFAULT '{}')
RETURNS boolean LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_custom_plan
AS $$
BEGIN
    PERFORM 1 FROM zsync.outbox o
    WHERE o.table_name = p_table AND o.acked_at IS NULL AND NOT (o.record_id = ANY (p_exclude))
    LIMIT 1 FOR UPDATE SKIP LOCKED;
    RETURN FOUND;
END
$$;

-- zsync.sync_apply_many for a few rows: planning its generated multi-row statement costs ~1.5 ms, about what
-- 8 zsync.sync_apply calls cost, and a trigger-inbox lease usually holds one message. So a batch of at most
-- zsync.small_batch rows (4 unless set; tests set 0 to exercise the multi-row statement) with distinct ids
-- goes through zsync.sync_apply per row: existing rows locked in id order first, then each row applied in id
-- order (new rows inserted in id order), as the multi-row statement does. Anything else: the multi-row
-- statement (20261129700000's zsync.sync_apply_many, now zsync.sync_apply_many_set).
DO $$
BEGIN
    IF to_regprocedure('zsync.sync_apply_many_set(regclass, jsonb)') IS NULL THEN  -- re-runnable
        ALTER FUNCTION zsync.sync_apply_many(regclass, jsonb) RENAME TO sync_apply_many_set;  -- same body, new name
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION zsync.sync_apply_many(p_table regclass, p_rows jsonb)
RETURNS TABLE (ord integer, record_id text, outcome text, stored jsonb, applied jsonb)
LANGUAGE plpgsql
SET timezone TO 'UTC'
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
    IF cardinality(v_ids) > 1 THEN
        EXECUTE format('SELECT count(*) FROM (SELECT 1 FROM %s t WHERE t.id = ANY ($1) ORDER BY t.id FOR UPDATE) l', p_table)
            USING v_ids;
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

-- 20261129700000's zsync.version_cmp_many, with a few pairs compared through zsync.version_cmp (same result;
-- one pair: ~0.2 ms instead of ~0.9 ms, most of it planning the generated statement).
CREATE OR REPLACE FUNCTION zsync.version_cmp_many(p_table regclass, p_pairs jsonb)
RETURNS TABLE (ord integer, cmp integer)
LANGUAGE plpgsql STABLE
SET timezone TO 'UTC'
AS $$
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
$$;

DROP FUNCTION IF EXISTS zsync.sync_upsert_many(regclass, jsonb);

REVOKE EXECUTE ON FUNCTION zsync.claim_outbox_rows(text, integer, text[]), zsync.sync_apply_many_set(regclass, jsonb),
    zsync.sync_apply_many(regclass, jsonb), zsync.record_outbox_batch(text, jsonb, jsonb, text[]), zsync.outbox_claimable(text, text[]),
    zsync.version_of_typed(regclass, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION zsync.claim_outbox_rows(text, integer, text[]), zsync.sync_apply_many_set(regclass, jsonb),
    zsync.sync_apply_many(regclass, jsonb), zsync.record_outbox_batch(text, jsonb, jsonb, text[]), zsync.outbox_claimable(text, text[]),
    zsync.version_of_typed(regclass, jsonb) TO zsync_sync;
