//! RxDB replication requests as the hub's `/rxdb/v1` session reads them (`--features hub`).
#![no_main]

#[path = "../bodies/rxdb.rs"]
mod rxdb;

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| rxdb::rxdb(bytes));
