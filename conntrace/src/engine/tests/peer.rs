//! Established connections whose end the drops explain: their own, or, where conntrace sees
//! both ends on one host, the other end's (a firewall change in the server's namespace).

use super::*;
use crate::engine::{
    facts::{DroppedPacket, NfHook},
    lookup::{Confidence, RuleAction, RuleFinding, RuleLookup, RuleQuery},
};

/// The server's namespace: the client's is `NETNS`.
const SERVER_NETNS: u32 = NETNS + 1;

fn in_server(ts: u64) -> Meta {
    Meta {
        netns: Some(SERVER_NETNS),
        ..softirq(ts)
    }
}

/// The client `c` and its server's end (its tuple reversed, in `SERVER_NETNS`), established.
fn established(c: Sock) -> Vec<KernelEvent> {
    let server = |old, new| KernelEvent::state(in_server(2 * MS), SK_B, c.t.reversed(), old, new);
    vec![
        c.connect(MS, 100, "client"),
        server(S::Listen, S::SynRecv),
        server(S::SynRecv, S::Established),
        c.st(2 * MS, S::SynSent, S::Established),
    ]
}

/// A packet of `c` (as it travelled) dropped by netfilter at `hook`: in the server's INPUT, or
/// in the client's own OUTPUT.
fn dropped(c: Sock, ts: u64, hook: NfHook) -> KernelEvent {
    let out = hook == NfHook::Output;
    KernelEvent::Dropped(DroppedPacket {
        meta: if out { softirq(ts) } else { in_server(ts) },
        sk: if out { c.sk } else { SK_B },
        rx_sk: 0,
        sk_port: Some(if out { c.t.sport } else { c.t.dport }),
        sk_state: Some(S::Established),
        packet: c.t,
        reason: DropReason::new(DropReason::NETFILTER_DROP),
        location: "nft_do_chain+0x3e8".into(),
        tcp_flags: TcpFlags(0x18),
        hook: Some(hook),
        ifindex: None,
        icmp: None,
    })
}

fn close(c: Sock, ts: u64, errno: i32) -> KernelEvent {
    close_from(c, ts, S::Established, errno)
}

fn close_from(c: Sock, ts: u64, old: S, errno: i32) -> KernelEvent {
    c.closed(ts, old, Some(errno))
}

/// Names one rule of the server's INPUT chain (with the action given) for every look-up.
struct OneRule(RuleAction);

impl RuleLookup for OneRule {
    fn find(&mut self, _: &RuleQuery) -> RuleFinding {
        RuleFinding::Rule {
            rule: super::drops::rule(self.0.clone()),
            confidence: Confidence::Exact,
        }
    }
}

fn run_with(rule: Option<RuleAction>, events: Vec<KernelEvent>) -> Verdict {
    let mut e = Engine::new(EngineConfig::default());
    if let Some(action) = rule {
        e = e.with_rule_lookup(Box::new(OneRule(action)));
    }
    let mut out = feed(&mut e, events);
    out.extend(e.tick(LATER));
    one(out.into_iter().filter(|v| v.netns == Some(NETNS)).collect())
}

#[test]
fn bulk_data_dropped_at_the_server_is_netfilter_drop_there_not_a_path_mtu_black_hole() {
    // Full-size segments retransmitted until the client gives up: a black hole's pattern,
    // but the server's namespace dropped each of them.
    let c = Sock::client(SK_A, SPORT);
    let mut events = established(c);
    for (i, ts) in [SEC, 2 * SEC, 4 * SEC].into_iter().enumerate() {
        events.push(dropped(c, ts - MS * (i as u64 + 1), NfHook::Input));
        events.push(c.data_rtx(ts, 1448, 0));
    }
    events.push(close(c, 8 * SEC, 110));
    let v = run_with(Some(RuleAction::Drop), events);
    check(&v, "client failed netfilter_drop ETIMEDOUT");
    assert_eq!(detail(&v, "peer_netns"), SERVER_NETNS, "{v:#?}");
    assert_eq!(detail(&v, "hook"), "INPUT");
    assert_eq!(detail(&v, "dropped"), 3);
    assert_eq!(detail(&v, "retransmits")["count"], 3);
    // Without the server's drops it is the black hole it looks like.
    let mut events = established(c);
    events.extend([SEC, 2 * SEC, 4 * SEC].map(|ts| c.data_rtx(ts, 1448, 0)));
    events.push(close(c, 8 * SEC, 110));
    check(
        &run_with(None, events),
        "client failed pmtu_blackhole ETIMEDOUT",
    );
}

#[test]
fn a_reset_from_a_reject_rule_at_the_server_is_netfilter_reject_not_the_peer_aborting() {
    let c = Sock::client(SK_A, SPORT);
    let mut events = established(c);
    events.extend([
        dropped(c, SEC, NfHook::Input),
        c.rst(SEC + 10_000),
        close(c, SEC + 10_000, 104),
    ]);
    let with = RuleAction::Reject {
        with: "tcp-reset".into(),
    };
    let v = run_with(Some(with), events.clone());
    check(&v, "client failed netfilter_reject ECONNRESET");
    assert_eq!(detail(&v, "reject_with"), "tcp-reset");
    assert_eq!(detail(&v, "peer_netns"), SERVER_NETNS);
    assert_eq!(detail(&v, "rst_received_in"), "TCP_ESTABLISHED");
    // A DROP rule sends no RST: the reset is the server's own.
    check(
        &run_with(Some(RuleAction::Drop), events),
        "client failed reset_by_peer ECONNRESET",
    );
}

#[test]
fn a_reset_after_the_clients_own_output_dropped_its_packet_is_netfilter_reject() {
    // REJECT --reject-with tcp-reset in the client's OUTPUT: the rule drops the segment and
    // answers the socket with a RST that looks like the server's. No rule named: still the
    // rule's answer.
    let c = Sock::client(SK_A, SPORT);
    let mut events = established(c);
    events.extend([
        dropped(c, SEC, NfHook::Output),
        c.rst(SEC),
        close(c, SEC, 104),
    ]);
    let v = run_with(None, events);
    check(&v, "client failed netfilter_reject ECONNRESET");
    assert_eq!(detail(&v, "hook"), "OUTPUT");
    assert_eq!(detail(&v, "peer_netns"), Value::Null, "its own namespace");
}

#[test]
fn an_established_connection_answered_with_icmp_is_icmp_unreachable_or_the_reject_behind_it() {
    // The kernel keeps an established socket's ICMP errors as soft errors and reports the last
    // one instead of ETIMEDOUT when its retransmissions run out.
    let c = Sock::client(SK_A, SPORT);
    let mut events = established(c);
    events.push(close(c, 6 * SEC, 111));
    let v = run_with(None, events.clone());
    check(&v, "client failed icmp_unreachable ECONNREFUSED");
    assert_eq!(detail(&v, "icmp"), "port-unreachable");
    let with = RuleAction::Reject {
        with: "icmp-port-unreachable".into(),
    };
    events.insert(4, dropped(c, SEC, NfHook::Input));
    let v = run_with(Some(with), events);
    check(&v, "client failed netfilter_reject ECONNREFUSED");
    assert_eq!(detail(&v, "peer_netns"), SERVER_NETNS);
    assert_eq!(detail(&v, "icmp"), "port-unreachable", "the rule's answer");
}

#[test]
fn drops_long_before_the_end_were_recovered_from_and_explain_nothing() {
    // The server's firewall dropped two segments, retransmitted and delivered; ten minutes
    // later the connection died of something else.
    let c = Sock::client(SK_A, SPORT);
    let mut events = established(c);
    events.push(dropped(c, SEC, NfHook::Input));
    events.push(close(c, 600 * SEC, 110));
    check(
        &run_with(Some(RuleAction::Drop), events),
        "client failed timeout ETIMEDOUT",
    );
}

#[test]
fn a_servers_own_abort_after_an_unnamed_rule_dropped_a_retransmission_is_reset_by_peer() {
    // A DROP rule without counters (not named) at the server, and the server application
    // aborting half a second after the last drop: the RST is the server's, not a REJECT's.
    let c = Sock::client(SK_A, SPORT);
    let mut events = established(c);
    events.extend([
        dropped(c, SEC, NfHook::Input),
        c.rst(SEC + 500 * MS),
        close(c, SEC + 500 * MS, 104),
    ]);
    check(
        &run_with(None, events),
        "client failed reset_by_peer ECONNRESET",
    );
}

#[test]
fn an_icmpv6_administratively_prohibited_end_is_icmp_unreachable_with_its_kind() {
    let c = Sock::client(SK_A, SPORT);
    let mut events = established(c);
    events.push(close(c, 6 * SEC, 13));
    let v = run_with(None, events);
    check(&v, "client failed icmp_unreachable EACCES");
    assert_eq!(detail(&v, "icmp"), "prohibited");
    assert!(detail(&v, "established_ms").is_number(), "{v:#?}");
}

/// The server's sock_diag: an established socket holds the server's end of `c`.
struct ServerHolds(FourTuple);

impl ListenerLookup for ServerHolds {
    fn listening_on(&mut self, _netns: Option<u32>, _port: u16) -> Vec<Listener> {
        Vec::new()
    }

    fn socket_state(&mut self, netns: Option<u32>, tuple: FourTuple) -> Option<S> {
        (netns == Some(SERVER_NETNS) && tuple == self.0).then_some(S::Established)
    }
}

/// A packet of `c` (TCP flags `flags`) dropped at the server's `hook` before it reached a
/// socket: the raw table's PREROUTING runs before early demux, and a SYN or a final ACK has no
/// connection yet, so the kernel could not tell whose it was.
fn socketless(c: Sock, ts: u64, hook: NfHook, flags: u8) -> KernelEvent {
    let KernelEvent::Dropped(d) = dropped(c, ts, hook) else {
        unreachable!("a drop")
    };
    KernelEvent::Dropped(DroppedPacket {
        sk: 0,
        sk_port: None,
        sk_state: None,
        tcp_flags: TcpFlags(flags),
        ..d
    })
}

/// A data segment of `c` dropped in the server's raw PREROUTING.
fn dropped_before_demux(c: Sock, ts: u64) -> KernelEvent {
    socketless(c, ts, NfHook::PreRouting, 0x18)
}

#[test]
fn drops_before_the_servers_socket_of_a_connection_kept_in_the_kernel_explain_the_clients_end() {
    // Quiet mode: the server's end is healthy, kept in the kernel, unknown here. Its raw
    // PREROUTING drops the client's data; the packets reach no socket.
    let c = Sock::client(SK_A, SPORT);
    let mut events = vec![
        c.connect(MS, 100, "client"),
        c.st(2 * MS, S::SynSent, S::Established),
    ];
    for (i, ts) in [SEC, 2 * SEC, 4 * SEC].into_iter().enumerate() {
        events.push(dropped_before_demux(c, ts - MS * (i as u64 + 1)));
        events.push(c.data_rtx(ts, 1448, 0));
    }
    events.push(close(c, 8 * SEC, 110));
    let mut e = Engine::new(EngineConfig::default())
        .with_rule_lookup(Box::new(OneRule(RuleAction::Drop)))
        .with_listener_lookup(Box::new(ServerHolds(c.t.reversed())));
    let mut out = feed(&mut e, events.clone());
    out.extend(e.tick(LATER));
    // One verdict: no handshake attempt of the server's (its "final ACK" dropped).
    let v = one(out);
    check(&v, "client failed netfilter_drop ETIMEDOUT");
    assert_eq!(detail(&v, "peer_netns"), SERVER_NETNS, "{v:#?}");
    assert_eq!(detail(&v, "hook"), "PREROUTING");
    assert_eq!(detail(&v, "dropped"), 3);
}

#[test]
fn a_connection_followed_later_takes_the_drops_kept_for_it() {
    // The server's end streams once its history comes (here: its state change to CLOSE
    // after a reset): the drops kept while it was not followed are its own late drops.
    let c = Sock::client(SK_A, SPORT);
    let server = c.t.reversed();
    let mut e =
        Engine::new(EngineConfig::default()).with_listener_lookup(Box::new(ServerHolds(server)));
    none(e.handle(dropped_before_demux(c, SEC)));
    let mut out = feed(
        &mut e,
        [KernelEvent::State {
            meta: in_server(2 * SEC),
            sk: SK_B,
            tuple: server,
            old: S::Established,
            new: S::Close,
            sk_err: Some(Errno(110)),
            sk_err_soft: None,
            closing: None,
            route: Default::default(),
        }],
    );
    out.extend(e.tick(LATER));
    let v = one(out);
    check(&v, "server failed netfilter_drop ETIMEDOUT");
    assert_eq!(detail(&v, "peer_netns"), Value::Null, "its own namespace");
}

#[test]
fn a_stall_whose_final_ack_the_server_dropped_names_the_rule_there() {
    // The server's INPUT drops the client's final ACK (and its repeats): the server never
    // has the connection, the client waits for a greeting. The stall stays the reason; the
    // drops at the other end say why.
    let c = Sock::client(SK_A, SPORT);
    let ack = |ts: u64| socketless(c, ts, NfHook::Input, 0x10);
    let mut e =
        Engine::new(EngineConfig::default()).with_rule_lookup(Box::new(OneRule(RuleAction::Drop)));
    none(feed(
        &mut e,
        [
            c.connect(MS, 100, "client"),
            c.st(2 * MS, S::SynSent, S::Established),
            ack(2 * MS),
            ack(SEC + 2 * MS),
        ],
    ));
    let v = one(e.tick(3 * SEC + 2 * MS));
    check(&v, "client stalled stalled_no_greeting -");
    assert_eq!(detail(&v, "peer_netns"), SERVER_NETNS, "{v:#?}");
    assert_eq!(detail(&v, "hook"), "INPUT");
    assert_eq!(detail(&v, "dropped"), 2);
    assert_eq!(detail(&v, "rule")["chain"], "INPUT");
    // The server's attempt ends (its handshake never completed), then the client gives up:
    // its last word still names the drop.
    check(&one(e.tick(10 * SEC)), "server failed netfilter_drop -");
    let mut out = feed(&mut e, [close(c, 12 * SEC, 104)]);
    out.extend(e.tick(LATER));
    let v = one(out);
    check(&v, "client failed stalled_no_greeting ECONNRESET");
    assert_eq!(detail(&v, "peer_netns"), SERVER_NETNS, "{v:#?}");
    assert_eq!(detail(&v, "hook"), "INPUT");
    // A stall with nothing dropped at the other end names no drop.
    let other = Sock::client(SK_B, SPORT + 1);
    let mut e = Engine::new(EngineConfig::default());
    none(feed(
        &mut e,
        [
            other.connect(MS, 100, "client"),
            other.st(2 * MS, S::SynSent, S::Established),
        ],
    ));
    let v = one(e.tick(3 * SEC + 2 * MS));
    assert_eq!(detail(&v, "hook"), Value::Null, "{v:#?}");
}

/// Client `c` connects; a DROP rule drops its SYN and its retransmission (`syn(ts)`: the drop
/// event) and it times out 3 s later. Every verdict, the run's end included.
fn syns_dropped_until_timeout(c: Sock, syn: impl Fn(u64) -> KernelEvent) -> Vec<Verdict> {
    let mut e =
        Engine::new(EngineConfig::default()).with_rule_lookup(Box::new(OneRule(RuleAction::Drop)));
    let mut out = feed(
        &mut e,
        [
            c.connect(MS, 100, "client"),
            syn(MS),
            syn(SEC + MS),
            close_from(c, 3 * SEC + MS, S::SynSent, 110),
        ],
    );
    out.extend(e.tick(LATER));
    out
}

#[test]
fn a_syn_timeout_whose_syns_the_servers_rule_dropped_names_it_there() {
    // The server's INPUT drops every SYN: the client can only time out (its reason stays),
    // and the server's attempt, seen on this host, says where and which rule.
    let c = Sock::client(SK_A, SPORT);
    let out = syns_dropped_until_timeout(c, |ts| socketless(c, ts, NfHook::Input, 0x02));
    let client: Vec<Verdict> = out.into_iter().filter(|v| v.netns == Some(NETNS)).collect();
    let v = one(client);
    check(&v, "client failed syn_timeout ETIMEDOUT");
    assert_eq!(detail(&v, "peer_netns"), SERVER_NETNS, "{v:#?}");
    assert_eq!(detail(&v, "hook"), "INPUT");
    assert_eq!(detail(&v, "dropped"), 2);
}

#[test]
fn a_loopback_syn_timeout_names_the_rule_of_its_own_namespace() {
    // Client and server in one namespace (127.0.0.1): its INPUT drops the SYNs. The server's
    // attempt there is the other end's.
    let c = Sock::client(SK_A, SPORT);
    let syn = |ts: u64| {
        let KernelEvent::Dropped(d) = socketless(c, ts, NfHook::Input, 0x02) else {
            unreachable!("a drop")
        };
        KernelEvent::Dropped(DroppedPacket {
            meta: softirq(ts),
            ..d
        })
    };
    let out = syns_dropped_until_timeout(c, syn);
    let client: Vec<Verdict> = out
        .into_iter()
        .filter(|v| v.side == crate::engine::verdict::Side::Client)
        .collect();
    let v = one(client);
    check(&v, "client failed syn_timeout ETIMEDOUT");
    assert_eq!(detail(&v, "peer_netns"), NETNS, "{v:#?}");
    assert_eq!(detail(&v, "hook"), "INPUT");
    assert_eq!(detail(&v, "rule")["chain"], "INPUT");
}

#[test]
fn a_refusal_whose_syn_the_servers_reject_rule_dropped_is_netfilter_reject() {
    // `REJECT --reject-with tcp-reset` in the server's INPUT, a listener there: the client
    // gets a RST as from a closed port, but its SYN was dropped by the rule.
    let c = Sock::client(SK_A, SPORT);
    let syn = socketless(c, MS + 100, NfHook::Input, 0x02);
    let refused = |rule| {
        let mut events = vec![syn.clone()];
        events.extend(refused_client(c, MS, 100));
        run_with(rule, events)
    };
    let with = "tcp-reset".to_owned();
    let v = refused(Some(RuleAction::Reject { with }));
    check(&v, "client failed netfilter_reject ECONNREFUSED");
    assert_eq!(detail(&v, "peer_netns"), SERVER_NETNS, "{v:#?}");
    assert_eq!(detail(&v, "reject_with"), "tcp-reset");
    assert_eq!(detail(&v, "hook"), "INPUT");
    assert_eq!(detail(&v, "rule")["chain"], "INPUT");
    // The rule not named (no counters): still the REJECT's RST.
    let v = refused(None);
    check(&v, "client failed netfilter_reject ECONNREFUSED");
    assert_eq!(detail(&v, "peer_netns"), SERVER_NETNS);
    // Nothing dropped at the other end: a closed port's RST.
    let mut e = Engine::new(EngineConfig::default());
    let v = one(feed(&mut e, refused_client(c, MS, 100)));
    check(&v, "client failed refused_no_listener ECONNREFUSED");
    assert_eq!(detail(&v, "peer_netns"), Value::Null);
}
