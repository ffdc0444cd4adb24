#![no_main]
//! The `vfio-gmem assign` stdin line protocol: never panics, display round-trips, and
//! generated lines parse to the command they were built from.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vfio_gmem_fuzz::parsers::control_lines(data);
});
