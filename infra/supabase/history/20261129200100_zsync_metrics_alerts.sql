-- zsync operations: delivery metrics as views (Supabase dashboard / any SQL client), the health figures
-- the alerts are evaluated on, and the alert state that keeps a scheduled check from posting twice.
--
-- Lag is delivery lag: from when the change happened on the source side as the system saw it
-- (metadata.changed_at: Zapier's edited_at or the arrival time for Tables -> Supabase, the outbox capture
-- time - the Supabase transaction - for Supabase -> Tables) to when it was applied. metadata.origin says
-- whether an audit entry came from a live delivery, a replay or a reconcile; only live deliveries count
-- toward lag and the alerts. Entries written before origin existed count as live.

-- When the change a *_to_tables delivery carries was captured (the earliest unacknowledged outbox entry
-- of that record up to that version); NULL if none is pending (a re-send of an acknowledged change).
CREATE OR REPLACE FUNCTION zsync.outbox_capture_time(p_table text, p_record_id text, p_updated_at timestamptz)
RETURNS timestamptz LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT min(o.created_at) FROM zsync.outbox o
    WHERE o.table_name = p_table AND o.record_id = p_record_id AND o.acked_at IS NULL
      AND (o.record_updated_at IS NULL OR p_updated_at IS NULL OR o.record_updated_at <= p_updated_at)
$$;

-- The views below read the sync's own entries by time (audit_log grows for years: no full scans).
CREATE INDEX IF NOT EXISTS audit_log_sync_timestamp_idx ON public.audit_log ("timestamp")
    WHERE actor_type = 'zapier_sync';

-- One row per sync event: audit entries of the sync, and *_to_tables deliveries that found Tables
-- already current (acknowledged 'unchanged' in the outbox; the Tables -> Supabase side does not persist
-- its unchanged echoes - they are in the function logs).
CREATE OR REPLACE VIEW zsync.sync_events AS
SELECT a."timestamp" AS at,
       regexp_replace(a.metadata->>'function', '_to_(supabase|tables)$', '') AS table_name,
       a.metadata->>'sync_direction' AS direction,
       coalesce(a.metadata->>'origin', 'live') AS origin,
       CASE WHEN a.action = 'sync_failed' THEN
                CASE WHEN coalesce((a.metadata->>'status')::integer, 500) < 500 THEN 'rejected' ELSE 'failed' END
            WHEN a.action = 'sync_skipped_stale_data' THEN 'skipped_stale'
            ELSE 'applied' END AS outcome,
       CASE WHEN a.action LIKE '%\_synced' THEN (a.metadata->>'lag_seconds')::double precision END AS lag_s,
       a.resource_id AS record_id,
       a.metadata->'problems' AS problems
FROM public.audit_log a
WHERE a.actor_type = 'zapier_sync' AND a.metadata ? 'function'
UNION ALL
SELECT o.acked_at, o.table_name, 'supabase_to_tables', 'live', 'unchanged', NULL, o.record_id, NULL
FROM zsync.outbox o
WHERE o.ack_outcome = 'unchanged';

CREATE OR REPLACE VIEW zsync.sync_metrics_5m AS
SELECT date_bin('5 minutes', at, timestamptz '2000-01-01 00:00:00+00') AS bucket,
       table_name, direction, origin,
       count(*) FILTER (WHERE outcome = 'applied') AS applied,
       count(*) FILTER (WHERE outcome = 'unchanged') AS unchanged,
       count(*) FILTER (WHERE outcome = 'skipped_stale') AS skipped_stale,
       count(*) FILTER (WHERE outcome = 'rejected') AS rejected,
       count(*) FILTER (WHERE outcome = 'failed') AS failed,
       count(*) FILTER (WHERE outcome = 'skipped_stale') AS conflicts,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY lag_s) AS lag_p50_s,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY lag_s) AS lag_p95_s,
       max(lag_s) AS lag_max_s,
       avg(lag_s) AS lag_avg_s
FROM zsync.sync_events
GROUP BY 1, 2, 3, 4;

CREATE OR REPLACE VIEW zsync.sync_metrics_hourly AS
SELECT date_trunc('hour', at) AS bucket,
       table_name, direction, origin,
       count(*) FILTER (WHERE outcome = 'applied') AS applied,
       count(*) FILTER (WHERE outcome = 'unchanged') AS unchanged,
       count(*) FILTER (WHERE outcome = 'skipped_stale') AS skipped_stale,
       count(*) FILTER (WHERE outcome = 'rejected') AS rejected,
       count(*) FILTER (WHERE outcome = 'failed') AS failed,
       count(*) FILTER (WHERE outcome = 'skipped_stale') AS conflicts,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY lag_s) AS lag_p50_s,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY lag_s) AS lag_p95_s,
       max(lag_s) AS lag_max_s,
       avg(lag_s) AS lag_avg_s
FROM zsync.sync_events
GROUP BY 1, 2, 3, 4;

CREATE OR REPLACE VIEW zsync.outbox_backlog AS
SELECT table_name,
       count(*) AS pending,
       min(created_at) AS oldest_pending_at,
       extract(epoch FROM now() - min(created_at))::double precision AS oldest_age_s,
       count(*) FILTER (WHERE created_at < now() - interval '5 minutes') AS older_than_5m,
       max(attempts) AS max_attempts
FROM zsync.outbox
WHERE acked_at IS NULL
GROUP BY table_name;

REVOKE ALL ON zsync.sync_events, zsync.sync_metrics_5m, zsync.sync_metrics_hourly, zsync.outbox_backlog FROM PUBLIC;

-- The figures the seed's alerts (and the backlog alerts) are evaluated on, over p_window.
CREATE OR REPLACE FUNCTION zsync.sync_health(p_window interval DEFAULT '1 hour')
RETURNS TABLE (applied bigint, failed bigint, conflicts bigint, live_lag_avg_s double precision,
               live_lag_n bigint, repairs bigint, outbox_pending bigint, outbox_oldest_age_s double precision,
               outbox_older_than_5m bigint)
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    WITH ev AS (SELECT * FROM zsync.sync_events WHERE at > now() - p_window),
         ob AS (SELECT count(*) AS pending, extract(epoch FROM now() - min(created_at))::double precision AS age,
                       count(*) FILTER (WHERE created_at < now() - interval '5 minutes') AS old
                FROM zsync.outbox WHERE acked_at IS NULL)
    SELECT count(*) FILTER (WHERE outcome = 'applied' AND origin <> 'reconcile'),
           count(*) FILTER (WHERE outcome IN ('rejected', 'failed')),
           count(*) FILTER (WHERE outcome = 'skipped_stale' AND origin = 'live'),
           avg(lag_s) FILTER (WHERE origin = 'live' AND lag_s IS NOT NULL),
           count(lag_s) FILTER (WHERE origin = 'live'),
           count(*) FILTER (WHERE origin <> 'live'),
           (SELECT pending FROM ob), (SELECT age FROM ob), (SELECT old FROM ob)
    FROM ev
$$;

-- Alert state: one row per alert; an alert posts when it opens and when it resolves, never while open.
CREATE TABLE IF NOT EXISTS zsync.alert_state (
    alert           text PRIMARY KEY,
    is_open         boolean NOT NULL DEFAULT false,
    opened_at       timestamptz,
    resolved_at     timestamptz,
    detail          text,
    last_checked_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON zsync.alert_state FROM PUBLIC;

-- Record which alerts fire now (p_firing: {"alert": "detail", ...}; p_known: every alert evaluated) and
-- return the transitions: 'opened' for a newly firing alert, 'resolved' for one that stopped. It takes a
-- transaction-level advisory lock, so concurrent checks serialise: the caller posts the transitions and
-- then commits (or rolls back when the post failed, so the next check posts them again).
CREATE OR REPLACE FUNCTION zsync.transition_alerts(p_firing jsonb, p_known text[])
RETURNS TABLE (alert text, transition text, detail text)
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    k text;
    s zsync.alert_state;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('zsync.transition_alerts'));
    FOREACH k IN ARRAY p_known LOOP
        SELECT * INTO s FROM zsync.alert_state a WHERE a.alert = k FOR UPDATE;
        IF p_firing ? k THEN
            IF s.alert IS NULL OR NOT s.is_open THEN
                INSERT INTO zsync.alert_state AS a (alert, is_open, opened_at, detail, last_checked_at)
                VALUES (k, true, now(), p_firing->>k, now())
                ON CONFLICT ON CONSTRAINT alert_state_pkey DO UPDATE
                SET is_open = true, opened_at = now(), detail = EXCLUDED.detail, last_checked_at = now();
                alert := k; transition := 'opened'; detail := p_firing->>k;
                RETURN NEXT;
            ELSE
                UPDATE zsync.alert_state a SET detail = p_firing->>k, last_checked_at = now() WHERE a.alert = k;
            END IF;
        ELSIF s.alert IS NOT NULL AND s.is_open THEN
            UPDATE zsync.alert_state a SET is_open = false, resolved_at = now(), last_checked_at = now()
            WHERE a.alert = k;
            alert := k; transition := 'resolved'; detail := s.detail;
            RETURN NEXT;
        ELSIF s.alert IS NOT NULL THEN
            UPDATE zsync.alert_state a SET last_checked_at = now() WHERE a.alert = k;
        END IF;
    END LOOP;
END
$$;

REVOKE EXECUTE ON FUNCTION zsync.outbox_capture_time(text, text, timestamptz), zsync.sync_health(interval),
    zsync.transition_alerts(jsonb, text[]) FROM PUBLIC;
-- The functions (and the scheduled alert check, which runs with the same database role) call these.
GRANT EXECUTE ON FUNCTION zsync.outbox_capture_time(text, text, timestamptz), zsync.sync_health(interval),
    zsync.transition_alerts(jsonb, text[]) TO zsync_sync;
