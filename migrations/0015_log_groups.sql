-- The lean log: one record per group commit instead of one row per change, and row versions'
-- clocks as json text.
--
-- A row of synchub.change_log cost Postgres about as much as the application row it described
-- several times over (a heap row and two index entries per change, jsonb keys, three json
-- images). Now a group commit writes one row of synchub.log_groups covering its gap-free seq
-- range, whose `changes` (json text, as the hub writes it; compressed by Postgres) hold every
-- change's key, op, images, origin, user, clock, change id and device seq. The hub reads and
-- slices records itself (src/storage/record.rs documents the format); SQL users read the view
-- synchub.change_log, which has the old table's columns.
--
-- Exactly-once stays with the device cursors (written in the same transaction). A re-sent
-- change is acked with the seq it was committed at: synchub.log_device_ranges says which record
-- holds a device's changes, one row per device and group. The log no longer keeps change ids
-- unique across devices: a change is identified by its device and device_seq.

create table synchub.log_groups (
    tenant_id    text not null,
    first_seq    bigint not null,
    last_seq     bigint not null,
    -- [[table, op, key, row, old, written, origin, user, change_id, device_seq, wall_ms, counter], ...]
    -- element i is the change at seq first_seq + i; op is i, u or d.
    changes      json not null,
    committed_at timestamptz not null default now(),
    primary key (tenant_id, last_seq),
    check (last_seq >= first_seq)
);

-- lz4 where this Postgres was built with it; pglz otherwise.
do $$
begin
    execute 'alter table synchub.log_groups alter column changes set compression lz4';
exception when others then
    raise notice 'synchub: lz4 is not available; the log is compressed with pglz';
end $$;

create table synchub.log_device_ranges (
    tenant_id        text not null,
    device_id        text not null,
    -- The device's logged changes in the group: device_seqs first..last (some between may have
    -- written nothing), in the record ending at group_last_seq.
    first_device_seq bigint not null,
    last_device_seq  bigint not null,
    group_last_seq   bigint not null,
    primary key (tenant_id, device_id, last_device_seq)
);

-- The old log, moved into records of at most 256 consecutive seqs.
with numbered as (
    select l.*, seq - row_number() over (partition by tenant_id order by seq) as run,
           (row_number() over (partition by tenant_id order by seq) - 1) / 256 as chunk
      from synchub.change_log l
), chunked as (
    select n.*, max(seq) over (partition by tenant_id, run, chunk) as chunk_last
      from numbered n
), groups as (
    insert into synchub.log_groups (tenant_id, first_seq, last_seq, changes, committed_at)
    select tenant_id, min(seq), max(seq),
           json_agg(json_build_array(table_name, left(op, 1), pk, new_row, old_values, written, origin_device, user_id,
                                     change_id, device_seq, coalesce(hlc_wall_ms, 0), coalesce(hlc_counter, 0)) order by seq),
           max(committed_at)
      from chunked
     group by tenant_id, run, chunk
)
insert into synchub.log_device_ranges (tenant_id, device_id, first_device_seq, last_device_seq, group_last_seq)
select tenant_id, origin_device, min(device_seq), max(device_seq), chunk_last
  from chunked
 where origin_device is not null and device_seq is not null
 group by tenant_id, chunk_last, origin_device
on conflict do nothing;

drop table synchub.change_log;

-- A record's json null as SQL null.
create function synchub.json_value(value json) returns json
language sql immutable parallel safe as $$
    select case when json_typeof(value) = 'null' then null else value end
$$;

-- The changes of one record, one row each.
create function synchub.log_changes(g synchub.log_groups)
returns table (seq bigint, table_name text, op text, pk jsonb, new_row json, old_values json, written json,
               origin_device text, user_id text, change_id uuid, device_seq bigint, hlc_wall_ms bigint, hlc_counter integer)
language sql immutable as $$
    select g.first_seq + e.i - 1,
           e.c ->> 0,
           case e.c ->> 1 when 'i' then 'insert' when 'u' then 'update' else 'delete' end,
           (e.c -> 2)::jsonb,
           synchub.json_value(e.c -> 3),
           synchub.json_value(e.c -> 4),
           synchub.json_value(e.c -> 5),
           e.c ->> 6,
           e.c ->> 7,
           (e.c ->> 8)::uuid,
           (e.c ->> 9)::bigint,
           (e.c ->> 10)::bigint,
           (e.c ->> 11)::integer
      from json_array_elements(g.changes) with ordinality as e(c, i)
$$;

-- The log as it was: one row per change, with the old table's columns. Reading it decodes every
-- record of the tenant; synchub.change_log_after(tenant, after) reads only the records it needs.
create view synchub.change_log with (security_invoker = true) as
select g.tenant_id, c.*, g.committed_at
  from synchub.log_groups g cross join lateral synchub.log_changes(g) c;

-- A tenant's changes after a seq, in seq order.
create function synchub.change_log_after(tenant text, after bigint)
returns setof synchub.change_log language sql stable as $$
    select g.tenant_id, c.*, g.committed_at
      from synchub.log_groups g cross join lateral synchub.log_changes(g) c
     where g.tenant_id = tenant and g.last_seq > after and c.seq > after
     order by c.seq
$$;

-- The change at a seq (its array in the record), or null when the log no longer has it.
create function synchub.log_entry(tenant text, at_seq bigint) returns json
language sql stable as $$
    select g.changes -> (at_seq - g.first_seq)::int
      from synchub.log_groups g
     where g.tenant_id = tenant and g.last_seq >= at_seq and g.first_seq <= at_seq
     order by g.last_seq
     limit 1
$$;

-- Row versions keep their clocks as `json`: the text the hub writes, only checked to be JSON.
-- As `jsonb`, Postgres parsed every version row's clocks into a tree and rebuilt it in binary
-- on every merge (the hub reads them back whole and never queries inside them). The format is
-- unchanged: `{column: [wall_ms, counter, device, version, user]}`, and `deleted` the clock of a
-- delete.
alter table synchub.row_versions
    alter column clocks drop default,
    alter column clocks type json using clocks::json,
    alter column clocks set default '{}'::json,
    alter column deleted type json using deleted::json;

-- Writes by other SQL clients: one record of one change each; clocks merged as jsonb, stored as
-- json.
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
           set version = excluded.version, deleted = null, clocks = (rv.clocks::jsonb || excluded.clocks::jsonb)::json;
    end if;
    perform pg_notify('synchub_log', tenant);
    return null;
end $$;

-- Trimming raises the floor to `upto` and drops the records ending at or below it. A record
-- that straddles the floor stays whole; readers never serve its seqs at or below the floor.
-- Returns how many changes the log no longer serves.
create or replace function synchub.trim_log(tenant text, upto bigint) returns bigint
language plpgsql as $$
declare
    old_floor bigint;
    removed bigint;
begin
    select log_floor into old_floor from synchub.tenants where tenant_id = tenant for update;
    update synchub.tenants set log_floor = greatest(log_floor, upto) where tenant_id = tenant;
    select coalesce(sum(greatest(0, least(last_seq, upto) - greatest(first_seq, old_floor + 1) + 1)), 0) into removed
      from synchub.log_groups where tenant_id = tenant and first_seq <= upto and last_seq > old_floor;
    -- The latest entries of rows about to go: their images stay with the rows' versions.
    update synchub.row_versions v set last_values = coalesce(l.new_row, l.old_values)::jsonb
      from (select c.* from synchub.log_groups g cross join lateral synchub.log_changes(g) c
             where g.tenant_id = tenant and g.last_seq <= upto) l
     where v.tenant_id = tenant and v.table_name = l.table_name and v.pk_text = l.pk::text and v.version = l.seq;
    delete from synchub.log_groups where tenant_id = tenant and last_seq <= upto;
    delete from synchub.log_device_ranges where tenant_id = tenant and group_last_seq <= upto;
    perform pg_notify('synchub_log', tenant);
    return removed;
end $$;

-- Row-level security of 0005 over the new tables.
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
    foreach t in array array['tenants', 'log_groups', 'log_device_ranges', 'device_cursors', 'row_versions', 'conflicts'] loop
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
    grant select on synchub.change_log to synchub_tenant;
end $$;

select synchub.secure_hub_tables();
