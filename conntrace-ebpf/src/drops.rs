//! `skb:kfree_skb`: TCP packets the kernel dropped, with its reason, parsed from the packet's
//! own headers (a SYN dropped before any socket lookup has no socket to read).

use core::ptr::addr_of_mut;

use aya_ebpf::{
    EbpfContext,
    helpers::bpf_get_stack,
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use conntrace_common::{
    AF_INET, AF_INET6, Config, DROP_STACK_DEPTH, EventKind, KernelOffsets, NOT_ICMP, PacketDrop,
    Tuple, programs, sk_buff, unread,
};

use crate::{
    EVENTS, config, count_lost,
    data::sock_ports,
    field, header, kread, mark_after_loss, netns_of_skb, netns_of_skb_route, netns_of_sock,
    new_tuple, port_traced, quiet,
    sock::{Origin, typed_skb_protocol, typed_sock_ports},
    submit_flags,
};

pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP_U8: u8 = 6;

/// `skb->protocol` (host order) when the packet is IPv4 or IPv6; `None` for any other, or
/// when unreadable.
#[inline(always)]
pub(crate) fn ip_protocol(prog: u32, o: &KernelOffsets, skb: u64) -> Option<u16> {
    if o.skb_protocol == KernelOffsets::MISSING {
        return None;
    }
    kread::<u16>(prog, skb + o.skb_protocol as u64)
        .map(u16::from_be)
        .and_then(ip_only)
}

/// [`ip_protocol`] of a BTF-typed `struct sk_buff *`, by a direct load.
#[inline(always)]
fn typed_ip_protocol(skb: *const u8) -> Option<u16> {
    typed_skb_protocol(skb).and_then(ip_only)
}

/// `proto` (`skb->protocol`, host order) when it is IPv4 or IPv6.
#[inline(always)]
fn ip_only(proto: u16) -> Option<u16> {
    (proto == ETH_P_IP || proto == ETH_P_IPV6).then_some(proto)
}

/// A packet's facts: its TCP segment's tuple (s = source) and flags; for an ICMP error about
/// a TCP segment, the quoted segment's tuple, no flags, and the error.
pub(crate) struct Packet {
    pub tuple: Tuple,
    pub tcp_flags: u32,
    /// `type | code << 8`, or [`NOT_ICMP`].
    pub icmp: u32,
    pub mtu: u32,
}

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// ICMP "destination unreachable" (code 4: fragmentation needed); ICMPv6 "destination
/// unreachable" and "packet too big".
const ICMP_DEST_UNREACH: u8 = 3;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;

/// The IPv4 or IPv6 header at `ip`: the tuple's addresses, the next protocol and where its
/// header starts. `None` for another version, or what could not be read.
#[inline(always)]
fn ip_header(prog: u32, ip: u64, v6: bool, t: &mut Tuple) -> Option<(u8, u64)> {
    if v6 {
        // Extension headers are not followed: a TCP segment behind one is not seen.
        if kread::<u8>(prog, ip)? >> 4 != 6 {
            return None;
        }
        t.saddr = kread(prog, ip + 8)?;
        t.daddr = kread(prog, ip + 24)?;
        t.family = AF_INET6;
        Some((kread(prog, ip + 6)?, ip + 40))
    } else {
        let ver_ihl: u8 = kread(prog, ip)?;
        if ver_ihl >> 4 != 4 {
            return None;
        }
        let s: [u8; 4] = kread(prog, ip + 12)?;
        let d: [u8; 4] = kread(prog, ip + 16)?;
        t.saddr[..4].copy_from_slice(&s);
        t.daddr[..4].copy_from_slice(&d);
        t.family = AF_INET;
        Some((kread(prog, ip + 9)?, ip + ((ver_ihl & 0x0f) as u64) * 4))
    }
}

/// Parses the IPv4/IPv6 and TCP headers of `skb` from its own bytes: on the receive path the
/// socket is often unknown, and a SYN dropped before socket lookup must still be seen. An ICMP
/// error is parsed down to the TCP segment it quotes. `None` for any other packet, or one whose
/// headers could not be read (counted for `prog`).
#[inline(always)]
pub(crate) fn packet(prog: u32, o: &KernelOffsets, skb: u64, proto: u16) -> Option<Packet> {
    if o.skb_head == KernelOffsets::MISSING || o.skb_network_header == KernelOffsets::MISSING {
        return None;
    }
    let head: u64 = kread(prog, skb + o.skb_head as u64)?;
    let nh: u16 = kread(prog, skb + o.skb_network_header as u64)?;
    if head == 0 || nh == u16::MAX {
        return None;
    }
    let v6 = proto == ETH_P_IPV6;
    let mut t = new_tuple(0, 0, 0);
    let (next, l4) = ip_header(prog, head + nh as u64, v6, &mut t)?;
    if next == IPPROTO_TCP_U8 {
        t.sport = u16::from_be(kread(prog, l4)?);
        t.dport = u16::from_be(kread(prog, l4 + 2)?);
        let tcp_flags = kread::<u8>(prog, l4 + 13)? as u32;
        return Some(Packet {
            tuple: t,
            tcp_flags,
            icmp: NOT_ICMP,
            mtu: 0,
        });
    }
    if next != if v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP } {
        return None;
    }
    let icmp_type: u8 = kread(prog, l4)?;
    let error = if v6 {
        icmp_type == ICMPV6_DEST_UNREACH || icmp_type == ICMPV6_PKT_TOOBIG
    } else {
        icmp_type == ICMP_DEST_UNREACH
    };
    if !error {
        return None;
    }
    let code: u8 = kread(prog, l4 + 1)?;
    // IPv4 "fragmentation needed": the next hop's MTU in the low 16 bits of the second word;
    // ICMPv6 "packet too big": the whole second word.
    let mtu = if v6 {
        u32::from_be(kread(prog, l4 + 4)?)
    } else {
        u16::from_be(kread(prog, l4 + 6)?) as u32
    };
    let mut quoted = new_tuple(0, 0, 0);
    let (inner, inner_l4) = ip_header(prog, l4 + 8, v6, &mut quoted)?;
    if inner != IPPROTO_TCP_U8 {
        return None;
    }
    quoted.sport = u16::from_be(kread(prog, inner_l4)?);
    quoted.dport = u16::from_be(kread(prog, inner_l4 + 2)?);
    Some(Packet {
        tuple: quoted,
        tcp_flags: 0,
        icmp: icmp_type as u32 | (code as u32) << 8,
        mtu,
    })
}

#[tracepoint]
pub fn kfree_skb(ctx: TracePointContext) -> u32 {
    const P: u32 = programs::KFREE_SKB;
    let Some(cfg) = config() else { return 0 };
    let l = &cfg.kfree_skb;
    let proto: u16 = field(P, &ctx, l.protocol);
    if proto != ETH_P_IP && proto != ETH_P_IPV6 {
        return 0;
    }
    let o = &cfg.offsets;
    let skb: u64 = field(P, &ctx, l.skbaddr);
    let sk: u64 = if o.skb_sk == KernelOffsets::MISSING {
        0
    } else {
        kread(P, skb + o.skb_sk as u64).unwrap_or(0)
    };
    let drop = Dropped {
        skb,
        sk,
        rx_sk: field(P, &ctx, l.rx_sk),
        reason: field(P, &ctx, l.reason),
        proto,
    };
    let ports = ProbedPorts {
        prog: P,
        offsets: o,
    };
    dropped(P, &ctx, cfg, &drop, &ports, || field(P, &ctx, l.location));
    0
}

/// `tp_btf/kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason, struct
/// sock *rx_sk)` (6.11+; userspace attaches it only where the kernel's BTF gives these four
/// arguments and `skb->sk` sits at `conntrace_common::sk_buff::SK`): the same, without the
/// record the classic tracepoint builds for every drop of every packet.
#[btf_tracepoint(function = "kfree_skb")]
pub fn tp_btf_kfree_skb(ctx: BtfTracePointContext) -> u32 {
    const P: u32 = programs::TP_BTF_KFREE_SKB;
    let Some(cfg) = config() else { return 0 };
    let skb: *const u8 = ctx.arg(0);
    let Some(proto) = typed_ip_protocol(skb) else {
        return 0;
    };
    // SAFETY: `skb` is the tracepoint's BTF-typed `struct sk_buff *`: the verifier checks the
    // offset against the type and makes the load faulting-safe.
    let sk = unsafe { skb.add(sk_buff::SK).cast::<u64>().read_volatile() };
    let drop = Dropped {
        skb: skb as u64,
        sk,
        rx_sk: ctx.arg(3),
        reason: ctx.arg(2),
        proto,
    };
    // `skb->sk` and `rx_sk` are BTF-typed too: their ports by direct loads.
    dropped(P, &ctx, cfg, &drop, &TypedPorts { prog: P }, || ctx.arg(1));
    0
}

/// How a drop program reads a socket's (local, remote) ports (`data::sock_ports`). A trait,
/// not a closure: the closure became a BPF-to-BPF call, and 6.1's verifier then refused the
/// classic `kfree_skb` at its 1M-instruction limit.
trait PortsOf {
    fn ports(&self, sk: u64) -> (u16, u16);
}

/// Through the helper, at `CONFIG`'s offsets (the classic tracepoint's plain addresses).
struct ProbedPorts<'a> {
    prog: u32,
    offsets: &'a KernelOffsets,
}

impl PortsOf for ProbedPorts<'_> {
    #[inline(always)]
    fn ports(&self, sk: u64) -> (u16, u16) {
        sock_ports(self.prog, self.offsets, sk)
    }
}

/// By direct loads from the `tp_btf` program's BTF-typed sockets.
struct TypedPorts {
    prog: u32,
}

impl PortsOf for TypedPorts {
    #[inline(always)]
    fn ports(&self, sk: u64) -> (u16, u16) {
        // `skb->sk` or `rx_sk`, one register to the verifier: the first is RCU-protected.
        typed_sock_ports(self.prog, sk as *const u8, Origin::Loaded)
    }
}

/// What a drop tracepoint says about a dropped IPv4 or IPv6 packet.
#[derive(Clone, Copy)]
struct Dropped {
    skb: u64,
    /// `skb->sk`, 0 for none.
    sk: u64,
    /// The receiving socket (6.11+), 0 for none.
    rx_sk: u64,
    /// `enum skb_drop_reason`.
    reason: u32,
    /// `skb->protocol`, host order.
    proto: u16,
}

/// A dropped packet: counted when it is a normal drop of a traced port's socket, sent when its
/// headers say a traced port. `ports` reads a socket's ports the way the program can;
/// `location` is asked only when the drop is sent.
#[inline(always)]
fn dropped<C: EbpfContext>(
    prog: u32,
    ctx: &C,
    cfg: &Config,
    d: &Dropped,
    ports: &impl PortsOf,
    location: impl FnOnce() -> u64,
) {
    let o = &cfg.offsets;
    let Dropped {
        skb,
        sk,
        rx_sk,
        reason,
        proto,
    } = *d;
    let quiet = quiet::enabled(cfg);
    // Chosen, then compared: `sk != 0 || rx_sk != 0` became `(sk | rx_sk) != 0`, which the
    // verifier refuses on the BTF-typed program's pointers.
    let owner = if sk != 0 { sk } else { rx_sk };
    if quiet && owner != 0 && quiet::is_normal_drop(cfg, reason) {
        // A normal drop of a socket's packet (a closed socket's purged queue) is counted
        // here, for a traced port: two reads instead of the packet's headers.
        let (local, remote) = ports.ports(owner);
        if port_traced(cfg, local, remote) {
            quiet::count_normal_drop(reason);
        }
        return;
    }
    // The owning socket's own port tells an outgoing packet from one it received, even once
    // the connection is gone from userspace's view.
    let sk_port = if sk == 0 {
        Some(0)
    } else {
        match ports.ports(sk) {
            (0, _) => None,
            (local, _) => Some(local),
        }
    };
    let Some(pkt) = packet(prog, o, skb, proto) else {
        return;
    };
    if !port_traced(cfg, pkt.tuple.sport, pkt.tuple.dport) {
        return;
    }
    if quiet {
        quiet::promote(prog, sk);
        quiet::promote(prog, rx_sk);
    }
    // The socket's state tells an established connection's packet from a handshake's.
    let sk_state = match (owner, o.sock_state) {
        (0, _) => Some(0),
        (_, KernelOffsets::MISSING) => None,
        (_, at) => kread::<u8>(prog, owner + at as u64).map(u32::from),
    };
    // The TCP receive path reuses skb->dev as scratch space: fall back to the sockets.
    // Last, the route's device: TCP's receive path reuses `skb->dev` as scratch space, and
    // the classic tracepoint gives no receiving socket (on 6.1 a SYN cookie's ACK dropped
    // by a full accept queue had no namespace, so its attempt never saw it).
    let netns = netns_of_skb(prog, o, skb)
        .or_else(|| netns_of_sock(prog, o, sk))
        .or_else(|| netns_of_sock(prog, o, rx_sk))
        .or_else(|| netns_of_skb_route(prog, o, skb));
    let ifindex: Option<u32> = if o.skb_iif == KernelOffsets::MISSING {
        None
    } else {
        kread(prog, skb + o.skb_iif as u64)
    };
    // Written in place, field by field: the record with its stack is too large for the eBPF
    // stack, and a whole-struct write becomes a byte-wise memset/memcpy loop whose every
    // iteration 6.1's verifier walks (over its 1M-instruction limit).
    let Some(mut entry) = EVENTS.reserve::<PacketDrop>(0) else {
        count_lost();
        return;
    };
    let slot = entry.as_mut_ptr();
    // SAFETY: `slot` points to the reserved, exclusively owned ring-buffer record; every
    // field is written before it is submitted.
    unsafe {
        let mut header = header(EventKind::Drop, size_of::<PacketDrop>(), netns);
        if ifindex.is_none() {
            header.unread |= unread::IFINDEX;
        }
        if sk_port.is_none() {
            header.unread |= unread::SK_PORT;
        }
        if sk_state.is_none() {
            header.unread |= unread::SK_STATE;
        }
        addr_of_mut!((*slot).header).write(header);
        addr_of_mut!((*slot).sk).write(sk);
        addr_of_mut!((*slot).rx_sk).write(rx_sk);
        addr_of_mut!((*slot).location).write(location());
        addr_of_mut!((*slot).tuple).write(pkt.tuple);
        addr_of_mut!((*slot).reason).write(reason);
        addr_of_mut!((*slot).tcp_flags).write(pkt.tcp_flags);
        addr_of_mut!((*slot).ifindex).write(ifindex.unwrap_or(0));
        addr_of_mut!((*slot).icmp).write(pkt.icmp);
        addr_of_mut!((*slot).mtu).write(pkt.mtu);
        addr_of_mut!((*slot).sk_port).write(u32::from(sk_port.unwrap_or(0)));
        addr_of_mut!((*slot).sk_state).write(sk_state.unwrap_or(0));
        addr_of_mut!((*slot)._pad).write(0);
        let stack = addr_of_mut!((*slot).stack).cast::<u64>();
        if reason == cfg.stack_drop_reason {
            // The helper fills the array and zeroes what it does not use (all of it on
            // failure); userspace reads entries up to the first zero.
            bpf_get_stack(
                ctx.as_ptr(),
                stack.cast(),
                (DROP_STACK_DEPTH * size_of::<u64>()) as u32,
                0,
            );
        } else {
            for i in 0..DROP_STACK_DEPTH {
                // Volatile: a plain loop would be turned back into a memset call.
                stack.add(i).write_volatile(0);
            }
        }
    }
    mark_after_loss(slot.cast());
    entry.submit(submit_flags());
}
