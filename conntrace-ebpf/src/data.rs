//! First data on a connection, and SYN cookies sent: what stalled connections are told by.
//!
//! Only the first data per direction per socket is reported (a map of the directions seen,
//! cleared when the socket address starts a new connection or closes), so a busy connection
//! costs one map look-up per segment and no ring-buffer traffic.

use aya_ebpf::{
    macros::{btf_tracepoint, map, tracepoint},
    maps::LruHashMap,
    programs::{BtfTracePointContext, TracePointContext},
};
use conntrace_common::{
    Config, CookieSynAck, DATA_IN, DATA_OUT, EventKind, FirstData, KernelOffsets, NOT_ICMP, Tuple,
    programs, sk_buff, tcp::flags,
};

use crate::{
    IPPROTO_TCP, config,
    drops::{ip_protocol, packet},
    emit, field, header, kread, netns_of_skb, netns_of_sock, port_traced,
};

/// Directions already reported, by socket address: bit 1 << DATA_IN, 1 << DATA_OUT.
#[map]
static FIRST_DATA: LruHashMap<u64, u8> = LruHashMap::with_max_entries(65_536, 0);

/// A new connection (or the end of one) at `sk`: its first data is still to come.
#[inline(always)]
pub(crate) fn forget(sk: u64) {
    if FIRST_DATA.remove(&sk).is_err() {
        // Not there: nothing was seen at this address yet.
    }
}

/// The socket's local and remote ports (`skc_num` host order, else `inet_sport` once closing
/// released the port; `skc_dport` network order);
/// 0 for one that could not be read (counted for `prog`).
#[inline(always)]
pub(crate) fn sock_ports(prog: u32, o: &KernelOffsets, sk: u64) -> (u16, u16) {
    if o.sock_num == KernelOffsets::MISSING || o.sock_dport == KernelOffsets::MISSING {
        return (0, 0);
    }
    let mut local: u16 = kread(prog, sk + o.sock_num as u64).unwrap_or(0);
    if local == 0 && o.inet_sport != KernelOffsets::MISSING {
        // A closing socket released its bound port; its source port stays.
        local = kread::<u16>(prog, sk + o.inet_sport as u64).map_or(0, u16::from_be);
    }
    let remote: u16 = kread(prog, sk + o.sock_dport as u64).unwrap_or(0);
    (local, u16::from_be(remote))
}

#[inline(always)]
pub(crate) fn first(prog: u32, sk: u64, direction: u32, bytes: i32) {
    let Some(cfg) = config() else { return };
    // Only clients' first data matters (stalls are a client's view): a socket whose remote
    // port is traced. Servers' sockets (traced port local) are skipped: one event fewer each.
    let (_, remote) = sock_ports(prog, &cfg.offsets, sk);
    if sk == 0 || !port_traced(cfg, remote, remote) {
        return;
    }
    let bit = 1u8 << direction;
    // SAFETY: a plain read of the map value; the LRU map may drop entries, never corrupt them.
    let seen = unsafe { FIRST_DATA.get(&sk) }.copied().unwrap_or(0);
    if seen & bit != 0 {
        return;
    }
    if FIRST_DATA.insert(&sk, &(seen | bit), 0).is_err() {
        // Full and no entry evictable: report anyway; the engine keeps the first only.
    }
    emit(FirstData {
        header: header(
            EventKind::FirstData,
            size_of::<FirstData>(),
            netns_of_sock(prog, &cfg.offsets, sk),
        ),
        skaddr: sk,
        direction,
        bytes,
    });
}

#[tracepoint]
pub fn sk_data_ready(ctx: TracePointContext) -> u32 {
    const P: u32 = programs::SK_DATA_READY;
    let Some(cfg) = config() else { return 0 };
    let l = &cfg.data_ready;
    let protocol: u16 = field(P, &ctx, l.protocol);
    if protocol != IPPROTO_TCP {
        return 0;
    }
    first(P, field(P, &ctx, l.skaddr), DATA_IN, 0);
    0
}

#[tracepoint]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    const P: u32 = programs::SOCK_SEND_LENGTH;
    let Some(cfg) = config() else { return 0 };
    let l = &cfg.send_length;
    let protocol: u16 = field(P, &ctx, l.protocol);
    let ret: i32 = field(P, &ctx, l.ret);
    if protocol != IPPROTO_TCP || ret <= 0 {
        return 0;
    }
    first(P, field(P, &ctx, l.sk), DATA_OUT, ret);
    0
}

/// Every packet handed to a device: a SYN-ACK without an owning socket is a SYN cookie
/// (`tcp_make_synack` attaches the request socket to a normal SYN-ACK, none to a cookie's).
#[tracepoint]
pub fn net_dev_queue(ctx: TracePointContext) -> u32 {
    const P: u32 = programs::NET_DEV_QUEUE;
    if let Some(cfg) = config() {
        let skb: u64 = field(P, &ctx, cfg.dev_queue.skbaddr);
        let o = &cfg.offsets;
        // Almost every packet has an owning socket: one read sends it on its way.
        if o.skb_sk != KernelOffsets::MISSING && kread::<u64>(P, skb + o.skb_sk as u64) == Some(0) {
            unowned(P, cfg, skb);
        }
    }
    0
}

/// `tp_btf/net_dev_queue(struct sk_buff *skb)`: the same, without the record the classic
/// tracepoint builds for every packet, and with `skb->sk` loaded directly at
/// `conntrace_common::sk_buff::SK` (userspace attaches it only where the kernel's BTF has it
/// there): a packet with an owner, nearly every one, costs one load and no helper call.
#[btf_tracepoint(function = "net_dev_queue")]
pub fn tp_btf_net_dev_queue(ctx: BtfTracePointContext) -> u32 {
    let skb: *const u8 = ctx.arg(0);
    // SAFETY: `skb` is the tracepoint's BTF-typed `struct sk_buff *`: the verifier checks the
    // offset against the type and makes the load faulting-safe.
    let owner = unsafe { skb.add(sk_buff::SK).cast::<u64>().read_volatile() };
    if owner == 0 {
        if let Some(cfg) = config() {
            unowned(programs::TP_BTF_NET_DEV_QUEUE, cfg, skb as u64);
        }
    }
    0
}

/// A packet without an owning socket handed to a device: a cookie SYN-ACK of a traced
/// listener is reported.
#[inline(always)]
fn unowned(prog: u32, cfg: &Config, skb: u64) {
    let o = &cfg.offsets;
    let Some(proto) = ip_protocol(prog, o, skb) else {
        return;
    };
    // A SYN-ACK forwarded by this host has no owner either: it came in on an interface
    // (skb_iif); a listener's own has none.
    if o.skb_iif == KernelOffsets::MISSING || kread::<u32>(prog, skb + o.skb_iif as u64) != Some(0)
    {
        return;
    }
    let Some(pkt) = packet(prog, o, skb, proto) else {
        return;
    };
    let (syn, ack, rst) = (flags::SYN as u32, flags::ACK as u32, flags::RST as u32);
    let tuple = pkt.tuple;
    if pkt.icmp != NOT_ICMP
        || pkt.tcp_flags & (syn | ack | rst) != syn | ack
        || !port_traced(cfg, tuple.sport, tuple.dport)
    {
        return;
    }
    cookie_sent(cfg, tuple, netns_of_skb(prog, o, skb));
}

/// A listener answered a SYN with a cookie: `tuple` is the reply's (source = this host).
#[inline(always)]
pub(crate) fn cookie_sent(cfg: &Config, tuple: Tuple, netns: Option<u32>) {
    if crate::quiet::enabled(cfg) {
        crate::quiet::watch_cookie(&tuple);
    }
    emit(CookieSynAck {
        header: header(EventKind::CookieSynAck, size_of::<CookieSynAck>(), netns),
        tuple,
    });
}
