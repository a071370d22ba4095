//! Connections opened before conntrace started (a pool's connections): conntrace first sees
//! them established, and still gives how they end its verdict, on the side that saw it.

use std::time::Duration;

use conntrace_tests::{
    Conntrace, FOLLOW_MODES, PORT, Scenario, connect, only_verdict_in, verdicts_in,
};
use serde_json::Value;

#[test]
fn a_reset_on_a_connection_opened_before_conntrace_started_is_reset_by_peer() {
    // A pooled connection: established, then conntrace starts, then the server aborts it.
    // conntrace never saw its start; the reset still gets its verdict, in either mode.
    for follow in FOLLOW_MODES {
        // The abort waits for the test's signal, sent once conntrace is ready (its start took
        // 11 s under emulation, longer than any fixed delay the host needs).
        let Scenario { hosts, server, .. } = Scenario::new().serve(&[
            "--accept",
            "1",
            "--greeting",
            "hello\n",
            "--greeting-on-usr1",
            "--linger0",
        ]);
        let client = connect(
            &hosts.client,
            &hosts.server_ip,
            PORT,
            &[
                "--sport",
                "41005",
                "--read-until-close",
                "--timeout-ms",
                "60000",
            ],
        );
        std::thread::sleep(Duration::from_millis(300));
        let client_pid = client.pid();
        let ct = Conntrace::start(&["--port", "3306", "--follow", follow]);
        server.signal(libc::SIGUSR1);
        let results = client.json_lines(Duration::from_secs(10));
        assert_eq!(
            results[0]["errno"], 104,
            "client should see ECONNRESET: {results:?}"
        );
        let values = ct.stop_after_verdict_in(hosts.client.inode());
        let v = &only_verdict_in(&values, hosts.client.inode());
        assert_eq!(
            (
                v["side"].as_str(),
                v["reason"].as_str(),
                v["sport"].as_u64()
            ),
            (Some("client"), Some("reset_by_peer"), Some(41005)),
            "--follow {follow}: {v}"
        );
        assert_eq!(
            v["detail"]["closed_from"], "TCP_ESTABLISHED",
            "--follow {follow}"
        );
        assert_eq!(
            v["detail"]["rst_received_in"], "TCP_ESTABLISHED",
            "--follow {follow}: {v}"
        );
        assert_eq!(
            v["detail"]["started_before_trace"], true,
            "--follow {follow}: its start was not seen: {v}"
        );
        // Its socket is gone by the verdict: the process that held it when conntrace started.
        assert_eq!(
            (v["pid"].as_u64(), v["comm"].as_str()),
            (Some(u64::from(client_pid)), Some("ct-client")),
            "--follow {follow}: {v}"
        );
        assert!(
            v["detail"].get("established_ms").is_none(),
            "--follow {follow}: how long it was established is unknown: {v}"
        );
        // The aborting side ended it itself: nothing to report there.
        assert_eq!(
            verdicts_in(&values, hosts.server.inode()),
            Vec::<Value>::new(),
            "--follow {follow}"
        );
        // The kernel reports the reset's error after the close that carried it: the same
        // error, not an unmatched one.
        let summary = values.iter().find(|v| v["event"] == "summary");
        assert_eq!(
            summary.map(|s| &s["unmatched_errors"]),
            Some(&Value::from(0)),
            "--follow {follow}: {summary:?}"
        );
    }
}

#[test]
fn a_socket_killed_with_ss_k_is_socket_destroyed_and_its_peer_is_reset() {
    // `ss -K` (sock_diag SOCK_DESTROY, as CNI agents use it) on the client's host: the kernel
    // aborts the socket with ECONNABORTED and sends the server a RST.
    for follow in FOLLOW_MODES {
        let Scenario {
            hosts,
            ct,
            server: _server,
        } = Scenario::new()
            .conntrace(&["--port", "3306", "--follow", follow])
            .serve(&[
                "--accept",
                "1",
                "--greeting",
                "hi\n",
                "--greeting-delay-ms",
                "3000",
            ]);
        let client = connect(
            &hosts.client,
            &hosts.server_ip,
            PORT,
            &[
                "--sport",
                "41006",
                "--read-until-close",
                "--timeout-ms",
                "8000",
            ],
        );
        std::thread::sleep(Duration::from_millis(500));
        let filter = format!("dst {} and dport = :3306", hosts.server_ip);
        hosts.client.exec(&["ss", "-K", &filter]);
        let results = client.json_lines(Duration::from_secs(10));
        assert_eq!(results[0]["errno"], 103, "ECONNABORTED: {results:?}");
        let values = ct.stop_after_verdict_in(hosts.server.inode());
        let c = only_verdict_in(&values, hosts.client.inode());
        assert_eq!(
            (c["reason"].as_str(), c["errno"].as_str()),
            (Some("socket_destroyed"), Some("ECONNABORTED")),
            "--follow {follow}: {c}"
        );
        let s = only_verdict_in(&values, hosts.server.inode());
        assert_eq!(s["reason"], "reset_by_peer", "--follow {follow}: {s}");
    }
}

#[test]
fn a_firewall_rule_added_under_a_pooled_connection_is_its_timeout_not_a_failed_handshake() {
    // A pooled connection, then conntrace, then a DROP rule on the server's INPUT (a firewall
    // change under a running pool): the client's ACKs of the greeting are dropped, the server
    // retransmits it until it gives up (tcp_retries2=3: about 3 s). The drops belong to that
    // established connection and explain its timeout; they are no failed handshake.
    for follow in FOLLOW_MODES {
        let Scenario {
            hosts, mut server, ..
        } = Scenario::new()
            .in_server(&["sysctl", "-qw", "net.ipv4.tcp_retries2=3"])
            .serve(&[
                "--accept",
                "1",
                "--greeting",
                "hello\n",
                "--greeting-on-usr1",
            ]);
        let _client = connect(
            &hosts.client,
            &hosts.server_ip,
            PORT,
            &[
                "--sport",
                "41007",
                "--read-until-close",
                "--timeout-ms",
                "60000",
            ],
        );
        std::thread::sleep(Duration::from_millis(300));
        let ct = Conntrace::start(&["--port", "3306", "--follow", follow]);
        hosts.server.exec(&[
            "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "3306", "-j", "DROP",
        ]);
        // The greeting goes out now, under the rule, however long conntrace took to start.
        server.signal(libc::SIGUSR1);
        // The server's read fails with ETIMEDOUT and it exits.
        server.wait(Duration::from_secs(20), "ctpeer serve after its timeout");
        let values = ct.stop_after_verdict_in(hosts.server.inode());
        let v = only_verdict_in(&values, hosts.server.inode());
        assert_eq!(
            (
                v["side"].as_str(),
                v["reason"].as_str(),
                v["errno"].as_str(),
                v["sport"].as_u64(),
                v["dport"].as_u64(),
            ),
            (
                Some("server"),
                Some("netfilter_drop"),
                Some("ETIMEDOUT"),
                Some(3306),
                Some(41007)
            ),
            "--follow {follow}: {v}"
        );
        assert_eq!(v["detail"]["started_before_trace"], true, "{v}");
        assert_eq!(v["detail"]["hook"], "INPUT", "--follow {follow}: {v}");
        assert_eq!(
            v["detail"]["rule"]["chain"], "INPUT",
            "--follow {follow}: {v}"
        );
        // The client saw its greeting and is still waiting: nothing to report there.
        assert_eq!(
            verdicts_in(&values, hosts.client.inode()),
            Vec::<Value>::new(),
            "--follow {follow}"
        );
    }
}
