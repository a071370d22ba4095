//! A SYN flood (bounded: 5,000 SYNs from a spoofed address, Debian's hping3) against a
//! listener with SYN cookies: conntrace stays responsive and small, counts what it cannot
//! show, and a victim connection during the flood still gets its right verdict.
//! The full-size run is the same test with `CONNTRACE_FLOOD_SYNS=100000` (README, "Floods"):
//! hping3 then sends every 10 µs instead of every 100 µs.

use std::{process::Stdio, time::Duration};

use conntrace_tests::{PORT, Proc, Scenario, TwoHosts, connect, proc_mib};

/// SYNs in CI.
const CI_SYNS: u64 = 5000;

#[test]
fn a_victim_connection_during_a_syn_flood_keeps_its_verdict() {
    let syns: u64 = std::env::var("CONNTRACE_FLOOD_SYNS")
        .ok()
        .map_or(CI_SYNS, |v| {
            v.parse().expect("CONNTRACE_FLOOD_SYNS is a number")
        });
    let interval = if syns > CI_SYNS { "u10" } else { "u100" };
    let Scenario {
        hosts,
        ct,
        server: _server,
    } = Scenario::new()
        .serve(&["--greeting", "hello"])
        .conntrace(&["--port", "3306", "--all"]);
    // Spoofed from an address nobody owns: the SYN-ACKs go nowhere (half-open, cookies).
    let spoofed = hosts.unowned_ip(50);
    let mut flood = start_flood(&hosts, &spoofed, interval, syns);
    std::thread::sleep(Duration::from_millis(200));
    let victim = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &["--read", "--timeout-ms", "5000"],
    )
    .json_lines(Duration::from_secs(10));
    assert_eq!(
        victim[0]["ok"], true,
        "the victim got its greeting: {victim:?}"
    );
    let victim_port: u64 = victim[0]["local"]
        .as_str()
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .expect("victim's local port");
    // Bounded (the full-size run sends for about a second; no test hangs).
    flood.wait(Duration::from_secs(300), "hping3");
    std::thread::sleep(Duration::from_secs(2));
    let rss = proc_mib(ct.pid(), "VmHWM");
    let values = ct.stop();
    let victim_verdicts: Vec<_> = values
        .iter()
        .filter(|v| {
            v["event"] == "verdict"
                && v["netns"] == hosts.client.inode()
                && v["sport"] == victim_port
        })
        .collect();
    assert_eq!(victim_verdicts.len(), 1, "{victim_verdicts:#?}");
    assert_eq!(victim_verdicts[0]["reason"], "established");
    let summary = values.last().expect("summary");
    let counters = &summary["tcp_counters"][hosts.server.inode().to_string()];
    let cookies = counters["SyncookiesSent"].as_u64().unwrap_or(0);
    println!(
        "MEASURED flood: {syns} spoofed SYNs, {cookies} SYN cookies sent, {} kernel events, {} lost, peak RSS {rss:.1} MiB, verdicts {}, drops {}, drop records suppressed {}",
        summary["kernel_events"],
        summary["lost_events"],
        summary["by_reason"],
        summary["drops_by_reason"],
        summary["drop_records_suppressed"]
    );
    assert!(
        cookies >= syns / 5,
        "the flood shows in the counters: {summary}"
    );
    assert!(
        summary["lost_events"].as_u64().is_some(),
        "losses are counted"
    );
    assert!(rss <= 64.0, "peak RSS {rss:.1} MiB");
}

/// `hping3` in the client host: `syns` SYNs to the server's port from `spoofed`, one every
/// `interval` (hping3's `-i`).
fn start_flood(hosts: &TwoHosts, spoofed: &str, interval: &str, syns: u64) -> Proc {
    Proc::spawn(
        hosts
            .client
            .command("hping3")
            .args([
                "-q",
                "-S",
                "-a",
                spoofed,
                "-p",
                "3306",
                "-i",
                interval,
                "-c",
                &syns.to_string(),
            ])
            .arg(&hosts.server_ip)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "hping3 (package hping3)",
    )
}
