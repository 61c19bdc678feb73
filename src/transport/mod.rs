//! Transport: the HTTP endpoints that carry the wire protocols. The native WebSocket upgrade
//! lives here (frame handling is the `DeviceSession` actor's); RxDB's replication protocol and
//! Supabase Realtime's Phoenix channels are translations over the same tenant actors, stream
//! following (`follow`) and storage (`rxdb`, `supabase`).
pub mod follow;
pub mod fragments;
pub mod frame_guard;
pub mod rxdb;
pub mod socket;
pub mod supabase;
pub mod ws;
