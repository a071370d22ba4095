//! Any bytes from the ring buffer: decoded or refused, never a panic or an out-of-bounds read.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    std::hint::black_box(conntrace_common::decode(data)).ok();
});
