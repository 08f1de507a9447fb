-- zsync: deletes that win, restores that come back, tombstones that expire (issue 18 items 1, 2, 8).
-- See docs/deletes.md.
--
-- * zsync.sync_trashed: the Zapier record ids of Tables records the sync itself moved to the trash (the copy
--   of a record deleted in Supabase, a duplicate). Such a trashed record is never a person's delete: the
--   trash check and the *_to_tables functions (which now look at the trash before they create a record)
--   skip it.
-- * zsync.sync_apply / zsync.sync_apply_many_set: a tombstone of a delete made in Zapier Tables (origin
--   'tables', version = Zapier's deleted_at) no longer refuses a change Tables made after it: a delivery whose
--   Zapier edited_at is later than the delete (the record restored from the trash, or re-created, with its
--   old updated_at) is inserted, versioned at greatest(edited_at, tombstone + 1 ms) - the rule
--   zsync.maintain_updated_at applies to a re-insert in Supabase. Only the tombstone refusal changed.
-- * zsync.expire_tombstones: tombstones (and zsync.sync_trashed entries) older than the retention (30 days)
--   whose record has no unacknowledged outbox entry (both sides agree) are removed; pg_cron runs it hourly.

CREATE TABLE IF NOT EXISTS zsync.sync_trashed (
    table_name       text NOT NULL,
    tables_record_id text NOT NULL,          -- Zapier's record id (ULID) of the trashed copy
    record_id        text NOT NULL,          -- our id field
    trashed_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, tables_record_id)
);
CREATE INDEX IF NOT EXISTS sync_trashed_trashed_at_idx ON zsync.sync_trashed (trashed_at);
CREATE INDEX IF NOT EXISTS tombstones_deleted_at_idx ON zsync.tombstones (deleted_at);

-- Remember Tables records the sync moved to the trash itself. -> how many were new.
CREATE OR REPLACE FUNCTION zsync.note_sync_trashed(p_table text, p_record_id text, p_tables_ids text[])
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
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
CREATE OR REPLACE FUNCTION zsync.sync_trashed_ids(p_table text, p_tables_ids text[])
RETURNS SETOF text LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.tables_record_id FROM zsync.sync_trashed s
    WHERE s.table_name = p_table AND s.tables_record_id = ANY (p_tables_ids)
$$;

-- The tombstone of a record (version and origin), NULLs when it is not deleted.
CREATE OR REPLACE FUNCTION zsync.tombstone_of(p_table text, p_record_id text, OUT version timestamptz, OUT origin text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t.version, t.origin FROM zsync.tombstones t WHERE t.table_name = p_table AND t.record_id = p_record_id
$$;

-- Tombstones whose delete both sides agree on (no unacknowledged outbox entry of the record) and that are
-- older than p_retention: removed, with the sync's trash notes of the same age. The retention outlives every
-- way a stale version can still arrive (the dead-letter queue keeps deliveries 14 days; Zapier's autoreplay
-- about 11 hours; an unacknowledged trigger-inbox message is dead-lettered after 5 leases). -> tombstones removed.
CREATE OR REPLACE FUNCTION zsync.expire_tombstones(p_retention interval DEFAULT '30 days')
RETURNS integer LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
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

-- As 20261129810000's zsync.sync_apply; only the tombstone refusal changed (see the header).
CREATE OR REPLACE FUNCTION zsync.sync_apply(p_table regclass, p_row jsonb, p_edited_at timestamptz,
                                            OUT outcome text, OUT stored jsonb, OUT applied jsonb)
LANGUAGE plpgsql
SET timezone TO 'UTC' SET search_path = pg_catalog, pg_temp
AS $$
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
$$;

-- As 20261129820000's zsync.sync_apply_many_set; only a deleted record's row whose Zapier edited_at is later than
-- the tombstone goes through zsync.sync_apply (which decides by the tombstone's origin) instead of 'deleted'.
CREATE OR REPLACE FUNCTION zsync.sync_apply_many_set(p_table regclass, p_rows jsonb)
RETURNS TABLE (ord integer, record_id text, outcome text, stored jsonb, applied jsonb)
LANGUAGE plpgsql
SET timezone TO 'UTC' SET search_path = pg_catalog, pg_temp
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

-- pg_cron (where available, as the outbox sweep): expire tombstones hourly.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
        PERFORM cron.schedule('zsync-expire-tombstones', '17 * * * *', 'SELECT zsync.expire_tombstones()');
    END IF;
END
$$;

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA zsync FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    zsync.note_sync_trashed(text, text, text[]),
    zsync.sync_trashed_ids(text, text[]),
    zsync.tombstone_of(text, text)
TO zsync_sync;
