-- zsync: one Tables request for a single Supabase -> Tables change (issue 21 item 3): a *_to_tables function
-- writes a record by its remembered Zapier id without reading it first (a "blind" write).
--
-- * zsync.tables_known: per record, its Zapier record id and the last state of its Tables copy the sync knows
--   of (the record as a find read it, as a write's answer returned it, or as a trigger delivery carried it, with
--   Zapier's edited_at; it only moves forward). zsync.blind_plan hands it to the function instead of a find.
-- * The write sends only the fields that differ from that known state (a person's edit of another field, made
--   in Tables meanwhile, is not overwritten), and passes the known state to zsync.agree as the record it
--   replaced: a person's edit of the same field made in Tables since - its delivery still on the way - was
--   overwritten there, and is merged against that record when it arrives (zsync.merge_decide_base), written
--   back to Tables when it wins.
-- * The replaced records now carry Supabase's field times (sync_base.field_ts) as they were at the write, so
--   an overwritten edit meets each field Supabase changed at the time Supabase changed it - not at the later
--   version of an echo applied since (which would win every field both changed).
-- * A write refused because the record is gone (deleted in Tables, a wrong id) forgets the id and takes the
--   find with the trash, as before. The switch: zsync.config 'blind_writes' ("on" | "off", default on), or
--   the setting zsync.blind_writes for a session; off (the default): every write is found first, as before.
-- Re-runnable: every object is created if missing or replaced.

CREATE TABLE IF NOT EXISTS zsync.tables_known (
    table_name text NOT NULL,
    record_id text NOT NULL,
    tables_id text NOT NULL,  -- the Zapier record id (ULID form)
    known jsonb NOT NULL,  -- the Tables copy as a Supabase row (its own updated_at)
    known_at timestamp with time zone,  -- Zapier's edited_at of that state
    seen_at timestamp with time zone DEFAULT now() NOT NULL,
    edited_seen_at timestamp with time zone,  -- when an edit made in Tables (not the sync's) last moved it forward
    CONSTRAINT tables_known_pkey PRIMARY KEY (table_name, record_id)
);

-- zsync_sync reaches it only through the functions below (SECURITY DEFINER), as zsync.sync_base
REVOKE ALL ON TABLE zsync.tables_known FROM zsync_sync;

-- Off by default: on, a single change costs one request, but the soak under CI load still loses fields (see
-- docs/design-decisions.md); `UPDATE zsync.config SET value = '"on"' WHERE key = 'blind_writes'` turns it on.
INSERT INTO zsync.config (key, value) VALUES ('blind_writes', '"off"') ON CONFLICT (key) DO NOTHING;
-- A record edited in Tables less than this long ago is found before it is written (zsync.blind_plan).
INSERT INTO zsync.config (key, value) VALUES ('blind_quiet_s', '30') ON CONFLICT (key) DO NOTHING;

-- Whether *_to_tables writes go blind: the session's zsync.blind_writes when set, else zsync.config.
CREATE OR REPLACE FUNCTION zsync.blind_writes_on() RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT coalesce(nullif(current_setting('zsync.blind_writes', true), ''),
                    (SELECT c.value #>> '{}' FROM zsync.config c WHERE c.key = 'blind_writes'), 'off') = 'on'
$$;

-- What the sync learned of Tables copies: p_items = [{"id", "tables_id", "row", "edited_at", "ours"}] - a find's
-- read, a write's answer ("ours": true), or a trigger delivery (tables_id NULL: it only moves a copy already
-- known forward). A state older than the one known is ignored; a new Zapier id replaces the old one. A state
-- that moves the copy forward and is not the sync's own write is an edit made in Tables: edited_seen_at (this
-- database's clock) marks the record as being edited there (zsync.blind_plan). -> how many were written.
CREATE OR REPLACE FUNCTION zsync.remember_tables(p_table text, p_items jsonb) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    n integer;
BEGIN
    IF jsonb_typeof(p_items) IS DISTINCT FROM 'array' THEN
        RETURN 0;
    END IF;
    -- one state per record, the latest given; edited: when this state counts as an edit made in Tables
    -- (-infinity: the sync's own write)
    WITH given AS (
        SELECT DISTINCT ON (e.v ->> 'id') e.v ->> 'id' AS record_id, e.v ->> 'tables_id' AS tables_id,
               e.v -> 'row' AS known, (e.v ->> 'edited_at')::timestamptz AS known_at,
               CASE WHEN coalesce((e.v ->> 'ours')::boolean, false) THEN '-infinity'::timestamptz ELSE now() END AS edited
        FROM jsonb_array_elements(p_items) e(v)
        WHERE e.v ->> 'id' IS NOT NULL AND jsonb_typeof(e.v -> 'row') = 'object'
          AND (e.v ->> 'tables_id' IS NOT NULL OR e.v ->> 'edited_at' IS NOT NULL)
        ORDER BY e.v ->> 'id', (e.v ->> 'edited_at')::timestamptz DESC NULLS LAST),
    found AS (  -- a find or a write: its Zapier id too
        INSERT INTO zsync.tables_known AS k (table_name, record_id, tables_id, known, known_at, edited_seen_at)
        SELECT p_table, g.record_id, g.tables_id, g.known, g.known_at, g.edited FROM given g
        WHERE g.tables_id IS NOT NULL ORDER BY g.record_id
        ON CONFLICT ON CONSTRAINT tables_known_pkey DO UPDATE
            SET tables_id = EXCLUDED.tables_id, known = EXCLUDED.known, known_at = EXCLUDED.known_at, seen_at = now(),
                edited_seen_at = CASE WHEN EXCLUDED.known_at > coalesce(k.known_at, '-infinity')
                                      THEN greatest(EXCLUDED.edited_seen_at, k.edited_seen_at) ELSE k.edited_seen_at END
            WHERE k.tables_id IS DISTINCT FROM EXCLUDED.tables_id
               OR EXCLUDED.known_at >= coalesce(k.known_at, '-infinity')
        RETURNING 1),
    delivered AS (  -- a trigger delivery: moves a copy already known forward
        UPDATE zsync.tables_known k SET known = g.known, known_at = g.known_at, seen_at = now(), edited_seen_at = g.edited
        FROM given g
        WHERE g.tables_id IS NULL AND k.table_name = p_table AND k.record_id = g.record_id
          AND g.known_at > coalesce(k.known_at, '-infinity')
        RETURNING 1)
    SELECT (SELECT count(*) FROM found) + (SELECT count(*) FROM delivered) INTO n;
    RETURN n;
END
$$;

-- Zapier ids found wrong (a write by them refused: the record is gone from Tables), or records deleted: the
-- next change of the record takes the find again.
CREATE OR REPLACE FUNCTION zsync.forget_tables(p_table text, p_ids text[]) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    n integer;
BEGIN
    DELETE FROM zsync.tables_known k WHERE k.table_name = p_table AND k.record_id = ANY (p_ids);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Which of p_ids a *_to_tables function may write blind (one PATCH by Zapier id, no find): both switches on,
-- the Supabase row there, its Tables copy known, and no edit made in Tables seen for zsync.config blind_quiet_s
-- (a record people or Zapier agents are editing is likely to have another edit on its way, which a blind write
-- would overwrite until the merge puts it back: such records are found first, as before). -> per such record:
-- its Zapier id, the known state of its copy (what the write replaces) and that state's edited_at.
CREATE OR REPLACE FUNCTION zsync.blind_plan(p_table regclass, p_ids text[])
    RETURNS TABLE(record_id text, tables_id text, known jsonb, known_at timestamp with time zone)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
BEGIN
    IF NOT zsync.field_merge_on() OR NOT zsync.blind_writes_on() THEN
        RETURN;
    END IF;
    PERFORM zsync.assert_synced(p_table);
    RETURN QUERY EXECUTE format($q$
        SELECT k.record_id, k.tables_id, k.known, k.known_at
        FROM zsync.tables_known k JOIN %s t ON t.id = k.record_id
        WHERE k.table_name = $1 AND k.record_id = ANY ($2)
          AND (k.edited_seen_at IS NULL OR k.edited_seen_at < now() - make_interval(secs => $3))
        ORDER BY k.record_id $q$, p_table)
        USING (SELECT relname::text FROM pg_class WHERE oid = p_table), p_ids,
              coalesce((SELECT (c.value #>> '{}')::float8 FROM zsync.config c WHERE c.key = 'blind_quiet_s'), 30);
END
$_$;

-- acknowledges their outbox entries: both sides hold each row. Its saved base goes when the Supabase row is
-- still that version, else (changed since) the row becomes the saved base. p_prevs: {id: {"row", "edited_at",
-- "written_at"}} of the Tables records the writes replaced (as read, with their edited_at) and the writes' own
-- edited_at: a person's edit that landed in Tables between the function's read and its write was overwritten
-- there, and its delivery, still coming, was made from that record - appended to the base's replaced records,
-- the base of a Tables change edited in that window (zsync.merge_decide_base). -> how many bases were written.
-- (as 20261205600101's, and each replaced record keeps Supabase's field times as they were at the write)
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
                    'field_ts', CASE WHEN (v_prev ->> 'blind')::boolean THEN v_fts END)))
            WHERE b.table_name = v_name AND b.record_id = r.row ->> 'id';
        END IF;
    END LOOP;
    RETURN n;
END
$_$;

-- Reconcile found these versions equal on both sides: mark each agreed (an outbox entry acknowledged

-- zsync.merge_decide with the record's base given (a row of zsync.sync_base, read by the caller). As
-- 20261205600101's, except that an edit a write overwrote meets Supabase's field times kept with the record the
-- write replaced.
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
        b.base := v_rep -> 'row';
        b.version := date_trunc('milliseconds', (v_rep -> 'row' ->> 'updated_at')::timestamptz);
        b.hash := (SELECT v.hash FROM zsync.version_of(p_table, v_rep -> 'row') v);
        b.tables_ts := b.version;
        -- Supabase's fields at the times it changed them, when that write is the last one: as they were at the
        -- write, and any changed since (stamped on the base); after a later write, its row's version (a field
        -- may have changed again since, unstamped)
        b.field_ts := CASE WHEN jsonb_typeof(v_rep -> 'field_ts') = 'object' AND (v_rep ->> 'until')::timestamptz
                                >= (SELECT max((e.v ->> 'until')::timestamptz) FROM jsonb_array_elements(b.replaced) e(v))
                           THEN (v_rep -> 'field_ts') || coalesce(b.field_ts, '{}'::jsonb) END;
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

-- zsync.merge_decide for many pairs of one table (the *_to_tables batch): p_pairs = [{"tables", "edited_at",
-- "supabase"}], "supabase" being the row as the caller read it earlier. Each record's current row and base are
-- read in one statement (one snapshot: an apply from Tables moves both in one transaction); where the current
-- row is no longer the one the caller read, 'none' - the whole-record rule decides, as safe with an old read

REVOKE ALL ON FUNCTION zsync.blind_writes_on() FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.remember_tables(text, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.remember_tables(text, jsonb) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.forget_tables(text, text[]) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.forget_tables(text, text[]) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.blind_plan(regclass, text[]) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.blind_plan(regclass, text[]) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.agree(regclass, jsonb, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.agree(regclass, jsonb, jsonb) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.merge_decide_base(regclass, zsync.sync_base, jsonb, timestamp with time zone, jsonb) FROM PUBLIC;
