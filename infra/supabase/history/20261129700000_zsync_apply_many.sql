-- zsync batches (issue 12), Tables -> Supabase: many deliveries of one table applied in one statement set
-- (a replay, a reconcile, an inbox lease), under exactly the rule of zsync.sync_apply.
--
-- * zsync.version_exprs: the version of a row of a table - (updated_at at millisecond precision, md5 of the
--   canonical content without updated_at), the same values as zsync.version_of - as SQL expressions over a
--   record alias, generated once per statement from the table's columns. No per-row plpgsql loop or
--   EXECUTE: a batch of 1,000 rows is versioned by one plain query.
-- * zsync.sync_apply_many: one multi-row conditional upsert.

-- SQL expressions for the version of a row of p_table held in a record variable p_alias (a table alias or
-- a jsonb_populate_record result): ts_expr = zsync.version_of(...).ts, hash_expr = zsync.version_of(...).hash.
-- Canonical content as zsync.canonical_row: null, an empty text and (outside jsonb columns) an empty array
-- are no value; timestamptz at millisecond precision; jsonb through zsync.canonical_json. jsonb keeps object
-- keys in one order whatever order they are added in, so the concatenation below is the same jsonb value.
CREATE OR REPLACE FUNCTION zsync.version_exprs(p_table regclass, p_alias text, OUT ts_expr text, OUT hash_expr text)
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    c     record;
    col   text;
    parts text[] := '{}';
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
                                     'ELSE jsonb_build_object(%2$L, zsync.canonical_json(%1$s)) END', col, c.name);
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
$$;

-- Apply many rows of p_table, each as zsync.sync_apply(p_table, row, edited_at) would, in one call:
-- p_rows = [{"row": {...}, "edited_at": timestamptz | null}, ...] -> one (ord 1-based, record_id, outcome,
-- stored, applied) per element, outcome/stored/applied as zsync.sync_apply's.
-- * The stored rows of the batch are locked in id order first (concurrent batches lock in the same order;
--   a single apply holds one row), new rows are inserted in id order.
-- * One id several times in a batch: its newest version (updated_at, hash) is applied set-based, the others
--   then one by one through zsync.sync_apply (as if delivered after it: unchanged or skipped_stale).
-- * An insert that lost a race with a concurrent insert goes through zsync.sync_apply too (it compares).
CREATE OR REPLACE FUNCTION zsync.sync_apply_many(p_table regclass, p_rows jsonb)
RETURNS TABLE (ord integer, record_id text, outcome text, stored jsonb, applied jsonb)
LANGUAGE plpgsql
SET timezone TO 'UTC'
AS $$
DECLARE
    v_name     text := (SELECT relname::text FROM pg_class WHERE oid = p_table);
    v_ignore   boolean := coalesce(current_setting('zsync.ignore_tombstones', true), '') = 'on';
    x          record;
    t          record;
    v_cols     text;
    v_decided  jsonb;
    v_inserted text[];
    v_locked   text[];
    d          jsonb;
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
    -- Lock first (id order); only rows locked here are compared set-based. A row inserted concurrently after
    -- this makes the insert below conflict, and that element goes through zsync.sync_apply.
    EXECUTE format('SELECT coalesce(array_agg(l.id), ''{}'') FROM '
                   '(SELECT t.id FROM %s t WHERE t.id = ANY ($1) ORDER BY t.id FOR UPDATE) l', p_table)
        INTO v_locked USING (SELECT array_agg(DISTINCT e.value -> 'row' ->> 'id') FROM jsonb_array_elements(p_rows) e);
    EXECUTE format($q$
        WITH inc AS (
            SELECT e.ord::integer AS ord, e.v -> 'row' AS row, (e.v ->> 'edited_at')::timestamptz AS edited_at,
                   e.v -> 'row' ->> 'id' AS id, %2$s AS ts, %3$s AS hash
            FROM jsonb_array_elements($1) WITH ORDINALITY AS e(v, ord),
                 LATERAL jsonb_populate_record(NULL::%1$s, e.v -> 'row') x),
        ranked AS (
            SELECT inc.*, row_number() OVER (PARTITION BY inc.id ORDER BY inc.ts DESC, inc.hash DESC, inc.ord) AS rn
            FROM inc),
        cur AS (
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
            SELECT j.*, coalesce(j.bumped, j.ts) AS v_ts,
                   CASE WHEN j.rn > 1 THEN 'later'
                        WHEN j.stored IS NULL THEN
                            CASE WHEN j.tomb IS NOT NULL AND NOT $3 AND j.ts <= j.tomb THEN 'deleted' ELSE 'insert' END
                        WHEN coalesce(j.bumped, j.ts) = j.s_ts AND j.hash = j.s_hash THEN 'unchanged'
                        WHEN (coalesce(j.bumped, j.ts), j.hash) > (j.s_ts, j.s_hash) THEN 'update'
                        ELSE 'skipped_stale' END AS action
            FROM j)
        SELECT jsonb_agg(jsonb_build_object(
                   'ord', d.ord, 'id', d.id, 'rn', d.rn, 'action', d.action, 'stored', d.stored,
                   'input', d.row, 'edited_at', d.edited_at,
                   'row', CASE WHEN d.bumped IS NULL THEN d.row ELSE d.row || jsonb_build_object('updated_at', d.bumped) END))
        FROM d
    $q$, p_table, x.ts_expr, x.hash_expr, t.ts_expr, t.hash_expr) INTO v_decided USING p_rows, v_name, v_ignore, v_locked;

    EXECUTE format('WITH ins AS (INSERT INTO %1$s SELECT * FROM jsonb_populate_recordset(NULL::%1$s, $1) '
                   'ON CONFLICT (id) DO NOTHING RETURNING id) SELECT coalesce(array_agg(ins.id), ''{}'') FROM ins', p_table)
        INTO v_inserted
        USING (SELECT coalesce(jsonb_agg(e -> 'row' ORDER BY e ->> 'id'), '[]'::jsonb)
               FROM jsonb_array_elements(v_decided) e WHERE e ->> 'action' = 'insert');

    IF EXISTS (SELECT 1 FROM jsonb_array_elements(v_decided) e WHERE e ->> 'action' = 'update') THEN
        SELECT string_agg(format('%I', attname), ', ' ORDER BY attnum) INTO v_cols
        FROM pg_attribute
        WHERE attrelid = p_table AND attnum > 0 AND NOT attisdropped AND attgenerated = '' AND attname <> 'id';
        EXECUTE format('UPDATE %1$s t SET (%2$s) = (SELECT %2$s FROM jsonb_populate_record(NULL::%1$s, u.row)) '
                       'FROM (SELECT e ->> ''id'' AS id, e -> ''row'' AS row FROM jsonb_array_elements($1) e '
                       '      WHERE e ->> ''action'' = ''update'') u WHERE t.id = u.id', p_table, v_cols)
            USING v_decided;
    END IF;

    FOR d IN SELECT e FROM jsonb_array_elements(v_decided) e
             ORDER BY (e ->> 'rn')::integer, (e ->> 'ord')::integer LOOP
        ord := (d ->> 'ord')::integer;
        record_id := d ->> 'id';
        stored := nullif(d -> 'stored', 'null'::jsonb);
        applied := NULL;
        IF d ->> 'action' = 'later' OR (d ->> 'action' = 'insert' AND NOT (d ->> 'id' = ANY (v_inserted))) THEN
            SELECT * INTO u FROM zsync.sync_apply(p_table, d -> 'input', (d ->> 'edited_at')::timestamptz);
            outcome := u.outcome;
            stored := u.stored;
            applied := u.applied;
        ELSIF d ->> 'action' IN ('insert', 'update') THEN
            outcome := 'applied';
            applied := d -> 'row';
        ELSE
            outcome := d ->> 'action';
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;

-- zsync.version_cmp_many on the generated version expressions (same result, no per-row loop).
CREATE OR REPLACE FUNCTION zsync.version_cmp_many(p_table regclass, p_pairs jsonb)
RETURNS TABLE (ord integer, cmp integer)
LANGUAGE plpgsql STABLE
SET timezone TO 'UTC'
AS $$
DECLARE
    x record;
    y record;
BEGIN
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

-- Which of p_entries (audit_log rows) were inserted: zsync.append_audit each, in order, one call.
CREATE OR REPLACE FUNCTION zsync.append_audit_each(p_entries jsonb)
RETURNS TABLE (ord integer, inserted boolean)
LANGUAGE sql VOLATILE
AS $$
    SELECT e.ord::integer, zsync.append_audit(e.v) FROM jsonb_array_elements(p_entries) WITH ORDINALITY AS e(v, ord)
    ORDER BY e.ord
$$;

REVOKE EXECUTE ON FUNCTION zsync.version_exprs(regclass, text), zsync.sync_apply_many(regclass, jsonb),
    zsync.append_audit_each(jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION zsync.version_exprs(regclass, text), zsync.sync_apply_many(regclass, jsonb),
    zsync.append_audit_each(jsonb) TO zsync_sync;
