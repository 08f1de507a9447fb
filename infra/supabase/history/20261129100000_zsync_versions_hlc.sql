-- zsync correctness (1/3): versions that follow each side's history, compared on a canonical form.
--
-- * Canonical content: a row's content hash is taken over a canonical form - JSON numbers by value
--   (12.50 = 12.5 = 1.25e1, at double precision, what every JSON reader uses), JSON key order as jsonb
--   keeps it, timestamps at millisecond precision (Zapier Tables may keep only milliseconds), and a
--   missing field, null and an empty text/array are the same (an empty JSON array is a value). updated_at is compared at millisecond
--   precision too, so an echo through a millisecond-precision store is still the same version.
-- * Hybrid-logical versions: a write that is not the sync's gets an updated_at strictly later than the
--   version it replaces (at least the old one plus 1 ms), even when the writer's clock is behind the
--   clock that wrote the old version. The sync's own writes keep the version they carry.
-- * A Tables edit that did not advance updated_at (a person editing a cell) is versioned at Zapier's
--   edited_at (zsync.sync_apply's p_edited_at), but only when it changes the content Supabase holds at
--   that same updated_at - the echo of the sync's own write carries the same content and stays equal.

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
            RETURN coalesce((SELECT jsonb_object_agg(key, zsync.canonical_json(value)) FROM jsonb_each(v)), '{}'::jsonb);
        WHEN 'array' THEN
            RETURN coalesce((SELECT jsonb_agg(zsync.canonical_json(e.value) ORDER BY e.ord)
                             FROM jsonb_array_elements(v) WITH ORDINALITY AS e(value, ord)), '[]'::jsonb);
        ELSE
            RETURN v;
    END CASE;
END
$$;

-- The canonical form of a row of p_table given as to_jsonb of that row type (see the header).
CREATE OR REPLACE FUNCTION zsync.canonical_row(p_table regclass, p_row jsonb)
RETURNS jsonb LANGUAGE plpgsql STABLE
SET timezone TO 'UTC'
AS $$
DECLARE
    c   record;
    v   jsonb;
    out jsonb := '{}';
BEGIN
    FOR c IN SELECT a.attname::text AS name, a.atttypid AS typ FROM pg_attribute a
             WHERE a.attrelid = p_table AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum LOOP
        v := p_row -> c.name;
        -- An empty text/array is no value; an empty JSON array in a jsonb column is a value.
        CONTINUE WHEN v IS NULL OR v IN ('null'::jsonb, '""'::jsonb) OR (v = '[]'::jsonb AND c.typ <> 'jsonb'::regtype);
        IF c.typ = 'timestamptz'::regtype AND jsonb_typeof(v) = 'string' THEN
            v := to_jsonb(date_trunc('milliseconds', (v #>> '{}')::timestamptz));
        ELSIF c.typ = 'jsonb'::regtype THEN
            v := zsync.canonical_json(v);
        END IF;
        out := out || jsonb_build_object(c.name, v);
    END LOOP;
    RETURN out;
END
$$;

-- The version of a row of p_table given in any JSON shape Postgres can cast to the column types:
-- (updated_at at millisecond precision, md5 of the canonical content without updated_at).
CREATE OR REPLACE FUNCTION zsync.version_of(p_table regclass, p_row jsonb, OUT ts timestamptz, OUT hash text)
LANGUAGE plpgsql STABLE
SET timezone TO 'UTC'
AS $$
DECLARE
    v jsonb;
BEGIN
    EXECUTE format('SELECT to_jsonb(x) FROM jsonb_populate_record(NULL::%s, $1) x', p_table) INTO v USING p_row;
    ts := date_trunc('milliseconds', coalesce((v ->> 'updated_at')::timestamptz, '-infinity'));
    hash := md5(zsync.canonical_row(p_table, v - 'updated_at')::text);
END
$$;

CREATE OR REPLACE FUNCTION zsync.version_cmp(p_table regclass, a jsonb, b jsonb)
RETURNS integer LANGUAGE plpgsql STABLE
SET timezone TO 'UTC'
AS $$
DECLARE
    va record;
    vb record;
BEGIN
    SELECT * INTO va FROM zsync.version_of(p_table, a);
    SELECT * INTO vb FROM zsync.version_of(p_table, b);
    IF va.ts = vb.ts AND va.hash = vb.hash THEN
        RETURN 0;
    ELSIF (va.ts, va.hash) > (vb.ts, vb.hash) THEN
        RETURN 1;
    END IF;
    RETURN -1;
END
$$;

-- Deleted records: one tombstone per (table, id) while the row is absent, so a stale redelivery or a
-- reconcile never brings it back. version: the delete's version (later than the row it deleted);
-- origin: 'supabase' (a DELETE on the table) or 'tables' (zsync.apply_tables_delete).
CREATE TABLE IF NOT EXISTS zsync.tombstones (
    table_name text NOT NULL,
    record_id  text NOT NULL,
    version    timestamptz NOT NULL,
    deleted_at timestamptz NOT NULL DEFAULT now(),
    origin     text NOT NULL,
    PRIMARY KEY (table_name, record_id)
);

-- Apply an incoming row only if its version is newer than the stored one (row lock, conflict-safe
-- insert), or than the tombstone when the row was deleted. p_edited_at: Zapier Tables' own time of the
-- record's last change, when known (see the header). outcome: 'applied' | 'unchanged' | 'skipped_stale'
-- | 'deleted' (a tombstone as new or newer: not re-inserted). stored: the row before (NULL if none).
-- applied: the row as it is now stored when applied (its updated_at may come from p_edited_at).
CREATE OR REPLACE FUNCTION zsync.sync_apply(p_table regclass, p_row jsonb, p_edited_at timestamptz,
                                            OUT outcome text, OUT stored jsonb, OUT applied jsonb)
LANGUAGE plpgsql
SET timezone TO 'UTC'
AS $$
DECLARE
    v_id   text := p_row->>'id';
    v_cols text;
    v_n    integer;
    v_tomb timestamptz;
    vi     record;
    vs     record;
BEGIN
    IF v_id IS NULL THEN
        RAISE EXCEPTION 'sync_upsert: row has no id' USING ERRCODE = '22023';
    END IF;
    PERFORM set_config('zsync.origin', 'sync', true);
    LOOP
        EXECUTE format('SELECT to_jsonb(t) FROM %s t WHERE t.id = $1 FOR UPDATE', p_table) INTO stored USING v_id;
        IF stored IS NULL THEN
            v_tomb := zsync.tombstone_version((SELECT relname::text FROM pg_class WHERE oid = p_table), v_id);
            IF v_tomb IS NOT NULL AND coalesce(current_setting('zsync.ignore_tombstones', true), '') <> 'on'
               AND (SELECT ts FROM zsync.version_of(p_table, p_row)) <= v_tomb THEN
                outcome := 'deleted';
                RETURN;
            END IF;
            EXECUTE format('INSERT INTO %1$s SELECT * FROM jsonb_populate_record(NULL::%1$s, $1) ON CONFLICT (id) DO NOTHING',
                           p_table) USING p_row;
            GET DIAGNOSTICS v_n = ROW_COUNT;
            IF v_n = 1 THEN
                outcome := 'applied';
                applied := p_row;
                RETURN;
            END IF;
            CONTINUE;  -- a concurrent insert won the race: lock that row and compare
        END IF;
        IF p_edited_at IS NOT NULL THEN
            SELECT * INTO vi FROM zsync.version_of(p_table, p_row);
            SELECT * INTO vs FROM zsync.version_of(p_table, stored);
            IF vi.ts = vs.ts AND vi.hash <> vs.hash AND date_trunc('milliseconds', p_edited_at) > vi.ts THEN
                -- Edited in Tables after the version both sides share, without a new updated_at.
                p_row := p_row || jsonb_build_object('updated_at',
                    greatest(date_trunc('milliseconds', p_edited_at), vs.ts + interval '1 millisecond'));
            END IF;
        END IF;
        CASE zsync.version_cmp(p_table, p_row, stored)
            WHEN 1 THEN
                SELECT string_agg(format('%I', attname), ', ' ORDER BY attnum) INTO v_cols
                FROM pg_attribute
                WHERE attrelid = p_table AND attnum > 0 AND NOT attisdropped AND attgenerated = '' AND attname <> 'id';
                EXECUTE format('UPDATE %1$s t SET (%2$s) = (SELECT %2$s FROM jsonb_populate_record(NULL::%1$s, $1)) WHERE t.id = $2',
                               p_table, v_cols) USING p_row, v_id;
                outcome := 'applied';
                applied := p_row;
            WHEN 0 THEN
                outcome := 'unchanged';
            ELSE
                outcome := 'skipped_stale';
        END CASE;
        RETURN;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION zsync.sync_upsert(p_table regclass, p_row jsonb, OUT outcome text, OUT stored jsonb)
LANGUAGE sql
AS $$
    SELECT a.outcome, a.stored FROM zsync.sync_apply(p_table, p_row, NULL) a
$$;

-- Hybrid-logical updated_at for writes that are not the sync's (Claude agents, people, jobs): a change
-- gets a version later than the one it replaced - the writer's updated_at (or the clock, when the
-- write left updated_at as it was), but at least the old version plus 1 ms; a re-insert of a deleted
-- id at least its tombstone plus 1 ms. A write that changes nothing keeps its version.
CREATE OR REPLACE FUNCTION zsync.maintain_updated_at()
RETURNS trigger LANGUAGE plpgsql
AS $$
DECLARE
    v_floor timestamptz;
BEGIN
    IF coalesce(current_setting('zsync.origin', true), '') = 'sync' THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'INSERT' THEN
        NEW.updated_at := coalesce(NEW.updated_at, clock_timestamp());
        SELECT date_trunc('milliseconds', t.version) + interval '1 millisecond' INTO v_floor
        FROM zsync.tombstones t WHERE t.table_name = TG_TABLE_NAME AND t.record_id = NEW.id;
        IF v_floor IS NOT NULL THEN
            NEW.updated_at := greatest(NEW.updated_at, v_floor);
        END IF;
    ELSIF to_jsonb(NEW) IS DISTINCT FROM to_jsonb(OLD) THEN
        IF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at OR NEW.updated_at IS NULL THEN
            NEW.updated_at := clock_timestamp();
        END IF;
        NEW.updated_at := greatest(NEW.updated_at, date_trunc('milliseconds', OLD.updated_at) + interval '1 millisecond');
    END IF;
    RETURN NEW;
END
$$;
ALTER FUNCTION zsync.maintain_updated_at() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- New functions are not callable by PUBLIC (per-schema default privileges cannot remove that).
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA zsync FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    zsync.canonical_json(jsonb),
    zsync.canonical_row(regclass, jsonb),
    zsync.version_of(regclass, jsonb),
    zsync.sync_apply(regclass, jsonb, timestamptz)
TO zsync_sync;
