//! Drops the kernel makes on its own: a neighbour that never answers ARP, and a listener whose
//! accept queue is full. Real namespaces, real eBPF, both sides checked.

use std::time::Duration;

use conntrace_tests::{
    Netns, PORT, Scenario, connect, drops_in, only_verdict_in, serve, verdicts_in,
};

#[test]
fn an_address_nobody_owns_is_neighbour_failed() {
    // Every kernel event logged: CI once saw this verdict missing (2 kernel events, no
    // NEIGH_FAILED drop), and a repeat must say which facts came.
    let Scenario { hosts, ct, .. } = Scenario::new().conntrace_tracing_events(&["--port", "3306"]);
    // On the veth subnet, but no host has it: ARP goes unanswered.
    let nobody = hosts.unowned_ip(250);
    let client = connect(&hosts.client, &nobody, PORT, &["--timeout-ms", "20000"]);
    let results = client.json_lines(Duration::from_secs(30));
    // The application only learns EHOSTUNREACH, after the neighbour probes ran out (~3 s).
    // When the error arrives while connect() holds the socket (seen under emulation), the
    // kernel parks it in sk_err_soft and the application's poll() may see the hang-up with
    // SO_ERROR already 0: no errno, but the same failure.
    assert_eq!(results[0]["ok"], false, "{results:?}");
    assert!(
        results[0]["errno"] == 113 || results[0]["errno"].is_null(),
        "{results:?}"
    );
    assert!(results[0]["ms"].as_f64() > Some(2000.0), "{results:?}");
    println!(
        "MEASURED neighbour_failed: connect() to {nobody} failed with errno {} after {:.0} ms",
        results[0]["errno"],
        results[0]["ms"].as_f64().unwrap_or_default()
    );
    let values = ct.stop_after_verdict_in(hosts.client.inode());
    let v = only_verdict_in(&values, hosts.client.inode());
    assert_eq!(
        (&v["reason"], &v["kernel_reason"]),
        (&"neighbour_failed".into(), &"NEIGH_FAILED".into()),
        "{v}"
    );
    // The kernel sets sk_err, wakes the application, then closes the socket: an application
    // that reads SO_ERROR first (which clears it) leaves the close without an errno to read.
    // Absent then, never another one.
    assert!(
        v["errno"] == "EHOSTUNREACH" || v["errno"].is_null(),
        "errno is EHOSTUNREACH or absent: {v}"
    );
    assert_eq!(
        (v["daddr"].as_str(), v["comm"].as_str()),
        (Some(nobody.as_str()), Some("ct-client"))
    );
    let drop = &v["detail"]["drops"][0];
    assert_eq!(
        (&drop["direction"], &drop["tcp_flags"]),
        (&"out".into(), &"SYN".into())
    );
    assert!(
        drop["location"]
            .as_str()
            .is_some_and(|l| l.starts_with("neigh")),
        "{v}"
    );
    assert!(
        v["detail"].get("icmp").is_none(),
        "the unreachable was local: {v}"
    );
    let loose = drops_in(&values, hosts.client.inode());
    assert!(loose.is_empty(), "joined, not loose: {loose:?}");
}

#[test]
fn a_gateway_nobody_owns_is_neighbour_failed_naming_that_next_hop() {
    // `ip route add 192.0.2.1/32 via <an on-link address nobody has>`: resolution fails for
    // the gateway, not for the destination; the verdict names the gateway.
    let Scenario { hosts, ct, .. } = Scenario::new().conntrace(&["--port", "3306"]);
    let gateway = hosts.unowned_ip(251);
    hosts
        .client
        .exec(&["ip", "route", "add", "192.0.2.1/32", "via", &gateway]);
    let client = connect(&hosts.client, "192.0.2.1", PORT, &["--timeout-ms", "20000"]);
    let results = client.json_lines(Duration::from_secs(30));
    assert_eq!(results[0]["ok"], false, "{results:?}");
    let values = ct.stop_after_verdict_in(hosts.client.inode());
    let v = only_verdict_in(&values, hosts.client.inode());
    assert_eq!(v["reason"], "neighbour_failed", "{v}");
    assert_eq!(v["daddr"], "192.0.2.1", "{v}");
    assert_eq!(v["detail"]["next_hop"], gateway.as_str(), "{v}");
}

/// `TcpExtListenOverflows` in namespace `ns` now.
fn listen_overflows(ns: &Netns) -> u64 {
    let text = ns.exec(&["cat", "/proc/net/netstat"]);
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().expect("names"), lines.next().expect("values"));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .expect("ListenOverflows")
}

/// A listener that never accepts, with `listen(1)`, and 6 clients at once: returns how many
/// timed out (their SYNs were discarded for the full queue).
fn overflow_round(server: &Netns, client: &Netns, server_ip: &str) -> usize {
    let _server = serve(
        server,
        server_ip,
        PORT,
        &["--backlog", "1", "--accept", "0"],
    );
    let clients = connect(
        client,
        server_ip,
        PORT,
        &["--count", "6", "--parallel", "6", "--timeout-ms", "10000"],
    );
    let results = clients.json_lines(Duration::from_secs(30));
    results.iter().filter(|r| r["errno"] == 110).count()
}

/// A namespace named under /run/netns with no process when conntrace starts (a test host, a
/// container not started yet): its counters are read from the start, so a listener started
/// there later is watched at once, and the summary counts only what happened while traced.
#[test]
fn a_listener_started_after_conntrace_where_no_process_ran_is_watched_from_the_start() {
    let mut before_run = 0;
    let Scenario { hosts, ct, .. } = Scenario::new()
        .in_client(&["sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"])
        .with(|h| {
            // Overflows before conntrace starts: the namespace's counter is not zero.
            assert!(overflow_round(&h.server, &h.client, &h.server_ip) >= 1);
            before_run = listen_overflows(&h.server);
        })
        .conntrace(&["--port", "3306"]);
    assert!(before_run > 0);
    let timed_out = overflow_round(&hosts.server, &hosts.client, &hosts.server_ip);
    assert!(timed_out >= 1);
    ct.wait_for(Duration::from_secs(3), |l| {
        l.value["reason"] == "listen_overflow" && l.value["dport"] == 0
    });
    let during = listen_overflows(&hosts.server) - before_run;
    let values = ct.stop();
    let summary = values.last().expect("summary");
    let server_ns = hosts.server.inode().to_string();
    assert_eq!(
        summary["tcp_counters"][&server_ns]["ListenOverflows"], during,
        "this run's growth only ({before_run} before it): {summary}"
    );
    println!(
        "MEASURED late listener: {before_run} overflows before conntrace started, {during} \
         while it ran, {timed_out} clients timed out"
    );
}

#[test]
fn a_server_that_never_accepts_overflows_its_listen_queue() {
    let Scenario {
        hosts,
        ct,
        server: _server,
    } = Scenario::new()
        // The server's namespace's own cap on backlogs, which its verdicts and advice name.
        .in_server(&["sysctl", "-qw", "net.core.somaxconn=77"])
        .serve(&["--backlog", "1", "--accept", "0"])
        .in_client(&["sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"])
        .conntrace(&["--port", "3306"]);
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &["--count", "6", "--parallel", "6", "--timeout-ms", "10000"],
    );
    let results = client.json_lines(Duration::from_secs(30));
    // The queue holds backlog + 1 = 2 connections; the other clients' SYNs are discarded.
    let timed_out = results.iter().filter(|r| r["errno"] == 110).count();
    assert!(timed_out >= 1, "{results:?}");
    ct.wait_for(Duration::from_secs(3), |l| {
        l.value["reason"] == "listen_overflow"
    });
    let values = ct.stop();
    let server = verdicts_in(&values, hosts.server.inode());
    let overflows: Vec<_> = server
        .iter()
        .filter(|v| v["reason"] == "listen_overflow")
        .collect();
    assert!(!overflows.is_empty(), "{server:#?}");
    let mut counted = 0;
    for v in &overflows {
        assert_eq!(
            (v["saddr"].as_str(), v["sport"].as_u64()),
            (Some(hosts.server_ip.as_str()), Some(3306)),
            "{v}"
        );
        assert_eq!(v["detail"]["backlog"], 1, "{v}");
        assert_eq!(v["detail"]["somaxconn"], 77, "{v}");
        assert!(v["detail"]["accept_queue"].as_u64() > Some(1), "{v}");
        assert_eq!(v["detail"]["listener"]["comm"], "ct-server", "{v}");
        if v["dport"] == 0 {
            // Per listener, from the namespace's counter: SYNs refused for the full queue.
            assert_eq!(v["kernel_reason"], "TcpExtListenOverflows", "{v}");
            counted += v["detail"]["overflows"].as_u64().expect("count");
        } else {
            // Per connection: a client's final ACK dropped for the full queue (the client
            // believes it is connected; the server has no socket for it).
            assert_eq!(v["kernel_reason"], "TCP_LISTEN_OVERFLOW", "{v}");
            assert_eq!(v["daddr"].as_str(), Some(hosts.client_ip.as_str()), "{v}");
            assert!(v["detail"]["dropped"].as_u64() >= Some(1), "{v}");
        }
    }
    // Every discarded SYN (first sends and retransmits) of the timed-out clients is counted.
    assert!(counted >= timed_out as u64, "{overflows:#?}");
    println!(
        "MEASURED listen_overflow: listen(1), no accept(), 6 parallel clients: {} connected, \
         {timed_out} timed out; {counted} overflows counted in {} verdicts",
        results.len() - timed_out,
        overflows.len()
    );
    // The clients only saw their SYNs unanswered; their verdicts name the full queue of the
    // listener they reached, in the server's namespace of this host. (A client whose final
    // ACK was dropped believes it connected; closing, it may get a RST from a server with no
    // socket for it: not a SYN timeout.)
    let client = verdicts_in(&values, hosts.client.inode());
    let timeouts: Vec<_> = client
        .iter()
        .filter(|c| c["reason"] == "syn_timeout")
        .collect();
    // The timed-out clients close together, in one timer softirq: if it interrupted the
    // lifecycle program on that CPU, the kernel skipped their closes (the program does not
    // nest) and says so in the summary's `program_misses`. Only so many may lack a verdict.
    let summary = conntrace_tests::summary_of(&values);
    let skipped = conntrace_tests::lifecycle_misses(summary);
    println!(
        "MEASURED listen_overflow clients: {} syn_timeout verdicts of {timed_out} timed out; \
         program misses {}",
        timeouts.len(),
        summary["program_misses"]
    );
    assert!(
        timeouts.len() <= timed_out && (timed_out - timeouts.len()) as u64 <= skipped,
        "{} syn_timeout verdicts of {timed_out} timed-out clients, {skipped} lifecycle runs \
         skipped; summary {summary}; client verdicts {client:#?}",
        timeouts.len()
    );
    for c in &timeouts {
        assert_eq!(c["errno"], "ETIMEDOUT", "{c}");
        assert!(c["syn_retransmits"].as_u64() >= Some(1), "{c}");
        let q = &c["detail"]["peer_listen_queue"];
        assert_eq!(
            (&q["netns"], q["listener"].as_str(), &q["backlog"]),
            (
                &hosts.server.inode().into(),
                Some(format!("{}:3306", hosts.server_ip).as_str()),
                &1.into()
            ),
            "{c}"
        );
        assert!(q["overflows"].as_u64() >= Some(1), "{c}");
        assert_eq!(q["somaxconn"], 77, "{c}");
    }
}
