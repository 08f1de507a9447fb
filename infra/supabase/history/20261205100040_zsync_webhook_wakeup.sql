-- zsync: the Supabase -> Tables webhook is a wake-up that carries no secret and no data.
--
-- pg_net (0.12 and later) grants ALL on net.http_request_queue to PUBLIC, and Supabase grants USAGE on
-- schema net to anon, authenticated and service_role: any role that can run SQL reads a queued request's
-- headers and body, even inside its own transaction before commit. A secret header put there by a
-- SECURITY DEFINER trigger (20261129200000_zsync_webhook_vault.sql) was readable by every role that could
-- make the trigger fire, and zsync_sync got it through zsync.announce.
--
-- The outbox is the *_to_tables functions' work queue, so the webhook needs to say nothing but "look at
-- your outbox". zsync.wake(table) queues one POST to <function URL>?zsync_wake=outbox with the body
-- {"zsync_wake": "outbox", "table": <table>} and no secret; the function answers such a request by draining
-- its own table's outbox and trusts nothing in it (shared/handler.py). It is sent once per table per
-- transaction (a 1,000-row statement wakes the function once, after commit). The webhook triggers, the
-- outbox sweeper (zsync.sweep_outbox -> zsync.announce) and repairs (zsync.requeue -> zsync.announce) all
-- go through it. Deletes reach Tables through the drain too (the outbox entry and its tombstone).
--
-- Nothing in the database needs the shared secret any more: zsync.endpoint_headers and the
-- webhook_endpoints secret columns are dropped, any header but Content-Type is removed from the stored
-- endpoints (wiring older than Vault kept the secret there), and the Vault secret `zsync_webhook_secret`
-- that `zsync wire supabase` made is deleted (Vault's decrypted_secrets is readable with the service
-- key). The secret still authenticates the Tables -> Supabase direction (Zaps): rotate it after this
-- migration (docs/security.md).

-- One wake-up per table per transaction; false when the table is not wired.
CREATE OR REPLACE FUNCTION zsync.wake(p_table text)
RETURNS boolean LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    e zsync.webhook_endpoints;
BEGIN
    SELECT * INTO e FROM zsync.webhook_endpoints WHERE table_name = p_table;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF current_setting('zsync.woken_' || p_table, true) = 'on' THEN
        RETURN true;  -- this transaction already queued one: the drain takes every entry it commits
    END IF;
    PERFORM net.http_post(
        e.url || CASE WHEN position('?' IN e.url) > 0 THEN '&' ELSE '?' END || 'zsync_wake=outbox',
        jsonb_build_object('zsync_wake', 'outbox', 'table', p_table),
        '{}'::jsonb, '{"Content-Type": "application/json"}'::jsonb, e.timeout_ms);
    PERFORM set_config('zsync.woken_' || p_table, 'on', true);
    RETURN true;
END
$$;

-- The Database Webhook trigger (AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW): a wake-up.
CREATE OR REPLACE FUNCTION zsync.webhook_request()
RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM zsync.wake(TG_TABLE_NAME);
    RETURN NULL;
END
$$;

-- The sweeper's and the repairs' re-send: a wake-up when there is something to deliver (the row, or its
-- tombstone); false when the row is gone without a tombstone or the table is not wired (same contract
-- as before: zsync.sweep_outbox acknowledges such an entry as row_deleted).
CREATE OR REPLACE FUNCTION zsync.announce(p_table text, p_record_id text, p_op text DEFAULT 'UPDATE')
RETURNS boolean LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_found boolean;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM zsync.webhook_endpoints WHERE table_name = p_table) THEN
        RETURN false;
    END IF;
    EXECUTE format('SELECT true FROM public.%I t WHERE t.id = $1', p_table) INTO v_found USING p_record_id;
    IF NOT coalesce(v_found, false)
       AND NOT EXISTS (SELECT 1 FROM zsync.tombstones WHERE table_name = p_table AND record_id = p_record_id) THEN
        RETURN false;
    END IF;
    RETURN zsync.wake(p_table);
END
$$;

REVOKE EXECUTE ON FUNCTION zsync.wake(text), zsync.webhook_request() FROM PUBLIC;

-- No secret left in the database.
DROP FUNCTION IF EXISTS zsync.endpoint_headers(text);
ALTER TABLE zsync.webhook_endpoints DROP COLUMN IF EXISTS secret_header;
ALTER TABLE zsync.webhook_endpoints DROP COLUMN IF EXISTS secret_name;
UPDATE zsync.webhook_endpoints SET headers = '{"Content-Type": "application/json"}'::jsonb
 WHERE headers IS DISTINCT FROM '{"Content-Type": "application/json"}'::jsonb;
DO $$
BEGIN
    IF to_regclass('vault.secrets') IS NOT NULL THEN
        BEGIN
            DELETE FROM vault.secrets WHERE name = 'zsync_webhook_secret';
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE WARNING 'zsync: could not delete the Vault secret zsync_webhook_secret (%): delete it in the '
                          'dashboard (Project Settings > Vault); zsync no longer reads it', SQLERRM;
        END;
    END IF;
END
$$;
