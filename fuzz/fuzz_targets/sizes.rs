#![no_main]
//! Number, size and PCI address parsing: never panics, agrees with a reference grammar,
//! round-trips, and reports overflow.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vfio_gmem_fuzz::parsers::sizes(data);
});
