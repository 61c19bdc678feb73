-- synchub's own state: tenants (head seq, epoch), the change log, device cursors,
-- per-row versions and field clocks, and the conflict log. Application tables stay where
-- they are; this schema only describes and records them.
create schema if not exists synchub;

create table synchub.tenants (
    tenant_id   text primary key,
    -- Opaque; a new epoch tells devices that positions from before it are void.
    epoch       text not null default gen_random_uuid()::text,
    head_seq    bigint not null default 0,
    -- Positions below this seq were trimmed from the log and must resync.
    log_floor   bigint not null default 0,
    created_at  timestamptz not null default now()
);

create table synchub.synced_tables (
    table_name     text primary key,       -- as regclass::text renders it
    tenant_column  text not null,
    policy         text not null default 'lww' check (policy in ('lww', 'client_wins')),
    registered_at  timestamptz not null default now()
);

-- One row per committed change, gap-free per tenant in commit order.
create table synchub.change_log (
    tenant_id     text not null,
    seq           bigint not null,
    table_name    text not null,
    op            text not null check (op in ('insert', 'update', 'delete')),
    pk            jsonb not null,
    new_row       jsonb,          -- full row after the change; null for delete
    old_values    jsonb,          -- old values of changed columns; whole old row for delete
    written       jsonb,          -- fields exactly as the device sent them
    origin_device text,           -- null for writes by other SQL clients
    user_id       text,
    change_id     uuid,
    device_seq    bigint,
    hlc_wall_ms   bigint,
    hlc_counter   integer,
    committed_at  timestamptz not null default now(),
    primary key (tenant_id, seq)
);
-- Backstop for exactly-once: a change id is applied at most once per tenant.
create unique index change_log_change_id on synchub.change_log (tenant_id, change_id) where change_id is not null;

create table synchub.device_cursors (
    tenant_id        text not null,
    device_id        text not null,
    last_device_seq  bigint not null default 0,
    user_id          text,
    updated_at       timestamptz not null default now(),
    primary key (tenant_id, device_id)
);

-- Versions and clocks per row; a deleted row stays here as a tombstone.
create table synchub.row_versions (
    tenant_id   text not null,
    table_name  text not null,
    pk          jsonb not null,
    version     bigint not null,
    deleted     jsonb,            -- clock of the delete, when a tombstone
    -- {column: [wall_ms, counter, device, version, user]}
    clocks      jsonb not null default '{}',
    primary key (tenant_id, table_name, pk)
);

create table synchub.conflicts (
    conflict_id     bigint generated always as identity primary key,
    tenant_id       text not null,
    table_name      text not null,
    pk              jsonb not null,
    field           text not null,
    base_version    bigint not null,
    server_version  bigint not null,
    server_value    jsonb,
    server_hlc      jsonb not null,
    server_device   text not null,
    server_user     text,
    incoming_value  jsonb,
    incoming_hlc    jsonb not null,
    incoming_device text not null,
    incoming_user   text,
    winner          text not null check (winner in ('server', 'incoming')),
    policy          text not null,
    change_id       uuid not null,
    batch_id        uuid not null,
    seq             bigint,       -- seq of the change when it wrote anything
    review_status   text not null default 'open' check (review_status in ('open', 'resolved', 'dismissed')),
    reviewed_by     text,
    reviewed_at     timestamptz,
    created_at      timestamptz not null default now()
);
create index conflicts_by_status on synchub.conflicts (tenant_id, review_status, created_at);
