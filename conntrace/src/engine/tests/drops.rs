//! Dropped packets: direction, orientation (s = this host), owner process, counts.

use super::*;
use crate::engine::verdict::Direction;

fn dropped(ts: u64, sk: u64, packet: FourTuple, flags: u8) -> KernelEvent {
    KernelEvent::Dropped {
        meta: softirq(ts),
        sk,
        rx_sk: 0,
        packet,
        reason: "NETFILTER_DROP".into(),
        location: "nft_do_chain+0x3e8".into(),
        tcp_flags: flags,
    }
}

#[test]
fn syn_dropped_before_any_socket_is_incoming() {
    let mut e = Engine::new(EngineConfig::default());
    // The client's SYN as the server sees it: source 10.77.0.1:40000, no socket yet.
    none(e.handle(dropped(MS, 0, tuple(SPORT, 3306), 0x02)));
    let d = e.take_drops();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].direction, Direction::In);
    // s = this host (the packet's destination).
    assert_eq!(
        (d[0].saddr, d[0].sport, d[0].daddr, d[0].dport),
        (ip(2), 3306, ip(1), SPORT)
    );
    assert_eq!((d[0].tcp_flags.as_str(), d[0].pid), ("SYN", None));
    assert_eq!(e.summary().drops_by_reason.get("NETFILTER_DROP"), Some(&1));
    assert!(e.take_drops().is_empty(), "records are taken once");
}

#[test]
fn retransmitted_syn_dropped_in_output_names_the_connecting_process() {
    let c = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(EngineConfig::default());
    none(e.handle(c.connect(MS, 100, "client")));
    // Sent from the retransmit timer: the current task is not the owner.
    none(e.handle(dropped(SEC, SK_A, tuple(SPORT, DPORT), 0x02)));
    let d = e.take_drops();
    assert_eq!(d[0].direction, Direction::Out);
    assert_eq!((d[0].saddr, d[0].sport, d[0].dport), (ip(1), SPORT, DPORT));
    assert_eq!(
        (d[0].pid, d[0].comm.as_deref()),
        (Some(100), Some("client"))
    );
}

#[test]
fn incoming_packet_carrying_a_local_socket_is_not_outgoing() {
    // Early demux attaches an established socket to incoming packets before netfilter INPUT.
    let s = Sock::server(SK_B);
    let mut e = Engine::new(EngineConfig::default());
    feed(&mut e, server_handshake(s, MS));
    let from_peer = FourTuple {
        saddr: ip(2),
        sport: 51_000,
        daddr: ip(1),
        dport: 3306,
    };
    none(e.handle(dropped(5 * MS, SK_B, from_peer, 0x10)));
    let d = e.take_drops();
    assert_eq!(d[0].direction, Direction::In);
    assert_eq!(
        (d[0].sport, d[0].dport, d[0].tcp_flags.as_str()),
        (3306, 51_000, "ACK")
    );
}

#[test]
fn flag_names() {
    assert_eq!(decide::tcp_flag_names(0x02), "SYN");
    assert_eq!(decide::tcp_flag_names(0x12), "SYN|ACK");
    assert_eq!(decide::tcp_flag_names(0x11), "ACK|FIN");
    assert_eq!(decide::tcp_flag_names(0), "none");
}
