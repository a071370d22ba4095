//! Userspace's view of `CONN_SLOTS`, the array most followed connections live in
//! (`conntrace_common::quiet::CONN_SLOTS`): the map is created memory-mappable, and mapped
//! here once, so that the stall check reads the slots in place, with no system call and no
//! copy, and frees a slot the same way the kernel does (a compare-and-swap of its socket).

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{Map, MapData};
use conntrace_common::quiet::{CONN_SLOTS, ConnSlot, History, SLOT_BUSY, conn_slot};

/// Why `CONN_SLOTS` could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum SlotsError {
    #[error("CONN_SLOTS is not an array map")]
    NotArray,
    #[error("mmap(CONN_SLOTS, {len} bytes): {source}")]
    Mmap {
        len: usize,
        #[source]
        source: std::io::Error,
    },
}

/// `CONN_SLOTS`, mapped shared and writable (the kernel writes it; userspace only reads
/// and frees slots).
pub struct ConnSlots {
    /// Held so that the map outlives the mapping (`None`: slots in process memory, tests).
    map: Option<MapData>,
    base: NonNull<ConnSlot>,
    len: usize,
}

impl ConnSlots {
    /// Maps the `CONN_SLOTS` array (created with `BPF_F_MMAPABLE`). Errors: not an array,
    /// or `mmap(2)`.
    pub fn new(map: Map) -> Result<Self, SlotsError> {
        let Map::Array(data) = map else {
            return Err(SlotsError::NotArray);
        };
        // Array values are 8-byte aligned in the mapping; ConnSlot's size is a multiple of 8.
        let len = CONN_SLOTS as usize * size_of::<ConnSlot>();
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: a new shared mapping of the map's whole value area, never aliased by a
        // Rust reference; unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(SlotsError::Mmap {
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(ptr.cast::<ConnSlot>()).ok_or(SlotsError::Mmap {
            len,
            source: std::io::Error::other("null mapping"),
        })?;
        Ok(Self {
            map: Some(data),
            base,
            len,
        })
    }

    /// The socket field of slot `i` (`i < CONN_SLOTS`), shared with the kernel.
    fn key(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i < CONN_SLOTS as usize);
        // SAFETY: `i` is within the mapping; `sk` is the slot's first field, 8-byte aligned,
        // and only ever accessed atomically or by single aligned stores.
        unsafe { AtomicU64::from_ptr(&raw mut (*self.base.as_ptr().add(i)).sk) }
    }

    /// The start (`History::started_ns`) of slot `i`, shared with the kernel, which writes it
    /// last when it fills a slot (0 while it writes the rest).
    fn start(&self, i: usize) -> &AtomicU64 {
        // SAFETY: as in `key`; `started_ns` is the history's first field, 8-byte aligned.
        unsafe { AtomicU64::from_ptr(&raw mut (*self.base.as_ptr().add(i)).history.started_ns) }
    }

    /// Every connection in a slot now, by socket address, appended to `out`. Each slot is
    /// copied between two reads of its socket and its start; one the kernel freed, filled or
    /// is filling meanwhile (the socket or the start changed, or the slot is
    /// [`SLOT_BUSY`]) is left out.
    pub fn snapshot(&self, out: &mut Vec<(u64, History)>) {
        for i in 0..CONN_SLOTS as usize {
            let (key, start) = (self.key(i), self.start(i));
            let sk = key.load(Ordering::Acquire);
            if sk == 0 || sk == SLOT_BUSY {
                continue;
            }
            let started = start.load(Ordering::Acquire);
            // SAFETY: within the mapping; a volatile copy of memory the kernel may write
            // meanwhile, checked below.
            let h =
                unsafe { std::ptr::read_volatile(&raw const (*self.base.as_ptr().add(i)).history) };
            std::sync::atomic::fence(Ordering::Acquire);
            if started != 0
                && h.started_ns == started
                && start.load(Ordering::Acquire) == started
                && key.load(Ordering::Acquire) == sk
            {
                out.push((sk, h));
            }
        }
    }

    /// Frees the slot of `sk` if it still holds the connection started at `started_ns`:
    /// true when it did.
    pub fn forget(&self, sk: u64, started_ns: u64) -> bool {
        let i = conn_slot(sk) as usize;
        let key = self.key(i);
        if key.load(Ordering::Acquire) != sk {
            return false;
        }
        self.start(i).load(Ordering::Acquire) == started_ns
            && key
                .compare_exchange(sk, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }
}

impl Drop for ConnSlots {
    fn drop(&mut self) {
        if self.map.is_some() {
            // SAFETY: the mapping made in `new`, of `len` bytes; no reference into it survives.
            unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
        }
    }
}

// SAFETY: the mapping is process memory, accessed only through atomics and volatile copies.
unsafe impl Send for ConnSlots {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The view over slots in process memory, as the kernel would have left them.
    fn over(slots: &mut [ConnSlot]) -> ConnSlots {
        assert_eq!(slots.len(), CONN_SLOTS as usize);
        ConnSlots {
            map: None,
            base: NonNull::new(slots.as_mut_ptr()).unwrap(),
            len: size_of_val(slots),
        }
    }

    fn history(started_ns: u64) -> History {
        History {
            started_ns,
            established_ns: started_ns + 1_000,
            ..History::default()
        }
    }

    /// A socket address whose slot is `slot`.
    fn socket_in(slot: u32) -> u64 {
        (0xffff_8881_0000_0000u64..)
            .step_by(64)
            .find(|&sk| conn_slot(sk) == slot)
            .unwrap()
    }

    #[test]
    fn a_snapshot_holds_the_taken_slots_and_skips_free_and_busy_ones() {
        let mut slots = vec![ConnSlot::default(); CONN_SLOTS as usize];
        let (a, b) = (socket_in(3), socket_in(4_000));
        slots[3] = ConnSlot {
            sk: a,
            history: history(10),
        };
        slots[4_000] = ConnSlot {
            sk: b,
            history: history(20),
        };
        slots[8_191] = ConnSlot {
            sk: SLOT_BUSY,
            history: history(30),
        };
        let view = over(&mut slots);
        let mut out = vec![(1, History::default())];
        view.snapshot(&mut out);
        assert_eq!(out[1..], [(a, history(10)), (b, history(20))]);
    }

    #[test]
    fn forget_frees_a_slot_only_for_the_connection_that_holds_it() {
        let mut slots = vec![ConnSlot::default(); CONN_SLOTS as usize];
        let sk = socket_in(77);
        slots[77] = ConnSlot {
            sk,
            history: history(500),
        };
        let view = over(&mut slots);
        // An earlier connection at the same address, or another socket: left.
        assert!(!view.forget(sk, 499));
        assert!(!view.forget(socket_in(78), 500));
        let mut out = Vec::new();
        view.snapshot(&mut out);
        assert_eq!(out, [(sk, history(500))]);
        assert!(view.forget(sk, 500));
        out.clear();
        view.snapshot(&mut out);
        assert_eq!(out, []);
        drop(view);
        assert_eq!(slots[77].sk, 0);
    }
}
