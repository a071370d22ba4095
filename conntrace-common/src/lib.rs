//! Types shared by conntrace's eBPF programs and its userspace.
//!
//! Everything here is `#[repr(C)]`, `Copy`, free of implicit padding and usable without `std`,
//! so the kernel side can write it into the ring buffer or read it from a map and userspace can
//! read it back byte for byte. With the `user` feature the types implement `aya::Pod`.
#![no_std]

pub mod accept;
pub mod config;
pub mod event;
pub mod perf;
pub mod quiet;
pub mod tcp;

pub use accept::{ACCEPT_ENTRY_SIZE, ACCEPT_WALK_MAX, AcceptQueueEntry};
pub use config::*;
pub use event::*;

/// Implements `aya::Pod` for types that are plain old data (no pointers, no implicit padding).
macro_rules! user_pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: `#[repr(C)]`, `Copy`, every field is an integer or an array of integers and
            // all padding is spelled out as named fields, so any byte pattern is a valid value.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use user_pod;
