-- zsync: no time pins a row (issue 18, item 3).
--
-- A version (updated_at) more than a configured skew ahead of the database clock would win every
-- comparison until the clocks caught up, and the hybrid-logical rule (maintain_updated_at) would give
-- every later write that time + 1 ms. Such a write is refused here, whoever makes it:
-- * a write that is not the sync's (a Claude agent, a person, a job): refused with SQLSTATE 22008
--   (datetime_field_overflow) naming the column and the value, so the writer sees the error at once
--   (like the zsync_*_syncable CHECK constraints). A version already stored beyond the skew (before this
--   migration) is no floor for the next write: that write gets the writer's time or the clock.
-- * the sync's own writes (zsync.origin = 'sync'): the functions refuse such a version before they write
--   (400 / sync_failed); this is the database-clock backstop (the functions isolate the record).
--
-- The skew: zsync.config key 'max_future_skew_s' (seconds), read by zsync.max_future_skew(). Its source
-- is the functions' setting ZSYNC_MAX_FUTURE_SKEW_S (shared/settings.py, default 300): `zsync migrate`
-- writes it here (zsync.set_max_future_skew). Re-runnable.

CREATE TABLE IF NOT EXISTS zsync.config (
    key        text PRIMARY KEY,
    value      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO zsync.config (key, value) VALUES ('max_future_skew_s', '300') ON CONFLICT (key) DO NOTHING;

-- Called by the trigger function (SECURITY DEFINER, as the owner): no other role needs to execute it.
CREATE OR REPLACE FUNCTION zsync.max_future_skew()
RETURNS interval LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT make_interval(secs => coalesce((SELECT (c.value #>> '{}')::float8 FROM zsync.config c
                                           WHERE c.key = 'max_future_skew_s'), 300))
$$;

CREATE OR REPLACE FUNCTION zsync.set_max_future_skew(p_seconds float8)
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO zsync.config (key, value, updated_at) VALUES ('max_future_skew_s', to_jsonb(p_seconds), now())
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at
    WHERE zsync.config.value IS DISTINCT FROM EXCLUDED.value
$$;

-- Hybrid-logical updated_at (see 20261129100000_zsync_versions_hlc.sql), plus the skew rule above.
CREATE OR REPLACE FUNCTION zsync.maintain_updated_at()
RETURNS trigger LANGUAGE plpgsql
AS $$
DECLARE
    v_skew  interval := zsync.max_future_skew();
    v_limit timestamptz := clock_timestamp() + v_skew;
    v_sync  boolean := coalesce(current_setting('zsync.origin', true), '') = 'sync';
    v_set   timestamptz;  -- the version this write sets (not one it leaves as it was)
    v_floor timestamptz;
BEGIN
    IF v_sync OR TG_OP = 'INSERT' THEN
        v_set := NEW.updated_at;
    ELSIF NEW.updated_at IS DISTINCT FROM OLD.updated_at THEN
        v_set := NEW.updated_at;
    END IF;
    -- (a time the zsync_updated_at_syncable CHECK refuses - infinity, year 9999 - is left to it)
    IF v_set > v_limit AND v_set < '9999-12-31 00:00:00+00' THEN
        RAISE EXCEPTION 'zsync: %.updated_at % (id %) is % ahead of the database clock; at most % is allowed',
            TG_TABLE_NAME, v_set, NEW.id, date_trunc('seconds', v_set - clock_timestamp()), v_skew
            USING ERRCODE = '22008', COLUMN = 'updated_at', TABLE = TG_TABLE_NAME,
                  HINT = 'set updated_at to now() or leave it unchanged (zsync.config max_future_skew_s)';
    END IF;
    IF v_sync THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'INSERT' THEN
        NEW.updated_at := coalesce(NEW.updated_at, clock_timestamp());
        SELECT date_trunc('milliseconds', t.version) + interval '1 millisecond' INTO v_floor
        FROM zsync.tombstones t WHERE t.table_name = TG_TABLE_NAME AND t.record_id = NEW.id
          AND t.version <= v_limit;  -- a tombstone from the future is no floor
        IF v_floor IS NOT NULL THEN
            NEW.updated_at := greatest(NEW.updated_at, v_floor);
        END IF;
    ELSIF to_jsonb(NEW) IS DISTINCT FROM to_jsonb(OLD) THEN
        IF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at OR NEW.updated_at IS NULL THEN
            NEW.updated_at := clock_timestamp();
        END IF;
        IF OLD.updated_at <= v_limit THEN  -- a version stored beyond the skew (before this rule) pins nothing
            NEW.updated_at := greatest(NEW.updated_at,
                                       date_trunc('milliseconds', OLD.updated_at) + interval '1 millisecond');
        END IF;
    END IF;
    RETURN NEW;
END
$$;
ALTER FUNCTION zsync.maintain_updated_at() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

REVOKE ALL ON zsync.config FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA zsync FROM PUBLIC;
