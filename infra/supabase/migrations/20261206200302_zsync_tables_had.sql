-- zsync: a blind write never sends a version Tables already had.
--
-- A *_to_tables drain writes a record blind (no find) when the sync knows its Tables copy
-- (zsync.tables_known). Soaks with blind writes on still wrote, now and then, a version Tables already held: a
-- person's edit, applied to Supabase, whose delivery had not moved the known copy forward (the cause not found:
-- each time under chaos, a Postgres restart near the record's previous write), then a sweep re-sent an older
-- change of the record and the drain wrote the current row - the person's version - over itself (an echo: one
-- request wasted, nothing lost, but it is the write the sync exists not to make).
-- The outbox says which versions Tables had: an entry acknowledged 'unchanged' (applied from Tables, or found
-- equal there) or 'applied' (written there). Such a row, its known copy older, is found first instead
-- (shared.services.to_tables.write_blind): the find sees what Tables holds and writes nothing, or a real
-- difference the usual rules decide. -> of p_ids at p_versions, those whose version Tables had.
CREATE OR REPLACE FUNCTION zsync.tables_had(p_table text, p_ids text[], p_versions timestamp with time zone[])
    RETURNS text[]
    LANGUAGE sql STABLE SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT coalesce(array_agg(DISTINCT a.id ORDER BY a.id), '{}')
    FROM unnest(p_ids, p_versions) AS a(id, version)
    WHERE EXISTS (SELECT 1 FROM zsync.outbox o
                  WHERE o.table_name = p_table AND o.record_id = a.id AND o.acked_at IS NOT NULL
                    AND o.ack_outcome IN ('unchanged', 'applied')
                    AND date_trunc('milliseconds', o.record_updated_at) = date_trunc('milliseconds', a.version))
$$;

REVOKE ALL ON FUNCTION zsync.tables_had(text, text[], timestamp with time zone[]) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.tables_had(text, text[], timestamp with time zone[]) TO zsync_sync;
