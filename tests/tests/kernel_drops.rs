//! Drops the kernel makes on its own: a neighbour that never answers ARP, and a listener whose
//! accept queue is full. Real namespaces, real eBPF, both sides checked.

use std::time::Duration;

use conntrace_tests::{PORT, Scenario, connect, drops_in, only_verdict_in, verdicts_in};

#[test]
fn an_address_nobody_owns_is_neighbour_failed() {
    let Scenario { hosts, ct, .. } = Scenario::new().conntrace(&["--port", "3306"]);
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
        (&v["reason"], &v["errno"], &v["kernel_reason"]),
        (
            &"neighbour_failed".into(),
            &"EHOSTUNREACH".into(),
            &"NEIGH_FAILED".into()
        ),
        "{v}"
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
fn a_server_that_never_accepts_overflows_its_listen_queue() {
    let Scenario {
        hosts,
        ct,
        server: _server,
    } = Scenario::new()
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
    // The clients cannot tell: their SYNs went unanswered. (A client whose final ACK was
    // dropped believes it connected; closing, it may get a RST from a server with no socket
    // for it: not a SYN timeout.)
    let client = verdicts_in(&values, hosts.client.inode());
    let timeouts: Vec<_> = client
        .iter()
        .filter(|c| c["reason"] == "syn_timeout")
        .collect();
    assert_eq!(timeouts.len(), timed_out, "{client:#?}");
    for c in &timeouts {
        assert_eq!(c["errno"], "ETIMEDOUT", "{c}");
        assert!(c["syn_retransmits"].as_u64() >= Some(1), "{c}");
    }
}
