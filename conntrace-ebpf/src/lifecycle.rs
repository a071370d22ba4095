//! `sock:inet_sock_set_state`: where connections start, complete their handshake and end.
//! Two entry points share one core ([`changed`]): the classic tracepoint, which reads the
//! record the kernel builds for it, and the BTF-typed one (`tp_btf`), which the kernel calls
//! with the socket itself, without building a record: the cheaper of the two per run, and
//! this program runs about ten times per connection on every port.

use aya_ebpf::{
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use conntrace_common::{
    ABSENT, AF_INET6, Config, EventKind, KernelOffsets, StateChange, Tuple, programs, route_cache,
    sock_common, tcp::state, unread,
};

use crate::{
    IPPROTO_TCP, Record, bytes_field, config, data, emit, header, init_tuple, kread_into,
    netns_of_sock, port_traced, quiet,
    sock::{Origin, Probed, SockRead, Typed, netns_of_typed_net, typed_sock_ports},
    v4_part,
};

/// States in the middle of an orderly close: their start (FIN_WAIT1, CLOSE_WAIT) and their
/// end (CLOSE, with the state it left) are all userspace needs. Two events fewer per
/// connection.
#[inline(always)]
fn mid_close(newstate: i32) -> bool {
    matches!(
        newstate,
        state::FIN_WAIT2 | state::TIME_WAIT | state::LAST_ACK | state::CLOSING
    )
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    const P: u32 = programs::INET_SOCK_SET_STATE;
    let Some(cfg) = config() else { return 0 };
    let l = &cfg.set_state;
    let Some(rec) = Record::copy(P, &ctx) else {
        return 0;
    };
    if l.protocol != ABSENT && rec.get::<u16>(l.protocol) != IPPROTO_TCP {
        return 0;
    }
    let newstate: i32 = rec.get(l.newstate);
    if mid_close(newstate) {
        return 0;
    }
    let t = &l.tuple;
    let (sport, dport): (u16, u16) = (rec.get(t.sport), rec.get(t.dport));
    if !port_traced(cfg, sport, dport) {
        return 0;
    }
    let mut slot = core::mem::MaybeUninit::uninit();
    let tuple = init_tuple(&mut slot, rec.get(t.family), sport, dport);
    // The addresses straight from the record into the tuple, by the helper: copied out of
    // `rec` they became sixteen tracked bytes each, spilled one per stack slot, and this
    // program's frame went past 6.1's limit.
    if tuple.family == AF_INET6 {
        bytes_field(P, &ctx, t.saddr6, &mut tuple.saddr);
        bytes_field(P, &ctx, t.daddr6, &mut tuple.daddr);
    } else {
        bytes_field(P, &ctx, t.saddr4, v4_part(&mut tuple.saddr));
        bytes_field(P, &ctx, t.daddr4, v4_part(&mut tuple.daddr));
    }
    let states = (rec.get(l.oldstate), newstate);
    let skaddr: u64 = rec.get(l.skaddr);
    let o = &cfg.offsets;
    let sock = Probed {
        prog: P,
        offsets: o,
        sk: skaddr,
    };
    // The record's protocol was checked above.
    changed(
        cfg,
        &sock,
        states,
        tuple,
        || netns_of_sock(P, o, skaddr),
        || true,
    );
    0
}

/// `tp_btf/inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)`. The
/// socket's ports, IPv4 addresses and family are loaded directly from `struct sock_common` at
/// the offsets in `conntrace_common::sock_common` (userspace attaches this program only when
/// the kernel's BTF has them there); the rest is read like everywhere else.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tp_btf_inet_sock_set_state(ctx: BtfTracePointContext) -> u32 {
    const P: u32 = programs::TP_BTF_INET_SOCK_SET_STATE;
    let newstate: i32 = ctx.arg(2);
    if mid_close(newstate) {
        return 0;
    }
    let sk: *const u8 = ctx.arg(0);
    // Going to CLOSE may have released the bound port (inet_put_port zeroes skc_num first):
    // then the socket's own source port, as the classic record shows it.
    let (sport, dport) = typed_sock_ports(P, sk, Origin::Argument);
    let Some(cfg) = config() else { return 0 };
    let o = &cfg.offsets;
    let skaddr = sk as u64;
    if !port_traced(cfg, sport, dport) {
        return 0;
    }
    // SAFETY: `sk` is the tracepoint's BTF-typed `struct sock *`: the verifier turns these
    // loads into faulting-safe ones and checks each offset against the type. Volatile: one
    // load per member, as the verifier checks them.
    let family = unsafe { sk.add(sock_common::FAMILY).cast::<u16>().read_volatile() };
    let mut slot = core::mem::MaybeUninit::uninit();
    let tuple = init_tuple(&mut slot, family, sport, dport);
    if family == AF_INET6 {
        // Read in place by the helper (see `kread_into`).
        if o.sock_v6_rcv_saddr != KernelOffsets::MISSING {
            kread_into(P, skaddr + o.sock_v6_rcv_saddr as u64, &mut tuple.saddr);
        }
        if o.sock_v6_daddr != KernelOffsets::MISSING {
            kread_into(P, skaddr + o.sock_v6_daddr as u64, &mut tuple.daddr);
        }
    } else {
        // SAFETY: as above; each address is one 32-bit load and one store into the tuple.
        unsafe {
            let d = sk.add(sock_common::DADDR).cast::<u32>().read_volatile();
            let s = sk.add(sock_common::RCV_SADDR).cast::<u32>().read_volatile();
            tuple.saddr.as_mut_ptr().cast::<u32>().write_unaligned(s);
            tuple.daddr.as_mut_ptr().cast::<u32>().write_unaligned(d);
        }
    }
    let oldstate: i32 = ctx.arg(1);
    let sock = Typed { prog: P, sk };
    // SCTP sockets pass here too: `sk_protocol` is read where no followed connection vouches
    // for the socket (one load fewer on most runs).
    let is_tcp = || sock.protocol().is_none_or(|p| p == IPPROTO_TCP);
    // `skc_net` and its `ns.inum` loaded directly too.
    let netns = || {
        // SAFETY: as above.
        let net = unsafe { sk.add(sock_common::NET).cast::<*const u8>().read_volatile() };
        netns_of_typed_net(net)
    };
    changed(cfg, &sock, (oldstate, newstate), tuple, netns, is_tcp);
    0
}

/// A traced socket (`sock`) changed state: kept in the kernel (quiet mode), or sent when it
/// is a TCP socket's (`is_tcp`, asked as late as possible).
#[inline(always)]
fn changed(
    cfg: &Config,
    sock: &impl SockRead,
    (oldstate, newstate): (i32, i32),
    tuple: &Tuple,
    netns: impl Fn() -> Option<u32>,
    is_tcp: impl Fn() -> bool,
) {
    let skaddr = sock.addr();
    if quiet::enabled(cfg)
        && quiet::on_state(cfg, sock, (oldstate, newstate), tuple, &netns, &is_tcp)
    {
        return;
    }
    if !is_tcp() {
        return;
    }
    if matches!(newstate, state::SYN_SENT | state::SYN_RECV | state::CLOSE) {
        // A new connection, or the end of one, at this address: its first data is still to come.
        data::forget(skaddr);
    }
    let mut header = header(EventKind::StateChange, size_of::<StateChange>(), netns());
    let (mut sk_err, mut sk_err_soft): (i32, i32) = (0, 0);
    let mut route_cache = 0;
    if newstate == state::CLOSE {
        // Whether its route is still there: a retransmission whose lookup failed left none,
        // and zeroed its route capabilities.
        if let Some(cached) = sock.route_cached() {
            route_cache = route_cache::READ | if cached { route_cache::SET } else { 0 };
        }
        if let Some(caps) = sock.route_caps() {
            route_cache |= route_cache::CAPS_READ | if caps { route_cache::CAPS_SET } else { 0 };
        }
        // The error, and the soft error (an ICMP that came while the process held it).
        match sock.err() {
            Some(e) => sk_err = e,
            None => header.unread |= unread::SK_ERR,
        }
        match sock.err_soft() {
            Some(e) => sk_err_soft = e,
            None => header.unread |= unread::SK_ERR_SOFT,
        }
    }
    let progress = if quiet::enabled(cfg)
        && matches!(
            newstate,
            state::FIN_WAIT1 | state::CLOSE_WAIT | state::CLOSE
        )
        && !matches!(oldstate, state::SYN_SENT | state::SYN_RECV)
    {
        quiet::progress(sock)
    } else {
        0
    };
    emit(StateChange {
        header,
        skaddr,
        tuple: *tuple,
        oldstate,
        newstate,
        sk_err,
        sk_err_soft,
        route_cache,
        progress,
    });
}
