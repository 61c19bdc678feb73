//! Capture files as the load tester reads them (`--features hub`).
#![no_main]

#[path = "../bodies/capture.rs"]
mod capture;
#[path = "../bodies/frames.rs"]
mod frames;
#[path = "../bodies/loadtest_capture.rs"]
mod loadtest_capture;

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| loadtest_capture::loadtest_capture(bytes));
