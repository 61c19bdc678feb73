-- A tenant's open conflicts, counted as they change. The merge used to count them after each
-- group that logged or resolved one, and that count read every open conflict of the tenant:
-- 1.4 ms at about a thousand, and more for as long as conflicts wait for review.
alter table synchub.tenants add column open_conflicts bigint not null default 0;

create or replace function synchub.count_open_conflicts() returns trigger
language plpgsql as $$
begin
    if tg_op <> 'INSERT' then
        if old.review_status = 'open' then
            update synchub.tenants set open_conflicts = open_conflicts - 1 where tenant_id = old.tenant_id;
        end if;
    end if;
    if tg_op <> 'DELETE' then
        if new.review_status = 'open' then
            update synchub.tenants set open_conflicts = open_conflicts + 1 where tenant_id = new.tenant_id;
        end if;
    end if;
    return null;
end $$;

-- Row triggers with conditions: nothing runs for the merges that log no conflict.
create trigger synchub_open_conflicts_insert after insert on synchub.conflicts
    for each row when (new.review_status = 'open') execute function synchub.count_open_conflicts();
create trigger synchub_open_conflicts_update after update of review_status, tenant_id on synchub.conflicts
    for each row when (old.review_status is distinct from new.review_status or old.tenant_id is distinct from new.tenant_id)
    execute function synchub.count_open_conflicts();
create trigger synchub_open_conflicts_delete after delete on synchub.conflicts
    for each row when (old.review_status = 'open') execute function synchub.count_open_conflicts();

update synchub.tenants t set open_conflicts = c.open
  from (select tenant_id, count(*) as open from synchub.conflicts where review_status = 'open' group by tenant_id) c
 where c.tenant_id = t.tenant_id;
