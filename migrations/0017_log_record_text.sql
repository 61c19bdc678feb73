-- A group's record as `text`, no longer `json`. The hub encodes the record itself
-- (src/storage/record.rs) and the capture trigger builds it with json_build_array, so
-- Postgres's check that it is JSON, run on every insert, guarded nothing the writers do not
-- already guarantee and cost about a third of the record's share of the bookkeeping statement.
-- Readers in SQL cast it (`changes::json`), as the functions and the view below do; the view
-- synchub.change_log and its columns are unchanged.
drop function synchub.change_log_after(text, bigint);
drop view synchub.change_log;

-- The table is rewritten, its records compressed again: with lz4 where this Postgres was built
-- with it (set in the same statement, or the rewrite would take the default), pglz otherwise.
do $$
begin
    execute 'alter table synchub.log_groups alter column changes type text, alter column changes set compression lz4';
exception when others then
    raise notice 'synchub: lz4 is not available; the log is compressed with pglz';
    alter table synchub.log_groups alter column changes type text;
end $$;

-- The changes of one record, one row each.
create or replace function synchub.log_changes(g synchub.log_groups)
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
      from json_array_elements(g.changes::json) with ordinality as e(c, i)
$$;

-- The log as it was: one row per change, with the old table's columns.
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
create or replace function synchub.log_entry(tenant text, at_seq bigint) returns json
language sql stable as $$
    select g.changes::json -> (at_seq - g.first_seq)::int
      from synchub.log_groups g
     where g.tenant_id = tenant and g.last_seq >= at_seq and g.first_seq <= at_seq
     order by g.last_seq
     limit 1
$$;

-- The view is new: the tenant role's grants again.
select synchub.secure_hub_tables();
