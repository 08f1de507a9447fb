-- zsync batches (issue 12): the outbox is the work queue of the *_to_tables functions. The Database
-- Webhook only wakes a function up; the function claims the pending outbox rows of its table
-- (FOR UPDATE SKIP LOCKED: parallel invocations never take the same rows), coalesces the changes of one
-- record into its current row, compares versions with Tables set-based, writes in batches and acks.

CREATE INDEX IF NOT EXISTS outbox_pending_table_id_idx ON zsync.outbox (table_name, id) WHERE acked_at IS NULL;

-- Claim up to p_limit pending outbox rows of p_table (oldest first), locked until the caller's
-- transaction ends; rows another transaction holds are skipped. One row per record:
-- p_exclude: records this invocation already handled (a change it could not deliver is not retried at once).
-- changes = entries claimed, captured_at = the earliest capture time among them (the lag's start).
CREATE OR REPLACE FUNCTION zsync.claim_outbox(p_table text, p_limit integer DEFAULT 1000,
                                              p_exclude text[] DEFAULT '{}')
RETURNS TABLE (record_id text, changes integer, captured_at timestamptz)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    WITH claimed AS (
        SELECT o.id, o.record_id, o.created_at FROM zsync.outbox o
        WHERE o.table_name = p_table AND o.acked_at IS NULL AND NOT (o.record_id = ANY (p_exclude))
        ORDER BY o.id
        LIMIT greatest(p_limit, 1)
        FOR UPDATE SKIP LOCKED)
    SELECT c.record_id, count(*)::integer, min(c.created_at)
    FROM claimed c GROUP BY c.record_id ORDER BY min(c.id)
$$;

-- zsync.ack_outbox for many records in one statement: p_acks = [{"record_id", "updated_at", "outcome"}].
-- Never waits: an entry another transaction holds locked stays pending (claimed and acked later).
CREATE OR REPLACE FUNCTION zsync.ack_outbox_many(p_table text, p_acks jsonb)
RETURNS integer LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    WITH todo AS (
        SELECT o.id, a.outcome
        FROM jsonb_to_recordset(p_acks) AS a(record_id text, updated_at timestamptz, outcome text)
        JOIN zsync.outbox o ON o.table_name = p_table AND o.record_id = a.record_id AND o.acked_at IS NULL
                           AND (o.record_updated_at IS NULL OR a.updated_at IS NULL OR o.record_updated_at <= a.updated_at)
        FOR UPDATE OF o SKIP LOCKED),
    done AS (
        UPDATE zsync.outbox o SET acked_at = now(), ack_outcome = todo.outcome
        FROM todo WHERE o.id = todo.id
        RETURNING 1)
    SELECT count(*)::integer FROM done
$$;

-- zsync.version_cmp for many pairs in one call (one dynamic statement, not one per row):
-- p_pairs = [{"a": row, "b": row}, ...] -> (ord 1-based, cmp 1 / 0 / -1), same rule as zsync.version_cmp.
CREATE OR REPLACE FUNCTION zsync.version_cmp_many(p_table regclass, p_pairs jsonb)
RETURNS TABLE (ord integer, cmp integer)
LANGUAGE plpgsql STABLE
SET timezone TO 'UTC'
AS $$
BEGIN
    RETURN QUERY EXECUTE format($q$
        WITH v AS (
            SELECT e.ord::integer AS ord, to_jsonb(x) AS a, to_jsonb(y) AS b
            FROM jsonb_array_elements($1) WITH ORDINALITY AS e(pair, ord),
                 LATERAL jsonb_populate_record(NULL::%1$s, e.pair -> 'a') x,
                 LATERAL jsonb_populate_record(NULL::%1$s, e.pair -> 'b') y),
        h AS (
            SELECT v.ord,
                   date_trunc('milliseconds', coalesce((v.a ->> 'updated_at')::timestamptz, '-infinity')) AS ta,
                   md5(zsync.canonical_row($2, v.a - 'updated_at')::text) AS ha,
                   date_trunc('milliseconds', coalesce((v.b ->> 'updated_at')::timestamptz, '-infinity')) AS tb,
                   md5(zsync.canonical_row($2, v.b - 'updated_at')::text) AS hb
            FROM v)
        SELECT h.ord, CASE WHEN h.ta = h.tb AND h.ha = h.hb THEN 0
                           WHEN (h.ta, h.ha) > (h.tb, h.hb) THEN 1 ELSE -1 END
        FROM h ORDER BY h.ord
    $q$, p_table) USING p_pairs, p_table;
END
$$;

-- Many audit entries in one call (zsync.append_audit each: the same id again is a no-op).
-- -> how many were inserted.
CREATE OR REPLACE FUNCTION zsync.append_audit_many(p_entries jsonb)
RETURNS integer LANGUAGE sql VOLATILE
AS $$
    SELECT count(*) FILTER (WHERE zsync.append_audit(e))::integer FROM jsonb_array_elements(p_entries) e
$$;

REVOKE EXECUTE ON FUNCTION zsync.claim_outbox(text, integer, text[]), zsync.ack_outbox_many(text, jsonb),
    zsync.version_cmp_many(regclass, jsonb), zsync.append_audit_many(jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION zsync.claim_outbox(text, integer, text[]), zsync.ack_outbox_many(text, jsonb),
    zsync.version_cmp_many(regclass, jsonb), zsync.append_audit_many(jsonb) TO zsync_sync;

-- What a woken *_to_tables function that did not take a record's change itself answers for it:
-- 'pending' (an entry up to p_updated_at is still unacknowledged: another invocation holds it),
-- 'delivered' (this version or a later one was acknowledged as delivered), else 'none' (not in the outbox:
-- a hand-sent payload, delivered the one-record way).
CREATE INDEX IF NOT EXISTS outbox_record_version_idx ON zsync.outbox (table_name, record_id, record_updated_at);

CREATE OR REPLACE FUNCTION zsync.outbox_state(p_table text, p_record_id text, p_updated_at timestamptz)
RETURNS text LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN EXISTS (SELECT 1 FROM zsync.outbox o
                     WHERE o.table_name = p_table AND o.record_id = p_record_id AND o.acked_at IS NULL
                       AND (o.record_updated_at IS NULL OR p_updated_at IS NULL OR o.record_updated_at <= p_updated_at))
            THEN 'pending'
        WHEN p_updated_at IS NOT NULL AND EXISTS (
                SELECT 1 FROM zsync.outbox o
                WHERE o.table_name = p_table AND o.record_id = p_record_id AND o.acked_at IS NOT NULL
                  AND o.ack_outcome IN ('applied', 'unchanged', 'skipped_stale') AND o.record_updated_at >= p_updated_at)
            THEN 'delivered'
        ELSE 'none' END
$$;
REVOKE EXECUTE ON FUNCTION zsync.outbox_state(text, text, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION zsync.outbox_state(text, text, timestamptz) TO zsync_sync;

-- A repair (the sync found the other side holding an older version, or a copy of a deleted record) goes
-- through the work queue too: an outbox entry for the record's current version (or its tombstone), then
-- the webhook. The *_to_tables function that wakes up claims it like any change, and if the webhook is
-- lost the sweeper re-sends it. Returns false when the table is not wired or the record is unknown.
ALTER TABLE zsync.outbox ADD COLUMN IF NOT EXISTS repair boolean NOT NULL DEFAULT false;  -- not a write: a re-send

CREATE OR REPLACE FUNCTION zsync.requeue(p_table text, p_record_id text, p_op text DEFAULT 'UPDATE')
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_version timestamptz;
    v_found   boolean := false;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM zsync.webhook_endpoints WHERE table_name = p_table) THEN
        RETURN false;
    END IF;
    EXECUTE format('SELECT t.updated_at, true FROM public.%I t WHERE t.id = $1', p_table)
        INTO v_version, v_found USING p_record_id;
    IF coalesce(v_found, false) THEN
        INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at, repair)
        VALUES (p_table, p_record_id, 'UPDATE', v_version, true);
    ELSE
        SELECT version INTO v_version FROM zsync.tombstones WHERE table_name = p_table AND record_id = p_record_id;
        IF v_version IS NULL THEN
            RETURN false;
        END IF;
        INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at, repair)
        VALUES (p_table, p_record_id, 'DELETE', v_version, true);
    END IF;
    RETURN zsync.announce(p_table, p_record_id, p_op);
END
$$;
REVOKE EXECUTE ON FUNCTION zsync.requeue(text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION zsync.requeue(text, text, text) TO zsync_sync;
