//! Input 8: drops that are a normal part of TCP are counted, not printed. Each orderly close
//! leaves the peer's FIN in the active closer's receive queue, purged (QUEUE_PURGE at
//! sk_stream_kill_queues) when the socket is destroyed: one per healthy connection.

use std::time::Duration;

use conntrace_tests::{PORT, Scenario, connect, drops_in};
use serde_json::Value;

use crate::{expect_verdicts, report};

/// 20 healthy greetings, the client closing first, under conntrace with `args`; returns what
/// conntrace printed and the client's and the server's namespaces.
fn twenty_greetings(input: &str, args: &[&str]) -> (Vec<Value>, u64, u64) {
    let Scenario {
        hosts,
        ct,
        server: _server,
    } = Scenario::new()
        .serve(&["--greeting", "hello"])
        .conntrace(args);
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &["--count", "20", "--read", "--timeout-ms", "5000"],
    );
    let results = client.json_lines(Duration::from_secs(30));
    assert!(
        results.len() == 20 && results.iter().all(|r| r["ok"] == true),
        "{results:?}"
    );
    // The server's FIN of the last connection, then the client's TIME_WAIT.
    std::thread::sleep(Duration::from_secs(1));
    let values = ct.stop();
    let (client_ns, server_ns) = (hosts.client.inode(), hosts.server.inode());
    report(
        input,
        &values,
        &[("client", client_ns), ("server", server_ns)],
    );
    (values, client_ns, server_ns)
}

#[test]
fn orderly_closes_print_no_drop_record_and_are_counted_in_the_summary() {
    let (values, client_ns, server_ns) = twenty_greetings("noise", &["--port", "3306"]);
    for ns in [client_ns, server_ns] {
        expect_verdicts(&values, ns, &[]);
        let drops = drops_in(&values, ns);
        assert!(drops.is_empty(), "no drop record: {drops:#?}");
    }
    let summary = values.last().expect("summary");
    assert!(
        summary["drops_by_reason"]["QUEUE_PURGE"].as_u64() >= Some(20),
        "one QUEUE_PURGE per connection, counted: {summary}"
    );
}

#[test]
fn show_normal_drops_prints_the_queue_purge_records() {
    let (values, client_ns, server_ns) =
        twenty_greetings("noise-shown", &["--port", "3306", "--show-normal-drops"]);
    for ns in [client_ns, server_ns] {
        expect_verdicts(&values, ns, &[]);
    }
    // On the active closer (the client): the server's FIN, purged with each socket.
    let purged: Vec<Value> = drops_in(&values, client_ns)
        .into_iter()
        .filter(|d| d["kernel_reason"] == "QUEUE_PURGE")
        .collect();
    assert_eq!(purged.len(), 20, "{purged:#?}");
    for d in &purged {
        let at = d["location"].as_str().unwrap_or_default();
        assert!(at.starts_with("sk_stream_kill_queues"), "{d}");
        assert_eq!(d["dport"], 3306, "{d}");
    }
}
