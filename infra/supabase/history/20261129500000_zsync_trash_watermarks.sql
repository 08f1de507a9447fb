-- zsync: deletes made in Zapier Tables (issue 13 item 4). Zapier keeps deleted records in its trash
-- (`deleted_at`, queried with `trash=only`); a scheduled trash check (shared/tables_trash.py) reads it
-- and applies each delete with zsync.apply_tables_delete. This table remembers, per synced table, the
-- latest Zapier `deleted_at` the check has handled (its watermark, re-read with a safety overlap) and
-- when the check last ran, which `zsync doctor` reports like the outbox sweeper.
CREATE TABLE IF NOT EXISTS zsync.trash_watermarks (
    table_name text PRIMARY KEY,
    watermark  timestamptz,                  -- latest deleted_at handled (NULL: the trash was empty)
    checked_at timestamptz NOT NULL,         -- when the last complete check ended
    seen       integer NOT NULL DEFAULT 0,   -- trashed records the last check considered
    applied    integer NOT NULL DEFAULT 0    -- of those, deletes it applied in Supabase
);

CREATE OR REPLACE FUNCTION zsync.trash_watermark(p_table text)
RETURNS timestamptz LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT watermark FROM zsync.trash_watermarks WHERE table_name = p_table
$$;

-- Record a complete check. The watermark never moves back (two checks may overlap).
CREATE OR REPLACE FUNCTION zsync.trash_checked(p_table text, p_watermark timestamptz, p_seen integer, p_applied integer)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO zsync.trash_watermarks (table_name, watermark, checked_at, seen, applied)
    VALUES (p_table, p_watermark, now(), p_seen, p_applied)
    ON CONFLICT (table_name) DO UPDATE
        SET watermark = CASE WHEN zsync.trash_watermarks.watermark IS NULL THEN EXCLUDED.watermark
                             WHEN EXCLUDED.watermark IS NULL THEN zsync.trash_watermarks.watermark
                             ELSE greatest(zsync.trash_watermarks.watermark, EXCLUDED.watermark) END,
            checked_at = EXCLUDED.checked_at, seen = EXCLUDED.seen, applied = EXCLUDED.applied
$$;

-- Of p_ids, those whose Supabase row was (re)inserted and has not reached Zapier Tables yet (an INSERT
-- still unacknowledged in the outbox): a trashed Tables record with such an id is a copy of an earlier
-- incarnation (e.g. the sync's own delete of it), never a delete of this row. The check skips them; the
-- overlap re-reads them on the next run.
CREATE OR REPLACE FUNCTION zsync.trash_insert_pending(p_table text, p_ids text[])
RETURNS SETOF text LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT DISTINCT o.record_id FROM zsync.outbox o
    WHERE o.table_name = p_table AND o.record_id = ANY (p_ids) AND o.acked_at IS NULL AND o.op = 'INSERT'
$$;

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA zsync FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    zsync.trash_watermark(text),
    zsync.trash_checked(text, timestamptz, integer, integer),
    zsync.trash_insert_pending(text, text[])
TO zsync_sync;
