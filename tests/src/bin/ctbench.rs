//! `cargo xtask bench`: connection churn with and without conntrace, in one run.
//!
//! Each phase builds a fresh pair of namespaces (so TIME_WAIT sockets of one phase never slow
//! the next), starts `ctload serve` (greeting, then close) in the server one, optionally starts
//! conntrace (release build, `CONNTRACE_BIN`) tracing the churned port, a different port, or
//! bpftrace with an equivalent tracepoint script, and churns for `--phase-ms`. Rounds
//! interleave the modes and the medians are compared, so drifts of the machine hit all alike.
//! The last line is `bench: traced/untraced=R1 unrelated/untraced=R2 lost=N`.

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::Duration,
};

use conntrace_tests::{Conntrace, Netns, TwoHosts, require_root};
use serde_json::Value;

const PORT: u16 = 3306;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The value of a string option, if given.
fn string_arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn ctload() -> std::path::PathBuf {
    conntrace_tests::helper_bin("ctload")
}

/// One churn phase as `ctload churn` reported it.
struct Churn {
    per_second: f64,
    connections: f64,
    /// CPU seconds the client used.
    cpu_s: f64,
}

/// Runs `ctload churn` in the client namespace.
fn churn(ns: &Netns, server: &str, ms: u64, parallel: u64) -> Churn {
    let out = ns
        .command(ctload().to_str().expect("utf-8 path"))
        .args(["churn", server, &PORT.to_string()])
        .args([
            "--for-ms",
            &ms.to_string(),
            "--parallel",
            &parallel.to_string(),
        ])
        .output()
        .expect("run ctload churn");
    let line: Value = serde_json::from_slice(&out.stdout).expect("ctload's JSON line");
    let field = |name: &str| {
        line[name]
            .as_f64()
            .unwrap_or_else(|| panic!("{name} in {line}"))
    };
    Churn {
        per_second: field("per_second"),
        connections: field("connections"),
        cpu_s: field("cpu_s"),
    }
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[derive(Default)]
struct Traced {
    rate: Vec<f64>,
    cpu_pct: Vec<f64>,
    events_per_s: Vec<f64>,
    lost: u64,
    peak_rss: f64,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// bpftrace with a tracepoint-only script counting the same lifecycle, reset and drop events.
fn bpftrace_script() -> String {
    format!(
        "tracepoint:sock:inet_sock_set_state /args->protocol == 6 && (args->sport == {PORT} || args->dport == {PORT})/ {{ @states[args->newstate] = count(); }}\n\
         tracepoint:tcp:tcp_receive_reset /args->sport == {PORT} || args->dport == {PORT}/ {{ @rst = count(); }}\n\
         tracepoint:skb:kfree_skb /args->protocol == 0x0800/ {{ @drops[args->reason] = count(); }}\n"
    )
}

fn main() {
    require_root();
    let rounds = arg("--rounds", 3);
    let phase_ms = arg("--phase-ms", 2000);
    let parallel = arg("--parallel", 2);
    // Capabilities conntrace leaves out (its --without), to measure what each one costs.
    let without = string_arg("--without");
    let with_bpftrace = Command::new("bpftrace").arg("--version").output().is_ok();
    let mut untraced = Vec::new();
    let mut unrelated = Vec::new();
    let mut bpftrace = Vec::new();
    // CPU microseconds per connection (client + server + tracer), per mode.
    let mut cost: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut traced = Traced::default();
    for round in 1..=rounds {
        for mode in ["untraced", "traced", "unrelated", "bpftrace"] {
            if mode == "bpftrace" && !with_bpftrace {
                continue;
            }
            let hosts = TwoHosts::new();
            hosts
                .client
                .exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"]);
            let mut server = hosts
                .server
                .command(ctload().to_str().expect("utf-8 path"))
                .args(["serve", &hosts.server_ip, &PORT.to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn ctload serve");
            std::thread::sleep(Duration::from_millis(200));
            let port = match mode {
                "traced" => Some(PORT.to_string()),
                "unrelated" => Some("9999".to_owned()),
                _ => None,
            };
            let ct = port.map(|port| {
                let mut args = vec!["--port", port.as_str()];
                if let Some(without) = &without {
                    args.extend(["--without", without.as_str()]);
                }
                Conntrace::start(&args)
            });
            let mut bt = (mode == "bpftrace").then(|| {
                let child = Command::new("bpftrace")
                    .args(["-e", &bpftrace_script()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn bpftrace");
                std::thread::sleep(Duration::from_secs(3));
                child
            });
            let tracer_pid = ct
                .as_ref()
                .map(Conntrace::pid)
                .or(bt.as_ref().map(|b| b.id()));
            let tracer_cpu = || tracer_pid.map_or(0.0, cpu_seconds);
            let cpu_before = tracer_cpu();
            let server_before = cpu_seconds(server.id());
            let run = churn(&hosts.client, &hosts.server_ip, phase_ms, parallel);
            let rate = run.per_second;
            let used =
                run.cpu_s + cpu_seconds(server.id()) - server_before + tracer_cpu() - cpu_before;
            cost.entry(mode)
                .or_default()
                .push(1e6 * used / run.connections.max(1.0));
            match (mode, ct) {
                ("traced", Some(ct)) => {
                    let pid = ct.pid();
                    let cpu = tracer_cpu() - cpu_before;
                    traced.peak_rss = traced.peak_rss.max(conntrace_tests::proc_mib(pid, "VmHWM"));
                    let values = ct.stop();
                    let summary = values.last().expect("summary");
                    let events = summary["kernel_events"].as_f64().unwrap_or(0.0);
                    traced.lost += summary["lost_events"].as_u64().unwrap_or(0);
                    traced.rate.push(rate);
                    traced
                        .cpu_pct
                        .push(100.0 * cpu / (phase_ms as f64 / 1000.0));
                    traced
                        .events_per_s
                        .push(events / (phase_ms as f64 / 1000.0));
                }
                ("unrelated", Some(ct)) => {
                    ct.stop();
                    unrelated.push(rate);
                }
                ("bpftrace", _) => bpftrace.push(rate),
                _ => untraced.push(rate),
            }
            if let Some(mut b) = bt.take() {
                b.kill().ok();
                b.wait().ok();
            }
            server.kill().ok();
            server.wait().ok();
            println!(
                "round {round} {mode:<9} {rate:>9.0} connections/s {:>6.1} µs CPU/connection",
                cost[mode].last().copied().unwrap_or(0.0)
            );
        }
    }
    let base = median(&untraced);
    let mut table = BTreeMap::new();
    table.insert("untraced", base);
    table.insert("traced", median(&traced.rate));
    table.insert("unrelated", median(&unrelated));
    if with_bpftrace {
        table.insert("bpftrace", median(&bpftrace));
    }
    let base_cost = median(&cost["untraced"]);
    for (mode, rate) in &table {
        let c = median(&cost[mode]);
        println!(
            "median {mode:<9} {rate:>9.0} connections/s  ratio {:.3}  {c:>6.1} µs CPU/connection  cost ratio {:.3}",
            rate / base,
            base_cost / c
        );
    }
    // Throughput moves with whatever else the machine runs; CPU per connection much less.
    println!(
        "cpu: untraced/traced={:.3} untraced/unrelated={:.3} (CPU per connection, client + server + tracer)",
        base_cost / median(&cost["traced"]),
        base_cost / median(&cost["unrelated"])
    );
    println!(
        "conntrace while traced: {:.0} kernel events/s, {:.1}% of one core, peak RSS {:.1} MiB, {} lost",
        median(&traced.events_per_s),
        median(&traced.cpu_pct),
        traced.peak_rss,
        traced.lost
    );
    if !with_bpftrace {
        println!("bpftrace: not installed, not compared");
    }
    println!(
        "bench: traced/untraced={:.3} unrelated/untraced={:.3} lost={}",
        table["traced"] / base,
        table["unrelated"] / base,
        traced.lost
    );
}
