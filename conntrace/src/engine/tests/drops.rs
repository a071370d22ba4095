//! Dropped packets: joined to their handshake, gathered per attempt, or reported alone.

use super::*;
use crate::engine::{
    facts::{DroppedPacket, NfHook, TcpFlags},
    lookup::{Confidence, FirewallRule, Listener, RuleAction, RuleFinding, RuleLookup, RuleQuery},
    verdict::Direction,
};

const NETFILTER_DROP: &str = DropReason::NETFILTER_DROP;
const LISTEN_OVERFLOW: &str = DropReason::TCP_LISTEN_OVERFLOW;
const NEIGH_FAILED: &str = DropReason::NEIGH_FAILED;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn dropped(ts: u64, sk: u64, packet: FourTuple, flags: u8, reason: &str) -> KernelEvent {
    KernelEvent::Dropped(DroppedPacket {
        meta: softirq(ts),
        sk,
        rx_sk: 0,
        sk_port: None,
        sk_state: None,
        packet,
        reason: DropReason::new(reason),
        location: "nft_do_chain+0x3e8".into(),
        tcp_flags: TcpFlags(flags),
        hook: (reason == NETFILTER_DROP).then_some(NfHook::Input),
        ifindex: None,
        icmp: None,
    })
}

/// The client's packets as the server (10.77.0.2:3306) receives them.
fn from_client() -> FourTuple {
    tuple(SPORT, 3306)
}

/// Answers every look-up with the same finding, and counts the look-ups.
struct FixedRules(RuleFinding, std::rc::Rc<std::cell::Cell<u32>>);

impl RuleLookup for FixedRules {
    fn find(&mut self, q: &RuleQuery) -> RuleFinding {
        assert_eq!((q.hook, q.ipv6), (Some(NfHook::Input), false));
        self.1.set(self.1.get() + 1);
        self.0.clone()
    }
}

/// One rule, named for sure.
fn exact(rule: FirewallRule) -> RuleFinding {
    RuleFinding::Rule {
        rule,
        confidence: Confidence::Exact,
    }
}

/// Rule 4 of ip filter INPUT, `tcp dport 3306 drop`, its counter at 2 (the action as given).
pub(super) fn rule(action: RuleAction) -> FirewallRule {
    FirewallRule {
        comment: None,
        backend: Default::default(),
        iptables: None,
        family: "ip".into(),
        table: "filter".into(),
        chain: "INPUT".into(),
        handle: 4,
        text: "tcp dport 3306 drop".into(),
        action,
        packets: 2,
    }
}

#[test]
fn syns_of_one_attempt_dropped_by_input_make_one_verdict_when_the_backoff_is_overdue() {
    let looked = std::rc::Rc::new(std::cell::Cell::new(0));
    let finding = exact(rule(RuleAction::Drop));
    let mut e = Engine::new(EngineConfig::default())
        .with_rule_lookup(Box::new(FixedRules(finding, looked.clone())));
    none(e.handle(dropped(MS, 0, from_client(), SYN, NETFILTER_DROP)));
    none(e.handle(dropped(SEC + MS, 0, from_client(), SYN, NETFILTER_DROP)));
    // The next SYN is due about 2 s after the last: not over yet at +3 s.
    none(e.tick(SEC + 3 * SEC));
    let v = one(e.tick(SEC + 5 * SEC));
    check(&v, "server failed netfilter_drop -");
    assert_eq!(who(&v), "-/- 10.77.0.2:3306>10.77.0.1:40000");
    assert_eq!(v.kernel_reason.as_deref(), Some(NETFILTER_DROP));
    assert_eq!((v.syn_retransmits, v.duration_ms), (1, 1000.0));
    assert_eq!(detail(&v, "hook"), "INPUT");
    assert_eq!(detail(&v, "dropped"), 2);
    assert_eq!(detail(&v, "rule")["text"], "tcp dport 3306 drop");
    assert_eq!(detail(&v, "drops")[0]["tcp_flags"], "SYN");
    assert_eq!(looked.get(), 1, "the rule is looked up once per verdict");
    assert!(
        e.take_drops().is_empty(),
        "attributed drops are not drop records"
    );
    assert_eq!(
        e.summary()
            .drops_by_reason
            .get(&DropReason::new(NETFILTER_DROP)),
        Some(&2)
    );
}

#[test]
fn a_reject_rule_makes_netfilter_reject_with_its_type() {
    let with = "icmp-host-prohibited".to_owned();
    let finding = exact(rule(RuleAction::Reject { with }));
    let rules = FixedRules(finding, Default::default());
    let mut e = Engine::new(EngineConfig::default()).with_rule_lookup(Box::new(rules));
    none(e.handle(dropped(MS, 0, from_client(), SYN, NETFILTER_DROP)));
    let v = one(e.finish(2 * MS));
    check(&v, "server failed netfilter_reject -");
    assert_eq!(detail(&v, "reject_with"), "icmp-host-prohibited");
}

#[test]
fn rules_not_found_or_several_are_said_so() {
    let why = "no rule counted".to_owned();
    let rules = FixedRules(RuleFinding::NotFound { why }, Default::default());
    let mut e = Engine::new(EngineConfig::default()).with_rule_lookup(Box::new(rules));
    none(e.handle(dropped(MS, 0, from_client(), SYN, NETFILTER_DROP)));
    let v = one(e.finish(2 * MS));
    check(&v, "server failed netfilter_drop -");
    assert_eq!(detail(&v, "rule_not_found"), "no rule counted");

    let both = vec![rule(RuleAction::Drop), rule(RuleAction::Drop)];
    let rules = FixedRules(
        RuleFinding::Candidates {
            rules: both,
            confidence: Confidence::Ambiguous,
        },
        Default::default(),
    );
    let mut e = Engine::new(EngineConfig::default()).with_rule_lookup(Box::new(rules));
    none(e.handle(dropped(MS, 0, from_client(), SYN, NETFILTER_DROP)));
    let v = one(e.finish(2 * MS));
    assert_eq!(
        detail(&v, "rule_candidates").as_array().map(Vec::len),
        Some(2)
    );
}

#[test]
fn client_syns_dropped_in_output_make_its_timeout_a_netfilter_drop() {
    let c = Sock::client(SK_A, SPORT);
    let mut out = Vec::new();
    let mut e = Engine::new(EngineConfig::default());
    let out_drop = |ts| {
        let mut ev = dropped(ts, SK_A, tuple(SPORT, DPORT), SYN, NETFILTER_DROP);
        if let KernelEvent::Dropped(d) = &mut ev {
            d.hook = Some(NfHook::Output);
        }
        ev
    };
    out.extend(e.handle(c.connect(MS, 100, "client")));
    out.extend(e.handle(out_drop(2 * MS)));
    out.extend(e.handle(c.rtx(SEC)));
    out.extend(e.handle(out_drop(SEC)));
    out.extend(e.handle(c.err(3 * SEC, 110)));
    out.extend(e.handle(c.st(3 * SEC, S::SynSent, S::Close)));
    out.extend(e.tick(LATER));
    let v = one(out);
    check(&v, "client failed netfilter_drop ETIMEDOUT");
    assert_eq!(who(&v), "100/client 10.77.0.1:40000>10.77.0.2:8080");
    assert_eq!(detail(&v, "hook"), "OUTPUT");
    assert_eq!(detail(&v, "drops")[0]["direction"], "out");
    assert_eq!(detail(&v, "dropped"), 2);
    assert!(e.take_drops().is_empty());
}

#[test]
fn unanswered_neighbour_resolution_is_neighbour_failed() {
    let c = Sock::client(SK_A, SPORT);
    let events = vec![
        c.connect(MS, 100, "client"),
        dropped(3 * SEC, SK_A, tuple(SPORT, DPORT), SYN, NEIGH_FAILED),
        c.err(3 * SEC, 113),
        c.st(3 * SEC, S::SynSent, S::Close),
    ];
    let v = run_default(events.clone());
    check(&v, "client failed neighbour_failed EHOSTUNREACH");
    assert_eq!(v.kernel_reason.as_deref(), Some(NEIGH_FAILED));
    assert_eq!(detail(&v, "next_hop"), Value::Null, "no route read");
    // Through a gateway (`ip route add 10.77.0.2/32 via 10.77.0.77`): resolution failed for
    // that router, whose address the verdict names.
    for (gateway, next_hop) in [(Some(ip(77)), "10.77.0.77".into()), (None, Value::Null)] {
        let ns = super::namespaces::FakeNamespaces::new().route(move |_| {
            let unicast = crate::engine::lookup::RouteKind::Unicast;
            Some(super::namespaces::route(unicast, gateway))
        });
        let mut e = Engine::new(EngineConfig::default()).with_namespace_lookup(Box::new(ns));
        let mut out = feed(&mut e, events.clone());
        out.extend(e.tick(LATER));
        assert_eq!(detail(&one(out), "next_hop"), next_hop);
    }
}

#[test]
fn a_refusal_is_not_blamed_on_a_drop() {
    let c = Sock::client(SK_A, SPORT);
    let events = vec![
        c.connect(MS, 100, "client"),
        dropped(2 * MS, SK_A, tuple(SPORT, DPORT), SYN, NETFILTER_DROP),
        c.rst(SEC),
        c.err(SEC, 111),
        c.st(SEC, S::SynSent, S::Close),
    ];
    let v = run_default(events);
    check(&v, "client failed refused_no_listener ECONNREFUSED");
    assert_eq!(detail(&v, "drops")[0]["kernel_reason"], NETFILTER_DROP);
}

struct Backlog;

impl ListenerLookup for Backlog {
    fn listening_on(&mut self, _netns: Option<u32>, port: u16) -> Vec<Listener> {
        vec![Listener {
            addr: std::net::SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            pid: Some(300),
            comm: Some("ct-server".into()),
            accept_queue: Some(2),
            backlog: Some(1),
            v6only: None,
        }]
    }
}

#[test]
fn a_full_accept_queue_is_listen_overflow_with_queue_and_backlog() {
    let mut e = Engine::new(EngineConfig::default()).with_listener_lookup(Box::new(Backlog));
    // The SYN, then (another attempt) a final ACK, both dropped for the full queue.
    none(e.handle(dropped(MS, 0, from_client(), SYN, LISTEN_OVERFLOW)));
    none(e.handle(dropped(MS, 0, tuple(SPORT + 1, 3306), ACK, LISTEN_OVERFLOW)));
    let mut v = e.finish(2 * MS);
    v.sort_by_key(|v| v.dport);
    assert_eq!(v.len(), 2);
    for v in &v {
        check(v, "server failed listen_overflow -");
        assert_eq!(
            (detail(v, "accept_queue"), detail(v, "backlog")),
            (2.into(), 1.into())
        );
        assert_eq!(detail(v, "listener")["comm"], "ct-server");
    }
}

#[test]
fn an_attempt_that_gets_through_hands_its_drops_to_the_connection() {
    let s = Sock::server(SK_B);
    let mut e = Engine::new(config(|c| c.report_established = true));
    // Server view of the client 10.77.0.2:51000 -> 10.77.0.1:3306.
    let syn = FourTuple {
        saddr: ip(2),
        sport: 51_000,
        daddr: ip(1),
        dport: 3306,
    };
    none(e.handle(dropped(MS, 0, syn, SYN, LISTEN_OVERFLOW)));
    feed(&mut e, server_handshake(s, SEC));
    let v = one(e.handle(s.accepted(2 * SEC, 300, "ct-server")));
    check(&v, "server established established -");
    assert_eq!(detail(&v, "drops")[0]["kernel_reason"], LISTEN_OVERFLOW);
    none(e.finish(LATER));
}

#[test]
fn an_icmp_error_about_an_unfollowed_handshake_is_a_record_never_an_attempt() {
    // The server's REJECT answered the client's SYN with a port unreachable, which the
    // client's own INPUT rule dropped; quiet mode does not follow the handshake yet (no
    // retransmission). The error quotes the client's SYN: this host's end first.
    let mut e = Engine::new(EngineConfig::default());
    let mut ev = dropped(MS, 0, tuple(SPORT, 3306), 0, NETFILTER_DROP);
    if let KernelEvent::Dropped(d) = &mut ev {
        d.icmp = Some(crate::engine::facts::Icmp {
            icmp_type: 3,
            code: 3,
            mtu: None,
        });
    }
    none(e.handle(ev));
    none(e.finish(LATER));
    assert!(e.summary().by_reason.is_empty(), "no server verdict of it");
    let d = e.take_drops();
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].direction, Direction::In);
    assert_eq!(
        (d[0].saddr, d[0].sport, d[0].daddr, d[0].dport),
        (ip(1), SPORT, ip(2), 3306)
    );
}

#[test]
fn other_drops_are_drop_records_oriented_to_this_host() {
    let mut e = Engine::new(EngineConfig::default());
    none(e.handle(dropped(MS, 0, tuple(SPORT, 3306), SYN, "NO_SOCKET")));
    let d = e.take_drops();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].direction, Direction::In);
    // s = this host (the packet's destination).
    assert_eq!(
        (d[0].saddr, d[0].sport, d[0].daddr, d[0].dport),
        (ip(2), 3306, ip(1), SPORT)
    );
    assert_eq!(
        (d[0].tcp_flags.to_string().as_str(), d[0].pid),
        ("SYN", None)
    );
    assert_eq!(
        e.summary()
            .drops_by_reason
            .get(&DropReason::new("NO_SOCKET")),
        Some(&1)
    );
    assert!(e.take_drops().is_empty(), "records are taken once");
    none(e.finish(LATER));
}

#[test]
fn before_socketless_reset_tracing_a_refused_syns_drop_is_the_refusal() {
    // Kernels before 6.10 do not trace the RST sent for a SYN nobody listens for.
    let mut e = Engine::new(config(|c| c.socketless_resets_traced = false));
    let v = one(e.handle(dropped(MS, 0, tuple(SPORT, 3306), SYN, "NO_SOCKET")));
    check(&v, "server failed refused_no_listener -");
    assert_eq!(v.kernel_reason.as_deref(), Some("NO_SOCKET"));
    assert_eq!(who(&v), "-/- 10.77.0.2:3306>10.77.0.1:40000");
    assert!(e.take_drops().is_empty(), "the refusal, not a drop record");
    // Anything but a bare SYN stays a drop record.
    none(e.handle(dropped(2 * MS, 0, tuple(SPORT, 3306), ACK, "NO_SOCKET")));
    assert_eq!(e.take_drops().len(), 1);
}

#[test]
fn data_dropped_after_the_handshake_is_a_record_naming_the_owner() {
    let c = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(EngineConfig::default());
    // Connected, not closed yet.
    none(feed(&mut e, healthy_client(c).into_iter().take(2)));
    // Sent from the retransmit timer: the current task is not the owner.
    none(e.handle(dropped(SEC, SK_A, tuple(SPORT, DPORT), ACK, NETFILTER_DROP)));
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
    none(e.handle(dropped(5 * MS, SK_B, from_peer, ACK, "TCP_OLD_ACK")));
    let d = e.take_drops();
    assert_eq!(d[0].direction, Direction::In);
    assert_eq!(
        (d[0].sport, d[0].dport, d[0].tcp_flags.to_string().as_str()),
        (3306, 51_000, "ACK")
    );
}

#[test]
fn flag_names() {
    assert_eq!(TcpFlags(0x02).to_string(), "SYN");
    assert_eq!(TcpFlags(0x12).to_string(), "SYN|ACK");
    assert_eq!(TcpFlags(0x11).to_string(), "ACK|FIN");
    assert_eq!(TcpFlags(0).to_string(), "none");
}

#[test]
fn the_no_socket_drop_of_a_refused_syn_is_the_refusal_not_another_drop() {
    let mut e = Engine::new(EngineConfig::default());
    // rst_sent_no_socket answers 10.77.0.2:51000 -> 10.77.0.1:3306 (s = this host).
    one(e.handle(rst_sent_no_socket(MS)));
    let syn = FourTuple {
        saddr: ip(2),
        sport: 51_000,
        daddr: ip(1),
        dport: 3306,
    };
    none(e.handle(dropped(MS + 1_000, 0, syn, SYN, "NO_SOCKET")));
    assert!(e.take_drops().is_empty());
    assert_eq!(
        e.summary()
            .drops_by_reason
            .get(&DropReason::new("NO_SOCKET")),
        Some(&1)
    );
}

/// Answers with the rule text of the call's number: the ruleset changes between calls.
struct ChangingRules(u32);

impl RuleLookup for ChangingRules {
    fn find(&mut self, _q: &RuleQuery) -> RuleFinding {
        self.0 += 1;
        let mut r = rule(RuleAction::Drop);
        r.text = format!("rule {}", self.0);
        exact(r)
    }
}

#[test]
fn the_rule_is_the_one_that_counted_at_the_drop_not_at_the_verdict() {
    let mut e = Engine::new(EngineConfig::default()).with_rule_lookup(Box::new(ChangingRules(0)));
    none(e.handle(dropped(MS, 0, from_client(), SYN, NETFILTER_DROP)));
    none(e.handle(dropped(SEC + MS, 0, from_client(), SYN, NETFILTER_DROP)));
    let v = one(e.tick(10 * SEC));
    assert_eq!(detail(&v, "rule")["text"], "rule 1");
}

#[test]
fn a_flood_of_drops_is_capped_at_fifty_records_a_second_and_counted() {
    let mut e = Engine::new(EngineConfig::default());
    for i in 0..120u16 {
        let packet = tuple(SPORT + i, 3306);
        none(e.handle(dropped(
            SEC + u64::from(i) * MS,
            0,
            packet,
            ACK,
            "TCP_OLD_ACK",
        )));
    }
    assert_eq!(e.take_drops().len(), 50);
    assert_eq!(e.summary().drop_records_suppressed, 70);
    assert_eq!(
        e.summary()
            .drops_by_reason
            .get(&DropReason::new("TCP_OLD_ACK")),
        Some(&120)
    );
    // The next second starts afresh.
    none(e.handle(dropped(3 * SEC, 0, tuple(SPORT, 3306), ACK, "TCP_OLD_ACK")));
    assert_eq!(e.take_drops().len(), 1);
}

#[test]
fn a_syn_timeout_whose_icmp_answers_this_host_dropped_names_that_drop_and_rule() {
    // The server's REJECT answered each SYN with a port unreachable; this host's INPUT rule
    // dropped the answers before TCP saw them: the client waited out its SYNs.
    let finding = exact(rule(RuleAction::Drop));
    let mut e = Engine::new(EngineConfig::default())
        .with_rule_lookup(Box::new(FixedRules(finding, Default::default())));
    let a = Sock::client(SK_A, SPORT);
    let answer = |ts| {
        let KernelEvent::Dropped(mut d) = dropped(ts, 0, a.t, 0, NETFILTER_DROP) else {
            unreachable!("a drop")
        };
        d.icmp = Some(crate::engine::facts::Icmp {
            icmp_type: 3,
            code: 3,
            mtu: None,
        });
        KernelEvent::Dropped(d)
    };
    // The first answer comes before the connection's local port is known (connect() changes
    // the state before it picks the port): a record only. Its retransmissions' answers join.
    feed(&mut e, [a.connect(MS, 100, "client"), answer(2 * MS)]);
    feed(&mut e, [a.rtx(SEC + MS), answer(SEC + 2 * MS)]);
    feed(&mut e, [a.rtx(3 * SEC + MS), answer(3 * SEC + 2 * MS)]);
    feed(
        &mut e,
        [a.st(7 * SEC, S::SynSent, S::Close), a.err(7 * SEC, 110)],
    );
    let v = one(e.tick(LATER));
    check(&v, "client failed syn_timeout ETIMEDOUT");
    let answer = detail(&v, "answer_dropped");
    assert_eq!(answer["icmp"], "port-unreachable", "{answer}");
    assert_eq!(answer["dropped"]["hook"], "INPUT", "{answer}");
    assert_eq!(answer["dropped"]["count"], 2, "{answer}");
    assert_eq!(answer["rule"]["text"], "tcp dport 3306 drop", "{answer}");
    let advice = crate::output::advice::concrete(&v);
    assert!(
        advice.starts_with("this host's INPUT rule `tcp dport 3306 drop` dropped the ICMP port-unreachable answers to its SYNs"),
        "{advice}"
    );
    // Each dropped answer is a record too (the ICMP error, where it was dropped).
    assert_eq!(e.take_drops().len(), 3);
}

#[test]
fn attempts_beyond_their_cap_are_drop_records_and_the_tracked_ones_still_decide() {
    // A flood of dropped SYNs from five ports, the attempt table holding three.
    let mut e = Engine::new(config(|c| c.max_attempts = 3));
    for i in 0..5u16 {
        let syn = dropped(MS, 0, tuple(SPORT + i, 3306), SYN, NETFILTER_DROP);
        none(e.handle(syn));
    }
    let records = e.take_drops();
    assert_eq!(records.len(), 2, "the two that found no room: {records:#?}");
    let verdicts = e.tick(10 * SEC);
    assert_eq!(verdicts.len(), 3, "{verdicts:#?}");
    for v in &verdicts {
        check(v, "server failed netfilter_drop -");
    }
    // Decided, they made room again.
    none(e.handle(dropped(
        11 * SEC,
        0,
        tuple(SPORT + 9, 3306),
        SYN,
        NETFILTER_DROP,
    )));
    assert!(e.take_drops().is_empty());
}
