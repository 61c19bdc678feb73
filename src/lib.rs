//! synchub: a realtime sync hub. Devices keep one WebSocket, push offline batches that are
//! merged into the application's own Postgres tables with a conflict log, and receive every
//! other change of their tenant in one gap-free order.
//!
//! # Layout
//! - [`config`]: every setting and limit, from a TOML file and `SYNCHUB_*` variables.
//! - [`cluster`]: cluster mode: the NATS link between hubs over one Postgres, node ids, heartbeats.
//! - [`auth`]: JWT → [`auth::Identity`] (tenant, user, role, device, claims).
//! - [`rules`]: roles and rules: which tables and rows a role reads and writes, hidden columns.
//! - [`limits`]: rate limits per device, session and tenant, and the cap on sessions.
//! - [`transport`]: the WebSocket endpoint: frames, codec, byte budget, heartbeats.
//! - [`actors`]: one `DeviceSession` per socket, one `TenantActor` per tenant (serial merges,
//!   group commit, fan-out after commit), and the registry that finds tenant actors.
//! - [`sync::merge`]: the pure merge decision (per-field LWW on HLCs, client-wins, tombstones).
//! - [`storage`]: Postgres: migrations, synced-table catalog, group-commit transaction, log reads.
//! - [`http`]: the HTTP API: conflict review for managers, pushes and broadcasts by
//!   server-side writers.
//! - [`server`]: HTTP routes, start-up and graceful shutdown.
//! - [`console`]: the manager console at `/console`, its files built into the binary.
//! - [`metrics`]: counters and gauges, served as Prometheus text at `GET /metrics`.
//! - [`recorder`]: the capture file of device traffic, for replay by the load tester.
//! - [`embedded_pg`] and [`demo`]: the private cluster and demo schema of `synchub dev`.
//!
//! Data flows one way: transport → actors → storage; deltas come back actors → transport.

pub mod actors;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod console;
pub mod demo;
pub mod embedded_pg;
pub mod error;
pub mod http;
pub mod ids;
pub mod limits;
pub mod metrics;
pub mod recorder;
pub mod rules;
pub mod server;
pub mod storage;
pub mod sync;
pub mod telemetry;
pub mod transport;
