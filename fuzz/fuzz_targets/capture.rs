//! Capture files as protocol/src/capture.rs reads them.
#![no_main]

#[path = "../bodies/capture.rs"]
mod capture;
#[path = "../bodies/frames.rs"]
mod frames;

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| capture::capture(bytes));
