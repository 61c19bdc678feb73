//! Client and server frames as JSON text frames.
#![no_main]

#[path = "../bodies/frames.rs"]
mod frames;

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| frames::frame(protocol::Encoding::Json, bytes));
