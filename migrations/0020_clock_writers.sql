-- Numbers for the writers that row versions' field clocks name. A clock of the compact form
-- (0019) named its device and user, `[wall_ms, counter, device, version, user, field, …]`,
-- about 37 of a version row's 170 bytes of clocks in the merge benchmark, written to the WAL
-- again by every update of the row. The hub now writes a numbered writer's clock as
-- `[wall_ms, counter, writer_id, version, field, …]` (a number where the device's name was;
-- src/storage/clocks.rs), with the number from this table. A number is given once, committed
-- before any row names it, and never changes meaning, so every hub keeps the numbers it has
-- seen (src/storage/clock_writers.rs). A group numbers its pushing devices first; writers a
-- hub has no number for (SQL clients, devices that have not pushed to it) keep the named
-- form, and rows written before keep theirs: nothing is rewritten, and
-- `synchub.field_clocks(clocks)` reads every form as the per-field one.

create table synchub.clock_writers (
    writer_id  integer generated always as identity primary key,
    tenant_id  text not null,
    device     text not null,
    user_id    text not null,
    unique (tenant_id, device, user_id)
);

create or replace function synchub.field_clocks(clocks text) returns jsonb
language sql stable parallel safe set search_path = pg_catalog, pg_temp as $$
    select case
        when clocks is null then null
        when left(ltrim(clocks), 1) = '[' then coalesce(
            (select jsonb_object_agg(
                        x.e ->> i,
                        case when x.numbered
                             then jsonb_build_array(x.e -> 0, x.e -> 1, to_jsonb(w.device), x.e -> 3, to_jsonb(w.user_id))
                             else jsonb_build_array(x.e -> 0, x.e -> 1, x.e -> 2, x.e -> 3, x.e -> 4) end)
               from (select e, jsonb_typeof(e -> 2) = 'number' as numbered from jsonb_array_elements(clocks::jsonb) e) x
               left join synchub.clock_writers w
                      on w.writer_id = case when x.numbered then (x.e ->> 2)::integer end
              cross join generate_series(case when x.numbered then 4 else 5 end, jsonb_array_length(x.e) - 1) i),
            '{}'::jsonb)
        else clocks::jsonb
    end
$$;

-- Row-level security of 0005, 0015 and 0016 over every table of the hub's schema that has a
-- tenant_id column (the new one too), found rather than listed, so that a table added later is
-- not left open by a migration that forgets to redefine this function.
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
    for t in
        select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = 'synchub' and c.relkind = 'r'
           and exists (select from pg_attribute a where a.attrelid = c.oid and a.attname = 'tenant_id' and not a.attisdropped)
         order by c.relname
    loop
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
