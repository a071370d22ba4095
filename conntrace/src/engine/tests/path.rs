//! Connections whose SYNs a namespace forwarding them on this host (a router, a container
//! host's own namespace) dropped: the path's drops explain what the client saw.

use super::{namespaces::FakeNamespaces, *};
use crate::engine::facts::{DroppedPacket, NfHook};

/// The router's namespace: the client's is `NETNS`.
const ROUTER: u32 = NETNS + 7;

/// The router's view: no address of the connection's is its own.
fn router() -> Box<FakeNamespaces> {
    Box::new(FakeNamespaces::new().local(|_| Some(false)))
}

/// The client's SYN dropped by netfilter in the router's FORWARD chain.
fn forwarded_syn_dropped(c: Sock, ts: u64) -> KernelEvent {
    KernelEvent::Dropped(DroppedPacket {
        meta: Meta {
            netns: Some(ROUTER),
            ..softirq(ts)
        },
        sk: 0,
        rx_sk: 0,
        sk_port: None,
        sk_state: None,
        packet: c.t,
        reason: DropReason::new(DropReason::NETFILTER_DROP),
        location: "nft_do_chain+0x3e8".into(),
        tcp_flags: TcpFlags(0x02),
        hook: Some(NfHook::Forward),
        ifindex: None,
        icmp: None,
    })
}

#[test]
fn a_refusal_whose_syn_a_router_here_dropped_is_that_routers_reject() {
    // `iptables -A FORWARD ... -j REJECT --reject-with tcp-reset` in a router namespace
    // (kube-proxy's for a Service without endpoints): the client's RST came from the rule,
    // not from a server with nothing listening.
    let c = Sock::client(SK_A, SPORT);
    let mut events = vec![forwarded_syn_dropped(c, MS + 100)];
    events.extend(refused_client(c, MS, 100));
    let mut e = Engine::new(EngineConfig::default()).with_namespace_lookup(router());
    let mut out = feed(&mut e, events);
    out.extend(e.tick(LATER));
    let v = one(out);
    check(&v, "client failed netfilter_reject ECONNREFUSED");
    assert_eq!(detail(&v, "reject_with"), "tcp-reset");
    assert_eq!(detail(&v, "path_drops")[0]["netns"], ROUTER);
    let advice = crate::output::advice::concrete(&v);
    assert!(advice.starts_with("a REJECT rule in netns "), "{advice}");
    assert!(!advice.contains("rate-limited"), "a RST is not: {advice}");
    // Nothing dropped on the path: a closed port's RST.
    let mut e = Engine::new(EngineConfig::default()).with_namespace_lookup(router());
    check(
        &one(feed(&mut e, refused_client(c, MS, 100))),
        "client failed refused_no_listener ECONNREFUSED",
    );
}

#[test]
fn a_syn_timeout_whose_syns_a_router_here_dropped_says_where() {
    let c = Sock::client(SK_A, SPORT);
    let events = vec![
        c.connect(MS, 100, "client"),
        forwarded_syn_dropped(c, MS),
        forwarded_syn_dropped(c, SEC + MS),
        c.closed(3 * SEC, S::SynSent, Some(110)),
    ];
    let mut e = Engine::new(EngineConfig::default()).with_namespace_lookup(router());
    let mut out = feed(&mut e, events);
    out.extend(e.tick(LATER));
    let v = one(out);
    check(&v, "client failed syn_timeout ETIMEDOUT");
    let advice = crate::output::advice::concrete(&v);
    assert!(
        advice.contains(&format!("were dropped in netns {ROUTER}, which forwards them (2 × NETFILTER_DROP at nft_do_chain+0x3e8)")),
        "{advice}"
    );
}

/// A server connection that retransmitted four full-size segments (nothing SACKed), then
/// timed out, while the router dropped its packets `reason` times (`None`: no router seen).
fn full_size_timeout(router_drop: Option<&str>) -> Verdict {
    let s = Sock::server(SK_B);
    let mut e = Engine::new(EngineConfig::default()).with_namespace_lookup(router());
    feed(&mut e, server_handshake(s, MS));
    for ms in [200, 600, 1400, 3000] {
        none(e.handle(s.data_rtx(ms * MS, 1448, 0)));
        if let Some(reason) = router_drop {
            let KernelEvent::Dropped(mut d) = forwarded_syn_dropped(s, ms * MS + 1) else {
                unreachable!("a drop")
            };
            (d.reason, d.tcp_flags, d.hook) = (DropReason::new(reason), TcpFlags(0x18), None);
            none(e.handle(KernelEvent::Dropped(d)));
        }
    }
    let close = s.closed(6 * SEC, S::Established, Some(libc::ETIMEDOUT));
    one(feed(&mut e, [close])
        .into_iter()
        .chain(e.tick(LATER))
        .collect())
}

#[test]
fn full_size_retransmissions_are_a_black_hole_unless_the_path_dropped_them_for_another_cause() {
    // Nothing seen of the path: every segment retransmitted full-size is the black hole's
    // sign.
    check(
        &full_size_timeout(None),
        "server failed pmtu_blackhole ETIMEDOUT",
    );
    // The router here dropped them as too big for its next hop: a black hole for sure.
    check(
        &full_size_timeout(Some("PKT_TOO_BIG")),
        "server failed pmtu_blackhole ETIMEDOUT",
    );
    // The router here dropped them because the peer's link went (or a FORWARD rule): a
    // request larger than the congestion window to a peer that went away, not the MTU.
    for reason in [DropReason::NEIGH_FAILED, DropReason::NETFILTER_DROP] {
        let v = full_size_timeout(Some(reason));
        check(&v, "server failed timeout ETIMEDOUT");
        assert_eq!(
            detail(&v, "path_drops")[0]["kernel_reason"],
            reason,
            "{v:?}"
        );
    }
}

#[test]
fn forwarded_drops_beyond_their_cap_are_counted_not_kept() {
    // A flood through a forwarding host's firewall, one connection per source port: at most
    // `max_kept_drops` connections' drops are kept for their ends' verdicts.
    let (kept, unkept) = (Sock::client(SK_A, SPORT), Sock::client(SK_B, SPORT + 1));
    let mut e = Engine::new(config(|c| c.max_kept_drops = 1)).with_namespace_lookup(router());
    let events = vec![
        kept.connect(MS, 100, "client"),
        unkept.connect(MS, 101, "client"),
        forwarded_syn_dropped(kept, 2 * MS),
        forwarded_syn_dropped(unkept, 3 * MS),
        kept.closed(3 * SEC, S::SynSent, Some(libc::ETIMEDOUT)),
        unkept.closed(3 * SEC, S::SynSent, Some(libc::ETIMEDOUT)),
    ];
    let mut out = feed(&mut e, events);
    out.extend(e.tick(LATER));
    assert_eq!(out.len(), 2, "{out:#?}");
    let by_port = |port| {
        out.iter()
            .find(|v| v.tuple().is_some_and(|t| t.sport == port))
            .unwrap_or_else(|| panic!("a verdict from port {port}: {out:#?}"))
    };
    let (kept_v, unkept_v) = (by_port(SPORT), by_port(SPORT + 1));
    check(kept_v, "client failed syn_timeout ETIMEDOUT");
    assert_eq!(detail(kept_v, "path_drops")[0]["netns"], ROUTER);
    check(unkept_v, "client failed syn_timeout ETIMEDOUT");
    assert!(detail(unkept_v, "path_drops").is_null(), "{unkept_v:#?}");
    assert_eq!(e.summary().forwarded_drops, 2, "both counted");
}
