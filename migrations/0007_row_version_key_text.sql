-- Row-level security and jsonb keys: `jsonb = jsonb` is not a leakproof operator, so under the
-- tenant role's policies Postgres may not use it in an index condition on row_versions and
-- filters every version row of the tenant's table instead (one lookup per pushed change grew
-- with the table). The key's text is compared with `text = text`, which is leakproof, through
-- an index of its own.
alter table synchub.row_versions add column pk_text text generated always as (pk::text) stored;
create unique index row_versions_by_key_text on synchub.row_versions (tenant_id, table_name, pk_text);
