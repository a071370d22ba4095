//! `skb:kfree_skb`: TCP packets the kernel dropped, with its reason, parsed from the packet's
//! own headers (a SYN dropped before any socket lookup has no socket to read).

use core::ptr::addr_of_mut;

use aya_ebpf::{
    EbpfContext, helpers::bpf_get_stack, macros::tracepoint, programs::TracePointContext,
};
use conntrace_common::{
    AF_INET, AF_INET6, DROP_STACK_DEPTH, EventKind, KernelOffsets, PacketDrop, Tuple, programs,
};

use crate::{
    EVENTS, config, count_lost, field, header, kread, netns_of_skb, netns_of_sock, port_traced,
    submit_flags,
};

pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP_U8: u8 = 6;

/// Parses the IPv4/IPv6 and TCP headers of `skb` from its own bytes: on the receive path the
/// socket is often unknown, and a SYN dropped before socket lookup must still be seen.
/// Returns the packet's tuple (s = source) and its TCP flags; `None` for a packet that is not
/// TCP, or whose headers could not be read (counted for `prog`).
#[inline(always)]
pub(crate) fn packet_tuple(
    prog: u32,
    o: &KernelOffsets,
    skb: u64,
    proto: u16,
) -> Option<(Tuple, u32)> {
    if o.skb_head == KernelOffsets::MISSING || o.skb_network_header == KernelOffsets::MISSING {
        return None;
    }
    let head: u64 = kread(prog, skb + o.skb_head as u64)?;
    let nh: u16 = kread(prog, skb + o.skb_network_header as u64)?;
    if head == 0 || nh == u16::MAX {
        return None;
    }
    let ip = head + nh as u64;
    let mut t = Tuple::default();
    let th = if proto == ETH_P_IP {
        let ver_ihl: u8 = kread(prog, ip)?;
        if ver_ihl >> 4 != 4 || kread::<u8>(prog, ip + 9)? != IPPROTO_TCP_U8 {
            return None;
        }
        let s: [u8; 4] = kread(prog, ip + 12)?;
        let d: [u8; 4] = kread(prog, ip + 16)?;
        t.saddr[..4].copy_from_slice(&s);
        t.daddr[..4].copy_from_slice(&d);
        t.family = AF_INET;
        ip + ((ver_ihl & 0x0f) as u64) * 4
    } else {
        // Extension headers are not followed: a TCP segment behind one is not seen.
        if kread::<u8>(prog, ip)? >> 4 != 6 || kread::<u8>(prog, ip + 6)? != IPPROTO_TCP_U8 {
            return None;
        }
        t.saddr = kread(prog, ip + 8)?;
        t.daddr = kread(prog, ip + 24)?;
        t.family = AF_INET6;
        ip + 40
    };
    t.sport = u16::from_be(kread(prog, th)?);
    t.dport = u16::from_be(kread(prog, th + 2)?);
    Some((t, kread::<u8>(prog, th + 13)? as u32))
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
    let Some((tuple, tcp_flags)) = packet_tuple(P, o, skb, proto) else {
        return 0;
    };
    if !port_traced(cfg, tuple.sport, tuple.dport) {
        return 0;
    }
    let sk: u64 = if o.skb_sk == KernelOffsets::MISSING {
        0
    } else {
        kread(P, skb + o.skb_sk as u64).unwrap_or(0)
    };
    let rx_sk: u64 = field(P, &ctx, l.rx_sk);
    // The TCP receive path reuses skb->dev as scratch space: fall back to the sockets.
    let netns = netns_of_skb(P, o, skb)
        .or_else(|| netns_of_sock(P, o, sk))
        .or_else(|| netns_of_sock(P, o, rx_sk));
    let reason: u32 = field(P, &ctx, l.reason);
    // Written in place, field by field: the record with its stack is too large for the eBPF
    // stack, and a whole-struct write becomes a byte-wise memset/memcpy loop whose every
    // iteration 6.1's verifier walks (over its 1M-instruction limit).
    let Some(mut entry) = EVENTS.reserve::<PacketDrop>(0) else {
        count_lost();
        return 0;
    };
    let slot = entry.as_mut_ptr();
    // SAFETY: `slot` points to the reserved, exclusively owned ring-buffer record; every
    // field is written before it is submitted.
    unsafe {
        addr_of_mut!((*slot).header).write(header(EventKind::Drop, size_of::<PacketDrop>(), netns));
        addr_of_mut!((*slot).sk).write(sk);
        addr_of_mut!((*slot).rx_sk).write(rx_sk);
        addr_of_mut!((*slot).location).write(field(P, &ctx, l.location));
        addr_of_mut!((*slot).tuple).write(tuple);
        addr_of_mut!((*slot).reason).write(reason);
        addr_of_mut!((*slot).tcp_flags).write(tcp_flags);
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
    entry.submit(submit_flags());
    0
}
