#![no_main]
//! Random region layouts and conversion sequences (with injected executor failures)
//! through the planner and the fake kernel, checked against a page-array model.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vfio_gmem_fuzz::dma_model::run(data);
});
