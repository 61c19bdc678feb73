-- Trimming notifies the hub as a log write does: the tenant actor reads the new floor at once,
-- answers hellos from below it with must_resync and stops serving trimmed entries from memory.
create or replace function synchub.trim_log(tenant text, upto bigint) returns bigint
language plpgsql as $$
declare
    removed bigint;
begin
    update synchub.tenants set log_floor = greatest(log_floor, upto) where tenant_id = tenant;
    delete from synchub.change_log where tenant_id = tenant and seq <= upto;
    get diagnostics removed = row_count;
    perform pg_notify('synchub_log', tenant);
    return removed;
end $$;
