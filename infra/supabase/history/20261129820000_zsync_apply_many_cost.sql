-- zsync batch apply cost (issue 12, performance): what zsync.sync_apply_many spends per row that is ours,
-- same values and semantics (bench/apply_many.py measures it next to a raw upsert of the same rows).
--
-- * zsync.capture_change at statement level: one INSERT INTO zsync.outbox ... SELECT FROM the statement's
--   transition table instead of one plpgsql call and one INSERT per changed row (~15 us a row, a sixth of a
--   1,000-row batch apply). Same entries (table, record id, op, the row's updated_at / the tombstone's
--   version for a DELETE), same created_at (now()), written at the same point (the end of the statement, as
--   AFTER ROW triggers are), in the order the rows were changed. Transition tables allow one event per
--   trigger: zsync_outbox_insert / _update / _delete replace zsync_outbox. The row-level form still works.
-- * zsync.canonical_json: numbers directly inside an object or array are canonicalised in the same query
--   (no nested plpgsql call per number); nested containers still recurse. Same jsonb.

CREATE OR REPLACE FUNCTION zsync.capture_change()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
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

CREATE OR REPLACE FUNCTION zsync.enable_sync(p_table regclass)
RETURNS void LANGUAGE plpgsql
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

SELECT zsync.enable_sync('public.agent_jobs');
SELECT zsync.enable_sync('public.agent_decisions');
SELECT zsync.enable_sync('public.rate_limits');

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
$$;

-- As 20261129810000's zsync.sync_apply_many_set (same decisions, same statements' effects, same results in the
-- same order), cheaper per row:
-- * the decision is kept as arrays in result order (rn, ord), not one jsonb array of objects built, parsed
--   and sorted again by each later step (~13 us a row to build alone);
-- * the stored rows' versions in a MATERIALIZED CTE: computed once each, and the planner cannot turn the join
--   into a nested loop re-checking the whole id list per row (seen once the table held a few thousand rows);
-- * the ids the insert wrote as a jsonb object (a hashed key lookup per result row, was = ANY over a text[]:
--   O(n^2), ~10 ms of a 1,000-row insert batch).
CREATE OR REPLACE FUNCTION zsync.sync_apply_many_set(p_table regclass, p_rows jsonb)
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
    v_inserted jsonb;
    v_locked   text[];
    a_ord      integer[];
    a_id       text[];
    a_action   text[];
    a_stored   jsonb[];
    a_input    jsonb[];
    a_edited   timestamptz[];
    a_row      jsonb[];
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
                            CASE WHEN j.tomb IS NOT NULL AND NOT $3 AND j.ts <= j.tomb THEN 'deleted' ELSE 'insert' END
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

    EXECUTE format('WITH ins AS (INSERT INTO %1$s SELECT p.* FROM unnest($1, $2, $3) AS u(id, action, row), '
                   'LATERAL jsonb_populate_record(NULL::%1$s, u.row) p WHERE u.action = ''insert'' ORDER BY u.id '
                   'ON CONFLICT (id) DO NOTHING RETURNING id) SELECT coalesce(jsonb_object_agg(ins.id, true), ''{}'') FROM ins',
                   p_table)
        INTO v_inserted USING a_id, a_action, a_row;

    IF 'update' = ANY (a_action) THEN
        SELECT string_agg(format('%I', attname), ', ' ORDER BY attnum) INTO v_cols
        FROM pg_attribute
        WHERE attrelid = p_table AND attnum > 0 AND NOT attisdropped AND attgenerated = '' AND attname <> 'id';
        EXECUTE format('UPDATE %1$s t SET (%2$s) = (SELECT %2$s FROM jsonb_populate_record(NULL::%1$s, u.row)) '
                       'FROM (SELECT v.id, v.row FROM unnest($1, $2, $3) AS v(id, action, row) '
                       '      WHERE v.action = ''update'') u WHERE t.id = u.id', p_table, v_cols)
            USING a_id, a_action, a_row;
    END IF;

    FOR i IN 1 .. cardinality(a_ord) LOOP
        ord := a_ord[i];
        record_id := a_id[i];
        stored := a_stored[i];
        applied := NULL;
        IF a_action[i] = 'later' OR (a_action[i] = 'insert' AND NOT v_inserted ? a_id[i]) THEN
            SELECT * INTO u FROM zsync.sync_apply(p_table, a_input[i], a_edited[i]);
            outcome := u.outcome;
            stored := u.stored;
            applied := u.applied;
        ELSIF a_action[i] IN ('insert', 'update') THEN
            outcome := 'applied';
            applied := a_row[i];
        ELSE
            outcome := a_action[i];
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;

-- As 20261129700000's zsync.version_exprs, with zsync.canonical_json of a jsonb object column written out in the
-- generated expression (same jsonb as zsync.canonical_json: its object branch, one level, inline).
CREATE OR REPLACE FUNCTION zsync.version_exprs(p_table regclass, p_alias text, OUT ts_expr text, OUT hash_expr text)
LANGUAGE plpgsql STABLE
AS $$
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
$$;
