//! `connect()`'s route lookups that fail, without the syscall tracepoints: quiet mode on
//! kernels where fexit does not attach (this project's host).
//!
//! `tcp_v4_connect` asks `ip_route_connect` for a route before the socket changes state, and
//! `tcp_v6_connect` asks `ip6_dst_lookup_flow`; when no table gives one, `connect()` fails
//! (ENETUNREACH, EHOSTUNREACH, EACCES, EINVAL) and no packet and no state change ever shows
//! it. `fib:fib_table_lookup` and `fib6:fib6_table_lookup` fire once per routing table the
//! lookup tries, with that table's answer (`err`). They fire for every route lookup of the
//! namespace (forwarded packets, replies, UDP, ...), so each program leaves at its first
//! compare unless the lookup failed, then keeps only:
//!
//! * TCP output lookups: `iif == LOOPBACK_IFINDEX`, which `ip_route_output_key_hash` and
//!   `ip6_route_output_flags` (through `flowi*_init_output`) set for locally generated flows;
//! * `connect()`'s own: its lookups have no source address yet (`src` unspecified) or no
//!   local port yet (`sport == 0`); a connected socket's (retransmits after a route went
//!   away), a SYN-ACK's or a reset's always have both, and run in softirq context under an
//!   unrelated task;
//! * not a miss in the local table (255): with custom rules (IPv4), and always for IPv6, every
//!   lookup tries the local table first and misses it (`-EAGAIN`; IPv6 `-EHOSTUNREACH`, its
//!   "no route" entry being an unreachable route), even for a connect that then succeeds;
//! * a traced port.
//!
//! Which lookups make up one `connect()` and what it returned is userspace's to work out
//! (`engine::rules::connect`).

use aya_ebpf::{helpers::bpf_get_current_task, macros::tracepoint, programs::TracePointContext};
use conntrace_common::{
    AF_INET, AF_INET6, Config, EventKind, FibLayout, KernelOffsets, RouteError, Tuple, programs,
};

use crate::{IPPROTO_TCP, config, emit, field, header, kread, netns_of_net, port_traced};

/// `iif` of an output route lookup (`LOOPBACK_IFINDEX`).
const LOOPBACK_IFINDEX: i32 = 1;
/// `RT_TABLE_LOCAL`.
const TABLE_LOCAL: u32 = 255;
const EAGAIN: i32 = 11;
const EHOSTUNREACH: i32 = 113;

#[tracepoint]
pub fn fib_table_lookup(ctx: TracePointContext) -> u32 {
    if let Some(cfg) = config() {
        route_lookup(programs::FIB_TABLE_LOOKUP, &ctx, cfg, &cfg.fib, AF_INET);
    }
    0
}

#[tracepoint]
pub fn fib6_table_lookup(ctx: TracePointContext) -> u32 {
    if let Some(cfg) = config() {
        route_lookup(programs::FIB6_TABLE_LOOKUP, &ctx, cfg, &cfg.fib6, AF_INET6);
    }
    0
}

/// Reports one table's failed answer to a route lookup of `connect()` on a traced port.
#[inline(always)]
fn route_lookup(prog: u32, ctx: &TracePointContext, cfg: &Config, l: &FibLayout, family: u16) {
    let err: i32 = field(prog, ctx, l.err);
    if err == 0 {
        return;
    }
    if field::<i32>(prog, ctx, l.iif) != LOOPBACK_IFINDEX
        || field::<u8>(prog, ctx, l.proto) != IPPROTO_TCP as u8
    {
        return;
    }
    let table: u32 = field(prog, ctx, l.tb_id);
    let local_miss = err == -EAGAIN || (family == AF_INET6 && err == -EHOSTUNREACH);
    if table == TABLE_LOCAL && local_miss {
        return;
    }
    let mut tuple = Tuple {
        family,
        sport: field(prog, ctx, l.sport),
        dport: field(prog, ctx, l.dport),
        ..Tuple::default()
    };
    if family == AF_INET6 {
        tuple.saddr = field(prog, ctx, l.src);
    } else {
        let s: [u8; 4] = field(prog, ctx, l.src);
        tuple.saddr[..4].copy_from_slice(&s);
    }
    if tuple.sport != 0 && tuple.saddr != [0; 16] {
        // Not connect()'s lookup: a connected socket, a SYN-ACK or a reset.
        return;
    }
    if !port_traced(cfg, tuple.sport, tuple.dport) {
        return;
    }
    if family == AF_INET6 {
        tuple.daddr = field(prog, ctx, l.dst);
    } else {
        let d: [u8; 4] = field(prog, ctx, l.dst);
        tuple.daddr[..4].copy_from_slice(&d);
    }
    emit(RouteError {
        header: header(
            EventKind::RouteError,
            size_of::<RouteError>(),
            netns_of_current_task(prog, &cfg.offsets),
        ),
        tuple,
        err,
        table,
    });
}

/// The network namespace of the current task (`task->nsproxy->net_ns`): the tracepoint names
/// no socket. `connect()` looks its route up in the socket's namespace, which is the task's
/// unless the task changed namespace after creating the socket.
#[inline(always)]
fn netns_of_current_task(prog: u32, o: &KernelOffsets) -> Option<u32> {
    if o.task_nsproxy == KernelOffsets::MISSING || o.nsproxy_net_ns == KernelOffsets::MISSING {
        return None;
    }
    // SAFETY: returns the current task pointer; only read through bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() };
    let nsproxy: u64 = kread(prog, task + o.task_nsproxy as u64)?;
    netns_of_net(prog, o, kread(prog, nsproxy + o.nsproxy_net_ns as u64)?)
}
