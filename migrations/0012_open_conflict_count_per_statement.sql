-- The open-conflict count of 0011, kept once per statement instead of once per row. A group
-- that logs n conflicts updated its tenant's row n times in one transaction, and each update
-- walked the chain of versions the earlier ones left (the same row, one transaction: none of
-- them can be pruned yet). Statement triggers read the rows a statement changed from its
-- transition tables and move each tenant's count once. They run for every statement on the
-- table, with or without rows (transition tables rule out a column list or a condition): for
-- a merge that logs no conflict, an update that matches no tenant.
drop trigger synchub_open_conflicts_insert on synchub.conflicts;
drop trigger synchub_open_conflicts_update on synchub.conflicts;
drop trigger synchub_open_conflicts_delete on synchub.conflicts;
drop function synchub.count_open_conflicts();

create function synchub.count_open_conflicts() returns trigger
language plpgsql as $$
begin
    -- Per tenant: open rows the statement left, less open rows it found.
    if tg_op = 'INSERT' then
        update synchub.tenants t set open_conflicts = t.open_conflicts + d.n
          from (select tenant_id, count(*) as n from new_rows where review_status = 'open' group by tenant_id) d
         where t.tenant_id = d.tenant_id;
    elsif tg_op = 'DELETE' then
        update synchub.tenants t set open_conflicts = t.open_conflicts - d.n
          from (select tenant_id, count(*) as n from old_rows where review_status = 'open' group by tenant_id) d
         where t.tenant_id = d.tenant_id;
    else
        update synchub.tenants t set open_conflicts = t.open_conflicts + d.n
          from (select tenant_id, sum(n) as n
                  from (select tenant_id, 1 as n from new_rows where review_status = 'open'
                        union all
                        select tenant_id, -1 from old_rows where review_status = 'open') r
                 group by tenant_id) d
         where t.tenant_id = d.tenant_id and d.n <> 0;
    end if;
    return null;
end $$;

create trigger synchub_open_conflicts_insert after insert on synchub.conflicts
    referencing new table as new_rows for each statement execute function synchub.count_open_conflicts();
create trigger synchub_open_conflicts_update after update on synchub.conflicts
    referencing old table as old_rows new table as new_rows for each statement execute function synchub.count_open_conflicts();
create trigger synchub_open_conflicts_delete after delete on synchub.conflicts
    referencing old table as old_rows for each statement execute function synchub.count_open_conflicts();
