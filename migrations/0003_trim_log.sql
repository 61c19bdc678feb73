-- Trim a tenant's change log: drop entries at or below `upto` and raise the floor, so devices
-- whose position is older get must_resync (position_too_old) and take a snapshot.
create or replace function synchub.trim_log(tenant text, upto bigint) returns bigint
language plpgsql as $$
declare
    removed bigint;
begin
    update synchub.tenants set log_floor = greatest(log_floor, upto) where tenant_id = tenant;
    delete from synchub.change_log where tenant_id = tenant and seq <= upto;
    get diagnostics removed = row_count;
    return removed;
end $$;
