-- A row keeps the image of its latest change once that log entry is trimmed: for a tombstone the
-- values its row had (a reader served from current state, such as an RxDB client resyncing after
-- a trim, still gets a whole tombstone: RxDB validates a deleted document against its schema),
-- for a live row its values as written (a timestamp keeps the client's string form).
alter table synchub.row_versions add column last_values jsonb;

create or replace function synchub.trim_log(tenant text, upto bigint) returns bigint
language plpgsql as $$
declare
    removed bigint;
begin
    update synchub.tenants set log_floor = greatest(log_floor, upto) where tenant_id = tenant;
    -- The latest entries of rows about to go: their images stay with the rows' versions.
    update synchub.row_versions v set last_values = coalesce(l.new_row, l.old_values)::jsonb
      from synchub.change_log l
     where l.tenant_id = tenant and l.seq <= upto
       and v.tenant_id = tenant and v.table_name = l.table_name and v.pk_text = l.pk::text
       and v.version = l.seq;
    delete from synchub.change_log where tenant_id = tenant and seq <= upto;
    get diagnostics removed = row_count;
    perform pg_notify('synchub_log', tenant);
    return removed;
end $$;
