//! End-to-end scenarios: two hosts in network namespaces, conntrace in the root namespace with
//! its real eBPF programs, `--port 3306 --json`, and the verdicts checked on both sides.

use std::time::Duration;

use conntrace_tests::{Conntrace, PORT, Scenario, connect, only_verdict_in, serve, verdicts_in};
use serde_json::Value;

fn by_side<'a>(verdicts: &'a [Value], side: &str) -> Vec<&'a Value> {
    verdicts.iter().filter(|v| v["side"] == side).collect()
}

#[test]
fn healthy_connections_give_established_verdicts_with_processes() {
    let Scenario { hosts, ct, server } = Scenario::new()
        .conntrace(&["--port", "3306", "--all", "--stall-timeout", "2s"])
        .serve(&["--accept", "200", "--greeting", "hello\n"]);
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &[
            "--count",
            "200",
            "--parallel",
            "4",
            "--read",
            "--timeout-ms",
            "3000",
        ],
    );
    let client_pid = client.pid();
    let results = client.json_lines(Duration::from_secs(60));
    assert_eq!(results.len(), 200);
    assert!(
        results.iter().all(|r| r["ok"] == true),
        "client failures: {results:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let values = ct.stop();

    let cli = verdicts_in(&values, hosts.client.inode());
    let srv = verdicts_in(&values, hosts.server.inode());
    let failures: Vec<_> = cli
        .iter()
        .chain(&srv)
        .filter(|v| v["outcome"] != "established")
        .collect();
    assert!(
        failures.is_empty(),
        "failure verdicts for healthy traffic: {failures:?}"
    );

    let cli = by_side(&cli, "client");
    assert_eq!(cli.len(), 200, "client established verdicts");
    for v in &cli {
        assert_eq!(v["reason"], "established");
        assert_eq!(v["pid"], client_pid, "{v}");
        assert_eq!(v["comm"], "ct-client");
        assert_eq!(v["saddr"], hosts.client_ip.as_str());
        assert_eq!(
            (v["daddr"].as_str(), v["dport"].as_u64()),
            (Some(hosts.server_ip.as_str()), Some(3306))
        );
    }
    let locals: std::collections::HashSet<String> = results
        .iter()
        .map(|r| r["local"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(cli.iter().all(|v| locals.contains(&format!(
        "{}:{}",
        v["saddr"].as_str().unwrap_or_default(),
        v["sport"]
    ))));

    let srv = by_side(&srv, "server");
    assert_eq!(srv.len(), 200, "server established verdicts");
    for v in &srv {
        assert_eq!(v["pid"], server.pid(), "{v}");
        assert_eq!(v["comm"], "ct-server");
        assert_eq!(v["detail"]["accepted"], true);
        assert_eq!(
            (v["sport"].as_u64(), v["daddr"].as_str()),
            (Some(3306), Some(hosts.client_ip.as_str()))
        );
    }
}

#[test]
fn nothing_listening_is_refused_on_both_sides() {
    let Scenario { hosts, ct, .. } = Scenario::new().conntrace(&["--port", "3306"]);
    let client = connect(&hosts.client, &hosts.server_ip, PORT, &["--sport", "41001"]);
    let results = client.json_lines(Duration::from_secs(10));
    assert_eq!(
        results[0]["errno"], 111,
        "client should see ECONNREFUSED: {results:?}"
    );
    let client_side = ct.wait_for(Duration::from_secs(2), |l| {
        l.value["event"] == "verdict"
            && l.value["side"] == "client"
            && l.value["netns"] == hosts.client.inode()
    });
    let values = ct.stop();

    let v = &only_verdict_in(&values, hosts.client.inode());
    assert_eq!(
        (v["side"].as_str(), v["outcome"].as_str()),
        (Some("client"), Some("failed"))
    );
    assert_eq!(v["reason"], "refused_no_listener");
    assert_eq!(v["errno"], "ECONNREFUSED");
    assert_eq!(v["comm"], "ct-client");
    assert_eq!(
        (v["saddr"].as_str(), v["sport"].as_u64()),
        (Some(hosts.client_ip.as_str()), Some(41001))
    );
    assert_eq!(
        (v["daddr"].as_str(), v["dport"].as_u64()),
        (Some(hosts.server_ip.as_str()), Some(3306))
    );
    assert_eq!(client_side.value, *v);

    let srv = verdicts_in(&values, hosts.server.inode());
    assert_eq!(srv.len(), 1, "{srv:?}");
    let v = &srv[0];
    assert_eq!(
        (v["side"].as_str(), v["reason"].as_str()),
        (Some("server"), Some("refused_no_listener"))
    );
    assert_eq!(
        (v["saddr"].as_str(), v["sport"].as_u64()),
        (Some(hosts.server_ip.as_str()), Some(3306))
    );
    assert_eq!(
        (v["daddr"].as_str(), v["dport"].as_u64()),
        (Some(hosts.client_ip.as_str()), Some(41001))
    );
}

#[test]
fn ipv6_refused_and_established() {
    let Scenario { hosts, ct, .. } = Scenario::new().conntrace(&["--port", "3306", "--all"]);
    let refused = connect(
        &hosts.client,
        &hosts.server_ip6,
        PORT,
        &["--sport", "41005"],
    )
    .json_lines(Duration::from_secs(10));
    assert_eq!(refused[0]["errno"], 111, "{refused:?}");
    let server = serve(
        &hosts.server,
        &hosts.server_ip6,
        PORT,
        &["--accept", "1", "--greeting", "hi"],
    );
    let ok = connect(
        &hosts.client,
        &hosts.server_ip6,
        PORT,
        &["--sport", "41006", "--read"],
    )
    .json_lines(Duration::from_secs(10));
    assert_eq!(ok[0]["ok"], true, "{ok:?}");
    ct.wait_for(Duration::from_secs(3), |l| {
        l.value["side"] == "server" && l.value["outcome"] == "established"
    });
    let values = ct.stop();
    let cli = verdicts_in(&values, hosts.client.inode());
    let refused: Vec<_> = cli
        .iter()
        .filter(|v| v["reason"] == "refused_no_listener")
        .collect();
    assert_eq!(refused.len(), 1, "{cli:?}");
    assert_eq!(
        (refused[0]["saddr"].as_str(), refused[0]["sport"].as_u64()),
        (Some(hosts.client_ip6.as_str()), Some(41005))
    );
    assert_eq!(refused[0]["daddr"], hosts.server_ip6.as_str());
    let est: Vec<_> = cli
        .iter()
        .filter(|v| v["reason"] == "established")
        .collect();
    assert_eq!(est.len(), 1, "{cli:?}");
    assert_eq!(est[0]["sport"], 41006);
    let srv = verdicts_in(&values, hosts.server.inode());
    let refused_srv: Vec<_> = srv
        .iter()
        .filter(|v| v["reason"] == "refused_no_listener")
        .collect();
    assert_eq!(refused_srv.len(), 1, "{srv:?}");
    assert_eq!(
        (
            refused_srv[0]["saddr"].as_str(),
            refused_srv[0]["dport"].as_u64()
        ),
        (Some(hosts.server_ip6.as_str()), Some(41005))
    );
    let est_srv: Vec<_> = srv
        .iter()
        .filter(|v| v["reason"] == "established")
        .collect();
    assert_eq!(est_srv.len(), 1, "{srv:?}");
    assert_eq!(
        (est_srv[0]["pid"].as_u64(), est_srv[0]["daddr"].as_str()),
        (
            Some(u64::from(server.pid())),
            Some(hosts.client_ip6.as_str())
        )
    );
}

#[test]
fn failure_verdict_arrives_within_one_second() {
    let Scenario { hosts, ct, .. } = Scenario::new().conntrace(&["--port", "3306"]);
    let client = connect(&hosts.client, &hosts.server_ip, PORT, &["--sport", "41002"]);
    let results = client.json_lines(Duration::from_secs(10));
    let failed_at = std::time::Instant::now();
    assert_eq!(results[0]["errno"], 111);
    let line = ct.wait_for(Duration::from_secs(5), |l| {
        l.value["event"] == "verdict" && l.value["sport"] == 41002
    });
    // The client's failure is observed after connect() returned; the verdict may even precede it.
    let latency = line.received.saturating_duration_since(failed_at);
    assert!(
        latency < Duration::from_secs(1),
        "verdict came {latency:?} after the failure"
    );
    ct.stop();
}

#[test]
fn no_route_is_reported_without_packets() {
    let Scenario { hosts, ct, .. } = Scenario::new().conntrace(&["--port", "3306"]);
    // TEST-NET-1 (RFC 5737): the client namespace has no route to it, so no packet is sent.
    let client = connect(&hosts.client, "192.0.2.1", PORT, &[]);
    let client_pid = client.pid();
    let results = client.json_lines(Duration::from_secs(10));
    assert_eq!(
        results[0]["errno"], 101,
        "client should see ENETUNREACH: {results:?}"
    );
    let values = ct.stop_after_verdict_in(hosts.client.inode());
    let v = &only_verdict_in(&values, hosts.client.inode());
    assert_eq!(
        (v["reason"].as_str(), v["errno"].as_str()),
        (Some("no_route"), Some("ENETUNREACH"))
    );
    assert_eq!(
        (v["daddr"].as_str(), v["dport"].as_u64()),
        (Some("192.0.2.1"), Some(3306))
    );
    assert_eq!(
        (v["pid"].as_u64(), v["comm"].as_str()),
        (Some(u64::from(client_pid)), Some("ct-client"))
    );
}

#[test]
fn server_abort_is_reset_by_peer() {
    let Scenario {
        hosts,
        ct,
        server: _server,
    } = Scenario::new().conntrace(&["--port", "3306"]).serve(&[
        "--accept",
        "1",
        "--greeting",
        "hello\n",
        "--linger0",
    ]);
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &["--sport", "41004", "--read-until-close"],
    );
    let results = client.json_lines(Duration::from_secs(10));
    assert_eq!(
        results[0]["errno"], 104,
        "client should see ECONNRESET: {results:?}"
    );
    let values = ct.stop_after_verdict_in(hosts.client.inode());
    let v = &only_verdict_in(&values, hosts.client.inode());
    assert_eq!(
        (v["side"].as_str(), v["reason"].as_str()),
        (Some("client"), Some("reset_by_peer"))
    );
    assert_eq!(v["detail"]["rst_received_in"], "TCP_ESTABLISHED");
    assert_eq!(v["sport"], 41004);
}

#[test]
fn kernel_side_losses_are_counted_and_reported() {
    let Scenario {
        hosts,
        ct,
        server: _server,
    } = Scenario::new()
        // One page of ring buffer holds a few dozen events: a burst must overflow it.
        .conntrace(&["--port", "3306", "--ring-buffer-bytes", "4096"])
        .serve(&["--greeting", "x"]);
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &["--count", "1500", "--parallel", "8", "--timeout-ms", "3000"],
    );
    client.json_lines(Duration::from_secs(120));
    ct.wait_for(Duration::from_secs(3), |l| l.value["event"] == "lost");
    let values = ct.stop();
    let lost: Vec<&Value> = values.iter().filter(|v| v["event"] == "lost").collect();
    let last = lost.last().expect("a lost record");
    assert!(last["count"].as_u64() > Some(0));
    let total_new: u64 = lost.iter().filter_map(|v| v["new"].as_u64()).sum();
    assert_eq!(
        Some(total_new),
        last["count"].as_u64(),
        "new counts add up to the total"
    );
    let summary = values.last().expect("summary");
    assert_eq!(
        summary["lost_events"], last["count"],
        "the summary reports every loss"
    );
}

#[test]
fn another_program_on_the_port_is_an_unexpected_listener() {
    let Scenario { hosts, ct, server } = Scenario::new()
        // The seed's story: something else (there, java) holds 3306 instead of mysqld.
        .conntrace(&["--port", "3306", "--expect-comm", "mysqld"])
        .serve(&["--accept", "1", "--greeting", "hi"]);
    let ok = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &["--sport", "41008", "--read"],
    )
    .json_lines(Duration::from_secs(10));
    assert_eq!(ok[0]["ok"], true, "{ok:?}");
    let values = ct.stop_after_verdict_in(hosts.server.inode());
    let v = only_verdict_in(&values, hosts.server.inode());
    assert_eq!(
        (v["side"].as_str(), v["outcome"].as_str()),
        (Some("server"), Some("failed"))
    );
    assert_eq!(v["reason"], "unexpected_listener");
    assert_eq!(
        (v["pid"].as_u64(), v["comm"].as_str()),
        (Some(u64::from(server.pid())), Some("ct-server"))
    );
    assert_eq!(
        (v["sport"].as_u64(), v["dport"].as_u64()),
        (Some(3306), Some(41008))
    );
    assert_eq!(v["detail"]["expected_comm"], serde_json::json!(["mysqld"]));
    assert!(
        verdicts_in(&values, hosts.client.inode()).is_empty(),
        "the client itself succeeded"
    );

    // The expected program accepting is no verdict at all without --all.
    let ct = Conntrace::start(&["--port", "3306", "--expect-comm", "ct-server"]);
    let _server = serve(
        &hosts.server,
        &hosts.server_ip,
        PORT,
        &["--accept", "1", "--greeting", "hi"],
    );
    connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &["--sport", "41009", "--read"],
    )
    .json_lines(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    let values = ct.stop();
    assert!(
        verdicts_in(&values, hosts.server.inode()).is_empty(),
        "{values:?}"
    );
}

#[test]
fn listener_on_loopback_only_is_refused_bound_elsewhere() {
    let Scenario { hosts, ct, server } = Scenario::new()
        .conntrace(&["--port", "3306"])
        // The seed's MySQL with bind-address = 127.0.0.1, reached at the LAN address.
        .serve_on("127.0.0.1", &[]);
    let refused = connect(&hosts.client, &hosts.server_ip, PORT, &["--sport", "41010"])
        .json_lines(Duration::from_secs(10));
    assert_eq!(refused[0]["errno"], 111, "{refused:?}");
    let values = ct.stop_after_verdict_in(hosts.server.inode());
    let v = only_verdict_in(&values, hosts.server.inode());
    assert_eq!(
        (v["side"].as_str(), v["reason"].as_str()),
        (Some("server"), Some("refused_bound_elsewhere"))
    );
    assert_eq!(
        (v["saddr"].as_str(), v["dport"].as_u64()),
        (Some(hosts.server_ip.as_str()), Some(41010))
    );
    assert_eq!(
        v["detail"]["listeners"],
        serde_json::json!([{ "address": "127.0.0.1:3306", "pid": server.pid(), "comm": "ct-server" }])
    );
    // The client cannot know why: for it, nothing listened.
    let c = only_verdict_in(&values, hosts.client.inode());
    assert_eq!(c["reason"], "refused_no_listener");
}
