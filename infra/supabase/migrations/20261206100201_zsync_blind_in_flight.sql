-- zsync: a blind write whose outcome was not recorded is found before the next write of its record.
--
-- A blind *_to_tables write (20261206000101) is recorded - the known copy moved on to its answer - in the
-- drain's transaction. When that transaction is lost after the PATCH (a Postgres restart, a killed function),
-- the known copy stays where it was, and the next drain of the record wrote the same version again: the same
-- Idempotency-Key only when it sent the very same batch (a soak under load: 10 echo writes from one restart).
-- Now the drain announces each blind write in zsync.tables_writing, committed on its own before the PATCH
-- (zsync.announce_blind); recording the drain's finds and answers (zsync.remember_tables) clears it. A record
-- with an announcement left is not written blind (zsync.blind_plan): its next write finds it first, sees the
-- version already there, and clears it - as the find path always did.
-- Re-runnable. zsync.remember_tables and zsync.blind_plan are 20261206000101's text plus the lines marked here.

CREATE TABLE IF NOT EXISTS zsync.tables_writing (
    table_name text NOT NULL,
    record_id text NOT NULL,
    announced_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT tables_writing_pkey PRIMARY KEY (table_name, record_id)
);
-- zsync_sync reaches it only through the functions below (SECURITY DEFINER), as zsync.tables_known
REVOKE ALL ON TABLE zsync.tables_writing FROM zsync_sync;

-- The blind writes a drain is about to send (p_ids of table p_table), committed before they are sent.
-- -> how many were announced.
CREATE OR REPLACE FUNCTION zsync.announce_blind(p_table text, p_ids text[]) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    n integer;
BEGIN
    INSERT INTO zsync.tables_writing AS w (table_name, record_id)
    SELECT p_table, i FROM unnest(p_ids) i WHERE i IS NOT NULL ORDER BY i
    ON CONFLICT ON CONSTRAINT tables_writing_pkey DO UPDATE SET announced_at = now();
    GET DIAGNOSTICS n = ROW_COUNT;
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

REVOKE ALL ON FUNCTION zsync.announce_blind(text, text[]) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.announce_blind(text, text[]) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.remember_tables(text, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.remember_tables(text, jsonb) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.blind_plan(regclass, text[]) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.blind_plan(regclass, text[]) TO zsync_sync;
