-- Local stand-in for Supabase Database Webhooks: the parts of pg_net and supabase_functions that
-- webhook triggers use, reproduced in plain SQL/PL/pgSQL for the embedded Postgres (which has no
-- pg_net extension).
--
-- * Apply locally BEFORE our migrations, so the exact trigger SQL that runs on Supabase
--   (`EXECUTE FUNCTION supabase_functions.http_request(url, method, headers, params, timeout_ms)`)
--   runs unchanged here. NEVER apply this to a real Supabase project: it already has these objects.
-- * Idempotent: safe to run any number of times (IF NOT EXISTS / CREATE OR REPLACE throughout).
-- * HTTP is sent by infra/local/pgnet_sender.py (PgNetSender), which plays the pg_net background
--   worker: it takes up to 200 queued requests per batch, sends each once (never retries) and
--   records the outcome in net._http_response.
-- * Time zone: Postgres serialises timestamptz values inside the jsonb payload with the SESSION
--   TimeZone. Supabase databases run with TimeZone = UTC, so payloads carry
--   "2025-12-22T10:00:00+00:00". The last statement of this file therefore sets the current
--   database's default TimeZone to UTC (new sessions only; pgnet_sender.ensure_utc_database() does
--   the same from Python). Clients that set PGTZ or `SET timezone` themselves change the payload,
--   exactly as they would on Supabase.
--
-- Usage: psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -1 -f infra/local/pg_net.sql
--        or pgnet_sender.apply_pg_net_sql(url_or_connection).

-- ---------------------------------------------------------------------------------------------
-- pg_net: schema net
-- ---------------------------------------------------------------------------------------------
create schema if not exists net;

-- Requests waiting for the worker. pg_net's queue is unlogged (fast, not crash-safe): so is this.
create unlogged table if not exists net.http_request_queue (
    id bigserial primary key,
    method text not null,
    url text not null,
    headers jsonb not null,
    body bytea,
    timeout_milliseconds integer not null
);
alter table net.http_request_queue set unlogged;

-- One row per finished request (success, HTTP error, timeout or transport error).
create unlogged table if not exists net._http_response (
    id bigint,
    status_code integer,
    content_type text,
    headers jsonb,
    content text,
    timed_out boolean,
    error_msg text,
    created timestamptz not null default now()
);
alter table net._http_response set unlogged;
create index if not exists _http_response_created_idx on net._http_response (created);

-- Percent-encode a string like curl_escape(): every byte of its UTF-8 form except the RFC 3986
-- unreserved characters (A-Z a-z 0-9 - . _ ~) becomes %XX.
create or replace function net._urlencode_string(string varchar)
    returns text
    language sql
    immutable
    strict
as $$
    select coalesce(
        string_agg(
            case
                when (b between 48 and 57) or (b between 65 and 90) or (b between 97 and 122)
                     or b in (45, 46, 95, 126)
                then chr(b)
                else '%' || upper(lpad(to_hex(b), 2, '0'))
            end,
            '' order by i
        ),
        ''
    )
    from (select convert_to(string, 'UTF8') as bytes) s,
         generate_series(0, length(s.bytes) - 1) as i,
         lateral get_byte(s.bytes, i) as b
$$;

-- Append already-encoded "key=value" pairs to the url's query string (as curl's
-- CURLU_APPENDQUERY does: '?' if the url has no query yet, '&' otherwise).
create or replace function net._encode_url_with_params_array(url text, params_array text[])
    returns text
    language sql
    immutable
    strict
as $$
    select case
        when cardinality(params_array) = 0 then url
        else url || case when position('?' in url) > 0 then '&' else '?' end
                 || array_to_string(params_array, '&')
    end
$$;

-- Queue a request and wake the local worker. Shared by http_get/http_post/http_delete.
-- pg_notify is a LOCAL speed-up only: real pg_net wakes its background worker with net.wake()
-- (and otherwise polls). Like a real request, the notification is only delivered at commit, and
-- the worker only ever sees committed rows: requests in a rolled-back transaction are never sent.
create or replace function net._zsync_enqueue(
    method text,
    url text,
    params jsonb,
    headers jsonb,
    body bytea,
    timeout_milliseconds integer
)
    returns bigint
    language plpgsql
    volatile
    security definer
    set search_path = net
as $$
declare
    request_id bigint;
    params_array text[];
begin
    select coalesce(array_agg(net._urlencode_string(key) || '=' || net._urlencode_string(value)), '{}')
      into params_array
      from jsonb_each_text(coalesce(params, '{}'::jsonb));

    insert into net.http_request_queue (method, url, headers, body, timeout_milliseconds)
    values (
        method,
        net._encode_url_with_params_array(url, params_array),
        coalesce(headers, '{}'::jsonb),
        body,
        timeout_milliseconds
    )
    returning id into request_id;

    perform pg_notify('zsync_pg_net', request_id::text);
    return request_id;
end
$$;

create or replace function net.http_get(
    url text,
    params jsonb default '{}'::jsonb,
    headers jsonb default '{}'::jsonb,
    timeout_milliseconds integer default 5000
)
    returns bigint
    language plpgsql
    volatile
    security definer
    set search_path = net
as $$
begin
    return net._zsync_enqueue('GET', url, params, headers, null, timeout_milliseconds);
end
$$;

create or replace function net.http_post(
    url text,
    body jsonb default '{}'::jsonb,
    params jsonb default '{}'::jsonb,
    headers jsonb default '{"Content-Type": "application/json"}'::jsonb,
    timeout_milliseconds integer default 5000
)
    returns bigint
    language plpgsql
    volatile
    security definer
    set search_path = net
as $$
declare
    content_type text;
begin
    select header_value
      into content_type
      from jsonb_each_text(coalesce(headers, '{}'::jsonb)) as h(header_name, header_value)
     where lower(header_name) = 'content-type'
     limit 1;

    -- pg_net adds the JSON content type when the caller's headers omit it ...
    if content_type is null then
        headers := coalesce(headers, '{}'::jsonb) || '{"Content-Type": "application/json"}'::jsonb;
    end if;

    -- ... and refuses any other content type.
    if content_type <> 'application/json' then
        raise exception 'Content-Type header must be "application/json"';
    end if;

    return net._zsync_enqueue('POST', url, params, headers, convert_to(body::text, 'UTF8'), timeout_milliseconds);
end
$$;

create or replace function net.http_delete(
    url text,
    params jsonb default '{}'::jsonb,
    headers jsonb default '{}'::jsonb,
    timeout_milliseconds integer default 5000,
    body jsonb default null
)
    returns bigint
    language plpgsql
    volatile
    security definer
    set search_path = net
as $$
begin
    return net._zsync_enqueue('DELETE', url, params, headers, convert_to(body::text, 'UTF8'), timeout_milliseconds);
end
$$;

-- Grants, as a hosted project has them. pg_net (0.12 and later) itself runs the first three: every role
-- may use the schema and read AND change every queued request (url, headers, body) and response, even
-- another transaction's before it commits its own. Supabase's extensions.grant_pg_net_access() then
-- grants USAGE on net to its API roles and turns http_get/http_post into SECURITY DEFINER functions
-- executable by postgres, anon, authenticated and service_role only. So nothing that authenticates a
-- request may ever be put in its headers or body: any role that can run SQL reads it.
grant usage on schema net to public;
grant all on all sequences in schema net to public;
grant all on all tables in schema net to public;
revoke all on function net.http_get(text, jsonb, jsonb, integer) from public;
revoke all on function net.http_post(text, jsonb, jsonb, jsonb, integer) from public;
do $$
declare
    r text;
begin
    foreach r in array array['postgres', 'anon', 'authenticated', 'service_role'] loop
        if exists (select 1 from pg_roles where rolname = r) then
            execute format('grant usage on schema net to %I', r);
            execute format('grant execute on function net.http_get(text, jsonb, jsonb, integer), '
                           'net.http_post(text, jsonb, jsonb, jsonb, integer) to %I', r);
        end if;
    end loop;
end
$$;

-- ---------------------------------------------------------------------------------------------
-- supabase_functions: the Database Webhooks trigger function and its audit table
-- ---------------------------------------------------------------------------------------------
create schema if not exists supabase_functions;

create table if not exists supabase_functions.hooks (
    id bigserial primary key,
    hook_table_id integer not null,
    hook_name text not null,
    created_at timestamptz not null default now(),
    request_id bigint
);
create index if not exists supabase_functions_hooks_request_id_idx
    on supabase_functions.hooks using btree (request_id);
create index if not exists supabase_functions_hooks_h_table_id_h_name_idx
    on supabase_functions.hooks using btree (hook_table_id, hook_name);
comment on table supabase_functions.hooks is 'Supabase Functions Hooks: Audit trail for triggered hooks.';

-- Trigger arguments (all text): url, method, headers, params, timeout_ms. A missing argument or the
-- text 'null' means the default: headers {"Content-Type": "application/json"}, params {}, 1000 ms.
create or replace function supabase_functions.http_request()
    returns trigger
    language plpgsql
    security definer
    set search_path = supabase_functions
as $$
declare
    request_id bigint;
    payload jsonb;
    url text := TG_ARGV[0]::text;
    method text := TG_ARGV[1]::text;
    headers jsonb := '{}'::jsonb;
    params jsonb := '{}'::jsonb;
    timeout_ms integer := 1000;
begin
    if url is null or url = 'null' then
        raise exception 'url argument is missing';
    end if;

    if method is null or method = 'null' then
        raise exception 'method argument is missing';
    end if;

    if TG_ARGV[2] is null or TG_ARGV[2] = 'null' then
        headers := '{"Content-Type": "application/json"}'::jsonb;
    else
        headers := TG_ARGV[2]::jsonb;
    end if;

    if TG_ARGV[3] is null or TG_ARGV[3] = 'null' then
        params := '{}'::jsonb;
    else
        params := TG_ARGV[3]::jsonb;
    end if;

    if TG_ARGV[4] is null or TG_ARGV[4] = 'null' then
        timeout_ms := 1000;
    else
        timeout_ms := TG_ARGV[4]::integer;
    end if;

    case
        when method = 'GET' then
            request_id := net.http_get(url, params, headers, timeout_ms);
        when method = 'POST' then
            payload := jsonb_build_object(
                'old_record', OLD,
                'record', NEW,
                'type', TG_OP,
                'table', TG_TABLE_NAME,
                'schema', TG_TABLE_SCHEMA
            );
            request_id := net.http_post(url, payload, params, headers, timeout_ms);
        else
            raise exception 'method argument % is invalid', method;
    end case;

    insert into supabase_functions.hooks (hook_table_id, hook_name, request_id)
    values (TG_RELID, TG_NAME, request_id);

    return new;
end
$$;

grant usage on schema supabase_functions to public;

-- Supabase databases run with TimeZone = UTC (see the header comment).
do $$
begin
    execute format('alter database %I set timezone to %L', current_database(), 'UTC');
end
$$;
