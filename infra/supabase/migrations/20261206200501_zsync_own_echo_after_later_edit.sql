-- zsync: the late echo of the sync's own write is no edit made on a Tables edit that came after it.
--
-- zsync.overwritten_by (20261206200201) counts a *_to_tables write's own record (zsync.edit_holds 'write': its
-- delivery, or a find) as what replaced the record's base: meant for a base that is an edit the write
-- overwrote, taken in first, against which the write's record would count as an edit made on it. But the base
-- can as well be an edit made after the write landed: a person sees the agent's status in Tables and, more than
-- zsync.stamp_race() later, sets it back (and sets retry_count); Supabase takes it, and it is the base. When the
-- write's echo came after that (deliveries are not ordered: the inbox hands out no order, a direct delivery
-- overtakes a leased one), it was merged against the record the write replaced - the agent's old status counted
-- as a change Supabase lacked and came back over the person's later one, on both sides, and the merge went to
-- Tables again (tests/test_write_race.py: test_a_late_echo_of_the_sync_s_own_write_...).
-- Now the write's own record is taken for what replaced the base only when the base could have been overwritten
-- by it: not when the base is a Tables copy stamped zsync.stamp_race() or more after the write, or one holding
-- the write's values (zsync.edit_holds 'wrote': made on the write's record, wherever its stamp). The echo is then
-- taken in already (Supabase's row holds what the write put there, or a later decision): zsync.merge_decide_base
-- answers 'supabase', the delivery is stale. Left to the other rules instead, the echo of a write that an edit
-- stamped before it landed on (the base) came after that copy was seen, and counted as an edit made on it with
-- an older updated_at: its values won back over the person's (test_an_edit_stamped_before_the_sync_s_write_...).
-- (zsync.overwritten_by whole, as 20261206200201's but the lines marked; it runs as its caller - zsync_sync in
-- zsync.sync_apply_many_set - so the copy is read by zsync.base_as_seen, as the owner. Re-runnable.)

-- The copy of a record's saved base (zsync.sync_base) Tables held, as the sync saw it last (a delivery kept by
-- zsync.settle_blind, a find, a write's answer): its row (copy) and edited_at (copied_at); none when no copy seen holds the base.
CREATE OR REPLACE FUNCTION zsync.base_as_seen(p_table regclass, p_id text, OUT copy jsonb, OUT copied_at timestamptz)
    RETURNS record
    LANGUAGE sql STABLE SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    WITH n AS (SELECT relname::text AS name FROM pg_class WHERE oid = p_table),
    c AS (
        SELECT x.v -> 'row' AS row, (x.v ->> 'edited_at')::timestamptz AS at
        FROM n, zsync.tables_seen sn, jsonb_array_elements(sn.copies) x(v)
        WHERE sn.table_name = n.name AND sn.record_id = p_id
        UNION ALL
        SELECT k.known, k.known_at FROM n, zsync.tables_known k WHERE k.table_name = n.name AND k.record_id = p_id)
    SELECT c.row, c.at FROM c, n, zsync.sync_base b
    WHERE b.table_name = n.name AND b.record_id = p_id
      AND (SELECT v.hash FROM zsync.version_of(p_table, c.row) v) = b.hash
    ORDER BY c.at DESC LIMIT 1
$$;

CREATE OR REPLACE FUNCTION zsync.overwritten_by(p_table regclass, p_entries jsonb, p_edit jsonb,
                                                p_edited_at timestamp with time zone) RETURNS jsonb
    LANGUAGE plpgsql STABLE
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    e record;
    v_holds text;
    v_base jsonb;  -- (added) the copy of the record's base Tables held, as seen
    v_base_at timestamptz;  -- (added) and its edited_at
BEGIN
    FOR e IN SELECT x.v, (x.v ->> 'until')::timestamptz AS until FROM jsonb_array_elements(p_entries) x(v)
             WHERE p_edited_at < (x.v ->> 'until')::timestamptz + zsync.stamp_race()
             ORDER BY (x.v ->> 'until')::timestamptz LOOP
        v_holds := zsync.edit_holds(p_table, e.v -> 'row', e.v -> 'wrote', p_edit);
        IF v_holds = 'write' THEN  -- (added) the write's own record: could the write have replaced the base?
            SELECT s.copy, s.copied_at INTO v_base, v_base_at FROM zsync.base_as_seen(p_table, p_edit ->> 'id') s;
            IF v_base_at >= e.until + zsync.stamp_race()
               OR zsync.edit_holds(p_table, e.v -> 'row', e.v -> 'wrote', v_base) = 'wrote' THEN
                -- no: the base was made after the write landed, and holds what the write put there or a later
                -- decision - the write's record is taken in already, as a delivery older than the record the
                -- write read (zsync.merge_decide_base answers 'supabase' when the edit's edited_at is before
                -- 'from'). (Not left unanswered: a base made on the write but stamped before it - it waited for
                -- the record - is the copy seen last before the echo, and the echo would count as an edit made
                -- on it with an older updated_at, its values winning back over the base's.)
                RETURN e.v || jsonb_build_object('from', greatest(v_base_at, p_edited_at + interval '1 millisecond'),
                                                 'taken_in', true);
            END IF;
        END IF;
        IF v_holds IS DISTINCT FROM 'wrote' THEN
            RETURN e.v;
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION zsync.base_as_seen(regclass, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION zsync.base_as_seen(regclass, text) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.overwritten_by(regclass, jsonb, jsonb, timestamp with time zone) FROM PUBLIC;
