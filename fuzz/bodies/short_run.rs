//! The short form of a fuzz target, for the test suite: its body over its seeds, over the
//! crash inputs kept in `fuzz/regressions/<target>/`, and over a bounded number of proptest
//! inputs (seeds with a few bytes changed, and random bytes; the same ones on every run). With
//! `SYNCHUB_FUZZ_CORPUS` set to a folder, it only writes the seeds to `<folder>/<target>/`, the
//! seed corpora of `cargo fuzz run` (fuzz/seed-corpora).

// Each includer uses a part.
#![allow(dead_code)]

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::Path;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// Proptest inputs per target: enough to try every mutation kind on every seed a few times,
/// few enough for a debug build in seconds.
const CASES: u32 = 400;

pub fn run(fuzz_dir: &Path, target: &str, seeds: Vec<(String, Vec<u8>)>, body: fn(&[u8])) {
    assert!(!seeds.is_empty(), "{target}: no seeds");
    if let Some(corpus) = std::env::var_os("SYNCHUB_FUZZ_CORPUS") {
        let dir = Path::new(&corpus).join(target);
        std::fs::create_dir_all(&dir).expect("the corpus folder can be made");
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes).expect("a seed can be written");
        }
        return;
    }
    let regressions = std::fs::read_dir(fuzz_dir.join("regressions").join(target))
        .into_iter()
        .flatten()
        .map(|entry| entry.expect("a regression entry").path())
        .map(|path| (path.display().to_string(), std::fs::read(&path).expect("a regression input")));
    for (name, bytes) in seeds.iter().cloned().chain(regressions) {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| body(&bytes))) {
            eprintln!("{target}: input {name} failed");
            resume_unwind(panic);
        }
    }
    let inputs = seeds.into_iter().map(|(_, bytes)| bytes).collect::<Vec<_>>();
    let mutated = (prop::sample::select(inputs), prop::collection::vec((any::<Index>(), 0u8..3, any::<u8>()), 1..8)).prop_map(|(mut bytes, edits)| {
        for (at, kind, byte) in edits {
            match kind {
                0 if !bytes.is_empty() => {
                    let at = at.index(bytes.len());
                    bytes[at] = byte;
                }
                1 => bytes.insert(at.index(bytes.len() + 1), byte),
                _ if !bytes.is_empty() => {
                    bytes.remove(at.index(bytes.len()));
                }
                _ => {}
            }
        }
        bytes
    });
    let strategy = prop_oneof![3 => mutated, 1 => prop::collection::vec(any::<u8>(), 0..300)];
    // A fixed seed: the suite tries the same inputs on every run; `cargo fuzz` explores.
    let config = Config { cases: CASES, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    runner
        .run(&strategy, |bytes| {
            body(&bytes);
            Ok(())
        })
        .unwrap_or_else(|failure| panic!("{target}: {failure}"));
}
