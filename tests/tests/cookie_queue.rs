//! A SYN cookie that validates into a full accept queue (a load test's burst against a small
//! backlog): the cookie check drops the client's segments (NO_SOCKET in `cookie_v4_check`)
//! until the server accepts, then a retransmit of the client's request validates the cookie
//! and the connection completes. That is a slow connection, not a lost cookie ACK: no
//! `syncookie_ack_lost` on the server, in either follow mode.

use std::time::Duration;

use conntrace_tests::{PORT, Scenario, connect, verdicts_in};
use serde_json::Value;

/// The client port whose pure ACK the client's own OUTPUT drops, so that its first segment
/// to reach the server is its request.
const LATE_SPORT: u16 = 41_306;

#[test]
fn a_cookie_that_validates_once_the_full_accept_queue_drains_is_no_lost_ack() {
    for follow in conntrace_tests::FOLLOW_MODES {
        let sport = LATE_SPORT.to_string();
        let Scenario {
            hosts,
            ct,
            server: _server,
        } = Scenario::new()
            // Every SYN is answered with a cookie; the accept queue holds one connection
            // (backlog 0), and the server accepts only 4 s after it starts listening.
            .in_server(&["sysctl", "-qw", "net.ipv4.tcp_syncookies=2"])
            .in_client(&[
                "iptables",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "--sport",
                &sport,
                "--tcp-flags",
                "ALL",
                "ACK",
                "-j",
                "DROP",
            ])
            // conntrace first: the accept delay counts from the server's start, and loading
            // the programs took seconds under emulation (on 6.12 the server had accepted
            // before the late client's request came).
            .conntrace(&[
                "--port",
                "3306",
                "--follow",
                follow,
                "--stall-timeout",
                "20s",
            ])
            .serve(&[
                "--backlog",
                "0",
                "--accept-delay-ms",
                "4000",
                "--respond",
                "5",
            ]);
        let request = [
            "--request",
            "REQ",
            "--expect-bytes",
            "5",
            "--timeout-ms",
            "15000",
        ];
        // The late client: its SYN gets a cookie while the queue is empty; its final ACK
        // never leaves; its request, 1.5 s later, is the first segment the server sees.
        let mut late_args = vec!["--sport", &sport, "--request-delay-ms", "1500"];
        late_args.extend(request);
        let late = connect(&hosts.client, &hosts.server_ip, PORT, &late_args);
        std::thread::sleep(Duration::from_millis(300));
        // The early client fills the queue before the late one's request comes.
        let early = connect(&hosts.client, &hosts.server_ip, PORT, &request);
        let early = early.json_lines(Duration::from_secs(20));
        let late = late.json_lines(Duration::from_secs(20));
        assert_eq!(early[0]["ok"], true, "--follow {follow}: {early:?}");
        assert_eq!(late[0]["ok"], true, "--follow {follow}: {late:?}");
        let late_local = format!("{}:{LATE_SPORT}", hosts.client_ip);
        assert_eq!(late[0]["local"], late_local.as_str(), "{late:?}");
        // Answered only once the server accepted, 4 s in.
        assert!(late[0]["ms"].as_f64() > Some(2500.0), "{late:?}");
        std::thread::sleep(Duration::from_secs(3));
        let values = ct.stop();

        let server_ns = hosts.server.inode();
        let server = verdicts_in(&values, server_ns);
        let summary = values.last().expect("summary");
        let counters = &summary["tcp_counters"][server_ns.to_string()];
        println!(
            "MEASURED --follow {follow}: late client answered after {} ms; server ListenOverflows {}, drops {}",
            late[0]["ms"], counters["ListenOverflows"], summary["drops_by_reason"]
        );
        let lost: Vec<&Value> = server
            .iter()
            .filter(|v| v["reason"] == "syncookie_ack_lost")
            .collect();
        assert!(
            lost.is_empty(),
            "--follow {follow}: {lost:#?}; the server's drop records: {:#?}",
            conntrace_tests::drops_in(&values, server_ns)
        );
        // The queue did overflow on the late client's request (the case under test).
        assert!(
            counters["ListenOverflows"].as_u64() >= Some(1),
            "--follow {follow}: {summary}"
        );
        let listener = &summary["listeners"][format!("{}:3306", hosts.server_ip)];
        assert_eq!(
            (&listener["cookies_validated"], &listener["cookies_failed"]),
            (&Value::from(2), &Value::from(0)),
            "--follow {follow}: {summary}"
        );
    }
}
