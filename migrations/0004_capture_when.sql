-- The capture trigger fires only for writes by other SQL clients. Its WHEN clause skips the
-- hub's own transactions before the trigger function is even called, so the hub's writes
-- pay no per-row PL/pgSQL cost (the function's own check stays as a second guard).

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
        tbl, array_to_string(array(select quote_literal(c) from unnest(array[tenant_column] || pk_cols) c), ', '));
end $$;

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
end $$;

-- Tables registered before this migration get the new trigger.
select synchub.create_capture_trigger(table_name::regclass, tenant_column)
  from synchub.synced_tables
 where to_regclass(table_name) is not null;
