-- zsync: a blind write whose outcome was not recorded is found before the next write of its record.
--
-- A blind *_to_tables write (20261206000101) is recorded - the known copy moved on to its answer - in the
-- drain's transaction. When that transaction is lost after the PATCH (a Postgres restart, a killed function),
-- the known copy stays where it was, and the next drain of the record wrote the same version again: the same
-- Idempotency-Key only when it sent the very same batch (a soak under load: 10 echo writes from one restart).
-- Worse, an edit that write overwrote in Tables had no replaced record to be merged against: a soak lost a
-- Tables edit that way (its delivery applied as if Tables held it, after the echo of the lost write had
-- acknowledged the pending change).
-- Now the drain announces each blind write in zsync.tables_writing - the known copy it replaces and the version
-- it sends - committed on its own before the PATCH (zsync.announce_blind); recording the drain's finds and
-- answers (zsync.remember_tables) clears it. While an announcement is left:
-- * the record is not written blind (zsync.blind_plan): its next write finds it first;
-- * a find showing the announced version records what the lost drain would have: the known copy replaced until
--   that edited_at (zsync.agree), so an edit the write overwrote is merged against it when its delivery comes;
-- * the write's own echo among Tables deliveries records the same, before the batch is applied
--   (zsync.settle_blind: an edit it overwrote may be in that batch);
-- * any other delivery of the record queues what Supabase then holds for Tables (zsync.requeue): the write may
--   have overwritten what the delivery carries, so Tables is checked, not assumed to hold it.
-- Re-runnable. zsync.remember_tables and zsync.blind_plan are 20261206000101's text plus the lines marked here.

CREATE TABLE IF NOT EXISTS zsync.tables_writing (
    table_name text NOT NULL,
    record_id text NOT NULL,
    known jsonb NOT NULL,  -- the known copy the write replaces (zsync.tables_known.known)
    known_at timestamp with time zone,  -- its edited_at
    version timestamp with time zone,  -- the version the write sends (the row's updated_at, ms)
    announced_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT tables_writing_pkey PRIMARY KEY (table_name, record_id)
);
-- zsync_sync reaches it only through the functions below (SECURITY DEFINER), as zsync.tables_known
REVOKE ALL ON TABLE zsync.tables_writing FROM zsync_sync;

-- The blind writes a drain is about to send, committed before they are sent: p_items = [{"id", "known",
-- "known_at", "version"}] - each record, the known copy its write replaces and the version it sends.
-- -> how many were announced.
CREATE OR REPLACE FUNCTION zsync.announce_blind(p_table text, p_items jsonb) RETURNS integer
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
    INSERT INTO zsync.tables_writing AS w (table_name, record_id, known, known_at, version)
    SELECT DISTINCT ON (e.v ->> 'id') p_table, e.v ->> 'id', e.v -> 'known', (e.v ->> 'known_at')::timestamptz,
           date_trunc('milliseconds', (e.v ->> 'version')::timestamptz)
    FROM jsonb_array_elements(p_items) e(v)
    WHERE e.v ->> 'id' IS NOT NULL AND jsonb_typeof(e.v -> 'known') = 'object'
    ORDER BY e.v ->> 'id'
    ON CONFLICT ON CONSTRAINT tables_writing_pkey DO UPDATE
        SET known = EXCLUDED.known, known_at = EXCLUDED.known_at, version = EXCLUDED.version, announced_at = now();
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Before Tables deliveries are applied (p_items = [{"id", "row", "edited_at"}]): a delivery of the version an
-- announced blind write sent is that write's own echo - it landed, at that edited_at - so what it replaced is
-- recorded as its drain would have (zsync.agree) and the announcement goes, before any delivery of the batch
-- (an edit it overwrote, older, applied after the echo) is merged. -> how many were settled.
CREATE OR REPLACE FUNCTION zsync.settle_blind(p_table text, p_items jsonb) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    n integer := 0;
    v_echo record;
BEGIN
    IF jsonb_typeof(p_items) IS DISTINCT FROM 'array'
       OR NOT EXISTS (SELECT 1 FROM zsync.tables_writing a WHERE a.table_name = p_table) THEN
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

-- (as 20261206000101's, and a recorded find or answer clears the record's announcement)
CREATE OR REPLACE FUNCTION zsync.remember_tables(p_table text, p_items jsonb) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    n integer;
    v_lost record;  -- an unrecorded blind write a find has just seen
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
    -- A find of a record whose blind write went unrecorded (announced, its drain lost): that write replaced the
    -- announced copy in Tables, at the latest by the edited_at the find shows (its own, when the find shows the
    -- version it sent; else an edit made after it). Recorded as the drain would have (zsync.agree), so an edit
    -- it overwrote is merged against that copy when its delivery comes.
    FOR v_lost IN
        SELECT g.v AS item, a.known, a.known_at
        FROM jsonb_array_elements(p_items) g(v)
        JOIN zsync.tables_writing a ON a.table_name = p_table AND a.record_id = g.v ->> 'id'
        WHERE g.v ->> 'tables_id' IS NOT NULL AND NOT coalesce((g.v ->> 'ours')::boolean, false)
          AND (g.v ->> 'edited_at')::timestamptz > a.known_at
    LOOP
        PERFORM zsync.agree(format('public.%I', p_table)::regclass, jsonb_build_array(v_lost.item -> 'row'),
                            jsonb_build_object(v_lost.item ->> 'id', jsonb_build_object(
                                'row', v_lost.known, 'edited_at', v_lost.known_at,
                                'written_at', v_lost.item ->> 'edited_at')));
    END LOOP;
    -- A delivery of a record whose blind write went unrecorded: Tables may not hold what it delivered (that
    -- write may have overwritten it), so what Supabase holds now is queued for Tables, where a drain finds
    -- the record first (zsync.blind_plan) and writes it, or finds it equal - which clears the announcement.
    PERFORM zsync.requeue(p_table, a.record_id)
    FROM zsync.tables_writing a
    WHERE a.table_name = p_table AND a.record_id IN (
        SELECT e.v ->> 'id' FROM jsonb_array_elements(p_items) e(v) WHERE e.v ->> 'tables_id' IS NULL);
    -- a find or a write's answer, recorded: what Tables holds is known again (a delivery is not: it may be older)
    DELETE FROM zsync.tables_writing w
    WHERE w.table_name = p_table AND w.record_id IN (
        SELECT e.v ->> 'id' FROM jsonb_array_elements(p_items) e(v) WHERE e.v ->> 'tables_id' IS NOT NULL);
    RETURN n;
END
$$;

-- (as 20261206000101's, and a record with an announced write left is found first)
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
          AND NOT EXISTS (SELECT 1 FROM zsync.tables_writing w WHERE w.table_name = $1 AND w.record_id = k.record_id)
        ORDER BY k.record_id $q$, p_table)
        USING (SELECT relname::text FROM pg_class WHERE oid = p_table), p_ids,
              coalesce((SELECT (c.value #>> '{}')::float8 FROM zsync.config c WHERE c.key = 'blind_quiet_s'), 30);
END
$_$;

REVOKE ALL ON FUNCTION zsync.settle_blind(text, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.settle_blind(text, jsonb) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.announce_blind(text, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.announce_blind(text, jsonb) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.remember_tables(text, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.remember_tables(text, jsonb) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.blind_plan(regclass, text[]) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.blind_plan(regclass, text[]) TO zsync_sync;
