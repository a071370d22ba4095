//! Routes that went away under connections (`rules::connect::route_lost`): `no_route` where
//! this host's routes failed the retransmissions (the IPv4 socket had no route left when it
//! closed), `icmp_unreachable` where an ICMP answer did (its route stays).

use super::*;

/// The client's close from `old` with `errno` (and the same soft error), and whether its
/// route was still cached.
fn close(a: Sock, ts: u64, old: TcpState, errno: i32, cached: Option<bool>) -> KernelEvent {
    let mut ev = a.closed(ts, old, Some(errno));
    if let KernelEvent::State {
        sk_err_soft,
        route_cached,
        ..
    } = &mut ev
    {
        *sk_err_soft = Some(Errno(errno));
        *route_cached = cached;
    }
    ev
}

/// A client that connects and is established.
fn established(a: Sock) -> Vec<KernelEvent> {
    vec![
        a.connect(MS, 100, "client"),
        a.st(2 * MS, S::SynSent, S::Established),
    ]
}

const ENETUNREACH: i32 = 101;
const EHOSTUNREACH: i32 = 113;

#[test]
fn an_ipv4_socket_that_closed_without_its_route_lost_the_route() {
    let a = Sock::client(SK_A, SPORT);
    let mut events = established(a);
    events.push(close(a, 5 * SEC, S::Established, ENETUNREACH, Some(false)));
    let v = run_default(events);
    check(&v, "client failed no_route ENETUNREACH");
    assert_eq!(detail(&v, "icmp"), Value::Null, "no ICMP came");
    assert_eq!(detail(&v, "route_lost"), true);
    assert!(detail(&v, "established_ms").as_f64().is_some());
}

#[test]
fn a_handshake_whose_route_went_is_no_route() {
    // Its SYN went out; the retransmissions found no route (an unreachable route now).
    let a = Sock::client(SK_A, SPORT);
    let v = run_default(vec![
        a.connect(MS, 100, "client"),
        close(a, 3 * SEC, S::SynSent, EHOSTUNREACH, Some(false)),
    ]);
    check(&v, "client failed no_route EHOSTUNREACH");
    assert_eq!(detail(&v, "route_lost"), true);
}

#[test]
fn an_icmp_answer_leaves_the_route_and_stays_icmp_unreachable() {
    let a = Sock::client(SK_A, SPORT);
    for cached in [Some(true), None] {
        let mut events = established(a);
        events.push(close(a, 5 * SEC, S::Established, EHOSTUNREACH, cached));
        let v = run_default(events);
        check(&v, "client failed icmp_unreachable EHOSTUNREACH");
        assert_eq!(detail(&v, "route_lost"), Value::Null, "{cached:?}");
    }
}

#[test]
fn a_timeout_without_a_route_is_still_a_timeout() {
    // No route error: what emptied the route cache is not known (a redirect, a path MTU
    // exception's expiry), so nothing is claimed.
    let a = Sock::client(SK_A, SPORT);
    let mut events = established(a);
    events.push(close(a, 5 * SEC, S::Established, 110, Some(false)));
    let v = run_default(events);
    check(&v, "client failed timeout ETIMEDOUT");
}
