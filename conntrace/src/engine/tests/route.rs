//! connect() errors before any packet in quiet mode, where connect() itself is not traced:
//! the route lookups' failed table answers (`fib_table_lookup`, `fib6_table_lookup`), in the
//! sequences measured on 6.18, and EADDRNOTAVAIL inferred from a socket that never got a port.
//! Each verdict must be the one the syscall path gives (`connect_failed`) in streaming mode.

use std::net::Ipv6Addr;

use super::*;
use crate::engine::{facts::TableAnswer, lookup::RouteKind};

const MAIN: u32 = 254;
const CUSTOM: u32 = 100;

/// A namespace whose route to every destination (`ip route get`) is of `kind`; `None`:
/// unreadable.
pub(super) fn routes(kind: Option<RouteKind>) -> Box<super::namespaces::FakeNamespaces> {
    let ns = super::namespaces::FakeNamespaces::new()
        .route(move |_| kind.map(|k| super::namespaces::route(k, None)));
    Box::new(ns)
}

/// An engine whose namespace's route is `route`'s kind, which the test changes while the
/// engine holds it (a script's `ip route` meanwhile).
fn changing(route: &std::rc::Rc<std::cell::Cell<Option<RouteKind>>>) -> Engine {
    let route = route.clone();
    let ns = super::namespaces::FakeNamespaces::new()
        .route(move |_| route.get().map(|kind| super::namespaces::route(kind, None)));
    Engine::new(EngineConfig::default()).with_namespace_lookup(Box::new(ns))
}

fn engine(route: Option<RouteKind>) -> Engine {
    Engine::new(EngineConfig::default()).with_namespace_lookup(routes(route))
}

fn v6(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// One table's failed answer to a lookup of connect() by pid 100 towards `daddr`:8080, from
/// `src` (unspecified before the kernel picked a source) with no local port yet.
fn lookup(ts: u64, daddr: IpAddr, src: IpAddr, table: u32, err: i32) -> KernelEvent {
    KernelEvent::RouteLookupFailed {
        meta: meta(ts, 100, "client"),
        tuple: FourTuple {
            saddr: src,
            sport: 0,
            daddr,
            dport: DPORT,
        },
        table,
        answer: TableAnswer::from_kernel(daddr.is_ipv6(), err),
    }
}

/// An IPv4 lookup without a source address (ip_route_connect's first).
fn lookup4(ts: u64, table: u32, err: i32) -> KernelEvent {
    lookup(ts, ip(2), IpAddr::V4(Ipv4Addr::UNSPECIFIED), table, err)
}

/// What the syscall path reports for the same connect() (streaming mode).
fn syscall(ts: u64, errno: i32) -> KernelEvent {
    Sock::client(0, SPORT).connect_failed(ts, 100, "client", errno)
}

/// The verdict as JSON without its time, for comparing the two paths.
fn comparable(v: &Verdict) -> Value {
    let mut j = serde_json::to_value(v).unwrap();
    j.as_object_mut().unwrap().remove("ts_ns");
    j
}

/// Feeds `events` (the first at `MS`), asserts nothing is decided within the grace period
/// of the first, then returns what is decided by the end of the last's (`last_ns`).
fn after_grace(e: &mut Engine, events: Vec<KernelEvent>, last_ns: u64) -> Vec<Verdict> {
    let grace = EngineConfig::default().grace_ns;
    none(feed(e, events));
    none(e.tick(MS + grace - 1));
    e.tick(last_ns + grace)
}

#[test]
fn a_route_that_ends_the_walk_is_connects_errno() {
    // fib_table_lookup: table 254 ... 0.0.0.0/0 -> 10.67.0.1/3306 ... err -113 (unreachable),
    // -13 (prohibit), -22 (blackhole): one answer, then connect() returns its errno.
    for (err, route, spec) in [
        (
            -113,
            RouteKind::Unreachable,
            "client failed no_route EHOSTUNREACH",
        ),
        (-13, RouteKind::Prohibit, "client failed no_route EACCES"),
        (-22, RouteKind::Blackhole, "client failed no_route EINVAL"),
    ] {
        let mut e = engine(Some(route));
        let v = one(after_grace(&mut e, vec![lookup4(MS, MAIN, err)], MS));
        check(&v, spec);
        assert_eq!(who(&v), "100/client -:->10.77.0.2:8080");
        assert_eq!(
            detail(&v, "route")["kind"],
            serde_json::to_value(route).unwrap()
        );
        assert_eq!(detail(&v, "packets_sent"), 0);
        assert_eq!(detail(&v, "syscall"), "connect");
        // Identical to what connect()'s own result gives when connections stream.
        let mut streaming = engine(Some(route));
        let w = one(streaming.handle(syscall(MS, -err)));
        assert_eq!(comparable(&v), comparable(&w));
        assert_eq!(e.summary().by_reason, streaming.summary().by_reason);
    }
}

#[test]
fn misses_in_every_table_are_enetunreach_once_the_route_confirms() {
    // fib_table_lookup: table 254 ... 0.0.0.0/0 -> 192.0.2.1/3306 ... err -11
    let mut e = engine(Some(RouteKind::None));
    let v = one(after_grace(&mut e, vec![lookup4(MS, MAIN, -11)], MS));
    check(&v, "client failed no_route ENETUNREACH");
    assert_eq!(detail(&v, "route")["kind"], "none");
    let w = one(engine(Some(RouteKind::None)).handle(syscall(MS, 101)));
    assert_eq!(comparable(&v), comparable(&w));
    // The namespace unreadable: the misses stand.
    let mut e = engine(None);
    check(
        &one(after_grace(&mut e, vec![lookup4(MS, MAIN, -11)], MS)),
        "client failed no_route ENETUNREACH",
    );
    // A table with a route answered after the traced misses: not the end of a connect().
    let mut e = engine(Some(RouteKind::Unicast));
    none(after_grace(&mut e, vec![lookup4(MS, CUSTOM, -11)], MS));
    none(e.finish(LATER));
}

#[test]
fn a_route_put_back_after_the_failed_connect_does_not_hide_it() {
    // `ip route del default; connect(); ip route add default ...`: the route is there again
    // when the grace period ends; the kernel's miss came while there was none.
    let route = std::rc::Rc::new(std::cell::Cell::new(Some(RouteKind::None)));
    let mut e = changing(&route);
    none(feed(&mut e, vec![lookup4(MS, MAIN, -11)]));
    route.set(Some(RouteKind::Unicast));
    let v = one(e.tick(MS + EngineConfig::default().grace_ns));
    check(&v, "client failed no_route ENETUNREACH");
    // The route as it was then, not the one put back.
    assert_eq!(detail(&v, "route")["kind"], "none");
    // An unreachable route, replaced by a unicast one before the decision: still its errno
    // and its route.
    route.set(Some(RouteKind::Unreachable));
    let mut e = changing(&route);
    none(feed(&mut e, vec![lookup4(MS, MAIN, -113)]));
    route.set(Some(RouteKind::Unicast));
    let v = one(e.tick(MS + EngineConfig::default().grace_ns));
    check(&v, "client failed no_route EHOSTUNREACH");
    assert_eq!(detail(&v, "route")["kind"], "unreachable");
}

#[test]
fn a_miss_then_a_connect_that_goes_on_gives_no_verdict() {
    // Custom rules: table 100 misses, the main table has the route (not traced), connect()
    // moves the socket to SYN_SENT. The namespace says nothing to the contrary here.
    let a = Sock::client(SK_A, SPORT);
    let mut e = engine(Some(RouteKind::None));
    let events = vec![
        lookup4(MS, CUSTOM, -11),
        a.connect(MS + 5_000, 100, "client"),
    ];
    none(after_grace(&mut e, events, MS + 5_000));
    none(e.finish(LATER));
    assert_eq!(e.summary().unmatched_errors, 0);
    // An unreachable route in a table whose lookup the kernel then ignores (a socket bound to
    // a device: ip_route_output_key_hash_rcu assumes the destination is on link).
    let mut e = engine(Some(RouteKind::Unreachable));
    let events = vec![
        lookup4(MS, MAIN, -113),
        a.connect(MS + 5_000, 100, "client"),
    ];
    none(after_grace(&mut e, events, MS + 5_000));
    // The task's namespace unread (its offsets missing from BTF), the socket's read.
    let mut e = engine(Some(RouteKind::None));
    let mut unread = lookup4(MS, CUSTOM, -11);
    if let KernelEvent::RouteLookupFailed { meta, .. } = &mut unread {
        meta.netns = None;
    }
    let events = vec![unread, a.connect(MS + 5_000, 100, "client")];
    none(after_grace(&mut e, events, MS + 5_000));
    // Another process's connect() to the same destination settles nothing of this one.
    let mut e = engine(Some(RouteKind::None));
    let events = vec![lookup4(MS, MAIN, -11), a.connect(MS + 5_000, 200, "other")];
    check(
        &one(after_grace(&mut e, events, MS + 5_000)),
        "client failed no_route ENETUNREACH",
    );
}

#[test]
fn one_verdict_per_connect_however_many_lookups_it_made() {
    // Custom rules, IPv4: table 100 misses, then the main table (the local table's miss is
    // left out in the kernel): one walk.
    let mut e = engine(Some(RouteKind::None));
    let events = vec![lookup4(MS, CUSTOM, -11), lookup4(MS + 3_000, MAIN, -11)];
    check(
        &one(after_grace(&mut e, events, MS + 3_000)),
        "client failed no_route ENETUNREACH",
    );
    // IPv6 (measured): the lookup without a source, then again from the source the kernel
    // picked, each a miss in the main table (-113: its "no route" entry is an unreachable
    // route): one connect().
    //   fib6_table_lookup: table 254 ... ::/0 -> 2001:db8::1/3306 ... err -113
    //   fib6_table_lookup: table 254 ... fd88::1/0 -> 2001:db8::1/3306 ... err -113
    let (dst, src) = (v6("2001:db8::1"), v6("fd88::1"));
    let any = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    let events = vec![
        lookup(MS, dst, any, MAIN, -113),
        lookup(MS + 6_000, dst, src, MAIN, -113),
    ];
    let mut e = engine(Some(RouteKind::None));
    let v = one(after_grace(&mut e, events.clone(), MS + 6_000));
    check(&v, "client failed no_route ENETUNREACH");
    assert_eq!(who(&v), "100/client -:->2001:db8::1:8080");
    // The same answers under an unreachable route are EHOSTUNREACH: only the route tells.
    let mut e = engine(Some(RouteKind::Unreachable));
    check(
        &one(after_grace(&mut e, events, MS + 6_000)),
        "client failed no_route EHOSTUNREACH",
    );
    // A prohibit route (IPv6): -13 twice, one connect().
    let events = vec![
        lookup(MS, v6("fd66::1"), any, MAIN, -13),
        lookup(MS + 6_000, v6("fd66::1"), src, MAIN, -13),
    ];
    let mut e = engine(Some(RouteKind::Prohibit));
    check(
        &one(after_grace(&mut e, events, MS + 6_000)),
        "client failed no_route EACCES",
    );
}

#[test]
fn each_failed_connect_has_its_verdict() {
    // Three connect() calls to one destination in quick succession (a retry loop), with a
    // custom rule's table before the main table: two fail in both, the third finds a route in
    // the main table (added in between) and goes on. (The namespace's route is not readable
    // here: read at the decision, it would show the route added since.)
    let a = Sock::client(SK_A, SPORT);
    let mut e = engine(None);
    let events = vec![
        lookup4(MS, CUSTOM, -11),
        lookup4(MS + 2_000, MAIN, -11),
        lookup4(MS + 50_000, CUSTOM, -11),
        lookup4(MS + 52_000, MAIN, -11),
        lookup4(MS + 100_000, CUSTOM, -11),
        a.connect(MS + 105_000, 100, "client"),
    ];
    let out = after_grace(&mut e, events, MS + 105_000);
    assert_eq!(out.len(), 2, "{out:#?}");
    for v in &out {
        check(v, "client failed no_route ENETUNREACH");
    }
    // A prohibit route ends a walk: a second lookup right after it is another connect().
    let mut e = engine(Some(RouteKind::Prohibit));
    let events = vec![lookup4(MS, MAIN, -13), lookup4(MS + 1_000, CUSTOM, -13)];
    assert_eq!(after_grace(&mut e, events, MS + 1_000).len(), 2);
}

#[test]
fn the_run_end_decides_what_still_waits() {
    let mut e = engine(Some(RouteKind::None));
    none(feed(&mut e, [lookup4(MS, MAIN, -11)]));
    check(&one(e.finish(MS + 1)), "client failed no_route ENETUNREACH");
}

/// CLOSE -> SYN_SENT -> CLOSE without a local port in between (1 us apart on 6.18):
///   sport=0 dport=3306 ... oldstate=TCP_CLOSE newstate=TCP_SYN_SENT
///   sport=0 dport=3306 ... oldstate=TCP_SYN_SENT newstate=TCP_CLOSE
fn no_free_port(a: Sock) -> Vec<KernelEvent> {
    let close = a.st_by(meta(MS + 1_000, 100, "client"), S::SynSent, S::Close);
    vec![a.connect(MS, 100, "client"), close]
}

#[test]
fn a_socket_that_never_got_a_port_is_eaddrnotavail_inferred() {
    let a = Sock::client(SK_A, 0);
    let mut e = Engine::new(EngineConfig::default());
    // It waits out the grace period for connect()'s own result, like any silent close.
    none(feed(&mut e, no_free_port(a)));
    none(e.tick(MS + 1_000 + EngineConfig::default().grace_ns - 1));
    let v = one(e.tick(LATER));
    check(&v, "client failed ephemeral_ports_exhausted EADDRNOTAVAIL");
    assert_eq!(detail(&v, "errno_inferred"), true);
    assert_eq!(
        v.kernel_reason.as_deref(),
        Some("closed in TCP_SYN_SENT without a local port")
    );
    assert_eq!(who(&v), "100/client 10.77.0.1:->10.77.0.2:8080");
    assert_eq!(detail(&v, "packets_sent"), 0);
    // With connect()'s result (streaming, fexit) the errno is seen, not inferred; the rest is
    // the same verdict.
    let mut events = no_free_port(a);
    events.push(a.connect_failed(MS + 3_000, 100, "client", libc::EADDRNOTAVAIL));
    let w = run_default(events);
    check(&w, "client failed ephemeral_ports_exhausted EADDRNOTAVAIL");
    assert_eq!(detail(&w, "errno_inferred"), Value::Null);
    assert_eq!(w.kernel_reason.as_deref(), Some("EADDRNOTAVAIL"));
    assert_eq!((who(&v), v.duration_ms), (who(&w), w.duration_ms));
}

#[test]
fn eaddrnotavail_is_never_inferred_for_a_handshake_that_got_a_port() {
    // Refused: the port is known by the RST.
    check(
        &run_default(refused_client(Sock::client(SK_A, SPORT), MS, 100)),
        "client failed refused_no_listener ECONNREFUSED",
    );
    // Closed by the application in SYN_SENT after its SYN: the close carries the port.
    let a = Sock::client(SK_A, SPORT);
    let close = a.st_by(meta(2 * MS, 100, "client"), S::SynSent, S::Close);
    let v = run_default(vec![a.connect(MS, 100, "client"), close]);
    check(&v, "client failed syn_timeout -");
    // Timed out: SYN retransmits, ETIMEDOUT.
    let mut events = vec![a.connect(MS, 100, "client"), a.rtx(SEC)];
    events.extend([a.st(3 * SEC, S::SynSent, S::Close), a.err(3 * SEC, 110)]);
    check(&run_default(events), "client failed syn_timeout ETIMEDOUT");
    // No port, but the socket closed with an error: not a failed port search.
    let b = Sock::client(SK_B, 0);
    let mut events = no_free_port(b);
    if let Some(KernelEvent::State { sk_err, .. }) = events.last_mut() {
        *sk_err = Some(Errno(113));
    }
    let v = run_default(events);
    assert_ne!(v.reason, Reason::EphemeralPortsExhausted, "{v:#?}");
}
