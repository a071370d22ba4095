//! Stalled connections (no greeting, no response, not accepted) and SYN cookies.

use super::*;
use crate::engine::facts::{DroppedPacket, NfHook};

const STALL: u64 = 3 * SEC;

/// A client connected at 2 ms (ESTABLISHED), nothing received yet.
fn connected(c: Sock) -> Vec<KernelEvent> {
    vec![
        c.connect(MS, 100, "client"),
        c.st(2 * MS, S::SynSent, S::Established),
    ]
}

#[test]
fn a_greeting_that_never_comes_is_stalled_then_resolved_when_it_does() {
    let c = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(EngineConfig::default());
    none(feed(&mut e, connected(c)));
    none(e.tick(2 * MS + STALL - 1));
    let v = one(e.tick(2 * MS + STALL));
    assert_eq!(
        (v.outcome, v.reason),
        (Outcome::Stalled, Reason::StalledNoGreeting)
    );
    assert_eq!(who(&v), "100/client 10.77.0.1:40000>10.77.0.2:8080");
    assert_eq!(detail(&v, "waited_ms"), 3000.0);
    none(e.tick(2 * MS + 2 * STALL));
    // The greeting comes 5 s after the handshake.
    let v = one(e.handle(c.data(5 * SEC + 2 * MS, false)));
    assert_eq!(
        (v.outcome, v.reason),
        (Outcome::Resolved, Reason::StalledNoGreeting)
    );
    assert_eq!(detail(&v, "stuck_ms"), 5000.0);
    none(feed(&mut e, passive_close(c, 6 * SEC)));
    none(e.tick(LATER));
}

#[test]
fn where_first_data_is_not_traced_a_streaming_client_is_never_claimed_without_data() {
    // Streaming mode without a first-data hook (6.1 with tracepoints only): a client that got
    // its greeting looks the same as one that did not, so neither is stalled for it.
    let c = Sock::client(SK_A, SPORT);
    let cfg = config(|c| c.first_data_traced = false);
    let mut events = connected(c);
    events.push(c.data(3 * MS, true));
    let (_, out) = run(cfg.clone(), connected(c));
    none(out);
    let (_, out) = run(cfg, events);
    none(out);
}

#[test]
fn a_request_without_answer_is_stalled_no_response() {
    let c = Sock::client(SK_A, SPORT);
    let mut events = connected(c);
    events.push(c.data(3 * MS, true));
    let (_, out) = run(EngineConfig::default(), events);
    let v = one(out);
    assert_eq!(
        (v.outcome, v.reason),
        (Outcome::Stalled, Reason::StalledNoResponse)
    );
}

#[test]
fn data_within_the_stall_timeout_is_no_stall() {
    let c = Sock::client(SK_A, SPORT);
    let mut events = connected(c);
    events.push(c.data(SEC, false));
    none(run(EngineConfig::default(), events).1);
}

#[test]
fn a_stuck_connection_that_dies_gets_one_failed_follow_up() {
    let c = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(EngineConfig::default());
    none(feed(&mut e, connected(c)));
    one(e.tick(4 * SEC));
    // The server finally answers the stuck client with a RST (it has no socket for it).
    let mut out = feed(
        &mut e,
        vec![
            c.rst(10 * SEC),
            c.err(10 * SEC, 104),
            c.st(10 * SEC, S::Established, S::Close),
        ],
    );
    out.extend(e.tick(LATER));
    let v = one(out);
    assert_eq!(
        (v.outcome, v.reason),
        (Outcome::Failed, Reason::StalledNoGreeting)
    );
    assert_eq!(detail(&v, "ended_by"), "reset_by_peer");
    assert_eq!(v.errno, Some(Errno::ECONNRESET));
    assert!((detail(&v, "stuck_ms").as_f64().unwrap() - 9998.0).abs() < 0.01);
}

#[test]
fn a_stuck_client_that_dies_in_a_black_hole_keeps_the_retransmissions_in_its_follow_up() {
    // A request whose full-size segments never pass, its short tail SACKed: stuck first,
    // then the kernel gives up.
    let c = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(EngineConfig::default());
    none(feed(&mut e, connected(c)));
    one(e.tick(4 * SEC));
    for (ms, bytes, sacked) in [(4100, 104, 0), (4300, 1448, 1), (4700, 1448, 1)] {
        none(e.handle(c.data_rtx(ms * MS, bytes, sacked)));
    }
    let mut out = feed(
        &mut e,
        [c.closed(10 * SEC, S::Established, Some(libc::ETIMEDOUT))],
    );
    out.extend(e.tick(LATER));
    let v = one(out);
    assert_eq!(
        (v.outcome, v.reason),
        (Outcome::Failed, Reason::StalledNoGreeting)
    );
    assert_eq!(detail(&v, "ended_by"), "pmtu_blackhole");
    assert_eq!(detail(&v, "retransmits")["sacked_out"], 1, "{v:?}");
    assert_eq!(detail(&v, "retransmits")["smallest_bytes"], 104, "{v:?}");
}

#[test]
fn a_connection_nobody_accepts_is_not_accepted_then_resolved() {
    let s = Sock::server(SK_A);
    let stall_end = SEC + MS + STALL;
    // Reported with or without --all.
    let mut e = Engine::new(EngineConfig::default());
    none(feed(&mut e, server_handshake(s, SEC)));
    none(e.tick(stall_end - 1));
    let v = one(e.tick(stall_end));
    assert_eq!(
        (v.outcome, v.reason),
        (Outcome::Stalled, Reason::NotAccepted)
    );
    assert_eq!(who(&v), "-/- 10.77.0.1:3306>10.77.0.2:51000");
    assert_eq!(detail(&v, "waited_ms"), 3000.0);
    let v = one(e.handle(s.accepted(5 * SEC, 200, "server")));
    assert_eq!(
        (v.outcome, v.reason),
        (Outcome::Resolved, Reason::NotAccepted)
    );
    assert_eq!(who(&v), "200/server 10.77.0.1:3306>10.77.0.2:51000");
    // Accepted 5 s in, established at 1.001 s.
    assert_eq!(detail(&v, "stuck_ms"), 3999.0);
    none(feed(&mut e, passive_close(s, 6 * SEC)));
    none(e.tick(LATER));
}

fn cookie(ts: u64) -> KernelEvent {
    // The listener 10.77.0.1:3306 answers 10.77.0.2:51000.
    KernelEvent::CookieSent {
        meta: softirq(ts),
        tuple: tuple(3306, 51_000),
    }
}

#[test]
fn a_cookie_whose_ack_never_made_a_socket_is_syncookie_ack_lost() {
    let mut e = Engine::new(EngineConfig::default());
    none(e.handle(cookie(MS)));
    // The client's final ACK, dropped by netfilter INPUT.
    none(e.handle(dropped_ack(MS + 100_000, 51_000)));
    let v = one(e.tick(5 * SEC));
    check(&v, "server failed syncookie_ack_lost -");
    assert_eq!(who(&v), "-/- 10.77.0.1:3306>10.77.0.2:51000");
    assert_eq!(
        (detail(&v, "cookies_sent"), detail(&v, "hook")),
        (1.into(), "INPUT".into())
    );
    let l = &e.summary().listeners["10.77.0.1:3306"];
    assert_eq!(
        (l.cookies_sent, l.cookies_validated, l.cookies_failed),
        (1, 0, 1)
    );
}

#[test]
fn late_packets_of_a_decided_cookie_attempt_make_no_second_verdict() {
    let mut e = Engine::new(EngineConfig::default());
    none(e.handle(cookie(MS)));
    check(&one(e.tick(5 * SEC)), "server failed syncookie_ack_lost -");
    // The client, believing itself connected, gives up and sends its FIN, retransmitted: the
    // full queue's listener drops each at the cookie check (NO_SOCKET), as for its first ACK.
    for n in 0..6u64 {
        let KernelEvent::Dropped(mut d) = dropped_ack(6 * SEC + n * 200 * MS, 51_000) else {
            unreachable!()
        };
        d.reason = DropReason::new("NO_SOCKET");
        d.location = "cookie_v4_check+0x3a0".into();
        d.tcp_flags = TcpFlags(0x11);
        d.hook = None;
        none(e.handle(KernelEvent::Dropped(d)));
    }
    none(e.tick(20 * SEC));
    assert_eq!(
        e.summary().drops_by_reason[&DropReason::new("NO_SOCKET")],
        6
    );
    // A new SYN of the same tuple is a new attempt.
    let KernelEvent::Dropped(mut syn) = dropped_ack(30 * SEC, 51_000) else {
        unreachable!()
    };
    syn.tcp_flags = TcpFlags(0x02);
    none(e.handle(KernelEvent::Dropped(syn)));
    check(&one(e.tick(40 * SEC)), "server failed netfilter_drop -");
}

/// The client 10.77.0.2:`port`'s final ACK to the listener 10.77.0.1:3306, dropped by
/// netfilter INPUT at `ts`.
fn dropped_ack(ts: u64, port: u16) -> KernelEvent {
    KernelEvent::Dropped(DroppedPacket {
        meta: softirq(ts),
        sk: 0,
        rx_sk: 0,
        sk_port: None,
        sk_state: None,
        packet: FourTuple {
            saddr: ip(2),
            sport: port,
            daddr: ip(1),
            dport: 3306,
        },
        reason: DropReason::new("NETFILTER_DROP"),
        location: "nft_do_chain+0x3e8".into(),
        tcp_flags: TcpFlags(0x10),
        hook: Some(NfHook::Input),
        ifindex: None,
        icmp: None,
    })
}

#[test]
fn a_real_client_in_a_flood_of_failed_cookie_attempts_keeps_its_verdict() {
    let mut e = Engine::new(EngineConfig::default());
    // 300 spoofed sources within one second, then a real client whose ACK a rule drops: its
    // attempt ends after theirs, when their second's budget is spent.
    for port in 0..300u16 {
        none(e.handle(KernelEvent::CookieSent {
            meta: softirq(MS + u64::from(port) * 1000),
            tuple: tuple(3306, 10_000 + port),
        }));
    }
    none(e.handle(cookie(400 * MS)));
    none(e.handle(dropped_ack(400 * MS + 100_000, 51_000)));
    let verdicts = e.tick(5 * SEC);
    assert_eq!(
        verdicts.len(),
        51,
        "50 of the flood's, and the real client's"
    );
    let real: Vec<_> = verdicts
        .iter()
        .filter(|v| who(v) == "-/- 10.77.0.1:3306>10.77.0.2:51000")
        .collect();
    assert_eq!(real.len(), 1, "{verdicts:?}");
    check(real[0], "server failed syncookie_ack_lost -");
    assert_eq!(detail(real[0], "hook"), "INPUT");
    assert_eq!(e.summary().attempt_verdicts_suppressed, 250);
}

#[test]
fn a_flood_spread_over_a_second_is_capped_by_the_second_its_attempts_are_decided_in() {
    let mut e = Engine::new(EngineConfig::default());
    // 200 spoofed sources, one every 5 ms; the engine ticks every 100 ms, as conntrace does.
    let mut decided = std::collections::BTreeMap::<u64, usize>::new();
    for port in 0..200u16 {
        let ts = MS + u64::from(port) * 5 * MS;
        none(e.handle(KernelEvent::CookieSent {
            meta: softirq(ts),
            tuple: tuple(3306, 10_000 + port),
        }));
        if port % 20 == 19 {
            let now = ts + MS;
            *decided.entry(now / SEC).or_default() += e.tick(now).len();
        }
    }
    for tenth in 11..80 {
        let now = tenth * 100 * MS;
        *decided.entry(now / SEC).or_default() += e.tick(now).len();
    }
    assert!(decided.values().all(|&n| n <= 50), "{decided:?}");
    let written: usize = decided.values().sum();
    assert!((50..=100).contains(&written), "{decided:?}");
    assert_eq!(
        e.summary().attempt_verdicts_suppressed,
        200 - written as u64
    );
}

#[test]
fn a_flood_of_failed_cookie_attempts_is_capped_and_counted() {
    let mut e = Engine::new(EngineConfig::default());
    // 300 spoofed sources within one second, each answered with a cookie, none completing.
    for port in 0..300u16 {
        none(e.handle(KernelEvent::CookieSent {
            meta: softirq(MS + u64::from(port) * 1000),
            tuple: tuple(3306, 10_000 + port),
        }));
    }
    let verdicts = e.tick(5 * SEC);
    assert_eq!(verdicts.len(), 50, "at most 50 a second per listener");
    assert!(
        verdicts
            .iter()
            .all(|v| v.reason == Reason::SyncookieAckLost)
    );
    let summary = e.summary();
    assert_eq!(summary.attempt_verdicts_suppressed, 250);
    let l = &summary.listeners["10.77.0.1:3306"];
    assert_eq!(
        (l.cookies_sent, l.cookies_failed),
        (300, 300),
        "all counted"
    );
}

#[test]
fn a_cookie_that_validates_marks_the_connection() {
    let s = Sock::server(SK_B);
    let mut e = Engine::new(config(|c| c.report_established = true));
    none(e.handle(cookie(MS)));
    feed(&mut e, server_handshake(s, 2 * MS));
    let v = one(e.handle(s.accepted(4 * MS, 200, "server")));
    check(&v, "server established established -");
    assert_eq!(detail(&v, "syn_cookie"), true);
    none(e.finish(LATER));
    let l = &e.summary().listeners["10.77.0.1:3306"];
    assert_eq!(
        (l.cookies_sent, l.cookies_validated, l.cookies_failed),
        (1, 1, 0)
    );
}

#[test]
fn a_cookie_validates_when_the_childs_tuple_is_whole_only_once_established() {
    // On older kernels (6.1, 6.12) the child's SYN_RECV event shows its listener's wildcard peer.
    let s = Sock::server(SK_B);
    let mut e = Engine::new(EngineConfig::default());
    none(e.handle(cookie(MS)));
    let mut syn_recv = s.st(2 * MS, S::Listen, S::SynRecv);
    if let KernelEvent::State { tuple, .. } = &mut syn_recv {
        tuple.daddr = std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
        tuple.dport = 0;
    }
    none(e.handle(syn_recv));
    none(e.handle(s.st(3 * MS, S::SynRecv, S::Established)));
    none(e.handle(s.accepted(4 * MS, 200, "server")));
    none(e.tick(5 * SEC));
    let l = &e.summary().listeners["10.77.0.1:3306"];
    assert_eq!(
        (l.cookies_sent, l.cookies_validated, l.cookies_failed),
        (1, 1, 0)
    );
}

#[test]
fn a_zero_stall_timeout_turns_stall_verdicts_off() {
    let c = Sock::client(SK_A, SPORT);
    let s = Sock::server(SK_B);
    let mut events = connected(c);
    events.extend(server_handshake(s, MS));
    none(run(config(|cfg| cfg.stall_timeout_ns = 0), events).1);
}

#[test]
fn a_cookie_ack_answered_by_the_listener_with_a_reset_failed_validation() {
    let mut e = Engine::new(EngineConfig::default());
    none(e.handle(cookie(MS)));
    // tcp_send_reset with the listener's socket, addresses from the answered ACK.
    none(e.handle(KernelEvent::ResetSent {
        meta: softirq(2 * MS),
        sk: SK_C,
        tuple: tuple(3306, 51_000),
        reason: Some("NOT_SPECIFIED".into()),
        answered_flags: None,
    }));
    let v = one(e.tick(5 * SEC));
    check(&v, "server failed syncookie_ack_lost -");
    assert_eq!(detail(&v, "cookie_invalid"), true);
}

/// The client's ACK (or data) at `ts` for the cookie of [`cookie`], dropped by the listener's
/// cookie check: the cookie validated, but no child could be made (6.10+).
fn cookie_check_drop(ts: u64, tcp_flags: u8) -> KernelEvent {
    KernelEvent::Dropped(DroppedPacket {
        meta: softirq(ts),
        sk: 0,
        rx_sk: SK_C,
        sk_port: Some(0),
        sk_state: Some(S::Listen),
        packet: FourTuple {
            saddr: ip(2),
            sport: 51_000,
            daddr: ip(1),
            dport: 3306,
        },
        reason: DropReason::new("NO_SOCKET"),
        location: "cookie_v4_check+0x4e5".into(),
        tcp_flags: TcpFlags(tcp_flags),
        hook: None,
        ifindex: None,
        icmp: None,
    })
}

#[test]
fn a_cookie_ack_dropped_by_a_full_accept_queue_is_syncookie_ack_lost_with_the_drop() {
    // A server-first protocol: the client sends nothing after its final ACK.
    let mut e = Engine::new(EngineConfig::default());
    none(e.handle(cookie(MS)));
    none(e.handle(cookie_check_drop(2 * MS, 0x10)));
    none(e.tick(2 * SEC));
    let v = one(e.tick(5 * SEC));
    check(&v, "server failed syncookie_ack_lost -");
    let drops = detail(&v, "drops");
    assert_eq!(
        (&drops[0]["kernel_reason"], &drops[0]["location"]),
        (&"NO_SOCKET".into(), &"cookie_v4_check+0x4e5".into())
    );
    assert_eq!(
        crate::output::key_fact(&v),
        "cookie validated, no socket: accept queue full (NO_SOCKET at cookie_v4_check+0x4e5, 1x)"
    );
    assert_eq!(e.summary().drop_records_suppressed, 0);
}

/// The same drop as [`cookie_check_drop`] on kernels before 6.10 (measured on Debian's
/// 6.1.0-57): `tcp_v4_do_rcv` frees it with NOT_SPECIFIED, and the classic tracepoint gives
/// no receiving socket.
fn cookie_check_drop_unnamed(ts: u64, tcp_flags: u8) -> KernelEvent {
    let KernelEvent::Dropped(mut d) = cookie_check_drop(ts, tcp_flags) else {
        unreachable!("a drop")
    };
    (d.rx_sk, d.sk_port, d.sk_state) = (0, None, None);
    d.reason = DropReason::new("NOT_SPECIFIED");
    d.location = "tcp_v4_do_rcv+0x75".into();
    KernelEvent::Dropped(d)
}

#[test]
fn a_cookie_attempt_stays_open_while_the_clients_data_is_retransmitted_into_a_full_queue() {
    stays_open_while_retransmitted_into_a_full_queue(cookie_check_drop);
}

#[test]
fn before_6_10_a_cookie_attempt_stays_open_while_its_data_is_dropped_without_a_reason() {
    stays_open_while_retransmitted_into_a_full_queue(cookie_check_drop_unnamed);
}

/// A client-first protocol: the final ACK and the request are dropped by the full accept
/// queue (each drop made by `drop`); the request's retransmits (RTO 200 ms, doubling) keep
/// being dropped until one, 6.2 s in, validates the cookie once the queue has room.
fn stays_open_while_retransmitted_into_a_full_queue(drop: fn(u64, u8) -> KernelEvent) {
    let s = Sock::server(SK_B);
    let mut e = Engine::new(config(|c| c.report_established = true));
    none(e.handle(cookie(MS)));
    none(e.handle(drop(2 * MS, 0x10)));
    for at_ms in [3, 203, 603, 1403, 3003] {
        none(e.handle(drop(at_ms * MS, 0x18)));
        none(e.tick((at_ms + 1500) * MS));
    }
    none(e.tick(6200 * MS));
    feed(&mut e, server_handshake(s, 6203 * MS));
    let v = one(e.handle(s.accepted(6204 * MS, 200, "server")));
    check(&v, "server established established -");
    assert_eq!(detail(&v, "syn_cookie"), true);
    none(e.finish(LATER));
    let l = &e.summary().listeners["10.77.0.1:3306"];
    assert_eq!(
        (l.cookies_sent, l.cookies_validated, l.cookies_failed),
        (1, 1, 0)
    );
}
