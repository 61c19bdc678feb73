//! Merge logic and the checks on pushed batches, independent of storage and transport.
pub mod batch;
pub mod merge;
pub mod views;
