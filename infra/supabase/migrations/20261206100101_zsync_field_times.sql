-- zsync: when each of Supabase's field values got there, for edits merged against a record a write replaced.
--
-- An edit a *_to_tables write overwrote in Tables (its delivery late) is merged against the record that write
-- replaced (sync_base.replaced). A field both changed since then goes to the later change - but until now
-- Supabase's side of it was timed only by the stamps since the current base (sync_base.field_ts, cleared
-- whenever the base moves), or by 20261206000101's copy of them for a blind write that is still the last one;
-- otherwise by the row's version. Under load that lost fields both ways (soaks at seed 2026 next to the
-- convergence tests, 2 per run with blind writes off, 2-4 with them on):
-- * the row's version (an upper bound) beat a later Tables edit of a field Supabase had changed earlier;
-- * a value applied from Tables after the write (unstamped) counted at the write's older stamp, and lost to an
--   older overwritten edit;
-- * a value a merge took from Tables counted at the merged version, and beat a later overwritten edit.
-- Now sync_base.field_at keeps, per field, when the value Supabase holds got there, across base moves while the
-- record has a saved base: Supabase's writers' changes at their updated_at (zsync.base_before_change), a Tables
-- record applied at its version (zsync.base_after_apply, zsync.bases_after_batch), the fields a merge took from
-- Tables at that record's version (zsync.base_after_merge), a merged record's other changes at its version
-- (zsync.stamp_fields, from zsync.maintain_updated_at). An overwritten edit meets each field Supabase changed
-- since the replaced record at that time (zsync.merge_decide_base); a field without one, at the row's version.
-- Re-runnable. Each function below is its last definition's text plus the lines marked here (a test checks).

ALTER TABLE zsync.sync_base ADD COLUMN IF NOT EXISTS field_at jsonb;  -- field -> when Supabase's value got there

-- A synced row changed from p_old to p_new by the sync (a merged record): the fields whose value changed got
-- there at p_new's version (zsync.sync_base.field_at, kept while the record has a saved base).
CREATE OR REPLACE FUNCTION zsync.stamp_fields(p_table regclass, p_old jsonb, p_new jsonb) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    UPDATE zsync.sync_base b
    SET field_at = coalesce(b.field_at, '{}'::jsonb) || (
        SELECT coalesce(jsonb_object_agg(n.key, date_trunc('milliseconds', (p_new ->> 'updated_at')::timestamptz)), '{}')
        FROM jsonb_each(p_new) n WHERE n.key NOT IN ('id', 'updated_at') AND n.value IS DISTINCT FROM p_old -> n.key)
    WHERE b.table_name = (SELECT relname::text FROM pg_class WHERE oid = p_table) AND b.record_id = p_new ->> 'id'
      AND (p_new ->> 'updated_at') IS NOT NULL;
END
$$;

-- (as 20261205600101's, and the same stamps kept in field_at)
CREATE OR REPLACE FUNCTION zsync.base_before_change(p_table regclass, p_old jsonb, p_new jsonb) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_name text := (SELECT relname::text FROM pg_class WHERE oid = p_table);
    v_id   text := p_old ->> 'id';
    v_old  timestamptz := (p_old ->> 'updated_at')::timestamptz;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM zsync.sync_base b WHERE b.table_name = v_name AND b.record_id = v_id) THEN
        PERFORM zsync.set_base(p_table, p_old, NULL,
                               EXISTS (SELECT 1 FROM zsync.outbox o WHERE o.table_name = v_name AND o.record_id = v_id
                                         AND o.record_updated_at = v_old AND o.ack_outcome IN ('unchanged', 'applied')));
    END IF;
    UPDATE zsync.sync_base b
    SET field_ts = coalesce(b.field_ts, '{}'::jsonb) || s.stamps, field_at = coalesce(b.field_at, '{}'::jsonb) || s.stamps
    FROM (SELECT coalesce(jsonb_object_agg(n.key, date_trunc('milliseconds', (p_new ->> 'updated_at')::timestamptz)), '{}') AS stamps
          FROM jsonb_each(p_new) n WHERE n.key NOT IN ('id', 'updated_at') AND n.value IS DISTINCT FROM p_old -> n.key) s
    WHERE b.table_name = v_name AND b.record_id = v_id;
END
$$;

-- (as 20261205600101's, and a merged record's changes stamped: zsync.stamp_fields)
CREATE OR REPLACE FUNCTION zsync.maintain_updated_at() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_skew  interval := zsync.max_future_skew();
    v_limit timestamptz := clock_timestamp() + v_skew;
    v_sync  boolean := coalesce(current_setting('zsync.origin', true), '') IN ('sync', 'sync_send');
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
        IF TG_OP = 'UPDATE' AND current_setting('zsync.origin', true) = 'sync_send' AND zsync.field_merge_on() THEN
            -- a merged record (or a Tables record going back there): the fields it changes, at its version
            PERFORM zsync.stamp_fields(TG_RELID::regclass, to_jsonb(OLD), to_jsonb(NEW));
        END IF;
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
        IF zsync.field_merge_on() THEN  -- the field merge's base and when each field changed
            PERFORM zsync.base_before_change(TG_RELID::regclass, to_jsonb(OLD), to_jsonb(NEW));
        END IF;
    END IF;
    RETURN NEW;
END
$$;

-- (as 20261205600101's, and the fields Tables' record set stamped at its version)
CREATE OR REPLACE FUNCTION zsync.base_after_apply(p_table regclass, p_row jsonb, p_tables_ts timestamp with time zone)
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    IF NOT zsync.field_merge_on() THEN
        RETURN;
    END IF;
    PERFORM zsync.assert_synced(p_table);
    -- the fields Tables' record set (where it differs from the base, or Supabase changed them since): at its version
    UPDATE zsync.sync_base b
    SET field_at = coalesce(b.field_at, '{}'::jsonb) || (
        SELECT coalesce(jsonb_object_agg(n.key, date_trunc('milliseconds', (p_row ->> 'updated_at')::timestamptz)), '{}')
        FROM jsonb_each(p_row) n
        WHERE n.key NOT IN ('id', 'updated_at')
          AND (n.value IS DISTINCT FROM b.base -> n.key OR (b.field_at ->> n.key)::timestamptz > b.version))
    WHERE b.table_name = (SELECT relname::text FROM pg_class WHERE oid = p_table) AND b.record_id = p_row ->> 'id'
      AND (p_row ->> 'updated_at') IS NOT NULL;
    IF p_tables_ts IS NOT NULL
       AND date_trunc('milliseconds', p_tables_ts) <> date_trunc('milliseconds', (p_row ->> 'updated_at')::timestamptz) THEN
        PERFORM zsync.set_base(p_table, p_row, p_tables_ts);
    ELSE
        PERFORM zsync.drop_base(p_table, p_row);
    END IF;
END
$$;

-- (as 20261205600101's, and the fields the Tables records applied set stamped at their versions)
CREATE OR REPLACE FUNCTION zsync.bases_after_batch(p_table regclass, p_ids text[], p_actions text[], p_rows jsonb[],
                                                   p_bts timestamp with time zone[], p_bhash text[], p_inputs jsonb[],
                                                   p_based boolean[], p_inserted jsonb) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_name text := (SELECT relname::text FROM pg_class WHERE oid = p_table);
BEGIN
    PERFORM zsync.assert_synced(p_table);
    -- the fields each Tables record applied set (where it differs from the base, or Supabase changed them since):
    -- at its version, as zsync.base_after_apply stamps them
    UPDATE zsync.sync_base b
    SET field_at = coalesce(b.field_at, '{}'::jsonb) || (
        SELECT coalesce(jsonb_object_agg(n.key, date_trunc('milliseconds', u.bts)), '{}')
        FROM jsonb_each(u.input) n
        WHERE n.key NOT IN ('id', 'updated_at')
          AND (n.value IS DISTINCT FROM b.base -> n.key OR (b.field_at ->> n.key)::timestamptz > b.version))
    FROM unnest(p_ids, p_actions, p_inputs, p_bts, p_based) AS u(id, action, input, bts, based)
    WHERE u.action = 'update' AND u.based AND u.bts IS NOT NULL AND b.table_name = v_name AND b.record_id = u.id;
    WITH l AS (
        SELECT w.*, date_trunc('milliseconds', (w.input ->> 'updated_at')::timestamptz) AS tts
        FROM unnest(p_ids, p_actions, p_rows, p_bts, p_bhash, p_inputs, p_based)
             AS w(id, action, row, bts, bhash, input, based)
        WHERE w.action = 'update' OR (w.action = 'insert' AND p_inserted ? w.id)),
    kept AS (  -- a cell edit applied at edited_at: the base remembers the updated_at Tables' copy carries
        INSERT INTO zsync.sync_base AS b (table_name, record_id, base, version, hash, tables_ts)
        SELECT v_name, l.id, l.row, l.bts, l.bhash, l.tts FROM l WHERE l.tts IS DISTINCT FROM l.bts ORDER BY l.id
        ON CONFLICT ON CONSTRAINT sync_base_pkey DO UPDATE
            SET base = EXCLUDED.base, version = EXCLUDED.version, hash = EXCLUDED.hash,
                tables_ts = EXCLUDED.tables_ts, agreed = true, field_ts = NULL, set_at = now()
            WHERE (EXCLUDED.version, EXCLUDED.hash) > (b.version, b.hash)
        RETURNING 1),
    -- any other record Supabase now holds as Tables sent it (applied, or found equal): no saved base
    -- (zsync.drop_base, set-based)
    agreed AS (
        SELECT l.id, l.row, l.bts, l.bhash FROM l WHERE l.based AND l.tts IS NOT DISTINCT FROM l.bts
        UNION ALL
        SELECT w.id, w.row, w.bts, w.bhash
        FROM unnest(p_ids, p_actions, p_based, p_rows, p_bts, p_bhash) AS w(id, action, based, row, bts, bhash)
        WHERE w.action = 'unchanged' AND w.based),
    gone AS (
        DELETE FROM zsync.sync_base b USING agreed a
        WHERE b.table_name = v_name AND b.record_id = a.id AND NOT zsync.replaced_live(b.replaced)
        RETURNING 1)
    UPDATE zsync.sync_base b
    SET base = a.row, version = a.bts, hash = a.bhash, tables_ts = a.bts, agreed = true, field_ts = NULL, set_at = now()
    FROM agreed a WHERE b.table_name = v_name AND b.record_id = a.id AND zsync.replaced_live(b.replaced);
    IF 'unchanged' = ANY (p_actions) THEN  -- found equal: both hold it, nothing left for a drain to check
        PERFORM zsync.ack_agreed(v_name, array_agg(w.id), array_agg(w.bts))
        FROM unnest(p_ids, p_actions, p_bts) AS w(id, action, bts) WHERE w.action = 'unchanged';
    END IF;
END
$$;

-- (as 20261205600101's, and the fields taken from Tables stamped at its record's version)
CREATE OR REPLACE FUNCTION zsync.base_after_merge(p_table regclass, p_tables jsonb, p_tables_ts timestamp with time zone,
                                       p_supabase jsonb, p_info jsonb) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    v_name text := (SELECT relname::text FROM pg_class WHERE oid = p_table);
    v_ts   jsonb := to_jsonb((SELECT date_trunc('milliseconds', x.ts) FROM zsync.version_of(p_table, p_supabase) x));
    old_ts jsonb;
BEGIN
    IF p_info IS NULL THEN
        RETURN;
    END IF;
    SELECT b.field_ts INTO old_ts FROM zsync.sync_base b WHERE b.table_name = v_name AND b.record_id = p_tables ->> 'id';
    -- the fields Supabase now holds from Tables' record: at that record's version (not the merged one's)
    UPDATE zsync.sync_base b
    SET field_at = coalesce(b.field_at, '{}'::jsonb) || (
        SELECT coalesce(jsonb_object_agg(f.name, date_trunc('milliseconds', (p_tables ->> 'updated_at')::timestamptz)), '{}')
        FROM (SELECT x AS name FROM jsonb_array_elements_text(p_info -> 'tables') x
              UNION
              SELECT k.key FROM jsonb_each_text(p_info -> 'both_later') k WHERE k.value = 'tables') f)
    WHERE b.table_name = v_name AND b.record_id = p_tables ->> 'id' AND (p_tables ->> 'updated_at') IS NOT NULL;
    IF zsync.set_base(p_table, p_tables, p_tables_ts) THEN
        UPDATE zsync.sync_base b
        SET field_ts = (SELECT jsonb_object_agg(f.name, coalesce(old_ts -> f.name, v_ts))
                        FROM (SELECT x AS name FROM jsonb_array_elements_text(p_info -> 'supabase') x
                              UNION
                              SELECT k.key FROM jsonb_each_text(p_info -> 'both_later') k
                              WHERE k.value = 'supabase') f)
        WHERE b.table_name = v_name AND b.record_id = p_tables ->> 'id';
    END IF;
END
$_$;

-- (as 20261206000101's, and an overwritten edit meets Supabase's fields at field_at's times; its merge keeps
-- the base where it is: back_to_tables; an edit is before a write's "until" at full precision, not by the
-- millisecond: an edit made in the same millisecond just before the write is one it overwrote)
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
            -- (a merge of an edit a write overwrote goes back to Tables too: Tables holds that write, not the
            -- edit, so the base stays that write's row - zsync.sync_apply moves it only for other merges)
            || CASE WHEN v_over THEN '{"back_to_tables": true}'::jsonb ELSE '{}'::jsonb END;
END
$$;

-- (as 20261206000101's, and a write's "until" kept at full precision: Zapier's edited_at has microseconds, and
-- an edit in the same millisecond just before the write was taken for one after it)
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
                    'until', coalesce((v_prev ->> 'written_at')::timestamptz, clock_timestamp()),
                    'field_ts', CASE WHEN (v_prev ->> 'blind')::boolean THEN v_fts END)))
            WHERE b.table_name = v_name AND b.record_id = r.row ->> 'id';
        END IF;
    END LOOP;
    RETURN n;
END
$_$;

REVOKE ALL ON FUNCTION zsync.stamp_fields(regclass, jsonb, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.base_before_change(regclass, jsonb, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.maintain_updated_at() FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.base_after_apply(regclass, jsonb, timestamp with time zone) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.base_after_apply(regclass, jsonb, timestamp with time zone) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.bases_after_batch(regclass, text[], text[], jsonb[], timestamp with time zone[], text[], jsonb[], boolean[], jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.bases_after_batch(regclass, text[], text[], jsonb[], timestamp with time zone[], text[], jsonb[], boolean[], jsonb) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.base_after_merge(regclass, jsonb, timestamp with time zone, jsonb, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.base_after_merge(regclass, jsonb, timestamp with time zone, jsonb, jsonb) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.merge_decide_base(regclass, zsync.sync_base, jsonb, timestamp with time zone, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.agree(regclass, jsonb, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.agree(regclass, jsonb, jsonb) TO zsync_sync;
