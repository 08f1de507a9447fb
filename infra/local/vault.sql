-- Local stand-in for Supabase Vault (the supabase_vault extension, 0.3.x): schema vault, table
-- vault.secrets, view vault.decrypted_secrets, functions vault.create_secret / vault.update_secret,
-- with the same names, signatures and grants, so the SQL zsync runs on Supabase runs unchanged on the
-- embedded Postgres. NEVER apply this to a real Supabase project: it already has Vault.
--
-- What differs: Supabase encrypts vault.secrets.secret with libsodium (AEAD, key outside the database);
-- this stand-in only base64-encodes it. The access rules are the point locally: PUBLIC can neither use
-- the schema nor read either relation nor execute the functions; only the owner (and roles it grants)
-- can, exactly as on Supabase where only `postgres` / `service_role` may read decrypted_secrets.
-- Idempotent: safe to run any number of times.

create schema if not exists vault;
revoke all on schema vault from public;

create table if not exists vault.secrets (
    id          uuid primary key default gen_random_uuid(),
    name        text,
    description text not null default '',
    secret      text not null,
    key_id      uuid,
    nonce       bytea default decode(md5(random()::text), 'hex'),
    created_at  timestamptz not null default current_timestamp,
    updated_at  timestamptz not null default current_timestamp
);
comment on table vault.secrets is 'Table with encrypted `secret` column for storing sensitive information on disk.';
create unique index if not exists secrets_name_idx on vault.secrets using btree (name) where name is not null;

create or replace view vault.decrypted_secrets as
select s.id,
       s.name,
       s.description,
       s.secret,
       convert_from(decode(s.secret, 'base64'), 'utf8') as decrypted_secret,
       s.key_id,
       s.nonce,
       s.created_at,
       s.updated_at
  from vault.secrets s;

revoke all on vault.secrets, vault.decrypted_secrets from public;

create or replace function vault.create_secret(
    new_secret text,
    new_name text = null,
    new_description text = '',
    new_key_id uuid = null  -- unused, as in supabase_vault 0.3
)
    returns uuid
    security definer
    language plpgsql
    set search_path = ''
as $$
declare
    rec record;
begin
    insert into vault.secrets (secret, name, description)
    values (encode(convert_to(new_secret, 'utf8'), 'base64'), new_name, coalesce(new_description, ''))
    returning * into rec;
    return rec.id;
end
$$;

create or replace function vault.update_secret(
    secret_id uuid,
    new_secret text = null,
    new_name text = null,
    new_description text = null,
    new_key_id uuid = null  -- unused
)
    returns void
    security definer
    language plpgsql
    set search_path = ''
as $$
begin
    update vault.secrets s
       set secret = case when new_secret is null then s.secret
                         else encode(convert_to(new_secret, 'utf8'), 'base64') end,
           name = coalesce(new_name, s.name),
           description = coalesce(new_description, s.description),
           updated_at = now()
     where s.id = secret_id;
end
$$;

revoke all on function vault.create_secret(text, text, text, uuid), vault.update_secret(uuid, text, text, text, uuid)
    from public;

-- Hosted grants (supabase/postgres): postgres and service_role may read decrypted_secrets and call the
-- two functions; anon and authenticated get nothing. So any secret kept in Vault is readable with the
-- service key - zsync keeps none there (migration 20261205100040).
do $$
declare
    r text;
begin
    foreach r in array array['postgres', 'service_role'] loop
        if exists (select 1 from pg_roles where rolname = r) then
            execute format('grant usage on schema vault to %I', r);
            execute format('grant select on vault.secrets, vault.decrypted_secrets to %I', r);
            execute format('grant execute on function vault.create_secret(text, text, text, uuid), '
                           'vault.update_secret(uuid, text, text, text, uuid) to %I', r);
        end if;
    end loop;
end
$$;
