//! Failures seen on real hosts (issue 13), each one a namespace scenario with the real eBPF
//! programs that asserts both sides' verdicts exactly: a host that forwards traffic
//! (`forwarding`), kernel drops that explain a failure on the host that dropped (`drops`:
//! reverse-path filter, full conntrack table, the client's own REJECT, a neighbour failure that
//! arrives with the end), connect() errors before any packet (`connect`), stalls after the
//! handshake (`stalls`: path-MTU black hole, zero window), and drops that are a normal part of
//! TCP (`noise`).
//!
//! Every test first proves the situation happened at the application level (the peers' errno,
//! timing, bytes), prints what conntrace reported in each namespace (`MEASURED` lines), then
//! asserts the verdicts. Set-ups follow /work/notes/issue13-facts.md's measurements on 6.18;
//! timeouts are lowered inside the test namespaces (tcp_syn_retries, tcp_retries2) so each
//! test ends within a minute.

mod connect;
mod drops;
mod forwarding;
mod noise;
mod stalls;

use std::time::Duration;

use conntrace_tests::{Conntrace, drops_in, verdict_line, verdicts_in};
use serde_json::Value;

/// Prints what conntrace reported in each namespace: its verdicts (short form, kernel reason,
/// detail) and drop records. The test's report quotes these lines.
pub fn report(input: &str, values: &[Value], namespaces: &[(&str, u64)]) {
    for (name, ns) in namespaces {
        let verdicts = verdicts_in(values, *ns);
        if verdicts.is_empty() {
            println!("MEASURED {input} {name}: no verdict");
        }
        for v in &verdicts {
            println!(
                "MEASURED {input} {name}: {} kernel_reason={} sport={} detail={}",
                verdict_line(v),
                v["kernel_reason"],
                v["sport"],
                v["detail"]
            );
        }
        let drops: Vec<String> = drops_in(values, *ns)
            .iter()
            .map(|d| format!("{}@{}", d["kernel_reason"], d["location"]))
            .collect();
        if !drops.is_empty() {
            println!(
                "MEASURED {input} {name}: {} drop records {drops:?}",
                drops.len()
            );
        }
    }
    let summary = values.last().expect("summary");
    println!(
        "MEASURED {input} summary: established={} drops_by_reason={} kernel_events={} lost={} program_misses={} kernel_kept={}",
        summary["established"],
        summary["drops_by_reason"],
        summary["kernel_events"],
        summary["lost_events"],
        summary["program_misses"],
        summary["kernel_kept"]
    );
}

/// Asserts that the verdicts in `netns` are exactly `expected`, in order, each in the short
/// form `side outcome reason errno` (`-` for no errno, `*` for any); returns them.
pub fn expect_verdicts(values: &[Value], netns: u64, expected: &[&str]) -> Vec<Value> {
    let verdicts = verdicts_in(values, netns);
    let got: Vec<String> = verdicts.iter().map(verdict_line).collect();
    let matches = got.len() == expected.len()
        && got
            .iter()
            .zip(expected)
            .all(|(g, e)| match e.strip_suffix(" *") {
                Some(prefix) => g.rsplit_once(' ').is_some_and(|(head, _)| head == prefix),
                None => g == e,
            });
    assert!(
        matches,
        "verdicts in netns {netns}: want {expected:#?}, got {got:#?}\n{verdicts:#?}"
    );
    verdicts
}

/// A verdict's `detail` member at a dotted path (`rp_filter.arrived_on`); null when absent.
pub fn detail<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(&v["detail"], |d, key| &d[key])
}

/// Waits (at most `timeout` in all) until each namespace of `wanted` has a verdict with the
/// outcome given (`failed`, `resolved`, ...), then stops conntrace and returns its lines. A
/// verdict that never comes is not an error here: the assertions say what is missing.
pub fn stop_after(ct: Conntrace, timeout: Duration, wanted: &[(u64, &str)]) -> Vec<Value> {
    let deadline = std::time::Instant::now() + timeout;
    for (ns, outcome) in wanted {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        ct.try_wait_for(left, |l| {
            l.value["event"] == "verdict"
                && l.value["netns"] == *ns
                && l.value["outcome"] == *outcome
        });
    }
    ct.stop()
}

/// The third byte of a test's IPv4 address: its subnet number, for the extra subnets a test
/// adds (10.66.N.0/24, ...).
pub fn subnet_of(ip: &str) -> &str {
    ip.split('.').nth(2).expect("IPv4 address")
}

/// Asserts the application saw `errno` (a number) within `ms` (a range of milliseconds).
pub fn assert_peer_failed(result: &Value, errno: i64, ms: std::ops::Range<f64>) {
    assert_eq!(result["ok"], false, "{result}");
    assert_eq!(result["errno"], errno, "{result}");
    let took = result["ms"].as_f64().unwrap_or_default();
    assert!(
        ms.contains(&took),
        "after {took:.0} ms, want {ms:?}: {result}"
    );
}
