-- Row-level security, a second line behind the hub's own tenant checks. The hub runs every
-- tenant-scoped transaction as the role synchub_tenant with the setting synchub.tenant; the
-- policies below admit that role to the tenant's rows only, in the hub's tables and in every
-- synced table. Other roles are not affected: owners bypass row-level security (nothing is
-- FORCEd), and a synced table that had no row-level security keeps admitting every other role.

-- The role. Where the hub's login may not create it, nothing of this file applies (notices
-- say so) and the hub must run with row_level_security = false, or a superuser creates the
-- role, grants it to the hub's login and runs `select synchub.secure_all()`.
do $$
begin
    if not exists (select 1 from pg_roles where rolname = 'synchub_tenant') then
        begin
            create role synchub_tenant nologin;
        exception
            -- Roles are cluster-wide: another database's migration may have created it just now.
            when duplicate_object or unique_violation then null;
            when insufficient_privilege then
                raise notice 'synchub: cannot create role synchub_tenant; row-level security is not set up';
                return;
        end;
    end if;
    -- The hub's login switches to the role with `set local role`.
    if not pg_has_role(current_user, 'synchub_tenant', 'MEMBER') then
        begin
            execute format('grant synchub_tenant to %I', current_user);
        exception when insufficient_privilege or unique_violation then
            raise notice 'synchub: cannot grant synchub_tenant to %', current_user;
        end;
    end if;
end $$;

-- The hub's tables: the role reaches only rows of the tenant named by synchub.tenant.
create or replace function synchub.secure_hub_tables() returns void
language plpgsql as $$
declare
    t text;
begin
    if not exists (select 1 from pg_roles where rolname = 'synchub_tenant') then
        return;
    end if;
    grant usage on schema synchub to synchub_tenant;
    grant usage, select on all sequences in schema synchub to synchub_tenant;
    foreach t in array array['tenants', 'change_log', 'device_cursors', 'row_versions', 'conflicts'] loop
        execute format('grant select, insert, update, delete on synchub.%I to synchub_tenant', t);
        execute format('alter table synchub.%I enable row level security', t);
        execute format('drop policy if exists synchub_tenant_only on synchub.%I', t);
        execute format(
            'create policy synchub_tenant_only on synchub.%I as restrictive to synchub_tenant '
            'using (tenant_id = current_setting(''synchub.tenant'', true)) '
            'with check (tenant_id = current_setting(''synchub.tenant'', true))', t);
        execute format('drop policy if exists synchub_tenant_rows on synchub.%I', t);
        execute format('create policy synchub_tenant_rows on synchub.%I as permissive to synchub_tenant using (true) with check (true)', t);
    end loop;
end $$;

-- A synced table: the role may read and write it (and the sequences its columns own), but
-- only rows whose tenant column is synchub.tenant. Needs ownership of the table.
create or replace function synchub.secure_table(tbl regclass, tenant_column text) returns void
language plpgsql as $$
declare
    seq regclass;
    tenant_only text := format('(%I)::text = current_setting(%L, true)', tenant_column, 'synchub.tenant');
begin
    if not exists (select 1 from pg_roles where rolname = 'synchub_tenant') then
        return;
    end if;
    execute format('grant usage on schema %I to synchub_tenant',
                   (select n.nspname from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = tbl));
    execute format('grant select, insert, update, delete on %s to synchub_tenant', tbl);
    for seq in
        select d.objid::regclass
          from pg_depend d join pg_class s on s.oid = d.objid and s.relkind = 'S'
         where d.classid = 'pg_class'::regclass and d.refclassid = 'pg_class'::regclass
           and d.refobjid = tbl and d.deptype in ('a', 'i')
    loop
        execute format('grant usage, select on sequence %s to synchub_tenant', seq);
    end loop;
    if not (select relrowsecurity from pg_class where oid = tbl) then
        -- Turning row-level security on must not lock the application's other roles out;
        -- a table that had it on keeps exactly the application's policies for them.
        execute format('alter table %s enable row level security', tbl);
        execute format('drop policy if exists synchub_other_roles on %s', tbl);
        execute format(
            'create policy synchub_other_roles on %s as permissive to public '
            'using (current_user <> %L) with check (current_user <> %L)', tbl, 'synchub_tenant', 'synchub_tenant');
    end if;
    execute format('drop policy if exists synchub_tenant_only on %s', tbl);
    execute format('create policy synchub_tenant_only on %s as restrictive to synchub_tenant using (%s) with check (%s)',
                   tbl, tenant_only, tenant_only);
    execute format('drop policy if exists synchub_tenant_rows on %s', tbl);
    execute format('create policy synchub_tenant_rows on %s as permissive to synchub_tenant using (true) with check (true)', tbl);
end $$;

-- The capture trigger fires for other SQL clients' writes, whichever role they use, and writes
-- the hub's tables: it runs as their owner (who bypasses row-level security), with a fixed
-- search_path. The table's name in the log comes from the trigger's arguments (as registered),
-- not from rendering its oid, which would depend on the search_path.
create or replace function synchub.capture_change() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    tenant_col text := tg_argv[0];
    wire_name text := tg_argv[1];
    new_j jsonb := case when tg_op <> 'DELETE' then to_jsonb(new) end;
    old_j jsonb := case when tg_op <> 'INSERT' then to_jsonb(old) end;
    img jsonb := coalesce(new_j, old_j);
    tenant text := img ->> tenant_col;
    key jsonb := '{}';
    changed jsonb := '{}';
    old_vals jsonb;
    next_seq bigint;
    now_ms bigint := (extract(epoch from clock_timestamp()) * 1000)::bigint;
    clock jsonb;
begin
    if current_setting('synchub.origin', true) = 'hub' or tenant is null then
        return null;
    end if;
    for i in 2 .. tg_nargs - 1 loop
        key := key || jsonb_build_object(tg_argv[i], img -> tg_argv[i]);
    end loop;
    if tg_op = 'UPDATE' then
        select coalesce(jsonb_object_agg(n.key, n.value), '{}'), coalesce(jsonb_object_agg(n.key, old_j -> n.key), '{}')
          into changed, old_vals
          from jsonb_each(new_j) n
         where n.value is distinct from old_j -> n.key;
        if changed = '{}' then
            return null;
        end if;
    elsif tg_op = 'INSERT' then
        changed := new_j;
    else
        old_vals := old_j;
    end if;

    insert into synchub.tenants (tenant_id) values (tenant) on conflict do nothing;
    update synchub.tenants set head_seq = head_seq + 1 where tenant_id = tenant returning head_seq into next_seq;

    insert into synchub.change_log (tenant_id, seq, table_name, op, pk, new_row, old_values, hlc_wall_ms, hlc_counter)
    values (tenant, next_seq, wire_name, lower(tg_op), key, new_j, old_vals, now_ms, 0);

    -- session_user: the writer's login (current_user is the function's owner here).
    clock := jsonb_build_array(now_ms, 0, '', next_seq, session_user);
    if tg_op = 'DELETE' then
        insert into synchub.row_versions (tenant_id, table_name, pk, version, deleted, clocks)
        values (tenant, wire_name, key, next_seq, clock, '{}')
        on conflict (tenant_id, table_name, pk) do update set version = excluded.version, deleted = excluded.deleted;
    else
        insert into synchub.row_versions as rv (tenant_id, table_name, pk, version, deleted, clocks)
        values (tenant, wire_name, key, next_seq, null,
                (select coalesce(jsonb_object_agg(c, clock), '{}') from jsonb_object_keys(changed) c))
        on conflict (tenant_id, table_name, pk) do update
           set version = excluded.version, deleted = null, clocks = rv.clocks || excluded.clocks;
    end if;
    perform pg_notify('synchub_log', tenant);
    return null;
end $$;

-- Trigger arguments: tenant column, table name as registered, primary-key columns.
create or replace function synchub.create_capture_trigger(tbl regclass, tenant_column text)
returns void language plpgsql as $$
declare
    pk_cols text[];
begin
    select array_agg(a.attname::text order by array_position(i.indkey::int2[], a.attnum))
      into pk_cols
      from pg_index i join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
     where i.indrelid = tbl and i.indisprimary;
    pk_cols := array_remove(pk_cols, tenant_column);
    execute format('drop trigger if exists synchub_capture on %s', tbl);
    execute format(
        'create trigger synchub_capture after insert or update or delete on %s for each row '
        'when (current_setting(''synchub.origin'', true) is distinct from ''hub'') '
        'execute function synchub.capture_change(%s)',
        tbl, array_to_string(array(select quote_literal(c) from unnest(array[tenant_column, tbl::text] || pk_cols) c), ', '));
end $$;

-- Registration also secures the table, unless the hub runs without row-level security
-- (it then sets synchub.row_level_security to off for the call).
create or replace function synchub.register_table(tbl regclass, tenant_column text, policy text default 'lww')
returns void language plpgsql as $$
begin
    if not exists (select 1 from pg_attribute where attrelid = tbl and attname = tenant_column and attnum > 0 and not attisdropped) then
        raise exception 'table % has no column %', tbl, tenant_column;
    end if;
    if not exists (select 1 from pg_index where indrelid = tbl and indisprimary) then
        raise exception 'table % has no primary key', tbl;
    end if;
    insert into synchub.synced_tables (table_name, tenant_column, policy)
    values (tbl::text, tenant_column, policy)
    on conflict (table_name) do update set tenant_column = excluded.tenant_column, policy = excluded.policy;
    perform synchub.create_capture_trigger(tbl, tenant_column);
    if current_setting('synchub.row_level_security', true) is distinct from 'off' then
        perform synchub.secure_table(tbl, tenant_column);
    end if;
end $$;

-- Everything at once: the hub's tables and every registered table.
create or replace function synchub.secure_all() returns void
language plpgsql as $$
declare
    r record;
begin
    perform synchub.secure_hub_tables();
    for r in select table_name, tenant_column from synchub.synced_tables where to_regclass(table_name) is not null loop
        perform synchub.secure_table(r.table_name::regclass, r.tenant_column);
    end loop;
end $$;

-- Tables registered before this migration get the new trigger arguments, and are secured where
-- the hub's login owns them (the hub checks at start-up that every synced table is).
do $$
declare
    r record;
begin
    perform synchub.secure_hub_tables();
    for r in select table_name, tenant_column from synchub.synced_tables where to_regclass(table_name) is not null loop
        perform synchub.create_capture_trigger(r.table_name::regclass, r.tenant_column);
        begin
            perform synchub.secure_table(r.table_name::regclass, r.tenant_column);
        exception when insufficient_privilege then
            raise notice 'synchub: cannot secure %: %', r.table_name, sqlerrm;
        end;
    end loop;
end $$;
