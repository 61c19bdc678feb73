-- Conflict review: how a conflict was resolved (the action, the seq of the change that wrote the
-- resolution, and the value written), and an index for listing a tenant's conflicts newest first
-- with keyset paging on the id.
alter table synchub.conflicts
    add column resolution     text check (resolution in ('keep', 'take_other', 'value')),
    add column resolution_seq bigint,
    add column resolved_value jsonb;

create index conflicts_by_tenant_id on synchub.conflicts (tenant_id, conflict_id);
