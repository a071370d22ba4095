//! Stalled connections and SYN cookies: the stuck-connection story (a client ESTABLISHED and
//! waiting for a greeting from a server that has no socket for it), on both hosts.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use conntrace_tests::{
    Conntrace, PORT, Proc, Scenario, TempDir, bpftool, connect, conntrace_bin, serve, sh,
    verdicts_in,
};
use serde_json::Value;

fn find<'a>(verdicts: &'a [Value], reason: &str, outcome: &str) -> Vec<&'a Value> {
    verdicts
        .iter()
        .filter(|v| v["reason"] == reason && v["outcome"] == outcome)
        .collect()
}

/// The client's final (pure) ACK of a handshake, dropped in the server's INPUT.
const DROP_PURE_ACKS: &[&str] = &[
    "iptables",
    "-A",
    "INPUT",
    "-p",
    "tcp",
    "--dport",
    "3306",
    "--tcp-flags",
    "ALL",
    "ACK",
    "-j",
    "DROP",
];

#[test]
fn a_lost_cookie_ack_leaves_the_client_waiting_for_a_greeting() {
    let Scenario {
        hosts,
        ct,
        server: _server,
    } = Scenario::new()
        // Every SYN is answered with a cookie, and the client's final (pure) ACK is dropped:
        // the client is ESTABLISHED, the server never creates a socket.
        .in_server(&["sysctl", "-qw", "net.ipv4.tcp_syncookies=2"])
        .in_server(DROP_PURE_ACKS)
        .serve(&["--greeting", "hello"])
        .conntrace(&["--port", "3306", "--stall-timeout", "2s"]);
    let started = Instant::now();
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &["--read", "--timeout-ms", "6000"],
    );
    let (client_ns, server_ns) = (hosts.client.inode(), hosts.server.inode());
    let stalled = ct.wait_for(Duration::from_secs(6), |l| {
        l.value["netns"] == client_ns && l.value["reason"] == "stalled_no_greeting"
    });
    let after = stalled.received.duration_since(started);
    println!(
        "MEASURED stalled_no_greeting: reported {after:?} after connect() (stall timeout 2 s)"
    );
    assert!(
        after < Duration::from_secs(3),
        "within stall timeout + 1 s: {after:?}"
    );
    let results = client.json_lines(Duration::from_secs(15));
    assert_eq!(results[0]["errno"], 11, "the read timed out: {results:?}");
    ct.wait_for(Duration::from_secs(8), |l| {
        l.value["netns"] == server_ns && l.value["reason"] == "syncookie_ack_lost"
    });
    let values = ct.stop();

    let client = verdicts_in(&values, client_ns);
    let first = find(&client, "stalled_no_greeting", "stalled");
    assert_eq!(first.len(), 1, "{client:#?}");
    assert_eq!(first[0]["comm"], "ct-client");
    let sport = first[0]["sport"].clone();
    // The application gave up (its read timed out): one follow-up, with the stuck time.
    let ended = find(&client, "stalled_no_greeting", "failed");
    assert_eq!(ended.len(), 1, "{client:#?}");
    assert!(
        ended[0]["detail"]["stuck_ms"].as_f64() > Some(5000.0),
        "{}",
        ended[0]
    );

    let server = verdicts_in(&values, server_ns);
    let lost = find(&server, "syncookie_ack_lost", "failed");
    assert_eq!(lost.len(), 1, "{server:#?}");
    let v = lost[0];
    assert_eq!((&v["dport"], &v["sport"]), (&sport, &3306.into()), "{v}");
    assert!(v["detail"]["cookies_sent"].as_u64() >= Some(1), "{v}");
    // Where the ACK went: netfilter INPUT, and the rule.
    assert_eq!(v["detail"]["hook"], "INPUT", "{v}");
    let rule = v["detail"]["rule"]["text"].as_str().unwrap_or_default();
    assert!(
        rule.contains("tcp flags ack") && rule.ends_with("drop"),
        "{v}"
    );

    let summary = values.last().expect("summary");
    let listener = &summary["listeners"][format!("{}:3306", hosts.server_ip)];
    assert!(listener["cookies_sent"].as_u64() >= Some(1), "{summary}");
    assert!(listener["cookies_failed"].as_u64() >= Some(1), "{summary}");
    let counters = &summary["tcp_counters"][server_ns.to_string()];
    assert!(counters["SyncookiesSent"].as_u64() >= Some(1), "{summary}");

    merged_per_host_into_one_story(&values, &[client_ns, server_ns], rule);
}

/// As if each host had run its own conntrace: one file per host, joined by `merge` into one
/// story (the lost cookie ACK's, naming `rule`).
fn merged_per_host_into_one_story(values: &[Value], namespaces: &[u64], rule: &str) {
    let merged = merge_per_host(values, namespaces);
    let joined: Vec<&Value> = merged.iter().filter(|m| m["one_sided"].is_null()).collect();
    assert_eq!(joined.len(), 1, "{merged:#?}");
    let m = joined[0];
    assert_eq!(
        m["reasons"]["client"],
        serde_json::json!(["stalled_no_greeting"])
    );
    // (The client's FIN, when it gives up, can still validate the cookie: the server then
    // creates the socket, greets, and meets the client's RST: a later `reset_by_peer`.)
    assert_eq!(m["reasons"]["server"][0], "syncookie_ack_lost", "{m}");
    let story = m["story"].as_str().unwrap_or_default();
    assert!(
        story.contains("never created this connection") && story.contains(rule),
        "{story}"
    );
}

/// Writes each namespace's verdicts to its own file (one per host) and runs
/// `conntrace merge --json` on them.
fn merge_per_host(values: &[Value], namespaces: &[u64]) -> Vec<Value> {
    let dir = TempDir::new("ct-merge");
    let files: Vec<std::path::PathBuf> = namespaces
        .iter()
        .map(|ns| {
            let path = dir.join(format!("{ns}.jsonl"));
            let lines: Vec<String> = values
                .iter()
                .filter(|v| v["event"] != "verdict" || v["netns"] == *ns)
                .map(Value::to_string)
                .collect();
            std::fs::write(&path, lines.join("\n") + "\n").expect("write host file");
            path
        })
        .collect();
    let out = std::process::Command::new(conntrace_bin())
        .arg("merge")
        .arg("--json")
        .args(&files)
        .output()
        .expect("run conntrace merge");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("merged line is JSON"))
        .collect()
}

/// A server whose greeting comes `delay_ms` after accept(), traced with a 1 s stall timeout;
/// `None` (with the reason printed) where a stall cannot be resolved: resolving needs the
/// first data received, which quiet mode's check reads (sock_diag) and streaming needs a
/// first-data hook for (tracepoints on 6.6+, fexit before).
fn greeting_after_ms(delay_ms: &str) -> Option<Scenario<Conntrace, Proc>> {
    let scenario = Scenario::new()
        .serve(&["--greeting", "hello", "--greeting-delay-ms", delay_ms])
        .conntrace(&["--port", "3306", "--stall-timeout", "1s"]);
    let ct = &scenario.ct;
    let unresolvable = ct.ready()["follow"] == "streaming"
        && ct.lacks(
            "first_data",
            "sock:sk_data_ready is 6.6+, fexit:tcp_rcv_established refused",
        );
    (!unresolvable).then_some(scenario)
}

#[test]
fn a_slow_greeting_is_stalled_then_resolved_with_the_stuck_time() {
    let Some(Scenario {
        hosts,
        ct,
        server: _server,
    }) = greeting_after_ms("2000")
    else {
        return;
    };
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &["--read", "--timeout-ms", "6000"],
    );
    let results = client.json_lines(Duration::from_secs(10));
    assert_eq!(results[0]["ok"], true, "{results:?}");
    let client_ns = hosts.client.inode();
    ct.wait_for(Duration::from_secs(2), |l| {
        l.value["netns"] == client_ns && l.value["outcome"] == "resolved"
    });
    let values = ct.stop();
    let client = verdicts_in(&values, client_ns);
    assert_eq!(
        find(&client, "stalled_no_greeting", "stalled").len(),
        1,
        "{client:#?}"
    );
    let resolved = find(&client, "stalled_no_greeting", "resolved");
    assert_eq!(resolved.len(), 1, "{client:#?}");
    let stuck = resolved[0]["detail"]["stuck_ms"]
        .as_f64()
        .unwrap_or_default();
    println!("MEASURED slow greeting: stalled after 1 s, resolved after {stuck:.0} ms stuck");
    assert!((1900.0..2600.0).contains(&stuck), "{}", resolved[0]);
    assert_eq!(client.len(), 2, "nothing else: {client:#?}");
    assert!(
        verdicts_in(&values, hosts.server.inode()).is_empty(),
        "the server accepted at once and sent: no server verdict"
    );
}

/// Waves of clients that all stall, then get their greeting and close at once: every stall
/// gets its one follow-up. In quiet mode a stalled connection is watched from its first check;
/// its close, run by the kernel in softirq context while a process's state change runs the
/// same program on that CPU, can be skipped by the kernel (the program's recursion misses):
/// the start of its close must carry its progress too. A connection never reported stalled at
/// all is allowed only as often as the kernel skipped the lifecycle program (its start or its
/// ESTABLISHED unseen; the summary's `program_misses`).
#[test]
fn a_thousand_stalled_clients_that_get_their_greeting_are_each_resolved_once() {
    let Some(Scenario {
        hosts,
        ct,
        server: _server,
    }) = greeting_after_ms("1600")
    else {
        return;
    };
    // Five waves of 200 (each connection holds its thread until the greeting), each client
    // closing as soon as its greeting came.
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &[
            "--count",
            "1000",
            "--parallel",
            "200",
            "--read",
            "--timeout-ms",
            "8000",
        ],
    );
    let results = client.json_lines(Duration::from_secs(60));
    assert_eq!(results.len(), 1000);
    let greeted: Vec<u64> = results
        .iter()
        .filter(|r| r["ok"] == true)
        .filter_map(|r| {
            r["local"]
                .as_str()
                .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                .map(|a| u64::from(a.port()))
        })
        .collect();
    assert_eq!(greeted.len(), 1000, "every client got its greeting");
    std::thread::sleep(Duration::from_secs(2));
    let values = ct.stop();
    let client = verdicts_in(&values, hosts.client.inode());
    let summary = values
        .iter()
        .find(|v| v["event"] == "summary")
        .expect("summary");
    println!(
        "MEASURED 1000 stalls: {:?}; program recursion misses {}",
        count(&client),
        summary["program_misses"]
    );
    // A local port can serve two of the waves' connections: each stall of its connections
    // has its one follow-up, and there is nothing else.
    let mut per_port: BTreeMap<u64, usize> = BTreeMap::new();
    for port in &greeted {
        *per_port.entry(*port).or_default() += 1;
    }
    let (mut wrong, mut never_stalled) = (Vec::new(), 0);
    for (port, connections) in &per_port {
        let mine: Vec<&Value> = client.iter().filter(|v| v["sport"] == *port).collect();
        let stalled = mine.iter().filter(|v| v["outcome"] == "stalled").count();
        let resolved = mine.iter().filter(|v| v["outcome"] == "resolved").count();
        if stalled != resolved || mine.len() != 2 * stalled || stalled > *connections {
            wrong.push((port, connections, mine));
        }
        never_stalled += connections.saturating_sub(stalled);
    }
    assert!(
        wrong.is_empty(),
        "{} local ports whose stalls lack exactly one resolved follow-up each: {:#?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    // A connection reported nowhere needs a state change the kernel did not run the
    // lifecycle program for (its start or its ESTABLISHED): the run says how many it skipped.
    let skipped = conntrace_tests::lifecycle_misses(summary);
    assert!(
        never_stalled as u64 <= skipped,
        "{never_stalled} greeted clients never reported stalled, with {skipped} lifecycle runs skipped"
    );
}

#[test]
fn two_hundred_clients_against_a_stopped_server_all_get_a_verdict() {
    let scenario = Scenario::new().serve(&["--greeting", "hello", "--backlog", "8"]);
    let pid = scenario.server.pid().to_string();
    sh(&["kill", "-STOP", &pid]);
    let Scenario {
        hosts,
        ct,
        server: _server,
    } = scenario.conntrace(&["--port", "3306", "--stall-timeout", "2s"]);
    // 200 clients at once, local ports 43000..43199, each reading the greeting (8 s timeout).
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &[
            "--count",
            "200",
            "--parallel",
            "200",
            "--sport",
            "43000",
            "--read",
            "--timeout-ms",
            "8000",
        ],
    );
    std::thread::sleep(Duration::from_secs(3));
    sh(&["kill", "-CONT", &pid]);
    let results = client.json_lines(Duration::from_secs(40));
    assert_eq!(results.len(), 200);
    // Let the last attempts end (the SYN back-off) before stopping.
    std::thread::sleep(Duration::from_secs(4));
    let values = ct.stop();

    let client = verdicts_in(&values, hosts.client.inode());
    let server = verdicts_in(&values, hosts.server.inode());
    print_stopped_server_story(&results, &client, &server, &values);

    // Every connection that did not get its greeting has a client verdict naming why.
    let mut missing = Vec::new();
    for r in results.iter().filter(|r| r["ok"] != true) {
        let port: u64 = r["local"]
            .as_str()
            .and_then(|p| p.parse().ok())
            .expect("local port");
        if !client
            .iter()
            .any(|v| v["sport"] == port && v["outcome"] != "established")
        {
            missing.push(r.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "failed connections without a verdict: {missing:#?}"
    );
    // The server side says what happened at the listener.
    let server_reasons = count(&server);
    assert!(
        server_reasons.keys().any(|k| k.ends_with("listen_overflow")
            || k.ends_with("syncookie_ack_lost")
            || k.ends_with("not_accepted")),
        "{server_reasons:?}"
    );
    assert!(
        server.iter().any(|v| v["reason"] == "not_accepted"),
        "the stopped server left connections unaccepted: {server_reasons:?}"
    );
}

/// Verdicts counted by "outcome reason".
fn count(vs: &[Value]) -> BTreeMap<String, u64> {
    let mut m: BTreeMap<String, u64> = BTreeMap::new();
    for v in vs {
        *m.entry(format!(
            "{} {}",
            v["outcome"].as_str().unwrap_or("?"),
            v["reason"].as_str().unwrap_or("?")
        ))
        .or_default() += 1;
    }
    m
}

/// Prints what the 200 clients saw and what conntrace reported (the README's figures).
fn print_stopped_server_story(
    results: &[Value],
    client: &[Value],
    server: &[Value],
    values: &[Value],
) {
    let greeted = results.iter().filter(|r| r["ok"] == true).count();
    let mut errnos: BTreeMap<String, u64> = BTreeMap::new();
    for r in results.iter().filter(|r| r["ok"] != true) {
        *errnos.entry(r["errno"].to_string()).or_default() += 1;
    }
    println!(
        "MEASURED 200 clients vs a stopped server (backlog 8, SIGCONT after 3 s): {greeted} greeted; failed by errno {errnos:?}"
    );
    println!("MEASURED client verdicts: {:?}", count(client));
    println!("MEASURED server verdicts: {:?}", count(server));
    println!(
        "MEASURED summary listeners {} tcp_counters {}",
        values.last().expect("summary")["listeners"],
        values.last().expect("summary")["tcp_counters"]
    );
}

/// The server's firewall drops the client's final ACK (and the ACKs of the SYN-ACKs the server
/// retransmits) for a while: the client is ESTABLISHED and waits for a greeting from a server
/// that has no connection yet. The client's stall names the rule at the other end; once the
/// rule goes, a retransmitted SYN-ACK's ACK completes the handshake and the greeting comes
/// (`resolved`), and the server, whose handshake completed, has no failure. Both follow modes.
#[test]
fn a_stall_whose_final_ack_the_servers_firewall_dropped_names_the_rule_there() {
    for follow in conntrace_tests::FOLLOW_MODES {
        let Scenario {
            hosts,
            ct,
            server: _server,
        } = Scenario::new()
            .in_server(DROP_PURE_ACKS)
            .serve(&["--greeting", "hello"])
            .conntrace(&[
                "--port",
                "3306",
                "--stall-timeout",
                "2s",
                "--follow",
                follow,
            ]);
        // A streaming client's missing greeting needs a first-data hook (6.6+, fexit before).
        if follow == "streaming"
            && ct.lacks(
                "first_data",
                "sock:sk_data_ready is 6.6+, fexit:tcp_rcv_established refused",
            )
        {
            continue;
        }
        let client = connect(
            &hosts.client,
            &hosts.server_ip,
            PORT,
            &["--read", "--timeout-ms", "15000"],
        );
        let (client_ns, server_ns) = (hosts.client.inode(), hosts.server.inode());
        let stalled = ct.wait_for(Duration::from_secs(6), |l| {
            l.value["netns"] == client_ns && l.value["reason"] == "stalled_no_greeting"
        });
        let d = &stalled.value["detail"];
        assert_eq!(
            (&d["hook"], &d["rule"]["chain"], &d["peer_netns"]),
            (
                &Value::from("INPUT"),
                &Value::from("INPUT"),
                &Value::from(server_ns)
            ),
            "--follow {follow}: {}",
            stalled.value
        );
        hosts.server.exec(&["iptables", "-D", "INPUT", "1"]);
        let results = client.json_lines(Duration::from_secs(20));
        assert_eq!(results[0]["ok"], true, "--follow {follow}: {results:?}");
        ct.wait_for(Duration::from_secs(5), |l| {
            l.value["netns"] == client_ns && l.value["outcome"] == "resolved"
        });
        let values = ct.stop();
        let server = verdicts_in(&values, server_ns);
        assert!(server.is_empty(), "--follow {follow}: {server:#?}");
    }
}

/// Every SYN answered with a cookie and nothing dropped: the handshakes complete through their
/// cookies, and neither end has a failure, in either follow mode (quiet mode keeps healthy
/// connections in the kernel: a cookie's tuple makes the child its final ACK creates stream
/// from its start, so that the cookie is seen validated).
#[test]
fn cookies_that_validate_are_no_failure() {
    for follow in conntrace_tests::FOLLOW_MODES {
        let Scenario {
            hosts,
            ct,
            server: _server,
        } = Scenario::new()
            .in_server(&["sysctl", "-qw", "net.ipv4.tcp_syncookies=2"])
            .serve(&["--greeting", "hello"])
            .conntrace(&["--port", "3306", "--follow", follow]);
        let client = connect(
            &hosts.client,
            &hosts.server_ip,
            PORT,
            &[
                "--read",
                "--count",
                "5",
                "--parallel",
                "5",
                "--timeout-ms",
                "5000",
            ],
        );
        let results = client.json_lines(Duration::from_secs(10));
        assert_eq!(results.len(), 5, "--follow {follow}: {results:?}");
        assert!(
            results.iter().all(|r| r["ok"] == true),
            "--follow {follow}: {results:?}"
        );
        // Past a cookie attempt's end (a second after its cookie).
        std::thread::sleep(Duration::from_secs(3));
        let values = ct.stop();
        for ns in [hosts.server.inode(), hosts.client.inode()] {
            let verdicts = verdicts_in(&values, ns);
            assert!(verdicts.is_empty(), "--follow {follow}: {verdicts:#?}");
        }
        let summary = values.last().expect("summary");
        let listener = &summary["listeners"][format!("{}:3306", hosts.server_ip)];
        assert_eq!(
            (&listener["cookies_validated"], &listener["cookies_failed"]),
            (&Value::from(5), &Value::from(0)),
            "--follow {follow}: {summary}"
        );
    }
}

/// Polls `what` every 100 ms for at most `within`; whether it became true.
fn becomes(within: Duration, what: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if what() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where no cookie function can be hooked, cookies are seen at `net_dev_queue`, for every
/// packet sent. With `--port` that program is attached only while a listener of a traced port
/// exists: detached at start-up with none, attached when the server starts listening (in time
/// for its first cookie, whose lost ACK is named), detached again after it stops.
#[test]
fn the_per_packet_cookie_program_runs_only_while_a_traced_port_has_a_listener() {
    let Scenario { hosts, ct, .. } = Scenario::new()
        .in_server(&["sysctl", "-qw", "net.ipv4.tcp_syncookies=2"])
        .in_server(DROP_PURE_ACKS)
        .conntrace(&["--port", "3306", "--stall-timeout", "2s"]);
    let ready = ct.ready();
    let cookies = ready["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["capability"] == "syn_cookies")
        .expect("a syn_cookies program");
    if !cookies["attach"]
        .as_str()
        .is_some_and(|a| a.contains("net_dev_queue"))
    {
        conntrace_tests::skip(&format!(
            "cookies are seen at {} here, not by a per-packet program",
            cookies["attach"]
        ));
        return;
    }
    let name = cookies["name"].as_str().expect("name");
    let id = bpftool::program_id(ct.pid(), name);
    let linked = || bpftool::linked(id);
    // Without --port every port is traced: its program stays attached.
    let every_port = Conntrace::start(&[]);
    let every_port_id = bpftool::program_id(every_port.pid(), name);
    assert!(
        becomes(Duration::from_secs(3), || !linked()),
        "no listener of port 3306: the start-up scan detaches {name}"
    );
    assert!(
        bpftool::linked(every_port_id),
        "without --port, {name} stays attached"
    );
    every_port.stop();
    let server = serve(
        &hosts.server,
        &hosts.server_ip,
        PORT,
        &["--greeting", "hello"],
    );
    assert!(
        becomes(Duration::from_secs(1), linked),
        "a listener of port 3306 attaches {name}"
    );
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &["--read", "--timeout-ms", "3000"],
    );
    let server_ns = hosts.server.inode();
    ct.wait_for(Duration::from_secs(8), |l| {
        l.value["netns"] == server_ns && l.value["reason"] == "syncookie_ack_lost"
    });
    client.json_lines(Duration::from_secs(10));
    drop(server);
    assert!(
        becomes(Duration::from_secs(4), || !linked()),
        "the listener gone, a scan detaches {name} again"
    );
    ct.stop();
}
