//! fentry/fexit programs: where a kernel allows them (not on every kernel: the host kernel
//! this project is developed on refuses them), they reach the functions the tracepoints only
//! see from afar. Each produces the same record as the tracepoint path it replaces, so the
//! engine cannot tell which path a fact came from; the attach table picks the path.
//!
//! * `inet_stream_connect` (fexit): `connect()` on a TCP socket and its result, without the
//!   syscall tracepoints (which put every system call of every process on the slow path).
//! * `__inet_accept` (fentry, 6.8+): the accepted socket itself, without walking the fd table.
//! * `cookie_v4_init_sequence` / `cookie_v6_init_sequence` (fentry): a SYN answered with a
//!   cookie, seen at the decision instead of for every packet a device sends, and also when
//!   the SYN-ACK never reaches a device (an unresolvable, e.g. spoofed, peer).
//! * `tcp_rcv_established` / `tcp_sendmsg` (fexit): first data on kernels before the
//!   `sock:sk_data_ready` tracepoint (6.6).

use aya_ebpf::{
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};
use conntrace_common::{
    AF_INET, AF_INET6, ConnectError, DATA_IN, DATA_OUT, EventKind, KernelOffsets, Tuple, programs,
};

use crate::{
    config,
    data::{cookie_sent, first},
    drops::{ETH_P_IP, ETH_P_IPV6, packet},
    emit, header, kread, netns_of_skb_route, netns_of_sock, new_tuple, port_traced,
    syscalls::{EINPROGRESS, SOCK_STREAM, report_accept},
};

/// The traced function's `int` result, which an fexit context holds right after the
/// function's `nargs` arguments. Not `bpf_get_func_ret`: with it, on Debian's 6.1, the
/// failure branch never ran and no connect() error was reported (measured; aya documents
/// verifier precision-tracking trouble with that helper on 5.10-6.7).
#[inline(always)]
fn int_ret(ctx: &FExitContext, nargs: usize) -> i64 {
    i64::from(ctx.arg::<u64>(nargs) as u32 as i32)
}

/// `int inet_stream_connect(struct socket *sock, struct sockaddr *uaddr, int addr_len,
/// int flags)`: the same facts as `sys_exit_connect`, for TCP only.
#[fexit(function = "inet_stream_connect")]
pub fn fexit_inet_stream_connect(ctx: FExitContext) -> u32 {
    const P: u32 = programs::FEXIT_INET_STREAM_CONNECT;
    let ret = int_ret(&ctx, 4);
    if ret >= 0 || ret == -EINPROGRESS {
        return 0;
    }
    let Some(cfg) = config() else { return 0 };
    let o = &cfg.offsets;
    let sock: u64 = ctx.arg(0);
    let uaddr: u64 = ctx.arg(1);
    if o.socket_sk == KernelOffsets::MISSING || sock == 0 || uaddr == 0 {
        return 0;
    }
    if kread::<u16>(P, sock + o.socket_type as u64) != Some(SOCK_STREAM) {
        return 0;
    }
    let mut tuple = new_tuple(0, 0, 0);
    let Some(family) = kread::<u16>(P, uaddr) else {
        return 0;
    };
    if family == AF_INET {
        let Some(a) = kread::<[u8; 4]>(P, uaddr + 4) else {
            return 0;
        };
        tuple.daddr[..4].copy_from_slice(&a);
    } else if family == AF_INET6 {
        let Some(a) = kread(P, uaddr + 8) else {
            return 0;
        };
        tuple.daddr = a;
    } else {
        return 0;
    }
    tuple.family = family;
    let Some(port) = kread::<u16>(P, uaddr + 2) else {
        return 0;
    };
    tuple.dport = u16::from_be(port);
    if !port_traced(cfg, tuple.dport, tuple.dport) {
        return 0;
    }
    let skaddr: u64 = kread(P, sock + o.socket_sk as u64).unwrap_or(0);
    emit(ConnectError {
        header: header(
            EventKind::ConnectError,
            size_of::<ConnectError>(),
            netns_of_sock(P, o, skaddr),
        ),
        skaddr,
        tuple,
        ret: ret as i32,
        _pad: 0,
    });
    0
}

/// `void __inet_accept(struct socket *sock, struct socket *newsock, struct sock *newsk)`: the
/// accepted socket joins its file. Not `inet_csk_accept`: an fexit there never fires for an
/// `accept()` already waiting when conntrace attached (a trampoline only catches calls that
/// enter after it), which is every idle server thread; `__inet_accept` is entered after the
/// wait.
#[fentry(function = "__inet_accept")]
pub fn fentry_inet_accept(ctx: FEntryContext) -> u32 {
    let skaddr: u64 = ctx.arg(2);
    if skaddr == 0 {
        return 0;
    }
    if let Some(cfg) = config() {
        if crate::quiet::enabled(cfg) && crate::quiet::accepted(skaddr) {
            return 0;
        }
        report_accept(programs::FENTRY_INET_ACCEPT, cfg, skaddr);
    }
    0
}

/// A SYN answered with a cookie: the record a cookie SYN-ACK gives on the tracepoint path,
/// oriented as the reply (source = this host).
#[inline(always)]
fn cookie(prog: u32, skb: u64, proto: u16) {
    let Some(cfg) = config() else { return };
    let o = &cfg.offsets;
    let Some(pkt) = packet(prog, o, skb, proto) else {
        return;
    };
    let syn = pkt.tuple;
    if !port_traced(cfg, syn.sport, syn.dport) {
        return;
    }
    let tuple = Tuple {
        family: syn.family,
        sport: syn.dport,
        dport: syn.sport,
        saddr: syn.daddr,
        daddr: syn.saddr,
        ..syn
    };
    // Not skb->dev: TCP has reused it as scratch space by now.
    cookie_sent(cfg, tuple, netns_of_skb_route(prog, o, skb));
}

/// `u32 cookie_v4_init_sequence(const struct sk_buff *skb, __u16 *mssp)`.
#[fentry(function = "cookie_v4_init_sequence")]
pub fn fentry_cookie_v4_init_sequence(ctx: FEntryContext) -> u32 {
    cookie(
        programs::FENTRY_COOKIE_V4_INIT_SEQUENCE,
        ctx.arg(0),
        ETH_P_IP,
    );
    0
}

/// `u32 cookie_v6_init_sequence(const struct sk_buff *skb, __u16 *mssp)`.
#[fentry(function = "cookie_v6_init_sequence")]
pub fn fentry_cookie_v6_init_sequence(ctx: FEntryContext) -> u32 {
    cookie(
        programs::FENTRY_COOKIE_V6_INIT_SEQUENCE,
        ctx.arg(0),
        ETH_P_IPV6,
    );
    0
}

/// `void tcp_rcv_established(struct sock *sk, struct sk_buff *skb)`: every segment of an
/// established connection; the first one that brought data makes `bytes_received` non-zero.
#[fexit(function = "tcp_rcv_established")]
pub fn fexit_tcp_rcv_established(ctx: FExitContext) -> u32 {
    const P: u32 = programs::FEXIT_TCP_RCV_ESTABLISHED;
    let Some(cfg) = config() else { return 0 };
    let o = &cfg.offsets;
    if o.tcp_bytes_received == KernelOffsets::MISSING {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    if kread::<u64>(P, sk + o.tcp_bytes_received as u64).is_some_and(|n| n > 0) {
        first(P, sk, DATA_IN, 0);
    }
    0
}

/// `int tcp_sendmsg(struct sock *sk, struct msghdr *msg, size_t size)`.
#[fexit(function = "tcp_sendmsg")]
pub fn fexit_tcp_sendmsg(ctx: FExitContext) -> u32 {
    let ret = int_ret(&ctx, 3);
    if ret > 0 {
        first(
            programs::FEXIT_TCP_SENDMSG,
            ctx.arg(0),
            DATA_OUT,
            ret as i32,
        );
    }
    0
}
