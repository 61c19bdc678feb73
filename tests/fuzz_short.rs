//! The hub's fuzz targets (fuzz/, run with `cargo fuzz --features hub`) in short form: token
//! verification, the load tester's capture reader, and the RxDB and Supabase Realtime frames
//! as their sessions read them, each body over its seeds, its kept crash inputs and a bounded
//! number of proptest inputs. The bodies are the fuzzers' own
//! (fuzz/bodies/), not a copy. No database.

#[path = "../fuzz/bodies/auth.rs"]
mod auth;
#[path = "../fuzz/bodies/capture.rs"]
mod capture;
#[path = "../fuzz/bodies/draw.rs"]
mod draw;
#[path = "../fuzz/bodies/frames.rs"]
mod frames;
#[path = "../fuzz/bodies/loadtest_capture.rs"]
mod loadtest_capture;
#[path = "../fuzz/bodies/rxdb.rs"]
mod rxdb;
#[path = "../fuzz/bodies/short_run.rs"]
mod short_run;
#[path = "../fuzz/bodies/supabase.rs"]
mod supabase;

use std::path::{Path, PathBuf};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("protocol/testdata")
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

#[test]
fn auth() {
    short_run::run(&fuzz_dir(), "auth", auth::seeds(&testdata()), auth::auth);
}

#[test]
fn loadtest_capture() {
    short_run::run(&fuzz_dir(), "loadtest_capture", loadtest_capture::seeds(&testdata()), loadtest_capture::loadtest_capture);
}

#[test]
fn rxdb() {
    short_run::run(&fuzz_dir(), "rxdb", rxdb::seeds(), rxdb::rxdb);
}

#[test]
fn supabase() {
    short_run::run(&fuzz_dir(), "supabase", supabase::seeds(), supabase::supabase);
}
