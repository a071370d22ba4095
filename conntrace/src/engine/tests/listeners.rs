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
