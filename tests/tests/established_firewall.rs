//! Firewall rules that hit established connections: a rule that matches only segments of 200
//! bytes or more (so the handshake and the greeting pass) drops or rejects the client's
//! request, in the server's INPUT or raw PREROUTING (before the packet finds its socket), or
//! the client's own OUTPUT. conntrace sees both namespaces: the client's verdict names the
//! rule, and where it is (`detail.peer_netns` for the server's), in either follow mode; the
//! server's end, still open, gives none.

use std::time::Duration;

use conntrace_tests::{
    FOLLOW_MODES, PORT, Scenario, TwoHosts, connect, only_verdict_in, verdicts_in,
};
use serde_json::Value;

/// A request larger than one segment: its first segment is full-size (the pattern of a path
/// MTU black hole, which this is not).
fn big_request() -> String {
    "x".repeat(2000)
}

/// Where the rule goes: the server's INPUT or raw PREROUTING, or the client's OUTPUT.
#[derive(Clone, Copy, PartialEq)]
enum At {
    ServerInput,
    ServerRawPrerouting,
    ClientOutput,
}

impl At {
    /// The chain, which is also the hook the drop is reported at.
    fn chain(self) -> &'static str {
        match self {
            At::ServerInput => "INPUT",
            At::ServerRawPrerouting => "PREROUTING",
            At::ClientOutput => "OUTPUT",
        }
    }
}

/// Adds `-j TARGET...` for segments of 200 bytes or more to the port, at `at`.
fn add_rule(hosts: &TwoHosts, at: At, target: &[&str]) {
    let (ns, table) = match at {
        At::ServerInput => (&hosts.server, "filter"),
        At::ServerRawPrerouting => (&hosts.server, "raw"),
        At::ClientOutput => (&hosts.client, "filter"),
    };
    let mut rule = vec![
        "iptables",
        "-t",
        table,
        "-A",
        at.chain(),
        "-p",
        "tcp",
        "--dport",
        "3306",
        "-m",
        "length",
        "--length",
        "200:65535",
        "-j",
    ];
    rule.extend(target);
    ns.exec(&rule);
}

/// One connection per follow mode that reads the greeting, sends `request` and waits for an
/// answer, under the rule; the client's namespace gives up after 3 retransmissions
/// (`tcp_retries2=3`, about 3 s). Checks the client's errno and its verdict's reason and
/// errno; returns each mode's client verdict.
fn client_verdicts(
    at: At,
    target: &[&str],
    request: &str,
    (errno, reason, errno_name): (i64, &str, &str),
) -> Vec<Value> {
    let mut verdicts = Vec::new();
    for follow in FOLLOW_MODES {
        let Scenario {
            hosts,
            ct,
            server: _server,
        } = Scenario::new()
            .with(|h| add_rule(h, at, target))
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
        assert_eq!(result["errno"], errno, "{errno_name}: {result}");
        let values = ct.stop_after_verdict_in(hosts.client.inode());
        let v = only_verdict_in(&values, hosts.client.inode());
        assert_eq!(
            (
                v["side"].as_str(),
                v["reason"].as_str(),
                v["errno"].as_str()
            ),
            (Some("client"), Some(reason), Some(errno_name)),
            "--follow {follow}: {v}"
        );
        let (hook, peer) = match at {
            At::ServerInput | At::ServerRawPrerouting => {
                (at.chain(), Value::from(hosts.server.inode()))
            }
            At::ClientOutput => (at.chain(), Value::Null),
        };
        assert_eq!(
            (&v["detail"]["hook"], &v["detail"]["rule"]["chain"]),
            (&Value::from(hook), &Value::from(hook)),
            "--follow {follow}: {v}"
        );
        assert_eq!(v["detail"]["peer_netns"], peer, "--follow {follow}: {v}");
        // The server's end is open: no verdict there (a dropped segment that reached no
        // socket is no handshake's final ACK).
        let server = verdicts_in(&values, hosts.server.inode());
        assert!(server.is_empty(), "--follow {follow}: {server:?}");
        verdicts.push(v);
    }
    verdicts
}

#[test]
fn a_request_the_servers_firewall_drops_is_netfilter_drop_there_not_a_path_mtu_black_hole() {
    let expected = (110, "netfilter_drop", "ETIMEDOUT");
    for v in client_verdicts(At::ServerInput, &["DROP"], &big_request(), expected) {
        assert!(
            v["detail"]["retransmits"]["count"].as_u64() >= Some(2),
            "full-size retransmissions: {v}"
        );
    }
}

#[test]
fn a_request_dropped_before_the_servers_socket_is_netfilter_drop_there_not_a_handshake() {
    // The raw table's PREROUTING runs before early demux: the dropped segment carries no
    // socket, and in quiet mode the server's healthy end is not known to userspace.
    let expected = (110, "netfilter_drop", "ETIMEDOUT");
    for v in client_verdicts(At::ServerRawPrerouting, &["DROP"], &big_request(), expected) {
        assert_eq!(v["detail"]["rule"]["table"], "raw", "{v}");
    }
}

#[test]
fn a_reset_from_the_servers_reject_rule_is_netfilter_reject_not_the_server_aborting() {
    let target = ["REJECT", "--reject-with", "tcp-reset"];
    let expected = (104, "netfilter_reject", "ECONNRESET");
    for v in client_verdicts(At::ServerInput, &target, &big_request(), expected) {
        assert_eq!(v["detail"]["reject_with"], "tcp-reset", "{v}");
    }
}

#[test]
fn icmp_answers_to_an_established_connection_are_the_servers_reject_rule() {
    // The kernel keeps ICMP errors to an established socket as soft errors; when the
    // retransmissions run out it reports the last (ECONNREFUSED) instead of ETIMEDOUT.
    let expected = (111, "netfilter_reject", "ECONNREFUSED");
    for v in client_verdicts(At::ServerInput, &["REJECT"], &"y".repeat(300), expected) {
        assert_eq!(v["detail"]["icmp"], "port-unreachable", "{v}");
    }
}

#[test]
fn a_reset_from_the_clients_own_reject_rule_is_netfilter_reject_in_its_namespace() {
    // REJECT --reject-with tcp-reset in the client's own OUTPUT: the RST looks like the
    // server's, but the client's namespace dropped the request first.
    let target = ["REJECT", "--reject-with", "tcp-reset"];
    let expected = (104, "netfilter_reject", "ECONNRESET");
    for v in client_verdicts(At::ClientOutput, &target, &big_request(), expected) {
        assert_eq!(v["detail"]["reject_with"], "tcp-reset", "{v}");
    }
}
