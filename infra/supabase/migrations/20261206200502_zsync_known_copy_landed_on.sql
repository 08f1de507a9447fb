-- zsync: Tables' copy the sync knows follows an edit that landed on the sync's write though stamped before it.
--
-- A delivery moves the known copy (zsync.tables_known) forward only when its edited_at is later than the copy's
-- (zsync.remember_tables): an older one was overwritten since. But Zapier stamps an edit when it starts, and one
-- that waited for the record lands after a write stamped later (20261206200201): a person's retry_count edit,
-- stamped just before the agent's blind write, landed on it - Tables held the person's record, the sync kept
-- the write's answer. The next blind write counted that answer as the record it replaced, and a second
-- person's note, made on the first person's record and overwritten by that write, was merged against it: the 5
-- it only carried counted as its own later change of retry_count and won over the agent's 7, on both sides
-- (tests/test_write_race.py: test_the_copy_an_edit_stamped_before_the_write_landed_on_...).
-- An edit stamped up to zsync.stamp_race() before the known copy's, when that copy is a *_to_tables write's answer
-- (a zsync.sync_base.replaced entry with that write's edited_at, 'until') and the edit holds that write's values
-- where it changed the record and none of the record it replaced (zsync.edit_holds 'wrote'), landed on it:
-- it becomes the known copy, at the copy's edited_at (so the write's own echo, stamped then, does not move it
-- back), marked as an edit made in Tables (edited_seen_at: the next write finds the record first while the
-- edit is recent, zsync.config blind_quiet_s).
-- Called after zsync.remember_tables with the deliveries taken in (shared/services/from_tables.py). Re-runnable.

CREATE OR REPLACE FUNCTION zsync.remember_landed_on(p_table text, p_items jsonb) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_rel regclass;
    n     integer := 0;
    d     record;
BEGIN
    IF jsonb_typeof(p_items) IS DISTINCT FROM 'array' THEN
        RETURN 0;
    END IF;
    v_rel := format('public.%I', p_table)::regclass;
    FOR d IN
        SELECT DISTINCT ON (k.record_id) k.record_id, i."row" AS copy, k.known_at
        FROM jsonb_to_recordset(p_items) AS i(id text, "row" jsonb, edited_at timestamptz)
        JOIN zsync.tables_known k ON k.table_name = p_table AND k.record_id = i.id
        JOIN zsync.sync_base b ON b.table_name = p_table AND b.record_id = i.id
        CROSS JOIN LATERAL jsonb_array_elements(coalesce(b.replaced, '[]')) e(v)
        WHERE jsonb_typeof(i."row") = 'object'
          AND i.edited_at < k.known_at AND i.edited_at >= k.known_at - zsync.stamp_race()
          AND date_trunc('milliseconds', (e.v ->> 'until')::timestamptz) = date_trunc('milliseconds', k.known_at)
          AND zsync.edit_holds(v_rel, e.v -> 'row', e.v -> 'wrote', i."row") = 'wrote'
        ORDER BY k.record_id, i.edited_at DESC
    LOOP
        UPDATE zsync.tables_known k
        SET known = d.copy, seen_at = now(), edited_seen_at = greatest(k.edited_seen_at, now())
        WHERE k.table_name = p_table AND k.record_id = d.record_id AND k.known_at = d.known_at;
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

REVOKE ALL ON FUNCTION zsync.remember_landed_on(text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION zsync.remember_landed_on(text, jsonb) TO zsync_sync;
