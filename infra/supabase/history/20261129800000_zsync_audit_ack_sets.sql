-- zsync reconcile at scale (issue 12): audit entries and outbox acks of a batch as set-based statements,
-- instead of one plpgsql call (and one dynamic INSERT / UPDATE) per element. Same results.

-- zsync.append_audit_many, set-based: one INSERT ... SELECT per distinct set of given columns (usually one
-- per call). As zsync.append_audit: a column absent or null in an entry takes its default, the same id
-- again (already stored, or earlier in the same call) is a no-op, an entry without any column is refused.
-- -> how many were inserted.
CREATE OR REPLACE FUNCTION zsync.append_audit_many(p_entries jsonb)
RETURNS integer LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    g      record;
    v_cols text;
    v_n    integer;
    v_all  integer := 0;
BEGIN
    IF jsonb_typeof(p_entries) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'append_audit_many: expected a JSON array of audit_log rows' USING ERRCODE = '22023';
    END IF;
    -- Entries grouped by their non-null keys (jsonb keeps an object's keys in one canonical order).
    FOR g IN
        WITH e AS (
            SELECT x.ord, x.v,
                   CASE WHEN jsonb_typeof(x.v) = 'object' THEN
                       ARRAY(SELECT j.k FROM jsonb_each(x.v) AS j(k, val) WHERE jsonb_typeof(j.val) <> 'null') END AS keys
            FROM jsonb_array_elements(p_entries) WITH ORDINALITY AS x(v, ord))
        SELECT e.keys, jsonb_agg(e.v ORDER BY e.ord) AS rows FROM e GROUP BY e.keys ORDER BY min(e.ord)
    LOOP
        SELECT string_agg(format('%I', a.attname), ', ' ORDER BY a.attnum) INTO v_cols
        FROM pg_attribute a
        WHERE a.attrelid = 'public.audit_log'::regclass AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attname = ANY (g.keys);
        IF v_cols IS NULL THEN
            RAISE EXCEPTION 'append_audit: empty entry' USING ERRCODE = '22023';
        END IF;
        EXECUTE format('INSERT INTO public.audit_log (%1$s) SELECT %1$s FROM jsonb_populate_recordset(NULL::public.audit_log, $1) '
                       'ON CONFLICT (id) DO NOTHING', v_cols) USING g.rows;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        v_all := v_all + v_n;
    END LOOP;
    RETURN v_all;
END
$$;

-- zsync.ack_outbox for many records in one statement, with exactly its rule (unlike zsync.ack_outbox_many,
-- which skips entries another transaction holds): p_acks = [{"record_id", "updated_at", "outcome"}]; every
-- pending entry of a record up to that version is acknowledged (a null updated_at: only entries without a
-- version). -> how many entries were acknowledged.
CREATE OR REPLACE FUNCTION zsync.ack_outbox_set(p_table text, p_acks jsonb)
RETURNS integer LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    WITH a AS (
        SELECT DISTINCT ON (x.record_id) x.record_id, x.updated_at, x.outcome
        FROM jsonb_to_recordset(p_acks) AS x(record_id text, updated_at timestamptz, outcome text)
        ORDER BY x.record_id, x.updated_at DESC NULLS LAST),
    done AS (
        UPDATE zsync.outbox o SET acked_at = now(), ack_outcome = a.outcome
        FROM a
        WHERE o.table_name = p_table AND o.record_id = a.record_id AND o.acked_at IS NULL
          AND (o.record_updated_at IS NULL OR o.record_updated_at <= a.updated_at)
        RETURNING 1)
    SELECT count(*)::integer FROM done
$$;

REVOKE EXECUTE ON FUNCTION zsync.append_audit_many(jsonb), zsync.ack_outbox_set(text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION zsync.append_audit_many(jsonb), zsync.ack_outbox_set(text, jsonb) TO zsync_sync;
