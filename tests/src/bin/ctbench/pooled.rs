//! `--pooled`: the bench's second workload, a load test's usual shape: persistent connections
//! (a client's pool) making small request/response exchanges, as database queries do, with
//! and without conntrace. No connection opens or closes while it measures, so what it shows
//! is what conntrace costs established traffic: its per-packet programs and their dispatch,
//! not the connection lifecycle the churn measures.
//!
//! Each phase builds fresh hosts with `ctload serve --echo`, starts the mode's tracer, runs
//! `ctload pingpong` for a second unmeasured, then for `--phase-ms`; rounds interleave the
//! modes as the churn's do. Then one `--bpf-stats` phase gives each program's runs and ns per
//! request. The last line is `bench pooled: traced/untraced=R1 unrelated/untraced=R2 lost=N`.

use std::collections::BTreeMap;

use conntrace_tests::{Conntrace, Netns, PORT, Scenario};
use serde_json::Value;

use crate::{OTHER_PORT, SETTLE, costs, cpu_seconds, ctload, peers::Peers, stats::median};

/// The modes the pooled workload runs (the bpftrace peers trace the lifecycle, which this
/// workload does not exercise).
pub const MODES: &[&str] = &[
    "untraced",
    "traced",
    "unrelated",
    "floor",
    "floor-unrelated",
];

/// Bytes of each request, and of its echoed answer.
const REQUEST_BYTES: &str = "64";

/// One `ctload pingpong` run.
struct Run {
    per_second: f64,
    requests: f64,
    /// CPU seconds the client used.
    cpu_s: f64,
}

fn pingpong(ns: &Netns, server: &str, ms: u64, parallel: u64) -> Run {
    let out = ns
        .command(ctload().to_str().expect("utf-8 path"))
        .args(["pingpong", server, &PORT.to_string()])
        .args([
            "--for-ms",
            &ms.to_string(),
            "--parallel",
            &parallel.to_string(),
        ])
        .args(["--size", REQUEST_BYTES])
        .output()
        .expect("run ctload pingpong");
    let line: Value = serde_json::from_slice(&out.stdout).expect("ctload's JSON line");
    assert_eq!(line["failed"], 0, "ctload pingpong: {line}");
    let field = |name: &str| {
        line[name]
            .as_f64()
            .unwrap_or_else(|| panic!("{name} in {line}"))
    };
    Run {
        per_second: field("per_second"),
        requests: field("requests"),
        cpu_s: field("cpu_s"),
    }
}

/// What the rounds measured, by mode: requests a second, CPU µs per request (client, server
/// and tracer); and the traced phases' lost events.
#[derive(Default)]
struct Results {
    rates: BTreeMap<&'static str, Vec<f64>>,
    cost: BTreeMap<&'static str, Vec<f64>>,
    lost: u64,
}

/// One phase of `mode`: (requests a second, CPU µs per request, events lost).
fn phase(mode: &str, phase_ms: u64, parallel: u64, peers: &Peers) -> (f64, f64, u64) {
    let setup = Scenario::pooled(PORT);
    let port = match mode {
        "traced" => Some(PORT),
        "unrelated" => Some(OTHER_PORT),
        _ => None,
    };
    let ct = port.map(|p| Conntrace::start(&["--port", &p.to_string()]));
    let floor = mode.strip_prefix("floor").map(|rest| {
        let floor = peers.floor.as_ref().expect("floor prepared");
        floor
            .attach(rest == "-unrelated")
            .unwrap_or_else(|why| panic!("{mode}: {why}"))
    });
    let (client, server) = (&setup.hosts.client, setup.hosts.server_ip.as_str());
    pingpong(client, server, SETTLE.as_millis() as u64, parallel);
    let tracer_cpu = || ct.as_ref().map_or(0.0, |c| cpu_seconds(c.pid()));
    let (tracer_before, server_before) = (tracer_cpu(), cpu_seconds(setup.server.pid()));
    let run = pingpong(client, server, phase_ms, parallel);
    let used =
        run.cpu_s + cpu_seconds(setup.server.pid()) - server_before + tracer_cpu() - tracer_before;
    let lost = ct.map_or(0, |ct| {
        let values = ct.stop();
        values.last().expect("summary")["lost_events"]
            .as_u64()
            .unwrap_or(0)
    });
    drop(floor);
    (run.per_second, 1e6 * used / run.requests.max(1.0), lost)
}

/// Runs the rounds, the per-program phase, and prints the figures and the last line.
pub fn report(
    rounds: u64,
    phase_ms: u64,
    parallel: u64,
    (modes, peers): (&[&'static str], &Peers),
) {
    let modes: Vec<&'static str> = modes
        .iter()
        .copied()
        .filter(|m| MODES.contains(m))
        .collect();
    println!(
        "bench pooled: {rounds} rounds of {phase_ms} ms phases, {parallel} persistent connection(s) exchanging {REQUEST_BYTES}-byte requests and answers"
    );
    let mut r = Results::default();
    let width = modes.iter().map(|m| m.len()).max().unwrap_or(0);
    for round in 1..=rounds {
        let start = (round as usize - 1) % modes.len();
        for &mode in modes[start..].iter().chain(&modes[..start]) {
            let (rate, cost_us, lost) = phase(mode, phase_ms, parallel, peers);
            r.rates.entry(mode).or_default().push(rate);
            r.cost.entry(mode).or_default().push(cost_us);
            r.lost += lost;
            println!(
                "round {round} {mode:<width$} {rate:>9.0} requests/s {cost_us:>6.2} µs CPU/request"
            );
        }
    }
    let med = |map: &BTreeMap<&str, Vec<f64>>, mode: &str| map.get(mode).map_or(0.0, |v| median(v));
    let untraced = med(&r.rates, "untraced").max(1.0);
    for &mode in &modes {
        println!(
            "median {mode:<width$} {:>9.0} requests/s ({:.3} of untraced) {:>6.2} µs CPU/request",
            med(&r.rates, mode),
            med(&r.rates, mode) / untraced,
            med(&r.cost, mode)
        );
    }
    programs(phase_ms, parallel);
    println!(
        "bench pooled: traced/untraced={:.3} unrelated/untraced={:.3} lost={}",
        med(&r.rates, "traced") / untraced,
        med(&r.rates, "unrelated") / untraced,
        r.lost
    );
}

/// The pooled workload once more with `conntrace --bpf-stats` on the port: each program's
/// runs and ns per request (not in the ratios: the statistics add two clock reads a run).
fn programs(phase_ms: u64, parallel: u64) {
    let setup = Scenario::pooled(PORT);
    let port = PORT.to_string();
    let (run, stats) = costs::with_bpf_stats(&["--port", &port, "--bpf-stats"], || {
        let (client, server) = (&setup.hosts.client, &setup.hosts.server_ip);
        pingpong(client, server, phase_ms, parallel)
    });
    let Some((programs, events)) = stats else {
        println!("per program (pooled): conntrace --bpf-stats wrote no `programs` in its summary");
        return;
    };
    println!(
        "per program, pooled requests on the traced port (--bpf-stats, not in the ratios: {:.0} requests, {:.0}/s, connections opened before it: their handshakes counted too):",
        run.requests, run.per_second
    );
    for l in costs::table(&programs, run.requests, "req").0 {
        println!("{l}");
    }
    println!(
        "kernel events per request: {:.4}",
        events / run.requests.max(1.0)
    );
}
