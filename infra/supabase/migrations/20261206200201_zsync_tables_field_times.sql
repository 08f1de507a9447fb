-- zsync: a Tables field counts at the time Tables got it, as far as the sync saw it, not at a later edit's time.
--
-- Tables keeps no per-field times: a delivery counts every field it changed at its record's version. A record
-- delivered after two edits carries the first's fields at the second's time, and they could win a field
-- Supabase changed between the two. The deliveries are taken in one at a time (a batch's oldest first, a
-- lease's in order: 20261206200101); but when the first is taken in and Supabase keeps its own value of a
-- field (its change was later: 'supabase', skipped as stale), the base does not move - Tables does not hold
-- Supabase's row yet - and the second edit's delivery, still carrying the first's value, counted it at its own
-- time and won: the agent's later status was lost (tests/test_delivery_order.py).
-- Now each Tables record delivered (or read) is kept as a copy of what Tables held at its edited_at
-- (zsync.tables_seen: the last four per record, recorded by zsync.settle_blind before a batch is applied, so
-- a batch's earlier deliveries count for its later ones), and zsync.merge_decide_base times Tables' fields by
-- the latest copy from before the edit (that, or the copy a find or a write's answer showed: zsync.tables_known):
-- a field the edit holds with the value that copy already held counts at that copy's version.
-- Also: a Tables edit and a *_to_tables write of one record can land in the other order than their edited_at
-- (Zapier stamps a write's time when it starts); the write that overwrote an edit is told by the edit's content
-- where that tells (zsync.overwritten_by), so each replaced-record entry now keeps what the write put there.
-- And after a merge that goes back to Tables, the fields taken from Tables are stamped at Tables' version
-- (zsync.stamp_back_to_tables).
-- Re-runnable. zsync.merge_decide_base and zsync.agree are 20261206100101's text, zsync.settle_blind
-- 20261206100201's, zsync.sync_apply_many_set 20261205600101's, plus the lines marked (added) / (changed).

CREATE TABLE IF NOT EXISTS zsync.tables_seen (
    table_name text NOT NULL,
    record_id text NOT NULL,
    copies jsonb DEFAULT '[]'::jsonb NOT NULL,  -- [{"row", "edited_at"}], oldest first, the last four
    CONSTRAINT tables_seen_pkey PRIMARY KEY (table_name, record_id)
);
-- zsync_sync reaches it only through the functions below (SECURITY DEFINER), as zsync.tables_known
REVOKE ALL ON TABLE zsync.tables_seen FROM zsync_sync;

-- Copies of one record: one per edited_at, the latest four, oldest first.
CREATE OR REPLACE FUNCTION zsync.seen_kept(p_copies jsonb) RETURNS jsonb
    LANGUAGE sql STABLE
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT coalesce(jsonb_agg(c.v ORDER BY c.at), '[]'::jsonb)
    FROM (SELECT DISTINCT ON ((e.v ->> 'edited_at')::timestamptz) e.v, (e.v ->> 'edited_at')::timestamptz AS at
          FROM jsonb_array_elements(p_copies) e(v)
          ORDER BY (e.v ->> 'edited_at')::timestamptz DESC LIMIT 4) c
$$;

-- Which record a Tables edit (p_edit) was made on, told by the fields a *_to_tables write (p_wrote) changed in
-- the record it replaced (p_replaced). The edit holds in each such field the value of the record it was made on,
-- unless it changed the field itself (then, as a rule, a value of its own). updated_at counts too: a person's
-- cell edit keeps the record's (the write's, or the replaced record's), a writer sets its own. 'wrote': the
-- edit holds the write's value in one or more of those fields and the replaced record's in none - made on the
-- write's record; 'replaced': the other way round; 'write': it is the write's record itself (its version,
-- updated_at and all); NULL: both (a field changed back), only values of its own, no such field, or no p_wrote
-- (an entry kept from before 'wrote').
CREATE OR REPLACE FUNCTION zsync.edit_holds(p_table regclass, p_replaced jsonb, p_wrote jsonb, p_edit jsonb)
    RETURNS text
    LANGUAGE plpgsql STABLE
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    r jsonb;
    w jsonb;
    e jsonb;
    k text;
    v_wrote boolean := false;  -- a field holds the write's value
    v_replaced boolean := false;  -- a field holds the replaced record's
BEGIN
    IF p_replaced IS NULL OR p_wrote IS NULL OR p_edit IS NULL THEN
        RETURN NULL;
    END IF;
    IF (SELECT (v.ts, v.hash) FROM zsync.version_of(p_table, p_edit) v)
       = (SELECT (v.ts, v.hash) FROM zsync.version_of(p_table, p_wrote) v) THEN
        RETURN 'write';
    END IF;
    -- typed as the table's columns first, as zsync.version_of compares versions
    EXECUTE format('SELECT zsync.canonical_row($4, to_jsonb(a)), zsync.canonical_row($4, to_jsonb(b)), '
                   'zsync.canonical_row($4, to_jsonb(c)) '
                   'FROM jsonb_populate_record(NULL::%1$s, $1) a, jsonb_populate_record(NULL::%1$s, $2) b, '
                   'jsonb_populate_record(NULL::%1$s, $3) c', p_table)
        INTO r, w, e USING p_replaced, p_wrote, p_edit, p_table;
    FOR k IN SELECT x FROM jsonb_object_keys(r || w) x LOOP
        CONTINUE WHEN r -> k IS NOT DISTINCT FROM w -> k;
        v_wrote := v_wrote OR e -> k IS NOT DISTINCT FROM w -> k;
        v_replaced := v_replaced OR e -> k IS NOT DISTINCT FROM r -> k;
    END LOOP;
    RETURN CASE WHEN v_wrote AND NOT v_replaced THEN 'wrote' WHEN v_replaced AND NOT v_wrote THEN 'replaced' END;
END
$_$;

-- How long a Tables write may wait for a record's lock after it stamped its edited_at: the window in which two
-- writes of one record can land in the other order than their edited_at (zsync.overwritten_by).
CREATE OR REPLACE FUNCTION zsync.stamp_race() RETURNS interval
    LANGUAGE sql IMMUTABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$ SELECT interval '2 seconds' $$;

-- The *_to_tables write that overwrote a Tables edit delivered with p_edited_at: its replaced-record entry
-- (zsync.sync_base.replaced), or NULL when the edit landed after every write the base remembers.
-- By time it is the first write whose edited_at ('until') is later than the edit's. But a write's edited_at
-- is stamped when it starts, as a database's now() is its transaction's start (the local stand-in does the
-- same): two writes racing for one record land in the other order than their edited_at. So an edit stamped
-- before a write, or up to zsync.stamp_race() after it, was overwritten by it unless its content shows it was
-- made on the write's record (zsync.edit_holds 'wrote': the write's values where the write changed the record,
-- those the edit did not change itself) - then it landed after the write, whatever its stamp:
-- * taken for overwritten, an edit made on the write's record was merged against the older record, and the
--   write's values it only carried won back over Supabase's later ones (a lost field: the suite's soak, CI);
-- * taken for later, an edit the write overwrote counted its old values as changes (the write's fields lost),
--   or - when it changed every field the write did - was applied while Tables kept the write (the two sides
--   apart for good).
-- Taken for overwritten, an edit is merged against the record the write replaced and goes back to Tables; when
-- it did land after the write, Tables already holds it and the next write, found first (blind_quiet_s), writes
-- nothing. The write's own record (its delivery, a find) is what replaced that record too (zsync.edit_holds
-- 'write'; the caller asks only when Tables' record is not the base: when an edit the write overwrote was taken
-- in first - that edit is the base then, and the write's record would count as an edit made on it).
CREATE OR REPLACE FUNCTION zsync.overwritten_by(p_table regclass, p_entries jsonb, p_edit jsonb,
                                                p_edited_at timestamp with time zone) RETURNS jsonb
    LANGUAGE plpgsql STABLE
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    e record;
    v_holds text;
BEGIN
    FOR e IN SELECT x.v, (x.v ->> 'until')::timestamptz AS until FROM jsonb_array_elements(p_entries) x(v)
             WHERE p_edited_at < (x.v ->> 'until')::timestamptz + zsync.stamp_race()
             ORDER BY (x.v ->> 'until')::timestamptz LOOP
        v_holds := zsync.edit_holds(p_table, e.v -> 'row', e.v -> 'wrote', p_edit);
        IF v_holds IS DISTINCT FROM 'wrote' THEN
            RETURN e.v;
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

-- (as 20261206100101's, and Tables' field times from the copy the sync saw last: the lines marked)
CREATE OR REPLACE FUNCTION zsync.merge_decide_base(p_table regclass, b zsync.sync_base, p_tables jsonb,
                                                   p_edited_at timestamp with time zone, p_supabase jsonb,
                                                   OUT action text, OUT merged jsonb, OUT info jsonb)
    RETURNS record
    LANGUAGE plpgsql STABLE
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    t      record;
    s      record;
    t_ts   timestamptz;
    t_row  jsonb := p_tables;  -- Tables' record at the version it counts for
    m      record;
    v_edit timestamptz := date_trunc('milliseconds', p_edited_at);
    v_over boolean := false;  -- Tables' record was overwritten there by a *_to_tables write (b.replaced)
    v_rep  jsonb;
    v_seen jsonb;  -- (added) the Tables copy the sync saw last before this edit
    v_seen_at timestamptz;  -- (added) and its edited_at
    v_sts  timestamptz;  -- (added) that copy's version, as t_ts is counted
    v_tfts jsonb;  -- (added) Tables' field times: the fields that copy already held
    v_after boolean;  -- (added) an edit made on the base with an older updated_at
BEGIN
    action := 'none';
    IF p_tables IS NULL OR p_supabase IS NULL OR b.record_id IS NULL THEN
        RETURN;
    END IF;
    IF NOT b.agreed AND NOT EXISTS (  -- saved unconfirmed: agreed only once its outbox entry says so
            SELECT 1 FROM zsync.outbox o WHERE o.table_name = b.table_name AND o.record_id = b.record_id
              AND date_trunc('milliseconds', o.record_updated_at) = b.version
              AND o.ack_outcome IN ('unchanged', 'applied')) THEN
        RETURN;
    END IF;
    SELECT * INTO t FROM zsync.version_of(p_table, p_tables);
    SELECT * INTO s FROM zsync.version_of(p_table, p_supabase);
    IF t.hash = s.hash THEN
        IF s.hash = b.hash THEN
            action := 'same';
        END IF;
        RETURN;
    END IF;
    IF b.replaced IS NOT NULL AND t.hash <> b.hash THEN
        -- edited in Tables before a *_to_tables write replaced the record: the first write after the edit
        v_rep := zsync.overwritten_by(p_table, b.replaced, p_tables, p_edited_at);  -- (changed)
    END IF;
    IF v_rep IS NOT NULL AND v_edit < (v_rep ->> 'from')::timestamptz THEN
        -- older than the record that write read, which held it (Tables' records hold every earlier edit): taken
        -- in already (a redelivery, or a delivery overtaken by a later one)
        action := 'supabase';
        merged := p_supabase;
        RETURN;
    ELSIF v_rep IS NOT NULL THEN
        -- made from the record that write read and replaced: the common ancestor of the edit and of what
        -- Supabase holds is that record, at its updated_at (the writers' clock the versions compare on)
        b.base := v_rep -> 'row';
        b.version := date_trunc('milliseconds', (v_rep -> 'row' ->> 'updated_at')::timestamptz);
        b.hash := (SELECT v.hash FROM zsync.version_of(p_table, v_rep -> 'row') v);
        b.tables_ts := b.version;
        -- Supabase's fields at the times their values got there (zsync.sync_base.field_at: its writers' changes,
        -- and the values applied from Tables at those records' versions), where that is after the replaced
        -- record; any other field at the row's version (the upper bound)
        b.field_ts := (SELECT jsonb_object_agg(a.key, a.value) FROM jsonb_each(b.field_at) a
                       WHERE (a.value #>> '{}')::timestamptz > b.version);
        v_over := true;
        IF t.hash = b.hash THEN
            action := 'supabase';  -- that very record: nothing changed in Tables since
            merged := p_supabase;
            RETURN;
        END IF;
    END IF;
    -- (added; read as its callers' owner: zsync.merge_decide, zsync.merge_decide_many; not needed - and not read -
    -- when Tables holds the base's content, the common case)
    IF t.hash <> b.hash THEN
        SELECT c.known, c.known_at INTO v_seen, v_seen_at FROM (
            SELECT e.v -> 'row' AS known, (e.v ->> 'edited_at')::timestamptz AS known_at
            FROM zsync.tables_seen sn, jsonb_array_elements(sn.copies) e(v)
            WHERE sn.table_name = b.table_name AND sn.record_id = b.record_id
            UNION ALL
            SELECT k.known, k.known_at FROM zsync.tables_known k
            WHERE k.table_name = b.table_name AND k.record_id = b.record_id) c
        WHERE c.known_at < p_edited_at ORDER BY c.known_at DESC LIMIT 1;
    END IF;
    t_ts := t.ts;
    IF t.hash <> b.hash AND t.ts = b.tables_ts AND t.ts <= b.version AND v_edit > b.version THEN
        t_ts := v_edit;  -- edited in Tables after the base without a new updated_at
        t_row := p_tables || jsonb_build_object('updated_at', t_ts);
    END IF;
    -- (added) an edit made in Tables on the base - the record a write replaced, or a copy the sync saw holding
    -- the base - by a writer whose updated_at is older than the base's (chosen before the base reached Tables):
    -- a change all the same, its fields at that updated_at (zsync.merge3 below), not a stale delivery
    -- (not the sync's own blind write, announced and not recorded yet - its drain lost: a find sees it before
    -- zsync.remember_tables records it - which is no edit made on the base)
    v_after := t.hash <> b.hash AND t_ts <= b.version
               AND (v_over OR (v_seen IS NOT NULL
                               AND (SELECT v.hash FROM zsync.version_of(p_table, v_seen) v) = b.hash
                               AND NOT EXISTS (SELECT 1 FROM zsync.tables_writing a
                                               WHERE a.table_name = b.table_name AND a.record_id = b.record_id
                                                 AND a.version = t.ts)));
    IF t.hash = b.hash OR (t_ts <= b.version AND NOT v_after) THEN  -- (changed) Tables did not change since the base
        IF s.hash <> b.hash THEN
            action := 'supabase';
            merged := p_supabase;
        END IF;
        RETURN;
    END IF;
    IF s.hash = b.hash AND (t_ts, t.hash) > (s.ts, s.hash) THEN  -- only Tables changed, and later: it wins
        -- (a record Tables no longer holds - a *_to_tables write replaced it - goes back there: 'merged')
        action := CASE WHEN v_over THEN 'merged' ELSE 'tables' END;
        merged := t_row;
        IF v_over THEN
            info := jsonb_build_object('tables', '[]'::jsonb, 'supabase', '[]'::jsonb, 'both_later', '{}'::jsonb,
                                       'base_version', b.version, 'tables_version', t_ts, 'back_to_tables', true);
        END IF;
        RETURN;
    END IF;
    -- (added) Tables' fields the copy the sync saw last already held (a delivery taken in before this edit, a
    -- find, a write's answer) were changed there no later than that copy: a record delivered with two edits
    -- carries the first's fields, which count at the first's time, not this edit's
    IF v_seen IS NOT NULL THEN
        v_sts := (SELECT v.ts FROM zsync.version_of(p_table, v_seen) v);
        IF v_sts <= b.version AND date_trunc('milliseconds', v_seen_at) > b.version THEN
            v_sts := date_trunc('milliseconds', v_seen_at);  -- a cell edit: Zapier's time, as t_ts
        END IF;
        IF v_sts > b.version AND v_sts < t_ts THEN
            v_tfts := (SELECT jsonb_object_agg(k.key, to_jsonb(v_sts))
                       FROM jsonb_each(zsync.canonical_row(p_table, t_row)) k
                       WHERE zsync.canonical_row(p_table, v_seen) -> k.key IS NOT DISTINCT FROM k.value);
        END IF;
    END IF;
    SELECT * INTO m FROM zsync.merge3(p_table, b.base, t_row, p_supabase, v_tfts, b.field_ts);  -- (changed)
    IF m.outcome = 'a' THEN
        -- Tables' record wins whole; when a *_to_tables write has replaced it in Tables since, it must go back
        -- there too: 'merged' (written to Supabase under zsync.origin 'sync_send', so it is queued for Tables)
        action := CASE WHEN v_over THEN 'merged' ELSE 'tables' END;
        merged := t_row;
    ELSIF m.outcome = 'b' THEN
        action := 'supabase';
        merged := p_supabase;
    ELSIF (m.merged ->> 'updated_at')::timestamptz > zsync.merge_time_limit() THEN
        RETURN;  -- a merged version would be further ahead of the clock than allowed: the whole-record rule
    ELSE
        action := 'merged';
        merged := m.merged;
    END IF;
    info := jsonb_build_object('tables', to_jsonb(m.from_a), 'supabase', to_jsonb(m.from_b),
                               'both_later', (SELECT coalesce(jsonb_object_agg(k.key,
                                                  CASE k.value #>> '{}' WHEN 'a' THEN 'tables' ELSE 'supabase' END),
                                                  '{}'::jsonb) FROM jsonb_each(m.both_later) k),
                               'base_version', b.version, 'tables_version', t_ts)
            -- (a merge of an edit a write overwrote goes back to Tables too: Tables holds that write, not the
            -- edit, so the base stays that write's row - zsync.sync_apply moves it only for other merges)
            || CASE WHEN v_over THEN '{"back_to_tables": true}'::jsonb ELSE '{}'::jsonb END;
END
$$;

-- (as 20261206100201's, and each delivery kept as a copy of Tables' record: the lines marked)
CREATE OR REPLACE FUNCTION zsync.settle_blind(p_table text, p_items jsonb) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    n integer := 0;
    v_echo record;
BEGIN
    IF jsonb_typeof(p_items) IS DISTINCT FROM 'array' THEN  -- (changed)
        RETURN 0;
    END IF;
    -- (added) each delivery is a copy of what Tables held at its edited_at (zsync.merge_decide_base)
    IF zsync.field_merge_on() THEN
        INSERT INTO zsync.tables_seen AS t (table_name, record_id, copies)
        SELECT p_table, g.id, zsync.seen_kept(jsonb_agg(jsonb_build_object('row', g.row, 'edited_at', g.edited_at)))
        FROM (SELECT e.v ->> 'id' AS id, e.v -> 'row' AS row, (e.v ->> 'edited_at')::timestamptz AS edited_at
              FROM jsonb_array_elements(p_items) e(v)
              WHERE e.v ->> 'id' IS NOT NULL AND e.v ->> 'edited_at' IS NOT NULL
                AND jsonb_typeof(e.v -> 'row') = 'object') g
        GROUP BY g.id ORDER BY g.id
        ON CONFLICT ON CONSTRAINT tables_seen_pkey DO UPDATE SET copies = zsync.seen_kept(t.copies || EXCLUDED.copies);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM zsync.tables_writing a WHERE a.table_name = p_table) THEN  -- (changed)
        RETURN 0;
    END IF;
    -- the records' locks first (id order, as every caller): a drain still writing one records it itself
    PERFORM zsync.lock_record(format('public.%I', p_table)::regclass, a.record_id)
    FROM (SELECT DISTINCT a.record_id FROM zsync.tables_writing a
          WHERE a.table_name = p_table
            AND a.record_id IN (SELECT e.v ->> 'id' FROM jsonb_array_elements(p_items) e(v))
          ORDER BY a.record_id) a;
    FOR v_echo IN
        SELECT DISTINCT ON (a.record_id) a.record_id, a.known, a.known_at, g.v -> 'row' AS row, g.v ->> 'edited_at' AS edited_at
        FROM jsonb_array_elements(p_items) g(v)
        JOIN zsync.tables_writing a ON a.table_name = p_table AND a.record_id = g.v ->> 'id'
        WHERE g.v ->> 'edited_at' IS NOT NULL
          AND date_trunc('milliseconds', (g.v -> 'row' ->> 'updated_at')::timestamptz) = a.version
        ORDER BY a.record_id, (g.v ->> 'edited_at')::timestamptz
    LOOP
        PERFORM zsync.agree(format('public.%I', p_table)::regclass, jsonb_build_array(v_echo.row),
                            jsonb_build_object(v_echo.record_id, jsonb_build_object(
                                'row', v_echo.known, 'edited_at', v_echo.known_at, 'written_at', v_echo.edited_at)));
        DELETE FROM zsync.tables_writing a WHERE a.table_name = p_table AND a.record_id = v_echo.record_id;
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

-- (as 20261206100101's, and each replaced-record entry keeps what the write put there: the line marked)
CREATE OR REPLACE FUNCTION zsync.agree(p_table regclass, p_rows jsonb, p_prevs jsonb DEFAULT '{}')
    RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    v_name text := (SELECT relname::text FROM pg_class WHERE oid = p_table);
    r      record;
    n      integer := 0;
    v_prev jsonb;
    v_fts  jsonb;  -- Supabase's field times since the base, as they were before this write
BEGIN
    IF jsonb_typeof(p_rows) IS DISTINCT FROM 'array' OR NOT zsync.field_merge_on() THEN
        RETURN 0;
    END IF;
    PERFORM zsync.assert_synced(p_table);
    -- only what there is to do: a saved base, or a row that moved on (most records: neither, no write)
    FOR r IN EXECUTE format($q$
        SELECT e.v AS row, to_jsonb(t) AS cur FROM jsonb_array_elements($1) e(v) JOIN %s t ON t.id = e.v ->> 'id'
        WHERE EXISTS (SELECT 1 FROM zsync.sync_base b WHERE b.table_name = $2 AND b.record_id = t.id)
           OR date_trunc('milliseconds', t.updated_at)
              IS DISTINCT FROM date_trunc('milliseconds', (e.v ->> 'updated_at')::timestamptz)
           OR $3 ? t.id
        ORDER BY e.v ->> 'id' $q$, p_table) USING p_rows, v_name, coalesce(p_prevs, '{}'::jsonb) LOOP
        v_prev := p_prevs -> (r.row ->> 'id');
        v_fts := NULL;
        IF v_prev IS NOT NULL THEN
            SELECT b.field_ts INTO v_fts FROM zsync.sync_base b WHERE b.table_name = v_name AND b.record_id = r.row ->> 'id';
        END IF;
        IF r.cur IS NULL THEN
            CONTINUE;
        ELSIF (SELECT (v.ts, v.hash) FROM zsync.version_of_typed(p_table, r.cur) v)
              = (SELECT (v.ts, v.hash) FROM zsync.version_of(p_table, r.row) v) THEN
            IF v_prev IS NULL THEN
                PERFORM zsync.drop_base(p_table, r.cur);
                CONTINUE;
            END IF;
            -- (the row itself is the base: kept as a copy for the replaced record it now remembers)
            INSERT INTO zsync.sync_base AS b (table_name, record_id, base, version, hash, tables_ts)
            SELECT v_name, r.row ->> 'id', r.cur, v.ts, v.hash, v.ts FROM zsync.version_of_typed(p_table, r.cur) v
            ON CONFLICT ON CONSTRAINT sync_base_pkey DO UPDATE
                SET base = EXCLUDED.base, version = EXCLUDED.version, hash = EXCLUDED.hash,
                    tables_ts = EXCLUDED.tables_ts, agreed = true, field_ts = NULL, set_at = now();
            n := n + 1;
        ELSIF zsync.set_base(p_table, r.row) THEN
            n := n + 1;
        END IF;
        IF v_prev IS NOT NULL AND v_prev -> 'row' IS NOT NULL THEN
            -- until the write's own edited_at (Zapier's clock, as the edits' edited_at): an edit at or after it
            -- was made from the write; without it (an older caller), the time the write was recorded here
            UPDATE zsync.sync_base b
            SET replaced = zsync.replaced_kept(b.replaced, jsonb_build_array(jsonb_build_object(
                    'row', v_prev -> 'row',
                    'wrote', r.row,  -- (added) what the write put there (zsync.overwritten_by)
                    'from', date_trunc('milliseconds', (v_prev ->> 'edited_at')::timestamptz),
                    'until', coalesce((v_prev ->> 'written_at')::timestamptz, clock_timestamp()),
                    'field_ts', CASE WHEN (v_prev ->> 'blind')::boolean THEN v_fts END)))
            WHERE b.table_name = v_name AND b.record_id = r.row ->> 'id';
        END IF;
    END LOOP;
    RETURN n;
END
$_$;

-- (as 20261205600101's, and an edit stamped within zsync.stamp_race() after a write's edited_at goes the row
-- path too, where zsync.overwritten_by tells by its content whether that write overwrote it: the line marked)
CREATE OR REPLACE FUNCTION zsync.sync_apply_many_set(p_table regclass, p_rows jsonb) RETURNS TABLE(ord integer, record_id text, outcome text, stored jsonb, applied jsonb, merge jsonb)
    LANGUAGE plpgsql
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    v_name     text := (SELECT relname::text FROM pg_class WHERE oid = p_table);
    v_ignore   boolean := coalesce(current_setting('zsync.ignore_tombstones', true), '') = 'on';
    v_merge    boolean := zsync.field_merge_on();
    a_bts      timestamptz[];
    a_bhash    text[];
    a_based    boolean[];
    v_bases    boolean;  -- anything for zsync.bases_after_batch to do
    r_merge    jsonb[];
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
    v_ids := (SELECT array_agg(DISTINCT e.value -> 'row' ->> 'id' ORDER BY e.value -> 'row' ->> 'id')
              FROM jsonb_array_elements(p_rows) e);
    FOR i IN 1 .. coalesce(cardinality(v_ids), 0) LOOP  -- each record's lock (zsync.sync_apply), in id order
        PERFORM zsync.lock_record(p_table, v_ids[i]);
    END LOOP;
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
                    SELECT inc.*, row_number() OVER (PARTITION BY inc.id ORDER BY inc.ts DESC, date_trunc('milliseconds', inc.edited_at) DESC NULLS LAST, inc.hash DESC, inc.ord) AS rn
                    FROM inc),
                cur AS MATERIALIZED (
                    SELECT t.id, to_jsonb(t) AS stored, %4$s AS ts, %5$s AS hash
                    FROM %1$s t WHERE t.id = ANY ($4)),
                j AS (
                    SELECT r.*, c.stored, c.ts AS s_ts, c.hash AS s_hash, b.version AS b_ts, b.hash AS b_hash,
                           (SELECT max((x.v ->> 'until')::timestamptz) FROM jsonb_array_elements(b.replaced) x(v))
                               AS b_replaced_until, b.replaced AS b_replaced,  -- (changed)
                           CASE WHEN c.id IS NULL AND r.rn = 1 THEN zsync.tombstone_version($2, r.id) END AS tomb,
                           CASE WHEN c.id IS NOT NULL AND r.edited_at IS NOT NULL AND r.ts = c.ts AND r.hash <> c.hash
                                     AND date_trunc('milliseconds', r.edited_at) > r.ts
                                THEN greatest(date_trunc('milliseconds', r.edited_at), c.ts + interval '1 millisecond') END AS bumped
                    FROM ranked r LEFT JOIN cur c ON c.id = r.id AND r.rn = 1
                         LEFT JOIN (SELECT * FROM zsync.bases_of($2, $4) WHERE $5) b ON c.id IS NOT NULL AND b.record_id = r.id),
                e AS (
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
                                ELSE 'skipped_stale' END AS action0
                    FROM j),
                d AS (
                    SELECT e.*,
                           CASE WHEN e.b_hash IS NULL OR e.action0 IN ('later', 'insert', 'deleted', 'unchanged') THEN e.action0
                                WHEN e.action0 = 'update' AND e.s_hash = e.b_hash AND e.s_ts = e.b_ts AND e.hash <> e.b_hash
                                     -- (an edit a *_to_tables write may have overwritten: the row path merges it)
                                     -- (changed) by its stamp, or landed before one stamped earlier: its content
                                     -- tells (zsync.overwritten_by, for an edit stamped up to zsync.stamp_race()
                                     -- after the write)
                                     AND NOT coalesce(date_trunc('milliseconds', e.edited_at)
                                                      < e.b_replaced_until + zsync.stamp_race()
                                                      AND zsync.overwritten_by(%1$L::regclass, e.b_replaced, e.row, e.edited_at)
                                                          IS NOT NULL, false)
                                    THEN 'update'
                                ELSE 'later' END AS action
                    FROM e)
                SELECT array_agg(d.ord ORDER BY d.rn, d.ord), array_agg(d.id ORDER BY d.rn, d.ord),
                       array_agg(d.action ORDER BY d.rn, d.ord), array_agg(d.stored ORDER BY d.rn, d.ord),
                       array_agg(d.row ORDER BY d.rn, d.ord), array_agg(d.edited_at ORDER BY d.rn, d.ord),
                       array_agg(CASE WHEN d.bumped IS NULL THEN d.row ELSE d.row || jsonb_build_object('updated_at', d.bumped) END
                                 ORDER BY d.rn, d.ord),
                       array_agg(CASE WHEN d.action = 'unchanged' THEN d.s_ts ELSE coalesce(d.bumped, d.ts) END ORDER BY d.rn, d.ord),
                       array_agg(CASE WHEN d.action = 'unchanged' THEN d.s_hash ELSE d.hash END ORDER BY d.rn, d.ord),
                       array_agg(d.b_hash IS NOT NULL ORDER BY d.rn, d.ord),
                       coalesce(bool_or(d.b_hash IS NOT NULL OR d.action = 'unchanged'
                                        OR (d.action IN ('insert', 'update') AND d.bumped IS NOT NULL)), false)
                FROM d
            $q$, p_table, x.ts_expr, x.hash_expr, t.ts_expr, t.hash_expr)
                INTO a_ord, a_id, a_action, a_stored, a_input, a_edited, a_row, a_bts, a_bhash, a_based, v_bases
                USING p_rows, v_name, v_ignore, v_locked, v_merge;

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

    IF v_merge AND v_bases THEN  -- Supabase now holds what Tables sent (zsync.base_after_apply, set-based)
        PERFORM zsync.bases_after_batch(p_table, a_id, a_action, a_row, a_bts, a_bhash, a_input, a_based, v_inserted);
    END IF;

    -- The rows applied one by one (older versions of an id, a record with a saved base, and - after 5 lost
    -- races - lost inserts), in id order, each id's versions OLDEST first: Tables' records are snapshots that
    -- hold every earlier edit, so applied in the order Tables made them each one moves the base on to itself
    -- and the next is merged against its real ancestor (newest first, the newest would carry the older ones'
    -- values as its own changes, at its own later time, and win fields Supabase changed in between).
    r_outcome := array_fill(NULL::text, ARRAY[cardinality(a_ord)]);
    r_stored := array_fill(NULL::jsonb, ARRAY[cardinality(a_ord)]);
    r_applied := array_fill(NULL::jsonb, ARRAY[cardinality(a_ord)]);
    r_merge := array_fill(NULL::jsonb, ARRAY[cardinality(a_ord)]);
    FOR i IN SELECT l.n FROM unnest(a_id, a_action) WITH ORDINALITY AS l(id, action, n)
             WHERE l.action = 'later' OR (l.action = 'insert' AND NOT v_inserted ? l.id)
             ORDER BY l.id, l.n DESC LOOP
        SELECT * INTO u FROM zsync.sync_apply(p_table, a_input[i], a_edited[i]);
        r_outcome[i] := u.outcome;
        r_stored[i] := u.stored;
        r_applied[i] := u.applied;
        r_merge[i] := u.merge;
    END LOOP;

    FOR i IN 1 .. cardinality(a_ord) LOOP
        ord := a_ord[i];
        record_id := a_id[i];
        stored := a_stored[i];
        applied := NULL;
        merge := r_merge[i];
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

-- (added) After a merge that goes back to Tables (merge info "back_to_tables": an edit a *_to_tables write
-- overwrote, merged; the base stays that write's row, so zsync.base_after_merge is not called): the fields
-- Supabase took from Tables got there at Tables' version ("tables_version"), not at the merged row's, which the
-- update's trigger stamped. Another edit the same write overwrote meets them at that time: stamped at the merged
-- row's (later than every edit), they beat it, and its newer values were lost (a soak with blind writes on).
-- p_merges: [{"id", "info"}]; called by the adapter right after zsync.sync_apply / zsync.sync_apply_many, in
-- their transaction (shared/adapters/supabase_db.py). -> how many records were stamped.
CREATE OR REPLACE FUNCTION zsync.stamp_back_to_tables(p_table text, p_merges jsonb) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    n integer;
BEGIN
    IF jsonb_typeof(p_merges) IS DISTINCT FROM 'array' THEN
        RETURN 0;
    END IF;
    UPDATE zsync.sync_base b
    SET field_at = coalesce(b.field_at, '{}'::jsonb) || s.stamps,
        field_ts = CASE WHEN b.field_ts IS NULL THEN NULL ELSE b.field_ts || s.stamps END
    FROM (SELECT m.v ->> 'id' AS id,
                 (SELECT coalesce(jsonb_object_agg(f.name, to_jsonb(date_trunc('milliseconds',
                                      (m.v -> 'info' ->> 'tables_version')::timestamptz))), '{}'::jsonb)
                  FROM (SELECT x AS name FROM jsonb_array_elements_text(m.v -> 'info' -> 'tables') x
                        UNION
                        SELECT k.key FROM jsonb_each_text(m.v -> 'info' -> 'both_later') k
                        WHERE k.value = 'tables') f) AS stamps
          FROM jsonb_array_elements(p_merges) m(v)
          WHERE coalesce((m.v -> 'info' ->> 'back_to_tables')::boolean, false)
            AND m.v -> 'info' ->> 'tables_version' IS NOT NULL) s
    WHERE b.table_name = p_table AND b.record_id = s.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

REVOKE ALL ON FUNCTION zsync.merge_decide_base(regclass, zsync.sync_base, jsonb, timestamp with time zone, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.seen_kept(jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.edit_holds(regclass, jsonb, jsonb, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.stamp_race() FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.overwritten_by(regclass, jsonb, jsonb, timestamp with time zone) FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.stamp_back_to_tables(text, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.stamp_back_to_tables(text, jsonb) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.settle_blind(text, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.settle_blind(text, jsonb) TO zsync_sync;
