//! Ring-buffer records → reason-engine events.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use conntrace_common::{
    AF_INET, AF_INET6, DATA_OUT, Decoded, EventHeader, NOT_ICMP, RESET_REASON_NONE, RouteError,
    TCP_FLAGS_UNKNOWN, Tuple, decode, progress, route_cache, unread,
};

use crate::engine::facts::{
    Accepted, Closing, ConnHistory, DropReason, DroppedPacket, Errno, FourTuple, Icmp, KernelEvent,
    Meta, Proc, RouteAtClose, TableAnswer, TcpFlags, TcpState,
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

/// The time of a raw event that follows a loss of events on its CPU
/// (`header_flags::LOST_BEFORE`), else `None` (also for a record too short for a header).
pub fn lost_before(bytes: &[u8]) -> Option<u64> {
    let h = conntrace_common::header(bytes).ok()?;
    (h.flags & conntrace_common::header_flags::LOST_BEFORE != 0).then_some(h.ts_ns)
}

fn meta(h: &EventHeader) -> Meta {
    let end = h.comm.iter().position(|&b| b == 0).unwrap_or(h.comm.len());
    Meta {
        ts_ns: h.ts_ns,
        // 0 is no namespace's inode either: the program had no object to read it from.
        netns: (h.unread & unread::NETNS == 0 && h.netns != 0).then_some(h.netns),
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

/// A quiet connection's history as the engine takes it, written at `ts_ns`.
/// A tuple as the kernel's records carry it: IPv4 in the first 4 bytes (`AF_INET`), else
/// IPv6 (`AF_INET6`, an IPv4 address of a mixed pair mapped).
pub fn wire_tuple(t: FourTuple) -> Tuple {
    let mut w = Tuple {
        sport: t.sport,
        dport: t.dport,
        ..Tuple::default()
    };
    match (t.saddr, t.daddr) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            w.family = AF_INET;
            w.saddr[..4].copy_from_slice(&s.octets());
            w.daddr[..4].copy_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            w.family = AF_INET6;
            w.saddr = v6(s).octets();
            w.daddr = v6(d).octets();
        }
    }
    w
}

/// Every form a socket of `t` may carry in the kernel: [`wire_tuple`], and for IPv4 also the
/// IPv4-mapped IPv6 form of a dual-stack socket.
pub fn wire_tuples(t: FourTuple) -> Vec<Tuple> {
    let mut forms = vec![wire_tuple(t)];
    if let (IpAddr::V4(s), IpAddr::V4(d)) = (t.saddr, t.daddr) {
        forms.push(Tuple {
            family: AF_INET6,
            saddr: s.to_ipv6_mapped().octets(),
            daddr: d.to_ipv6_mapped().octets(),
            ..forms[0]
        });
    }
    forms
}

pub fn conn_history(sk: u64, h: &conntrace_common::quiet::History, ts_ns: u64) -> ConnHistory {
    use conntrace_common::quiet::flags;
    let server = h.flags & flags::SERVER != 0;
    // A server's process is known only when it closed the socket itself (pid 0 otherwise).
    let end = h.comm.iter().position(|&b| b == 0).unwrap_or(h.comm.len());
    let proc = Proc {
        pid: h.pid,
        comm: compact_str::CompactString::from_utf8_lossy(&h.comm[..end]),
    };
    ConnHistory {
        meta: Meta {
            ts_ns,
            netns: (h.flags & flags::NETNS_UNREAD == 0 && h.netns != 0).then_some(h.netns),
            proc,
        },
        sk,
        server,
        tuple: four_tuple(&h.tuple),
        started_ns: h.started_ns,
        established_ns: (h.established_ns != 0).then_some(h.established_ns),
        accepted: if h.accepted_ns != 0 {
            Some(Accepted::At(h.accepted_ns))
        } else if h.flags & flags::ACCEPTED != 0 {
            Some(Accepted::Seen)
        } else {
            None
        },
        orderly: h.flags & flags::ORDERLY != 0,
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
                // Unread, like 0, is no error known: the error report may still tell it. The
                // soft error stands in where there is no other (what SO_ERROR hands out).
                sk_err: errno_read(e.header.unread, unread::SK_ERR, e.sk_err)
                    .or_else(|| errno_read(e.header.unread, unread::SK_ERR_SOFT, e.sk_err_soft)),
                sk_err_soft: errno_read(e.header.unread, unread::SK_ERR_SOFT, e.sk_err_soft),
                closing: (e.progress & progress::READ != 0).then_some(Closing {
                    received: e.progress & progress::RECEIVED != 0,
                    owned: e.progress & progress::OWNED != 0,
                }),
                route: route_at_close(e.route_cache),
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
                sk_port: (e.sk != 0 && e.header.unread & unread::SK_PORT == 0)
                    .then_some(e.sk_port as u16),
                sk_state: (e.sk_state != 0 && e.header.unread & unread::SK_STATE == 0)
                    .then(|| TcpState::from_kernel(e.sk_state as i32)),
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
                ifindex: (e.header.unread & unread::IFINDEX == 0 && e.ifindex != 0)
                    .then_some(e.ifindex),
                icmp: (e.icmp != NOT_ICMP).then(|| Icmp {
                    icmp_type: e.icmp as u8,
                    code: (e.icmp >> 8) as u8,
                    mtu: (e.mtu != 0).then_some(e.mtu),
                }),
            }),
            Decoded::Retransmit(e) => KernelEvent::Retransmit {
                meta: meta(&e.header),
                sk: e.skaddr,
                tuple: four_tuple(&e.tuple),
                bytes: (e.header.unread & unread::LENGTH == 0).then_some(e.bytes),
                mss: (e.header.unread & unread::MSS == 0 && e.mss != 0).then_some(e.mss),
                sacked_out: (e.header.unread & unread::SACKED_OUT == 0).then_some(e.sacked_out),
            },
            Decoded::FirstData(e) => KernelEvent::FirstData {
                meta: meta(&e.header),
                sk: e.skaddr,
                outgoing: e.direction == DATA_OUT,
            },
            Decoded::CookieSynAck(e) => KernelEvent::CookieSent {
                meta: meta(&e.header),
                tuple: four_tuple(&e.tuple),
            },
            Decoded::History(e) => {
                KernelEvent::History(conn_history(e.skaddr, &e.history, e.header.ts_ns))
            }
            Decoded::ConnectError(e) => KernelEvent::ConnectFailed {
                meta: meta(&e.header),
                sk: e.skaddr,
                tuple: four_tuple(&e.tuple),
                errno: Errno::from_raw(e.ret),
                cgroup_refusal: e.header.flags & conntrace_common::header_flags::CGROUP_REFUSAL
                    != 0,
            },
            Decoded::RouteError(e) => route_lookup_failed(&e),
        })
    }
}

/// A failed route lookup of `connect()`, one table's answer.
fn route_lookup_failed(e: &RouteError) -> KernelEvent {
    KernelEvent::RouteLookupFailed {
        meta: meta(&e.header),
        tuple: four_tuple(&e.tuple),
        table: e.table,
        answer: TableAnswer::from_kernel(e.tuple.family == AF_INET6, e.err),
    }
}

/// The route facts of a change to CLOSE ([`route_cache`] bits), each absent where not read.
fn route_at_close(bits: u32) -> RouteAtClose {
    let fact = |read: u32, set: u32| (bits & read != 0).then_some(bits & set != 0);
    RouteAtClose {
        cached: fact(route_cache::READ, route_cache::SET),
        caps: fact(route_cache::CAPS_READ, route_cache::CAPS_SET),
    }
}

/// An errno field the kernel filled (`bit` clear in `unread`), when it holds one.
fn errno_read(unread: u32, bit: u32, value: i32) -> Option<Errno> {
    (unread & bit == 0 && value > 0).then(|| Errno::from_raw(value))
}

#[cfg(test)]
mod tests {
    use conntrace_common::{EventKind, StateChange, as_bytes, header_for, unread};

    use super::*;

    #[test]
    fn an_event_after_a_loss_says_when() {
        let mut h = conntrace_common::header_for::<conntrace_common::StateChange>(
            conntrace_common::EventKind::StateChange,
        );
        h.ts_ns = 42;
        let bytes = |h: &EventHeader| {
            // SAFETY: the header is plain data of its size.
            unsafe {
                std::slice::from_raw_parts(
                    (h as *const EventHeader).cast::<u8>(),
                    size_of::<EventHeader>(),
                )
            }
            .to_vec()
        };
        assert_eq!(lost_before(&bytes(&h)), None);
        h.flags = conntrace_common::header_flags::LOST_BEFORE;
        assert_eq!(lost_before(&bytes(&h)), Some(42));
        assert_eq!(lost_before(&bytes(&h)[..8]), None);
    }

    fn decoder() -> Decoder {
        Decoder::new(BTreeMap::new(), BTreeMap::new(), Default::default())
    }

    #[test]
    fn route_errors_name_the_table_and_its_answer() {
        let mut t = Tuple {
            family: conntrace_common::AF_INET,
            dport: 3306,
            ..Tuple::default()
        };
        t.daddr[..4].copy_from_slice(&[192, 0, 2, 1]);
        let mut h = header_for::<RouteError>(EventKind::RouteError);
        (h.pid, h.netns) = (42, 4_026_532_000);
        h.comm[..9].copy_from_slice(b"ct-client");
        let e = RouteError {
            header: h,
            tuple: t,
            err: -11,
            table: 254,
        };
        let KernelEvent::RouteLookupFailed {
            meta,
            tuple,
            table,
            answer,
        } = decoder().decode(as_bytes(&e)).unwrap()
        else {
            panic!("a route lookup");
        };
        assert_eq!((meta.proc.pid, meta.proc.comm.as_str()), (42, "ct-client"));
        assert_eq!(meta.netns, Some(4_026_532_000));
        assert_eq!(tuple.daddr.to_string(), "192.0.2.1");
        assert!(tuple.saddr.is_unspecified());
        assert_eq!((tuple.sport, tuple.dport, table), (0, 3306, 254));
        assert_eq!(answer, TableAnswer::Miss);
        // The same errno means "no route here, or an unreachable route" for IPv6.
        let v6 = |err| TableAnswer::from_kernel(true, err);
        let v4 = |err| TableAnswer::from_kernel(false, err);
        assert_eq!(v4(-113), TableAnswer::Unreachable);
        assert_eq!(v6(-113), TableAnswer::MissOrUnreachable);
        assert_eq!(
            (v4(-13), v6(-13)),
            (TableAnswer::Prohibit, TableAnswer::Prohibit)
        );
        assert_eq!(
            (v4(-22), v6(-22)),
            (TableAnswer::Blackhole, TableAnswer::Blackhole)
        );
        assert_eq!(v4(-101), TableAnswer::Other(Errno::ENETUNREACH));
    }

    #[test]
    fn route_facts_at_close_are_absent_where_not_read() {
        use route_cache::{CAPS_READ, CAPS_SET, READ, SET};
        let at = |cached, caps| RouteAtClose { cached, caps };
        assert_eq!(route_at_close(0), at(None, None));
        assert_eq!(route_at_close(READ), at(Some(false), None));
        assert_eq!(route_at_close(READ | SET), at(Some(true), None));
        assert_eq!(route_at_close(CAPS_READ), at(None, Some(false)));
        assert_eq!(
            route_at_close(READ | CAPS_READ | CAPS_SET),
            at(Some(false), Some(true))
        );
        // A set bit without its read bit is not a fact.
        assert_eq!(route_at_close(SET | CAPS_SET), at(None, None));
    }

    #[test]
    fn facts_the_program_could_not_read_are_absent() {
        let mut h = header_for::<StateChange>(EventKind::StateChange);
        h.netns = 4_026_531_840;
        let mut sc = StateChange {
            header: h,
            skaddr: 1,
            tuple: Tuple::default(),
            oldstate: 2,
            newstate: 7,
            sk_err: 111,
            sk_err_soft: 113,
            route_cache: 0,
            progress: 0,
        };
        let decode = |sc: &StateChange| {
            let KernelEvent::State {
                meta,
                sk_err,
                sk_err_soft,
                ..
            } = decoder().decode(as_bytes(sc)).unwrap()
            else {
                panic!("a state change");
            };
            (meta.netns, sk_err, sk_err_soft)
        };
        assert_eq!(
            decode(&sc),
            (Some(4_026_531_840), Some(Errno(111)), Some(Errno(113)))
        );
        // The soft error stands in for an error not read, as SO_ERROR would hand it out.
        sc.header.unread = unread::NETNS | unread::SK_ERR;
        assert_eq!(decode(&sc), (None, Some(Errno(113)), Some(Errno(113))));
        sc.header.unread = unread::NETNS | unread::SK_ERR | unread::SK_ERR_SOFT;
        assert_eq!(decode(&sc), (None, None, None));
        // No namespace at all (0) is absent too, never netns 0.
        sc.header.unread = 0;
        sc.header.netns = 0;
        let KernelEvent::State { meta, .. } = decoder().decode(as_bytes(&sc)).unwrap() else {
            panic!("a state change");
        };
        assert_eq!(meta.netns, None);
    }

    #[test]
    fn a_history_carries_what_the_kernel_kept() {
        use conntrace_common::{
            HistoryEvent,
            quiet::{History, flags},
        };
        let mut t = Tuple {
            family: conntrace_common::AF_INET,
            sport: 3306,
            dport: 41000,
            ..Tuple::default()
        };
        t.saddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        t.daddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        let mut e = HistoryEvent {
            header: header_for::<HistoryEvent>(EventKind::History),
            skaddr: 0xffff_8880_0000_1000,
            history: History {
                started_ns: 100,
                established_ns: 150,
                accepted_ns: 0,
                tuple: t,
                pid: 0,
                netns: 4_026_532_000,
                flags: flags::SERVER | flags::ORDERLY | flags::ACCEPTED,
                _pad: 0,
                comm: [0; 16],
            },
        };
        e.header.ts_ns = 900;
        let KernelEvent::History(h) = decoder().decode(as_bytes(&e)).unwrap() else {
            panic!("a history");
        };
        assert!(h.server && h.orderly);
        assert_eq!(h.accepted, Some(Accepted::Seen));
        assert_eq!(
            (h.started_ns, h.established_ns, h.meta.ts_ns),
            (100, Some(150), 900)
        );
        assert_eq!(h.meta.netns, Some(4_026_532_000));
        assert_eq!((h.tuple.sport, h.tuple.dport), (3306, 41000));
        assert_eq!(h.meta.proc.pid, 0);
        // A client's: its process; a namespace the kernel could not read is absent; a time
        // of accept() only when the hook saw it.
        e.history.flags = flags::NETNS_UNREAD;
        e.history.pid = 4242;
        e.history.comm[..6].copy_from_slice(b"mysql\0");
        e.history.established_ns = 0;
        e.history.accepted_ns = 120;
        let KernelEvent::History(h) = decoder().decode(as_bytes(&e)).unwrap() else {
            panic!("a history");
        };
        assert!(!h.server);
        assert_eq!(
            (h.meta.proc.pid, h.meta.proc.comm.as_str()),
            (4242, "mysql")
        );
        assert_eq!((h.meta.netns, h.established_ns), (None, None));
        assert_eq!(h.accepted, Some(Accepted::At(120)));
    }
}
