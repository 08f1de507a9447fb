-- zsync outbox: pg_net sends each Database Webhook request once and never retries, so every change to a
-- table synced to Zapier Tables is also written, in the same transaction, to zsync.outbox. The
-- *_to_tables function acknowledges what it processed; zsync.sweep_outbox() (pg_cron in production,
-- the local webhook sender locally) re-sends what stayed unacknowledged, with backoff.

CREATE TABLE IF NOT EXISTS zsync.webhook_endpoints (
    table_name text PRIMARY KEY,
    url        text NOT NULL,
    headers    jsonb NOT NULL,  -- holds the shared secret: readable by the owner only
    timeout_ms integer NOT NULL DEFAULT 5000,
    updated_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON zsync.webhook_endpoints FROM PUBLIC;

CREATE TABLE IF NOT EXISTS zsync.outbox (
    id                bigserial PRIMARY KEY,
    table_name        text NOT NULL,
    record_id         text NOT NULL,
    op                text NOT NULL,
    record_updated_at timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    attempts          integer NOT NULL DEFAULT 0,  -- re-sends by the sweeper (the first send is the webhook's)
    last_sent_at      timestamptz,
    acked_at          timestamptz,
    ack_outcome       text
);
CREATE INDEX IF NOT EXISTS outbox_pending_record_idx ON zsync.outbox (table_name, record_id) WHERE acked_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_pending_created_idx ON zsync.outbox (created_at) WHERE acked_at IS NULL;

CREATE OR REPLACE FUNCTION zsync.capture_change()
RETURNS trigger LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at)
    VALUES (TG_TABLE_NAME, NEW.id, TG_OP, NEW.updated_at);
    RETURN NEW;
END
$$;

-- Make a table two-way syncable: keep its updated_at current for writes that are not the sync's, and
-- capture every change in the outbox. A new table's migration calls this once.
CREATE OR REPLACE FUNCTION zsync.enable_sync(p_table regclass)
RETURNS void LANGUAGE plpgsql
AS $$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS zsync_maintain_updated_at ON %s', p_table);
    EXECUTE format('CREATE TRIGGER zsync_maintain_updated_at BEFORE INSERT OR UPDATE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION zsync.maintain_updated_at()', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS zsync_outbox ON %s', p_table);
    EXECUTE format('CREATE TRIGGER zsync_outbox AFTER INSERT OR UPDATE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION zsync.capture_change()', p_table);
END
$$;

SELECT zsync.enable_sync('public.agent_jobs');
SELECT zsync.enable_sync('public.agent_decisions');
SELECT zsync.enable_sync('public.rate_limits');

-- Called by *_to_tables once it has processed (applied, found unchanged, or skipped as stale) the
-- version p_updated_at of a record: every pending entry of that record up to that version is done.
CREATE OR REPLACE FUNCTION zsync.ack_outbox(p_table text, p_record_id text, p_updated_at timestamptz, p_outcome text)
RETURNS integer LANGUAGE sql
AS $$
    WITH done AS (
        UPDATE zsync.outbox SET acked_at = now(), ack_outcome = p_outcome
        WHERE table_name = p_table AND record_id = p_record_id AND acked_at IS NULL
          AND (record_updated_at IS NULL OR record_updated_at <= p_updated_at)
        RETURNING 1)
    SELECT count(*)::integer FROM done
$$;

-- Send the current row of one record to its *_to_tables function through pg_net, in the Database
-- Webhook's payload shape. Used by the sweeper, and by the sync when it finds the other side holding an
-- older version than Supabase (so that side is repaired without waiting for the next change).
-- Returns false if the row does not exist or no endpoint is wired for the table.
CREATE OR REPLACE FUNCTION zsync.announce(p_table text, p_record_id text, p_op text DEFAULT 'UPDATE')
RETURNS boolean LANGUAGE plpgsql
AS $$
DECLARE
    e     zsync.webhook_endpoints;
    v_row jsonb;
BEGIN
    SELECT * INTO e FROM zsync.webhook_endpoints WHERE table_name = p_table;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    EXECUTE format('SELECT to_jsonb(t) FROM public.%I t WHERE t.id = $1', p_table) INTO v_row USING p_record_id;
    IF v_row IS NULL THEN
        RETURN false;
    END IF;
    PERFORM net.http_post(
        e.url,
        jsonb_build_object('old_record', NULL, 'record', v_row, 'type', p_op, 'table', p_table, 'schema', 'public'),
        '{}'::jsonb, e.headers, e.timeout_ms);
    RETURN true;
END
$$;

-- Re-send, through pg_net, the current row of every record whose latest change is still unacknowledged
-- p_min_age after it was made (or last re-sent; doubling per attempt, capped at 64x). The payload is
-- the Database Webhook's own shape. Acknowledged entries older than 7 days are purged.
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
        ELSE  -- deleted since: nothing to send
            UPDATE zsync.outbox SET acked_at = now(), ack_outcome = 'row_deleted' WHERE id = r.id;
        END IF;
    END LOOP;
    RETURN v_sent;
END
$$;

-- In production, pg_cron runs the sweeper every 30 seconds (Supabase: enable pg_cron first).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
        PERFORM cron.schedule('zsync-sweep-outbox', '30 seconds', 'SELECT zsync.sweep_outbox()');
    END IF;
END
$$;
