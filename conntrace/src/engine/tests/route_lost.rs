//! Routes that went away under connections (`rules::connect::route_lost`): `no_route` where
//! this host's routes failed the retransmissions, `icmp_unreachable` where an ICMP answer did.

use super::*;
use crate::engine::facts::TableAnswer;

/// The established client's close with `errno` (and the same soft error), and whether its
/// route was still cached.
fn close(a: Sock, ts: u64, errno: i32, route_cached: Option<bool>) -> KernelEvent {
    KernelEvent::State {
        meta: softirq(ts),
        sk: a.sk,
        tuple: a.t,
        old: S::Established,
        new: S::Close,
        sk_err: Some(Errno(errno)),
        sk_err_soft: Some(Errno(errno)),
        closing: None,
        route_cached,
    }
}

/// A client that connects and is established.
fn established(a: Sock) -> Vec<KernelEvent> {
    vec![
        a.connect(MS, 100, "client"),
        a.st(2 * MS, S::SynSent, S::Established),
    ]
}

/// One of its retransmissions' route lookups failed: no route in the main table.
fn lookup_failed(a: Sock, ts: u64) -> KernelEvent {
    KernelEvent::RouteLookupFailed {
        // Softirq context: no namespace.
        meta: Meta {
            netns: None,
            ..softirq(ts)
        },
        tuple: a.t,
        table: 254,
        answer: TableAnswer::Miss,
    }
}

const ENETUNREACH: i32 = 101;
const EHOSTUNREACH: i32 = 113;

#[test]
fn an_ipv4_socket_that_closed_without_its_route_lost_the_route() {
    let a = Sock::client(SK_A, SPORT);
    let mut events = established(a);
    events.push(close(a, 5 * SEC, ENETUNREACH, Some(false)));
    let v = run_default(events);
    check(&v, "client failed no_route ENETUNREACH");
    assert_eq!(detail(&v, "icmp"), Value::Null, "no ICMP came");
    assert_eq!(
        detail(&v, "route_lost"),
        serde_json::json!({ "seen": "no_cached_route" })
    );
    assert!(detail(&v, "established_ms").as_f64().is_some());
}

#[test]
fn an_icmp_answer_leaves_the_route_and_stays_icmp_unreachable() {
    let a = Sock::client(SK_A, SPORT);
    for cached in [Some(true), None] {
        let mut events = established(a);
        events.push(close(a, 5 * SEC, EHOSTUNREACH, cached));
        let v = run_default(events);
        check(&v, "client failed icmp_unreachable EHOSTUNREACH");
        assert_eq!(detail(&v, "route_lost"), Value::Null, "{cached:?}");
    }
}

#[test]
fn failed_lookups_of_its_route_name_the_table_and_count() {
    // Seen before it closed, and whether it still had a route not read: the lookups alone.
    let a = Sock::client(SK_A, SPORT);
    let mut events = established(a);
    events.extend([
        lookup_failed(a, 3 * SEC),
        lookup_failed(a, 4 * SEC),
        close(a, 5 * SEC, ENETUNREACH, None),
    ]);
    let v = run_default(events);
    check(&v, "client failed no_route ENETUNREACH");
    assert_eq!(
        detail(&v, "route_lost"),
        serde_json::json!({
            "seen": "route_lookups",
            "table": 254,
            "answer": "no_route",
            "failed_lookups": 2,
            "since_ms": 2000.0
        })
    );
}

#[test]
fn failed_lookups_kept_until_the_connection_is_followed_still_count() {
    // Quiet mode: the connection reaches userspace only at its close, after its lookups.
    let a = Sock::client(SK_A, SPORT);
    let mut events = vec![lookup_failed(a, 3 * SEC)];
    events.extend(established(a));
    events.push(close(a, 5 * SEC, ENETUNREACH, None));
    let v = run_default(events);
    check(&v, "client failed no_route ENETUNREACH");
    assert_eq!(detail(&v, "route_lost")["seen"], "route_lookups");
}

#[test]
fn lookups_that_do_not_explain_the_error_leave_it_to_the_icmp_answer() {
    // No route in the main table is ENETUNREACH; an EHOSTUNREACH came from elsewhere.
    let a = Sock::client(SK_A, SPORT);
    let mut events = established(a);
    events.extend([
        lookup_failed(a, 3 * SEC),
        close(a, 5 * SEC, EHOSTUNREACH, Some(true)),
    ]);
    let v = run_default(events);
    check(&v, "client failed icmp_unreachable EHOSTUNREACH");
}

#[test]
fn a_connected_sockets_failed_lookup_is_no_connect_failure() {
    // Its tuple has a local port and address: not a connect() walk, so no verdict of its own.
    let a = Sock::client(SK_A, SPORT);
    let (e, out) = run(EngineConfig::default(), vec![lookup_failed(a, SEC)]);
    none(out);
    assert_eq!(totals(&e).2, 0, "kept, not unmatched");
}
