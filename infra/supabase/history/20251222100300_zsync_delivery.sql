-- zsync delivery guarantees: the batched repair path of `zsync reconcile`.
--
-- zsync.sync_upsert_many applies many rows of one table in one call (one round trip per batch, all in
-- the caller's transaction) under exactly the rule of zsync.sync_upsert, which it calls per row. Rows are
-- processed in id order so that two concurrent batches lock rows in the same order (no deadlock).
-- Returns one (record_id, outcome, stored) per input row; outcome as zsync.sync_upsert's.
CREATE OR REPLACE FUNCTION zsync.sync_upsert_many(p_table regclass, p_rows jsonb)
RETURNS TABLE (record_id text, outcome text, stored jsonb)
LANGUAGE plpgsql
SET timezone TO 'UTC'
AS $$
DECLARE
    r jsonb;
    u record;
BEGIN
    IF jsonb_typeof(p_rows) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'sync_upsert_many: expected a JSON array of rows' USING ERRCODE = '22023';
    END IF;
    FOR r IN SELECT e.value FROM jsonb_array_elements(p_rows) AS e ORDER BY e.value->>'id' LOOP
        SELECT * INTO u FROM zsync.sync_upsert(p_table, r);
        record_id := r->>'id';
        outcome := u.outcome;
        stored := u.stored;
        RETURN NEXT;
    END LOOP;
END
$$;
