-- zsync: field-level merge (a three-way merge against the last content both sides agreed on) and no Tables
-- request for the sync's own applies (their echo is no longer checked against Tables).
--
-- * The base of a record: the last content BOTH sides are known to hold. It is the Supabase row itself while
--   Supabase has not moved on from it, so it costs the common path nothing: a version both sides hold is
--   marked by its acknowledged outbox entry ('unchanged': applied from or found equal to Tables; 'applied':
--   written to Tables). zsync.sync_base keeps a copy only when it differs from the row: the row's first
--   change by anyone but the sync saves the agreed row there (zsync.maintain_updated_at), and a Tables cell
--   edit applied at Zapier's edited_at keeps the updated_at Tables' copy carries (tables_ts). The copy moves
--   forward only, is dropped when both sides agree on the row again (zsync.sync_apply, zsync.agree) and with
--   the row's delete - or, while it remembers the Tables records recent *_to_tables writes replaced (their
--   edits' deliveries may still come: zsync.config replaced_keep_s), becomes the row. Never set to a merged
--   record before Tables holds it.
-- * zsync.merge3: the rule, per field. zsync.merge_decide: what a change meets (base, Tables' record,
--   Supabase's row) comes to; both directions call it.
-- * zsync.sync_apply / sync_apply_many / sync_apply_many_set: the merge inside the one atomic path (row lock).
-- * zsync.capture_change: a write the sync applied from Tables (zsync.origin = 'sync') is recorded in the
--   outbox already acknowledged while the merge is on (Tables holds it; the base records that): no drain
--   reads Tables for its echo. A merged record is written under zsync.origin = 'sync_send' and IS queued.
-- * The switch: zsync.config 'field_merge' ("on" | "off", default on), or the setting zsync.field_merge for
--   a session (SET zsync.field_merge = 'off'): off gives the seed's whole-record rule back.
-- Re-runnable: every object is created if missing or replaced.

CREATE TABLE IF NOT EXISTS zsync.sync_base (
    table_name text NOT NULL,
    record_id text NOT NULL,
    base jsonb NOT NULL,
    version timestamp with time zone NOT NULL,
    hash text NOT NULL,
    tables_ts timestamp with time zone,  -- the updated_at Tables' copy carries (a cell edit may be versioned later)
    agreed boolean DEFAULT true NOT NULL,  -- false: saved before its agreement was known (see zsync.merge_decide_base)
    field_ts jsonb,  -- field -> when Supabase last changed it since the base (its writers' updated_at)
    -- The Tables records *_to_tables writes replaced, oldest write first: [{"row", "from", "until"}], "row" the
    -- record as the function read it, "from" its edited_at, "until" the write's own (Zapier's clock). A Tables
    -- edit made in between was overwritten in Tables, and its delivery, still coming, was made from "row".
    replaced jsonb,
    set_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT sync_base_pkey PRIMARY KEY (table_name, record_id)
);

-- zsync_sync reaches it only through the functions below (SECURITY DEFINER), as zsync.tombstones and the outbox
REVOKE ALL ON TABLE zsync.sync_base FROM zsync_sync;

INSERT INTO zsync.config (key, value) VALUES ('field_merge', '"on"') ON CONFLICT (key) DO NOTHING;
-- How long a record's base is kept after the last *_to_tables write that replaced a Tables record (for the
-- deliveries of edits it overwrote, still coming), and how many such records it keeps at most.
INSERT INTO zsync.config (key, value) VALUES ('replaced_keep_s', '3600') ON CONFLICT (key) DO NOTHING;
INSERT INTO zsync.config (key, value) VALUES ('replaced_keep_n', '8') ON CONFLICT (key) DO NOTHING;
-- How long a *_to_tables drain leaves a record to the deliveries of a recent Tables edit when a field both sides
-- changed would go to Tables by the record's time (zsync.merge_decide_many).
INSERT INTO zsync.config (key, value) VALUES ('merge_defer_s', '120') ON CONFLICT (key) DO NOTHING;

-- Whether the field-level merge is on: the session's zsync.field_merge when set, else zsync.config.
CREATE OR REPLACE FUNCTION zsync.field_merge_on() RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT coalesce(nullif(current_setting('zsync.field_merge', true), ''),
                    (SELECT c.value #>> '{}' FROM zsync.config c WHERE c.key = 'field_merge'), 'on') <> 'off'
$$;

-- The operator's switch. Turning the merge off also drops every base: bases are not kept while it is off, so
-- a stale one cannot mislead the merge when it is turned on again (it starts from the next agreed version).
CREATE OR REPLACE FUNCTION zsync.set_field_merge(p_on boolean) RETURNS void
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    INSERT INTO zsync.config (key, value, updated_at)
    VALUES ('field_merge', to_jsonb(CASE WHEN p_on THEN 'on' ELSE 'off' END), now())
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at;
    IF NOT p_on THEN
        DELETE FROM zsync.sync_base;
    END IF;
END
$$;

-- Record p_row (as Supabase stores it, any JSON shape the columns cast from) as the base of its record, when
-- it is later than the base held (version, then hash); p_tables_ts: the updated_at Tables' copy carries, when
-- not p_row's own (a Tables cell edit applied at Zapier's edited_at). -> whether it was recorded.
DROP FUNCTION IF EXISTS zsync.set_base(regclass, jsonb);
DROP FUNCTION IF EXISTS zsync.set_base(regclass, jsonb, timestamp with time zone);
CREATE OR REPLACE FUNCTION zsync.set_base(p_table regclass, p_row jsonb, p_tables_ts timestamp with time zone DEFAULT NULL,
                                          p_agreed boolean DEFAULT true)
    RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v record;
    n integer;
BEGIN
    IF p_row IS NULL OR p_row ->> 'id' IS NULL OR NOT zsync.field_merge_on() THEN
        RETURN false;
    END IF;
    PERFORM zsync.assert_synced(p_table);
    SELECT * INTO v FROM zsync.version_of(p_table, p_row);
    INSERT INTO zsync.sync_base AS b (table_name, record_id, base, version, hash, tables_ts, agreed)
    VALUES ((SELECT relname::text FROM pg_class WHERE oid = p_table), p_row ->> 'id', p_row, v.ts, v.hash,
            date_trunc('milliseconds', coalesce(p_tables_ts, v.ts)), p_agreed)
    ON CONFLICT ON CONSTRAINT sync_base_pkey DO UPDATE
        SET base = EXCLUDED.base, version = EXCLUDED.version, hash = EXCLUDED.hash, tables_ts = EXCLUDED.tables_ts,
            agreed = EXCLUDED.agreed, field_ts = NULL, replaced = zsync.replaced_kept(b.replaced, '[]'),
            set_at = now()
        WHERE (EXCLUDED.version, EXCLUDED.hash) > (b.version, b.hash);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n = 1;
END
$$;

-- A table the sync keeps in Supabase (its updated_at trigger): the base functions, which run as their owner,
-- refuse any other.
CREATE OR REPLACE FUNCTION zsync.assert_synced(p_table regclass) RETURNS void
    LANGUAGE plpgsql STABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = p_table AND tgname = 'zsync_maintain_updated_at') THEN
        RAISE EXCEPTION 'zsync: % is not a synced table', p_table USING ERRCODE = '22023';
    END IF;
END
$$;

-- p_replaced with p_more appended (zsync.sync_base.replaced): the newest zsync.config replaced_keep_n entries,
-- oldest first; NULL when there are none.
CREATE OR REPLACE FUNCTION zsync.replaced_kept(p_replaced jsonb, p_more jsonb) RETURNS jsonb
    LANGUAGE sql STABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT jsonb_agg(k.v ORDER BY k.until, k.n)
    FROM (SELECT e.v, e.n, (e.v ->> 'until')::timestamptz AS until
          FROM jsonb_array_elements(coalesce(p_replaced, '[]') || coalesce(p_more, '[]')) WITH ORDINALITY e(v, n)
          ORDER BY 3 DESC, 2 DESC
          LIMIT (SELECT coalesce((c.value #>> '{}')::integer, 8) FROM zsync.config c WHERE c.key = 'replaced_keep_n')) k
$$;

-- Whether a saved base still has to be kept for the Tables records it remembers a write replaced: the last
-- write was less than zsync.config replaced_keep_s ago (a delivery of an edit it overwrote may still come).
CREATE OR REPLACE FUNCTION zsync.replaced_live(p_replaced jsonb) RETURNS boolean
    LANGUAGE sql STABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT coalesce(max((e.v ->> 'until')::timestamptz), '-infinity') > now() - make_interval(secs =>
               coalesce((SELECT (c.value #>> '{}')::float8 FROM zsync.config c WHERE c.key = 'replaced_keep_s'), 3600))
    FROM jsonb_array_elements(coalesce(p_replaced, '[]')) e(v)
$$;

-- Both sides hold p_row (as Supabase stores it): the record needs no saved base, the row itself is one - the
-- copy goes, unless it still remembers a replaced Tables record (zsync.replaced_live), when it becomes p_row.
CREATE OR REPLACE FUNCTION zsync.drop_base(p_table regclass, p_row jsonb) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_name text := (SELECT relname::text FROM pg_class WHERE oid = p_table);
    v      record;
BEGIN
    DELETE FROM zsync.sync_base b
    WHERE b.table_name = v_name AND b.record_id = p_row ->> 'id' AND NOT zsync.replaced_live(b.replaced);
    IF NOT FOUND THEN
        SELECT * INTO v FROM zsync.version_of(p_table, p_row);
        UPDATE zsync.sync_base b
        SET base = p_row, version = v.ts, hash = v.hash, tables_ts = v.ts, agreed = true, field_ts = NULL,
            set_at = now()
        WHERE b.table_name = v_name AND b.record_id = p_row ->> 'id';
    END IF;
END
$$;

-- Wait for and take the record's lock for this transaction: the advisory lock every writer that reads one
-- side and writes the other holds (shared.adapters.supabase_db.lock_record: the same key). Callers holding
-- several take them in id order, and before any row lock.
CREATE OR REPLACE FUNCTION zsync.lock_record(p_table regclass, p_id text) RETURNS void
    LANGUAGE sql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT pg_advisory_xact_lock(hashtextextended((SELECT relname::text FROM pg_class WHERE oid = p_table) || ':' || p_id, 0))
$$;

-- The saved bases of p_ids (zsync.sync_apply_many_set joins them).
CREATE OR REPLACE FUNCTION zsync.bases_of(p_table text, p_ids text[]) RETURNS SETOF zsync.sync_base
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT * FROM zsync.sync_base b WHERE b.table_name = p_table AND b.record_id = ANY (p_ids)
$$;

-- The latest version a merge may give a record: the future-skew rule's limit (zsync.maintain_updated_at's).
CREATE OR REPLACE FUNCTION zsync.merge_time_limit() RETURNS timestamp with time zone
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT clock_timestamp() + zsync.max_future_skew()
$$;

-- After Supabase stored p_row as Tables holds it (an apply from Tables, 'applied' or 'unchanged'): both hold
-- the row, so the record's saved base goes - unless Tables' copy carries another updated_at (p_tables_ts: a
-- cell edit applied at edited_at), which the base then remembers.
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
    IF p_tables_ts IS NOT NULL
       AND date_trunc('milliseconds', p_tables_ts) <> date_trunc('milliseconds', (p_row ->> 'updated_at')::timestamptz) THEN
        PERFORM zsync.set_base(p_table, p_row, p_tables_ts);
    ELSE
        PERFORM zsync.drop_base(p_table, p_row);
    END IF;
END
$$;

-- Both sides hold these versions (Tables delivered what Supabase stores): acknowledge the record's pending
-- outbox entries up to each ('unchanged', as a drain finding Tables equal would), so the version counts as
-- agreed and no drain reads Tables for it. Never waits for an entry a drain holds. -> entries acknowledged.
CREATE OR REPLACE FUNCTION zsync.ack_agreed(p_table text, p_ids text[], p_versions timestamp with time zone[])
    RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    n integer;
BEGIN
    WITH todo AS (
        SELECT o.id FROM unnest(p_ids, p_versions) AS a(record_id, version)
        JOIN zsync.outbox o ON o.table_name = p_table AND o.record_id = a.record_id AND o.acked_at IS NULL
                           AND o.op <> 'DELETE'
                           AND date_trunc('milliseconds', o.record_updated_at) <= a.version
        WHERE a.record_id !~ '^[0-9A-Z]{26}$'  -- a record created without our id: its way back writes it
        FOR UPDATE OF o SKIP LOCKED),
    done AS (UPDATE zsync.outbox o SET acked_at = now(), ack_outcome = 'unchanged' FROM todo WHERE o.id = todo.id
             RETURNING 1)
    SELECT count(*)::integer INTO n FROM done;
    RETURN n;
END
$$;

-- After a *_to_tables function wrote p_rows to Tables (or found Tables equal to them), in the transaction that
-- acknowledges their outbox entries: both sides hold each row. Its saved base goes when the Supabase row is
-- still that version, else (changed since) the row becomes the saved base. p_prevs: {id: {"row", "edited_at",
-- "written_at"}} of the Tables records the writes replaced (as read, with their edited_at) and the writes' own
-- edited_at: a person's edit that landed in Tables between the function's read and its write was overwritten
-- there, and its delivery, still coming, was made from that record - appended to the base's replaced records,
-- the base of a Tables change edited in that window (zsync.merge_decide_base). -> how many bases were written.
DROP FUNCTION IF EXISTS zsync.agree(regclass, jsonb);
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
                                      clock_timestamp()))))
            WHERE b.table_name = v_name AND b.record_id = r.row ->> 'id';
        END IF;
    END LOOP;
    RETURN n;
END
$_$;

-- Reconcile found these versions equal on both sides: mark each agreed (an outbox entry acknowledged
-- 'unchanged', flagged repair: not a write) where the row is still at that version and no mark is there yet
-- (records synced before the field merge, whose marks the 7-day cleanup removed). -> marks added.
CREATE OR REPLACE FUNCTION zsync.mark_agreed(p_table text, p_ids text[], p_versions timestamp with time zone[])
    RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    n integer;
BEGIN
    IF NOT zsync.field_merge_on() THEN
        RETURN 0;
    END IF;
    PERFORM zsync.assert_synced(format('public.%I', p_table)::regclass);
    EXECUTE format($q$
        INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at, acked_at, ack_outcome, repair)
        SELECT $1, a.id, 'UPDATE', t.updated_at, now(), 'unchanged', true
        FROM unnest($2, $3) AS a(id, version) JOIN public.%I t ON t.id = a.id
        WHERE date_trunc('milliseconds', t.updated_at) = date_trunc('milliseconds', a.version)
          AND NOT EXISTS (SELECT 1 FROM zsync.outbox o WHERE o.table_name = $1 AND o.record_id = a.id
                            AND o.record_updated_at = t.updated_at AND o.ack_outcome IN ('unchanged', 'applied'))
        ORDER BY a.id $q$, p_table) USING p_table, p_ids, p_versions;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$_$;

-- A change to a row by anyone but the sync (zsync.maintain_updated_at, before it is written): the row as it
-- was becomes the record's saved base unless one is kept already (a kept one goes when both sides agree again:
-- zsync.sync_apply, zsync.agree) - agreed when its version's outbox entry is
-- acknowledged 'unchanged' or 'applied'; else saved unconfirmed (agreed = false: a drain may be writing that
-- version to Tables right now, and its acknowledgement confirms it later, see zsync.merge_decide_base) - and
-- the fields it changes are stamped with its updated_at (zsync.merge3 decides a field both sides changed by
-- these times).
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
    SET field_ts = coalesce(b.field_ts, '{}'::jsonb) || (
        SELECT coalesce(jsonb_object_agg(n.key, date_trunc('milliseconds', (p_new ->> 'updated_at')::timestamptz)), '{}')
        FROM jsonb_each(p_new) n WHERE n.key NOT IN ('id', 'updated_at') AND n.value IS DISTINCT FROM p_old -> n.key)
    WHERE b.table_name = v_name AND b.record_id = v_id;
END
$$;

-- The three-way merge of two versions a and b of one record against their base, per column (id and
-- updated_at aside), comparing values as zsync.canonical_row does ("" = null = no value, JSON numbers by
-- value, JSON and arrays as whole values):
--   changed on one side only -> that side's value; changed on both to different values -> the value of the
--   side whose whole version (zsync.version_of: updated_at, then hash) is later; otherwise the later side's.
-- Symmetric (merge3(base, a, b) and merge3(base, b, a) give the same record) and deterministic, so Supabase
-- and Tables compute the same record whichever side decides.
-- -> merged: the record (typed, as to_jsonb of the row type); outcome: 'a' / 'b' when it is that input's
--    content and that input is the later (that input simply wins, no new version), else 'merged' with
--    updated_at = the later input's + 1 ms (strictly after both, so every later plain comparison orders it
--    after both); from_a / from_b: the fields taken from a side that only it changed; both_later: the fields
--    both changed, each with the side ('a' / 'b') whose value was kept.
DROP FUNCTION IF EXISTS zsync.merge3(regclass, jsonb, jsonb, jsonb);
CREATE OR REPLACE FUNCTION zsync.merge3(p_table regclass, p_base jsonb, p_a jsonb, p_b jsonb,
                                        p_a_times jsonb DEFAULT NULL, p_b_times jsonb DEFAULT NULL,
                                        OUT merged jsonb, OUT outcome text, OUT from_a text[], OUT from_b text[],
                                        OUT both_later jsonb) RETURNS record
    LANGUAGE plpgsql STABLE
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    q      text := format('SELECT to_jsonb(x) FROM jsonb_populate_record(NULL::%s, $1) x', p_table);
    ta     jsonb;
    tb     jsonb;
    tz     jsonb;
    ca     jsonb;
    cb     jsonb;
    cz     jsonb;
    va     record;
    vb     record;
    a_late boolean;
    a_ch   boolean;
    b_ch   boolean;
    c      text;
    ta_c   timestamptz;
    tb_c   timestamptz;
    c_a    boolean;  -- a field both changed: a's value is kept
    early  text[] := '{}';  -- fields taken from the earlier side
BEGIN
    EXECUTE q INTO ta USING p_a;
    EXECUTE q INTO tb USING p_b;
    EXECUTE q INTO tz USING coalesce(p_base, '{}'::jsonb);
    SELECT * INTO va FROM zsync.version_of_typed(p_table, ta);
    SELECT * INTO vb FROM zsync.version_of_typed(p_table, tb);
    a_late := (va.ts, va.hash) >= (vb.ts, vb.hash);
    ca := zsync.canonical_row(p_table, ta);
    cb := zsync.canonical_row(p_table, tb);
    cz := zsync.canonical_row(p_table, tz);
    merged := CASE WHEN a_late THEN ta ELSE tb END;
    from_a := '{}';
    from_b := '{}';
    both_later := '{}';
    FOR c IN SELECT a.attname::text FROM pg_attribute a
             WHERE a.attrelid = p_table AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
               AND a.attname NOT IN ('id', 'updated_at') ORDER BY a.attnum LOOP
        a_ch := (ca -> c) IS DISTINCT FROM (cz -> c);
        b_ch := (cb -> c) IS DISTINCT FROM (cz -> c);
        IF a_ch AND b_ch THEN
            IF (ca -> c) IS DISTINCT FROM (cb -> c) THEN
                -- the later change of the field: each side's time for it (its writer's, where known), else
                -- its whole version's; equal times: the later whole version
                ta_c := coalesce((p_a_times ->> c)::timestamptz, va.ts);
                tb_c := coalesce((p_b_times ->> c)::timestamptz, vb.ts);
                c_a := CASE WHEN ta_c <> tb_c THEN ta_c > tb_c ELSE a_late END;
                both_later := both_later || jsonb_build_object(c, CASE WHEN c_a THEN 'a' ELSE 'b' END);
                IF c_a <> a_late THEN
                    merged := jsonb_set(merged, ARRAY[c], coalesce(CASE WHEN c_a THEN ta ELSE tb END -> c, 'null'::jsonb));
                    early := early || c;
                END IF;
            END IF;
        ELSIF a_ch THEN
            from_a := from_a || c;
            IF NOT a_late THEN
                merged := jsonb_set(merged, ARRAY[c], coalesce(ta -> c, 'null'::jsonb));
                early := early || c;
            END IF;
        ELSIF b_ch THEN
            from_b := from_b || c;
            IF a_late THEN
                merged := jsonb_set(merged, ARRAY[c], coalesce(tb -> c, 'null'::jsonb));
                early := early || c;
            END IF;
        END IF;
    END LOOP;
    IF cardinality(early) = 0 THEN
        outcome := CASE WHEN a_late THEN 'a' ELSE 'b' END;
        RETURN;
    END IF;
    outcome := 'merged';
    merged := jsonb_set(merged, '{updated_at}', to_jsonb(greatest(va.ts, vb.ts) + interval '1 millisecond'));
END
$_$;

-- What a change meets, for a record with a base: p_tables (Tables' record, with Zapier's p_edited_at) and
-- p_supabase (Supabase's row). Both directions call it under the record's lock.
-- Tables changed since the base when its content differs from the base's and its version is later: its
-- updated_at, or - a cell edit that left updated_at as the base's Tables copy carries it - Zapier's
-- edited_at, if after the base's version.
-- -> action:
--   'none'     no base, the merge is off, or nothing the base can decide: the whole-record rule, as before;
--   'same'     both hold the base's content (versions may differ): nothing to do;
--   'supabase' Supabase's row wins whole (Tables did not change since the base: a late echo, a stale
--              delivery); merged = p_supabase;
--   'tables'   Tables' record wins whole; merged = it, at the version it counts for (edited_at, see above);
--   'merged'   fields from both: merged = the merged record (zsync.merge3), info names the fields by side.
CREATE OR REPLACE FUNCTION zsync.merge_decide(p_table regclass, p_tables jsonb, p_edited_at timestamp with time zone,
                                              p_supabase jsonb, OUT action text, OUT merged jsonb, OUT info jsonb)
    RETURNS record
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    b zsync.sync_base;
BEGIN
    action := 'none';
    IF p_tables IS NULL OR p_supabase IS NULL OR NOT zsync.field_merge_on() THEN
        RETURN;
    END IF;
    SELECT * INTO b FROM zsync.sync_base x
    WHERE x.table_name = (SELECT relname::text FROM pg_class WHERE oid = p_table) AND x.record_id = p_supabase ->> 'id';
    IF FOUND THEN
        SELECT * INTO action, merged, info FROM zsync.merge_decide_base(p_table, b, p_tables, p_edited_at, p_supabase);
    END IF;
END
$$;

-- zsync.merge_decide with the record's base given (a row of zsync.sync_base, read by the caller).
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
        b.field_ts := NULL;
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
-- as it always was (the base-aware answers are only right about the row as it is).
CREATE OR REPLACE FUNCTION zsync.merge_decide_many(p_table regclass, p_pairs jsonb)
    RETURNS TABLE(ord integer, action text, merged jsonb, info jsonb)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    r record;
    d record;
BEGIN
    IF jsonb_typeof(p_pairs) IS DISTINCT FROM 'array' THEN
        RETURN;
    END IF;
    PERFORM zsync.assert_synced(p_table);
    FOR r IN EXECUTE format($q$
        SELECT e.n::integer AS n, e.p, to_jsonb(t) AS cur, b AS base
        FROM jsonb_array_elements($1) WITH ORDINALITY AS e(p, n)
             LEFT JOIN %1$s t ON t.id = e.p -> 'supabase' ->> 'id'
             LEFT JOIN zsync.sync_base b ON $2 AND b.table_name = $3 AND b.record_id = e.p -> 'supabase' ->> 'id'
        ORDER BY e.n $q$, p_table)
        USING p_pairs, zsync.field_merge_on(), (SELECT relname::text FROM pg_class WHERE oid = p_table) LOOP
        ord := r.n;
        action := 'none';
        merged := NULL;
        info := NULL;
        IF r.cur IS NOT NULL AND (r.base).record_id IS NOT NULL
           AND (SELECT (v.ts, v.hash) FROM zsync.version_of_typed(p_table, r.cur) v)
               = (SELECT (v.ts, v.hash) FROM zsync.version_of(p_table, r.p -> 'supabase') v) THEN
            SELECT * INTO d FROM zsync.merge_decide_base(p_table, r.base, r.p -> 'tables',
                                                         (r.p ->> 'edited_at')::timestamptz, r.p -> 'supabase');
            action := d.action;
            merged := d.merged;
            info := d.info;
            -- A field both sides changed goes to Tables by its record's time - an upper bound when Tables was
            -- edited more than once since the base: the record read holds every edit whose delivery is still on
            -- its way, at the last one's time. While the edit is recent (zsync.config merge_defer_s) the drain
            -- leaves the record to those deliveries, which come one edit at a time (zsync.sync_apply decides
            -- each exactly, and sends what Supabase keeps back to Tables); its entry stays pending for the
            -- sweeper, which decides it here once the edit is older (a delivery that never came).
            IF d.action IN ('tables', 'merged') AND (r.p ->> 'edited_at')::timestamptz > now() - make_interval(
                   secs => coalesce((SELECT (c.value #>> '{}')::float8 FROM zsync.config c WHERE c.key = 'merge_defer_s'), 120))
               AND EXISTS (SELECT 1 FROM jsonb_each_text(coalesce(d.info -> 'both_later', '{}')) k WHERE k.value = 'tables') THEN
                action := 'deferred';
                merged := NULL;
            END IF;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$_$;

-- Writes made by the sync: zsync.origin = 'sync' (a version Tables holds: not queued for Tables while the
-- merge is on) or 'sync_send' (a merged version: queued); the updated_at maintenance leaves the version both
-- carry untouched. Otherwise as the baseline's.
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

-- As the baseline's, plus: an INSERT or UPDATE the sync applied from Tables (zsync.origin = 'sync') is
-- recorded already acknowledged ('unchanged': Tables holds that content, and the apply recorded it as the
-- base), so no *_to_tables drain reads Tables to find its echo - while the merge is on, and except a record
-- whose id is a Zapier record id (created in Tables with an empty id cell: its way back writes the id into
-- it). The entry stays as the record of the write. A DELETE drops the record's base.
CREATE OR REPLACE FUNCTION zsync.capture_change() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_echo boolean := coalesce(current_setting('zsync.origin', true), '') = 'sync' AND zsync.field_merge_on();
BEGIN
    IF TG_LEVEL = 'STATEMENT' THEN
        IF TG_OP = 'DELETE' THEN
            INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at)
            SELECT TG_TABLE_NAME, o.id, 'DELETE', t.version
            FROM zsync_old_rows o JOIN zsync.tombstones t ON t.table_name = TG_TABLE_NAME AND t.record_id = o.id;
            DELETE FROM zsync.sync_base b USING zsync_old_rows o
            WHERE b.table_name = TG_TABLE_NAME AND b.record_id = o.id;
        ELSE
            INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at, acked_at, ack_outcome)
            SELECT TG_TABLE_NAME, n.id, TG_OP, n.updated_at,
                   CASE WHEN v_echo AND n.id !~ '^[0-9A-Z]{26}$' THEN now() END,
                   CASE WHEN v_echo AND n.id !~ '^[0-9A-Z]{26}$' THEN 'unchanged' END
            FROM zsync_new_rows n;
        END IF;
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at)
        SELECT TG_TABLE_NAME, OLD.id, 'DELETE', t.version
        FROM zsync.tombstones t WHERE t.table_name = TG_TABLE_NAME AND t.record_id = OLD.id;
        DELETE FROM zsync.sync_base b WHERE b.table_name = TG_TABLE_NAME AND b.record_id = OLD.id;
        RETURN OLD;
    END IF;
    v_echo := v_echo AND NEW.id !~ '^[0-9A-Z]{26}$';
    INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at, acked_at, ack_outcome)
    VALUES (TG_TABLE_NAME, NEW.id, TG_OP, NEW.updated_at, CASE WHEN v_echo THEN now() END,
            CASE WHEN v_echo THEN 'unchanged' END);
    RETURN NEW;
END
$$;

-- The apply of a Tables record to Supabase: as the baseline's, plus the merge (zsync.merge_decide) for a
-- record with a base, and the base recorded when Supabase ends up holding what Tables sent ('applied' /
-- 'unchanged'). New outcome 'merged': Supabase now holds the merged record (written under zsync.origin =
-- 'sync_send', so it is queued for Tables); merge: which fields came from where. The base is not moved to the
-- merged record here (Tables does not hold it yet: the *_to_tables write does that) but to the Tables record
-- merged (zsync.base_after_merge, below), the two records' common ancestor.
DROP FUNCTION IF EXISTS zsync.sync_apply_many(regclass, jsonb);
DROP FUNCTION IF EXISTS zsync.sync_apply_many_set(regclass, jsonb);
DROP FUNCTION IF EXISTS zsync.sync_apply(regclass, jsonb, timestamp with time zone);

-- After a change from Tables (p_tables, at the version it counts for; p_tables_ts the updated_at its copy carries)
-- met Supabase's row (p_supabase, before) field by field - merged, or every change of it lost to Supabase's later
-- ones; p_info: zsync.merge_decide's info - p_tables becomes the record's base. It is the common ancestor of what
-- Tables holds (p_tables, or a later edit made from it) and of what Supabase now holds (which took all of its
-- changes), so the next Tables change is compared with it, not with the older base it was merged against (which
-- would count p_tables' old values as that change's own). The fields Supabase's row holds differently from
-- p_tables - those the decision took from Supabase - keep their times (field_ts: the old base's stamp, else
-- Supabase's version), so a later conflict on them still goes to the later change.
DROP FUNCTION IF EXISTS zsync.base_after_merge(regclass, jsonb, timestamp with time zone, jsonb, jsonb);
CREATE FUNCTION zsync.base_after_merge(p_table regclass, p_tables jsonb, p_tables_ts timestamp with time zone,
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
REVOKE ALL ON FUNCTION zsync.base_after_merge(regclass, jsonb, timestamp with time zone, jsonb, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.base_after_merge(regclass, jsonb, timestamp with time zone, jsonb, jsonb) TO zsync_sync;

CREATE FUNCTION zsync.sync_apply(p_table regclass, p_row jsonb, p_edited_at timestamp with time zone,
                                 OUT outcome text, OUT stored jsonb, OUT applied jsonb, OUT merge jsonb) RETURNS record
    LANGUAGE plpgsql
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
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
    m      record;
    v_tts  timestamptz := (p_row ->> 'updated_at')::timestamptz;  -- the updated_at Tables' copy carries
BEGIN
    IF v_id IS NULL THEN
        RAISE EXCEPTION 'sync_upsert: row has no id' USING ERRCODE = '22023';
    END IF;
    PERFORM set_config('zsync.origin', 'sync', true);
    -- The record's lock (the *_to_tables functions hold it while they write the record to Tables:
    -- shared.adapters.supabase_db.lock_record): a write in progress finishes, and records what Tables holds
    -- now (zsync.agree), before a change from Tables is compared with it. Taken before any row lock.
    PERFORM zsync.lock_record(p_table, v_id);
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
                PERFORM zsync.base_after_apply(p_table, p_row, v_tts);
                RETURN;
            END IF;
            CONTINUE;  -- a concurrent insert won the race: lock that row and compare
        END IF;
        SELECT * INTO i_ts, i_hash FROM zsync.version_of(p_table, p_row);
        SELECT * INTO s_ts, s_hash FROM zsync.version_of_typed(p_table, stored);
        IF NOT (i_ts = s_ts AND i_hash = s_hash) THEN
            SELECT * INTO m FROM zsync.merge_decide(p_table, p_row, p_edited_at, stored);
            IF m.action = 'same' THEN
                outcome := 'unchanged';  -- both hold the base's content (versions differ): the base stays
                RETURN;
            ELSIF m.action = 'supabase' THEN
                outcome := 'skipped_stale';
                IF m.info IS NOT NULL THEN  -- Tables' change met and lost field by field: its record is the base now
                    PERFORM zsync.base_after_merge(p_table,
                        p_row || jsonb_build_object('updated_at', m.info -> 'tables_version'), v_tts, stored, m.info);
                END IF;
                RETURN;
            ELSIF m.action IN ('tables', 'merged') THEN
                SELECT string_agg(format('%I', attname), ', ' ORDER BY attnum) INTO v_cols
                FROM pg_attribute
                WHERE attrelid = p_table AND attnum > 0 AND NOT attisdropped AND attgenerated = '' AND attname <> 'id';
                IF m.action = 'merged' THEN
                    PERFORM set_config('zsync.origin', 'sync_send', true);
                END IF;
                EXECUTE format('UPDATE %1$s t SET (%2$s) = (SELECT %2$s FROM jsonb_populate_record(NULL::%1$s, $1)) WHERE t.id = $2',
                               p_table, v_cols) USING m.merged, v_id;
                PERFORM set_config('zsync.origin', 'sync', true);
                applied := m.merged;
                IF m.action = 'merged' THEN
                    outcome := 'merged';
                    merge := m.info;
                    -- (not when the record goes back to Tables: Tables holds the drain's write, the base already)
                    IF NOT coalesce((m.info ->> 'back_to_tables')::boolean, false) THEN
                        PERFORM zsync.base_after_merge(p_table,
                            p_row || jsonb_build_object('updated_at', m.info -> 'tables_version'), v_tts, stored, m.info);
                    END IF;
                ELSE
                    outcome := 'applied';
                    PERFORM zsync.base_after_apply(p_table, m.merged, v_tts);
                END IF;
                RETURN;
            END IF;
        END IF;
        IF p_edited_at IS NOT NULL AND i_ts = s_ts AND i_hash <> s_hash
           AND date_trunc('milliseconds', p_edited_at) > i_ts THEN
            -- Edited in Tables after the version both sides share, without a new updated_at.
            i_ts := greatest(date_trunc('milliseconds', p_edited_at), s_ts + interval '1 millisecond');
            p_row := p_row || jsonb_build_object('updated_at', i_ts);
        END IF;
        IF i_ts = s_ts AND i_hash = s_hash THEN
            outcome := 'unchanged';
            IF zsync.field_merge_on() THEN
                PERFORM zsync.base_after_apply(p_table, stored, v_tts);
                PERFORM zsync.ack_agreed((SELECT relname::text FROM pg_class WHERE oid = p_table), ARRAY[v_id], ARRAY[s_ts]);
            END IF;
        ELSIF (i_ts, i_hash) > (s_ts, s_hash) THEN
            SELECT string_agg(format('%I', attname), ', ' ORDER BY attnum) INTO v_cols
            FROM pg_attribute
            WHERE attrelid = p_table AND attnum > 0 AND NOT attisdropped AND attgenerated = '' AND attname <> 'id';
            EXECUTE format('UPDATE %1$s t SET (%2$s) = (SELECT %2$s FROM jsonb_populate_record(NULL::%1$s, $1)) WHERE t.id = $2',
                           p_table, v_cols) USING p_row, v_id;
            outcome := 'applied';
            applied := p_row;
            PERFORM zsync.base_after_apply(p_table, p_row, v_tts);
        ELSE
            outcome := 'skipped_stale';
        END IF;
        RETURN;
    END LOOP;
END
$_$;

CREATE OR REPLACE FUNCTION zsync.sync_upsert(p_table regclass, p_row jsonb, OUT outcome text, OUT stored jsonb) RETURNS record
    LANGUAGE sql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT a.outcome, a.stored FROM zsync.sync_apply(p_table, p_row, NULL) a
$$;
-- zsync.base_after_apply for a batch (zsync.sync_apply_many_set's arrays, id order): a cell edit applied at
-- edited_at keeps the updated_at Tables' copy carries; any other record Supabase now holds as Tables sent it
-- (applied, or found equal) drops its saved base; what was found equal is acknowledged (zsync.ack_agreed).
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

-- As the baseline's, with the merge column (zsync.sync_apply's).
CREATE FUNCTION zsync.sync_apply_many(p_table regclass, p_rows jsonb) RETURNS TABLE(ord integer, record_id text, outcome text, stored jsonb, applied jsonb, merge jsonb)
    LANGUAGE plpgsql
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
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
        merge := u.merge;
        RETURN NEXT;
    END LOOP;
END
$$;

-- As the baseline's, with the merge: a row whose record has a base (merge on) goes the row path (action
-- 'later': zsync.sync_apply, which merges) unless it is the common case the set-based rule decides exactly as
-- zsync.merge_decide would - Supabase still holds the base's version and Tables sent a later one, which wins
-- whole. The bases of what was applied or found unchanged are recorded in one statement.
CREATE FUNCTION zsync.sync_apply_many_set(p_table regclass, p_rows jsonb) RETURNS TABLE(ord integer, record_id text, outcome text, stored jsonb, applied jsonb, merge jsonb)
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
                               AS b_replaced_until,
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
                                     AND NOT coalesce(date_trunc('milliseconds', e.edited_at) < e.b_replaced_until, false)
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

-- The Database Webhook trigger: as the baseline's, except for a write the sync applied from Tables while the
-- merge is on (zsync.origin = 'sync'): its outbox entry is recorded acknowledged, so there is nothing to drain
-- and no wake-up is sent (a wasted one would also take the function's wake-up slot from the next real change:
-- drain rounds start at least ZSYNC_OUTBOX_WAKE_MIN_INTERVAL_S apart). A DELETE, a record created without our
-- id, and a merged write ('sync_send') wake it as before.
CREATE OR REPLACE FUNCTION zsync.webhook_request() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    IF TG_OP <> 'DELETE' AND coalesce(current_setting('zsync.origin', true), '') = 'sync'
       AND NEW.id !~ '^[0-9A-Z]{26}$' AND zsync.field_merge_on() THEN
        RETURN NULL;
    END IF;
    PERFORM zsync.wake(TG_TABLE_NAME);
    RETURN NULL;
END
$$;

-- As the baseline's, keeping the marks of agreed versions (see the DELETE).
CREATE OR REPLACE FUNCTION zsync.sweep_outbox(p_min_age interval DEFAULT '00:00:30'::interval, p_limit integer DEFAULT 200) RETURNS integer
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    r      record;
    v_sent integer := 0;
BEGIN
    -- A record's newest entry acknowledged as held on both sides ('unchanged' / 'applied') is kept: it marks
    -- the version both sides agreed on, which the field merge's base is (see zsync.maintain_updated_at).
    DELETE FROM zsync.outbox o WHERE o.acked_at < now() - interval '7 days'
      AND (o.ack_outcome IS DISTINCT FROM 'unchanged' AND o.ack_outcome IS DISTINCT FROM 'applied'
           OR EXISTS (SELECT 1 FROM zsync.outbox n WHERE n.table_name = o.table_name AND n.record_id = o.record_id
                        AND n.record_updated_at > o.record_updated_at));
    FOR r IN
        SELECT o.id, o.table_name, o.record_id, o.op
        FROM zsync.outbox o
        JOIN zsync.webhook_endpoints e USING (table_name)
        WHERE o.acked_at IS NULL
          AND coalesce(o.last_sent_at, o.created_at) < now() - p_min_age * power(2, least(o.attempts, 6))
          AND NOT EXISTS (SELECT 1 FROM zsync.outbox n
                          WHERE n.table_name = o.table_name AND n.record_id = o.record_id
                            AND n.acked_at IS NULL AND n.id > o.id)
        ORDER BY o.id
        LIMIT p_limit
        FOR UPDATE OF o SKIP LOCKED
    LOOP
        IF zsync.announce(r.table_name, r.record_id, r.op) THEN
            UPDATE zsync.outbox SET attempts = attempts + 1, last_sent_at = now() WHERE id = r.id;
            v_sent := v_sent + 1;
        ELSE  -- deleted since, without a tombstone: nothing to send
            UPDATE zsync.outbox SET acked_at = now(), ack_outcome = 'row_deleted' WHERE id = r.id;
        END IF;
    END LOOP;
    INSERT INTO zsync.sweeper_runs (id, last_at, sent) VALUES (true, now(), v_sent)
    ON CONFLICT (id) DO UPDATE SET last_at = EXCLUDED.last_at, sent = EXCLUDED.sent;
    RETURN v_sent;
END
$$;

-- Roles and grants (as the baseline's for the objects it defines) -------------------------------------------
REVOKE ALL ON FUNCTION zsync.sync_apply(regclass, jsonb, timestamp with time zone) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.sync_apply(regclass, jsonb, timestamp with time zone) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.sync_apply_many(regclass, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.sync_apply_many(regclass, jsonb) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.sync_apply_many_set(regclass, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.sync_apply_many_set(regclass, jsonb) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.sync_upsert(regclass, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.sync_upsert(regclass, jsonb) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.assert_synced(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.bases_of(text, text[]) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.bases_of(text, text[]) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.bases_after_batch(regclass, text[], text[], jsonb[], timestamp with time zone[], text[], jsonb[], boolean[], jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.bases_after_batch(regclass, text[], text[], jsonb[], timestamp with time zone[], text[], jsonb[], boolean[], jsonb) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.field_merge_on() FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.field_merge_on() TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.set_field_merge(boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.set_base(regclass, jsonb, timestamp with time zone, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.base_before_change(regclass, jsonb, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.replaced_kept(jsonb, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.replaced_live(jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.drop_base(regclass, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.lock_record(regclass, text) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.lock_record(regclass, text) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.base_after_apply(regclass, jsonb, timestamp with time zone) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.base_after_apply(regclass, jsonb, timestamp with time zone) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.ack_agreed(text, text[], timestamp with time zone[]) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.ack_agreed(text, text[], timestamp with time zone[]) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.mark_agreed(text, text[], timestamp with time zone[]) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.mark_agreed(text, text[], timestamp with time zone[]) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.agree(regclass, jsonb, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.agree(regclass, jsonb, jsonb) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.merge3(regclass, jsonb, jsonb, jsonb, jsonb, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.merge_decide(regclass, jsonb, timestamp with time zone, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.merge_decide(regclass, jsonb, timestamp with time zone, jsonb) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.merge_decide_base(regclass, zsync.sync_base, jsonb, timestamp with time zone, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.merge_decide_many(regclass, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.merge_decide_many(regclass, jsonb) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.maintain_updated_at() FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.capture_change() FROM PUBLIC;
REVOKE ALL ON FUNCTION zsync.merge_time_limit() FROM PUBLIC;
