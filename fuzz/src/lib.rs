//! Bodies of the fuzz targets. Each module is also compiled into the host test
//! `tests/fuzz_bodies.rs` (by `#[path]`), so `cargo test` runs the same checks over the
//! committed corpus and over random inputs. Every check panics on a violation.

pub mod dma_model;
pub mod parsers;

/// The CLI's line protocol, compiled from the binary's source (it is not library API).
#[path = "../../src/bin/vfio-gmem/control.rs"]
pub mod control;
