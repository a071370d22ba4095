//! conntrace's kernel side: capture facts about TCP connections on the traced ports and hand
//! them to userspace through one ring buffer. No decisions are made here.
//!
//! Record layouts and kernel structure offsets come from userspace (`CONFIG`), which reads them
//! from the running kernel's tracepoint `format` files and BTF.
#![no_std]
#![no_main]
// The compare-and-swap intrinsic (`conns`): the BPF target has no `compare_exchange` on its
// atomics (its base CPU lacks the instruction; the kernels this project runs on have it).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod accept_queues;
mod connect_denied;
mod conns;
mod data;
mod drops;
mod fentry;
mod fib;
mod lifecycle;
mod quiet;
mod sock;
mod syscalls;

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use conntrace_common::{
    ABSENT, AF_INET6, COMM_LEN, Config, DEFAULT_RING_BYTES, ErrorReport, EventHeader, EventKind,
    FLAG_ALL_PORTS, INLINE_PORTS, KernelOffsets, MAX_PORTS, RESET_REASON_NONE, Reset, Retransmit,
    SynRetransmit, TCP_FLAGS_UNKNOWN, TracepointLayout, Tuple, TupleLayout, header_flags,
    maps::{LOST_COUNT, LOST_PENDING, LOST_SLOTS, RING_PEAK},
    programs,
    tcp::state,
    unread,
};

const IPPROTO_TCP: u16 = 6;

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// Per CPU: [`LOST_COUNT`] events that did not fit into `EVENTS`; [`RING_PEAK`] the most bytes
/// waiting in `EVENTS` seen after a write since userspace last reset it.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOST_SLOTS, 0);

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Traced ports (host byte order); ignored when `FLAG_ALL_PORTS` is set.
#[map]
static PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_PORTS, 0);

/// Per CPU, by program (`conntrace_common::programs`): kernel reads that failed.
#[map]
static READ_FAILURES: PerCpuArray<u64> = PerCpuArray::with_max_entries(programs::COUNT, 0);

#[inline(always)]
fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

/// Counts a kernel read that failed in program `prog`: the fact it was for is left absent.
#[inline(always)]
fn read_failed(prog: u32) {
    if let Some(n) = READ_FAILURES.get_ptr_mut(prog) {
        // SAFETY: per-CPU slot; a lost increment between nested programs is harmless.
        unsafe { *n += 1 };
    }
}

/// Reads a field of the tracepoint record, or `T::default()` when this kernel lacks it (or the
/// read failed: counted for `prog`).
#[inline(always)]
fn field<T: Default>(prog: u32, ctx: &TracePointContext, off: u16) -> T {
    if off == ABSENT {
        return T::default();
    }
    // SAFETY: bpf_probe_read of the record; the offset comes from the tracepoint's format file.
    match unsafe { ctx.read_at::<T>(off as usize) } {
        Ok(v) => v,
        Err(_) => {
            read_failed(prog);
            T::default()
        }
    }
}

/// Reads `N` bytes of the tracepoint record at `off` into `dst` in place (zeros when this
/// kernel lacks the field or the read fails: counted for `prog`). Addresses go through here:
/// written by the helper, the verifier sees them as unknown bytes, where an array returned by
/// value becomes one tracked scalar per byte, and 6.1's verifier then explores each path
/// separately (it refused `tcp_retransmit_skb` at the 1M-instruction limit).
#[inline(always)]
fn bytes_field<const N: usize>(prog: u32, ctx: &TracePointContext, off: u16, dst: &mut [u8; N]) {
    if off == ABSENT {
        return;
    }
    // The record's offset comes from the tracepoint's format file.
    kread_into(prog, ctx.as_ptr() as u64 + u64::from(off), dst);
}

/// Reads `N` bytes of kernel memory at `addr` into `dst` in place (see [`bytes_field`]);
/// false for a null address or a failed read (counted for `prog`; `dst` is then zeros).
#[inline(always)]
fn kread_into<const N: usize>(prog: u32, addr: u64, dst: &mut [u8; N]) -> bool {
    if addr == 0 {
        return false;
    }
    // SAFETY: the helper writes at most N bytes into `dst` and fails instead of faulting.
    let ret = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_kernel(
            dst.as_mut_ptr().cast(),
            N as u32,
            addr as *const core::ffi::c_void,
        )
    };
    if ret < 0 {
        read_failed(prog);
    }
    ret >= 0
}

/// Writes a tuple of `family` and ports with zero addresses into `slot`, a word at a time
/// with volatile stores, and returns it: `Tuple { .., ..Tuple::default() }`, or a tuple built
/// by value and then copied, became a call to a byte-loop `memset` (34 bytes on every traced
/// run of the lifecycle program).
#[inline(always)]
fn init_tuple(
    slot: &mut core::mem::MaybeUninit<Tuple>,
    family: u16,
    sport: u16,
    dport: u16,
) -> &mut Tuple {
    let p = slot.as_mut_ptr().cast::<u64>();
    // SAFETY: `Tuple` is 40 bytes, 8-aligned, plain integers: five words write all of it
    // (family, sport, dport, _pad in the first, little-endian).
    unsafe {
        p.write_volatile(u64::from(family) | u64::from(sport) << 16 | u64::from(dport) << 32);
        let mut i = 1;
        while i < size_of::<Tuple>() / 8 {
            p.add(i).write_volatile(0);
            i += 1;
        }
        slot.assume_init_mut()
    }
}

/// [`init_tuple`] for a tuple returned by value.
#[inline(always)]
fn new_tuple(family: u16, sport: u16, dport: u16) -> Tuple {
    let mut slot = core::mem::MaybeUninit::uninit();
    *init_tuple(&mut slot, family, sport, dport)
}

/// The first 4 bytes of an address buffer, for an IPv4 address.
#[inline(always)]
fn v4_part(addr: &mut [u8; 16]) -> &mut [u8; 4] {
    // SAFETY: the first 4 of 16 bytes, borrowed mutably from `addr`.
    unsafe { &mut *addr.as_mut_ptr().cast::<[u8; 4]>() }
}

/// Reads kernel memory at `addr`: `None` for a null address, or when the read fails (counted
/// for `prog`).
#[inline(always)]
fn kread<T>(prog: u32, addr: u64) -> Option<T> {
    if addr == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel tolerates any address and fails instead of faulting.
    match unsafe { bpf_probe_read_kernel(addr as *const T) } {
        Ok(v) => Some(v),
        Err(_) => {
            read_failed(prog);
            None
        }
    }
}

/// Reads a `struct sockaddr_in`/`sockaddr_in6` stored in the record at `off`.
#[inline(always)]
fn sockaddr_field(prog: u32, ctx: &TracePointContext, off: u16, addr: &mut [u8; 16]) -> (u16, u16) {
    let family: u16 = field(prog, ctx, off);
    let port = u16::from_be(field::<u16>(prog, ctx, off + 2));
    if family == AF_INET6 {
        bytes_field(prog, ctx, off + 8, addr);
    } else {
        bytes_field(prog, ctx, off + 4, v4_part(addr));
    }
    (family, port)
}

#[inline(always)]
fn read_tuple(prog: u32, ctx: &TracePointContext, l: &TupleLayout) -> Tuple {
    let mut t = new_tuple(0, 0, 0);
    if l.sockaddr_src != ABSENT {
        let (family, sport) = sockaddr_field(prog, ctx, l.sockaddr_src, &mut t.saddr);
        let (_, dport) = sockaddr_field(prog, ctx, l.sockaddr_dst, &mut t.daddr);
        t.family = family;
        t.sport = sport;
        t.dport = dport;
        return t;
    }
    t.family = field(prog, ctx, l.family);
    t.sport = field(prog, ctx, l.sport);
    t.dport = field(prog, ctx, l.dport);
    if t.family == AF_INET6 {
        bytes_field(prog, ctx, l.saddr6, &mut t.saddr);
        bytes_field(prog, ctx, l.daddr6, &mut t.daddr);
    } else {
        bytes_field(prog, ctx, l.saddr4, v4_part(&mut t.saddr));
        bytes_field(prog, ctx, l.daddr4, v4_part(&mut t.daddr));
    }
    t
}

#[inline(always)]
fn port_traced(cfg: &Config, a: u16, b: u16) -> bool {
    if cfg.flags & FLAG_ALL_PORTS != 0 {
        return true;
    }
    let n = cfg.inline_port_count as usize;
    if n <= INLINE_PORTS {
        // Compared in registers: most runs are for other ports and leave here.
        let p = &cfg.inline_ports;
        let mut i = 0;
        while i < INLINE_PORTS {
            if i < n && (p[i] == a || p[i] == b) {
                return true;
            }
            i += 1;
        }
        return false;
    }
    // SAFETY: plain hash lookups; the values are never held across calls.
    unsafe { PORTS.get(&a).is_some() || PORTS.get(&b).is_some() }
}

/// The namespace of `struct net *` at `net`.
#[inline(always)]
fn netns_of_net(prog: u32, o: &KernelOffsets, net: u64) -> Option<u32> {
    if net == 0 || o.net_inum == KernelOffsets::MISSING {
        return None;
    }
    kread(prog, net + o.net_inum as u64)
}

/// The network namespace of socket `sk`; `None` without a socket or when unreadable.
#[inline(always)]
fn netns_of_sock(prog: u32, o: &KernelOffsets, sk: u64) -> Option<u32> {
    if sk == 0 || o.sock_net == KernelOffsets::MISSING {
        return None;
    }
    netns_of_net(prog, o, kread(prog, sk + o.sock_net as u64)?)
}

/// The namespace of a device `struct net_device *`.
#[inline(always)]
fn netns_of_dev(prog: u32, o: &KernelOffsets, dev: u64) -> Option<u32> {
    if dev == 0 || o.netdev_net == KernelOffsets::MISSING {
        return None;
    }
    netns_of_net(prog, o, kread(prog, dev + o.netdev_net as u64)?)
}

/// The namespace of packet `skb`'s device.
#[inline(always)]
fn netns_of_skb(prog: u32, o: &KernelOffsets, skb: u64) -> Option<u32> {
    if skb == 0 || o.skb_dev == KernelOffsets::MISSING {
        return None;
    }
    netns_of_dev(prog, o, kread(prog, skb + o.skb_dev as u64)?)
}

/// The namespace of an incoming packet from its route (`skb_dst(skb)->dev`): TCP's receive
/// path reuses `skb->dev` as scratch space, the route stays.
#[inline(always)]
fn netns_of_skb_route(prog: u32, o: &KernelOffsets, skb: u64) -> Option<u32> {
    if skb == 0 || o.skb_refdst == KernelOffsets::MISSING || o.dst_dev == KernelOffsets::MISSING {
        return None;
    }
    // The low bit marks a route held without a reference.
    let dst = kread::<u64>(prog, skb + o.skb_refdst as u64)? & !1;
    if dst == 0 {
        return None;
    }
    netns_of_dev(prog, o, kread(prog, dst + o.dst_dev as u64)?)
}

/// TCP flags byte of the packet in `skb` (the one a socket-less reset answers), when readable.
#[inline(always)]
fn answered_tcp_flags(prog: u32, o: &KernelOffsets, skb: u64) -> Option<u32> {
    if skb == 0
        || o.skb_head == KernelOffsets::MISSING
        || o.skb_transport_header == KernelOffsets::MISSING
    {
        return None;
    }
    let head: u64 = kread(prog, skb + o.skb_head as u64)?;
    let transport: u16 = kread(prog, skb + o.skb_transport_header as u64)?;
    if head == 0 || transport == u16::MAX {
        return None;
    }
    kread::<u8>(prog, head + transport as u64 + 13).map(u32::from)
}

/// The header of an event; a namespace that could not be read is marked unread.
#[inline(always)]
fn header(kind: EventKind, size: usize, netns: Option<u32>) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    EventHeader {
        kind: kind as u32,
        size: size as u32,
        // SAFETY: reads the monotonic clock.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        pid: (pid_tgid >> 32) as u32,
        unread: if netns.is_some() { 0 } else { unread::NETNS },
        netns: netns.unwrap_or(0),
        flags: 0,
        comm: current_comm(),
    }
}

/// The current task's comm. Read into uninitialised memory: the helper fills all of it (with
/// zeros on failure). A zero-initialised array would cost a memset call, a byte loop that
/// 6.1's verifier walks once per path (it pushed `kfree_skb` over the 1M-instruction limit).
#[inline(always)]
fn current_comm() -> [u8; COMM_LEN] {
    let mut comm = core::mem::MaybeUninit::<[u8; COMM_LEN]>::uninit();
    // SAFETY: the helper writes COMM_LEN bytes into the buffer, zeros on failure.
    unsafe {
        aya_ebpf::helpers::generated::bpf_get_current_comm(
            comm.as_mut_ptr().cast(),
            COMM_LEN as u32,
        );
        comm.assume_init()
    }
}

/// Writes `event` into the ring buffer, or counts it as lost.
#[inline(always)]
fn emit<T: 'static>(event: T) {
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(event);
            mark_after_loss(entry.as_mut_ptr().cast());
            entry.submit(submit_flags());
        }
        None => count_lost(),
    }
}

/// The submit flags of a record: a wake-up of userspace when `Config::wakeup_bytes` (a quarter
/// of the ring) are waiting; below that, when streaming, none (userspace drains every few
/// milliseconds: a wake-up per record was the largest single cost of a traced event), and in
/// quiet mode the ring buffer's adaptive one. Also remembers how full the ring is (its peak,
/// per CPU).
#[inline(always)]
fn submit_flags() -> u64 {
    const BPF_RB_AVAIL_DATA: u64 = 0;
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    let waiting = EVENTS.query(BPF_RB_AVAIL_DATA);
    note_ring_fill(waiting);
    let Some(cfg) = config() else {
        return 0;
    };
    if waiting >= u64::from(cfg.wakeup_bytes) {
        BPF_RB_FORCE_WAKEUP
    } else if quiet::enabled(cfg) {
        // Rare events, each wanted at once: woken when userspace has caught up (the ring
        // buffer's own adaptive notification), so it needs no periodic drain.
        0
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Remembers how full the ring buffer is (its peak, per CPU).
#[inline(always)]
fn note_ring_fill(waiting: u64) {
    if let Some(peak) = LOST.get_ptr_mut(RING_PEAK) {
        // SAFETY: per-CPU slot; tracepoint programs do not nest on one CPU for this map.
        unsafe {
            if waiting > *peak {
                *peak = waiting;
            }
        }
    }
}

/// Counts an event the ring buffer had no room for; the next event of this CPU says so
/// ([`mark_after_loss`]).
#[inline(always)]
fn count_lost() {
    if let Some(lost) = LOST.get_ptr_mut(LOST_COUNT) {
        // SAFETY: per-CPU slot; tracepoint programs do not nest on one CPU for this map.
        unsafe { *lost += 1 };
    }
    if let Some(pending) = LOST.get_ptr_mut(LOST_PENDING) {
        // SAFETY: as above.
        unsafe { pending.write_volatile(1) };
    }
}

/// Sets `header_flags::LOST_BEFORE` in the reserved `record` (an event, header first) when an
/// event of this CPU was lost since its last one, and clears that: userspace then knows which
/// of the events it reads came after a loss, where the loss counter it reads before a batch
/// misses the losses of that batch's own time.
#[inline(always)]
fn mark_after_loss(record: *mut EventHeader) {
    let Some(pending) = LOST.get_ptr_mut(LOST_PENDING) else {
        return;
    };
    // SAFETY: per-CPU slot; `record` is a reserved, exclusively owned ring-buffer record.
    unsafe {
        if pending.read_volatile() != 0 {
            pending.write_volatile(0);
            let flags = &raw mut (*record).flags;
            flags.write(flags.read() | header_flags::LOST_BEFORE);
        }
    }
}

#[inline(always)]
fn is_tcp(prog: u32, ctx: &TracePointContext, l: &TracepointLayout) -> bool {
    l.protocol == ABSENT || field::<u16>(prog, ctx, l.protocol) == IPPROTO_TCP
}

/// A tracepoint record copied to the stack with one helper call: the hottest program reads
/// its dozen fields from here instead of making a helper call for each.
const RECORD_COPY: usize = 80;

struct Record([u8; RECORD_COPY]);

impl Record {
    #[inline(always)]
    fn copy(prog: u32, ctx: &TracePointContext) -> Option<Self> {
        // Uninitialised: the helper writes every byte (zeros on failure), where a zeroed
        // buffer costs a memset call, a subprogram whose frame 6.1's verifier adds to this
        // program's (over its 512-byte limit).
        let mut rec = core::mem::MaybeUninit::<Self>::uninit();
        // SAFETY: bpf_probe_read_kernel of the record into a local buffer of its size.
        let read = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_kernel(
                rec.as_mut_ptr().cast(),
                RECORD_COPY as u32,
                ctx.as_ptr(),
            )
        };
        if read < 0 {
            read_failed(prog);
            return None;
        }
        // SAFETY: fully written by the helper.
        Some(unsafe { rec.assume_init() })
    }

    /// The field at `off` (from the format file), or `T::default()` when absent or outside
    /// the copy.
    #[inline(always)]
    fn get<T: Copy + Default>(&self, off: u16) -> T {
        let off = off as usize;
        if off + size_of::<T>() > RECORD_COPY {
            return T::default();
        }
        // SAFETY: bounds checked above; the buffer is plain bytes.
        unsafe { core::ptr::read_unaligned(self.0.as_ptr().add(off).cast::<T>()) }
    }
}

#[tracepoint]
pub fn inet_sk_error_report(ctx: TracePointContext) -> u32 {
    const P: u32 = programs::INET_SK_ERROR_REPORT;
    let Some(cfg) = config() else { return 0 };
    let l = &cfg.error_report;
    if !is_tcp(P, &ctx, l) {
        return 0;
    }
    let tuple = read_tuple(P, &ctx, &l.tuple);
    if !port_traced(cfg, tuple.sport, tuple.dport) {
        return 0;
    }
    // The record names no socket: the namespace is unknown (the engine joins it by tuple).
    emit(ErrorReport {
        header: header(EventKind::ErrorReport, size_of::<ErrorReport>(), None),
        tuple,
        error: field(P, &ctx, l.error),
        _pad: 0,
    });
    0
}

#[inline(always)]
fn reset(prog: u32, ctx: &TracePointContext, cfg: &Config, l: &TracepointLayout, kind: EventKind) {
    let tuple = read_tuple(prog, ctx, &l.tuple);
    if !port_traced(cfg, tuple.sport, tuple.dport) {
        return;
    }
    let skaddr: u64 = field(prog, ctx, l.skaddr);
    if quiet::enabled(cfg) {
        quiet::promote(prog, skaddr);
    }
    let o = &cfg.offsets;
    let mut header = if skaddr != 0 {
        header(kind, size_of::<Reset>(), netns_of_sock(prog, o, skaddr))
    } else {
        let skb: u64 = field(prog, ctx, l.skbaddr);
        header(kind, size_of::<Reset>(), netns_of_skb(prog, o, skb))
    };
    // Without a socket, what was answered (a SYN, or a late segment) tells refusal from noise.
    let tcp_flags = if skaddr == 0 {
        answered_tcp_flags(prog, o, field(prog, ctx, l.skbaddr)).unwrap_or_else(|| {
            header.unread |= unread::TCP_FLAGS;
            TCP_FLAGS_UNKNOWN
        })
    } else {
        TCP_FLAGS_UNKNOWN
    };
    emit(Reset {
        header,
        skaddr,
        tuple,
        reason: if l.reason == ABSENT {
            RESET_REASON_NONE
        } else {
            field(prog, ctx, l.reason)
        },
        tcp_flags,
    });
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    if let Some(cfg) = config() {
        let p = programs::TCP_RECEIVE_RESET;
        reset(p, &ctx, cfg, &cfg.receive_reset, EventKind::ReceiveReset);
    }
    0
}

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    if let Some(cfg) = config() {
        reset(
            programs::TCP_SEND_RESET,
            &ctx,
            cfg,
            &cfg.send_reset,
            EventKind::SendReset,
        );
    }
    0
}

#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    const P: u32 = programs::TCP_RETRANSMIT_SKB;
    let Some(cfg) = config() else { return 0 };
    let l = &cfg.retransmit;
    let state: i32 = field(P, &ctx, l.state);
    let tuple = read_tuple(P, &ctx, &l.tuple);
    if !port_traced(cfg, tuple.sport, tuple.dport) {
        return 0;
    }
    let skaddr: u64 = field(P, &ctx, l.skaddr);
    let o = &cfg.offsets;
    let netns = netns_of_sock(P, o, skaddr);
    if quiet::enabled(cfg) {
        // Every retransmission streams: the engine counts them from their events.
        quiet::promote(P, skaddr);
    }
    if state == state::SYN_SENT {
        emit(SynRetransmit {
            header: header(EventKind::SynRetransmit, size_of::<SynRetransmit>(), netns),
            skaddr,
            tuple,
        });
        return 0;
    }
    // Past the handshake: the segment's payload, the connection's MSS and its SACKed segments
    // tell a path-MTU black hole (full-size segments retransmitted while nothing, or only
    // later short ones, got through) from plain loss.
    let mut header = header(EventKind::Retransmit, size_of::<Retransmit>(), netns);
    let skb: u64 = field(P, &ctx, l.skbaddr);
    let bytes: Option<u32> = if o.skb_len == KernelOffsets::MISSING {
        None
    } else {
        kread(P, skb + o.skb_len as u64)
    };
    let mss: Option<u32> = if o.tcp_mss_cache == KernelOffsets::MISSING {
        None
    } else {
        kread(P, skaddr + o.tcp_mss_cache as u64)
    };
    if bytes.is_none() {
        header.unread |= unread::LENGTH;
    }
    let sacked_out: Option<u32> = if o.tcp_sacked_out == KernelOffsets::MISSING {
        None
    } else {
        kread(P, skaddr + o.tcp_sacked_out as u64)
    };
    if mss.is_none() {
        header.unread |= unread::MSS;
    }
    if sacked_out.is_none() {
        header.unread |= unread::SACKED_OUT;
    }
    emit(Retransmit {
        header,
        skaddr,
        tuple,
        bytes: bytes.unwrap_or(0),
        mss: mss.unwrap_or(0),
        sacked_out: sacked_out.unwrap_or(0),
        _pad: 0,
    });
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: eBPF programs cannot panic; the verifier rejects any path that would reach here.
    unsafe { core::hint::unreachable_unchecked() }
}

/// GPL-compatible licence, required for bpf_probe_read_kernel and friends.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
