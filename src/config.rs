//! Hub configuration: one struct, loaded from an optional TOML file and then overridden by
//! `SYNCHUB_<FIELD>` environment variables. Every limit lives here with its unit and default;
//! the README's configuration table mirrors this file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rules::RuleConfig;

/// A secret that never appears in logs or debug output.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MergePolicy {
    /// Per-field last-write-wins by hybrid logical clock.
    #[default]
    Lww,
    /// The change that arrives last wins.
    ClientWins,
}

impl MergePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            MergePolicy::Lww => "lww",
            MergePolicy::ClientWins => "client_wins",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "lww" => Some(MergePolicy::Lww),
            "client_wins" => Some(MergePolicy::ClientWins),
            _ => None,
        }
    }
}

/// A table to register for sync at start-up (tables may also be registered in SQL with
/// `select synchub.register_table('products', 'tenant_id')`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TableConfig {
    /// Table name, optionally schema-qualified.
    pub name: String,
    /// Column that holds the tenant id.
    pub tenant_column: String,
    #[serde(default)]
    pub policy: MergePolicy,
    /// A column that names a row for people (e.g. `products.name`): the console and the
    /// conflict API show it beside the key, and conflicts can be searched by it.
    #[serde(default)]
    pub label_column: Option<String>,
    /// How the console shows some columns' values (`[tables.formats] price_cents = "money_cents"`).
    #[serde(default)]
    pub formats: BTreeMap<String, ColumnFormat>,
}

/// How the console shows a column's values; the data itself is never changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnFormat {
    /// An integer count of cents, shown as money in `console_currency` (1234 → $12.34).
    MoneyCents,
    /// A timestamp, shown in the viewer's local time.
    LocalTime,
}

/// A server-side writer (a bridge, a back office job) that pushes changes and broadcasts over
/// HTTP with `Authorization: Bearer <token>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceToken {
    /// Shown in logs and stored as the user of its changes.
    pub name: String,
    /// The bearer token; compared in constant time, never printed.
    pub token: Secret,
    /// Tenants it may write to; empty: every tenant.
    #[serde(default)]
    pub tenants: Vec<String>,
}

/// What a `masterWrite` does with a document the client changed from a state the hub no
/// longer holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RxdbConflicts {
    /// RxDB's own rule: the write is refused and the current document returned, so the
    /// client's conflict handler decides; the hub also logs the conflict for review.
    #[default]
    Report,
    /// The hub merges the write by the table's policy (per-field LWW), logs what lost, and
    /// streams the merged document back: the client sees no conflict.
    ServerMerge,
}

/// Who may join private Supabase channels (`[[supabase_private_channels]]`): channels whose name
/// starts with `prefix` (empty: every name), for tokens whose role is one of `roles` (`"*"`:
/// any role). The first rule whose prefix matches decides.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivateChannelRule {
    #[serde(default)]
    pub prefix: String,
    pub roles: Vec<String>,
}

impl Config {
    /// Whether `role` may join the private channel `name`.
    pub fn may_join_private(&self, name: &str, role: &str) -> bool {
        self.supabase_private_channels
            .iter()
            .find(|rule| name.starts_with(&rule.prefix))
            .is_some_and(|rule| rule.roles.iter().any(|r| r == "*" || r == role))
    }
}

/// An RxDB collection served at `/rxdb/v1` (`[[rxdb_collections]]`). A collection without an
/// entry is the synced table of its name, with every column but the tenant column.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RxdbCollectionConfig {
    /// The collection's name in the client.
    pub name: String,
    /// The synced table it is; default: the collection's name.
    #[serde(default)]
    pub table: Option<String>,
    /// Columns the documents hold (the key among them); default: all but the tenant column.
    #[serde(default)]
    pub fields: Option<Vec<String>>,
    #[serde(default)]
    pub conflicts: RxdbConflicts,
    /// How a column holding null appears in documents.
    #[serde(default)]
    pub nulls: RxdbNulls,
}

/// How a null column appears in an RxDB document.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RxdbNulls {
    /// Left out, as an optional field the client never set (a schema of `type: 'string'`
    /// refuses null).
    #[default]
    Omit,
    /// Written as `null` (for schemas whose nullable fields say `type: ['string', 'null']`).
    Keep,
}

/// Shortest service token accepted, bytes: shorter ones are guessable.
pub const MIN_SERVICE_TOKEN_BYTES: usize = 16;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP / WebSocket server binds. Default `127.0.0.1:8080`.
    pub listen: String,
    /// Postgres URL; `synchub dev` fills it with its private cluster's. Env: `DATABASE_URL`
    /// is read as well.
    pub database_url: Secret,
    /// Connections in the hub's Postgres pool. Default 16.
    pub db_pool_size: u32,
    /// How long a wait for a pooled connection (a new one included) may take, ms. Default
    /// 10000; past it the request is answered `unavailable` (the group commits' own share of
    /// the pool keeps saturation from reaching it).
    pub db_acquire_timeout_ms: u64,
    /// How long one of a tenant actor's transactions (a group commit, a read of the tenant's
    /// head or log) may take, ms. Default 30000; past it the hub gives up on it (Postgres rolls
    /// it back, unless its commit was already under way: a re-sent batch then comes back
    /// `duplicate`) and answers the group's pushes `unavailable`.
    pub db_transaction_timeout_ms: u64,
    /// Postgres `statement_timeout` on the hub's connections (migrations excepted), ms.
    /// Default 30000; 0 turns it off.
    pub db_statement_timeout_ms: u64,
    /// Postgres `idle_in_transaction_session_timeout` on the hub's connections, ms: a
    /// transaction left idle this long (a hub that stopped answering) is ended by Postgres,
    /// freeing its locks. Default 60000; 0 turns it off.
    pub db_idle_in_transaction_timeout_ms: u64,
    /// How long `/readyz` waits for the database to answer, ms. Default 2000; past it, 503.
    pub readyz_timeout_ms: u64,
    /// HTTP worker threads (each also hosts tenant actors). Default: number of cores.
    pub workers: usize,

    // ---- authentication ----
    /// HS256 shared secret. Default empty (HS256 disabled unless set).
    pub jwt_hs256_secret: Secret,
    /// PEM file with an RS256 or ES256 public key.
    pub jwt_public_key_file: Option<PathBuf>,
    /// JWKS file (RS256/ES256 keys, chosen by `kid`).
    pub jwt_jwks_file: Option<PathBuf>,
    /// Required `aud`, if set.
    pub jwt_audience: Option<String>,
    /// Required `iss`, if set.
    pub jwt_issuer: Option<String>,
    /// Clock leeway for `exp`/`nbf`, seconds. Default 30.
    pub jwt_leeway_secs: u64,
    /// Claim path (dots for nesting, e.g. `app_metadata.tenant_id`) of the tenant. Default `tenant_id`.
    pub claim_tenant: String,
    /// Claim path of the user. Default `sub`.
    pub claim_user: String,
    /// Claim path of the role. Default `role`.
    pub claim_role: String,
    /// Claim path of the device id (optional in tokens). Default `device_id`.
    pub claim_device: String,

    // ---- protocol limits ----
    /// Largest WebSocket frame accepted, bytes. Default 2 MiB; larger closes with 1009.
    pub max_frame_bytes: usize,
    /// Most changes in one push. Default 1000; more is refused with `batch_too_large`.
    pub max_batch_changes: usize,
    /// Largest JSON size of one field value, bytes. Default 64 KiB; larger rejects the change.
    pub max_field_bytes: usize,
    /// Largest JSON size of a change's key (all its columns), bytes. Default 1024; larger
    /// rejects the change `invalid_key`. Keys are indexed, and Postgres refuses index entries
    /// past about 2.7 KB, which would fail the write for the whole group.
    pub max_key_bytes: usize,
    /// Longest tenant, user, role or device id (from a token, `hello` or a service push),
    /// bytes. Default 256; longer is refused (`invalid_token`, `forbidden`, `invalid_batch`).
    pub max_id_bytes: usize,
    /// Deltas per catch-up page. Default 1000.
    pub catch_up_page_changes: u32,
    /// Most rows per snapshot page. Default 1000.
    pub snapshot_page_rows: u32,
    /// Time allowed between socket open and `hello`, ms. Default 10000; then close 4000.
    pub hello_timeout_ms: u64,
    /// Time allowed from accepting a connection to its whole HTTP request head (the WebSocket
    /// upgrade included), ms. Default 10000; then 408. Under a reconnect storm a busy hub reads
    /// heads late, so this is not actix-web's 5 s.
    pub http_request_timeout_ms: u64,
    /// Interval of WebSocket pings, ms. Default 15000.
    pub heartbeat_interval_ms: u64,
    /// Silence (no frame, no pong) after which a session is closed with 4011, ms. Default 45000.
    pub heartbeat_timeout_ms: u64,
    /// Bad frames per minute tolerated on one socket before it is closed with 4009. Default 20.
    pub max_errors_per_minute: u32,
    /// Outbound bytes a session may have written that the client has not yet confirmed by a
    /// pong. Default 4 MiB; catch-up pauses at half of it, live delivery past it closes 4008.
    pub session_outbound_budget_bytes: usize,
    /// A ping is sent after every this many outbound bytes, to measure what was read. Default 64 KiB.
    pub ping_every_bytes: usize,
    /// Pushes one session may have awaiting their acks. Default 64; more are refused `busy`.
    pub session_pushes_in_flight: usize,
    /// Capacity of each session's mailbox, messages. Default 64; a full one makes the
    /// session catch up from the log.
    pub session_mailbox: usize,

    /// Subscriptions one socket may hold. Default 16; more are refused `too_many_subscriptions`.
    pub max_subscriptions_per_session: usize,

    // ---- rate limits (a rate of 0 is no limit; each refusal says how long to wait) ----
    /// Pushes (batches) a second one device may make on average, over its sockets and the HTTP
    /// push. Default 500; more are refused `rate_limited`.
    pub device_push_rate: u32,
    /// Pushes one device may make at once before its rate applies. Default 1000.
    pub device_push_burst: u32,
    /// Pushes (batches) a second all of one tenant's devices and writers may make. Default
    /// 20000; more are refused `rate_limited`.
    pub tenant_push_rate: u32,
    /// Pushes one tenant may make at once. Default 40000.
    pub tenant_push_burst: u32,
    /// Sessions (`hello`s) a second one tenant may open. Default 1000; more are refused
    /// `rate_limited` and closed with 4029.
    pub tenant_connect_rate: u32,
    /// Sessions one tenant may open at once (a reconnect storm). Default 10000.
    pub tenant_connect_burst: u32,
    /// `subscribe` frames a second one session may send. Default 20; more are refused
    /// `rate_limited`.
    pub session_subscribe_rate: u32,
    /// `subscribe` frames one session may send at once. Default 40.
    pub session_subscribe_burst: u32,
    /// HTTP API requests a second for one tenant (conflict review, server-side writers, token
    /// refresh). Default 200; more are answered 429 `rate_limited` with `Retry-After`.
    pub tenant_http_rate: u32,
    /// HTTP API requests one tenant may make at once. Default 400.
    pub tenant_http_burst: u32,
    /// Keys (devices, tenants) each rate limit tracks at most. Default 100000; past it, keys whose
    /// buckets are full again are forgotten, and a new key goes unmetered while none is.
    pub rate_limit_keys: usize,
    /// WebSocket sessions this process holds at most. Default 0: the open-file limit less 512
    /// (for Postgres connections, the listener and files). More are refused at the upgrade with
    /// 503 `busy` and `Retry-After`, before the process runs out of file descriptors.
    pub max_connections: usize,
    /// Most rows a subscription's snapshot may hold. Default 10000; a filter matching more is
    /// refused `snapshot_too_large`.
    pub subscription_snapshot_max_rows: usize,

    // ---- merge ----
    /// How far ahead of the hub's clock a change's HLC may be before it is clamped, ms. Default 300000.
    pub max_clock_skew_ms: u64,
    /// Batches queued at one tenant actor (beyond the transaction in flight). Default 256;
    /// more are refused with `busy`.
    pub tenant_queue_batches: usize,
    /// Most changes committed in one group transaction. Default 5000.
    pub group_commit_max_changes: usize,
    /// Capacity of each tenant actor's mailbox, messages. Default 1024.
    pub tenant_mailbox: usize,
    /// A tenant actor with no session and no work for this long stops, ms. Default 60000.
    pub tenant_idle_ms: u64,
    /// Log entries per tenant kept in memory by its tenant actor, from which sessions catch
    /// up without reading Postgres; 0 turns it off.
    pub catch_up_cache_deltas: usize,
    /// Rows per tenant that its tenant actor keeps as its last group commits left them, so that
    /// the next groups merge into them without reading them from Postgres; 0 turns it off.
    /// Default 4096.
    pub row_cache_rows: usize,
    /// Rows all tenants' row caches hold together; a tenant's cache takes what is left.
    /// Default 131072.
    pub row_cache_total_rows: usize,
    /// Numbered clock writers (a device and its user) the hub keeps, to write and read row
    /// versions' field clocks with numbers for names; past it the hub forgets them all and
    /// looks them up again. Default 1048576.
    pub clock_writer_cache_entries: usize,
    /// Graceful shutdown: how long in-flight work may take, ms. Default 10000.
    pub shutdown_timeout_ms: u64,

    // ---- recording ----
    /// Capture file to which device traffic is appended (JSON Lines, tokens left out).
    /// Default none: nothing is recorded.
    pub record_file: Option<PathBuf>,
    /// Tenants whose sessions are recorded. Default empty: every tenant.
    pub record_tenants: Vec<String>,
    /// Capture entries queued for the writer thread; when full, entries are dropped (counted in
    /// `synchub_capture_dropped_total`). Default 65536.
    pub record_queue_entries: usize,

    // ---- HTTP API ----
    /// Roles (the token's role claim) allowed to review conflicts (`/v1/conflicts*`, the
    /// `conflicts` channel). Default `["Manager"]`; other roles get 403 `forbidden`.
    pub manager_roles: Vec<String>,
    /// Server-side writers allowed to use `/v1/tenants/{tenant}/push` and `/broadcast`.
    /// Default none.
    pub service_tokens: Vec<ServiceToken>,
    /// Largest HTTP request body, bytes. Default 2 MiB; larger is refused 413.
    pub max_http_body_bytes: usize,
    /// Largest broadcast payload (as JSON), bytes. Default 64 KiB; larger is refused 413.
    pub max_broadcast_payload_bytes: usize,
    /// Conflicts per page of `GET /v1/conflicts` when `limit` is not given. Default 50.
    pub conflict_page_default: u32,
    /// Most conflicts per page of `GET /v1/conflicts`. Default 500; a larger `limit` is lowered to it.
    pub conflict_page_max: u32,
    /// Most conflicts in one `GET /v1/conflicts/export.csv`. Default 100,000; more matching is
    /// refused `invalid_filter`.
    pub conflict_export_max_rows: u32,
    /// Most conflicts one `POST /v1/conflicts/resolve` reviews. Default 500; more is refused
    /// `invalid_batch`.
    pub conflict_bulk_max: u32,

    /// Devices whose status (last seen, position) waits to be written, over the hub; notes of
    /// more devices are dropped. Default 65,536.
    pub device_status_writes: usize,
    /// How often the waiting device statuses are written, ms. Default 250.
    pub device_status_flush_ms: u64,
    /// How long a device status write waits for its row, ms. Default 1,000.
    pub device_status_lock_timeout_ms: u64,
    /// Most devices `GET /v1/operations` lists (by id; it says when there are more). Default 5,000.
    pub operations_max_devices: u32,
    /// The currency of `money_cents` columns in the console (ISO 4217 code). Default "USD".
    pub console_currency: String,

    /// Tables to register at start-up.
    pub tables: Vec<TableConfig>,

    // ---- RxDB replication (`/rxdb/v1`) ----
    /// `[[rxdb_collections]]`: collections mapped to tables other than their name's, with
    /// chosen fields, or merged by the hub (see [`RxdbCollectionConfig`]). Default none.
    pub rxdb_collections: Vec<RxdbCollectionConfig>,
    /// How long an RxDB socket opened without `?token=` may wait for its `auth` message, ms.
    /// Default 10000; then it is closed 4001.
    pub rxdb_auth_timeout_ms: u64,
    /// Requests an RxDB socket holds until its `auth` message arrives (the client sends what it
    /// queued offline first). Default 256; one more closes the socket 4001.
    pub rxdb_pending_requests: usize,
    /// Most documents in one `masterChangesSince` reply; a larger batch size is lowered to it.
    /// Default 1000.
    pub rxdb_max_pull_documents: u32,
    /// Live frames an RxDB socket holds while one of its pulls is read; past it the collection
    /// is sent `RESYNC` once the pull is answered. Default 256.
    pub rxdb_held_frames: usize,

    // ---- Supabase Realtime (`/realtime/v1`) ----
    /// Channels one Supabase socket may join at once. Default 100; one more is refused
    /// `ChannelRateLimitReached`.
    pub supabase_max_channels_per_socket: usize,
    /// Joins a Supabase socket may make per second (burst the same). Default 100; more are
    /// refused `ClientJoinRateLimitReached`.
    pub supabase_joins_per_second: u32,
    /// Broadcasts and presence updates a Supabase socket may send per second (burst the same).
    /// Default 100; more are refused (`ack`: `ClientMessageRateLimitReached`) or dropped.
    pub supabase_messages_per_second: u32,
    /// Requests a Supabase socket may have in flight (joins whose snapshot or catch-up is
    /// read, pushes awaiting the tenant). Default 32; more are refused.
    pub supabase_pending_requests: usize,
    /// Live frames a Supabase socket holds while it reads older changes (a join with
    /// `since_seq` or `snapshot`, or a gap); past it they are dropped and read from the log.
    /// Default 256.
    pub supabase_held_frames: usize,
    /// The public channel whose presence also lists the tenant's hub sessions (native devices,
    /// dashboards, RxDB and Supabase sockets). Default `"sessions"`; empty turns it off.
    pub supabase_sessions_channel: Option<String>,
    /// `[[supabase_private_channels]]`: who may join private channels (`config.private`).
    /// Default none: private joins are refused.
    pub supabase_private_channels: Vec<PrivateChannelRule>,

    // ---- cluster mode ----
    /// NATS server(s) linking several hubs over one Postgres (`nats://host:4222`, several
    /// comma-separated); `synchub serve --nats` sets it too. Default none: a single node with
    /// the in-process bus.
    pub nats_url: Option<String>,
    /// This node's name in the cluster (presence, metrics, logs). Default: the host name and
    /// a random suffix, new at each start.
    pub node_id: Option<String>,
    /// First token of every NATS subject the hub uses, so that several clusters can share one
    /// NATS. Default `"synchub"`.
    pub cluster_subject_prefix: String,
    /// Messages waiting to be handed to NATS, per node, messages. Default 8192; past it a
    /// message is dropped (counted), and other nodes read what it carried from Postgres.
    pub cluster_publish_queue: usize,
    /// How often a node tells the others it is alive, ms. Default 1000.
    pub cluster_heartbeat_ms: u64,
    /// A node silent for this long is taken for dead: its sessions leave every presence list,
    /// ms. Default 5000.
    pub cluster_node_timeout_ms: u64,
    /// How long a node waits for a missing seq to arrive over NATS before it reads it from
    /// Postgres, ms. Default 20.
    pub cluster_gap_wait_ms: u64,
    /// While NATS is unreachable, how often each node reads its tenants' heads from Postgres
    /// to find changes committed by other nodes, ms. Default 250.
    pub cluster_fallback_poll_ms: u64,

    // ---- roles and rules ----
    /// `[[rules]]`: per table and role, read/write access, a row restriction to a claim, and
    /// hidden columns (see [`crate::rules`]). Default none: every role reads and writes
    /// everything of its tenant.
    pub rules: Vec<RuleConfig>,
    /// Run every tenant-scoped transaction as the Postgres role `synchub_tenant`, whose
    /// row-level security policies admit only the tenant's rows. Default true; turn it off
    /// where the hub's login may not create or use that role.
    pub row_level_security: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".into(),
            database_url: Secret::default(),
            db_pool_size: 16,
            db_acquire_timeout_ms: 10_000,
            db_transaction_timeout_ms: 30_000,
            db_statement_timeout_ms: 30_000,
            db_idle_in_transaction_timeout_ms: 60_000,
            readyz_timeout_ms: 2_000,
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            jwt_hs256_secret: Secret::default(),
            jwt_public_key_file: None,
            jwt_jwks_file: None,
            jwt_audience: None,
            jwt_issuer: None,
            jwt_leeway_secs: 30,
            claim_tenant: "tenant_id".into(),
            claim_user: "sub".into(),
            claim_role: "role".into(),
            claim_device: "device_id".into(),
            max_frame_bytes: 2 * 1024 * 1024,
            max_batch_changes: 1000,
            max_field_bytes: 64 * 1024,
            max_key_bytes: 1024,
            max_id_bytes: 256,
            catch_up_page_changes: 1000,
            snapshot_page_rows: 1000,
            hello_timeout_ms: 10_000,
            http_request_timeout_ms: 10_000,
            heartbeat_interval_ms: 15_000,
            heartbeat_timeout_ms: 45_000,
            max_errors_per_minute: 20,
            session_outbound_budget_bytes: 4 * 1024 * 1024,
            ping_every_bytes: 64 * 1024,
            session_mailbox: 64,
            session_pushes_in_flight: 64,
            max_subscriptions_per_session: 16,
            device_push_rate: 500,
            device_push_burst: 1000,
            tenant_push_rate: 20_000,
            tenant_push_burst: 40_000,
            tenant_connect_rate: 1000,
            tenant_connect_burst: 10_000,
            session_subscribe_rate: 20,
            session_subscribe_burst: 40,
            tenant_http_rate: 200,
            tenant_http_burst: 400,
            rate_limit_keys: 100_000,
            max_connections: 0,
            subscription_snapshot_max_rows: 10_000,
            max_clock_skew_ms: 300_000,
            tenant_queue_batches: 256,
            group_commit_max_changes: 5000,
            tenant_mailbox: 1024,
            tenant_idle_ms: 60_000,
            catch_up_cache_deltas: 1000,
            row_cache_rows: 4096,
            row_cache_total_rows: 131_072,
            clock_writer_cache_entries: 1_048_576,
            shutdown_timeout_ms: 10_000,
            record_file: None,
            record_tenants: Vec::new(),
            record_queue_entries: 65_536,
            manager_roles: vec!["Manager".into()],
            service_tokens: Vec::new(),
            max_http_body_bytes: 2 * 1024 * 1024,
            max_broadcast_payload_bytes: 64 * 1024,
            conflict_page_default: 50,
            conflict_page_max: 500,
            conflict_export_max_rows: 100_000,
            console_currency: "USD".into(),
            device_status_writes: 65_536,
            device_status_flush_ms: 250,
            device_status_lock_timeout_ms: 1_000,
            operations_max_devices: 5_000,
            conflict_bulk_max: 500,
            tables: Vec::new(),
            rxdb_collections: Vec::new(),
            rxdb_auth_timeout_ms: 10_000,
            rxdb_pending_requests: 256,
            rxdb_max_pull_documents: 1000,
            rxdb_held_frames: 256,
            supabase_max_channels_per_socket: 100,
            supabase_joins_per_second: 100,
            supabase_messages_per_second: 100,
            supabase_pending_requests: 32,
            supabase_held_frames: 256,
            supabase_sessions_channel: Some("sessions".into()),
            supabase_private_channels: Vec::new(),
            nats_url: None,
            node_id: None,
            cluster_subject_prefix: "synchub".into(),
            cluster_publish_queue: 8192,
            cluster_heartbeat_ms: 1000,
            cluster_node_timeout_ms: 5000,
            cluster_gap_wait_ms: 20,
            cluster_fallback_poll_ms: 250,
            rules: Vec::new(),
            row_level_security: true,
        }
    }
}

impl Config {
    /// Load from `file` (if any), then apply `SYNCHUB_*` environment overrides and `DATABASE_URL`.
    pub fn load(file: Option<&Path>) -> Result<Config> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
                text.parse::<toml::Table>().map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
            }
            None => toml::Table::new(),
        };
        apply_env_overrides(&mut table, std::env::vars())?;
        let mut config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| Error::Config(e.to_string()))?;
        if config.database_url.0.is_empty() {
            if let Ok(url) = std::env::var("DATABASE_URL") {
                config.database_url = Secret(url);
            }
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("max_frame_bytes", self.max_frame_bytes as u64),
            ("max_batch_changes", self.max_batch_changes as u64),
            ("max_key_bytes", self.max_key_bytes as u64),
            ("max_id_bytes", self.max_id_bytes as u64),
            ("catch_up_page_changes", self.catch_up_page_changes as u64),
            ("snapshot_page_rows", self.snapshot_page_rows as u64),
            ("session_outbound_budget_bytes", self.session_outbound_budget_bytes as u64),
            ("ping_every_bytes", self.ping_every_bytes as u64),
            ("http_request_timeout_ms", self.http_request_timeout_ms),
            ("session_mailbox", self.session_mailbox as u64),
            ("session_pushes_in_flight", self.session_pushes_in_flight as u64),
            ("max_subscriptions_per_session", self.max_subscriptions_per_session as u64),
            ("rate_limit_keys", self.rate_limit_keys as u64),
            ("subscription_snapshot_max_rows", self.subscription_snapshot_max_rows as u64),
            ("tenant_queue_batches", self.tenant_queue_batches as u64),
            ("group_commit_max_changes", self.group_commit_max_changes as u64),
            ("tenant_mailbox", self.tenant_mailbox as u64),
            ("db_pool_size", self.db_pool_size as u64),
            ("db_acquire_timeout_ms", self.db_acquire_timeout_ms),
            ("db_transaction_timeout_ms", self.db_transaction_timeout_ms),
            ("readyz_timeout_ms", self.readyz_timeout_ms),
            ("workers", self.workers as u64),
            ("record_queue_entries", self.record_queue_entries as u64),
            ("max_http_body_bytes", self.max_http_body_bytes as u64),
            ("max_broadcast_payload_bytes", self.max_broadcast_payload_bytes as u64),
            ("conflict_page_default", self.conflict_page_default as u64),
            ("conflict_page_max", self.conflict_page_max as u64),
            ("conflict_export_max_rows", self.conflict_export_max_rows as u64),
            ("device_status_writes", self.device_status_writes as u64),
            ("device_status_flush_ms", self.device_status_flush_ms),
            ("device_status_lock_timeout_ms", self.device_status_lock_timeout_ms),
            ("operations_max_devices", u64::from(self.operations_max_devices)),
            ("conflict_bulk_max", self.conflict_bulk_max as u64),
            ("rxdb_auth_timeout_ms", self.rxdb_auth_timeout_ms),
            ("rxdb_pending_requests", self.rxdb_pending_requests as u64),
            ("rxdb_max_pull_documents", self.rxdb_max_pull_documents as u64),
            ("rxdb_held_frames", self.rxdb_held_frames as u64),
            ("supabase_max_channels_per_socket", self.supabase_max_channels_per_socket as u64),
            ("supabase_joins_per_second", self.supabase_joins_per_second as u64),
            ("supabase_messages_per_second", self.supabase_messages_per_second as u64),
            ("supabase_pending_requests", self.supabase_pending_requests as u64),
            ("supabase_held_frames", self.supabase_held_frames as u64),
            ("cluster_publish_queue", self.cluster_publish_queue as u64),
            ("cluster_heartbeat_ms", self.cluster_heartbeat_ms),
            ("cluster_node_timeout_ms", self.cluster_node_timeout_ms),
            ("cluster_fallback_poll_ms", self.cluster_fallback_poll_ms),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::Config(format!("{name} must be greater than 0")));
            }
        }
        if self.cluster_node_timeout_ms < 2 * self.cluster_heartbeat_ms {
            return Err(Error::Config("cluster_node_timeout_ms must be at least twice cluster_heartbeat_ms".into()));
        }
        let subject_token = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !subject_token(&self.cluster_subject_prefix) {
            return Err(Error::Config(format!("cluster_subject_prefix `{}` must be letters, digits, `-` or `_`", self.cluster_subject_prefix)));
        }
        if let Some(node) = &self.node_id {
            if !subject_token(node) || node.len() > 64 {
                return Err(Error::Config(format!("node_id `{node}` must be 1 to 64 letters, digits, `-` or `_`")));
            }
        }
        if self.group_commit_max_changes < self.max_batch_changes {
            return Err(Error::Config("group_commit_max_changes must be at least max_batch_changes".into()));
        }
        if self.console_currency.len() != 3 || !self.console_currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(Error::Config(format!("console_currency `{}` must be an ISO 4217 code such as USD or EUR", self.console_currency)));
        }
        for table in &self.tables {
            let named = table.label_column.iter().chain(table.formats.keys());
            if let Some(bad) = named.into_iter().find(|c| c.is_empty() || c.contains('\0')) {
                return Err(Error::Config(format!("tables `{}`: `{bad}` is not a column name", table.name)));
            }
        }
        if self.conflict_page_default > self.conflict_page_max {
            return Err(Error::Config("conflict_page_default must be at most conflict_page_max".into()));
        }
        for (i, rule) in self.supabase_private_channels.iter().enumerate() {
            if rule.roles.is_empty() || rule.roles.iter().any(|r| r.is_empty()) {
                return Err(Error::Config(format!("supabase_private_channels[{i}] needs roles (names, or \"*\" for any)")));
            }
        }
        let mut collections = std::collections::HashSet::new();
        for collection in &self.rxdb_collections {
            if !collections.insert(collection.name.as_str()) {
                return Err(Error::Config(format!("rxdb_collections names `{}` twice", collection.name)));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, service) in self.service_tokens.iter().enumerate() {
            if service.name.is_empty() || !names.insert(service.name.as_str()) {
                return Err(Error::Config(format!("service_tokens[{i}]: name must be non-empty and unique")));
            }
            // The name becomes the user id `service:<name>` of the writer's changes.
            if let Some(problem) = crate::ids::id_problem(&format!("service:{}", service.name), self.max_id_bytes) {
                return Err(Error::Config(format!("service_tokens[{i}]: the name as a user id {problem}")));
            }
            if service.token.0.len() < MIN_SERVICE_TOKEN_BYTES {
                return Err(Error::Config(format!("service token `{}` must be at least {MIN_SERVICE_TOKEN_BYTES} bytes", service.name)));
            }
            if self.service_tokens[..i].iter().any(|other| other.token.0 == service.token.0) {
                return Err(Error::Config(format!("service token `{}` is the same as another's", service.name)));
            }
        }
        crate::rules::Rules::from_config(&self.rules)?;
        Ok(())
    }

    pub fn hello_timeout(&self) -> Duration {
        Duration::from_millis(self.hello_timeout_ms)
    }
    pub fn http_request_timeout(&self) -> Duration {
        Duration::from_millis(self.http_request_timeout_ms)
    }
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    /// The role may review conflicts (it is one of `manager_roles`).
    pub fn is_manager(&self, role: &str) -> bool {
        self.manager_roles.iter().any(|r| r == role)
    }

    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_timeout_ms)
    }
    pub fn tenant_idle(&self) -> Duration {
        Duration::from_millis(self.tenant_idle_ms)
    }
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
    pub fn db_acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.db_acquire_timeout_ms)
    }
    pub fn db_transaction_timeout(&self) -> Duration {
        Duration::from_millis(self.db_transaction_timeout_ms)
    }
    pub fn readyz_timeout(&self) -> Duration {
        Duration::from_millis(self.readyz_timeout_ms)
    }

    /// Cluster mode is on: a NATS URL is set.
    pub fn clustered(&self) -> bool {
        self.nats_url.as_deref().is_some_and(|u| !u.trim().is_empty())
    }
}

/// `SYNCHUB_MAX_FRAME_BYTES=1048576` sets `max_frame_bytes`; the value is read as a TOML value
/// (number, bool, array…) and, failing that, as a plain string.
fn apply_env_overrides(table: &mut toml::Table, vars: impl Iterator<Item = (String, String)>) -> Result<()> {
    for (name, raw) in vars {
        let Some(field) = name.strip_prefix("SYNCHUB_") else { continue };
        let field = field.to_ascii_lowercase();
        if field == "config" || field.starts_with("pg_") || field.starts_with("test_") {
            continue; // read elsewhere, not config fields
        }
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(raw));
        table.insert(field, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_typed_values_and_strings() {
        let mut table = "listen = \"0.0.0.0:1\"\nmax_batch_changes = 5".parse::<toml::Table>().unwrap();
        let vars = vec![
            ("SYNCHUB_MAX_BATCH_CHANGES".to_string(), "7".to_string()),
            ("SYNCHUB_CLAIM_TENANT".to_string(), "app_metadata.tenant_id".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        apply_env_overrides(&mut table, vars.into_iter()).unwrap();
        let config: Config = toml::Value::Table(table).try_into().unwrap();
        assert_eq!(config.max_batch_changes, 7);
        assert_eq!(config.claim_tenant, "app_metadata.tenant_id");
        assert_eq!(config.listen, "0.0.0.0:1");
    }

    #[test]
    fn unknown_keys_and_zero_limits_are_refused() {
        let table = "max_batch_chnges = 5".parse::<toml::Table>().unwrap();
        assert!(toml::Value::Table(table).try_into::<Config>().is_err());
        let config = Config { max_batch_changes: 0, ..Config::default() };
        assert!(config.validate().is_err());
    }

    #[test]
    fn rules_are_read_and_validated() {
        let text = "[[rules]]\ntable = \"work_orders\"\nrole = \"Employee\"\naccess = \"read_write\"\nrow_column = \"employee_id\"\n\
                    [[rules]]\ntable = \"*\"\nrole = \"Manager\"\naccess = \"read_write\"\n";
        let config: Config = toml::from_str(text).unwrap();
        assert_eq!(config.rules.len(), 2);
        assert!(config.row_level_security);
        assert!(config.validate().is_ok());
        let twice = Config { rules: vec![config.rules[0].clone(), config.rules[0].clone()], ..Config::default() };
        assert!(twice.validate().is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let service = ServiceToken { name: "bridge".into(), token: Secret("correct-horse-battery".into()), tenants: vec![] };
        let config = Config { jwt_hs256_secret: Secret("hunter2".into()), service_tokens: vec![service], ..Config::default() };
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2"));
        assert!(!printed.contains("correct-horse-battery"));
    }

    #[test]
    fn service_tokens_from_toml_and_their_checks() {
        let text = "[[service_tokens]]\nname = \"chat-bridge\"\ntoken = \"0123456789abcdef\"\ntenants = [\"store-1\"]\n";
        let config: Config = toml::Value::Table(text.parse::<toml::Table>().unwrap()).try_into().unwrap();
        assert_eq!(config.service_tokens[0].tenants, vec!["store-1".to_string()]);
        assert_eq!(config.manager_roles, vec!["Manager".to_string()]);
        config.validate().unwrap();
        let short = ServiceToken { name: "x".into(), token: Secret("short".into()), tenants: vec![] };
        assert!(Config { service_tokens: vec![short], ..Config::default() }.validate().is_err());
        let twice = config.service_tokens[0].clone();
        assert!(Config { service_tokens: vec![twice.clone(), twice], ..Config::default() }.validate().is_err());
        let nul = ServiceToken { name: "bridge\u{0}".into(), ..config.service_tokens[0].clone() };
        assert!(Config { service_tokens: vec![nul], ..Config::default() }.validate().is_err());
    }
}
