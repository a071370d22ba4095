//! `struct perf_event_attr` (include/uapi/linux/perf_event.h) at its first published size,
//! which every kernel accepts: what conntrace's userspace passes to `perf_event_open(2)` (a
//! dummy event to learn whether the machine restricts perf events) and the test harness too
//! (a classic tracepoint's event for an eBPF program). Not used by the eBPF side.

/// `PERF_ATTR_SIZE_VER0`: 64 bytes, the fields up to `config1`. `flags` holds the
/// bitfield that follows `read_format` (`disabled` is bit 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerfEventAttrV0 {
    /// `type`: `PERF_TYPE_*`.
    pub kind: u32,
    /// `size`: this struct's size.
    pub size: u32,
    pub config: u64,
    pub sample_period: u64,
    pub sample_type: u64,
    pub read_format: u64,
    pub flags: u64,
    pub wakeup_events: u32,
    pub bp_type: u32,
    pub config1: u64,
}

/// `PERF_TYPE_SOFTWARE`.
pub const PERF_TYPE_SOFTWARE: u32 = 1;
/// `PERF_TYPE_TRACEPOINT`: `config` is the tracepoint's id (tracefs `events/CAT/NAME/id`).
pub const PERF_TYPE_TRACEPOINT: u32 = 2;
/// `PERF_FLAG_FD_CLOEXEC`, perf_event_open(2)'s flag.
pub const PERF_FLAG_FD_CLOEXEC: u64 = 1 << 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_has_the_first_published_size() {
        assert_eq!(size_of::<PerfEventAttrV0>(), 64);
        assert_eq!(core::mem::offset_of!(PerfEventAttrV0, flags), 40);
        assert_eq!(core::mem::offset_of!(PerfEventAttrV0, config1), 56);
    }
}
