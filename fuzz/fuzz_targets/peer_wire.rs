#![no_main]
//! The peer protocol's decoder on bytes another process could send: never panics, and
//! what decodes round-trips.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vfio_gmem_fuzz::parsers::peer_wire(data);
});
