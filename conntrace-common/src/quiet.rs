//! Quiet mode ([`crate::FLAG_QUIET`]): what the kernel keeps about a healthy connection, and
//! the counters that stand for the events it no longer sends.
//!
//! A traced connection gets a [`History`] in the `CONNS` hash map (key: the socket's kernel
//! address) when it starts (SYN_SENT, or a listener's child in SYN_RECV). While it stays
//! healthy nothing crosses the ring buffer: the kernel counts its handshake in [`COUNTS`] and
//! [`LATENCY`](maps::LATENCY), and deletes the entry when it closes cleanly. The first time the
//! connection needs userspace (an error, a reset, a retransmission, a drop, a close that is not
//! clean, or userspace asking through `WATCH`), the kernel writes its history
//! ([`HistoryEvent`](crate::HistoryEvent)) followed by the event itself, and from then on the
//! connection streams like every connection does without quiet mode.

use crate::{COMM_LEN, Tuple, user_pod};

/// Map names.
pub mod maps {
    /// `Array<ConnSlot>` of [`super::CONN_SLOTS`] entries: traced connections kept in the
    /// kernel, each in the slot [`super::conn_slot`] gives its socket address, claimed by a
    /// compare-and-swap of [`super::ConnSlot::sk`] (0: free). Every lookup is an array index
    /// and one compare, with no hashing, lock or allocation.
    pub const CONN_SLOTS: &str = "CONN_SLOTS";
    /// `HashMap<u64, History>`: traced connections whose slot in `CONN_SLOTS` another
    /// socket held when they started, by socket address.
    pub const CONNS: &str = "CONNS";
    /// `HashMap<u64, u64>`: sockets userspace wants to follow (a stall it reported), by socket
    /// address; the value is the connection's `started_ns`.
    pub const WATCH: &str = "WATCH";
    /// `Array<u32>` of [`super::watching::SLOTS`] entries (see [`super::watching`]): whether
    /// the kernel need look `WATCH` or `WATCH_TUPLES` up.
    pub const WATCHING: &str = "WATCHING";
    /// `HashMap<Tuple, u8>`: handshakes userspace follows as attempts (a SYN or final ACK
    /// dropped before any socket had it, a SYN cookie sent), by tuple as the server's socket
    /// has it: a listener's child with that tuple streams from its start, so that userspace
    /// sees the handshake complete. Only userspace adds and removes them.
    pub const WATCH_TUPLES: &str = "WATCH_TUPLES";
    /// `LruHashMap<Tuple, u8>`: the tuples of SYN cookies the kernel just sent, added by the
    /// kernel at once (the final ACK comes a round trip later, before userspace could add the
    /// attempt's tuple to `WATCH_TUPLES`) and looked up for [`super::COOKIE_WATCH_JIFFIES`]
    /// after the last one. Least recently used first out: an insert never fails, even under a
    /// flood of cookies, and the oldest tuples are the ones userspace has taken over.
    pub const COOKIE_TUPLES: &str = "COOKIE_TUPLES";
    /// `PerCpuArray<u64>`: [`super::counts`].
    pub const COUNTS: &str = "COUNTS";
    /// `PerCpuArray<u64>`: client handshake times by [`super::latency_bucket`].
    pub const LATENCY: &str = "LATENCY";
    /// `PerCpuArray<u64>`: normal drops (see `Config::normal_drops`), by drop reason value.
    pub const NORMAL_DROPS: &str = "NORMAL_DROPS";
}

/// Entries of `CONNS`: connections followed at once besides those in `CONN_SLOTS`. A
/// connection that finds both taken streams instead (counted in [`counts::CONNS_FULL`]).
pub const CONNS_CAPACITY: u32 = 65_536;

/// log2 of [`CONN_SLOTS`].
pub const CONN_SLOT_BITS: u32 = 13;

/// Slots of `CONN_SLOTS` (8,192 of 104 bytes: 832 KiB). A churn keeps a few connections
/// open at once, a connection pool a few thousand; the rest go to `CONNS`.
pub const CONN_SLOTS: u32 = 1 << CONN_SLOT_BITS;

/// The `CONN_SLOTS` slot of the socket at kernel address `sk`: Fibonacci hashing of the
/// address without its low 6 bits (sockets are cache-line aligned slab objects), the top
/// [`CONN_SLOT_BITS`] bits of the product. Shared by the kernel and userspace.
#[inline(always)]
pub fn conn_slot(sk: u64) -> u32 {
    ((sk >> 6).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - CONN_SLOT_BITS)) as u32
}

/// [`ConnSlot::sk`] while the kernel writes the slot's history: no socket's address.
pub const SLOT_BUSY: u64 = 1;

/// A `CONN_SLOTS` entry: the connection of socket `sk`, or none when `sk` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnSlot {
    /// The socket's kernel address; 0: a free slot; [`SLOT_BUSY`]: being written. The
    /// kernel claims a slot by a compare-and-swap from 0 to `SLOT_BUSY`, writes the history,
    /// then the address; it frees the slot by storing 0.
    pub sk: u64,
    pub history: History,
}

user_pod!(ConnSlot);

/// Entries of `WATCH`.
pub const WATCH_CAPACITY: u32 = 8_192;

/// Entries of `WATCH_TUPLES`: an IPv4 attempt takes two (its tuple in both forms a server
/// socket may have). Attempts that find it full are followed through
/// [`watching::TUPLES_FULL`] instead.
pub const WATCH_TUPLES_CAPACITY: u32 = 4_096;

/// Entries of `COOKIE_TUPLES` (least recently used evicted).
pub const COOKIE_TUPLES_CAPACITY: u32 = 8_192;

/// How long after the kernel last added a cookie's tuple to `COOKIE_TUPLES` a listener's
/// child looks it up, in kernel ticks (jiffies): 5 s where the kernel's HZ is 1000, longer
/// where it is lower; long enough for userspace to read the cookie's event and follow its
/// attempt in `WATCH_TUPLES`.
pub const COOKIE_WATCH_JIFFIES: u32 = 5_000;

/// `WATCHING` slots.
pub mod watching {
    /// Non-zero once a socket was put in `WATCH`.
    pub const SOCKETS: u32 = 0;
    /// How many tuples of userspace's attempts `WATCH_TUPLES` holds (written by userspace).
    pub const TUPLES: u32 = 1;
    /// When the kernel last added a cookie's tuple to `COOKIE_TUPLES`: the low 32 bits of
    /// `jiffies_64`, never 0 once written (0: never); written only by the kernel.
    pub const COOKIE_JIFFIES: u32 = 2;
    /// Non-zero while an open attempt's tuple could not be put in `WATCH_TUPLES` (full under
    /// a flood of attempts): every listener's child then streams from its start, as if its
    /// tuple were watched, so that no attempt misses its handshake. Written only by userspace.
    pub const TUPLES_FULL: u32 = 3;
    /// Slots in all.
    pub const SLOTS: u32 = 4;
}

/// Slots of `NORMAL_DROPS`: drop reasons below this value are counted in the kernel.
pub const NORMAL_DROP_SLOTS: u32 = 256;

/// Slots of the per-CPU `COUNTS` array.
pub mod counts {
    /// Handshakes completed (TCP_ESTABLISHED) on traced ports, client and server side.
    pub const ESTABLISHED_CLIENT: u32 = 0;
    pub const ESTABLISHED_SERVER: u32 = 1;
    /// Connections that closed healthy and never reached userspace.
    pub const CLOSED_QUIET: u32 = 2;
    /// Histories written to the ring buffer.
    pub const FLUSHED: u32 = 3;
    /// Connections that found `CONNS` full and streamed.
    pub const CONNS_FULL: u32 = 4;
    /// Normal drops counted in the kernel (their reasons in `NORMAL_DROPS`).
    pub const NORMAL_DROPS: u32 = 5;
    pub const COUNT: u32 = 6;
}

/// `History::flags` bits.
pub mod flags {
    /// A listener's child (server side); else a connect()ing socket (client side).
    pub const SERVER: u32 = 1 << 0;
    /// Its history went to userspace: every further event streams.
    pub const STREAMING: u32 = 1 << 1;
    /// An orderly shutdown (FIN) started.
    pub const ORDERLY: u32 = 1 << 2;
    /// Server: seen owned by a process (accepted), at `accepted_ns` when that is not 0.
    pub const ACCEPTED: u32 = 1 << 3;
    /// The namespace could not be read (`History::netns` is 0).
    pub const NETNS_UNREAD: u32 = 1 << 4;
}

/// What the kernel keeps about a traced connection in quiet mode. Times are
/// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC nanoseconds); 0 means "not yet".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct History {
    /// SYN_SENT (client) or the child's SYN_RECV (server).
    pub started_ns: u64,
    /// TCP_ESTABLISHED.
    pub established_ns: u64,
    /// Server: accept() returned it (only where the accept hook runs in quiet mode: fentry).
    pub accepted_ns: u64,
    /// The connection's addresses and ports, local end first, as of its last state change.
    pub tuple: Tuple,
    /// Client: the connect()ing process (the task current at SYN_SENT); server: the process
    /// that closed it (the task current at FIN_WAIT1 while it held the socket), else 0.
    pub pid: u32,
    /// Network namespace inode.
    pub netns: u32,
    /// [`flags`] bits.
    pub flags: u32,
    pub _pad: u32,
    /// That process's comm.
    pub comm: [u8; COMM_LEN],
}

user_pod!(History);

/// Buckets of the handshake-time histogram.
pub const LATENCY_BUCKETS: u32 = 8 * 33;

/// The log-linear bucket of `us` microseconds: exact below 8 µs, then 8 buckets per power of
/// two (at most 12.5 % wide), capped at about 2^35 µs (9.5 hours). The eBPF side and userspace
/// share it, so a streamed and a quiet handshake land in the same bucket.
#[inline(always)]
pub fn latency_bucket(us: u64) -> u32 {
    if us < 8 {
        return us as u32;
    }
    // floor(log2(us)), by halving the search range: no loop for the verifier to walk.
    let mut p = 0u32;
    let mut v = us;
    if v >= 1 << 32 {
        v >>= 32;
        p += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        p += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        p += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        p += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        p += 2;
    }
    if v >= 1 << 1 {
        p += 1;
    }
    if p > 34 {
        return LATENCY_BUCKETS - 1;
    }
    let sub = ((us >> (p - 3)) & 7) as u32;
    8 * (p - 2) + sub
}

/// The smallest and largest microsecond values of `bucket`.
pub fn latency_bucket_bounds(bucket: u32) -> (u64, u64) {
    if bucket < 8 {
        return (bucket as u64, bucket as u64);
    }
    let p = bucket / 8 + 2;
    let sub = (bucket % 8) as u64;
    let low = (8 + sub) << (p - 3);
    (low, low + (1u64 << (p - 3)) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_spread_over_the_slots() {
        // Slab objects of one cache: a tcp_sock-sized stride from a few slab pages.
        let mut used = [0u32; CONN_SLOTS as usize];
        let base = 0xffff_8881_0a40_0000u64;
        let n = 4_096u64;
        for i in 0..n {
            let sk = base + (i / 13) * 0x8000 + (i % 13) * 2_432;
            let slot = conn_slot(sk);
            assert!(slot < CONN_SLOTS);
            used[slot as usize] += 1;
        }
        // Half the slots for 4,096 sockets: most get one of their own.
        let alone = used.iter().filter(|&&c| c == 1).count();
        assert!(alone > 2_500, "{alone} of {n} sockets alone in their slot");
        assert_eq!(size_of::<ConnSlot>(), 104);
    }

    #[test]
    fn every_value_falls_in_its_bucket() {
        let mut v = 0u64;
        while v < 1 << 36 {
            let b = latency_bucket(v);
            assert!(b < LATENCY_BUCKETS, "{v}");
            let (lo, hi) = latency_bucket_bounds(b);
            if b != LATENCY_BUCKETS - 1 {
                assert!(lo <= v && v <= hi, "{v} in {b} = {lo}..={hi}");
                assert!(hi - lo <= lo / 8 + 1, "{b} too wide");
            }
            v = v + 1 + v / 7;
        }
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(7), 7);
        assert_eq!(latency_bucket(8), 8);
        assert_eq!(latency_bucket(15), 15);
        assert_eq!(latency_bucket(16), 16);
        assert_eq!(latency_bucket(17), 16);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn buckets_are_contiguous() {
        for b in 8..LATENCY_BUCKETS - 1 {
            assert_eq!(
                latency_bucket_bounds(b).1 + 1,
                latency_bucket_bounds(b + 1).0
            );
        }
    }
}
