//! conntrace's kernel side: capture facts about TCP connections on the traced ports and hand
//! them to userspace through one ring buffer. No decisions are made here.
//!
//! Record layouts and kernel structure offsets come from userspace (`CONFIG`), which reads them
//! from the running kernel's tracepoint `format` files and BTF.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_stack,
        bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use conntrace_common::{
    ABSENT, AF_INET, AF_INET6, Accept, COMM_LEN, Config, ConnectError, DEFAULT_RING_BYTES,
    DROP_STACK_DEPTH, ErrorReport, EventHeader, EventKind, FLAG_ALL_PORTS, KernelOffsets,
    MAX_PORTS, PacketDrop, RESET_REASON_NONE, Reset, StateChange, SynRetransmit, TCP_FLAGS_UNKNOWN,
    TracepointLayout, Tuple, TupleLayout,
};

const IPPROTO_TCP: u16 = 6;
const TCP_SYN_SENT: i32 = 2;
const TCP_CLOSE: i32 = 7;
const SOCK_STREAM: u16 = 1;
const EINPROGRESS: i64 = 115;

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// Per-CPU count of events that did not fit into `EVENTS`.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Traced ports (host byte order); ignored when `FLAG_ALL_PORTS` is set.
#[map]
static PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_PORTS, 0);

/// `connect()` calls in flight, by pid_tgid, between syscall entry and exit.
#[derive(Clone, Copy)]
struct PendingConnect {
    fd: i64,
    tuple: Tuple,
}

#[map]
static CONNECTS: LruHashMap<u64, PendingConnect> = LruHashMap::with_max_entries(8192, 0);

#[inline(always)]
fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

/// Reads a field of the tracepoint record, or `T::default()` when this kernel lacks it.
#[inline(always)]
fn field<T: Default>(ctx: &TracePointContext, off: u16) -> T {
    if off == ABSENT {
        return T::default();
    }
    // SAFETY: bpf_probe_read of the record; the offset comes from the tracepoint's format file.
    unsafe { ctx.read_at::<T>(off as usize) }.unwrap_or_default()
}

#[inline(always)]
fn kread<T: Default>(addr: u64) -> T {
    if addr == 0 {
        return T::default();
    }
    // SAFETY: bpf_probe_read_kernel tolerates any address and fails instead of faulting.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.unwrap_or_default()
}

/// Reads a `struct sockaddr_in`/`sockaddr_in6` stored in the record at `off`.
#[inline(always)]
fn sockaddr_field(ctx: &TracePointContext, off: u16, addr: &mut [u8; 16]) -> (u16, u16) {
    let family: u16 = field(ctx, off);
    let port = u16::from_be(field::<u16>(ctx, off + 2));
    if family == AF_INET6 {
        *addr = field(ctx, off + 8);
    } else {
        let v4: [u8; 4] = field(ctx, off + 4);
        addr[..4].copy_from_slice(&v4);
    }
    (family, port)
}

#[inline(always)]
fn read_tuple(ctx: &TracePointContext, l: &TupleLayout) -> Tuple {
    let mut t = Tuple::default();
    if l.sockaddr_src != ABSENT {
        let (family, sport) = sockaddr_field(ctx, l.sockaddr_src, &mut t.saddr);
        let (_, dport) = sockaddr_field(ctx, l.sockaddr_dst, &mut t.daddr);
        t.family = family;
        t.sport = sport;
        t.dport = dport;
        return t;
    }
    t.family = field(ctx, l.family);
    t.sport = field(ctx, l.sport);
    t.dport = field(ctx, l.dport);
    if t.family == AF_INET6 {
        t.saddr = field(ctx, l.saddr6);
        t.daddr = field(ctx, l.daddr6);
    } else {
        let s: [u8; 4] = field(ctx, l.saddr4);
        let d: [u8; 4] = field(ctx, l.daddr4);
        t.saddr[..4].copy_from_slice(&s);
        t.daddr[..4].copy_from_slice(&d);
    }
    t
}

#[inline(always)]
fn port_traced(cfg: &Config, a: u16, b: u16) -> bool {
    cfg.flags & FLAG_ALL_PORTS != 0
        // SAFETY: plain hash lookups; the values are never held across calls.
        || unsafe { PORTS.get(&a).is_some() || PORTS.get(&b).is_some() }
}

#[inline(always)]
fn netns_of_sock(o: &KernelOffsets, sk: u64) -> u32 {
    if sk == 0 || o.sock_net == KernelOffsets::MISSING || o.net_inum == KernelOffsets::MISSING {
        return 0;
    }
    let net: u64 = kread(sk + o.sock_net as u64);
    kread(net + o.net_inum as u64)
}

#[inline(always)]
fn netns_of_skb(o: &KernelOffsets, skb: u64) -> u32 {
    if skb == 0 || o.skb_dev == KernelOffsets::MISSING || o.netdev_net == KernelOffsets::MISSING {
        return 0;
    }
    let dev: u64 = kread(skb + o.skb_dev as u64);
    if dev == 0 {
        return 0;
    }
    let net: u64 = kread(dev + o.netdev_net as u64);
    kread(net + o.net_inum as u64)
}

/// TCP flags byte of the packet in `skb` (the one a socket-less reset answers).
#[inline(always)]
fn answered_tcp_flags(o: &KernelOffsets, skb: u64) -> u32 {
    if skb == 0
        || o.skb_head == KernelOffsets::MISSING
        || o.skb_transport_header == KernelOffsets::MISSING
    {
        return TCP_FLAGS_UNKNOWN;
    }
    let head: u64 = kread(skb + o.skb_head as u64);
    let transport: u16 = kread(skb + o.skb_transport_header as u64);
    if head == 0 || transport == u16::MAX {
        return TCP_FLAGS_UNKNOWN;
    }
    // SAFETY: bpf_probe_read_kernel fails instead of faulting.
    match unsafe { bpf_probe_read_kernel((head + transport as u64 + 13) as *const u8) } {
        Ok(flags) => flags as u32,
        Err(_) => TCP_FLAGS_UNKNOWN,
    }
}

/// The `struct sock *` behind file descriptor `fd` of the current task, with `socket.type`.
#[inline(always)]
fn sock_of_fd(o: &KernelOffsets, fd: i64) -> (u64, u16) {
    if fd < 0 || o.task_files == KernelOffsets::MISSING || o.socket_sk == KernelOffsets::MISSING {
        return (0, 0);
    }
    // SAFETY: returns the current task pointer; only read through bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = kread(task + o.task_files as u64);
    let fdt: u64 = kread(files + o.files_fdt as u64);
    let max_fds: u32 = kread(fdt + o.fdtable_max_fds as u64);
    if fdt == 0 || fd as u64 >= max_fds as u64 {
        return (0, 0);
    }
    let fd_array: u64 = kread(fdt + o.fdtable_fd as u64);
    let file: u64 = kread(fd_array + (fd as u64) * 8);
    let socket: u64 = kread(file + o.file_private_data as u64);
    if socket == 0 {
        return (0, 0);
    }
    let kind: u16 = kread(socket + o.socket_type as u64);
    (kread(socket + o.socket_sk as u64), kind)
}

#[inline(always)]
fn header(kind: EventKind, size: usize, netns: u32) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    EventHeader {
        kind: kind as u32,
        size: size as u32,
        // SAFETY: reads the monotonic clock.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        netns,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]),
    }
}

/// Writes `event` into the ring buffer, or counts it as lost.
#[inline(always)]
fn emit<T: 'static>(event: T) {
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(event);
            entry.submit(0);
        }
        None => count_lost(),
    }
}

/// Counts an event the ring buffer had no room for.
#[inline(always)]
fn count_lost() {
    if let Some(lost) = LOST.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; tracepoint programs do not nest on one CPU for this map.
        unsafe { *lost += 1 };
    }
}

#[inline(always)]
fn is_tcp(ctx: &TracePointContext, l: &TracepointLayout) -> bool {
    l.protocol == ABSENT || field::<u16>(ctx, l.protocol) == IPPROTO_TCP
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let Some(cfg) = config() else { return 0 };
    let l = &cfg.set_state;
    if !is_tcp(&ctx, l) {
        return 0;
    }
    let tuple = read_tuple(&ctx, &l.tuple);
    if !port_traced(cfg, tuple.sport, tuple.dport) {
        return 0;
    }
    let skaddr: u64 = field(&ctx, l.skaddr);
    let newstate: i32 = field(&ctx, l.newstate);
    let o = &cfg.offsets;
    let mut sk_err: i32 = 0;
    if newstate == TCP_CLOSE && o.sock_err != KernelOffsets::MISSING {
        sk_err = kread(skaddr + o.sock_err as u64);
        if sk_err == 0 && o.sock_err_soft != KernelOffsets::MISSING {
            sk_err = kread(skaddr + o.sock_err_soft as u64);
        }
    }
    emit(StateChange {
        header: header(
            EventKind::StateChange,
            size_of::<StateChange>(),
            netns_of_sock(&cfg.offsets, skaddr),
        ),
        skaddr,
        tuple,
        oldstate: field(&ctx, l.oldstate),
        newstate,
        sk_err,
        _pad: 0,
    });
    0
}

#[tracepoint]
pub fn inet_sk_error_report(ctx: TracePointContext) -> u32 {
    let Some(cfg) = config() else { return 0 };
    let l = &cfg.error_report;
    if !is_tcp(&ctx, l) {
        return 0;
    }
    let tuple = read_tuple(&ctx, &l.tuple);
    if !port_traced(cfg, tuple.sport, tuple.dport) {
        return 0;
    }
    emit(ErrorReport {
        header: header(EventKind::ErrorReport, size_of::<ErrorReport>(), 0),
        tuple,
        error: field(&ctx, l.error),
        _pad: 0,
    });
    0
}

#[inline(always)]
fn reset(ctx: &TracePointContext, cfg: &Config, l: &TracepointLayout, kind: EventKind) {
    let tuple = read_tuple(ctx, &l.tuple);
    if !port_traced(cfg, tuple.sport, tuple.dport) {
        return;
    }
    let skaddr: u64 = field(ctx, l.skaddr);
    let netns = if skaddr != 0 {
        netns_of_sock(&cfg.offsets, skaddr)
    } else {
        netns_of_skb(&cfg.offsets, field(ctx, l.skbaddr))
    };
    // Without a socket, what was answered (a SYN, or a late segment) tells refusal from noise.
    let tcp_flags = if skaddr == 0 {
        answered_tcp_flags(&cfg.offsets, field(ctx, l.skbaddr))
    } else {
        TCP_FLAGS_UNKNOWN
    };
    emit(Reset {
        header: header(kind, size_of::<Reset>(), netns),
        skaddr,
        tuple,
        state: if l.state == ABSENT {
            -1
        } else {
            field(ctx, l.state)
        },
        reason: if l.reason == ABSENT {
            RESET_REASON_NONE
        } else {
            field(ctx, l.reason)
        },
        tcp_flags,
        _pad: 0,
    });
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    if let Some(cfg) = config() {
        reset(&ctx, cfg, &cfg.receive_reset, EventKind::ReceiveReset);
    }
    0
}

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    if let Some(cfg) = config() {
        reset(&ctx, cfg, &cfg.send_reset, EventKind::SendReset);
    }
    0
}

#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let Some(cfg) = config() else { return 0 };
    let l = &cfg.retransmit;
    let state: i32 = field(&ctx, l.state);
    if state != TCP_SYN_SENT {
        return 0;
    }
    let tuple = read_tuple(&ctx, &l.tuple);
    if !port_traced(cfg, tuple.sport, tuple.dport) {
        return 0;
    }
    let skaddr: u64 = field(&ctx, l.skaddr);
    emit(SynRetransmit {
        header: header(
            EventKind::SynRetransmit,
            size_of::<SynRetransmit>(),
            netns_of_sock(&cfg.offsets, skaddr),
        ),
        skaddr,
        tuple,
        state,
        _pad: 0,
    });
    0
}

#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let Some(cfg) = config() else { return 0 };
    let s = &cfg.syscalls;
    let addr: u64 = field(&ctx, s.connect_addr);
    if addr == 0 {
        return 0;
    }
    let mut tuple = Tuple::default();
    // SAFETY: user memory read through bpf_probe_read_user, which fails instead of faulting.
    let family = unsafe { bpf_probe_read_user(addr as *const u16) }.unwrap_or(0);
    let port = unsafe { bpf_probe_read_user((addr + 2) as *const u16) }.unwrap_or(0);
    if family == AF_INET {
        let a: [u8; 4] =
            unsafe { bpf_probe_read_user((addr + 4) as *const [u8; 4]) }.unwrap_or_default();
        tuple.daddr[..4].copy_from_slice(&a);
    } else if family == AF_INET6 {
        tuple.daddr =
            unsafe { bpf_probe_read_user((addr + 8) as *const [u8; 16]) }.unwrap_or_default();
    } else {
        return 0;
    }
    tuple.family = family;
    tuple.dport = u16::from_be(port);
    if !port_traced(cfg, tuple.dport, tuple.dport) {
        return 0;
    }
    let fd: u64 = field(&ctx, s.connect_fd);
    let pending = PendingConnect {
        fd: fd as i64,
        tuple,
    };
    // A full LRU map evicts the oldest entry; nothing to do on error.
    let _ignored = CONNECTS.insert(&bpf_get_current_pid_tgid(), &pending, 0);
    0
}

#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let Some(cfg) = config() else { return 0 };
    let key = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let Some(pending) = (unsafe { CONNECTS.get(&key) }).copied() else {
        return 0;
    };
    let _ignored = CONNECTS.remove(&key);
    let ret: i64 = field(&ctx, cfg.syscalls.exit_ret);
    if ret >= 0 || ret == -EINPROGRESS {
        return 0;
    }
    let (skaddr, kind) = sock_of_fd(&cfg.offsets, pending.fd);
    if skaddr != 0 && kind != SOCK_STREAM {
        return 0;
    }
    emit(ConnectError {
        header: header(
            EventKind::ConnectError,
            size_of::<ConnectError>(),
            netns_of_sock(&cfg.offsets, skaddr),
        ),
        skaddr,
        tuple: pending.tuple,
        ret: ret as i32,
        _pad: 0,
    });
    0
}

#[inline(always)]
fn accepted(ctx: &TracePointContext) -> u32 {
    let Some(cfg) = config() else { return 0 };
    let fd: i64 = field(ctx, cfg.syscalls.exit_ret);
    if fd < 0 {
        return 0;
    }
    let o = &cfg.offsets;
    let (skaddr, kind) = sock_of_fd(o, fd);
    if skaddr == 0 || kind != SOCK_STREAM {
        return 0;
    }
    let lport: u16 = kread(skaddr + o.sock_num as u64);
    let rport = u16::from_be(kread(skaddr + o.sock_dport as u64));
    if !port_traced(cfg, lport, rport) {
        return 0;
    }
    emit(Accept {
        header: header(
            EventKind::Accept,
            size_of::<Accept>(),
            netns_of_sock(o, skaddr),
        ),
        skaddr,
        fd,
    });
    0
}

#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    accepted(&ctx)
}

#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    accepted(&ctx)
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP_U8: u8 = 6;

/// Parses the IPv4/IPv6 and TCP headers of `skb` from its own bytes: on the receive path the
/// socket is often unknown, and a SYN dropped before socket lookup must still be seen.
/// Returns the packet's tuple (s = source) and its TCP flags.
#[inline(always)]
fn packet_tuple(o: &KernelOffsets, skb: u64, proto: u16) -> Option<(Tuple, u32)> {
    if o.skb_head == KernelOffsets::MISSING || o.skb_network_header == KernelOffsets::MISSING {
        return None;
    }
    let head: u64 = kread(skb + o.skb_head as u64);
    let nh: u16 = kread(skb + o.skb_network_header as u64);
    if head == 0 || nh == u16::MAX {
        return None;
    }
    let ip = head + nh as u64;
    let mut t = Tuple::default();
    let th = if proto == ETH_P_IP {
        let ver_ihl: u8 = kread(ip);
        if ver_ihl >> 4 != 4 || kread::<u8>(ip + 9) != IPPROTO_TCP_U8 {
            return None;
        }
        let s: [u8; 4] = kread(ip + 12);
        let d: [u8; 4] = kread(ip + 16);
        t.saddr[..4].copy_from_slice(&s);
        t.daddr[..4].copy_from_slice(&d);
        t.family = AF_INET;
        ip + ((ver_ihl & 0x0f) as u64) * 4
    } else {
        // Extension headers are not followed: a TCP segment behind one is not seen.
        if kread::<u8>(ip) >> 4 != 6 || kread::<u8>(ip + 6) != IPPROTO_TCP_U8 {
            return None;
        }
        t.saddr = kread(ip + 8);
        t.daddr = kread(ip + 24);
        t.family = AF_INET6;
        ip + 40
    };
    t.sport = u16::from_be(kread(th));
    t.dport = u16::from_be(kread(th + 2));
    Some((t, kread::<u8>(th + 13) as u32))
}

#[tracepoint]
pub fn kfree_skb(ctx: TracePointContext) -> u32 {
    let Some(cfg) = config() else { return 0 };
    let l = &cfg.kfree_skb;
    let proto: u16 = field(&ctx, l.protocol);
    if proto != ETH_P_IP && proto != ETH_P_IPV6 {
        return 0;
    }
    let o = &cfg.offsets;
    let skb: u64 = field(&ctx, l.skbaddr);
    let Some((tuple, tcp_flags)) = packet_tuple(o, skb, proto) else {
        return 0;
    };
    if !port_traced(cfg, tuple.sport, tuple.dport) {
        return 0;
    }
    let sk: u64 = if o.skb_sk == KernelOffsets::MISSING {
        0
    } else {
        kread(skb + o.skb_sk as u64)
    };
    let rx_sk: u64 = field(&ctx, l.rx_sk);
    // The TCP receive path reuses skb->dev as scratch space: fall back to the sockets.
    let mut netns = netns_of_skb(o, skb);
    if netns == 0 {
        netns = netns_of_sock(o, sk);
    }
    if netns == 0 {
        netns = netns_of_sock(o, rx_sk);
    }
    let reason: u32 = field(&ctx, l.reason);
    let drop = PacketDrop {
        header: header(EventKind::Drop, size_of::<PacketDrop>(), netns),
        sk,
        rx_sk,
        location: field(&ctx, l.location),
        tuple,
        reason,
        tcp_flags,
        stack: [0; DROP_STACK_DEPTH],
    };
    // Written in place: the record with its stack is too large for the eBPF stack.
    let Some(mut entry) = EVENTS.reserve::<PacketDrop>(0) else {
        count_lost();
        return 0;
    };
    let slot = entry.as_mut_ptr();
    // SAFETY: `slot` points to the reserved, exclusively owned ring-buffer record.
    unsafe { slot.write(drop) };
    if reason == cfg.stack_drop_reason {
        // SAFETY: the helper writes at most the given size into the record's own stack array;
        // on failure it leaves zeros, which userspace reads as "no stack".
        unsafe {
            bpf_get_stack(
                ctx.as_ptr(),
                (*slot).stack.as_mut_ptr().cast(),
                (DROP_STACK_DEPTH * size_of::<u64>()) as u32,
                0,
            )
        };
    }
    entry.submit(0);
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
