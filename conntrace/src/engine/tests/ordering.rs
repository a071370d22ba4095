//! Socket-address reuse and cross-CPU event order, as seen in bursts of thousands of
//! connections: addresses freed and reused at once, accept() observed before ESTABLISHED,
//! closes the tracepoints never show.

use super::*;

#[test]
fn reused_socket_address_gives_independent_verdicts() {
    let first = Sock::client(SK_A, SPORT);
    let second = Sock::client(SK_A, SPORT + 1);
    let mut e = Engine::new(EngineConfig::default());
    // The first socket gives up in SYN_SENT; its verdict waits for the grace period...
    let close = first.st_by(meta(2 * SEC, 100, "first"), S::SynSent, S::Close);
    let events = [first.connect(MS, 100, "first"), first.rtx(SEC), close];
    none(feed(&mut e, events));
    // ...but the address is reused before that: the old socket is decided at once.
    let v1 = one(e.handle(second.connect(2 * SEC + MS, 101, "second")));
    check(&v1, "client failed syn_timeout -");
    assert_eq!(who(&v1), "100/first 10.77.0.1:40000>10.77.0.2:8080");
    assert_eq!(v1.syn_retransmits, 1);
    let at = 2 * SEC + 2 * MS;
    let close = second.st(at, S::SynSent, S::Close);
    let v2 = one(feed(&mut e, [second.rst(at), close, second.err(at, 111)]));
    check(&v2, "client failed refused_no_listener ECONNREFUSED");
    assert_eq!(who(&v2), "101/second 10.77.0.1:40001>10.77.0.2:8080");
    assert_eq!(v2.syn_retransmits, 0);
    none(e.tick(LATER));

    // Reuse after the first socket was already decided.
    let mut e = Engine::new(EngineConfig::default());
    let a = one(feed(&mut e, refused_client(first, MS, 100)));
    let b = one(feed(&mut e, refused_client(second, SEC, 101)));
    assert_eq!(who(&a), "100/client 10.77.0.1:40000>10.77.0.2:8080");
    assert_eq!(who(&b), "101/client 10.77.0.1:40001>10.77.0.2:8080");
    assert_eq!(count(&e.summary().by_reason, Reason::RefusedNoListener), 2);
}

#[test]
fn stale_orphan_error_is_not_attached_to_a_later_connection() {
    // An error report for a socket the engine never tracked (started before the tracer) stays
    // unmatched; a new connection that reuses its 4-tuple then closes in SYN_SENT on its own.
    let (old, new) = (Sock::client(SK_C, SPORT), Sock::client(SK_A, SPORT));
    let close = new.st_by(meta(1600 * MS, 100, "client"), S::SynSent, S::Close);
    let mut events = vec![old.err(SEC, 110), new.connect(1500 * MS, 100, "client")];
    events.push(close);
    let v = one(run(EngineConfig::default(), events).1);
    check(&v, "client failed syn_timeout -");
    assert_eq!(detail(&v, "cause"), "application_closed");
}

#[test]
fn no_route_on_a_reused_socket_address_is_still_reported() {
    // The kernel hands a refused socket's address to the next socket at once; that socket's
    // connect() fails with ENETUNREACH to another destination and must not be taken for a
    // late result of the refused one.
    let a = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(EngineConfig::default());
    one(feed(&mut e, refused_client(a, MS, 100)));
    let mut other = a;
    other.t.daddr = "192.0.2.1".parse().expect("address");
    let v = one(e.handle(other.connect_failed(3 * MS, 100, "client", 101)));
    check(&v, "client failed no_route ENETUNREACH");
}

#[test]
fn no_route_on_the_address_of_a_connection_whose_end_was_not_seen_is_reported() {
    // A healthy connection closed in order: FIN_WAIT1 is its last traced state (the rest of an
    // orderly close is left out in the kernel). The next socket at its address fails connect()
    // with ENETUNREACH before any state change: its own failure, not the old connection's.
    let a = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(EngineConfig::default());
    none(feed(&mut e, healthy_client(a).into_iter().take(3)));
    let mut other = a;
    other.t.daddr = "192.0.2.1".parse().expect("address");
    let v = one(e.handle(other.connect_failed(60 * MS, 100, "client", 101)));
    check(&v, "client failed no_route ENETUNREACH");
    assert_eq!(who(&v), "100/client -:->192.0.2.1:8080");
}

#[test]
fn accept_seen_before_established_still_names_the_acceptor() {
    // The kernel queues the child for accept() before its SYN_RECV->ESTABLISHED event fires,
    // so on another CPU accept() can be observed first.
    let s = Sock::server(SK_A);
    let mut e = Engine::new(config(|c| c.report_established = true));
    none(e.handle(s.st(MS, S::Listen, S::SynRecv)));
    none(e.handle(s.accepted(2 * MS, 200, "server")));
    let v = one(e.handle(s.st(3 * MS, S::SynRecv, S::Established)));
    check(&v, "server established established -");
    assert_eq!(who(&v), "200/server 10.77.0.1:3306>10.77.0.2:51000");
    assert_eq!(detail(&v, "accepted"), true);
    assert_eq!(detail(&v, "accept_delay_ms"), 0.0);
}

#[test]
fn established_server_connection_is_reported_when_the_run_ends() {
    let s = Sock::server(SK_A);
    let mut e = Engine::new(config(|c| c.report_established = true));
    none(feed(&mut e, server_handshake(s, MS)));
    let v = one(e.finish(10 * MS));
    assert_eq!(detail(&v, "accepted"), false);
    assert_eq!(e.summary().expired_unresolved, 0);
}

#[test]
fn address_reused_without_an_observed_close_starts_a_new_connection() {
    // A client socket left in FIN_WAIT1 can be freed (via TIME_WAIT) without a state event
    // we see; its address then comes back as a server child socket in another namespace.
    let c = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(config(|c| c.report_established = true));
    feed(
        &mut e,
        vec![
            c.connect(MS, 100, "client"),
            c.st(2 * MS, S::SynSent, S::Established),
        ],
    );
    none(e.handle(c.st(3 * MS, S::Established, S::FinWait1)));
    let s = Sock::server(SK_A);
    none(feed(&mut e, server_handshake(s, 10 * MS)));
    let v = one(e.handle(s.accepted(12 * MS, 200, "server")));
    check(&v, "server established established -");
    assert_eq!(who(&v), "200/server 10.77.0.1:3306>10.77.0.2:51000");
    assert_eq!(
        e.summary().expired_unresolved,
        0,
        "the client had a verdict"
    );
}

#[test]
fn socket_error_read_at_close_survives_a_zero_error_report() {
    // An ICMP port unreachable in SYN_SENT: the waiting process can clear sk_err before
    // inet_sk_error_report fires, which then reports 0; the CLOSE event read it first.
    let c = Sock::client(SK_A, SPORT);
    let mut close = c.st(2 * MS, S::SynSent, S::Close);
    if let KernelEvent::State { sk_err, .. } = &mut close {
        *sk_err = Some(Errno(111));
    }
    let v = run_default(vec![c.connect(MS, 100, "client"), close, c.err(2 * MS, 0)]);
    check(&v, "client failed icmp_unreachable ECONNREFUSED");
}

#[test]
fn an_icmp_error_the_application_read_first_is_icmp_unreachable() {
    // sk_error_report() wakes the application before its tracepoint reads sk_err: the
    // application read the error (SO_ERROR) first, the report says 0, and it closed the socket.
    let c = Sock::client(SK_A, SPORT);
    let events = vec![
        c.connect(MS, 100, "client"),
        c.err(MS + 10_000, 0),
        c.st_by(meta(MS + 20_000, 100, "client"), S::SynSent, S::Close),
    ];
    let v = run_default(events);
    check(&v, "client failed icmp_unreachable -");
    // Without that report, the same close is the application giving up.
    let events = vec![
        c.connect(MS, 100, "client"),
        c.st_by(meta(MS + 20_000, 100, "client"), S::SynSent, S::Close),
    ];
    check(&run_default(events), "client failed syn_timeout -");
}

#[test]
fn an_icmp_error_the_application_read_first_still_counts_the_unanswered_syns() {
    // The first SYN went unanswered (ICMP rate limit), the retransmit's ICMP ended the
    // handshake and the application read the error before the tracepoint did.
    let c = Sock::client(SK_A, SPORT);
    let events = vec![
        c.connect(MS, 100, "client"),
        c.rtx(SEC + MS),
        c.err(SEC + 2 * MS, 0),
        c.st_by(meta(SEC + 3 * MS, 100, "client"), S::SynSent, S::Close),
    ];
    let v = run_default(events);
    check(&v, "client failed icmp_unreachable -");
    assert_eq!(
        v.kernel_reason.as_deref(),
        Some("ICMP error read by the application first")
    );
    assert_eq!(detail(&v, "unanswered_syns"), 1, "{v:#?}");
    assert_eq!(detail(&v, "first_answer_while_busy"), Value::Null);
}
