//! Routes that went away under connections (`rules::connect::route_lost`): `no_route` where
//! this host's routes failed the retransmissions (the socket had no route left when it
//! closed: IPv4 no cached route, IPv6 its route capabilities zeroed), `icmp_unreachable`
//! where an ICMP answer did (its route stays). And an idle connection's
//! (`rules::connect::route_gone`): a timeout without a cached route, in a namespace whose
//! routing table has no route to the other end when the verdict is made.

use std::net::Ipv6Addr;

use super::*;
use crate::engine::{facts::RouteAtClose, lookup::RouteKind};

/// The client's close from `old` with `errno` (and the same soft error), and its route then.
fn close(a: Sock, ts: u64, old: TcpState, errno: i32, at_close: RouteAtClose) -> KernelEvent {
    let mut ev = a.closed(ts, old, Some(errno));
    if let KernelEvent::State {
        sk_err_soft, route, ..
    } = &mut ev
    {
        *sk_err_soft = Some(Errno(errno));
        *route = at_close;
    }
    ev
}

/// Whether the route was still cached (IPv4's answer; the capabilities not read).
fn cached(cached: Option<bool>) -> RouteAtClose {
    RouteAtClose { cached, caps: None }
}

/// An IPv6 socket's route at close: its cached route dropped (as every timed-out IPv6
/// socket's is), the capabilities as given.
fn v6_caps(caps: Option<bool>) -> RouteAtClose {
    RouteAtClose {
        cached: Some(false),
        caps,
    }
}

/// A client socket of fd77::1 to fd77::2.
fn client6(sk: u64, sport: u16) -> Sock {
    let mut a = Sock::client(sk, sport);
    a.t.saddr = IpAddr::V6(Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1));
    a.t.daddr = IpAddr::V6(Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2));
    a
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
    events.push(close(
        a,
        5 * SEC,
        S::Established,
        ENETUNREACH,
        cached(Some(false)),
    ));
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
        close(a, 3 * SEC, S::SynSent, EHOSTUNREACH, cached(Some(false))),
    ]);
    check(&v, "client failed no_route EHOSTUNREACH");
    assert_eq!(detail(&v, "route_lost"), true);
}

#[test]
fn an_icmp_answer_leaves_the_route_and_stays_icmp_unreachable() {
    let a = Sock::client(SK_A, SPORT);
    for c in [Some(true), None] {
        let mut events = established(a);
        events.push(close(a, 5 * SEC, S::Established, EHOSTUNREACH, cached(c)));
        let v = run_default(events);
        check(&v, "client failed icmp_unreachable EHOSTUNREACH");
        assert_eq!(detail(&v, "route_lost"), Value::Null, "{c:?}");
    }
}

#[test]
fn a_timeout_without_a_route_is_still_a_timeout() {
    // No route error: what emptied the route cache is not known (a redirect, a path MTU
    // exception's expiry), so nothing is claimed.
    let a = Sock::client(SK_A, SPORT);
    let mut events = established(a);
    events.push(close(a, 5 * SEC, S::Established, 110, cached(Some(false))));
    let v = run_default(events);
    check(&v, "client failed timeout ETIMEDOUT");
}

#[test]
fn an_ipv6_socket_whose_failed_lookup_zeroed_its_route_capabilities_lost_the_route() {
    let a = client6(SK_A, SPORT);
    let mut events = established(a);
    events.push(close(
        a,
        5 * SEC,
        S::Established,
        ENETUNREACH,
        v6_caps(Some(false)),
    ));
    let v = run_default(events);
    check(&v, "client failed no_route ENETUNREACH");
    assert_eq!(detail(&v, "icmp"), Value::Null, "no ICMP came");
    assert_eq!(detail(&v, "route_lost"), true);
}

#[test]
fn an_ipv6_socket_without_a_cached_route_but_with_its_capabilities_had_an_icmp_answer() {
    // IPv6 drops a timed-out socket's cached route whatever the cause: an ICMP answer's
    // socket closes without one too, its capabilities still set (or not read).
    let a = client6(SK_A, SPORT);
    for caps in [Some(true), None] {
        let mut events = established(a);
        events.push(close(
            a,
            5 * SEC,
            S::Established,
            ENETUNREACH,
            v6_caps(caps),
        ));
        let v = run_default(events);
        check(&v, "client failed icmp_unreachable ENETUNREACH");
        assert_eq!(detail(&v, "route_lost"), Value::Null, "{caps:?}");
    }
}

#[test]
fn an_ipv4_socket_is_told_by_its_cached_route_not_its_capabilities() {
    // Capabilities zeroed with the route still cached: IPv4's rule reads the cache alone.
    let a = Sock::client(SK_A, SPORT);
    let mut events = established(a);
    let route = RouteAtClose {
        cached: Some(true),
        caps: Some(false),
    };
    events.push(close(a, 5 * SEC, S::Established, EHOSTUNREACH, route));
    let v = run_default(events);
    check(&v, "client failed icmp_unreachable EHOSTUNREACH");
}

/// An idle IPv4 client that timed out (ETIMEDOUT, no soft error) with its route cache as
/// given, in a namespace whose route to the server is `route` (`None`: unreadable).
fn idle_timeout(cached: Option<bool>, route: Option<RouteKind>) -> Verdict {
    let a = Sock::client(SK_A, SPORT);
    let mut events = established(a);
    let mut close = a.closed(5 * SEC, S::Established, Some(110));
    if let KernelEvent::State { route: r, .. } = &mut close {
        *r = RouteAtClose {
            cached,
            caps: Some(true),
        };
    }
    events.push(close);
    let mut e =
        Engine::new(EngineConfig::default()).with_namespace_lookup(super::route::routes(route));
    let mut out = feed(&mut e, events);
    out.extend(e.tick(LATER));
    one(out)
}

#[test]
fn an_idle_connection_that_timed_out_where_no_route_is_left_is_no_route() {
    for (kind, name) in [
        (RouteKind::None, "none"),
        (RouteKind::Unreachable, "unreachable"),
        (RouteKind::Prohibit, "prohibit"),
        (RouteKind::Blackhole, "blackhole"),
    ] {
        let v = idle_timeout(Some(false), Some(kind));
        check(&v, "client failed no_route ETIMEDOUT");
        assert_eq!(detail(&v, "route_lost"), true, "{name}");
        assert_eq!(detail(&v, "route")["kind"], name);
        assert_eq!(detail(&v, "icmp"), Value::Null);
        assert!(detail(&v, "established_ms").as_f64().is_some());
    }
}

#[test]
fn an_idle_timeout_is_a_timeout_where_a_route_is_there_or_unknown() {
    // A route now (it came back, or the cache went for another reason), the namespace
    // unreadable, or the route still cached: nothing is claimed.
    for (cached, route) in [
        (Some(false), Some(RouteKind::Unicast)),
        (Some(false), None),
        (Some(true), Some(RouteKind::None)),
        (None, Some(RouteKind::None)),
    ] {
        let v = idle_timeout(cached, route);
        check(&v, "client failed timeout ETIMEDOUT");
        assert_eq!(detail(&v, "route"), Value::Null, "{cached:?} {route:?}");
    }
}
