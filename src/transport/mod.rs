//! Transport: the HTTP endpoints that carry the wire protocols. The native WebSocket upgrade
//! lives here (frame handling is the `DeviceSession` actor's); RxDB's replication protocol is a
//! translation over the same tenant actors and storage (`rxdb`).
pub mod fragments;
pub mod frame_guard;
pub mod rxdb;
pub mod socket;
pub mod ws;
