//! Supabase Realtime frames (vsn 1.0.0 and 2.0.0, binary kind 3), join payloads and
//! `postgres_changes` filters as the hub's `/realtime/v1` session reads them (`--features hub`).
#![no_main]

#[path = "../bodies/supabase.rs"]
mod supabase;

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| supabase::supabase(bytes));
