//! Input 5: stalls after the handshake. A path-MTU black hole (the router's link towards the
//! client carries 1400 bytes, the server's firewall drops the router's "fragmentation needed"),
//! and a zero window (a server that greets, then stops reading while the client sends 32 MB).

use std::time::Duration;

use conntrace_tests::{Conntrace, PORT, Proc, Scenario, ThreeHosts, connect};
use serde_json::Value;

use crate::{detail, expect_verdicts, report, stop_after};

/// The black hole, traced: the router's link towards the client carries 1400 bytes (every
/// other link 1500) and the server's firewall drops ICMP, so "fragmentation needed" never
/// arrives; no MTU probing (the default), and the server gives up after 3 retransmissions.
/// The server answers a request with 64 KiB.
fn black_hole() -> Scenario<Conntrace, Proc, ThreeHosts> {
    Scenario::routed()
        .with(|h| {
            h.router
                .exec(&["ip", "link", "set", &h.router_client_if, "mtu", "1400"]);
        })
        .in_server(&["iptables", "-A", "INPUT", "-p", "icmp", "-j", "DROP"])
        .in_server(&["sysctl", "-qw", "net.ipv4.tcp_mtu_probing=0"])
        .in_server(&["sysctl", "-qw", "net.ipv4.tcp_retries2=3"])
        .serve(&["--respond", "65536", "--report"])
        .conntrace(&["--port", "3306", "--stall-timeout", "2s"])
}

#[test]
fn a_path_mtu_black_hole_is_pmtu_blackhole_on_the_sender_and_a_stall_on_the_client() {
    let Scenario { hosts, ct, server } = black_hole();
    let mut server = server.read_stdout();
    // A small request passes; the 64 KiB answer, in full-size segments, never does.
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &[
            "--request",
            "GET\n",
            "--expect-bytes",
            "65536",
            "--timeout-ms",
            "10000",
        ],
    );
    let result = &client.json_lines(Duration::from_secs(30))[0];
    assert_eq!(
        (&result["stage"], &result["errno"], &result["received"]),
        (&Value::from("read"), &Value::from(11), &Value::from(0)),
        "the client's read timed out with nothing received: {result}"
    );
    let (client_ns, router_ns, server_ns) = (
        hosts.client.inode(),
        hosts.router.inode(),
        hosts.server.inode(),
    );
    let values = stop_after(
        ct,
        Duration::from_secs(3),
        &[(server_ns, "failed"), (client_ns, "failed")],
    );
    server.kill();
    let served = server.json_lines(Duration::from_secs(5));
    println!("MEASURED pmtu server: {served:?}; client: {result}");
    assert_eq!(
        (&served[0]["errno"], &served[0]["received"]),
        (&Value::from(110), &Value::from(4)),
        "the server's connection timed out after the request: {served:?}"
    );
    report(
        "pmtu_blackhole",
        &values,
        &[
            ("client", client_ns),
            ("router", router_ns),
            ("server", server_ns),
        ],
    );

    let s = &expect_verdicts(
        &values,
        server_ns,
        &["server failed pmtu_blackhole ETIMEDOUT"],
    )[0];
    assert_pmtu_facts(s, router_ns);
    expect_verdicts(
        &values,
        client_ns,
        &[
            "client stalled stalled_no_response -",
            "client failed stalled_no_response *",
        ],
    );
    expect_verdicts(&values, router_ns, &[]);
}

/// A client in the routed scenario whose own INPUT drops ICMP and whose kernel gives up after
/// 3 retransmissions, against a server that answers a request with 16 bytes (`setup` adds
/// to it), conntrace with a stall timeout long enough not to come first.
fn client_sender(setup: impl FnOnce(&ThreeHosts)) -> Scenario<Conntrace, Proc, ThreeHosts> {
    Scenario::routed()
        .with(setup)
        .in_client(&["iptables", "-A", "INPUT", "-p", "icmp", "-j", "DROP"])
        .in_client(&["sysctl", "-qw", "net.ipv4.tcp_mtu_probing=0"])
        .in_client(&["sysctl", "-qw", "net.ipv4.tcp_retries2=3"])
        .serve(&["--respond", "16"])
        .conntrace(&["--port", "3306", "--stall-timeout", "60s"])
}

/// The client sends a request of `bytes` (`delay_ms` after connecting; `meanwhile` runs once
/// it is connected) and its read of the answer times out (ETIMEDOUT). The client's one
/// verdict, checked against `expected` (as `expect_verdicts` takes it), after the run's
/// records were reported under `label` with the router's (which has none).
fn request_that_times_out(
    scenario: Scenario<Conntrace, Proc, ThreeHosts>,
    (bytes, delay_ms): (usize, u64),
    meanwhile: impl FnOnce(&ThreeHosts),
    (label, expected): (&str, &str),
) -> Value {
    let Scenario {
        hosts,
        ct,
        server: _server,
    } = scenario;
    let request = "x".repeat(bytes - 1) + "\n";
    let delay = delay_ms.to_string();
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &[
            "--request-delay-ms",
            &delay,
            "--request",
            &request,
            "--expect-bytes",
            "16",
            "--timeout-ms",
            "20000",
        ],
    );
    hosts.client.wait_established(PORT, Duration::from_secs(10));
    meanwhile(&hosts);
    let result = &client.json_lines(Duration::from_secs(40))[0];
    assert_eq!(
        (&result["stage"], &result["errno"]),
        (&Value::from("read"), &Value::from(110)),
        "the client's connection timed out waiting for the answer: {result}"
    );
    let (client_ns, router_ns) = (hosts.client.inode(), hosts.router.inode());
    let values = stop_after(ct, Duration::from_secs(3), &[(client_ns, "failed")]);
    report(
        label,
        &values,
        &[("client", client_ns), ("router", router_ns)],
    );
    expect_verdicts(&values, router_ns, &[]);
    expect_verdicts(&values, client_ns, &[expected]).remove(0)
}

/// A request that is no multiple of the MSS: its short tail passes the 1400-byte link, the
/// full-size segments before it never do. The client sends 3000 bytes (1448 + 1448 + 104)
/// towards a server behind a router whose link to it carries 1400, and its own firewall drops
/// the router's "fragmentation needed".
#[test]
fn a_black_hole_under_a_request_with_a_short_tail_is_pmtu_blackhole_on_the_client() {
    let scenario = client_sender(|h| {
        h.router
            .exec(&["ip", "link", "set", &h.router_server_if, "mtu", "1400"]);
    });
    let c = request_that_times_out(
        scenario,
        (3000, 0),
        |_| {},
        (
            "pmtu_blackhole short tail",
            "client failed pmtu_blackhole ETIMEDOUT",
        ),
    );
    assert_eq!(detail(&c, "retransmits.mss"), 1448, "{c}");
    assert_eq!(detail(&c, "retransmits.largest_bytes"), 1448, "{c}");
    assert_eq!(detail(&c, "path_answer.mtu"), 1400, "{c}");
}

/// Not a black hole: a peer that went away while a request larger than the congestion window
/// was in flight. Every retransmitted segment is full-size and nothing is SACKed, as in a
/// black hole (the client's firewall drops ICMP, so the router's "host unreachable" is lost
/// too); the router's drops (its neighbour for the server failed once the server's link went
/// down) say what it was.
#[test]
fn a_large_request_to_a_peer_that_went_away_is_a_timeout_not_a_black_hole() {
    let c = request_that_times_out(
        client_sender(|_| {}),
        (20_000, 1500),
        |h| {
            h.server.exec(&["ip", "link", "set", &h.server_if, "down"]);
        },
        (
            "dead peer, large request",
            "client failed timeout ETIMEDOUT",
        ),
    );
    assert_eq!(detail(&c, "retransmits.smallest_bytes"), 1448, "{c}");
    let path = detail(&c, "path_drops")
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        path.iter().any(|d| d["kernel_reason"] == "NEIGH_FAILED"),
        "the router's neighbour failures, joined: {c}"
    );
}

/// The sender's facts of a black hole: only full-size segments retransmitted, the router's
/// answer (MTU 1400) dropped by this host's firewall, and the router's own drops.
fn assert_pmtu_facts(s: &Value, router_ns: u64) {
    assert!(detail(s, "retransmits.count").as_u64() >= Some(2), "{s}");
    assert_eq!(detail(s, "retransmits.smallest_bytes"), 1448, "{s}");
    assert_eq!(detail(s, "retransmits.mss"), 1448, "{s}");
    assert_eq!(detail(s, "path_answer.mtu"), 1400, "{s}");
    assert_eq!(
        detail(s, "path_answer.dropped.kernel_reason"),
        "NETFILTER_DROP",
        "{s}"
    );
    let path_drops = detail(s, "path_drops")
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        path_drops
            .iter()
            .any(|d| d["kernel_reason"] == "PKT_TOO_BIG" && d["netns"] == router_ns),
        "the router's PKT_TOO_BIG drops, joined: {s}"
    );
}

#[test]
fn a_receiver_that_stops_reading_is_zero_window_on_both_sides_then_resolved() {
    let Scenario { hosts, ct, server } = Scenario::new()
        // The server greets, then does not read for 7 s: its receive queue fills.
        .serve(&["--greeting", "hello", "--hold-ms", "7000", "--report"])
        .conntrace(&["--port", "3306", "--stall-timeout", "2s"]);
    let server_pid = server.pid();
    let mut server = server.read_stdout();
    // The client reads the greeting, then sends 32 MB; it blocks until the server reads.
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &[
            "--read",
            "--send-bytes",
            "33554432",
            "--timeout-ms",
            "15000",
        ],
    );
    let result = &client.json_lines(Duration::from_secs(30))[0];
    assert_eq!(result["sent"], 33_554_432, "{result}");
    assert!(
        result["ms"].as_f64() > Some(6000.0),
        "the send waited for the server to read: {result}"
    );
    let (client_ns, server_ns) = (hosts.client.inode(), hosts.server.inode());
    let values = stop_after(
        ct,
        Duration::from_secs(3),
        &[(client_ns, "resolved"), (server_ns, "resolved")],
    );
    server.kill();
    let served = server.json_lines(Duration::from_secs(5));
    println!("MEASURED zero_window server: {served:?}; client: {result}");
    assert_eq!(served[0]["received"], 33_554_432, "{served:?}");
    report(
        "zero_window",
        &values,
        &[("client", client_ns), ("server", server_ns)],
    );

    let c = expect_verdicts(
        &values,
        client_ns,
        &[
            "client stalled zero_window -",
            "client resolved zero_window -",
        ],
    );
    assert_eq!(detail(&c[0], "window.stopped_reading"), "peer", "{}", c[0]);
    assert!(
        detail(&c[0], "window.queued_bytes").as_u64() > Some(0),
        "{}",
        c[0]
    );
    let s = expect_verdicts(
        &values,
        server_ns,
        &[
            "server stalled zero_window -",
            "server resolved zero_window -",
        ],
    );
    assert_eq!(detail(&s[0], "window.stopped_reading"), "local", "{}", s[0]);
    assert!(
        detail(&s[0], "window.queued_bytes").as_u64() > Some(0),
        "{}",
        s[0]
    );
    // The process whose receive queue is full: the one that accepted the connection.
    assert_eq!(
        (&s[0]["pid"], &s[0]["comm"]),
        (&Value::from(server_pid), &Value::from("ct-server")),
        "{}",
        s[0]
    );
}
