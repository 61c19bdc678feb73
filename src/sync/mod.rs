//! Merge logic, independent of storage and transport.
pub mod merge;
pub mod views;
