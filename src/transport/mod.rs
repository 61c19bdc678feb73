//! Transport: the HTTP endpoints that carry the protocol. The WebSocket upgrade lives here;
//! frame handling is the `DeviceSession` actor's.
pub mod frame_guard;
pub mod ws;
