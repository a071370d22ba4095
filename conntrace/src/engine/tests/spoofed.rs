//! SYN floods from spoofed sources: what this host sends without a socket (a RST to a closed
//! port, a SYN cookie's SYN-ACK) towards sources that do not exist, dropped on its way out at
//! the neighbour layer (nobody answers ARP), and the refusals of such a flood.

use super::{namespaces::FakeNamespaces, *};
use crate::engine::{facts::DroppedPacket, verdict::Side};

const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// This host's namespace, which owns 10.77.0.1 only.
fn engine() -> Engine {
    let own = FakeNamespaces::new().local(|a| Some(a == ip(1)));
    Engine::new(EngineConfig::default()).with_namespace_lookup(Box::new(own))
}

/// A segment (`flags`) this host sent without a socket from 10.77.0.1:3306 to 10.77.0.2's
/// `port`, dropped at the neighbour layer for `reason`.
fn sent_and_dropped(ts: u64, port: u16, flags: u8, reason: &str) -> KernelEvent {
    KernelEvent::Dropped(DroppedPacket {
        meta: softirq(ts),
        sk: 0,
        rx_sk: 0,
        sk_port: None,
        sk_state: None,
        packet: tuple(3306, port),
        reason: DropReason::new(reason),
        location: "__neigh_event_send+0x1b8".into(),
        tcp_flags: TcpFlags(flags),
        hook: None,
        ifindex: None,
        icmp: None,
    })
}

/// This host answered a SYN from 10.77.0.2's `port` to its closed port 3306 with a RST.
fn refused(ts: u64, port: u16) -> KernelEvent {
    KernelEvent::ResetSent {
        meta: softirq(ts),
        sk: 0,
        tuple: tuple(3306, port),
        reason: Some("NO_SOCKET".into()),
        answered_flags: Some(TcpFlags(SYN)),
    }
}

#[test]
fn a_syn_ack_dropped_on_its_way_out_is_the_servers_own_packet() {
    // A cookie's SYN-ACK (no request socket) to a spoofed on-link source: this host's end
    // first, going out, the server's verdict; never a client's with the addresses swapped.
    let mut e = engine();
    let mut out = feed(
        &mut e,
        [sent_and_dropped(MS, 51_000, SYN | ACK, "NEIGH_QUEUEFULL")],
    );
    out.extend(e.finish(LATER));
    let v = one(out);
    assert_eq!(v.side, Side::Server, "{v:#?}");
    assert_eq!(
        (v.saddr, v.sport, v.daddr, v.dport),
        (Some(ip(1)), Some(3306), ip(2), 51_000)
    );
    assert_eq!(detail(&v, "drops")[0]["direction"], "out");
}

/// The RST of a refusal as the kernel drops it: it carries the namespace's TCP control
/// socket (a raw-like socket whose "port" is the protocol number, 6, closed).
fn rst_dropped(ts: u64, port: u16) -> KernelEvent {
    let KernelEvent::Dropped(d) = sent_and_dropped(ts, port, RST | ACK, "NEIGH_FAILED") else {
        unreachable!("a drop")
    };
    KernelEvent::Dropped(DroppedPacket {
        sk: SK_C,
        sk_port: Some(6),
        sk_state: Some(S::Close),
        ..d
    })
}

#[test]
fn a_refusals_rst_dropped_on_its_way_out_is_part_of_that_refusal() {
    let mut e = engine();
    let v = one(feed(
        &mut e,
        [refused(MS, 51_000), rst_dropped(3 * SEC, 51_000)],
    ));
    check(&v, "server failed refused_no_listener -");
    assert!(e.take_drops().is_empty(), "{:?}", e.take_drops());
    // Neighbour resolution gives up seconds later, when the refusal is forgotten: a record
    // of this host's RST, going out, never an attempt of its own.
    check(
        &one(feed(&mut e, [refused(4 * SEC, 51_001)])),
        "server failed refused_no_listener -",
    );
    none(e.tick(8 * SEC));
    none(feed(&mut e, [rst_dropped(9 * SEC, 51_001)]));
    none(e.finish(LATER));
    let d = e.take_drops();
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(
        (d[0].direction, d[0].saddr, d[0].sport),
        (crate::engine::verdict::Direction::Out, ip(1), 3306)
    );
}

#[test]
fn a_flood_of_refusals_is_capped_per_port_and_counted() {
    // 300 spoofed SYNs in 60 ms at a closed port: one line each would be the flood itself.
    let mut e = engine();
    let out = feed(
        &mut e,
        (0..300u16).map(|i| refused(MS + u64::from(i) * 200_000, 1_000 + i)),
    );
    assert_eq!(out.len(), 50);
    assert_eq!(e.summary().attempt_verdicts_suppressed, 250);
    // Another port has its own budget.
    let other = KernelEvent::ResetSent {
        meta: softirq(71 * MS),
        sk: 0,
        tuple: tuple(3307, 2_001),
        reason: Some("NO_SOCKET".into()),
        answered_flags: Some(TcpFlags(SYN)),
    };
    assert_eq!(one(e.handle(other)).sport, Some(3307));
    // The port's own: capped within the second, admitted once its first refusals are older.
    none(e.handle(refused(72 * MS, 2_000)));
    assert_eq!(one(e.handle(refused(MS + SEC, 2_001))).sport, Some(3306));
}
