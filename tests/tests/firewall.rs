//! Firewall scenarios: iptables and nftables rules inside the test's own namespaces, the real
//! eBPF programs, and both sides' verdicts checked: which hook dropped the SYN, which rule, and
//! what a REJECT costs the client.

use std::time::Duration;

use conntrace_tests::{
    Netns, PORT, Scenario, TwoHosts, connect, drops_in, only_verdict_in, verdicts_in,
};
use serde_json::Value;

/// What one connection through a firewall rule left behind.
struct FirewalledRun {
    hosts: TwoHosts,
    values: Vec<Value>,
    client_pid: u32,
}

/// Adds the rule (a command run in the client's or the server's namespace), sets the client's
/// `tcp_syn_retries` to 1 (about 3 s to ETIMEDOUT), makes one connection from `sport` under
/// conntrace, and checks the client saw only a timeout.
fn connect_through(rule: impl FnOnce(&TwoHosts), sport: u16) -> FirewalledRun {
    let Scenario { hosts, ct, .. } = Scenario::new()
        .with(rule)
        .in_client(&["sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"])
        .conntrace(&["--port", "3306"]);
    let sport = sport.to_string();
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &["--sport", &sport, "--timeout-ms", "20000"],
    );
    let client_pid = client.pid();
    let results = client.json_lines(Duration::from_secs(30));
    println!(
        "MEASURED DROP: connect() failed with errno {} after {:.0} ms (tcp_syn_retries=1)",
        results[0]["errno"],
        results[0]["ms"].as_f64().unwrap_or_default()
    );
    assert_eq!(
        results[0]["errno"], 110,
        "the client should see only ETIMEDOUT: {results:?}"
    );
    let values = ct.stop_after_verdict_in(hosts.client.inode());
    FirewalledRun {
        hosts,
        values,
        client_pid,
    }
}

fn iptables_drop(ns: &Netns, chain: &str) {
    ns.exec(&[
        "iptables", "-A", chain, "-p", "tcp", "--dport", "3306", "-j", "DROP",
    ]);
}

/// Checks a `netfilter_drop` verdict's hook and rule.
fn assert_dropped_by(v: &Value, hook: &str, family: &str, table: &str, chain: &str) {
    assert_eq!(v["reason"], "netfilter_drop", "{v}");
    assert_eq!(v["kernel_reason"], "NETFILTER_DROP");
    assert_eq!(v["detail"]["hook"], hook, "{v}");
    let rule = &v["detail"]["rule"];
    assert_eq!(
        (&rule["family"], &rule["table"], &rule["chain"]),
        (
            &Value::from(family),
            &Value::from(table),
            &Value::from(chain)
        ),
        "{v}"
    );
    let text = rule["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("dport 3306") && text.ends_with("drop"),
        "rule text {text:?}"
    );
    assert!(rule["packets"].as_u64() >= Some(1), "{v}");
}

#[test]
fn server_input_drop_names_the_hook_and_the_rule() {
    let run = connect_through(|h| iptables_drop(&h.server, "INPUT"), 41003);
    let (hosts, values) = (&run.hosts, &run.values);
    // The client's kernel cannot know: its SYNs went unanswered. conntrace, seeing the
    // server's namespace too, names the rule there (the reason stays the client's own).
    let c = only_verdict_in(values, hosts.client.inode());
    assert_eq!(
        (&c["reason"], &c["errno"]),
        (&"syn_timeout".into(), &"ETIMEDOUT".into())
    );
    assert_eq!(c["detail"]["cause"], "kernel_gave_up");
    assert_eq!(
        (&c["detail"]["peer_netns"], &c["detail"]["hook"]),
        (&Value::from(hosts.server.inode()), &Value::from("INPUT")),
        "{c}"
    );
    assert_eq!(c["detail"]["rule"]["chain"], "INPUT", "{c}");
    let syns = c["syn_retransmits"].as_u64().expect("count") + 1;
    assert!(syns >= 2, "{c}");
    // The server's kernel knows: one verdict for the attempt, every SYN counted.
    let s = only_verdict_in(values, hosts.server.inode());
    assert_eq!(s["side"], "server");
    assert_dropped_by(&s, "INPUT", "ip", "filter", "INPUT");
    assert_eq!(s["detail"]["dropped"], syns, "{s}");
    assert_eq!(s["syn_retransmits"], syns - 1);
    assert_eq!(
        (s["saddr"].as_str(), s["sport"].as_u64()),
        (Some(hosts.server_ip.as_str()), Some(3306))
    );
    assert_eq!(
        (s["daddr"].as_str(), s["dport"].as_u64()),
        (Some(hosts.client_ip.as_str()), Some(41003))
    );
    assert!(
        drops_in(values, hosts.server.inode()).is_empty(),
        "joined, not loose"
    );
    assert_eq!(
        values.last().expect("summary")["drops_by_reason"]["NETFILTER_DROP"],
        syns
    );
}

#[test]
fn client_output_drop_is_a_netfilter_drop_not_a_bare_timeout() {
    let run = connect_through(|h| iptables_drop(&h.client, "OUTPUT"), 41007);
    let (hosts, values) = (&run.hosts, &run.values);
    let c = only_verdict_in(values, hosts.client.inode());
    assert_dropped_by(&c, "OUTPUT", "ip", "filter", "OUTPUT");
    assert_eq!(c["errno"], "ETIMEDOUT");
    assert_eq!(
        (c["pid"].as_u64(), c["comm"].as_str()),
        (Some(u64::from(run.client_pid)), Some("ct-client"))
    );
    assert_eq!(
        (c["sport"].as_u64(), c["dport"].as_u64()),
        (Some(41007), Some(3306))
    );
    assert_eq!(c["detail"]["drops"][0]["direction"], "out");
    assert!(
        drops_in(values, hosts.client.inode()).is_empty(),
        "joined, not loose"
    );
    assert!(
        verdicts_in(values, hosts.server.inode()).is_empty(),
        "nothing reached the server"
    );
}

#[test]
fn a_loopback_syn_timeout_names_its_own_namespaces_rule() {
    // Client and server ends in one namespace (127.0.0.1): its INPUT drops the SYNs. The
    // client's syn_timeout names that rule (the server's attempt there), not "run conntrace on
    // that host".
    let Scenario { hosts, ct, .. } = Scenario::new()
        .with(|h| iptables_drop(&h.server, "INPUT"))
        .in_server(&["sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"])
        .conntrace(&["--port", "3306"]);
    let client = connect(&hosts.server, "127.0.0.1", PORT, &["--timeout-ms", "20000"]);
    let results = client.json_lines(Duration::from_secs(30));
    assert_eq!(results[0]["errno"], 110, "{results:?}");
    let values = ct.stop_after_verdict_in(hosts.server.inode());
    let client = verdicts_in(&values, hosts.server.inode())
        .into_iter()
        .find(|v| v["side"] == "client")
        .expect("the client's verdict");
    assert_eq!(client["reason"], "syn_timeout", "{client}");
    assert_eq!(
        client["detail"]["peer_netns"],
        hosts.server.inode(),
        "{client}"
    );
    assert_eq!(client["detail"]["hook"], "INPUT", "{client}");
    assert_eq!(client["detail"]["rule"]["chain"], "INPUT", "{client}");
}

#[test]
fn nftables_drop_rule_is_named_too() {
    let run = connect_through(
        |h| {
            let nft = |args: &str| {
                let mut cmd = vec!["nft"];
                cmd.extend(args.split(' '));
                h.server.exec(&cmd);
            };
            nft("add table inet ctfw");
            nft("add chain inet ctfw in { type filter hook input priority 0 ; }");
            nft("add rule inet ctfw in tcp dport 3306 counter drop");
        },
        41011,
    );
    let s = only_verdict_in(&run.values, run.hosts.server.inode());
    assert_dropped_by(&s, "INPUT", "inet", "ctfw", "in");
    assert_eq!(s["detail"]["rule"]["text"], "tcp dport 3306 drop");
}

/// `iptables -A INPUT -p tcp --dport 3306 -j REJECT --reject-with WITH`.
fn reject_rule(with: &str) -> [&str; 12] {
    [
        "iptables",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        "3306",
        "-j",
        "REJECT",
        "--reject-with",
        with,
        "-w",
    ]
}

/// Eight connections in a row against `REJECT --reject-with WITH` on the server's INPUT: the
/// client's results (errno and time per connection) and conntrace's records.
fn reject_burst(with: &str) -> (TwoHosts, Vec<Value>, Vec<Value>) {
    let Scenario { hosts, ct, .. } = Scenario::new()
        .in_server(&reject_rule(with))
        .conntrace(&["--port", "3306"]);
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &["--count", "8", "--timeout-ms", "20000"],
    );
    let results = client.json_lines(Duration::from_secs(60));
    let values = ct.stop_after_verdict_in(hosts.client.inode());
    (hosts, results, values)
}

/// Prints what the REJECT cost the client (the README's REJECT table comes from these lines)
/// and returns the slowest connection's time to error in ms.
fn report_cost(with: &str, results: &[Value], errno: i64) -> f64 {
    assert_eq!(results.len(), 8, "{results:?}");
    for r in results {
        assert_eq!(
            (&r["ok"], r["errno"].as_i64()),
            (&false.into(), Some(errno)),
            "{r}"
        );
    }
    let mut ms: Vec<f64> = results.iter().filter_map(|r| r["ms"].as_f64()).collect();
    ms.sort_by(f64::total_cmp);
    let slow = ms.iter().filter(|&&m| m >= 900.0).count();
    println!(
        "REJECT --reject-with {with}: errno {errno} on 8 of 8 connects in a row; \
         time to error: fastest {:.2} ms, median {:.2} ms, slowest {:.0} ms; {slow} of 8 took >= 0.9 s",
        ms[0], ms[4], ms[7]
    );
    ms[7]
}

/// The server's verdicts: one `netfilter_reject` per connection, naming the REJECT type.
fn assert_server_rejected(hosts: &TwoHosts, values: &[Value], with: &str) {
    let server = verdicts_in(values, hosts.server.inode());
    assert_eq!(server.len(), 8, "{server:#?}");
    for s in &server {
        assert_eq!(s["reason"], "netfilter_reject", "{s}");
        assert_eq!(s["detail"]["reject_with"], with, "{s}");
        assert_eq!(s["detail"]["hook"], "INPUT");
        assert_eq!(s["detail"]["rule"]["chain"], "INPUT");
    }
}

#[test]
fn reject_with_tcp_reset_fails_every_connect_at_once() {
    let (hosts, results, values) = reject_burst("tcp-reset");
    let slowest = report_cost("tcp-reset", &results, 111);
    assert!(slowest < 500.0, "a RST is never rate-limited: {results:?}");
    assert_server_rejected(&hosts, &values, "tcp-reset");
    // The client's RST looks like a closed port's; its SYN was dropped by the server's rule,
    // which conntrace sees on this host: the REJECT, named at the other end.
    let client = verdicts_in(&values, hosts.client.inode());
    assert_eq!(client.len(), 8);
    for c in &client {
        assert_eq!(
            (&c["reason"], &c["errno"]),
            (&"netfilter_reject".into(), &"ECONNREFUSED".into()),
            "{c}"
        );
        assert_eq!(c["detail"]["peer_netns"], hosts.server.inode(), "{c}");
        assert_eq!(c["detail"]["reject_with"], "tcp-reset", "{c}");
        assert_eq!(c["detail"]["rule"]["chain"], "INPUT", "{c}");
        assert_eq!(c["syn_retransmits"], 0);
    }
}

/// ICMP answers from a REJECT are rate-limited per destination (`net.ipv4.icmp_ratelimit`,
/// 1000 ms, after a burst of 6): in a burst of connections, some first SYNs get no answer and
/// the client waits for its 1 s SYN retransmit. That is the seed's PHP client waiting 1 s
/// where `--reject-with tcp-reset` fails at once.
fn icmp_reject(with: &str, errno: i64, errno_name: &str) {
    let (hosts, results, values) = reject_burst(with);
    let slowest = report_cost(with, &results, errno);
    assert!(
        slowest >= 900.0,
        "expected the ICMP rate limit to cost a retransmit: {results:?}"
    );
    assert_server_rejected(&hosts, &values, with);
    let client = verdicts_in(&values, hosts.client.inode());
    assert_eq!(client.len(), 8, "{client:#?}");
    for c in &client {
        assert_eq!(c["reason"], "icmp_unreachable", "{c}");
        // The errno is seen unless the application, woken by sk_error_report() before its
        // tracepoint, read the error first.
        assert!(c["errno"] == errno_name || c["errno"].is_null(), "{c}");
        let rtx = c["syn_retransmits"].as_u64().expect("count");
        if rtx > 0 {
            // Each retransmitted SYN's predecessor went unanswered, or was answered while
            // connect() held the socket.
            let busy = u64::from(c["detail"]["first_answer_while_busy"] == true);
            let unanswered = c["detail"]["unanswered_syns"].as_u64().unwrap_or(0);
            assert_eq!(unanswered + busy, rtx, "{c}");
        }
    }
    assert!(
        client
            .iter()
            .any(|c| c["detail"]["unanswered_syns"].as_u64() >= Some(1)),
        "the slow connects show their unanswered SYNs: {client:#?}"
    );
}

#[test]
fn a_reject_answer_the_clients_own_firewall_drops_is_no_verdict_of_a_server_there() {
    // The server's REJECT answers each SYN with a port unreachable; the client's INPUT drops
    // ICMP, so connect() times out. The dropped error quotes the client's own SYN: a `drop`
    // record in the client's namespace with the client's end first, never an attempt of a
    // listener there (a phantom "server" verdict with the addresses swapped).
    let run = connect_through(
        |h| {
            h.server.exec(&reject_rule("icmp-port-unreachable"));
            h.client
                .exec(&["iptables", "-I", "INPUT", "-p", "icmp", "-j", "DROP", "-w"]);
        },
        42321,
    );
    let hosts = &run.hosts;
    let client = only_verdict_in(&run.values, hosts.client.inode());
    println!("MEASURED client's firewall drops the REJECT's answers: {client}");
    assert_eq!(client["side"], "client", "{client}");
    assert_eq!(client["sport"], 42321, "{client}");
    // Its verdict says why it waited: this host dropped the answers (those to its
    // retransmitted SYNs; the first came before its local port was known).
    assert_eq!(client["reason"], "syn_timeout", "{client}");
    let answer = &client["detail"]["answer_dropped"];
    assert_eq!(answer["icmp"], "port-unreachable", "{client}");
    assert_eq!(
        (
            &answer["dropped"]["hook"],
            &answer["dropped"]["kernel_reason"]
        ),
        (&"INPUT".into(), &"NETFILTER_DROP".into()),
        "{client}"
    );
    assert!(answer["dropped"]["count"].as_u64() >= Some(1), "{client}");
    assert_eq!(
        answer["rule"]["iptables"], "-A INPUT -p icmp -j DROP",
        "{client}"
    );
    let drops = drops_in(&run.values, hosts.client.inode());
    assert!(!drops.is_empty(), "the dropped ICMP errors are records");
    for d in &drops {
        assert_eq!(
            (&d["direction"], &d["kernel_reason"]),
            (&"in".into(), &"NETFILTER_DROP".into()),
            "{d}"
        );
        assert_eq!(
            (
                d["saddr"].as_str(),
                &d["sport"],
                d["daddr"].as_str(),
                &d["dport"]
            ),
            (
                Some(hosts.client_ip.as_str()),
                &42321.into(),
                Some(hosts.server_ip.as_str()),
                &3306.into()
            ),
            "this host's end first: {d}"
        );
    }
}

#[test]
fn reject_with_icmp_port_unreachable_costs_bursts_a_retransmit() {
    icmp_reject("icmp-port-unreachable", 111, "ECONNREFUSED");
}

#[test]
fn reject_with_icmp_host_prohibited_costs_bursts_a_retransmit() {
    icmp_reject("icmp-host-prohibited", 113, "EHOSTUNREACH");
}

/// One connection against `REJECT --reject-with icmp-host-prohibited`, fresh namespaces (no
/// ICMP rate limit spent), with a blocking `connect()` or a non-blocking one: the first SYN's
/// ICMP answer comes back over the veth pair before `connect()` releases the socket, so the
/// kernel keeps it as a soft error and retransmits the SYN 1 s later; that answer ends the
/// connection. The verdict says so, and does not call it ICMP rate limiting.
#[test]
fn an_icmp_answer_that_came_while_connect_held_the_socket_is_not_rate_limiting() {
    for how in ["--blocking", "--count"] {
        let Scenario { hosts, ct, .. } = Scenario::new()
            .in_server(&reject_rule("icmp-host-prohibited"))
            .conntrace(&["--port", "3306"]);
        let args = if how == "--blocking" {
            vec!["--blocking", "--timeout-ms", "5000"]
        } else {
            vec!["--count", "1", "--timeout-ms", "5000"]
        };
        let client = connect(&hosts.client, &hosts.server_ip, PORT, &args);
        let results = client.json_lines(Duration::from_secs(10));
        assert_eq!(results[0]["errno"], 113, "{how}: {results:?}");
        let values = ct.stop_after_verdict_in(hosts.client.inode());
        let c = only_verdict_in(&values, hosts.client.inode());
        assert_eq!(c["reason"], "icmp_unreachable", "{how}: {c}");
        let waited = results[0]["ms"].as_f64().unwrap_or(0.0);
        println!(
            "{how}: EHOSTUNREACH after {waited:.1} ms, {} SYN retransmits, detail {}",
            c["syn_retransmits"], c["detail"]
        );
        if c["syn_retransmits"].as_u64() >= Some(1) {
            assert_eq!(c["detail"]["first_answer_while_busy"], true, "{how}: {c}");
            assert!(c["detail"].get("unanswered_syns").is_none(), "{how}: {c}");
        } else {
            assert!(waited < 900.0, "{how}: a wait without a retransmit: {c}");
            assert!(
                c["detail"].get("first_answer_while_busy").is_none(),
                "{how}: {c}"
            );
        }
    }
}

/// A SYN the server's firewall dropped once, then let through (packet loss, a rate limit): the
/// retransmission completes the handshake, and neither end has a failure, in either follow
/// mode (quiet mode keeps the healthy server end in the kernel: the attempt's tuple makes it
/// stream from its start, so that the dropped SYN joins a handshake that completed).
#[test]
fn a_syn_dropped_once_then_let_through_is_no_failure() {
    use conntrace_tests::FOLLOW_MODES;
    for follow in FOLLOW_MODES {
        let Scenario {
            hosts,
            ct,
            server: _server,
        } = Scenario::new()
            .in_server(&[
                "iptables",
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "--dport",
                "3306",
                "--syn",
                "-m",
                "statistic",
                "--mode",
                "nth",
                "--every",
                "2",
                "--packet",
                "0",
                "-j",
                "DROP",
            ])
            .conntrace(&["--port", "3306", "--follow", follow])
            .serve(&["--greeting", "hi\n"]);
        let client = connect(
            &hosts.client,
            &hosts.server_ip,
            PORT,
            &["--read", "--timeout-ms", "5000"],
        );
        let result = client.json_lines(Duration::from_secs(10)).remove(0);
        assert_eq!(result["ok"], true, "--follow {follow}: {result}");
        assert!(
            result["ms"].as_f64() >= Some(900.0),
            "--follow {follow}: one SYN retransmitted: {result}"
        );
        // Past the attempt's back-off (its next SYN would have been due 1 s after the first).
        std::thread::sleep(Duration::from_secs(3));
        let values = ct.stop();
        let summary = values.last().expect("summary");
        assert_eq!(
            summary["drops_by_reason"]["NETFILTER_DROP"], 1,
            "--follow {follow}: the first SYN's drop was seen: {summary}"
        );
        for ns in [hosts.server.inode(), hosts.client.inode()] {
            let verdicts = verdicts_in(&values, ns);
            assert!(verdicts.is_empty(), "--follow {follow}: {verdicts:?}");
        }
    }
}
