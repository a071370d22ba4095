//! SO_REUSEPORT (issue 13, input 6): two processes share a port, the old one never accepts,
//! and the connections hashed to it wait in its own accept queue. Each `not_accepted` verdict
//! must name the listener socket that holds the connection (found by the `iter/tcp` accept-
//! queue walk): its process and its queue, never the healthy process beside it.

use std::time::Duration;

use conntrace_tests::{Conntrace, Netns, TwoHosts, connect, require_root, serve, verdicts_in};
use serde_json::Value;

const PORT: u16 = 3306;
const CLIENTS: usize = 20;

/// `ss -ltnp` in `ns`: the accept queue (Recv-Q) and backlog (Send-Q) of the listener on
/// `PORT` held by process `pid`.
fn queue_of(ns: &Netns, pid: u32) -> (u64, u64) {
    let out = ns.exec(&["ss", "-Hltnp", "sport", "=", ":3306"]);
    let line = out
        .lines()
        .find(|l| l.contains(&format!("pid={pid},")))
        .unwrap_or_else(|| panic!("no listener of pid {pid} in:\n{out}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    let number = |i: usize| -> u64 {
        fields[i]
            .parse()
            .unwrap_or_else(|e| panic!("ss field {i} of {line:?}: {e}"))
    };
    (number(1), number(2))
}

#[test]
fn each_not_accepted_verdict_names_the_reuseport_listener_that_holds_it() {
    require_root();
    let hosts = TwoHosts::new();
    // The healthy server starts first, so it has the lower pid: a look-up by port alone, which
    // takes the first listener on the address (by pid), names it. Only the queue walk finds
    // the stuck one, which never accepts.
    let healthy = serve(
        &hosts.server,
        &hosts.server_ip,
        PORT,
        &["--reuseport", "--greeting", "hello", "--comm", "ct-healthy"],
    );
    let stuck = serve(
        &hosts.server,
        &hosts.server_ip,
        PORT,
        &["--reuseport", "--accept", "0", "--comm", "ct-stuck"],
    );
    let ct = Conntrace::start(&["--port", "3306", "--stall-timeout", "2s"]);
    if ct.lacks("accept_queues", "no iter/tcp (5.9+)") {
        return;
    }
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &[
            "--count",
            &CLIENTS.to_string(),
            "--parallel",
            &CLIENTS.to_string(),
            "--read",
            "--timeout-ms",
            "6000",
        ],
    );
    // Every connection is established within milliseconds; the stuck queue never shrinks.
    std::thread::sleep(Duration::from_secs(1));
    let (queued, backlog) = queue_of(&hosts.server, stuck.pid());
    let (healthy_queue, _) = queue_of(&hosts.server, healthy.pid());
    println!("MEASURED {queued} of {CLIENTS} connections in the stuck listener's queue");
    // The reuseport hash spreads 20 connections over both: all on one is 2 x 2^-20.
    assert!(queued > 0 && queued < CLIENTS as u64, "queued {queued}");
    assert_eq!(healthy_queue, 0, "the healthy server accepts");

    let server_ns = hosts.server.inode();
    let not_accepted = |v: &Value| {
        v["event"] == "verdict" && v["netns"] == server_ns && v["reason"] == "not_accepted"
    };
    // One stalled verdict per queued connection, about 2 s after it was established.
    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    loop {
        let seen = ct
            .dump()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(not_accepted)
            .count();
        if seen as u64 >= queued || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let results = client.json_lines(Duration::from_secs(15));
    let values = ct.stop();
    let (stuck_pid, healthy_pid) = (stuck.pid(), healthy.pid());
    drop((stuck, healthy));

    let greeted = results.iter().filter(|r| r["ok"] == true).count();
    assert_eq!(results.len(), CLIENTS, "{results:?}");
    assert_eq!(
        (CLIENTS - greeted) as u64,
        queued,
        "exactly the queued clients got no greeting: {results:?}"
    );
    let verdicts: Vec<Value> = verdicts_in(&values, server_ns)
        .into_iter()
        .filter(|v| v["reason"] == "not_accepted")
        .collect();
    assert_eq!(
        verdicts.len() as u64,
        queued,
        "one verdict per queued connection: {verdicts:#?}"
    );
    for v in verdicts_in(&values, server_ns) {
        assert_ne!(v["detail"]["listener"]["pid"], healthy_pid, "{v}");
    }
    for v in &verdicts {
        let d = &v["detail"];
        assert_eq!(d["listener"]["pid"], stuck_pid, "{v}");
        assert_eq!(d["listener"]["comm"], "ct-stuck", "{v}");
        assert_eq!(d["accept_queue"], queued, "{v}");
        assert_eq!(d["backlog"], backlog, "{v}");
    }
}
