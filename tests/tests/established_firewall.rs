//! Firewall rules that hit established connections: the server's INPUT drops or rejects the
//! client's requests (a rule that matches only segments of 200 bytes or more, so the handshake
//! and the greeting pass). conntrace sees both namespaces: the client's verdict names the rule
//! in the server's namespace (`detail.peer_netns`), in either follow mode.

use std::time::Duration;

use conntrace_tests::{FOLLOW_MODES, PORT, Scenario, TwoHosts, connect, only_verdict_in};
use serde_json::Value;

/// A request larger than one segment: its first segment is full-size (the pattern of a path
/// MTU black hole, which this is not).
fn big_request() -> String {
    "x".repeat(2000)
}

/// The server's INPUT rule against segments of 200 bytes or more to the port.
fn server_rule(target: &[&str]) -> Vec<String> {
    let mut rule: Vec<String> = [
        "iptables",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        "3306",
        "-m",
        "length",
        "--length",
        "200:65535",
        "-j",
    ]
    .map(String::from)
    .to_vec();
    rule.extend(target.iter().map(|s| s.to_string()));
    rule
}

/// One connection that reads the greeting, sends `request` and waits for an answer, under
/// `target` on the server's INPUT; the client's namespace gives up after 3 retransmissions
/// (`tcp_retries2=3`, about 3 s). Returns the hosts, the client's result and the records.
fn request_through(target: &[&str], request: &str, follow: &str) -> (TwoHosts, Value, Vec<Value>) {
    let rule = server_rule(target);
    let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
    let Scenario {
        hosts,
        ct,
        server: _server,
    } = Scenario::new()
        .in_server(&rule)
        .in_client(&["sysctl", "-qw", "net.ipv4.tcp_retries2=3"])
        .conntrace(&["--port", "3306", "--follow", follow])
        .serve(&["--greeting", "hi\n"]);
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &[
            "--read",
            "--request",
            request,
            "--expect-bytes",
            "1",
            "--timeout-ms",
            "15000",
        ],
    );
    let result = client.json_lines(Duration::from_secs(30)).remove(0);
    let values = ct.stop_after_verdict_in(hosts.client.inode());
    (hosts, result, values)
}

/// The client's verdict names the server's rule, in the server's namespace.
fn assert_named_at_server(v: &Value, hosts: &TwoHosts, follow: &str) {
    assert_eq!(
        v["detail"]["peer_netns"],
        hosts.server.inode(),
        "--follow {follow}: {v}"
    );
    assert_eq!(v["detail"]["hook"], "INPUT", "--follow {follow}: {v}");
    assert_eq!(
        v["detail"]["rule"]["chain"], "INPUT",
        "--follow {follow}: {v}"
    );
    assert_eq!(v["side"], "client", "{v}");
}

#[test]
fn a_request_the_servers_firewall_drops_is_netfilter_drop_there_not_a_path_mtu_black_hole() {
    for follow in FOLLOW_MODES {
        let (hosts, result, values) = request_through(&["DROP"], &big_request(), follow);
        assert_eq!(result["errno"], 110, "ETIMEDOUT: {result}");
        let v = only_verdict_in(&values, hosts.client.inode());
        assert_eq!(
            (v["reason"].as_str(), v["errno"].as_str()),
            (Some("netfilter_drop"), Some("ETIMEDOUT")),
            "--follow {follow}: {v}"
        );
        assert_named_at_server(&v, &hosts, follow);
        assert!(
            v["detail"]["retransmits"]["count"].as_u64() >= Some(2),
            "full-size retransmissions: {v}"
        );
    }
}

#[test]
fn a_reset_from_the_servers_reject_rule_is_netfilter_reject_not_the_server_aborting() {
    for follow in FOLLOW_MODES {
        let (hosts, result, values) = request_through(
            &["REJECT", "--reject-with", "tcp-reset"],
            &big_request(),
            follow,
        );
        assert_eq!(result["errno"], 104, "ECONNRESET: {result}");
        let v = only_verdict_in(&values, hosts.client.inode());
        assert_eq!(
            (v["reason"].as_str(), v["errno"].as_str()),
            (Some("netfilter_reject"), Some("ECONNRESET")),
            "--follow {follow}: {v}"
        );
        assert_eq!(v["detail"]["reject_with"], "tcp-reset", "{v}");
        assert_named_at_server(&v, &hosts, follow);
    }
}

#[test]
fn icmp_answers_to_an_established_connection_are_the_servers_reject_rule() {
    // The kernel keeps ICMP errors to an established socket as soft errors; when the
    // retransmissions run out it reports the last (ECONNREFUSED) instead of ETIMEDOUT.
    for follow in FOLLOW_MODES {
        let (hosts, result, values) = request_through(&["REJECT"], &"y".repeat(300), follow);
        assert_eq!(result["errno"], 111, "ECONNREFUSED: {result}");
        let v = only_verdict_in(&values, hosts.client.inode());
        assert_eq!(
            (v["reason"].as_str(), v["errno"].as_str()),
            (Some("netfilter_reject"), Some("ECONNREFUSED")),
            "--follow {follow}: {v}"
        );
        assert_eq!(v["detail"]["icmp"], "port-unreachable", "{v}");
        assert_named_at_server(&v, &hosts, follow);
    }
}

#[test]
fn a_reset_from_the_clients_own_reject_rule_is_netfilter_reject_in_its_namespace() {
    // REJECT --reject-with tcp-reset in the client's own OUTPUT: the RST looks like the
    // server's, but the client's namespace dropped the request first.
    for follow in FOLLOW_MODES {
        let Scenario {
            hosts,
            ct,
            server: _server,
        } = Scenario::new()
            .in_client(&[
                "iptables",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "--dport",
                "3306",
                "-m",
                "length",
                "--length",
                "200:65535",
                "-j",
                "REJECT",
                "--reject-with",
                "tcp-reset",
            ])
            .conntrace(&["--port", "3306", "--follow", follow])
            .serve(&["--greeting", "hi\n"]);
        let request = big_request();
        let client = connect(
            &hosts.client,
            &hosts.server_ip,
            PORT,
            &[
                "--read",
                "--request",
                &request,
                "--expect-bytes",
                "1",
                "--timeout-ms",
                "15000",
            ],
        );
        let result = client.json_lines(Duration::from_secs(30)).remove(0);
        assert_eq!(result["errno"], 104, "ECONNRESET: {result}");
        let values = ct.stop_after_verdict_in(hosts.client.inode());
        let v = only_verdict_in(&values, hosts.client.inode());
        assert_eq!(
            (v["reason"].as_str(), v["detail"]["hook"].as_str()),
            (Some("netfilter_reject"), Some("OUTPUT")),
            "--follow {follow}: {v}"
        );
        assert_eq!(v["detail"]["reject_with"], "tcp-reset", "{v}");
        assert!(v["detail"].get("peer_netns").is_none(), "its own rule: {v}");
    }
}
