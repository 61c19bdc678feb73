-- The merge's writes join a batch's rows (a jsonb array) to the table by primary key.
-- jsonb_populate_recordset tells the planner 100 rows whatever the batch holds, and a table
-- younger than its statistics looks tiny: together they chose plans that read all of the
-- table's rows through its key index for every write, and such a plan stays cached on a
-- connection while the table grows. This wrapper says one row, so the planner probes the key
-- for each row of the batch; PL/pgSQL functions are never inlined, so the estimate holds.
create or replace function synchub.records_of(template anyelement, batch jsonb) returns setof anyelement
language plpgsql stable rows 1 as $$
begin
    return query select * from pg_catalog.jsonb_populate_recordset(template, batch);
end $$;
