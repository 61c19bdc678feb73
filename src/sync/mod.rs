//! Merge logic and the checks on pushed batches, independent of storage and transport.
pub mod batch;
pub mod conditional;
pub mod merge;
pub mod views;
