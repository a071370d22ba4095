//! Quiet mode (`FLAG_QUIET`): healthy connections stay here. A traced connection's facts live
//! in its table ([`crate::conns`]) from its start; nothing crosses the ring buffer while it
//! is healthy. The first event of it that userspace must see is preceded by its history
//! ([`promote`]), and from then on the connection streams. See `conntrace_common::quiet` for the shapes.

use core::ptr::addr_of_mut;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_jiffies64, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use conntrace_common::{
    AF_INET, AF_INET6, Config, EventKind, FLAG_QUIET, HistoryEvent, Tuple,
    quiet::{
        COOKIE_TUPLES_CAPACITY, COOKIE_WATCH_JIFFIES, History, LATENCY_BUCKETS, NORMAL_DROP_SLOTS,
        WATCH_CAPACITY, WATCH_TUPLES_CAPACITY, counts, flags, latency_bucket, watching,
    },
    tcp::state,
};

use crate::{
    EVENTS, conns, count_lost, header, mark_after_loss,
    sock::{Probed, SockRead},
    submit_flags,
};

#[map]
static WATCH: HashMap<u64, u64> = HashMap::with_max_entries(WATCH_CAPACITY, 0);

/// `conntrace_common::quiet::watching` slots: a connection ever put in `WATCH`, the tuples
/// in `WATCH_TUPLES` now, when the last cookie was sent (jiffies), whether `WATCH_TUPLES` is
/// short of room.
#[map]
static WATCHING: Array<u32> = Array::with_max_entries(watching::SLOTS, 0);

/// Handshakes userspace follows as attempts, by the server socket's tuple.
#[map]
static WATCH_TUPLES: HashMap<Tuple, u8> = HashMap::with_max_entries(WATCH_TUPLES_CAPACITY, 0);

/// Tuples of the cookies just sent, until userspace follows their attempts.
#[map]
static COOKIE_TUPLES: LruHashMap<Tuple, u8> =
    LruHashMap::with_max_entries(COOKIE_TUPLES_CAPACITY, 0);

#[map]
static COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counts::COUNT, 0);

#[map]
static LATENCY: PerCpuArray<u64> = PerCpuArray::with_max_entries(LATENCY_BUCKETS, 0);

#[map]
static NORMAL_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NORMAL_DROP_SLOTS, 0);

/// Whether healthy connections stay in the kernel.
#[inline(always)]
pub(crate) fn enabled(cfg: &Config) -> bool {
    cfg.flags & FLAG_QUIET != 0
}

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, slot: u32) {
    if let Some(n) = map.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot; a lost increment between nested programs is harmless.
        unsafe { *n += 1 };
    }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: reads the monotonic clock.
    unsafe { bpf_ktime_get_ns() }
}

/// Whether drops of `reason` are a normal part of TCP wherever they happen
/// (`Config::normal_drops`): counted here instead of sent.
#[inline(always)]
pub(crate) fn is_normal_drop(cfg: &Config, reason: u32) -> bool {
    let n = &cfg.normal_drops;
    reason < NORMAL_DROP_SLOTS
        && (reason == n[0] || reason == n[1] || reason == n[2] || reason == n[3])
}

/// Counts a normal drop of a traced port's packet.
#[inline(always)]
pub(crate) fn count_normal_drop(reason: u32) {
    bump(&NORMAL_DROPS, reason);
    bump(&COUNTS, counts::NORMAL_DROPS);
}

/// A new traced connection at `sock` (a connect()ing socket, or a listener's child when
/// `server`): kept here. False when it must stream instead: its table is full, or the address
/// still holds a streaming connection whose close the kernel skipped (see [`on_state`]),
/// which lives on in userspace until an event of this address retires it there.
#[inline(always)]
fn start(sock: &impl SockRead, tuple: &Tuple, netns: Option<u32>, server: bool) -> bool {
    let sk = sock.addr();
    let mut f = if server { flags::SERVER } else { 0 };
    if netns.is_none() {
        f |= flags::NETNS_UNREAD;
    }
    // Written field by field in place, the comm by the helper itself: a History built by
    // value took a memset and a copy, and 6.1's verifier adds the memset's frame to the
    // classic lifecycle program's (over its 512-byte limit).
    let mut h = core::mem::MaybeUninit::<History>::uninit();
    let p = h.as_mut_ptr();
    // SAFETY: every field of `h` is written before it is read (as the insert's value).
    let h = unsafe {
        addr_of_mut!((*p).started_ns).write(now());
        // Volatile: two neighbouring zero stores were merged into a call to a byte-loop memset.
        addr_of_mut!((*p).established_ns).write_volatile(0);
        addr_of_mut!((*p).accepted_ns).write_volatile(0);
        addr_of_mut!((*p).tuple).write(*tuple);
        // A listener's child is created in softirq context: the current task is nobody's.
        addr_of_mut!((*p).pid).write(if server {
            0
        } else {
            (bpf_get_current_pid_tgid() >> 32) as u32
        });
        addr_of_mut!((*p).netns).write(netns.unwrap_or(0));
        addr_of_mut!((*p).flags).write(f);
        addr_of_mut!((*p)._pad).write_volatile(0);
        let comm = addr_of_mut!((*p).comm);
        if server {
            // Two word stores (History is 8-aligned and `comm` at a multiple of 8): a
            // zeroed array would be a memset call.
            comm.cast::<u64>().write_volatile(0);
            comm.cast::<u64>().add(1).write_volatile(0);
        } else {
            sock.write_current_comm(comm);
        }
        h.assume_init_mut()
    };
    match conns::insert(sk, h) {
        conns::Placed::New | conns::Placed::OverStale { streaming: false } => true,
        // The address's earlier connection streamed, its close skipped (the same program
        // running on that CPU then): this one streams from its start.
        conns::Placed::OverStale { streaming: true } => false,
        conns::Placed::Full => {
            bump(&COUNTS, counts::CONNS_FULL);
            false
        }
    }
}

/// Writes `h` (the history of `sk`) to the ring buffer, in place: the event is too large to
/// build on the eBPF stack beside a program's own state.
#[inline(always)]
fn flush(sk: u64, h: *const History) {
    let Some(mut entry) = EVENTS.reserve::<HistoryEvent>(0) else {
        count_lost();
        return;
    };
    let slot = entry.as_mut_ptr();
    // SAFETY: `slot` is the reserved, exclusively owned record, fully written before submit;
    // `h` points to a live map value.
    unsafe {
        let netns = (*h).netns;
        let unread = (*h).flags & flags::NETNS_UNREAD != 0;
        let header = header(
            EventKind::History,
            size_of::<HistoryEvent>(),
            if unread { None } else { Some(netns) },
        );
        addr_of_mut!((*slot).header).write(header);
        addr_of_mut!((*slot).skaddr).write(sk);
        addr_of_mut!((*slot).history).write(*h);
    }
    mark_after_loss(slot.cast());
    entry.submit(submit_flags());
    bump(&COUNTS, counts::FLUSHED);
}

/// Before the first event of `sk` userspace is to see (from program `prog`, which knows
/// it by address, a number or a typed pointer): its history, once, and from then on it
/// streams. Nothing for a socket not followed here.
#[inline(always)]
pub(crate) fn promote(prog: u32, sk: u64) {
    if sk == 0 {
        return;
    }
    if let Some(sk) = conns::number(sk) {
        conntrace_promote(prog, sk);
    }
}

/// [`promote`]'s work as a global function (`BTF_FUNC_GLOBAL`): the kernel verifies it once,
/// apart from its callers, which see a call that returns a number. Inlined at each call site,
/// its paths (the history in a slot or in `CONNS`, flushed or not, the ring buffer full or
/// not) multiplied the caller's: 6.1's verifier walked 817,821 instructions to accept the
/// retransmit program and refused the classic `kfree_skb` (two call sites) at its limit of
/// 1,000,000. A global function takes numbers only: `sk` is one ([`conns::number`]).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn conntrace_promote(prog: u32, sk: u64) -> u32 {
    if let Some(cfg) = crate::config() {
        promote_sock(&Probed {
            prog,
            offsets: &cfg.offsets,
            sk,
        });
    }
    0
}

/// [`promote`] for a socket read the way its program can.
#[inline(always)]
fn promote_sock(sock: &impl SockRead) {
    let sk = sock.addr();
    if sk == 0 {
        return;
    }
    let Some(h) = conns::get(sk) else {
        return;
    };
    // SAFETY: a live map value; programs on other CPUs may race on `flags`, at worst
    // flushing the history twice (userspace merges a repeated history).
    unsafe {
        let f = (*h).flags;
        if f & flags::STREAMING != 0 {
            return;
        }
        (*h).flags |= flags::STREAMING;
        if f & (flags::SERVER | flags::ACCEPTED) == flags::SERVER && sock.owned() == Some(true) {
            // Accepted already, where no accept hook said when.
            (*h).flags |= flags::ACCEPTED;
        }
    }
    flush(sk, h);
}

/// accept() returned `sk` (fentry path): remembered; true when the connection is followed
/// quietly and nothing needs sending (not streaming, and userspace does not watch it: a
/// stalled connection's accept() is its `resolved`).
#[inline(always)]
pub(crate) fn accepted(sk: u64) -> bool {
    let Some(h) = conns::get(sk) else {
        return false;
    };
    // SAFETY: a live map value; a plain lookup whose value is not held.
    unsafe {
        (*h).accepted_ns = now();
        (*h).flags |= flags::ACCEPTED;
        (*h).flags & flags::STREAMING == 0 && (!watching() || WATCH.get(&sk).is_none())
    }
}

/// `StateChange::progress` of a connection userspace follows as it starts or ends closing:
/// whether it received data and whether a process held it, since quiet mode sends no
/// first-data or accept event. 0 (nothing known) when a fact cannot be read.
#[inline(always)]
pub(crate) fn progress(sock: &impl SockRead) -> u32 {
    let (Some(received), Some(owned)) = (sock.bytes_received(), sock.owned()) else {
        return 0;
    };
    use conntrace_common::progress::{OWNED, READ, RECEIVED};
    let mut bits = READ;
    if received > 0 {
        bits |= RECEIVED;
    }
    if owned {
        bits |= OWNED;
    }
    bits
}

/// Whether a followed connection ends with nothing to report: it completed its handshake, its
/// socket has no error, it did not sit past the stall timeout without data (client) or
/// accept() (server), and userspace does not follow it (`WATCH`). A fact that cannot be
/// read makes it report.
#[inline(always)]
fn closes_quietly(cfg: &Config, sock: &impl SockRead, h: &History) -> bool {
    if h.established_ns == 0 || !sock.no_error() {
        return false;
    }
    let timeout = u64::from(cfg.stall_timeout_ms) * 1_000_000;
    if timeout != 0 {
        // Whether it moved first: the clock only for one that did not (under virtualisation
        // a clock read was a sixth of this program's time, and a healthy close needs none).
        let moved = if h.flags & flags::SERVER != 0 {
            h.flags & flags::ACCEPTED != 0
        } else {
            sock.bytes_received().is_some_and(|n| n > 0)
        };
        if !moved && now().saturating_sub(h.established_ns) >= timeout {
            return false;
        }
    }
    // SAFETY: a plain lookup; the value is not held.
    !watching() || unsafe { WATCH.get(&sock.addr()) }.is_none()
}

/// A traced socket's state change in quiet mode. True when it is handled here (or is not a
/// TCP socket's); false when the event is to be sent as without quiet mode (after the
/// connection's history, when it has one). `is_tcp` is asked only where no entry of a
/// connection already vouches for it.
#[inline(always)]
pub(crate) fn on_state(
    cfg: &Config,
    sock: &impl SockRead,
    (old, new): (i32, i32),
    tuple: &Tuple,
    netns: impl FnOnce() -> Option<u32>,
    is_tcp: impl Fn() -> bool,
) -> bool {
    let sk = sock.addr();
    if new == state::SYN_SENT || (new == state::SYN_RECV && old == state::LISTEN) {
        let server = new == state::SYN_RECV;
        if !is_tcp() {
            return true;
        }
        if !start(sock, tuple, netns(), server) {
            return false;
        }
        if server && tuple_watched(tuple) {
            // A handshake userspace follows as an attempt (its SYN or final ACK was dropped
            // before): the child's history now, standing for this state change, and it
            // streams from here.
            promote_sock(sock);
        }
        return true;
    }
    let Some(hp) = conns::get(sk) else {
        if new == state::ESTABLISHED && is_tcp() {
            count_established(old);
        }
        return false;
    };
    // SAFETY (the flags): a live map value.
    if new == state::ESTABLISHED
        && unsafe { (*hp).flags } & flags::SERVER != 0
        && tuple_watched(tuple)
    {
        // A handshake userspace follows as an attempt (a cookie's), whose child's tuple was
        // incomplete at SYN_RECV: `inet_csk_clone_lock` changes the state before it sets the
        // peer's port, and `tcp_v4_syn_recv_sock` the addresses after it. Complete now.
        // SAFETY: a live map value; the tuple is written before the history is sent.
        unsafe { (*hp).tuple = *tuple };
        promote_sock(sock);
    }
    // SAFETY: a live map value, updated in place; removed last.
    let h = unsafe { &mut *hp };
    if new == state::ESTABLISHED {
        count_established(old);
        h.tuple = *tuple;
        if h.flags & flags::SERVER == 0 {
            let now = now();
            h.established_ns = now;
            bump(
                &LATENCY,
                latency_bucket(now.saturating_sub(h.started_ns) / 1_000),
            );
        } else {
            // A server's child socket is created (SYN_RECV) while the handshake's last ACK is
            // processed, microseconds before this: its start serves, one clock read fewer (a
            // TCP Fast Open child, created at the SYN, is early by a round trip).
            h.established_ns = h.started_ns;
        }
    }
    let streaming = h.flags & flags::STREAMING != 0;
    match new {
        state::CLOSE => {
            let quiet = !streaming && closes_quietly(cfg, sock, h);
            if !quiet && !streaming {
                if tuple.sport != 0 {
                    h.tuple = *tuple;
                }
                flush(sk, h);
            }
            conns::remove(sk);
            if !quiet && watching() && WATCH.remove(&sk).is_err() {
                // Not watched.
            }
            if quiet {
                bump(&COUNTS, counts::CLOSED_QUIET);
            }
            quiet
        }
        _ if streaming => false,
        state::FIN_WAIT1 | state::CLOSE_WAIT | state::LAST_ACK | state::CLOSING
            if watching() && unsafe { WATCH.get(&sk) }.is_some() =>
        {
            // Userspace follows it (found stalled): it streams from the start of its close,
            // whose event says whether data came. Its CLOSE alone would not do: the kernel
            // skips a program that fires while the same program runs on that CPU (a softirq
            // closing it on top of a process's state change), and a close missed there left
            // the stall open for good. (SAFETY of the guard: a plain lookup, value not held.)
            promote_sock(sock);
            false
        }
        state::FIN_WAIT1 | state::CLOSE_WAIT | state::LAST_ACK | state::CLOSING => {
            h.flags |= flags::ORDERLY;
            if h.flags & flags::SERVER != 0 && sock.owned() == Some(true) {
                h.flags |= flags::ACCEPTED;
                if new == state::FIN_WAIT1 && h.pid == 0 {
                    // close() runs in the process that holds the socket: the server's process,
                    // where no accept hook named it.
                    h.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
                    // SAFETY: `h.comm` is COMM_LEN bytes of a live map value.
                    unsafe { sock.write_current_comm(&raw mut h.comm) };
                }
            }
            true
        }
        state::ESTABLISHED | state::FIN_WAIT2 | state::TIME_WAIT => true,
        _ => false,
    }
}

/// Counts a completed handshake on its side (it left SYN_SENT: the client).
#[inline(always)]
fn count_established(old: i32) {
    bump(
        &COUNTS,
        if old == state::SYN_SENT {
            counts::ESTABLISHED_CLIENT
        } else {
            counts::ESTABLISHED_SERVER
        },
    );
}

/// Whether userspace has ever watched a connection (`WATCH` is looked up only then).
#[inline(always)]
fn watching() -> bool {
    WATCHING.get(watching::SOCKETS).is_some_and(|w| *w != 0)
}

/// Whether userspace follows the handshake of `tuple` (the server's socket's) as an attempt:
/// every tuple while `WATCH_TUPLES` is short of room, else one there (looked up only while it
/// holds any) or a cookie's just sent (looked up only for a few seconds after one).
#[inline(always)]
fn tuple_watched(tuple: &Tuple) -> bool {
    let slot = |slot| WATCHING.get(slot).copied().unwrap_or(0);
    if slot(watching::TUPLES_FULL) != 0 {
        return true;
    }
    // SAFETY: plain lookups; the values are not held.
    if slot(watching::TUPLES) != 0 && unsafe { WATCH_TUPLES.get(tuple) }.is_some() {
        return true;
    }
    let cookie = slot(watching::COOKIE_JIFFIES);
    // SAFETY: as above.
    cookie != 0
        && jiffies().wrapping_sub(cookie) <= COOKIE_WATCH_JIFFIES
        && unsafe { COOKIE_TUPLES.get(tuple) }.is_some()
}

/// The kernel's tick count, its low 32 bits, never 0 (0 stays "never"). One helper call that
/// reads a variable: tracing programs may not read the coarse clock.
#[inline(always)]
fn jiffies() -> u32 {
    // SAFETY: reads `jiffies_64`.
    (unsafe { bpf_jiffies64() } as u32).max(1)
}

/// A listener answered a SYN with a cookie (`tuple`: the reply's, this host's end first):
/// the child its final ACK makes, a round trip from now, streams from its start, so that the
/// cookie's attempt sees it validated (userspace could not add the tuple in time). An IPv4
/// tuple is added in the IPv4-mapped form too, a dual-stack listener's child's.
#[inline(always)]
pub(crate) fn watch_cookie(tuple: &Tuple) {
    // An LRU map makes room by evicting its oldest tuple, whose attempt userspace follows
    // by now: the insert fails only when the kernel cannot allocate at all.
    if COOKIE_TUPLES.insert(tuple, &1, 0).is_err() {
        return;
    }
    if tuple.family == AF_INET {
        let mut mapped = *tuple;
        mapped.family = AF_INET6;
        mapped.saddr = v4_mapped(&tuple.saddr);
        mapped.daddr = v4_mapped(&tuple.daddr);
        if COOKIE_TUPLES.insert(&mapped, &1, 0).is_err() {
            // As above.
        }
    }
    if let Some(at) = WATCHING.get_ptr_mut(watching::COOKIE_JIFFIES) {
        // SAFETY: a plain store to an array slot, read by later programs.
        unsafe { at.write_volatile(jiffies()) };
    }
}

/// `::ffff:a.b.c.d` from an address whose first four bytes are IPv4.
#[inline(always)]
fn v4_mapped(v4: &[u8; 16]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[10] = 0xff;
    a[11] = 0xff;
    a[12] = v4[0];
    a[13] = v4[1];
    a[14] = v4[2];
    a[15] = v4[3];
    a
}
