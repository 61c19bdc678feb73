-- Device status for the operations view: when the hub last saw each device, and the last
-- position (seq of the tenant's stream) it knows the device has.
--
-- A table of its own rather than columns of synchub.device_cursors: the group commit locks a
-- pushing device's cursor row (`for update`), and a status write must never wait for a merge or
-- make one wait; cursor rows keep meaning "this device's changes were taken". Rows are written
-- off the session's hot path (src/storage/device_status.rs) when a device session resumes from
-- a position and when it ends; a write that fails or is dropped under load costs only a staler
-- status. Nothing is indexed but the key, so updates stay HOT.

create table synchub.device_status (
    tenant_id     text not null,
    device_id     text not null,
    user_id       text,
    last_seen_at  timestamptz not null,
    -- The last seq the hub knows the device has; null until a session of it resumed.
    last_position bigint,
    primary key (tenant_id, device_id)
) with (fillfactor = 80);

-- Row-level security of 0005 and 0015, over the new table too.
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
    foreach t in array array['tenants', 'log_groups', 'log_device_ranges', 'device_cursors', 'device_status', 'row_versions', 'conflicts'] loop
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

-- Changes per hour read the tenant's groups of the last day, not the whole log. One entry per
-- group commit (not per change).
create index log_groups_by_commit_time on synchub.log_groups (tenant_id, committed_at);
