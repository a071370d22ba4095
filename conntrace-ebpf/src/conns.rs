//! Quiet mode's table of followed connections, by socket address: a slot of `CONN_SLOTS`
//! where the address's slot is free, else the `CONNS` hash map. A slot costs an array index,
//! a compare and, to claim it, one compare-and-swap; the hash map's insert and delete each
//! took its bucket lock and its free list's, a helper call apiece, at every connection's
//! start and end (see `conntrace_common::quiet::CONN_SLOTS`).

use core::intrinsics::{
    AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xchg, volatile_copy_nonoverlapping_memory,
};

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use conntrace_common::quiet::{self, CONNS_CAPACITY, ConnSlot, History, conn_slot, flags};

/// `BPF_F_MMAPABLE`: userspace maps the array and reads the slots in place.
const BPF_F_MMAPABLE: u32 = 1 << 10;

#[map]
static CONN_SLOTS: Array<ConnSlot> = Array::with_max_entries(quiet::CONN_SLOTS, BPF_F_MMAPABLE);

#[map]
static CONNS: HashMap<u64, History> = HashMap::with_max_entries(CONNS_CAPACITY, 0);

/// One word per CPU, through which a socket address becomes a plain number (see [`slot`]).
#[map]
static ADDRESS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// How many connections the kernel put in `CONNS` and has not removed (at least as many as
/// it holds: userspace's removals are not counted). While 0, a new connection that takes
/// its slot need not look `CONNS` up.
#[map]
static HASHED: Array<u64> = Array::with_max_entries(1, 0);

/// A slot's socket while its history is written: never a socket's address, so that neither a
/// lookup nor userspace takes the slot's history before it is whole.
const BUSY: u64 = quiet::SLOT_BUSY;

/// Socket address `sk` as a number. A `tp_btf` or fentry program's socket is a typed
/// pointer to the verifier, which refuses the hash's shift and multiply on it, and its
/// passing to a global function; stored to a map value and loaded back it is a number (a
/// root program may store pointers in maps). A program that interrupts this one on its CPU
/// between the store and the load leaves its own socket there: a second load checks (the
/// number itself is never compared with `sk`, or the compiler would use `sk` in its place),
/// and it is done again once. `None` when it cannot be read.
#[inline(always)]
pub(crate) fn number(sk: u64) -> Option<u64> {
    let word = ADDRESS.get_ptr_mut(0)?;
    // SAFETY: this CPU's word of a live map value. A nested program stores only its own
    // socket: when the second load finds `sk`, the first one did too.
    let read = || unsafe {
        word.write_volatile(sk);
        let addr = word.read_volatile();
        (addr, word.read_volatile() == sk)
    };
    let (mut addr, mut whole) = read();
    if !whole {
        (addr, whole) = read();
        if !whole {
            return None;
        }
    }
    Some(addr)
}

/// The slot of `sk`, whoever holds it, and `sk` as a [`number`]. `None` when the address
/// cannot be read (then only `CONNS` is used).
#[inline(always)]
fn slot(sk: u64) -> Option<(u64, *mut ConnSlot)> {
    let addr = number(sk)?;
    Some((addr, CONN_SLOTS.get_ptr_mut(conn_slot(addr))?))
}

/// Adds `delta` (wrapping) to `HASHED`.
#[inline(always)]
fn count_hashed(delta: u64) {
    if let Some(n) = HASHED.get_ptr_mut(0) {
        // SAFETY: an aligned u64 of a live map value (BPF_ATOMIC | BPF_ADD).
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, delta) };
    }
}

/// Whether `CONNS` may hold entries.
#[inline(always)]
fn any_hashed() -> bool {
    HASHED.get(0).is_none_or(|n| *n != 0)
}

/// Compare-and-swap of a slot's socket (BPF_ATOMIC | BPF_CMPXCHG): whether it was `old`.
///
/// # Safety
/// `key` is the socket field of a live `CONN_SLOTS` value.
#[inline(always)]
unsafe fn swap_key(key: *mut u64, old: u64, new: u64) -> bool {
    // SAFETY: the caller's; the field is only ever written by this and by `publish`.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::Relaxed }>(key, old, new)
            .1
    }
}

/// Writes history `h` into slot `s` (held `BUSY` by the caller), its start last, then
/// gives the slot to socket `addr`. Userspace copies a slot between two reads of its start
/// and its socket: a copy that overlapped these writes sees one of them change.
///
/// # Safety
/// `s` is a live `CONN_SLOTS` value the caller holds `BUSY`.
#[inline(always)]
unsafe fn publish(s: *mut ConnSlot, h: &History, addr: u64) {
    const START: usize = core::mem::offset_of!(History, started_ns);
    const _: () = assert!(START == 0);
    // SAFETY: the caller's; volatile writes, kept in this order.
    unsafe {
        let dst = &raw mut (*s).history;
        (&raw mut (*dst).started_ns).write_volatile(0);
        volatile_copy_nonoverlapping_memory(
            dst.cast::<u8>().add(8),
            (h as *const History).cast::<u8>().add(8),
            size_of::<History>() - 8,
        );
        (&raw mut (*dst).started_ns).write_volatile(h.started_ns);
        atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(&raw mut (*s).sk, addr);
    }
}

/// The history of the connection at `sk`, in place.
#[inline(always)]
pub(crate) fn get(sk: u64) -> Option<*mut History> {
    if let Some((addr, s)) = slot(sk) {
        // SAFETY: a live map value; its socket field is only read here.
        unsafe {
            if (&raw const (*s).sk).read_volatile() == addr {
                return Some(&raw mut (*s).history);
            }
        }
    }
    CONNS.get_ptr_mut(&sk)
}

/// How [`insert`] placed a connection.
pub(crate) enum Placed {
    /// In a free place.
    New,
    /// Over the entry of an earlier connection at the same address, whose close the kernel
    /// skipped; `streaming` when that one streamed (and so does this one, from its start).
    OverStale { streaming: bool },
    /// Nowhere: its slot is another socket's and `CONNS` is full.
    Full,
}

/// Puts the history `h` of a new connection at `sk` in its slot, or in `CONNS` when another
/// socket holds the slot. When it replaces a stale entry of a streaming connection, `h`
/// streams too (`flags::STREAMING`), so that its first event retires the old one in
/// userspace.
#[inline(always)]
pub(crate) fn insert(sk: u64, h: &mut History) -> Placed {
    if let Some((addr, s)) = slot(sk) {
        // SAFETY: a field of a live map value.
        let key = unsafe { &raw mut (*s).sk };
        // Free, or held by the stale entry of this very address: now this socket's.
        // SAFETY: `key` is the slot's socket field.
        let claimed = unsafe { swap_key(key, 0, BUSY) };
        // SAFETY: as above.
        if claimed || unsafe { swap_key(key, addr, BUSY) } {
            let stale = if !claimed {
                // SAFETY: the slot is held BUSY by this program.
                Some(unsafe { (*s).history.flags })
            } else if any_hashed() {
                // An earlier connection at this address may be in `CONNS` (its slot was
                // taken then): it gives way.
                // SAFETY: a plain lookup; the value is not held.
                unsafe { CONNS.get(&sk) }.map(|old| old.flags)
            } else {
                None
            };
            let streaming = stale.is_some_and(|f| f & flags::STREAMING != 0);
            if streaming {
                h.flags |= flags::STREAMING;
            }
            // SAFETY: held BUSY by this program.
            unsafe { publish(s, h, addr) };
            if claimed && stale.is_some() && CONNS.remove(&sk).is_ok() {
                count_hashed(u64::MAX);
            }
            return match stale {
                None => Placed::New,
                Some(_) => Placed::OverStale { streaming },
            };
        }
    }
    const BPF_NOEXIST: u64 = 1;
    if CONNS.insert(&sk, &*h, BPF_NOEXIST).is_ok() {
        count_hashed(1);
        return Placed::New;
    }
    // SAFETY: a plain lookup; the value is not held.
    let stale = unsafe { CONNS.get(&sk) }.map(|old| old.flags);
    let streaming = stale.is_some_and(|f| f & flags::STREAMING != 0);
    if streaming {
        h.flags |= flags::STREAMING;
    }
    if CONNS.insert(&sk, &*h, 0).is_err() {
        return Placed::Full;
    }
    if stale.is_none() {
        // Room was made between the two inserts.
        count_hashed(1);
        return Placed::New;
    }
    Placed::OverStale { streaming }
}

/// Drops the entry of the connection at `sk`.
#[inline(always)]
pub(crate) fn remove(sk: u64) {
    if let Some((addr, s)) = slot(sk) {
        // SAFETY: the slot's socket field; freed only while it is still this socket's.
        if unsafe { swap_key(&raw mut (*s).sk, addr, 0) } {
            return;
        }
    }
    if any_hashed() && CONNS.remove(&sk).is_ok() {
        count_hashed(u64::MAX);
    }
}
