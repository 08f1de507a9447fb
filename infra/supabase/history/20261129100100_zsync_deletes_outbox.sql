-- zsync correctness (2/3): deletes win, undeliverable rows are refused or parked, the sweep is scheduled.

-- --- deletes -------------------------------------------------------------------------------------------
-- A DELETE on a two-way table leaves a tombstone (its version: later than the deleted row's, by the
-- same hybrid-logical rule as zsync.maintain_updated_at), goes to the outbox, and reaches the
-- *_to_tables function as a DELETE webhook, which deletes the Tables copy. Re-inserting the id clears
-- the tombstone. A delete made by the sync (zsync.apply_tables_delete) carries Zapier's deleted_at.
CREATE OR REPLACE FUNCTION zsync.track_tombstone()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_version timestamptz;
    v_origin  text := 'supabase';
BEGIN
    IF TG_OP = 'INSERT' THEN
        DELETE FROM zsync.tombstones WHERE table_name = TG_TABLE_NAME AND record_id = NEW.id;
        RETURN NEW;
    END IF;
    v_version := nullif(current_setting('zsync.delete_version', true), '')::timestamptz;
    IF v_version IS NOT NULL THEN
        v_origin := 'tables';
    ELSE
        v_version := greatest(clock_timestamp(), date_trunc('milliseconds', OLD.updated_at) + interval '1 millisecond');
    END IF;
    INSERT INTO zsync.tombstones (table_name, record_id, version, origin)
    VALUES (TG_TABLE_NAME, OLD.id, v_version, v_origin)
    ON CONFLICT (table_name, record_id) DO UPDATE
        SET version = greatest(zsync.tombstones.version, EXCLUDED.version), deleted_at = now(), origin = EXCLUDED.origin;
    RETURN OLD;
END
$$;

CREATE OR REPLACE FUNCTION zsync.capture_change()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at)
        SELECT TG_TABLE_NAME, OLD.id, 'DELETE', t.version
        FROM zsync.tombstones t WHERE t.table_name = TG_TABLE_NAME AND t.record_id = OLD.id;
        RETURN OLD;
    END IF;
    INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at)
    VALUES (TG_TABLE_NAME, NEW.id, TG_OP, NEW.updated_at);
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION zsync.enable_sync(p_table regclass)
RETURNS void LANGUAGE plpgsql
AS $$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS zsync_maintain_updated_at ON %s', p_table);
    EXECUTE format('CREATE TRIGGER zsync_maintain_updated_at BEFORE INSERT OR UPDATE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION zsync.maintain_updated_at()', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS zsync_tombstone ON %s', p_table);
    EXECUTE format('CREATE TRIGGER zsync_tombstone BEFORE INSERT OR DELETE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION zsync.track_tombstone()', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS zsync_outbox ON %s', p_table);
    EXECUTE format('CREATE TRIGGER zsync_outbox AFTER INSERT OR UPDATE OR DELETE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION zsync.capture_change()', p_table);
END
$$;

SELECT zsync.enable_sync('public.agent_jobs');
SELECT zsync.enable_sync('public.agent_decisions');
SELECT zsync.enable_sync('public.rate_limits');

-- The entry point for a delete made in Zapier Tables (the trash check calls it with the record's id and
-- Zapier's deleted_at): delete the Supabase row unless it holds a version newer than the delete, and
-- keep a tombstone either way (so the Tables copy's stale deliveries are not re-inserted).
-- Returns 'applied' (row deleted), 'unchanged' (already deleted / tombstoned) or 'skipped_stale'
-- (Supabase holds a newer version, which wins; the caller pushes it back to Tables).
CREATE OR REPLACE FUNCTION zsync.apply_tables_delete(p_table regclass, p_record_id text, p_deleted_at timestamptz)
RETURNS text LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name   text := (SELECT relname FROM pg_class WHERE oid = p_table);
    v_stored jsonb;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = p_table AND tgname = 'zsync_tombstone') THEN
        RAISE EXCEPTION 'apply_tables_delete: % is not a two-way synced table', p_table USING ERRCODE = '22023';
    END IF;
    IF p_deleted_at IS NULL OR NOT isfinite(p_deleted_at) THEN
        RAISE EXCEPTION 'apply_tables_delete: deleted_at must be a finite timestamp' USING ERRCODE = '22023';
    END IF;
    PERFORM set_config('zsync.origin', 'sync', true);
    EXECUTE format('SELECT to_jsonb(t) FROM %s t WHERE t.id = $1 FOR UPDATE', p_table) INTO v_stored USING p_record_id;
    IF v_stored IS NULL THEN
        INSERT INTO zsync.tombstones (table_name, record_id, version, origin)
        VALUES (v_name, p_record_id, p_deleted_at, 'tables')
        ON CONFLICT (table_name, record_id) DO UPDATE SET version = greatest(zsync.tombstones.version, EXCLUDED.version);
        RETURN 'unchanged';
    END IF;
    IF date_trunc('milliseconds', (v_stored ->> 'updated_at')::timestamptz) > date_trunc('milliseconds', p_deleted_at) THEN
        RETURN 'skipped_stale';
    END IF;
    PERFORM set_config('zsync.delete_version', p_deleted_at::text, true);
    EXECUTE format('DELETE FROM %s t WHERE t.id = $1', p_table) USING p_record_id;
    PERFORM set_config('zsync.delete_version', '', true);
    RETURN 'applied';
END
$$;

-- The tombstone of a record, if it is deleted (NULL otherwise).
CREATE OR REPLACE FUNCTION zsync.tombstone_version(p_table text, p_record_id text)
RETURNS timestamptz LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT version FROM zsync.tombstones WHERE table_name = p_table AND record_id = p_record_id
$$;

-- The outbox sweeper re-sends a DELETE as the Database Webhook would (old_record only).
CREATE OR REPLACE FUNCTION zsync.announce(p_table text, p_record_id text, p_op text DEFAULT 'UPDATE')
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    e      zsync.webhook_endpoints;
    v_row  jsonb;
    v_tomb timestamptz;
BEGIN
    SELECT * INTO e FROM zsync.webhook_endpoints WHERE table_name = p_table;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    EXECUTE format('SELECT to_jsonb(t) FROM public.%I t WHERE t.id = $1', p_table) INTO v_row USING p_record_id;
    IF v_row IS NULL THEN
        SELECT version INTO v_tomb FROM zsync.tombstones WHERE table_name = p_table AND record_id = p_record_id;
        IF v_tomb IS NULL THEN
            RETURN false;
        END IF;
        PERFORM net.http_post(
            e.url,
            jsonb_build_object('old_record', jsonb_build_object('id', p_record_id, 'updated_at', v_tomb),
                               'record', NULL, 'type', 'DELETE', 'table', p_table, 'schema', 'public'),
            '{}'::jsonb, e.headers, e.timeout_ms);
        RETURN true;
    END IF;
    PERFORM net.http_post(
        e.url,
        jsonb_build_object('old_record', NULL, 'record', v_row, 'type', CASE WHEN p_op = 'DELETE' THEN 'UPDATE' ELSE p_op END,
                           'table', p_table, 'schema', 'public'),
        '{}'::jsonb, e.headers, e.timeout_ms);
    RETURN true;
END
$$;

-- --- rows the sync could never deliver are refused when written -------------------------------------
-- The same limits the functions enforce (shared/mapping.py), as CHECK constraints, so a Claude agent's
-- write gets the error at once instead of a row retried for ever. NOT VALID: existing rows are not
-- re-checked (a migration never fails on old data); every new write is.
DO $$
DECLARE
    c      record;
    v_cond text;
BEGIN
    FOR c IN SELECT a.attrelid::regclass AS tbl, cl.relname, a.attname::text AS col, a.atttypid AS typ
             FROM pg_attribute a JOIN pg_class cl ON cl.oid = a.attrelid
             WHERE a.attrelid IN ('public.agent_jobs'::regclass, 'public.agent_decisions'::regclass,
                                  'public.rate_limits'::regclass)
               AND a.attnum > 0 AND NOT a.attisdropped LOOP
        v_cond := CASE
            WHEN c.col = 'id' THEN format('%I ~ ''\S'' AND %I !~ ''[\x01-\x1f\x7f]''', c.col, c.col)
            WHEN c.typ = 'text'::regtype THEN format('length(%I) <= 100000', c.col)
            WHEN c.typ = 'timestamptz'::regtype THEN
                format('%I > ''0001-01-02 00:00:00+00''::timestamptz AND %I < ''9999-12-31 00:00:00+00''::timestamptz',
                       c.col, c.col)
            WHEN c.typ = 'double precision'::regtype THEN
                format('%I NOT IN (''NaN''::float8, ''Infinity''::float8, ''-Infinity''::float8)', c.col)
            ELSE NULL END;
        CONTINUE WHEN v_cond IS NULL;
        IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = c.tbl AND conname = format('zsync_%s_syncable', c.col)) THEN
            EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I CHECK (%s) NOT VALID', c.tbl,
                           format('zsync_%s_syncable', c.col), v_cond);
        END IF;
    END LOOP;
END
$$;

-- --- rows that still fail are parked, not re-sent for ever --------------------------------------------
ALTER TABLE zsync.outbox ADD COLUMN IF NOT EXISTS failures integer NOT NULL DEFAULT 0;
ALTER TABLE zsync.outbox ADD COLUMN IF NOT EXISTS last_error text;

-- Called by *_to_tables when it rejects (400) a delivery of this record: every pending entry counts
-- one more failure; after p_max failures the entries are parked (acknowledged with outcome
-- 'dead_letter' and the reason), so the sweeper stops re-sending. Returns true if it parked entries.
CREATE OR REPLACE FUNCTION zsync.outbox_failed(p_table text, p_record_id text, p_reason text, p_max integer DEFAULT 3)
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_parked integer;
BEGIN
    UPDATE zsync.outbox SET failures = failures + 1, last_error = left(p_reason, 2000)
    WHERE table_name = p_table AND record_id = p_record_id AND acked_at IS NULL;
    WITH parked AS (
        UPDATE zsync.outbox SET acked_at = now(), ack_outcome = 'dead_letter'
        WHERE table_name = p_table AND record_id = p_record_id AND acked_at IS NULL AND failures >= p_max
        RETURNING 1)
    SELECT count(*) INTO v_parked FROM parked;
    RETURN v_parked > 0;
END
$$;

-- --- the sweeper: records each run, scheduled by pg_cron ----------------------------------------------
CREATE TABLE IF NOT EXISTS zsync.sweeper_runs (
    id      boolean PRIMARY KEY DEFAULT true CHECK (id),
    last_at timestamptz NOT NULL,
    sent    integer NOT NULL
);

CREATE OR REPLACE FUNCTION zsync.sweep_outbox(p_min_age interval DEFAULT '30 seconds', p_limit integer DEFAULT 200)
RETURNS integer LANGUAGE plpgsql
AS $$
DECLARE
    r      record;
    v_sent integer := 0;
BEGIN
    DELETE FROM zsync.outbox WHERE acked_at < now() - interval '7 days';
    FOR r IN
        SELECT o.id, o.table_name, o.record_id, o.op
        FROM zsync.outbox o
        JOIN zsync.webhook_endpoints e USING (table_name)
        WHERE o.acked_at IS NULL
          AND coalesce(o.last_sent_at, o.created_at) < now() - p_min_age * power(2, least(o.attempts, 6))
          AND NOT EXISTS (SELECT 1 FROM zsync.outbox n
                          WHERE n.table_name = o.table_name AND n.record_id = o.record_id
                            AND n.acked_at IS NULL AND n.id > o.id)
        ORDER BY o.id
        LIMIT p_limit
        FOR UPDATE OF o SKIP LOCKED
    LOOP
        IF zsync.announce(r.table_name, r.record_id, r.op) THEN
            UPDATE zsync.outbox SET attempts = attempts + 1, last_sent_at = now() WHERE id = r.id;
            v_sent := v_sent + 1;
        ELSE  -- deleted since, without a tombstone: nothing to send
            UPDATE zsync.outbox SET acked_at = now(), ack_outcome = 'row_deleted' WHERE id = r.id;
        END IF;
    END LOOP;
    INSERT INTO zsync.sweeper_runs (id, last_at, sent) VALUES (true, now(), v_sent)
    ON CONFLICT (id) DO UPDATE SET last_at = EXCLUDED.last_at, sent = EXCLUDED.sent;
    RETURN v_sent;
END
$$;

-- Supabase ships pg_cron: enable it here (no manual step) and schedule the sweep every 30 seconds.
-- Where pg_cron is not available (the local embedded Postgres) the local stack runs the sweep itself;
-- `zsync doctor` fails when no sweep ran recently either way.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron')
       AND EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_cron') THEN
        BEGIN
            CREATE EXTENSION pg_cron;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'zsync: could not enable pg_cron (%); enable it in the dashboard (Database > Extensions)', SQLERRM;
        END;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
        PERFORM cron.schedule('zsync-sweep-outbox', '30 seconds', 'SELECT zsync.sweep_outbox()');
    END IF;
END
$$;

-- New functions are not callable by PUBLIC (per-schema default privileges cannot remove that).
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA zsync FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    zsync.apply_tables_delete(regclass, text, timestamptz),
    zsync.tombstone_version(text, text),
    zsync.outbox_failed(text, text, text, integer)
TO zsync_sync;
