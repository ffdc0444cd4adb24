//! The fuzz targets' checks (fuzz/src/, shared by path with the cargo-fuzz crate) run on
//! the host without cargo-fuzz: every input of the committed seed corpus
//! (fuzz/corpus/TARGET/), then random inputs through proptest.
//!
//! `PROPTEST_CASES=20000 cargo test --release --test fuzz_bodies` is a longer run without
//! cargo-fuzz; `scripts/fuzz` is the coverage-guided one.

use proptest::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

#[allow(dead_code)] // the CLI's HELP text is not exercised here
#[path = "../src/bin/vfio-gmem/control.rs"]
mod control;
#[path = "../fuzz/src/dma_model/mod.rs"]
mod dma_model;
#[path = "../fuzz/src/parsers.rs"]
mod parsers;

use dma_model::{Sabotage, Summary};

/// The seed corpus of a fuzz target, sorted by file name.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.expect("directory entry").path();
            let data = std::fs::read(&p).expect("corpus file");
            (p, data)
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "{}: only {} inputs",
        dir.display(),
        files.len()
    );
    files
}

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        max_shrink_iters: 500,
        // Failures are reported with their bytes; add them to fuzz/corpus to keep them.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Every seed passes, and together they reach every path of the check: committed
/// batches, each planner error class, each failure outcome, registrations, removals.
#[test]
fn dma_model_corpus_passes_and_covers_every_outcome() {
    let mut total = Summary::default();
    for (path, data) in corpus("dma_model") {
        let s = catch_unwind(|| dma_model::run(&data))
            .unwrap_or_else(|_| panic!("{} fails the model check", path.display()));
        total.add(&s);
    }
    eprintln!("dma_model corpus: {total:?}");
    assert!(total.batches >= 100, "{total:?}");
    assert!(total.plan_errors >= 20, "{total:?}");
    assert!(total.registered > 0 && total.deregistered > 0, "{total:?}");
    assert!(total.rolled_back > 0, "{total:?}");
    assert!(total.rollback_failed > 0, "{total:?}");
    assert!(total.not_discarded > 0, "{total:?}");
}

/// The check is not vacuous: an executor that skips unmaps, or attribute changes to
/// shared, fails it on the corpus.
#[test]
fn dma_model_catches_a_broken_executor() {
    let seeds = corpus("dma_model");
    for sabotage in [Sabotage::SkipUnmaps, Sabotage::SkipSharedAttributes] {
        let caught = seeds
            .iter()
            .filter(|(_, d)| {
                catch_unwind(AssertUnwindSafe(|| dma_model::run_with(d, sabotage))).is_err()
            })
            .count();
        assert!(
            caught * 2 >= seeds.len(),
            "{sabotage:?} caught by only {caught} of {} seeds",
            seeds.len()
        );
    }
}

#[test]
fn control_parser_corpus_passes() {
    for (path, data) in corpus("control_parser") {
        catch_unwind(|| parsers::control_lines(&data))
            .unwrap_or_else(|_| panic!("{} fails", path.display()));
    }
}

#[test]
fn peer_wire_corpus_passes() {
    for (path, data) in corpus("peer_wire") {
        catch_unwind(|| parsers::peer_wire(&data))
            .unwrap_or_else(|_| panic!("{} fails", path.display()));
    }
}

#[test]
fn sizes_corpus_passes() {
    for (path, data) in corpus("sizes") {
        catch_unwind(|| parsers::sizes(&data))
            .unwrap_or_else(|_| panic!("{} fails", path.display()));
    }
}

proptest! {
    #![proptest_config(cases(500))]

    #[test]
    fn dma_model_random_inputs(data in prop::collection::vec(any::<u8>(), 0..4096)) {
        dma_model::run(&data);
    }
}

proptest! {
    #![proptest_config(cases(2000))]

    #[test]
    fn control_parser_random_inputs(data in prop::collection::vec(any::<u8>(), 0..256)) {
        parsers::control_lines(&data);
    }

    #[test]
    fn peer_wire_random_inputs(data in prop::collection::vec(any::<u8>(), 0..96)) {
        parsers::peer_wire(&data);
    }

    #[test]
    fn sizes_random_inputs(data in prop::collection::vec(any::<u8>(), 0..128)) {
        parsers::sizes(&data);
    }
}
