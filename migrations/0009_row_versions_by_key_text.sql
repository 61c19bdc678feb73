-- Row versions are keyed by the key's text alone. The jsonb key's own unique index was a second
-- index written on every version write (jsonb comparisons are slow), and the key's text
-- (0007) is unique just the same: jsonb prints canonically. Frequently updated hub tables leave
-- room in their pages, so updates can stay on the page (HOT) and skip index writes.
alter table synchub.row_versions alter column pk_text set not null;
alter table synchub.row_versions drop constraint row_versions_pkey;
alter table synchub.row_versions add constraint row_versions_pkey primary key using index row_versions_by_key_text;
alter table synchub.row_versions set (fillfactor = 80);
alter table synchub.device_cursors set (fillfactor = 80);
alter table synchub.tenants set (fillfactor = 50);

-- The capture trigger of 0005, with the conflict target of the new key.
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
        on conflict (tenant_id, table_name, pk_text) do update set version = excluded.version, deleted = excluded.deleted;
    else
        insert into synchub.row_versions as rv (tenant_id, table_name, pk, version, deleted, clocks)
        values (tenant, wire_name, key, next_seq, null,
                (select coalesce(jsonb_object_agg(c, clock), '{}') from jsonb_object_keys(changed) c))
        on conflict (tenant_id, table_name, pk_text) do update
           set version = excluded.version, deleted = null, clocks = rv.clocks || excluded.clocks;
    end if;
    perform pg_notify('synchub_log', tenant);
    return null;
end $$;
