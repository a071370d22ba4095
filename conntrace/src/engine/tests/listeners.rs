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
