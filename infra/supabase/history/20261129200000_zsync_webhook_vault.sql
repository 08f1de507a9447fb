-- zsync: the webhook secret lives in Supabase Vault, not in pg_trigger.
--
-- A Database Webhook made by Supabase's dashboard keeps its headers - our shared secret - in the trigger's
-- arguments, and pg_trigger (with pg_get_triggerdef) is readable by every database role. So the webhook
-- triggers now execute zsync.webhook_request(), which takes no arguments: it looks up the table's
-- endpoint (URL, non-secret headers, timeout) in zsync.webhook_endpoints and the secret in
-- vault.decrypted_secrets (name in webhook_endpoints.secret_name, header in secret_header), and queues
-- the Database Webhook's own payload with net.http_post, as supabase_functions.http_request does.
-- It runs as its owner (SECURITY DEFINER, fixed search_path, not executable by PUBLIC); a trigger
-- function needs no EXECUTE grant to fire. `zsync wire supabase` writes the secret to Vault
-- (vault.create_secret, or vault.update_secret on rotation) and the triggers.
--
-- zsync.announce (the outbox sweeper's and the sync's re-send) takes its headers the same way.
-- Endpoints wired before this migration (secret still in webhook_endpoints.headers, secret_name NULL)
-- keep working until `zsync wire supabase` runs again.

ALTER TABLE zsync.webhook_endpoints ADD COLUMN IF NOT EXISTS secret_header text;
ALTER TABLE zsync.webhook_endpoints ADD COLUMN IF NOT EXISTS secret_name text;

-- The headers to send to p_table's endpoint, secret included; NULL if the table is not wired or its
-- Vault secret is missing (a warning is raised then: the change stays in the outbox for the sweeper).
CREATE OR REPLACE FUNCTION zsync.endpoint_headers(p_table text)
RETURNS jsonb LANGUAGE plpgsql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    e        zsync.webhook_endpoints;
    v_secret text;
BEGIN
    SELECT * INTO e FROM zsync.webhook_endpoints WHERE table_name = p_table;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF e.secret_name IS NULL THEN
        RETURN e.headers;
    END IF;
    SELECT s.decrypted_secret INTO v_secret FROM vault.decrypted_secrets s WHERE s.name = e.secret_name;
    IF v_secret IS NULL THEN
        RAISE WARNING 'zsync: Vault secret % is missing: run `zsync wire supabase`', e.secret_name;
        RETURN NULL;
    END IF;
    RETURN e.headers || jsonb_build_object(e.secret_header, v_secret);
END
$$;

-- The Database Webhook trigger: AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW EXECUTE FUNCTION
-- zsync.webhook_request(). The payload is supabase_functions.http_request's.
CREATE OR REPLACE FUNCTION zsync.webhook_request()
RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    e         zsync.webhook_endpoints;
    v_headers jsonb;
BEGIN
    SELECT * INTO e FROM zsync.webhook_endpoints WHERE table_name = TG_TABLE_NAME;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    v_headers := zsync.endpoint_headers(TG_TABLE_NAME);
    IF v_headers IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM net.http_post(
        e.url,
        jsonb_build_object('old_record', OLD, 'record', NEW, 'type', TG_OP, 'table', TG_TABLE_NAME,
                           'schema', TG_TABLE_SCHEMA),
        '{}'::jsonb, v_headers, e.timeout_ms);
    RETURN NULL;
END
$$;

-- Re-created to take the headers from zsync.endpoint_headers (same signature and behaviour as in
-- 20261129100100_zsync_deletes_outbox.sql: a deleted row is re-sent as a DELETE carrying its tombstone's
-- version; still SECURITY DEFINER).
CREATE OR REPLACE FUNCTION zsync.announce(p_table text, p_record_id text, p_op text DEFAULT 'UPDATE')
RETURNS boolean LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    e         zsync.webhook_endpoints;
    v_headers jsonb;
    v_row     jsonb;
    v_tomb    timestamptz;
BEGIN
    SELECT * INTO e FROM zsync.webhook_endpoints WHERE table_name = p_table;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    -- Without its Vault secret the request is still sent (and refused with 401): the entry stays
    -- unacknowledged for the next sweep instead of being taken for a deleted row.
    v_headers := coalesce(zsync.endpoint_headers(p_table), e.headers);
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
            '{}'::jsonb, v_headers, e.timeout_ms);
        RETURN true;
    END IF;
    PERFORM net.http_post(
        e.url,
        jsonb_build_object('old_record', NULL, 'record', v_row, 'type', CASE WHEN p_op = 'DELETE' THEN 'UPDATE' ELSE p_op END,
                           'table', p_table, 'schema', 'public'),
        '{}'::jsonb, v_headers, e.timeout_ms);
    RETURN true;
END
$$;

REVOKE EXECUTE ON FUNCTION zsync.endpoint_headers(text), zsync.webhook_request() FROM PUBLIC;
