//! Input 1: no false failures on a host that forwards traffic. The router namespace
//! (`ip_forward=1` inside it only) sees every SYN-ACK it forwards with no socket of its own:
//! none is a SYN cookie and none a failure; its namespace has no verdict at all.

use std::time::Duration;

use conntrace_tests::{PORT, Scenario, connect, helper_bin, verdicts_in};
use serde_json::Value;

use crate::{expect_verdicts, report};

/// Asserts that the summary counts no SYN cookie at the server's listener (absent, or 0) and
/// that the router's SyncookiesSent did not grow.
fn assert_no_cookies(summary: &Value, listener: &str, router_ns: u64) {
    let counts = &summary["listeners"][listener];
    for field in ["cookies_sent", "cookies_failed"] {
        assert!(
            counts[field].is_null() || counts[field] == 0,
            "{listener} {field}: {summary}"
        );
    }
    let sent = &summary["tcp_counters"][router_ns.to_string()]["SyncookiesSent"];
    assert!(
        sent.is_null() || *sent == 0,
        "router SyncookiesSent: {summary}"
    );
}

#[test]
fn twenty_connections_through_a_forwarding_host_are_twenty_established_and_nothing_in_the_router() {
    let Scenario {
        hosts,
        ct,
        server: _server,
    } = Scenario::routed()
        .serve(&["--greeting", "hello"])
        .conntrace(&["--port", "3306", "--all"]);
    // Each client reads the greeting and closes; the server waits for the close.
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &["--count", "20", "--read", "--timeout-ms", "5000"],
    );
    let results = client.json_lines(Duration::from_secs(30));
    assert_eq!(results.len(), 20);
    assert!(
        results
            .iter()
            .all(|r| r["ok"] == true && r["received"] == 5),
        "every client got its greeting through the router: {results:?}"
    );
    // The server's verdicts wait for accept() to name the process; the closes to finish.
    std::thread::sleep(Duration::from_secs(1));
    let values = ct.stop();
    let (client_ns, router_ns, server_ns) = (
        hosts.client.inode(),
        hosts.router.inode(),
        hosts.server.inode(),
    );
    report(
        "forwarding-20",
        &values,
        &[
            ("client", client_ns),
            ("router", router_ns),
            ("server", server_ns),
        ],
    );

    let clients = expect_verdicts(
        &values,
        client_ns,
        &["client established established -"; 20],
    );
    let servers = expect_verdicts(
        &values,
        server_ns,
        &["server established established -"; 20],
    );
    assert!(
        clients
            .iter()
            .all(|v| v["daddr"] == hosts.server_ip.as_str())
    );
    assert!(
        servers.iter().all(|v| v["comm"] == "ct-server"),
        "{servers:#?}"
    );
    // The router forwarded every packet of the 20 connections and owns none of them.
    expect_verdicts(&values, router_ns, &[]);
    let summary = values.last().expect("summary");
    assert_no_cookies(summary, &format!("{}:3306", hosts.server_ip), router_ns);
}

#[test]
fn a_routers_reject_with_tcp_reset_is_netfilter_reject_for_the_client_not_a_closed_port() {
    // kube-proxy's answer for a Service without endpoints, in the router's FORWARD chain: the
    // client's RST looks like a closed port's, but its SYN never reached the server (which
    // listens).
    let Scenario {
        hosts,
        ct,
        server: _server,
    } = Scenario::routed()
        .in_router(&[
            "iptables",
            "-A",
            "FORWARD",
            "-p",
            "tcp",
            "--dport",
            "3306",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
            "-w",
        ])
        .serve(&["--greeting", "hello"])
        .conntrace(&["--port", "3306"]);
    let results = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &["--timeout-ms", "5000"],
    )
    .json_lines(Duration::from_secs(30));
    assert_eq!(results[0]["errno"], 111, "{results:?}");
    let values = ct.stop_after_verdict_in(hosts.client.inode());
    let v = conntrace_tests::only_verdict_in(&values, hosts.client.inode());
    assert_eq!(
        (&v["reason"], &v["errno"]),
        (&"netfilter_reject".into(), &"ECONNREFUSED".into()),
        "{v}"
    );
    assert_eq!(v["detail"]["reject_with"], "tcp-reset", "{v}");
    assert_eq!(
        v["detail"]["path_drops"][0]["netns"],
        hosts.router.inode(),
        "{v}"
    );
    // The router's drop joined the path: no verdict of its own there.
    expect_verdicts(&values, hosts.router.inode(), &[]);
}

/// Established verdicts of `side` in namespaces other than `ours` (another test's traffic on
/// this machine, traced too): the part of the summary's count that is not this test's.
fn established_elsewhere(values: &[Value], side: &str, ours: &[u64]) -> u64 {
    values
        .iter()
        .filter(|v| v["event"] == "verdict" && v["outcome"] == "established")
        .filter(|v| v["side"] == side && !ours.iter().any(|ns| v["netns"] == *ns))
        .count() as u64
}

#[test]
fn ten_thousand_connections_through_a_forwarding_host_print_no_failure() {
    let Scenario {
        hosts,
        ct,
        server: _server,
    } = Scenario::routed()
        .in_client(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"])
        .serve_load(PORT)
        // --all: one `established` verdict per connection and side, so each namespace's count
        // is exact even when other tests on the machine use the port too.
        .conntrace(&["--port", "3306", "--all", "--ring-buffer-bytes", "16777216"]);
    // 10,000 greetings at 1,000 a second (4 threads): about 10 s.
    let out = hosts
        .client
        .command(helper_bin("ctload").to_str().expect("utf-8 path"))
        .args(["churn", &hosts.server_ip, &PORT.to_string()])
        .args(["--for-ms", "30000", "--rate", "1000", "--parallel", "4"])
        .args(["--count", "10000"])
        .output()
        .expect("run ctload churn");
    let churn: Value = serde_json::from_slice(&out.stdout).expect("ctload's line");
    println!("MEASURED forwarding-10k churn: {churn}");
    assert_eq!(
        (&churn["connections"], &churn["failed"]),
        (&Value::from(10_000), &Value::from(0)),
        "{churn}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let values = ct.stop();
    let ours = [
        hosts.client.inode(),
        hosts.router.inode(),
        hosts.server.inode(),
    ];
    let [client_ns, router_ns, server_ns] = ours;
    let counts = |ns| verdicts_in(&values, ns).len();
    println!(
        "MEASURED forwarding-10k verdicts: client {}, router {}, server {}",
        counts(client_ns),
        counts(router_ns),
        counts(server_ns)
    );
    expect_verdicts(
        &values,
        client_ns,
        &["client established established -"; 10_000],
    );
    expect_verdicts(
        &values,
        server_ns,
        &["server established established -"; 10_000],
    );
    expect_verdicts(&values, router_ns, &[]);
    let without_ns = values
        .iter()
        .filter(|v| v["event"] == "verdict" && v["netns"].is_null())
        .count();
    assert_eq!(without_ns, 0, "verdicts without a namespace");
    let summary = values.last().expect("summary");
    for side in ["client", "server"] {
        let elsewhere = established_elsewhere(&values, side, &ours);
        assert_eq!(
            summary["established"][side].as_u64(),
            Some(10_000 + elsewhere),
            "{side}: 10,000 here and {elsewhere} in other tests' namespaces: {summary}"
        );
    }
    assert_no_cookies(summary, &format!("{}:3306", hosts.server_ip), router_ns);
}
