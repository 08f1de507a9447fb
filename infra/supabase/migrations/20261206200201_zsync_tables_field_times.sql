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
-- Re-runnable. zsync.merge_decide_base is 20261206100101's text, zsync.settle_blind 20261206100201's, plus the
-- lines marked (added) / (changed).

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
        SELECT e.v INTO v_rep FROM jsonb_array_elements(b.replaced) e(v)
        WHERE p_edited_at < (e.v ->> 'until')::timestamptz ORDER BY (e.v ->> 'until')::timestamptz LIMIT 1;
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
    v_after := t.hash <> b.hash AND t_ts <= b.version
               AND (v_over OR (v_seen IS NOT NULL
                               AND (SELECT v.hash FROM zsync.version_of(p_table, v_seen) v) = b.hash));
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

REVOKE ALL ON FUNCTION zsync.merge_decide_base(regclass, zsync.sync_base, jsonb, timestamp with time zone, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.seen_kept(jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.settle_blind(text, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.settle_blind(text, jsonb) TO zsync_sync;
