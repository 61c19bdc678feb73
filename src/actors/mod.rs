//! Actors: per-socket device sessions, per-tenant actors, and the registry between them.
pub mod cluster_events;
pub mod device;
pub mod messages;
pub mod registry;
pub mod sweep;
pub mod tenant;
pub mod topics;
