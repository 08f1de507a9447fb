-- zsync batch apply cost (issue 12, performance): what zsync.sync_apply_many spends per row that is ours,
-- same values and semantics (bench/apply_many.py measures it next to a raw upsert of the same rows).
--
-- * zsync.capture_change at statement level: one INSERT INTO zsync.outbox ... SELECT FROM the statement's
--   transition table instead of one plpgsql call and one INSERT per changed row (~15 us a row, a sixth of a
--   1,000-row batch apply). Same entries (table, record id, op, the row's updated_at / the tombstone's
--   version for a DELETE), same created_at (now()), written at the same point (the end of the statement, as
--   AFTER ROW triggers are), in the order the rows were changed. Transition tables allow one event per
--   trigger: zsync_outbox_insert / _update / _delete replace zsync_outbox. The row-level form still works.
-- * zsync.canonical_json: numbers directly inside an object or array are canonicalised in the same query
--   (no nested plpgsql call per number); nested containers still recurse. Same jsonb.

CREATE OR REPLACE FUNCTION zsync.capture_change()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_LEVEL = 'STATEMENT' THEN
        IF TG_OP = 'DELETE' THEN
            INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at)
            SELECT TG_TABLE_NAME, o.id, 'DELETE', t.version
            FROM zsync_old_rows o JOIN zsync.tombstones t ON t.table_name = TG_TABLE_NAME AND t.record_id = o.id;
        ELSE
            INSERT INTO zsync.outbox (table_name, record_id, op, record_updated_at)
            SELECT TG_TABLE_NAME, n.id, TG_OP, n.updated_at FROM zsync_new_rows n;
        END IF;
        RETURN NULL;
    END IF;
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
    EXECUTE format('DROP TRIGGER IF EXISTS zsync_outbox_insert ON %s', p_table);
    EXECUTE format('CREATE TRIGGER zsync_outbox_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS zsync_new_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION zsync.capture_change()', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS zsync_outbox_update ON %s', p_table);
    EXECUTE format('CREATE TRIGGER zsync_outbox_update AFTER UPDATE ON %s REFERENCING NEW TABLE AS zsync_new_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION zsync.capture_change()', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS zsync_outbox_delete ON %s', p_table);
    EXECUTE format('CREATE TRIGGER zsync_outbox_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS zsync_old_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION zsync.capture_change()', p_table);
END
$$;

SELECT zsync.enable_sync('public.agent_jobs');
SELECT zsync.enable_sync('public.agent_decisions');
SELECT zsync.enable_sync('public.rate_limits');

CREATE OR REPLACE FUNCTION zsync.canonical_json(v jsonb)
RETURNS jsonb LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    n numeric;
BEGIN
    CASE jsonb_typeof(v)
        WHEN 'number' THEN
            n := v::numeric;
            IF n = 0 OR abs(n) BETWEEN 1e-300 AND 1e300 THEN
                RETURN to_jsonb(n::float8);
            END IF;
            RETURN to_jsonb(trim_scale(n));
        WHEN 'object' THEN
            IF NOT jsonb_path_exists(v, 'strict $.** ? (@.type() == "number")') THEN
                RETURN v;
            END IF;
            RETURN coalesce((
                SELECT jsonb_object_agg(e.key,
                           CASE jsonb_typeof(e.value)
                               WHEN 'number' THEN
                                   CASE WHEN e.value::numeric = 0 OR abs(e.value::numeric) BETWEEN 1e-300 AND 1e300
                                            THEN to_jsonb(e.value::numeric::float8)
                                        ELSE to_jsonb(trim_scale(e.value::numeric)) END
                               WHEN 'object' THEN zsync.canonical_json(e.value)
                               WHEN 'array' THEN zsync.canonical_json(e.value)
                               ELSE e.value END)
                FROM jsonb_each(v) e), '{}'::jsonb);
        WHEN 'array' THEN
            IF NOT jsonb_path_exists(v, 'strict $.** ? (@.type() == "number")') THEN
                RETURN v;
            END IF;
            RETURN coalesce((
                SELECT jsonb_agg(CASE jsonb_typeof(e.value)
                                     WHEN 'number' THEN
                                         CASE WHEN e.value::numeric = 0 OR abs(e.value::numeric) BETWEEN 1e-300 AND 1e300
                                                  THEN to_jsonb(e.value::numeric::float8)
                                              ELSE to_jsonb(trim_scale(e.value::numeric)) END
                                     WHEN 'object' THEN zsync.canonical_json(e.value)
                                     WHEN 'array' THEN zsync.canonical_json(e.value)
                                     ELSE e.value END ORDER BY e.ord)
                FROM jsonb_array_elements(v) WITH ORDINALITY AS e(value, ord)), '[]'::jsonb);
        ELSE
            RETURN v;
    END CASE;
END
$$;
