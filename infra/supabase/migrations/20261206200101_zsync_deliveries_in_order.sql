-- zsync: a record's Tables edits are taken in one at a time, even when a drain that leased the first one died.
--
-- Tables keeps no per-field times: a delivery carries the whole record at its edit's time, so when two edits of
-- a record the sync has not taken in arrive as one (the second's delivery applied first), the first edit's
-- fields count at the second's time and can win a field Supabase changed between the two (the field merge,
-- 20261205600101). A batch applies a record's deliveries oldest first; but a drain killed while it holds the
-- first edit's message leaves it leased, invisible, for the lease's length (60 s), and another drain then
-- delivered the second edit first: soaks under chaos lost a field that way, with blind writes on or off.
-- Now each drain records what it leased (zsync.hold_leased: message, record, the edit's time), committed on its
-- own before it applies anything; a delivery of a record with an earlier edit leased by another drain
-- (zsync.leased_before) waits for that one - a live drain applies it in a moment; a dead one's message comes
-- back when its lease ends, and the waiting delivery is then released to come after it - and applying a lease's
-- deliveries removes their entries in the same transaction.
-- An entry whose lease ended more than one lease length ago (a message Zapier quarantined, or acked without
-- being applied) no longer holds anything back. Re-runnable.

-- UNLOGGED: coordination between live drains, worth nothing after a crash (each entry ends with its lease anyway),
-- so recording a lease writes no WAL and its commit waits for no disk flush.
CREATE UNLOGGED TABLE IF NOT EXISTS zsync.tables_leased (
    table_name text NOT NULL,
    message_id text NOT NULL,  -- the trigger inbox message
    record_id text NOT NULL,
    edited_at timestamp with time zone NOT NULL,  -- the time of the edit the message carries (Zapier's)
    lease_id text NOT NULL,
    leased_at timestamp with time zone DEFAULT now() NOT NULL,
    leased_until timestamp with time zone NOT NULL,
    CONSTRAINT tables_leased_pkey PRIMARY KEY (table_name, message_id)
);
CREATE INDEX IF NOT EXISTS tables_leased_record ON zsync.tables_leased (table_name, record_id, edited_at);
-- zsync_sync reaches it only through the functions below (SECURITY DEFINER), as zsync.tables_writing
REVOKE ALL ON TABLE zsync.tables_leased FROM zsync_sync;

-- What a drain has just leased, before it applies any of it: p_items = [{"message", "id", "edited_at"}], leased
-- as p_lease for p_seconds (from now: never later than Zapier's own end of the lease). Entries whose lease
-- ended an hour ago go. -> how many were recorded.
CREATE OR REPLACE FUNCTION zsync.hold_leased(p_table text, p_lease text, p_seconds double precision, p_items jsonb)
    RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    n integer;
BEGIN
    IF jsonb_typeof(p_items) IS DISTINCT FROM 'array' OR p_lease IS NULL THEN
        RETURN 0;
    END IF;
    DELETE FROM zsync.tables_leased l WHERE l.table_name = p_table AND l.leased_until < now() - interval '1 hour';
    INSERT INTO zsync.tables_leased AS l (table_name, message_id, record_id, edited_at, lease_id, leased_until)
    SELECT DISTINCT ON (i.message) p_table, i.message, i.id, i.edited_at, p_lease,
           now() + make_interval(secs => greatest(coalesce(p_seconds, 0), 0))
    FROM jsonb_to_recordset(p_items) AS i(message text, id text, edited_at timestamptz)
    WHERE i.message IS NOT NULL AND i.id IS NOT NULL AND i.edited_at IS NOT NULL
    ORDER BY i.message
    ON CONFLICT ON CONSTRAINT tables_leased_pkey DO UPDATE
        SET record_id = EXCLUDED.record_id, edited_at = EXCLUDED.edited_at, lease_id = EXCLUDED.lease_id,
            leased_at = now(), leased_until = EXCLUDED.leased_until;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Of the deliveries p_items = [{"message", "id", "edited_at"}] of lease p_lease: the records with an earlier edit
-- still leased by another lease (or back in the inbox less than a lease length ago) - they wait. With p_take and
-- none waiting, the deliveries' entries go (in the caller's transaction: they come back if it is lost).
-- -> {record id: whether every such earlier edit is back in the inbox (its lease over)}.
CREATE OR REPLACE FUNCTION zsync.leased_before(p_table text, p_lease text, p_items jsonb, p_take boolean)
    RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_waiting jsonb;
BEGIN
    IF jsonb_typeof(p_items) IS DISTINCT FROM 'array' THEN
        RETURN '{}';
    END IF;
    SELECT coalesce(jsonb_object_agg(w.id, w.returned), '{}') INTO v_waiting
    FROM (SELECT i.id, bool_and(l.leased_until <= now()) AS returned
          FROM jsonb_to_recordset(p_items) AS i(message text, id text, edited_at timestamptz)
          JOIN zsync.tables_leased l
            ON l.table_name = p_table AND l.record_id = i.id AND l.edited_at < i.edited_at
           AND l.lease_id IS DISTINCT FROM p_lease AND l.message_id IS DISTINCT FROM i.message
           AND l.leased_until + (l.leased_until - l.leased_at) > now()
          GROUP BY i.id) w;
    IF p_take AND v_waiting = '{}'::jsonb THEN
        DELETE FROM zsync.tables_leased l
        WHERE l.table_name = p_table
          AND l.message_id IN (SELECT e.v ->> 'message' FROM jsonb_array_elements(p_items) e(v));
    END IF;
    RETURN v_waiting;
END
$$;

-- Messages acked without being applied (dead-lettered): no later edit of their records waits for them.
-- -> how many entries went.
CREATE OR REPLACE FUNCTION zsync.forget_leased(p_table text, p_messages text[]) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    n integer;
BEGIN
    DELETE FROM zsync.tables_leased l WHERE l.table_name = p_table AND l.message_id = ANY (p_messages);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

REVOKE ALL ON FUNCTION zsync.hold_leased(text, text, double precision, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.hold_leased(text, text, double precision, jsonb) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.leased_before(text, text, jsonb, boolean) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.leased_before(text, text, jsonb, boolean) TO zsync_sync;
REVOKE ALL ON FUNCTION zsync.forget_leased(text, text[]) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.forget_leased(text, text[]) TO zsync_sync;
