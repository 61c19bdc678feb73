-- Device status for the operations view: when the hub last saw each device, and the last
-- position (seq of the tenant's stream) it knows the device has.
--
-- Both are written off the session's hot path (src/storage/device_status.rs) when a device
-- session resumes from a position and when it ends; a write that fails or is dropped under load
-- costs only a staler status. The columns are not indexed, so these updates stay HOT (the table
-- has fillfactor 80, migration 0009) and the group commit's cursor writes are unchanged.
-- Row-level security: the table's policies (migration 0015's secure_hub_tables) cover every
-- column; nothing to grant.

alter table synchub.device_cursors
    add column last_seen_at  timestamptz,
    add column last_position bigint;

-- Changes per hour read the tenant's groups of the last day, not the whole log. One entry per
-- group commit (not per change).
create index log_groups_by_commit_time on synchub.log_groups (tenant_id, committed_at);
