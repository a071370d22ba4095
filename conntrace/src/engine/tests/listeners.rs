//! `--expect-comm`: who accepted the connection.

use super::*;

fn expecting(names: &[&str], all: bool) -> EngineConfig {
    config(|c| {
        c.expected_comms = names.iter().map(|n| (*n).to_owned()).collect();
        c.report_established = all;
    })
}

#[test]
fn unexpected_acceptor_is_a_failure_even_without_all() {
    let s = Sock::server(SK_A);
    let mut e = Engine::new(expecting(&["mysqld"], false));
    none(feed(&mut e, server_handshake(s, MS)));
    let v = one(e.handle(s.accepted(6 * MS, 300, "java")));
    check(&v, "server failed unexpected_listener -");
    assert_eq!(who(&v), "300/java 10.77.0.1:3306>10.77.0.2:51000");
    assert_eq!(v.kernel_reason.as_deref(), Some("accepted by java"));
    assert_eq!(detail(&v, "expected_comm"), serde_json::json!(["mysqld"]));
}

#[test]
fn expected_acceptor_is_silent_without_all_and_established_with_it() {
    let s = Sock::server(SK_A);
    let mut e = Engine::new(expecting(&["java", "mysqld"], false));
    none(feed(&mut e, server_handshake(s, MS)));
    none(e.handle(s.accepted(6 * MS, 200, "mysqld")));

    let mut e = Engine::new(expecting(&["mysqld"], true));
    none(feed(&mut e, server_handshake(s, MS)));
    check(
        &one(e.handle(s.accepted(6 * MS, 200, "mysqld"))),
        "server established established -",
    );
}

#[test]
fn clients_are_not_judged_by_expect_comm() {
    let c = Sock::client(SK_B, SPORT);
    let mut e = Engine::new(expecting(&["mysqld"], false));
    none(feed(
        &mut e,
        vec![
            c.connect(MS, 100, "client"),
            c.st(2 * MS, S::SynSent, S::Established),
        ],
    ));
}

/// A fixed answer for every look-up.
struct Table(Vec<Listener>);

impl ListenerLookup for Table {
    fn listening_on(&mut self, _netns: Option<u32>, _port: u16) -> Vec<Listener> {
        self.0.clone()
    }
}

fn listener(addr: &str, pid: u32, comm: &str) -> Listener {
    Listener {
        addr: addr.parse().expect("socket address"),
        pid: Some(pid),
        comm: Some(comm.into()),
        accept_queue: Some(0),
        backlog: Some(128),
        v6only: None,
    }
}

/// The server's kernel answers a SYN to 10.77.0.1:3306 with a RST: no socket matched.
fn refusal_with(listeners: Vec<Listener>) -> Verdict {
    let mut e =
        Engine::new(EngineConfig::default()).with_listener_lookup(Box::new(Table(listeners)));
    one(e.handle(rst_sent_no_socket(MS)))
}

#[test]
fn listener_on_another_address_is_refused_bound_elsewhere() {
    let v = refusal_with(vec![listener("127.0.0.1:3306", 42, "mysqld")]);
    check(&v, "server failed refused_bound_elsewhere -");
    assert_eq!(
        detail(&v, "listeners"),
        serde_json::json!([{ "address": "127.0.0.1:3306", "pid": 42, "comm": "mysqld" }])
    );
}

#[test]
fn no_listener_or_a_matching_one_keeps_refused_no_listener() {
    check(
        &refusal_with(Vec::new()),
        "server failed refused_no_listener -",
    );
    // A wildcard or same-address listener would have matched: the refusal has another cause.
    for addr in ["0.0.0.0:3306", "[::]:3306", "10.77.0.1:3306"] {
        let v = refusal_with(vec![listener(addr, 42, "mysqld")]);
        check(&v, "server failed refused_no_listener -");
    }
}

#[test]
fn an_ipv4_client_refused_where_only_an_ipv6_only_wildcard_listens_is_bound_elsewhere() {
    // `[::]:3306` with IPV6_V6ONLY takes no IPv4 connection.
    let v6only = |set| Listener {
        v6only: Some(set),
        ..listener("[::]:3306", 42, "mysqld")
    };
    let v = refusal_with(vec![v6only(true)]);
    check(&v, "server failed refused_bound_elsewhere -");
    assert_eq!(
        detail(&v, "listeners"),
        serde_json::json!([{ "address": "[::]:3306", "pid": 42, "comm": "mysqld", "v6only": true }])
    );
    // Dual-stack, it would have taken the connection: another cause.
    check(
        &refusal_with(vec![v6only(false)]),
        "server failed refused_no_listener -",
    );
}

#[test]
fn an_ipv6_client_refused_where_only_ipv4_listens_is_bound_elsewhere() {
    // `0.0.0.0:3306` takes no IPv6 connection: the service is bound to the other family.
    let mut e =
        Engine::new(EngineConfig::default()).with_listener_lookup(Box::new(Table(vec![listener(
            "0.0.0.0:3306",
            42,
            "mysqld",
        )])));
    let event = KernelEvent::ResetSent {
        meta: softirq(MS),
        sk: 0,
        tuple: FourTuple {
            saddr: "fd77::1".parse().unwrap(),
            sport: 3306,
            daddr: "fd77::2".parse().unwrap(),
            dport: 51_000,
        },
        reason: Some("NO_SOCKET".into()),
        answered_flags: Some(TcpFlags(0x02)),
    };
    let v = one(e.handle(event));
    check(&v, "server failed refused_bound_elsewhere -");
    assert_eq!(detail(&v, "listeners")[0]["address"], "0.0.0.0:3306");
}

#[test]
fn a_wildcard_listeners_overflow_counts_under_its_own_address_in_the_summary() {
    let mut e = Engine::new(EngineConfig::default());
    let wildcard: std::net::SocketAddr = "0.0.0.0:3306".parse().unwrap();
    let v = e.handle(KernelEvent::ListenOverflow {
        meta: softirq(SEC),
        listener: wildcard,
        accept_queue: 5,
        backlog: 4,
        overflows: 7,
    });
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!((v[0].saddr, v[0].sport), (None, Some(3306)), "{:?}", v[0]);
    let l = &e.summary().listeners["0.0.0.0:3306"];
    assert_eq!(l.overflows, 7, "{:?}", e.summary().listeners);
    // One bound to an address counts under it.
    e.handle(KernelEvent::ListenOverflow {
        meta: softirq(3 * SEC),
        listener: "10.77.0.2:3306".parse().unwrap(),
        accept_queue: 5,
        backlog: 4,
        overflows: 2,
    });
    assert_eq!(e.summary().listeners["10.77.0.2:3306"].overflows, 2);
}

/// A listener-level overflow at 10.77.0.2:`port` (the client's server) in namespace `netns`.
fn overflow(ts: u64, netns: u32, listener: &str) -> KernelEvent {
    KernelEvent::ListenOverflow {
        meta: Meta {
            netns: Some(netns),
            ..softirq(ts)
        },
        listener: listener.parse().expect("address"),
        accept_queue: 2,
        backlog: 1,
        overflows: 3,
    }
}

#[test]
fn a_syn_timeout_toward_a_full_queue_in_another_namespace_names_that_listener() {
    let a = Sock::client(SK_A, SPORT);
    let server_ns = NETNS + 1;
    let mut e = Engine::new(EngineConfig::default());
    let mut events = vec![a.connect(MS, 100, "client")];
    // The server's listener overflowed while the client waited (counted at two polls); its
    // overflow before the client began, and another port's listener's, are not the client's.
    events.push(overflow(MS / 2, server_ns, "10.77.0.2:8080"));
    events.extend([
        a.rtx(SEC + MS),
        overflow(SEC + 2 * MS, server_ns, "10.77.0.2:8080"),
    ]);
    events.push(overflow(2 * SEC, server_ns, "0.0.0.0:8081"));
    events.extend([
        a.rtx(3 * SEC + MS),
        overflow(3 * SEC + 2 * MS, server_ns, "10.77.0.2:8080"),
    ]);
    events.extend([
        a.err(7 * SEC + MS, 110),
        a.st(7 * SEC + MS, S::SynSent, S::Close),
    ]);
    let verdicts: Vec<Verdict> = feed(&mut e, events);
    assert!(
        verdicts.iter().all(|v| v.reason == Reason::ListenOverflow),
        "{verdicts:?}"
    );
    let v = one(e.tick(7 * SEC + MS + e.cfg.grace_ns));
    check(&v, "client failed syn_timeout ETIMEDOUT");
    assert_eq!(
        detail(&v, "peer_listen_queue"),
        serde_json::json!({
            "netns": server_ns, "listener": "10.77.0.2:8080", "overflows": 6,
            "accept_queue": 2, "backlog": 1
        })
    );
}

#[test]
fn a_syn_timeout_with_no_listener_overflowing_names_none() {
    let a = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(EngineConfig::default());
    // The client's own namespace's listener on that port is not its server.
    let events = [
        a.connect(MS, 100, "client"),
        overflow(SEC, NETNS, "0.0.0.0:8080"),
        a.rtx(SEC + MS),
        a.err(3 * SEC, 110),
        a.st(3 * SEC, S::SynSent, S::Close),
    ];
    let verdicts: Vec<Verdict> = feed(&mut e, events);
    assert_eq!(verdicts.len(), 1, "the overflow's own verdict");
    let v = one(e.tick(3 * SEC + e.cfg.grace_ns));
    check(&v, "client failed syn_timeout ETIMEDOUT");
    assert!(v.detail.peer_listen_queue().is_none(), "{v:?}");
}
