//! The protocol's fuzz targets (fuzz/, run with `cargo fuzz`) in short form: each target's body
//! over its seeds from the golden vectors, its kept crash inputs and a bounded number of
//! proptest inputs. The bodies are the fuzzers' own (fuzz/bodies/), not a copy.

#[path = "../../fuzz/bodies/capture.rs"]
mod capture;
#[path = "../../fuzz/bodies/draw.rs"]
mod draw;
#[path = "../../fuzz/bodies/filter.rs"]
mod filter;
#[path = "../../fuzz/bodies/frames.rs"]
mod frames;
#[path = "../../fuzz/bodies/short_run.rs"]
mod short_run;

use std::path::{Path, PathBuf};

use protocol::Encoding;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

#[test]
fn frame_json() {
    short_run::run(&fuzz_dir(), "frame_json", frames::seeds(&testdata(), Encoding::Json), |bytes| frames::frame(Encoding::Json, bytes));
}

#[test]
fn frame_msgpack() {
    short_run::run(&fuzz_dir(), "frame_msgpack", frames::seeds(&testdata(), Encoding::MsgPack), |bytes| {
        frames::frame(Encoding::MsgPack, bytes)
    });
}

#[test]
fn filter() {
    let seeds = [Encoding::Json, Encoding::MsgPack]
        .into_iter()
        .flat_map(|encoding| frames::seeds(&testdata(), encoding))
        .filter(|(name, _)| name.starts_with("client_subscribe"))
        .collect();
    short_run::run(&fuzz_dir(), "filter", seeds, filter::filter);
}

#[test]
fn capture() {
    short_run::run(&fuzz_dir(), "capture", capture::seeds(&testdata()), capture::capture);
}
