-- zsync: two Tables edits, one landing on the other, both count - whatever their stamps and updated_at say.
--
-- Zapier stamps an edit's edited_at when it starts (as a database's now() is its transaction's start); an edit
-- that waits for the record's lock lands after one stamped later (20261206200201 met this between a person's
-- edit and the sync's write). And a Tables writer's updated_at can be older than the record it edits (its
-- clock, or a version chosen before). Between two Tables edits: B is applied - Supabase then holds B, and no
-- base is saved (both sides hold it). A lands on B, so Tables' record holds B's fields and A's, but A's
-- updated_at is older than B's: A's delivery was taken for a stale one and skipped, and the fields only A
-- changed were lost on both sides (soaks lost a retry_count so with blind writes on - A stamped first, landing
-- last - and a status with them off - A stamped and landing last, its updated_at older).
-- A was made on B when it was stamped after B's copy (as seen: B's delivery), or, stamped before it, when its
-- content tells: it carries B's change (in a field where B differs from the copy seen before both were stamped,
-- A holds B's value) and holds a change of its own B lacks. Its common ancestor with what Supabase holds is then the copy
-- Tables held before both. When a three-way merge against that copy takes something from the delivery, the copy
-- is saved as the record's base (zsync.sync_base), and zsync.sync_apply merges the delivery field by field
-- (zsync.merge_decide_base): each field keeps its latest change by the writers' updated_at, as always - the
-- merged record goes to Tables too. Otherwise nothing is saved: the delivery stays stale, as before. A base
-- already saved as B's record (kept for the replaced records of a recent *_to_tables write) goes back to that
-- copy either way: against B, every field A changed counted as made on B at A's older time and won (the
-- suite's soak lost three fields so).
-- Called right after zsync.settle_blind (which keeps each delivery as a copy) by both paths that apply Tables
-- deliveries. Re-runnable.

CREATE OR REPLACE FUNCTION zsync.base_for_raced_edits(p_table text, p_items jsonb) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET "TimeZone" TO 'UTC'
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    v_rel   regclass;
    n       integer := 0;
    d       record;
    v_cur   jsonb;  -- Supabase's row
    v_later jsonb;  -- the copy Supabase holds, as seen in Tables (B)
    v_later_at timestamptz;  -- its edited_at
    v_prior jsonb;  -- the copy seen last before both were stamped (what Tables held before both)
    cd      jsonb;
    cl      jsonb;
    cp      jsonb;
    t       record;
    s       record;
    m       record;
    v_bhash text;  -- the record's saved base, if any
    v_based boolean;
BEGIN
    IF jsonb_typeof(p_items) IS DISTINCT FROM 'array' OR NOT zsync.field_merge_on() THEN
        RETURN 0;
    END IF;
    v_rel := format('public.%I', p_table)::regclass;
    -- cheap filters first, set-based: a record whose Supabase row is later than the delivery (a stale delivery:
    -- most are not), and another copy of it seen (kept by zsync.settle_blind)
    FOR d IN EXECUTE format($q$
        SELECT DISTINCT ON (e.v ->> 'id') e.v ->> 'id' AS id, e.v -> 'row' AS row,
               (e.v ->> 'edited_at')::timestamptz AS edited_at, to_jsonb(t) AS cur
        FROM jsonb_array_elements($1) e(v) JOIN %s t ON t.id = e.v ->> 'id'
        WHERE e.v ->> 'edited_at' IS NOT NULL AND jsonb_typeof(e.v -> 'row') = 'object'
          AND date_trunc('milliseconds', (to_jsonb(t) ->> 'updated_at')::timestamptz)
              > date_trunc('milliseconds', (e.v -> 'row' ->> 'updated_at')::timestamptz)
          AND EXISTS (SELECT 1 FROM zsync.tables_seen sn, jsonb_array_elements(sn.copies) c(v)
                      WHERE sn.table_name = $2 AND sn.record_id = e.v ->> 'id'
                        AND (c.v ->> 'edited_at')::timestamptz <> (e.v ->> 'edited_at')::timestamptz)
        ORDER BY e.v ->> 'id', (e.v ->> 'edited_at')::timestamptz DESC $q$, v_rel) USING p_items, p_table
    LOOP
        v_cur := d.cur;
        SELECT * INTO t FROM zsync.version_of(v_rel, d.row);
        SELECT * INTO s FROM zsync.version_of_typed(v_rel, v_cur);
        CONTINUE WHEN t.hash = s.hash OR t.ts >= s.ts;  -- not older than what Supabase holds: the usual rules
        -- a version the sync wrote to Tables or applied from it (its outbox entry acknowledged 'applied' or
        -- 'unchanged'): the echo of its own write, or an edit taken in already - no edit to merge (merged again, the
        -- sync's own merges went round: each merge's echo merged once more)
        CONTINUE WHEN EXISTS (SELECT 1 FROM zsync.outbox o
                              WHERE o.table_name = p_table AND o.record_id = d.id AND o.acked_at IS NOT NULL
                                AND o.ack_outcome IN ('unchanged', 'applied')
                                AND date_trunc('milliseconds', o.record_updated_at) = t.ts);
        -- a saved base other than what Supabase holds (Supabase changed since both agreed): the merge's own rules
        SELECT b.hash INTO v_bhash FROM zsync.sync_base b WHERE b.table_name = p_table AND b.record_id = d.id;
        v_based := FOUND;
        CONTINUE WHEN v_based AND v_bhash IS DISTINCT FROM s.hash;
        -- the copy Supabase holds, as seen (a delivery of it, a find, a write's answer), and the copy seen last
        -- before both it and this delivery were stamped
        WITH c AS (
            SELECT e.v -> 'row' AS row, (e.v ->> 'edited_at')::timestamptz AS at
            FROM zsync.tables_seen sn, jsonb_array_elements(sn.copies) e(v)
            WHERE sn.table_name = p_table AND sn.record_id = d.id
            UNION ALL
            SELECT k.known, k.known_at FROM zsync.tables_known k WHERE k.table_name = p_table AND k.record_id = d.id),
        l AS (
            SELECT c.row, c.at FROM c
            WHERE c.at <> d.edited_at AND (SELECT v.hash FROM zsync.version_of(v_rel, c.row) v) = s.hash
            ORDER BY c.at DESC LIMIT 1)
        SELECT l.row, l.at, (SELECT c.row FROM c WHERE c.at < least(l.at, d.edited_at) ORDER BY c.at DESC LIMIT 1)
        INTO v_later, v_later_at, v_prior FROM l;
        CONTINUE WHEN v_later IS NULL OR v_prior IS NULL;
        cd := zsync.canonical_row(v_rel, d.row) - 'id' - 'updated_at';
        cl := zsync.canonical_row(v_rel, v_later) - 'id' - 'updated_at';
        cp := zsync.canonical_row(v_rel, v_prior) - 'id' - 'updated_at';
        -- made on that copy: stamped after it (landed after it; or the two raced and that copy was made on this
        -- one - it then holds this one's changes, and the merge below keeps nothing of it), or, stamped before
        -- it, it carries that copy's change and has one of its own that copy lacks
        CONTINUE WHEN d.edited_at < v_later_at
                      AND (NOT EXISTS (SELECT 1 FROM jsonb_object_keys(cd || cl || cp) f(key)
                                       WHERE cl -> f.key IS DISTINCT FROM cp -> f.key
                                         AND cd -> f.key IS NOT DISTINCT FROM cl -> f.key)
                           OR NOT EXISTS (SELECT 1 FROM jsonb_object_keys(cd || cl || cp) f(key)
                                          WHERE cl -> f.key IS NOT DISTINCT FROM cp -> f.key
                                            AND cd -> f.key IS DISTINCT FROM cl -> f.key));
        SELECT * INTO m FROM zsync.merge3(v_rel, v_prior, d.row, v_cur);
        -- no saved base and nothing of the delivery kept: it stays stale. A saved base that is what Supabase holds
        -- (kept for the replaced records of recent writes) goes back to the copy before both either way: against
        -- it, zsync.merge_decide_base would count every field the delivery changed as made on it, at its older
        -- updated_at, and the later copy's fields would lose (a soak lost three so)
        CONTINUE WHEN NOT v_based AND m.outcome IS DISTINCT FROM 'merged';
        EXECUTE format('SELECT to_jsonb(x) FROM jsonb_populate_record(NULL::%s, $1) x', v_rel) INTO v_prior
            USING v_prior;
        INSERT INTO zsync.sync_base AS b (table_name, record_id, base, version, hash, tables_ts)
        SELECT p_table, d.id, v_prior, v.ts, v.hash, v.ts FROM zsync.version_of_typed(v_rel, v_prior) v
        ON CONFLICT ON CONSTRAINT sync_base_pkey DO UPDATE
            SET base = EXCLUDED.base, version = EXCLUDED.version, hash = EXCLUDED.hash, tables_ts = EXCLUDED.tables_ts,
                agreed = true, field_ts = NULL, set_at = now();
        n := n + 1;
    END LOOP;
    RETURN n;
END
$_$;

REVOKE ALL ON FUNCTION zsync.base_for_raced_edits(text, jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION zsync.base_for_raced_edits(text, jsonb) TO zsync_sync;
