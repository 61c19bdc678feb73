//! Subscription filters applied to rows.
#![no_main]

#[path = "../bodies/draw.rs"]
mod draw;
#[path = "../bodies/filter.rs"]
mod filter;

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| filter::filter(bytes));
