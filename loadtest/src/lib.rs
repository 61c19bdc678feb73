//! The load tester's parts, as a library so that the hub's integration tests can drive the
//! same scenarios (the `synchub-loadtest` binary is a thin command line over them).

pub mod capture;
pub mod client;
pub mod compare;
pub mod dashboards;
pub mod devices;
pub mod error;
pub mod fanout;
pub mod idle;
pub mod lean_log;
pub mod lean_tables;
pub mod pg_ceiling;
pub mod phoenix;
pub mod plot;
pub mod proc_stats;
pub mod replay;
pub mod report;
pub mod soak;
pub mod storm;
pub mod tables;
pub mod tokens;
pub mod wal;
