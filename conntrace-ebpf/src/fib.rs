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

use aya_ebpf::{
    helpers::bpf_get_current_task,
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use conntrace_common::{
    AF_INET, AF_INET6, Config, EventKind, FibLayout, FlowOffsets, KernelOffsets, RouteError,
    programs,
};

use crate::{
    IPPROTO_TCP, bytes_field, config, emit, field, header, init_tuple, kread, kread_into,
    netns_of_net, port_traced, v4_part,
};

/// `iif` of an output route lookup (`LOOPBACK_IFINDEX`).
const LOOPBACK_IFINDEX: i32 = 1;
/// `RT_TABLE_LOCAL`.
const TABLE_LOCAL: u32 = 255;
const EAGAIN: i32 = 11;
const EACCES: i32 = 13;
const EINVAL: i32 = 22;
const EHOSTUNREACH: i32 = 113;

#[tracepoint]
pub fn fib_table_lookup(ctx: TracePointContext) -> u32 {
    const P: u32 = programs::FIB_TABLE_LOOKUP;
    if let Some(cfg) = config() {
        let l = &cfg.fib;
        let err: i32 = field(P, &ctx, l.err);
        if err != 0 {
            route_lookup(
                P,
                cfg,
                AF_INET,
                err,
                &Record {
                    prog: P,
                    ctx: &ctx,
                    l,
                },
            );
        }
    }
    0
}

#[tracepoint]
pub fn fib6_table_lookup(ctx: TracePointContext) -> u32 {
    const P: u32 = programs::FIB6_TABLE_LOOKUP;
    if let Some(cfg) = config() {
        let l = &cfg.fib6;
        let err: i32 = field(P, &ctx, l.err);
        if err != 0 {
            route_lookup(
                P,
                cfg,
                AF_INET6,
                err,
                &Record {
                    prog: P,
                    ctx: &ctx,
                    l,
                },
            );
        }
    }
    0
}

/// `tp_btf/fib_table_lookup(u32 tb_id, const struct flowi4 *flp, const struct fib_nh_common
/// *nhc, int err)`: the kernel builds no record, so a lookup that succeeded (nearly all of
/// them) costs one compare.
#[btf_tracepoint(function = "fib_table_lookup")]
pub fn tp_btf_fib_table_lookup(ctx: BtfTracePointContext) -> u32 {
    const P: u32 = programs::TP_BTF_FIB_TABLE_LOOKUP;
    let err: i32 = ctx.arg(3);
    if err == 0 {
        return 0;
    }
    if let Some(cfg) = config() {
        let flow = Flow {
            prog: P,
            at: ctx.arg::<u64>(1),
            o: &cfg.flow4,
            table: ctx.arg(0),
        };
        route_lookup(P, cfg, AF_INET, err, &flow);
    }
    0
}

/// `tp_btf/fib6_table_lookup(const struct net *net, const struct fib6_result *res, struct
/// fib6_table *table, const struct flowi6 *flp)`: the answer is the result's route type,
/// turned into the error the classic record carries (`ip6_rt_type_to_error`).
#[btf_tracepoint(function = "fib6_table_lookup")]
pub fn tp_btf_fib6_table_lookup(ctx: BtfTracePointContext) -> u32 {
    const P: u32 = programs::TP_BTF_FIB6_TABLE_LOOKUP;
    let Some(cfg) = config() else { return 0 };
    let res: u64 = ctx.arg(1);
    let Some(fib6_type) = kread::<u8>(P, res + u64::from(cfg.fib6_type)) else {
        return 0;
    };
    let err = match fib6_type {
        RTN_BLACKHOLE | RTN_NAT | RTN_XRESOLVE => -EINVAL,
        RTN_UNREACHABLE => -EHOSTUNREACH,
        RTN_PROHIBIT => -EACCES,
        RTN_THROW => -EAGAIN,
        _ => return 0,
    };
    let table_at: u64 = ctx.arg(2);
    let table = if table_at == 0 {
        0
    } else {
        kread::<u32>(P, table_at + u64::from(cfg.fib6_table_id)).unwrap_or(0)
    };
    let flow = Flow {
        prog: P,
        at: ctx.arg::<u64>(3),
        o: &cfg.flow6,
        table,
    };
    route_lookup(P, cfg, AF_INET6, err, &flow);
    0
}

/// `RTN_*` route types that answer a lookup with an error.
const RTN_BLACKHOLE: u8 = 6;
const RTN_UNREACHABLE: u8 = 7;
const RTN_PROHIBIT: u8 = 8;
const RTN_THROW: u8 = 9;
const RTN_NAT: u8 = 10;
const RTN_XRESOLVE: u8 = 11;

/// What a failed route lookup said about its flow, from the classic record or the flow itself.
trait Lookup {
    /// `(iif, proto, table)`, or `None` when unreadable.
    fn kind(&self) -> Option<(i32, u8, u32)>;
    /// `(sport, dport)`, host order.
    fn ports(&self) -> Option<(u16, u16)>;
    /// Writes the source (`true`) or destination address into `dst` in place (IPv4 in the
    /// first 4 bytes; read by the helper, so the verifier tracks no byte of it); false when
    /// unreadable.
    fn addr(&self, family: u16, source: bool, dst: &mut [u8; 16]) -> bool;
}

/// The classic tracepoint's record.
struct Record<'a> {
    prog: u32,
    ctx: &'a TracePointContext,
    l: &'a FibLayout,
}

impl Lookup for Record<'_> {
    fn kind(&self) -> Option<(i32, u8, u32)> {
        let (p, ctx, l) = (self.prog, self.ctx, self.l);
        Some((
            field(p, ctx, l.iif),
            field(p, ctx, l.proto),
            field(p, ctx, l.tb_id),
        ))
    }

    fn ports(&self) -> Option<(u16, u16)> {
        let (p, ctx, l) = (self.prog, self.ctx, self.l);
        Some((field(p, ctx, l.sport), field(p, ctx, l.dport)))
    }

    fn addr(&self, family: u16, source: bool, dst: &mut [u8; 16]) -> bool {
        let (p, ctx, l) = (self.prog, self.ctx, self.l);
        let at = if source { l.src } else { l.dst };
        if family == AF_INET6 {
            bytes_field(p, ctx, at, dst);
        } else {
            bytes_field(p, ctx, at, v4_part(dst));
        }
        true
    }
}

/// A `struct flowi4` or `struct flowi6` at `at`, read through BTF offsets.
struct Flow<'a> {
    prog: u32,
    at: u64,
    o: &'a FlowOffsets,
    table: u32,
}

impl Lookup for Flow<'_> {
    fn kind(&self) -> Option<(i32, u8, u32)> {
        let (p, o) = (self.prog, self.o);
        Some((
            kread(p, self.at + u64::from(o.iif))?,
            kread(p, self.at + u64::from(o.proto))?,
            self.table,
        ))
    }

    fn ports(&self) -> Option<(u16, u16)> {
        // `dport` first, then `sport`, both network order.
        let pair: [u16; 2] = kread(self.prog, self.at + u64::from(self.o.ports))?;
        Some((u16::from_be(pair[1]), u16::from_be(pair[0])))
    }

    fn addr(&self, family: u16, source: bool, dst: &mut [u8; 16]) -> bool {
        let at = self.at + u64::from(if source { self.o.saddr } else { self.o.daddr });
        if family == AF_INET6 {
            kread_into(self.prog, at, dst)
        } else {
            kread_into(self.prog, at, v4_part(dst))
        }
    }
}

/// Reports one table's failed answer (`err`, negative) to a route lookup of `connect()` on a
/// traced port.
#[inline(always)]
fn route_lookup(prog: u32, cfg: &Config, family: u16, err: i32, lookup: &impl Lookup) {
    let Some((iif, proto, table)) = lookup.kind() else {
        return;
    };
    if iif != LOOPBACK_IFINDEX || proto != IPPROTO_TCP as u8 {
        return;
    }
    let local_miss = err == -EAGAIN || (family == AF_INET6 && err == -EHOSTUNREACH);
    if table == TABLE_LOCAL && local_miss {
        return;
    }
    let Some((sport, dport)) = lookup.ports() else {
        return;
    };
    let mut slot = core::mem::MaybeUninit::uninit();
    let tuple = init_tuple(&mut slot, family, sport, dport);
    if !lookup.addr(family, true, &mut tuple.saddr) {
        return;
    }
    if sport != 0 && tuple.saddr != [0; 16] {
        // Not connect()'s lookup: a connected socket, a SYN-ACK or a reset.
        return;
    }
    if !port_traced(cfg, sport, dport) || !lookup.addr(family, false, &mut tuple.daddr) {
        return;
    }
    emit(RouteError {
        header: header(
            EventKind::RouteError,
            size_of::<RouteError>(),
            netns_of_current_task(prog, &cfg.offsets),
        ),
        tuple: *tuple,
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
