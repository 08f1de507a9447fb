-- zsync: a replaced record's field times only while they still tell when Supabase's fields changed.
--
-- 20261206000101 keeps, with the Tables record a blind *_to_tables write replaced, Supabase's field times as they
-- were at that write (sync_base.replaced[].field_ts), so an edit the write overwrote in Tables is merged
-- against each field at the time Supabase changed it. Those times hold while the base is the row that write
-- wrote. A change from Tables applied after the write moves the base to the Tables record and changes Supabase's
-- fields without a stamp: the late edit then met Supabase's value of a field at the older time of the write
-- and won it, though the value Supabase held was a later Tables edit's (a soak with blind writes under load lost
-- 4 fields that way). Now each such entry also names the version the write wrote ("wrote"), and its field
-- times count only while the base is still that version; otherwise the row's version, as for an older entry.
-- Re-runnable: both functions are replaced (each is 20261206000101's text plus the lines marked here).

-- (as 20261206000101's, and a blind write's entry names the version it wrote: "wrote")
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
                    'from', date_trunc('milliseconds', (v_prev ->> 'edited_at')::timestamptz),
                    'until', coalesce(date_trunc('milliseconds', (v_prev ->> 'written_at')::timestamptz),
                                      clock_timestamp()),
                    'field_ts', CASE WHEN (v_prev ->> 'blind')::boolean THEN v_fts END,
                    'wrote', CASE WHEN (v_prev ->> 'blind')::boolean
                                  THEN (SELECT v.ts FROM zsync.version_of(p_table, r.row) v) END)))
            WHERE b.table_name = v_name AND b.record_id = r.row ->> 'id';
        END IF;
    END LOOP;
    RETURN n;
END
$_$;

-- zsync.merge_decide with the record's base given (a row of zsync.sync_base, read by the caller). As
-- 20261206000101's, except that a replaced record's field times count only while the base is the row its write
-- wrote (no change from Tables applied since).
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
        WHERE v_edit < (e.v ->> 'until')::timestamptz ORDER BY (e.v ->> 'until')::timestamptz LIMIT 1;
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
        -- Supabase's fields at the times it changed them, when that write is the last one and the base is still
        -- the row it wrote: as they were at the write, and any changed since (stamped on the base). After a
        -- later write, or once a change from Tables was applied since (the base moved to it; its fields are not
        -- stamped), its row's version: a field may have changed again since, unstamped.
        b.field_ts := CASE WHEN jsonb_typeof(v_rep -> 'field_ts') = 'object' AND (v_rep ->> 'until')::timestamptz
                                >= (SELECT max((e.v ->> 'until')::timestamptz) FROM jsonb_array_elements(b.replaced) e(v))
                                AND b.version = date_trunc('milliseconds', (v_rep ->> 'wrote')::timestamptz)
                           THEN (v_rep -> 'field_ts') || coalesce(b.field_ts, '{}'::jsonb) END;
        b.base := v_rep -> 'row';
        b.version := date_trunc('milliseconds', (v_rep -> 'row' ->> 'updated_at')::timestamptz);
        b.hash := (SELECT v.hash FROM zsync.version_of(p_table, v_rep -> 'row') v);
        b.tables_ts := b.version;
        v_over := true;
        IF t.hash = b.hash THEN
            action := 'supabase';  -- that very record: nothing changed in Tables since
            merged := p_supabase;
            RETURN;
        END IF;
    END IF;
    t_ts := t.ts;
    IF t.hash <> b.hash AND t.ts = b.tables_ts AND t.ts <= b.version AND v_edit > b.version THEN
        t_ts := v_edit;  -- edited in Tables after the base without a new updated_at
        t_row := p_tables || jsonb_build_object('updated_at', t_ts);
    END IF;
    IF t.hash = b.hash OR t_ts <= b.version THEN  -- Tables did not change since the base
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
    SELECT * INTO m FROM zsync.merge3(p_table, b.base, t_row, p_supabase, NULL, b.field_ts);
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
            || CASE WHEN v_over AND m.outcome = 'a' THEN '{"back_to_tables": true}'::jsonb ELSE '{}'::jsonb END;
END
$$;

REVOKE ALL ON FUNCTION zsync.agree(regclass, jsonb, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.agree(regclass, jsonb, jsonb) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.merge_decide_base(regclass, zsync.sync_base, jsonb, timestamp with time zone, jsonb) FROM PUBLIC;
