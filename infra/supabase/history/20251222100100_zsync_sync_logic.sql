-- zsync sync logic: versions, the atomic last-writer-wins upsert, append-only audit.
--
-- A row's version is (updated_at, content_hash). content_hash is md5 of the row's canonical jsonb
-- (serialised in UTC) without updated_at, with empty and null values left out. Versions are totally
-- ordered: the later updated_at wins; on an exact tie the larger hash wins, so every replica picks the
-- same winner; equal versions mean equal content (an empty text counting as no value), which is how an
-- echo of the sync's own write is recognised (and dropped) on either side.

-- Writes made by the sync run with zsync.origin = 'sync' (transaction-local) so the updated_at
-- maintenance below leaves the version they carry untouched.
-- Empty text and null hash alike: a Zap sends "" for an empty field that the other side stores as
-- NULL, and the two must count as the same version (else every such record costs an extra write).
CREATE OR REPLACE FUNCTION zsync.content_hash(p_row jsonb)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT md5(coalesce(
        (SELECT jsonb_object_agg(key, value) FROM jsonb_each(p_row - 'updated_at')
         WHERE value NOT IN ('null'::jsonb, '""'::jsonb))::text,
        '{}'))
$$;

-- Compare two versions of one row of p_table given as jsonb (any JSON shape Postgres can cast to the
-- column types). Returns 1 if a is newer, 0 if the same version, -1 if older. A missing updated_at is
-- older than any timestamp.
CREATE OR REPLACE FUNCTION zsync.version_cmp(p_table regclass, a jsonb, b jsonb)
RETURNS integer LANGUAGE plpgsql STABLE
SET timezone TO 'UTC'
AS $$
DECLARE
    result integer;
BEGIN
    EXECUTE format($q$
        SELECT CASE
            WHEN va = vb THEN 0
            WHEN va > vb THEN 1
            ELSE -1 END
        FROM (SELECT ROW(coalesce(x.updated_at, '-infinity'), zsync.content_hash(to_jsonb(x))) AS va,
                     ROW(coalesce(y.updated_at, '-infinity'), zsync.content_hash(to_jsonb(y))) AS vb
              FROM jsonb_populate_record(NULL::%1$s, $1) x, jsonb_populate_record(NULL::%1$s, $2) y) v
    $q$, p_table) INTO result USING a, b;
    RETURN result;
END
$$;

-- Apply an incoming row only if its version is newer than the stored one. Atomic: the stored row is
-- locked (or the insert is conflict-safe) before the comparison, so concurrent deliveries serialise.
-- p_row must carry every column (the sync stores exactly the version it applies).
-- outcome: 'applied' | 'unchanged' (same version already stored) | 'skipped_stale' (stored is newer).
-- stored: the row as it was before (NULL if there was none).
CREATE OR REPLACE FUNCTION zsync.sync_upsert(p_table regclass, p_row jsonb, OUT outcome text, OUT stored jsonb)
LANGUAGE plpgsql
SET timezone TO 'UTC'
AS $$
DECLARE
    v_id   text := p_row->>'id';
    v_cols text;
    v_n    integer;
BEGIN
    IF v_id IS NULL THEN
        RAISE EXCEPTION 'sync_upsert: row has no id' USING ERRCODE = '22023';
    END IF;
    PERFORM set_config('zsync.origin', 'sync', true);
    LOOP
        EXECUTE format('SELECT to_jsonb(t) FROM %s t WHERE t.id = $1 FOR UPDATE', p_table) INTO stored USING v_id;
        IF stored IS NULL THEN
            EXECUTE format('INSERT INTO %1$s SELECT * FROM jsonb_populate_record(NULL::%1$s, $1) ON CONFLICT (id) DO NOTHING',
                           p_table) USING p_row;
            GET DIAGNOSTICS v_n = ROW_COUNT;
            IF v_n = 1 THEN
                outcome := 'applied';
                RETURN;
            END IF;
            CONTINUE;  -- a concurrent insert won the race: lock that row and compare
        END IF;
        CASE zsync.version_cmp(p_table, p_row, stored)
            WHEN 1 THEN
                SELECT string_agg(format('%I', attname), ', ' ORDER BY attnum) INTO v_cols
                FROM pg_attribute
                WHERE attrelid = p_table AND attnum > 0 AND NOT attisdropped AND attgenerated = '' AND attname <> 'id';
                EXECUTE format('UPDATE %1$s t SET (%2$s) = (SELECT %2$s FROM jsonb_populate_record(NULL::%1$s, $1)) WHERE t.id = $2',
                               p_table, v_cols) USING p_row, v_id;
                outcome := 'applied';
            WHEN 0 THEN
                outcome := 'unchanged';
            ELSE
                outcome := 'skipped_stale';
        END CASE;
        RETURN;
    END LOOP;
END
$$;

-- Writes that do not come from the sync (Claude agents, people) get a fresh version when they change a
-- row without moving updated_at, so "forgot to bump updated_at" can never lose an edit.
CREATE OR REPLACE FUNCTION zsync.maintain_updated_at()
RETURNS trigger LANGUAGE plpgsql
AS $$
BEGIN
    IF coalesce(current_setting('zsync.origin', true), '') = 'sync' THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'INSERT' THEN
        NEW.updated_at := coalesce(NEW.updated_at, clock_timestamp());
    ELSIF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at AND to_jsonb(NEW) IS DISTINCT FROM to_jsonb(OLD) THEN
        NEW.updated_at := greatest(clock_timestamp(), OLD.updated_at + interval '1 microsecond');
    END IF;
    RETURN NEW;
END
$$;

-- audit_log is append-only: the database itself rejects UPDATE, DELETE and TRUNCATE.
CREATE OR REPLACE FUNCTION zsync.reject_audit_change()
RETURNS trigger LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP USING ERRCODE = '42501';
END
$$;
DROP TRIGGER IF EXISTS zsync_audit_log_append_only ON public.audit_log;
CREATE TRIGGER zsync_audit_log_append_only BEFORE UPDATE OR DELETE ON public.audit_log
    FOR EACH ROW EXECUTE FUNCTION zsync.reject_audit_change();
DROP TRIGGER IF EXISTS zsync_audit_log_no_truncate ON public.audit_log;
CREATE TRIGGER zsync_audit_log_no_truncate BEFORE TRUNCATE ON public.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION zsync.reject_audit_change();

-- Insert an audit entry once: a redelivered entry (same id) is a no-op. Columns absent or null in
-- p_row take the table's defaults. Returns true if a row was inserted.
CREATE OR REPLACE FUNCTION zsync.append_audit(p_row jsonb)
RETURNS boolean LANGUAGE plpgsql
AS $$
DECLARE
    v_cols text;
    v_n    integer;
BEGIN
    SELECT string_agg(format('%I', a.attname), ', ' ORDER BY a.attnum) INTO v_cols
    FROM pg_attribute a
    WHERE a.attrelid = 'public.audit_log'::regclass AND a.attnum > 0 AND NOT a.attisdropped
      AND p_row ? a.attname AND jsonb_typeof(p_row -> a.attname) <> 'null';
    IF v_cols IS NULL THEN
        RAISE EXCEPTION 'append_audit: empty entry' USING ERRCODE = '22023';
    END IF;
    EXECUTE format('INSERT INTO public.audit_log (%1$s) SELECT %1$s FROM jsonb_populate_record(NULL::public.audit_log, $1) '
                   'ON CONFLICT (id) DO NOTHING', v_cols) USING p_row;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n = 1;
END
$$;
