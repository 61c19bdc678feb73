//! Merge logic, independent of storage and transport.
pub mod merge;
