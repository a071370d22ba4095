//! Failures seen on real hosts (issue 13): forwarding namespaces, reverse-path filters, full
//! conntrack tables, the client's own REJECT, port exhaustion, path-MTU black holes, zero
//! windows, facts that arrive with the end, and the drops that are a normal part of TCP.

use std::net::SocketAddr;

use super::*;
use crate::engine::{
    facts::{DroppedPacket, Icmp, NfHook, Window},
    lookup::{
        Confidence, ConntrackTable, FirewallRule, NamespaceLookup, PortUse, Route, RouteKind,
        RuleAction, RuleFinding, RuleLookup, RuleQuery,
    },
    verdict::Direction,
};

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// A namespace table: local addresses, a route, interface names, a conntrack table, ports.
#[derive(Default)]
struct Host {
    local: Vec<IpAddr>,
    route: Option<Route>,
    conntrack: Option<ConntrackTable>,
    ports: Option<PortUse>,
}

impl NamespaceLookup for Host {
    fn is_local(&mut self, _netns: Option<u32>, addr: IpAddr) -> Option<bool> {
        Some(self.local.contains(&addr))
    }
    fn route_to(&mut self, _netns: Option<u32>, _dst: IpAddr) -> Option<Route> {
        self.route.clone()
    }
    fn interface(&mut self, _netns: Option<u32>, ifindex: u32) -> Option<String> {
        Some(format!("eth{ifindex}"))
    }
    fn conntrack(&mut self, _netns: Option<u32>) -> Option<ConntrackTable> {
        self.conntrack
    }
    fn ports_to(&mut self, _netns: Option<u32>, _dst: SocketAddr) -> Option<PortUse> {
        self.ports
    }
    fn tcp_ext(&mut self, _netns: Option<u32>, counter: &str) -> Option<u64> {
        (counter == "IPReversePathFilter").then_some(6)
    }
}

struct Reject;

impl RuleLookup for Reject {
    fn find(&mut self, q: &RuleQuery) -> RuleFinding {
        assert_eq!(q.hook, Some(NfHook::Output));
        let rule = FirewallRule {
            comment: Some("default/mysql has no endpoints".into()),
            backend: Default::default(),
            iptables: None,
            family: "ip".into(),
            table: "filter".into(),
            chain: "KUBE-SERVICES".into(),
            handle: 4,
            text: "ip daddr 10.77.0.2 tcp dport 8080 reject".into(),
            action: RuleAction::Reject {
                with: "icmp-port-unreachable".into(),
            },
            packets: 1,
        };
        RuleFinding::Rule {
            rule,
            confidence: Confidence::Exact,
        }
    }
}

fn drop(ts: u64, sk: u64, packet: FourTuple, flags: u8, reason: &str, at: &str) -> DroppedPacket {
    DroppedPacket {
        meta: softirq(ts),
        sk,
        rx_sk: 0,
        sk_port: None,
        sk_state: None,
        packet,
        reason: DropReason::new(reason),
        location: at.into(),
        tcp_flags: TcpFlags(flags),
        hook: None,
        ifindex: Some(2),
        icmp: None,
    }
}

/// The client's SYN as the server (10.77.0.2:3306) receives it.
fn syn_to_server(sport: u16) -> FourTuple {
    FourTuple {
        saddr: ip(1),
        sport,
        daddr: ip(2),
        dport: 3306,
    }
}

#[test]
fn drops_of_forwarded_packets_join_the_path_and_make_no_verdict() {
    // A router that owns neither end drops a forwarded SYN-ACK (here: too big for the hop).
    let router = Host {
        local: vec![ip(254)],
        ..Host::default()
    };
    let mut e = Engine::new(EngineConfig::default()).with_namespace_lookup(Box::new(router));
    let syn_ack = FourTuple {
        saddr: ip(2),
        sport: DPORT,
        daddr: ip(1),
        dport: SPORT,
    };
    let d = drop(MS, 0, syn_ack, SYN | ACK, "PKT_TOO_BIG", "ip_forward+0x1c");
    none(e.handle(KernelEvent::Dropped(d)));
    assert_eq!(e.summary().forwarded_drops, 1);
    let records = e.take_drops();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].direction, Direction::Forward);
    // The client's own connection, seen on the same machine, ends with the path's drop.
    let a = Sock::client(SK_A, SPORT);
    feed(&mut e, [a.connect(MS, 100, "client")]);
    feed(
        &mut e,
        [a.st(3 * SEC, S::SynSent, S::Close), a.err(3 * SEC, 110)],
    );
    let v = one(e.tick(LATER));
    check(&v, "client failed syn_timeout ETIMEDOUT");
    let path = detail(&v, "path_drops");
    assert_eq!(path[0]["kernel_reason"], "PKT_TOO_BIG");
    assert_eq!(path[0]["location"], "ip_forward+0x1c");
    assert_eq!(path[0]["arrived_on"], "eth2");
    none(e.finish(LATER));
}

#[test]
fn a_reverse_path_filter_drop_is_rp_filter_drop_with_the_interfaces() {
    let host = Host {
        local: vec![ip(2)],
        route: Some(Route {
            kind: RouteKind::Unicast,
            dev: Some("eth9".into()),
            gateway: Some(ip(200)),
        }),
        ..Host::default()
    };
    let mut e = Engine::new(EngineConfig::default()).with_namespace_lookup(Box::new(host));
    for ts in [MS, SEC + MS, 2 * SEC + MS] {
        let d = drop(
            ts,
            0,
            syn_to_server(SPORT),
            SYN,
            "IP_RPFILTER",
            "ip_rcv_finish_core+0x25b",
        );
        none(e.handle(KernelEvent::Dropped(d)));
    }
    let v = one(e.tick(10 * SEC));
    check(&v, "server failed rp_filter_drop -");
    assert_eq!(v.kernel_reason.as_deref(), Some("IP_RPFILTER"));
    assert_eq!(v.syn_retransmits, 2);
    let rp = detail(&v, "rp_filter");
    assert_eq!(rp["arrived_on"], "eth2");
    assert_eq!(rp["route_back_via"], "eth9");
    assert_eq!(rp["counter"], 6);
    assert_eq!(detail(&v, "location"), "ip_rcv_finish_core+0x25b");
}

#[test]
fn a_netfilter_drop_outside_rules_with_a_full_table_is_conntrack_table_full() {
    let full = Host {
        local: vec![ip(2)],
        conntrack: Some(ConntrackTable {
            count: 262_144,
            max: 262_144,
        }),
        ..Host::default()
    };
    let mut e = Engine::new(EngineConfig::default()).with_namespace_lookup(Box::new(full));
    let mut d = drop(
        MS,
        0,
        syn_to_server(SPORT),
        SYN,
        "NETFILTER_DROP",
        "nf_hook_slow+0x7d",
    );
    d.hook = Some(NfHook::PreRouting);
    none(e.handle(KernelEvent::Dropped(d)));
    let v = one(e.tick(10 * SEC));
    check(&v, "server failed conntrack_table_full -");
    assert_eq!(v.kernel_reason.as_deref(), Some("NETFILTER_DROP"));
    assert_eq!(
        detail(&v, "conntrack"),
        serde_json::json!({"count": 262_144, "max": 262_144})
    );
    assert_eq!(detail(&v, "rule"), Value::Null, "never blamed on a rule");
    assert_eq!(detail(&v, "hook"), "PREROUTING");

    // A table with room: the same drop is no conntrack failure.
    let room = Host {
        local: vec![ip(2)],
        conntrack: Some(ConntrackTable { count: 3, max: 10 }),
        ..Host::default()
    };
    let mut e = Engine::new(EngineConfig::default()).with_namespace_lookup(Box::new(room));
    let d = drop(
        MS,
        0,
        syn_to_server(SPORT),
        SYN,
        "NETFILTER_DROP",
        "nf_hook_slow+0x7d",
    );
    none(e.handle(KernelEvent::Dropped(d)));
    check(&one(e.tick(10 * SEC)), "server failed netfilter_drop -");
}

#[test]
fn the_clients_own_output_reject_is_netfilter_reject_naming_the_rule() {
    let a = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(EngineConfig::default()).with_rule_lookup(Box::new(Reject));
    feed(&mut e, [a.connect(MS, 100, "client")]);
    let mut d = drop(
        MS + 10_000,
        SK_A,
        a.t,
        SYN,
        "NETFILTER_DROP",
        "nft_do_chain+0x3e8",
    );
    d.hook = Some(NfHook::Output);
    none(e.handle(KernelEvent::Dropped(d)));
    // A refusal without a RST waits out the grace period (a lost RST may be noticed then).
    none(feed(
        &mut e,
        [a.st(SEC, S::SynSent, S::Close), a.err(SEC, 111)],
    ));
    let v = one(e.tick(LATER));
    check(&v, "client failed netfilter_reject ECONNREFUSED");
    assert_eq!(detail(&v, "hook"), "OUTPUT");
    assert_eq!(detail(&v, "reject_with"), "icmp-port-unreachable");
    assert_eq!(
        detail(&v, "rule")["comment"],
        "default/mysql has no endpoints"
    );
    assert_eq!(
        detail(&v, "icmp"),
        Value::Null,
        "the ICMP was this host's own"
    );
    assert_eq!(who(&v), "100/client 10.77.0.1:40000>10.77.0.2:8080");
}

#[test]
fn eaddrnotavail_before_any_packet_is_ephemeral_ports_exhausted() {
    let host = Host {
        ports: Some(PortUse {
            range: [40_000, 40_001],
            to_destination: 2,
            time_wait: 2,
        }),
        ..Host::default()
    };
    let mut e = Engine::new(EngineConfig::default()).with_namespace_lookup(Box::new(host));
    // CLOSE -> SYN_SENT -> CLOSE with no local port, then connect() returns EADDRNOTAVAIL.
    let a = Sock::client(SK_A, 0);
    let events = vec![
        a.connect(MS, 100, "client"),
        a.st_by(meta(MS + 30_000, 100, "client"), S::SynSent, S::Close),
        a.connect_failed(MS + 33_000, 100, "client", libc::EADDRNOTAVAIL),
    ];
    none(feed(&mut e, events));
    let v = one(e.tick(LATER));
    check(&v, "client failed ephemeral_ports_exhausted EADDRNOTAVAIL");
    assert_eq!(
        detail(&v, "port_range"),
        serde_json::json!([40_000, 40_001])
    );
    assert_eq!(detail(&v, "sockets_to_destination"), 2);
    assert_eq!(detail(&v, "time_wait"), 2);
    assert_eq!(detail(&v, "packets_sent"), 0);
    assert_eq!(v.sport, None);
}

/// A namespace whose route to every destination is a prohibit route.
fn prohibit_route() -> Host {
    Host {
        route: Some(Route {
            kind: RouteKind::Prohibit,
            dev: None,
            gateway: None,
        }),
        ..Host::default()
    }
}

#[test]
fn eacces_is_no_route_under_a_prohibit_route_and_connect_denied_otherwise() {
    let a = Sock::client(SK_A, SPORT);
    let mut e =
        Engine::new(EngineConfig::default()).with_namespace_lookup(Box::new(prohibit_route()));
    let v = one(e.handle(a.connect_failed(MS, 100, "client", libc::EACCES)));
    check(&v, "client failed no_route EACCES");
    assert_eq!(detail(&v, "route")["kind"], "prohibit");
    let unicast = Host {
        route: Some(Route {
            kind: RouteKind::Unicast,
            dev: Some("eth0".into()),
            gateway: None,
        }),
        ..Host::default()
    };
    let mut e = Engine::new(EngineConfig::default()).with_namespace_lookup(Box::new(unicast));
    let v = one(e.handle(a.connect_failed(MS, 100, "client", libc::EPERM)));
    check(&v, "client failed connect_denied EPERM");
    assert_eq!(detail(&v, "route"), Value::Null);
    assert_eq!(detail(&v, "refused_by_cgroup_program"), Value::Null);
}

#[test]
fn a_cgroup_programs_refusal_is_connect_denied_whatever_its_errno_and_route() {
    let a = Sock::client(SK_A, SPORT);
    // A socket load-balancer's EHOSTUNREACH (a service without backends), an EACCES under a
    // prohibit route, and EPERM: each is the cgroup program's refusal.
    for (errno, name) in [
        (libc::EHOSTUNREACH, "EHOSTUNREACH"),
        (libc::EACCES, "EACCES"),
        (libc::EPERM, "EPERM"),
    ] {
        let mut e =
            Engine::new(EngineConfig::default()).with_namespace_lookup(Box::new(prohibit_route()));
        let v = one(e.handle(a.cgroup_refused(MS, 100, "client", errno)));
        check(&v, &format!("client failed connect_denied {name}"));
        assert_eq!(detail(&v, "refused_by_cgroup_program"), true, "{name}");
        assert_eq!(detail(&v, "route"), Value::Null, "{name}");
    }
}

/// The verdict of a server connection that retransmitted `(ms, bytes, sacked_out)` and then
/// timed out.
fn timed_out_after(retransmits: &[(u64, u32, u32)]) -> Verdict {
    let s = Sock::server(SK_B);
    let mut e = Engine::new(EngineConfig::default());
    feed(&mut e, server_handshake(s, MS));
    for &(ms, bytes, sacked) in retransmits {
        none(e.handle(s.data_rtx(ms * MS, bytes, sacked)));
    }
    let mut close = s.st(6 * SEC, S::Established, S::Close);
    if let KernelEvent::State { sk_err, .. } = &mut close {
        *sk_err = Some(Errno::ETIMEDOUT);
    }
    one(feed(&mut e, [close]))
}

#[test]
fn a_short_tail_that_got_through_while_full_size_segments_did_not_is_a_pmtu_blackhole() {
    // 3000 bytes, 1448 + 1448 + 104: the whole burst dropped at the hop, the tail loss probe
    // (104 bytes) SACKed, the full-size head retransmitted until the timeout.
    let v = timed_out_after(&[
        (20, 104, 0),
        (220, 1448, 1),
        (620, 1448, 1),
        (1420, 1448, 1),
    ]);
    check(&v, "server failed pmtu_blackhole ETIMEDOUT");
    assert_eq!(
        detail(&v, "retransmits"),
        serde_json::json!({"count": 4, "largest_bytes": 1448, "smallest_bytes": 104, "mss": 1448, "sacked_out": 1})
    );
    // The same retransmissions to a peer that is gone: nothing SACKed, a timeout.
    let v = timed_out_after(&[
        (20, 104, 0),
        (220, 1448, 0),
        (620, 1448, 0),
        (1420, 1448, 0),
    ]);
    check(&v, "server failed timeout ETIMEDOUT");
    // Later data SACKed, but only short segments retransmitted: loss, not the path's MTU.
    let v = timed_out_after(&[(20, 300, 2), (220, 300, 2), (620, 300, 2)]);
    check(&v, "server failed timeout ETIMEDOUT");
}

#[test]
fn only_full_size_segments_retransmitted_until_timeout_is_a_pmtu_blackhole() {
    let s = Sock::server(SK_B);
    let mut e = Engine::new(EngineConfig::default());
    feed(&mut e, server_handshake(s, MS));
    feed(&mut e, [s.accepted(3 * MS, 200, "server")]);
    // The router's "fragmentation needed", dropped by this host's INPUT.
    let too_big = DroppedPacket {
        icmp: Some(Icmp {
            icmp_type: 3,
            code: 4,
            mtu: Some(1400),
        }),
        hook: Some(NfHook::Input),
        ..drop(5 * MS, 0, s.t, 0, "NETFILTER_DROP", "nft_do_chain+0x3e8")
    };
    none(e.handle(KernelEvent::Dropped(too_big)));
    for ts in [200 * MS, 600 * MS, 1400 * MS, 3000 * MS] {
        none(e.handle(s.data_rtx(ts, 1448, 0)));
    }
    let mut close = s.st(6 * SEC, S::Established, S::Close);
    if let KernelEvent::State { sk_err, .. } = &mut close {
        *sk_err = Some(Errno::ETIMEDOUT);
    }
    let v = one(feed(&mut e, [close]));
    check(&v, "server failed pmtu_blackhole ETIMEDOUT");
    assert_eq!(
        detail(&v, "retransmits"),
        serde_json::json!({"count": 4, "largest_bytes": 1448, "smallest_bytes": 1448, "mss": 1448, "sacked_out": 0})
    );
    let answer = detail(&v, "path_answer");
    assert_eq!(answer["mtu"], 1400);
    assert_eq!(answer["dropped"]["kernel_reason"], "NETFILTER_DROP");
    assert_eq!(answer["dropped"]["hook"], "INPUT");

    // Small segments lost too: plain loss, a timeout.
    check(
        &timed_out_after(&[(200, 1448, 0), (600, 300, 0)]),
        "server failed timeout ETIMEDOUT",
    );
}

#[test]
fn an_mss_below_tcp_min_mss_is_left_out() {
    // The route went away under the connection: mss_cache fell to 36.
    let s = Sock::server(SK_B);
    let mut e = Engine::new(EngineConfig::default());
    feed(&mut e, server_handshake(s, MS));
    for (ts, mss) in [(200 * MS, 1448), (600 * MS, 36)] {
        let mut ev = s.data_rtx(ts, 300, 0);
        if let KernelEvent::Retransmit { mss: read, .. } = &mut ev {
            *read = Some(mss);
        }
        none(e.handle(ev));
    }
    let mut close = s.st(6 * SEC, S::Established, S::Close);
    if let KernelEvent::State { sk_err, .. } = &mut close {
        *sk_err = Some(Errno::ETIMEDOUT);
    }
    let v = one(feed(&mut e, [close]));
    // The last one read that a path could have is kept.
    assert_eq!(detail(&v, "retransmits")["mss"], 1448, "{v:#?}");
}

fn window(s: Sock, ts: u64, window: Window) -> KernelEvent {
    let meta = Meta {
        proc: Proc {
            pid: 0,
            comm: "".into(),
        },
        ..softirq(ts)
    };
    KernelEvent::Window {
        meta,
        tuple: s.t,
        window,
    }
}

#[test]
fn a_zero_window_past_the_stall_timeout_is_zero_window_then_resolved() {
    let c = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(EngineConfig::default());
    feed(&mut e, healthy_client(c).into_iter().take(2));
    feed(&mut e, [c.data(3 * MS, false), c.data(4 * MS, true)]);
    none(e.handle(window(c, SEC, Window::PeerZero { queued: 462_344 })));
    none(e.tick(3 * SEC));
    let v = one(e.tick(4 * SEC + MS));
    assert_eq!(v.outcome, Outcome::Stalled);
    check(&v, "client stalled zero_window -");
    assert_eq!(
        detail(&v, "window"),
        serde_json::json!({"stopped_reading": "peer", "queued_bytes": 462_344})
    );
    let v = one(e.handle(window(c, 9 * SEC, Window::Open)));
    check(&v, "client resolved zero_window -");
    assert_eq!(detail(&v, "stuck_ms"), 8000.0);
}

#[test]
fn a_window_that_opens_because_the_socket_closed_is_no_resolution() {
    // The server closed with data unread (no FIN: an abort): the poll sees the window open (the
    // socket is gone) during the close's grace period. The stall ends with the close, as a
    // failure.
    let c = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(EngineConfig::default());
    feed(&mut e, healthy_client(c).into_iter().take(2));
    feed(&mut e, [c.data(3 * MS, false), c.data(4 * MS, true)]);
    none(e.handle(window(c, SEC, Window::PeerZero { queued: 462_344 })));
    check(&one(e.tick(4 * SEC + MS)), "client stalled zero_window -");
    none(e.handle(c.st(9 * SEC, S::Established, S::Close)));
    none(e.handle(window(c, 9 * SEC + 50 * MS, Window::Open)));
    let v = one(e.tick(9 * SEC + e.cfg.grace_ns));
    check(&v, "client failed zero_window -");
    assert_eq!(
        v.kernel_reason.as_deref(),
        Some("closed from TCP_ESTABLISHED")
    );
}

#[test]
fn a_window_found_open_after_an_orderly_close_resolved_by_the_close() {
    // The reader read everything, then both ends closed in order before the next poll: the
    // stall resolved, at the close at the latest.
    let c = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(EngineConfig::default());
    feed(&mut e, healthy_client(c).into_iter().take(2));
    feed(&mut e, [c.data(3 * MS, false), c.data(4 * MS, true)]);
    none(e.handle(window(c, SEC, Window::PeerZero { queued: 462_344 })));
    check(&one(e.tick(4 * SEC + MS)), "client stalled zero_window -");
    none(feed(
        &mut e,
        [
            c.st(9 * SEC, S::Established, S::FinWait1),
            c.st(9 * SEC + MS, S::FinWait2, S::Close),
        ],
    ));
    let v = one(e.handle(window(c, 9 * SEC + 300 * MS, Window::Open)));
    check(&v, "client resolved zero_window -");
    assert_eq!(detail(&v, "stuck_ms"), 8001.0);
    none(e.tick(LATER));
}

#[test]
fn a_zero_window_ended_by_an_orderly_close_resolved_without_a_poll() {
    // The reader read everything and both ends closed before any poll saw the window open:
    // the FINs came after every byte was acknowledged, so the window had opened.
    let c = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(EngineConfig::default());
    feed(&mut e, healthy_client(c).into_iter().take(2));
    feed(&mut e, [c.data(3 * MS, false), c.data(4 * MS, true)]);
    none(e.handle(window(c, SEC, Window::PeerZero { queued: 462_344 })));
    check(&one(e.tick(4 * SEC + MS)), "client stalled zero_window -");
    none(feed(
        &mut e,
        [
            c.st(9 * SEC, S::Established, S::FinWait1),
            c.st(9 * SEC + MS, S::FinWait2, S::Close),
        ],
    ));
    let v = one(e.tick(LATER));
    check(&v, "client resolved zero_window -");
    assert_eq!(detail(&v, "stuck_ms"), 8001.0);
}

#[test]
fn a_neighbour_failure_just_after_the_close_still_explains_it() {
    // tcp_syn_retries=1: the SYN budget and the ARP budget end in the same tick; the socket
    // closes with ETIMEDOUT 18 us before the queued SYN is freed with NEIGH_FAILED.
    let a = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(EngineConfig::default());
    feed(&mut e, [a.connect(MS, 100, "client")]);
    none(feed(
        &mut e,
        [
            a.st(3 * SEC, S::SynSent, S::Close),
            a.err(3 * SEC + 18_000, 110),
        ],
    ));
    let d = drop(
        3 * SEC + 49_000,
        SK_A,
        a.t,
        SYN,
        "NEIGH_FAILED",
        "neigh_invalidate+0x8f",
    );
    none(e.handle(KernelEvent::Dropped(d)));
    let v = one(e.tick(3 * SEC + e.cfg.grace_ns));
    check(&v, "client failed neighbour_failed ETIMEDOUT");
    assert!(e.take_drops().is_empty(), "joined, not a separate record");
}

#[test]
fn segments_crossing_a_close_are_normal_where_they_are_freed() {
    let mut e = Engine::new(EngineConfig::default());
    // A FIN for a TIME_WAIT socket, a late ACK for a closed one: normal, not printed.
    for (i, (reason, at)) in [
        ("NOT_SPECIFIED", "tcp_v4_rcv+0x6c1"),
        ("TCP_FLAGS", "tcp_v4_do_rcv+0x2b4"),
    ]
    .into_iter()
    .enumerate()
    {
        let d = drop(MS, 0, tuple(SPORT + i as u16, 3306), ACK | 0x01, reason, at);
        none(e.handle(KernelEvent::Dropped(d)));
    }
    assert!(e.take_drops().is_empty());
    // The same reasons elsewhere, or for a SYN, are no normal part of TCP.
    let d = drop(
        MS,
        0,
        tuple(SPORT + 5, 3306),
        ACK,
        "NOT_SPECIFIED",
        "ip_rcv_core+0x1",
    );
    none(e.handle(KernelEvent::Dropped(d)));
    assert_eq!(e.take_drops().len(), 1);
}

#[test]
fn a_queue_purged_without_a_reason_on_6_1_is_normal() {
    // 6.1 has no QUEUE_PURGE: the ICMP error a failed connect's socket kept in its error queue
    // is freed with NOT_SPECIFIED in skb_queue_purge when the socket goes (no TCP flags: the
    // queued copy's transport header is the ICMP message's).
    let mut e = Engine::new(EngineConfig::default());
    let d = drop(
        MS,
        0,
        tuple(SPORT, 3306),
        0,
        "NOT_SPECIFIED",
        "skb_queue_purge+0x15",
    );
    none(e.handle(KernelEvent::Dropped(d)));
    assert!(e.take_drops().is_empty());
    assert_eq!(e.summary().drops_by_reason.len(), 1, "counted");
    // A function whose name only starts the same is another place.
    let d = drop(
        MS,
        0,
        tuple(SPORT + 1, 3306),
        0,
        "NOT_SPECIFIED",
        "skb_queue_purge_reason+0x15",
    );
    none(e.handle(KernelEvent::Dropped(d)));
    assert_eq!(e.take_drops().len(), 1);
}

#[test]
fn drops_that_are_a_normal_part_of_tcp_are_counted_not_printed() {
    let mut e = Engine::new(EngineConfig::default());
    for (i, reason) in ["QUEUE_PURGE", "TCP_OLD_SEQUENCE", "TCP_OLD_DATA"]
        .iter()
        .enumerate()
    {
        let d = drop(
            MS * (i as u64 + 1),
            0,
            tuple(SPORT + i as u16, 3306),
            ACK,
            reason,
            "x",
        );
        none(e.handle(KernelEvent::Dropped(d)));
    }
    assert!(e.take_drops().is_empty());
    assert_eq!(e.summary().drops_by_reason.len(), 3);
    let mut e = Engine::new(config(|c| c.show_normal_drops = true));
    let d = drop(
        MS,
        0,
        tuple(SPORT, 3306),
        ACK,
        "QUEUE_PURGE",
        "sk_stream_kill_queues+0x5e",
    );
    none(e.handle(KernelEvent::Dropped(d)));
    assert_eq!(e.take_drops().len(), 1, "--show-normal-drops prints them");
}

#[test]
fn any_other_drop_of_a_handshake_is_kernel_drop_with_its_location() {
    let mut e = Engine::new(EngineConfig::default());
    let d = drop(
        MS,
        0,
        syn_to_server(SPORT),
        SYN,
        "SECURITY_HOOK",
        "security_sock_rcv_skb+0x31",
    );
    none(e.handle(KernelEvent::Dropped(d)));
    let v = one(e.tick(10 * SEC));
    check(&v, "server failed kernel_drop -");
    assert_eq!(v.kernel_reason.as_deref(), Some("SECURITY_HOOK"));
    assert_eq!(detail(&v, "location"), "security_sock_rcv_skb+0x31");
    // A stray segment (no SYN) dropped for such a reason opens no attempt: a record.
    let d = drop(
        MS,
        0,
        syn_to_server(SPORT + 1),
        ACK,
        "TCP_INVALID_SEQUENCE",
        "tcp_validate_incoming+0x1",
    );
    none(e.handle(KernelEvent::Dropped(d)));
    assert_eq!(e.take_drops().len(), 1);
    none(e.finish(LATER));
}

#[test]
fn a_packet_dropped_on_arrival_in_another_namespace_is_not_its_senders_outgoing_drop() {
    // The client's SYN crossed a veth into a namespace that owns neither end (a wrong
    // neighbour entry sent it there) and was dropped as OTHERHOST before IP orphaned it: the
    // drop still names the client's socket.
    let bystander = Host {
        local: vec![ip(3)],
        ..Host::default()
    };
    let mut e = Engine::new(EngineConfig::default()).with_namespace_lookup(Box::new(bystander));
    let a = Sock::client(SK_A, SPORT);
    none(feed(&mut e, [a.connect(MS, 100, "client")]));
    let mut d = drop(2 * MS, SK_A, a.t, SYN, "OTHERHOST", "ip_rcv_core+0x22c");
    d.sk_port = Some(SPORT);
    d.sk_state = Some(S::SynSent);
    d.meta.netns = Some(NETNS + 1);
    none(e.handle(KernelEvent::Dropped(d)));
    feed(
        &mut e,
        [a.st(3 * SEC, S::SynSent, S::Close), a.err(3 * SEC, 110)],
    );
    // One verdict, the client's, in its own namespace, with the drop on its path.
    let v = one(e.tick(LATER));
    check(&v, "client failed syn_timeout ETIMEDOUT");
    assert_eq!(v.netns, Some(NETNS));
    let path = detail(&v, "path_drops");
    assert_eq!(
        (&path[0]["kernel_reason"], &path[0]["netns"]),
        (&"OTHERHOST".into(), &(NETNS + 1).into())
    );
    none(e.finish(LATER));
    assert_eq!(e.summary().forwarded_drops, 1);
}
