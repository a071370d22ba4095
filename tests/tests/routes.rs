//! Routes that go away under established connections, IPv4 and IPv6. Nothing answers and
//! nothing is rejected: this host's own routing table has no route left, so the verdict is
//! `no_route`, not `icmp_unreachable` (no ICMP came). With the request in flight
//! (unacknowledged), the client's retransmissions look the route up again and find none: the
//! kernel keeps that as the socket's soft error and gives up with ENETUNREACH. The client's
//! namespace gives up after 3 retransmissions (`tcp_retries2`, which IPv6 follows too). A
//! router's ICMP answer gives the client the same errno and stays `icmp_unreachable`.
//!
//! An idle connection (nothing in flight) whose route went before its next request: that
//! request is freed before it has an IP header (`IP_OUTNOROUTES`, IPv4) and sets no soft
//! error; the kernel probes and gives up with ETIMEDOUT. The socket has no route cached, and
//! its namespace's routing table, read at the verdict, has none either: `no_route` with the
//! route (`kind` `none`). IPv6 keeps the failed lookup as the soft error (ENETUNREACH) and
//! zeroes the route capabilities, as under retransmissions.

use std::time::Duration;

use conntrace_tests::{
    FOLLOW_MODES, Hosts, Netns, PORT, Proc, Scenario, connect, only_verdict_in, verdicts_in,
};
use serde_json::Value;

/// Which of the server's addresses the client connects to.
#[derive(Clone, Copy, Debug)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn server_ip<H: Hosts>(self, hosts: &H) -> String {
        match self {
            Family::V4 => hosts.server_ip(),
            Family::V6 => hosts.server_ip6(),
        }
        .to_owned()
    }
}

/// The namespace's routes of `family` go (its addresses stay): its next packet out finds none.
fn flush_routes(ns: &Netns, family: Family) {
    let flag = match family {
        Family::V4 => "-4",
        Family::V6 => "-6",
    };
    ns.exec(&["ip", flag, "route", "flush", "table", "main"]);
}

/// A client in `ns` that reads the greeting and sends its request `delay_ms` later, then
/// waits for an answer.
fn client(ns: &Netns, server_ip: &str, delay_ms: u64) -> Proc {
    connect(
        ns,
        server_ip,
        PORT,
        &[
            "--read",
            "--request",
            "ping\n",
            "--request-delay-ms",
            &delay_ms.to_string(),
            "--expect-bytes",
            "1",
            "--timeout-ms",
            "20000",
        ],
    )
}

/// The client's verdict in each follow mode, in hosts from `scenario` (its namespace gives up
/// after 3 retransmissions) over `family`, for `run` (which breaks the routes once the client
/// is established: it sends its request 800 ms after the greeting), after checking the errno
/// the client got and that the server's end is still open.
fn client_verdicts<H: Hosts>(
    scenario: impl Fn() -> Scenario<(), (), H>,
    family: Family,
    errno: i32,
    run: impl Fn(&H),
) -> Vec<(&'static str, Value)> {
    let mut verdicts = Vec::new();
    for follow in FOLLOW_MODES {
        // The server's end outlives the test (its process killed, its routes gone for the
        // lost-route cases): an orphan retransmitting its FIN. One retry, not eight, so that it
        // does not end minutes later under another test's conntrace.
        let traced = scenario()
            .in_client(&["sysctl", "-qw", "net.ipv4.tcp_retries2=3"])
            .in_server(&["sysctl", "-qw", "net.ipv4.tcp_orphan_retries=1"])
            .conntrace(&["--port", "3306", "--follow", follow]);
        let server_ip = family.server_ip(&traced.hosts);
        let Scenario {
            hosts,
            ct,
            server: _server,
        } = traced.serve_on(&server_ip, &["--greeting", "hi\n"]);
        let client = client(hosts.client(), &server_ip, 800);
        // `run`'s delays count from the handshake, whenever the client got to start.
        hosts
            .client()
            .wait_established(PORT, Duration::from_secs(10));
        run(&hosts);
        let result = client.json_lines(Duration::from_secs(40)).remove(0);
        assert_eq!(
            result["errno"],
            i64::from(errno),
            "--follow {follow}, {family:?}: {result}"
        );
        let values = ct.stop_after_verdict_in(hosts.client().inode());
        assert!(
            verdicts_in(&values, hosts.server().inode()).is_empty(),
            "the server's end is still open: --follow {follow}"
        );
        verdicts.push((follow, only_verdict_in(&values, hosts.client().inode())));
    }
    verdicts
}

/// The client's routes of `family` go under its retransmissions: `no_route` in each follow
/// mode, with the route lost and no ICMP.
fn route_lost_is_no_route(family: Family) {
    let verdicts = client_verdicts(Scenario::new, family, libc::ENETUNREACH, |hosts| {
        // The server cannot answer (its routes go first), so the request stays in flight;
        // then the client's routes go, between two of its retransmissions.
        std::thread::sleep(Duration::from_millis(300));
        flush_routes(&hosts.server, family);
        std::thread::sleep(Duration::from_millis(1_300));
        flush_routes(&hosts.client, family);
    });
    for (follow, v) in verdicts {
        assert_eq!(
            (
                v["side"].as_str(),
                v["reason"].as_str(),
                v["errno"].as_str(),
                v["detail"]["closed_from"].as_str()
            ),
            (
                Some("client"),
                Some("no_route"),
                Some("ENETUNREACH"),
                Some("TCP_ESTABLISHED")
            ),
            "--follow {follow}, {family:?}: {v}"
        );
        assert!(v["detail"]["icmp"].is_null(), "no ICMP came: {v}");
        assert_eq!(
            v["detail"]["route_lost"], true,
            "--follow {follow}, {family:?}: no route left when it closed: {v}"
        );
    }
}

#[test]
fn a_route_lost_under_retransmissions_is_no_route_not_an_icmp_answer() {
    route_lost_is_no_route(Family::V4);
}

#[test]
fn an_ipv6_route_lost_under_retransmissions_is_no_route_too() {
    // IPv6 drops a timed-out socket's cached route whatever the cause: the route
    // capabilities the failed lookups zeroed tell it from an ICMP answer.
    route_lost_is_no_route(Family::V6);
}

/// The router between them gets an `unreachable` route to the server (`family`) while the
/// client is connected, and answers the request with an ICMP error: the client, which keeps
/// its own route, ends `icmp_unreachable` with `errno` (named `name`), not `no_route` (the router's lookups
/// are not the client's).
fn router_answer_is_icmp_unreachable(family: Family, (errno, name): (i32, &str)) {
    let verdicts = client_verdicts(Scenario::routed, family, errno, |hosts| {
        std::thread::sleep(Duration::from_millis(300));
        let (flag, prefix) = match family {
            Family::V4 => ("-4", format!("{}/32", hosts.server_ip)),
            Family::V6 => ("-6", format!("{}/128", hosts.server_ip6)),
        };
        hosts
            .router
            .exec(&["ip", flag, "route", "add", "unreachable", &prefix]);
    });
    for (follow, v) in verdicts {
        assert_eq!(
            (
                v["reason"].as_str(),
                v["errno"].as_str(),
                v["detail"]["closed_from"].as_str()
            ),
            (
                Some("icmp_unreachable"),
                Some(name),
                Some("TCP_ESTABLISHED")
            ),
            "--follow {follow}, {family:?}: {v}"
        );
        assert!(v["detail"]["route_lost"].is_null(), "{v}");
    }
}

#[test]
fn an_icmp_answer_from_a_router_without_a_route_stays_icmp_unreachable() {
    // ICMP host unreachable.
    router_answer_is_icmp_unreachable(Family::V4, (libc::EHOSTUNREACH, "EHOSTUNREACH"));
}

#[test]
fn an_icmpv6_answer_from_a_router_without_a_route_stays_icmp_unreachable() {
    // ICMPv6 "no route to destination", which the client's kernel turns into ENETUNREACH:
    // the errno a lost route gives.
    router_answer_is_icmp_unreachable(Family::V6, (libc::ENETUNREACH, "ENETUNREACH"));
}

/// The client's routes of `family` go while it is idle (before its request): `no_route` in
/// each follow mode, with the errno the client got and `route_kind`, the namespace's route
/// read at the verdict (only where the socket itself cannot tell: IPv4).
fn idle_route_lost_is_no_route(
    family: Family,
    (errno, name): (i32, &str),
    route_kind: Option<&str>,
) {
    let verdicts = client_verdicts(Scenario::new, family, errno, |hosts| {
        // The greeting came; the request goes 800 ms after it. The server's routes go too:
        // its close after 10 s without a request must not reach the client before the
        // client's probes give up (they took longer than that on 6.1 under emulation).
        std::thread::sleep(Duration::from_millis(300));
        flush_routes(hosts.server(), family);
        flush_routes(hosts.client(), family);
    });
    for (follow, v) in verdicts {
        assert_eq!(
            (
                v["reason"].as_str(),
                v["errno"].as_str(),
                v["detail"]["route_lost"].as_bool()
            ),
            (Some("no_route"), Some(name), Some(true)),
            "--follow {follow}, {family:?}: {v}"
        );
        assert!(v["detail"]["icmp"].is_null(), "no ICMP came: {v}");
        assert_eq!(
            v["detail"]["route"]["kind"].as_str(),
            route_kind,
            "--follow {follow}, {family:?}: {v}"
        );
    }
}

#[test]
fn an_idle_connection_whose_route_went_times_out_as_no_route() {
    idle_route_lost_is_no_route(Family::V4, (libc::ETIMEDOUT, "ETIMEDOUT"), Some("none"));
}

#[test]
fn an_idle_ipv6_connection_whose_route_went_is_no_route() {
    // The failed lookup is the socket's soft error and zeroes its route capabilities.
    idle_route_lost_is_no_route(Family::V6, (libc::ENETUNREACH, "ENETUNREACH"), None);
}
