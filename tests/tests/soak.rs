//! Churn through a traced port: memory stays flat and the summary's counts are exact.
//!
//! In CI (bounded): 3 s at 2,000 connections a second with `--all`, which the debug build the
//! tests use keeps up with: one `established` verdict per connection per side.
//!
//! The full soak is the same test with `CONNTRACE_SOAK_CONNECTIONS` set (README, "Soak"):
//! `CONNTRACE_SOAK_CONNECTIONS=1000000 CONNTRACE_SOAK_RATE=20000` with the release build. It
//! churns in rounds of at most 50,000 connections, each in a fresh pair of namespaces (the
//! server closes first, so its TIME_WAIT sockets would otherwise slow the client's port
//! choice to a crawl), without `--all`: the summary's `established` counts must equal the
//! connections made, on both sides, with no verdict at all.

use std::time::Duration;

use conntrace_tests::{Conntrace, PORT, Proc, Scenario, helper_bin, proc_mib};
use serde_json::Value;

/// Connections a second in all, in CI.
const CI_RATE: u64 = 2000;
/// Most connections per pair of namespaces in the full soak.
const ROUND: u64 = 50_000;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(v.parse().unwrap_or_else(|e| panic!("{name}={v}: {e}")))
}

/// One round of the soak: a traced server and its churning client, in fresh namespaces.
struct Round(Scenario<(), Proc>);

impl Round {
    fn new() -> Self {
        Self(Scenario::churn(PORT))
    }

    /// Churns for at most `ms`, or `count` connections; returns the connections made.
    fn churn(&self, ms: u64, rate: u64, count: u64) -> u64 {
        let hosts = &self.0.hosts;
        let out = hosts
            .client
            .command(helper_bin("ctload").to_str().expect("utf-8 path"))
            .args(["churn", &hosts.server_ip, &PORT.to_string()])
            .args(["--for-ms", &ms.to_string()])
            .args(["--rate", &rate.to_string()])
            .args(["--count", &count.to_string()])
            .output()
            .expect("run ctload churn");
        let line: Value = serde_json::from_slice(&out.stdout).expect("ctload's line");
        assert_eq!(line["failed"], 0, "{line}");
        line["connections"].as_u64().expect("connections")
    }
}

#[test]
fn churn_keeps_memory_flat_and_counts_exact() {
    let full = env_u64("CONNTRACE_SOAK_CONNECTIONS");
    let rate = env_u64("CONNTRACE_SOAK_RATE").unwrap_or(CI_RATE);
    let mut args = vec!["--port", "3306", "--ring-buffer-bytes", "16777216"];
    if full.is_none() {
        args.push("--all");
    }
    let mut round = Some(Round::new());
    let ct = Conntrace::start(&args);
    let pid = ct.pid();
    let (connections, warm, after) = match full {
        None => {
            let r = round.as_ref().expect("the round");
            let mut n = r.churn(1000, rate, u64::MAX);
            std::thread::sleep(Duration::from_millis(500));
            let warm = proc_mib(pid, "VmRSS");
            n += r.churn(2000, rate, u64::MAX);
            std::thread::sleep(Duration::from_millis(500));
            (n, warm, proc_mib(pid, "VmRSS"))
        }
        Some(target) => {
            let (mut n, mut warm) = (0, None);
            let started = std::time::Instant::now();
            while n < target {
                let r = round.take().unwrap_or_else(Round::new);
                let want = ROUND.min(target - n);
                // Bounded: at the requested rate plus slack, never forever.
                let ms = 1000 * want / rate.max(1) * 3 + 10_000;
                n += r.churn(ms, rate, want);
                drop(r);
                let rss = proc_mib(pid, "VmRSS");
                let first = *warm.get_or_insert(rss);
                println!(
                    "soak: {n} connections after {:.0} s, RSS {rss:.1} MiB (first round {first:.1})",
                    started.elapsed().as_secs_f64()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
            (n, warm.unwrap_or(0.0), proc_mib(pid, "VmRSS"))
        }
    };
    let peak = proc_mib(pid, "VmHWM");
    let values = ct.stop();
    // The last round's namespaces: an earlier test's socket may end while this one runs (a
    // socket outlives its namespace's name), and its verdict is not this churn's.
    let own: Vec<u64> = round
        .as_ref()
        .map(|r| vec![r.0.hosts.client.inode(), r.0.hosts.server.inode()])
        .unwrap_or_default();
    drop(round);
    let summary = values.last().expect("summary");
    println!(
        "MEASURED soak: {connections} connections, RSS {warm:.1} MiB after the first part, {after:.1} MiB at the end, peak {peak:.1} MiB, {} kernel events, {} lost",
        summary["kernel_events"], summary["lost_events"]
    );
    assert_eq!(summary["lost_events"], 0, "{summary}");
    assert_eq!(summary["established"]["client"], connections, "{summary}");
    assert_eq!(summary["established"]["server"], connections, "{summary}");
    assert_eq!(summary["expired_unresolved"], 0, "{summary}");
    if full.is_none() {
        // Every connection, both ends: one established verdict each, nothing else, in its
        // own namespaces (any other verdict is printed).
        assert_eq!(
            summary["by_reason"]["established"],
            2 * connections,
            "{summary}"
        );
        let (ours, others): (Vec<&Value>, Vec<&Value>) = values
            .iter()
            .filter(|v| v["event"] == "verdict")
            .partition(|v| v["netns"].as_u64().is_some_and(|n| own.contains(&n)));
        for v in &others {
            println!("not this churn's (another namespace): {v}");
        }
        assert_eq!(ours.len() as u64, 2 * connections, "{summary}");
        assert!(
            ours.iter().all(|v| v["reason"] == "established"),
            "{:?}",
            ours.iter().find(|v| v["reason"] != "established")
        );
    } else {
        assert_eq!(
            summary["verdicts"], 0,
            "healthy churn, no verdict: {summary}"
        );
    }
    assert!(
        after < warm + 16.0,
        "memory grew from {warm:.1} to {after:.1} MiB"
    );
}
