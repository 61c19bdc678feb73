-- Capture of writes that other SQL clients make to synced tables, and table registration.
-- The hub marks its own transactions with `synchub.origin = 'hub'` and logs them itself.

create or replace function synchub.capture_change() returns trigger
language plpgsql as $$
declare
    tenant_col text := tg_argv[0];
    new_j jsonb := case when tg_op <> 'DELETE' then to_jsonb(new) end;
    old_j jsonb := case when tg_op <> 'INSERT' then to_jsonb(old) end;
    img jsonb := coalesce(new_j, old_j);
    tenant text := img ->> tenant_col;
    key jsonb := '{}';
    changed jsonb := '{}';
    old_vals jsonb;
    col text;
    next_seq bigint;
    now_ms bigint := (extract(epoch from clock_timestamp()) * 1000)::bigint;
    clock jsonb;
begin
    if current_setting('synchub.origin', true) = 'hub' or tenant is null then
        return null;
    end if;
    for i in 1 .. tg_nargs - 1 loop
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
    values (tenant, next_seq, tg_relid::regclass::text, lower(tg_op), key, new_j, old_vals, now_ms, 0);

    clock := jsonb_build_array(now_ms, 0, '', next_seq, current_user);
    if tg_op = 'DELETE' then
        insert into synchub.row_versions (tenant_id, table_name, pk, version, deleted, clocks)
        values (tenant, tg_relid::regclass::text, key, next_seq, clock, '{}')
        on conflict (tenant_id, table_name, pk) do update set version = excluded.version, deleted = excluded.deleted;
    else
        insert into synchub.row_versions as rv (tenant_id, table_name, pk, version, deleted, clocks)
        values (tenant, tg_relid::regclass::text, key, next_seq, null,
                (select coalesce(jsonb_object_agg(c, clock), '{}') from jsonb_object_keys(changed) c))
        on conflict (tenant_id, table_name, pk) do update
           set version = excluded.version, deleted = null, clocks = rv.clocks || excluded.clocks;
    end if;
    perform pg_notify('synchub_log', tenant);
    return null;
end $$;

-- Register a table for sync: it needs a primary key and a tenant column.
create or replace function synchub.register_table(tbl regclass, tenant_column text, policy text default 'lww')
returns void language plpgsql as $$
declare
    pk_cols text[];
begin
    if not exists (select 1 from pg_attribute where attrelid = tbl and attname = tenant_column and attnum > 0 and not attisdropped) then
        raise exception 'table % has no column %', tbl, tenant_column;
    end if;
    select array_agg(a.attname::text order by array_position(i.indkey::int2[], a.attnum))
      into pk_cols
      from pg_index i join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
     where i.indrelid = tbl and i.indisprimary;
    if pk_cols is null then
        raise exception 'table % has no primary key', tbl;
    end if;
    pk_cols := array_remove(pk_cols, tenant_column);
    insert into synchub.synced_tables (table_name, tenant_column, policy)
    values (tbl::text, tenant_column, policy)
    on conflict (table_name) do update set tenant_column = excluded.tenant_column, policy = excluded.policy;
    execute format('drop trigger if exists synchub_capture on %s', tbl);
    execute format(
        'create trigger synchub_capture after insert or update or delete on %s for each row execute function synchub.capture_change(%s)',
        tbl, array_to_string(array(select quote_literal(c) from unnest(array[tenant_column] || pk_cols) c), ', '));
end $$;
