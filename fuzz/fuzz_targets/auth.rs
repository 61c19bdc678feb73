//! JWTs through `TokenVerifier::verify` with an HS256 key (`--features hub`).
#![no_main]

#[path = "../bodies/auth.rs"]
mod auth;
#[path = "../bodies/draw.rs"]
mod draw;
#[path = "../bodies/frames.rs"]
mod frames;

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| auth::auth(bytes));
