//! Ring-buffer records → reason-engine events.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use conntrace_common::{
    AF_INET6, DATA_OUT, Decoded, EventHeader, RESET_REASON_NONE, TCP_FLAGS_UNKNOWN, Tuple, decode,
};

use crate::engine::facts::{
    DropReason, DroppedPacket, Errno, FourTuple, KernelEvent, Meta, Proc, TcpFlags, TcpState,
};

/// Turns raw records into [`KernelEvent`]s, naming kernel enums from this kernel's BTF.
pub struct Decoder {
    reset_reasons: BTreeMap<u32, String>,
    drop_reasons: BTreeMap<u32, DropReason>,
    kallsyms: crate::kernel::kallsyms::Kallsyms,
}

fn addr(family: u16, bytes: &[u8; 16]) -> IpAddr {
    if family == AF_INET6 {
        let v6 = Ipv6Addr::from(*bytes);
        // Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d.
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

pub fn four_tuple(t: &Tuple) -> FourTuple {
    FourTuple {
        saddr: addr(t.family, &t.saddr),
        sport: t.sport,
        daddr: addr(t.family, &t.daddr),
        dport: t.dport,
    }
}

fn meta(h: &EventHeader) -> Meta {
    let end = h.comm.iter().position(|&b| b == 0).unwrap_or(h.comm.len());
    Meta {
        ts_ns: h.ts_ns,
        // 0 is no namespace's inode: the program could not read it.
        netns: (h.netns != 0).then_some(h.netns),
        proc: Proc {
            pid: h.pid,
            // Comms are almost always valid UTF-8 and fit inline: the checked path is several
            // times cheaper than the lossy one, which was a tenth of userspace time.
            comm: std::str::from_utf8(&h.comm[..end]).map_or_else(
                |_| compact_str::CompactString::from_utf8_lossy(&h.comm[..end]),
                compact_str::CompactString::new,
            ),
        },
    }
}

impl Decoder {
    pub fn new(
        reset_reasons: BTreeMap<u32, String>,
        drop_reasons: BTreeMap<u32, DropReason>,
        kallsyms: crate::kernel::kallsyms::Kallsyms,
    ) -> Self {
        Self {
            reset_reasons,
            drop_reasons,
            kallsyms,
        }
    }

    pub fn decode(&self, bytes: &[u8]) -> Result<KernelEvent, conntrace_common::DecodeError> {
        Ok(match decode(bytes)? {
            Decoded::StateChange(e) => KernelEvent::State {
                meta: meta(&e.header),
                sk: e.skaddr,
                tuple: four_tuple(&e.tuple),
                old: TcpState::from_kernel(e.oldstate),
                new: TcpState::from_kernel(e.newstate),
                sk_err: (e.sk_err > 0).then(|| Errno::from_raw(e.sk_err)),
            },
            Decoded::ErrorReport(e) => KernelEvent::SocketError {
                meta: meta(&e.header),
                tuple: four_tuple(&e.tuple),
                errno: (e.error != 0).then(|| Errno::from_raw(e.error)),
            },
            Decoded::ReceiveReset(e) => KernelEvent::ResetReceived {
                meta: meta(&e.header),
                sk: e.skaddr,
                tuple: four_tuple(&e.tuple),
            },
            Decoded::SendReset(e) => {
                // Without a socket the kernel fills the record from the answered packet, already
                // oriented as this host's reply (s = this host).
                KernelEvent::ResetSent {
                    meta: meta(&e.header),
                    sk: e.skaddr,
                    tuple: four_tuple(&e.tuple),
                    reason: (e.reason != RESET_REASON_NONE).then(|| {
                        self.reset_reasons
                            .get(&e.reason)
                            .cloned()
                            .unwrap_or_else(|| format!("sk_rst_reason {}", e.reason))
                    }),
                    answered_flags: (e.tcp_flags != TCP_FLAGS_UNKNOWN)
                        .then_some(TcpFlags(e.tcp_flags as u8)),
                }
            }
            Decoded::SynRetransmit(e) => KernelEvent::SynRetransmit {
                meta: meta(&e.header),
                sk: e.skaddr,
                tuple: four_tuple(&e.tuple),
            },
            Decoded::Accept(e) => KernelEvent::Accepted {
                meta: meta(&e.header),
                sk: e.skaddr,
            },
            Decoded::Drop(e) => KernelEvent::Dropped(DroppedPacket {
                meta: meta(&e.header),
                sk: e.sk,
                rx_sk: e.rx_sk,
                packet: four_tuple(&e.tuple),
                reason: self
                    .drop_reasons
                    .get(&e.reason)
                    .cloned()
                    .unwrap_or_else(|| DropReason::new(&format!("skb_drop_reason {}", e.reason))),
                location: self.kallsyms.name(e.location),
                tcp_flags: TcpFlags(e.tcp_flags as u8),
                hook: crate::kernel::nfhook::hook_from_stack(
                    e.stack
                        .iter()
                        .take_while(|&&a| a != 0)
                        .map(|&a| self.kallsyms.function(a)),
                ),
            }),
            Decoded::FirstData(e) => KernelEvent::FirstData {
                meta: meta(&e.header),
                sk: e.skaddr,
                outgoing: e.direction == DATA_OUT,
            },
            Decoded::CookieSynAck(e) => KernelEvent::CookieSent {
                meta: meta(&e.header),
                tuple: four_tuple(&e.tuple),
            },
            Decoded::ConnectError(e) => KernelEvent::ConnectFailed {
                meta: meta(&e.header),
                sk: e.skaddr,
                tuple: four_tuple(&e.tuple),
                errno: Errno::from_raw(e.ret),
            },
        })
    }
}
