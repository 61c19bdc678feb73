-- Row versions' clocks in a compact form. The hub writes one entry per distinct clock followed
-- by the fields it stamps, `[[wall_ms, counter, device, version, user, field, ...], ...]`
-- (src/storage/clocks.rs): a change writes several fields under one clock, so its device and
-- user are written once rather than once per field, which took a version row from about 460 to
-- about 330 bytes in the merge benchmark (its clocks from about 300 to 170), and WAL per change
-- from about 540 to 415 bytes. Rows written before, and rows the capture trigger writes, keep
-- the per-field form `{column: [wall_ms, counter, device, version, user]}`; the hub reads both,
-- so nothing is rewritten. SQL reads either form as the per-field one with
-- `synchub.field_clocks(clocks)`.
create function synchub.field_clocks(clocks text) returns jsonb
language sql immutable parallel safe set search_path = pg_catalog, pg_temp as $$
    select case
        when clocks is null then null
        when left(ltrim(clocks), 1) = '[' then coalesce(
            (select jsonb_object_agg(e ->> i, jsonb_build_array(e -> 0, e -> 1, e -> 2, e -> 3, e -> 4))
               from jsonb_array_elements(clocks::jsonb) e, generate_series(5, jsonb_array_length(e) - 1) i),
            '{}'::jsonb)
        else clocks::jsonb
    end
$$;

-- Writes by other SQL clients merge their clocks into the row's, in whichever form it has them,
-- and leave them in the per-field form.
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

    insert into synchub.log_groups (tenant_id, first_seq, last_seq, changes)
    values (tenant, next_seq, next_seq,
            json_build_array(json_build_array(wire_name, left(lower(tg_op), 1), key, new_j, old_vals, null, null, null, null, null, now_ms, 0)));

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
           set version = excluded.version, deleted = null, clocks = (synchub.field_clocks(rv.clocks) || excluded.clocks::jsonb)::text;
    end if;
    perform pg_notify('synchub_log', tenant);
    return null;
end $$;
