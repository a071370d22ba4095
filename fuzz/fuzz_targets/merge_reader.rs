//! Any JSON Lines input to `conntrace merge`: merged lines or an error, never a panic.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;

#[path = "../../conntrace/src/merge.rs"]
#[allow(dead_code)]
mod merge;

fuzz_target!(|data: &[u8]| {
    for json in [false, true] {
        std::hint::black_box(merge::merge_one("fuzz", data, Duration::from_secs(2), json)).ok();
    }
});
