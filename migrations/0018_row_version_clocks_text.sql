-- Row versions keep their clocks (and a tombstone's clock) as `text`, no longer `json`. The hub
-- writes them (src/storage/apply.rs) and reads them back whole; the capture trigger writes them
-- from jsonb. Postgres checked every version row's clocks to be JSON on every merge, as it did
-- the log's records before migration 0017. The format is unchanged:
-- `{column: [wall_ms, counter, device, version, user]}`; SQL reads it as `clocks::json`.
alter table synchub.row_versions
    alter column clocks drop default,
    alter column clocks type text,
    alter column clocks set default '{}',
    alter column deleted type text;
