-- zsync lock order (issue 18, item 10): no deadlock between concurrent batches and single applies of the
-- Tables -> Supabase direction.
--
-- The orders before this migration (rows of a synced table; FOR UPDATE row locks, insert waits):
-- * zsync.sync_apply (one record): its one row (FOR UPDATE, or an insert that waits for a concurrent
--   inserter of that id, then FOR UPDATE). One row per call.
-- * zsync.sync_apply_many_set (a batch): the rows that exist, FOR UPDATE in id order; then the missing ids
--   inserted in id order (ON CONFLICT DO NOTHING: waits only for an in-progress inserter of the same id);
--   then, for each id whose insert lost the race to a concurrent insert, zsync.sync_apply in the batch's
--   delivery order, holding everything above. That last step deadlocked: two batches of the same new ids
--   (a dead-letter replay and an inbox lease, a reconcile and a drain) both lost some inserts to a third
--   and then locked those rows in their own delivery orders; or one held the rows it inserted (high ids)
--   and waited for a low id another batch had locked in id order while waiting for the first one's
--   insert. tests/test_apply_many.py::test_concurrent_batches_and_single_applies deadlocked in most of its
--   rounds (retried away by Database.run's budget, except 1 run in 10-20 of the old test).
-- * zsync.sync_apply_many, a small batch (<= zsync.small_batch rows): the existing rows FOR UPDATE in id
--   order, then zsync.sync_apply per row in id order - a row inserted by another transaction after the
--   first step is locked after higher ids: the same cycle, with a narrower window.
-- * The per-record advisory lock of the Tables direction (hashtextextended('<table>:<id>', 0)): the
--   functions' one-record path takes one (waits); zsync.claim_outbox_rows and the batch drain only try
--   (never wait); reconcile takes its batch's in key order. Outbox rows: claimed FOR UPDATE SKIP LOCKED
--   (never waits); zsync.ack_outbox / ack_outbox_set wait, but hold no row another waiter holds first.
--   Unchanged here.
-- * audit_log inserts (ON CONFLICT DO NOTHING on the stable id: waits for an in-progress insert of the
--   same id): zsync.append_audit_each (the audit_log table's own sync) in delivery order;
--   zsync.append_audit_many (the sync's own entries) one statement per set of keys, each in input order.
--
-- Now every wait for a row of a synced table, and for an audit_log id, happens in id order:
-- * zsync.sync_apply_many_set: the lock step and the insert run in a subtransaction; when an insert lost
--   the race (the row another transaction inserted since the lock step's snapshot), the subtransaction is
--   rolled back - releasing every row it locked or inserted - and the lock step runs again and now locks
--   that row in id order. After 5 lost races in one call (never seen), the old per-row step runs, in id
--   order. The remaining per-row calls (several versions of one id) are made in id order, on rows this
--   transaction already holds.
-- * zsync.sync_apply_many, small batches: zsync.sync_apply per row in id order, without the separate lock
--   step (each row locked, or inserted, in turn).
-- * zsync.append_audit_each: entries inserted in id order (results still in input order);
--   zsync.append_audit_many: one insert in id order.

CREATE OR REPLACE FUNCTION zsync.sync_apply_many_set(p_table regclass, p_rows jsonb)
RETURNS TABLE (ord integer, record_id text, outcome text, stored jsonb, applied jsonb)
LANGUAGE plpgsql
SET timezone TO 'UTC'
SET search_path = pg_catalog, pg_temp
AS $$
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
$$;

-- As 20261129810000's zsync.sync_apply_many, without the lock step before the per-row calls of a small
-- batch: zsync.sync_apply locks (or inserts) each row in turn, in id order.
CREATE OR REPLACE FUNCTION zsync.sync_apply_many(p_table regclass, p_rows jsonb)
RETURNS TABLE (ord integer, record_id text, outcome text, stored jsonb, applied jsonb)
LANGUAGE plpgsql
SET timezone TO 'UTC'
SET search_path = pg_catalog, pg_temp
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

-- As 20261129700000's zsync.append_audit_each, inserting in id order (two transactions appending the same
-- entries in different orders waited for each other's inserts); results in input order.
CREATE OR REPLACE FUNCTION zsync.append_audit_each(p_entries jsonb)
RETURNS TABLE (ord integer, inserted boolean)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
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
CREATE OR REPLACE FUNCTION zsync.append_audit_many(p_entries jsonb)
RETURNS integer LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
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
$$;

REVOKE EXECUTE ON FUNCTION zsync.sync_apply_many_set(regclass, jsonb), zsync.sync_apply_many(regclass, jsonb),
    zsync.append_audit_each(jsonb), zsync.append_audit_many(jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION zsync.sync_apply_many_set(regclass, jsonb), zsync.sync_apply_many(regclass, jsonb),
    zsync.append_audit_each(jsonb), zsync.append_audit_many(jsonb) TO zsync_sync;
