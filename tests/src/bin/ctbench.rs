//! `cargo xtask bench`: connection churn with and without conntrace, in one run.
//!
//! Each phase builds a fresh pair of namespaces (so TIME_WAIT sockets of one phase never slow
//! the next), starts `ctload serve` (greeting, then close) in the server one, optionally starts
//! conntrace (release build, `CONNTRACE_BIN`) tracing the churned port, a different port,
//! bpftrace with a light tracepoint script (`bpftrace`), bpftrace with one counting probe on
//! each hook conntrace attaches (`bpftrace-hooks`, generated from conntrace's `ready` record
//! before the rounds: hooks.rs, bpftrace.rs), bcc's `tcpstates` where it runs, or an empty
//! eBPF program on each of conntrace's hooks (`floor`, and `floor-unrelated` without the
//! listener-gated one: floor.rs, what any program on those hooks costs), and churns for
//! `--phase-ms`. Rounds interleave the modes, each round in an order rotated by one, so drifts
//! of the machine hit all alike. Everything runs on one CPU (`--cpu N`, default 0; `--cpu all`
//! for none), one churning thread: a phase's rate is then its CPU cost per connection, with no
//! cross-CPU wake-ups (whose cost under this machine's virtualisation moved the rate by a
//! quarter from one 300 ms slice to the next) and no idle time to hide a tracer's cost. Each
//! phase churns for a second before it measures, and measures in 100 ms slices; the last line
//! compares each mode's undisturbed rate (the 95th percentile of its slices, see
//! [`stats::undisturbed`]), with an interval from resampling the phases, and the medians of the
//! phases are printed too. Each mode also gets its CPU per connection (client + server +
//! tracer).
//! A paced phase measures conntrace's own CPU at about 10,000 kernel events a second, and a
//! last phase with `conntrace --bpf-stats` what each program costs per connection (costs.rs).
//! The last line is `bench: traced/untraced=R1 unrelated/untraced=R2 lost=N`.
//! `--compare-with BIN` runs only a comparison of each program's cost in this build and in
//! BIN, both tracing the same churn at once (compare.rs). `--pooled` runs a second workload
//! instead of the churn: persistent connections exchanging small requests (pooled.rs).

// A binary's root resolves modules beside it: these live in ctbench/.
#[path = "ctbench/bpftrace.rs"]
mod bpftrace;
#[path = "ctbench/btf.rs"]
mod btf;
#[path = "ctbench/compare.rs"]
mod compare;
#[path = "ctbench/costs.rs"]
mod costs;
#[path = "ctbench/floor.rs"]
mod floor;
#[path = "ctbench/hooks.rs"]
mod hooks;
#[path = "ctbench/peers.rs"]
mod peers;
#[path = "ctbench/pooled.rs"]
mod pooled;
#[path = "ctbench/report.rs"]
mod report;
#[path = "ctbench/stats.rs"]
mod stats;

use std::time::Duration;

use clap::Parser;
use conntrace_tests::{Conntrace, Netns, PORT, Proc, Scenario, require_root};
use serde_json::Value;
use stats::median;

/// The port the `unrelated` mode traces: nothing connects to it.
const OTHER_PORT: u16 = 9999;

/// `cargo xtask bench -- ARGS`: conntrace's cost on connection churn, against no tracer and
/// against bpftrace, in one run. Needs root (eBPF, network namespaces) and `CONNTRACE_BIN`.
#[derive(Parser, Debug)]
#[command(name = "ctbench")]
struct Args {
    /// Rounds; each runs every mode once, in an order rotated by one a round. Ten take about
    /// five minutes and give enough 100 ms slices for each mode's undisturbed rate.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// Length of each mode's measured phase, in milliseconds (after one unmeasured second).
    #[arg(long, default_value_t = 2000)]
    phase_ms: u64,
    /// The CPU everything runs on (the churn, its server, the tracers), or `all` for none.
    #[arg(long, default_value = "0", value_parser = parse_cpu)]
    cpu: Cpu,
    /// Churning threads (default: 1 when pinned to one CPU, 2 otherwise).
    #[arg(long)]
    parallel: Option<u64>,
    /// Modes to run besides untraced, traced and unrelated (which always run), comma-separated
    /// (default: every one that runs here).
    #[arg(long, value_delimiter = ',', value_parser = ["bpftrace", "bpftrace-hooks", "tcpstates", "floor", "floor-unrelated"])]
    modes: Option<Vec<String>>,
    /// Capabilities conntrace leaves out (its `--without`), to measure what each one costs.
    #[arg(long)]
    without: Option<String>,
    /// Only compare each program's cost in this build and in the conntrace binary BIN, both
    /// tracing the same churn at once.
    #[arg(long, value_name = "BIN")]
    compare_with: Option<std::path::PathBuf>,
    /// Only the `--bpf-stats` phases: each program's runs and ns per connection, tracing the
    /// churned port and another port, one phase each.
    #[arg(long, conflicts_with_all = ["compare_with", "modes", "rounds"])]
    programs_only: bool,
    /// Instead of the churn, the pooled workload: persistent connections exchanging 64-byte
    /// requests and answers (pooled.rs), in the modes untraced, traced, unrelated and the
    /// floors (`--modes floor,...` picks among the floors).
    #[arg(long, conflicts_with_all = ["compare_with", "programs_only"])]
    pooled: bool,
}

/// A CPU to pin to, or none.
#[derive(Clone, Copy, Debug)]
enum Cpu {
    One(usize),
    All,
}

fn parse_cpu(s: &str) -> Result<Cpu, String> {
    match s {
        "all" => Ok(Cpu::All),
        n => n
            .parse()
            .map(Cpu::One)
            .map_err(|_| format!("{n}: a CPU number or `all`")),
    }
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
    /// Connections a second in each [`SLICE_MS`] slice of the phase.
    slices: Vec<f64>,
}

/// The length of the slices a phase's rate is also measured in.
const SLICE_MS: u64 = 100;

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
            "--slice-ms",
            &SLICE_MS.to_string(),
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
        slices: line["slices"]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default(),
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
    cpu_pct: Vec<f64>,
    events_per_s: Vec<f64>,
    events_per_conn: Vec<f64>,
    lost: u64,
    peak_rss: f64,
    /// What the first `bpftrace-hooks` phase counted per connection, by probe.
    hook_hits: Option<Vec<(String, f64)>>,
}

fn start_conntrace(port: &str, without: Option<&str>) -> Conntrace {
    let mut args = vec!["--port", port];
    if let Some(without) = without {
        args.extend(["--without", without]);
    }
    Conntrace::start(&args)
}

/// conntrace's CPU at a paced churn of about `events_per_s` kernel events a second:
/// (events/s measured, % of one core).
fn paced(events_per_s: f64, events_per_conn: f64, ms: u64, without: Option<&str>) -> (f64, f64) {
    let setup = Scenario::churn(PORT);
    let ct = start_conntrace(&PORT.to_string(), without);
    let rate = (events_per_s / events_per_conn.max(1.0)).round().max(1.0) as u64;
    // conntrace finishes its start-up (kernel symbols, socket listing) after `ready`: let it
    // settle, so that only the steady state is measured.
    std::thread::sleep(Duration::from_secs(1));
    let before = cpu_seconds(ct.pid());
    let out = setup
        .hosts
        .client
        .command(ctload().to_str().expect("utf-8 path"))
        .args(["churn", &setup.hosts.server_ip, &PORT.to_string()])
        .args(["--for-ms", &ms.to_string(), "--rate", &rate.to_string()])
        .output()
        .expect("run ctload churn");
    assert!(out.status.success(), "ctload churn failed");
    let cpu = cpu_seconds(ct.pid()) - before;
    let values = ct.stop();
    let events = values.last().expect("summary")["kernel_events"]
        .as_f64()
        .unwrap_or(0.0);
    let secs = ms as f64 / 1000.0;
    (events / secs, 100.0 * cpu / secs)
}

/// How long each phase churns, unmeasured, after its tracer is ready.
const SETTLE: Duration = Duration::from_secs(1);

/// One churn phase in fresh hosts with `mode`'s tracer: (connections/s, CPU µs per
/// connection for client + server + tracer, the rate of each [`SLICE_MS`] slice). A `traced`
/// phase adds conntrace's own figures.
fn phase(
    mode: &str,
    phase_ms: u64,
    parallel: u64,
    (without, peers): (Option<&str>, &peers::Peers),
    traced: &mut Traced,
) -> (f64, f64, Vec<f64>) {
    let setup = Scenario::churn(PORT);
    let ct = match mode {
        "traced" => Some(start_conntrace(&PORT.to_string(), without)),
        "unrelated" => Some(start_conntrace(&OTHER_PORT.to_string(), without)),
        _ => None,
    };
    let peer = match mode {
        "bpftrace" => Some(peers::start_bpftrace()),
        "tcpstates" => Some(peers::start_tcpstates().expect("tcpstates ran in the probe")),
        _ => None,
    };
    let hooks_peer = (mode == "bpftrace-hooks").then(|| {
        bpftrace::start(
            peers
                .hooks_script
                .as_deref()
                .expect("bpftrace-hooks script"),
        )
        .unwrap_or_else(|why| panic!("bpftrace-hooks: {why}"))
    });
    // Empty programs: no process of their own, their cost is the client's and server's.
    let floor = mode.strip_prefix("floor").map(|rest| {
        let floor = peers.floor.as_ref().expect("floor prepared");
        floor
            .attach(rest == "-unrelated")
            .unwrap_or_else(|why| panic!("{mode}: {why}"))
    });
    let tracer_pid = ct
        .as_ref()
        .map(Conntrace::pid)
        .or(peer.as_ref().map(Proc::pid))
        .or(hooks_peer.as_ref().map(bpftrace::Running::pid));
    let tracer_cpu = || tracer_pid.map_or(0.0, cpu_seconds);
    // A tracer's first second after it is ready is start-up (conntrace enumerates namespaces
    // and container runtimes, about 50 ms of CPU once): the phase measures what it costs while
    // it runs. Every mode waits alike, churning: a fresh namespace pair's first few hundred
    // milliseconds ran a third slower (caches, the kernel's first allocations).
    churn(
        &setup.hosts.client,
        &setup.hosts.server_ip,
        SETTLE.as_millis() as u64,
        parallel,
    );
    let cpu_before = tracer_cpu();
    let server_before = cpu_seconds(setup.server.pid());
    let run = churn(
        &setup.hosts.client,
        &setup.hosts.server_ip,
        phase_ms,
        parallel,
    );
    let tracer_used = tracer_cpu() - cpu_before;
    let used = run.cpu_s + cpu_seconds(setup.server.pid()) - server_before + tracer_used;
    if let Some(ct) = ct {
        let pid = ct.pid();
        let hwm = conntrace_tests::proc_mib(pid, "VmHWM");
        let values = ct.stop();
        if mode == "traced" {
            let summary = values.last().expect("summary");
            let events = summary["kernel_events"].as_f64().unwrap_or(0.0);
            traced.peak_rss = traced.peak_rss.max(hwm);
            traced.lost += summary["lost_events"].as_u64().unwrap_or(0);
            let secs = phase_ms as f64 / 1000.0;
            traced.cpu_pct.push(100.0 * tracer_used / secs);
            traced.events_per_s.push(events / secs);
            traced
                .events_per_conn
                .push(events / run.connections.max(1.0));
        }
    }
    drop(peer);
    drop(floor);
    if let Some(running) = hooks_peer {
        let hits = running.hits();
        let per_conn = |n: u64| n as f64 / run.connections.max(1.0);
        traced
            .hook_hits
            .get_or_insert_with(|| hits.into_iter().map(|(p, n)| (p, per_conn(n))).collect());
    }
    let cost_us = 1e6 * used / run.connections.max(1.0);
    (run.per_second, cost_us, run.slices)
}

/// Pins this process, and so every process it starts (servers, churns, tracers), to `cpu`.
/// One CPU makes a phase's rate its CPU cost per connection: no cross-CPU wake-ups, whose
/// cost under virtualisation moved this machine's rate by a quarter from one 300 ms slice to
/// the next, and no idle time that would hide a tracer's cost. Work the kernel queues
/// elsewhere (a deleted namespace's cleanup) runs on the other CPUs.
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        set
    };
    // SAFETY: sched_setaffinity(2) on this process with a set of the right size.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(
        rc,
        0,
        "sched_setaffinity(cpu {cpu}): {}",
        std::io::Error::last_os_error()
    );
}

/// The modes to run: every one that runs here, or those `--modes` names (with the three the
/// last line compares); the peers left out, and what the peers need. A mode `--modes` names
/// that does not run here stops the bench before its rounds, with the reason.
fn select_modes(
    only: Option<&[String]>,
    without: Option<&str>,
) -> Result<(Vec<&'static str>, Vec<peers::Absent>, peers::Peers), String> {
    let (mut modes, absent, peers) = peers::modes(without);
    let Some(only) = only else {
        return Ok((modes, absent, peers));
    };
    for wanted in only {
        if let Some(a) = absent.iter().find(|a| a.modes.contains(&wanted.as_str())) {
            return Err(format!("--modes {wanted}: {}", a.line));
        }
    }
    modes
        .retain(|m| ["untraced", "traced", "unrelated"].contains(m) || only.iter().any(|o| o == m));
    Ok((modes, absent, peers))
}

/// `rounds` rounds, each running every mode once, in an order rotated by one a round.
fn run_rounds(
    modes: &[&'static str],
    rounds: u64,
    (phase_ms, parallel): (u64, u64),
    peer: (Option<&str>, &peers::Peers),
) -> report::Results {
    let mut r = report::Results::default();
    let width = modes.iter().map(|m| m.len()).max().unwrap_or(0);
    for round in 1..=rounds {
        // Each round starts one mode later: no mode always follows the same one (the previous
        // phase's teardown, a tracer's exit and a namespace's cleanup, is its neighbour's).
        let start = (round as usize - 1) % modes.len();
        for &mode in modes[start..].iter().chain(&modes[..start]) {
            let (rate, cost_us, phase_slices) =
                phase(mode, phase_ms, parallel, peer, &mut r.traced);
            r.slices.entry(mode).or_default().push(phase_slices);
            r.cost.entry(mode).or_default().push(cost_us);
            r.rates.entry(mode).or_default().push(rate);
            println!(
                "round {round} {mode:<width$} {rate:>9.0} connections/s {cost_us:>6.1} µs CPU/connection"
            );
        }
    }
    r
}

fn main() {
    let args = Args::parse();
    require_root();
    let (rounds, phase_ms) = (args.rounds, args.phase_ms);
    let cpu = match args.cpu {
        Cpu::One(cpu) => Some(cpu),
        Cpu::All => None,
    };
    if let Some(cpu) = cpu {
        pin_to(cpu);
    }
    // On one CPU one churning thread keeps it busy (the server's thread runs as it waits).
    let parallel = args.parallel.unwrap_or(if cpu.is_some() { 1 } else { 2 });
    let without = args.without.as_deref();
    if args.programs_only {
        costs::report(PORT, phase_ms, parallel, without);
        costs::report(OTHER_PORT, phase_ms, parallel, without);
        return;
    }
    if let Some(other) = &args.compare_with {
        compare::report(other, rounds, phase_ms, parallel);
        return;
    }
    let (modes, absent, peers) = match select_modes(args.modes.as_deref(), without) {
        Ok(selected) => selected,
        Err(why) => {
            eprintln!("ctbench: {why}");
            std::process::exit(2);
        }
    };
    if args.pooled {
        pooled::report(rounds, phase_ms, parallel, (&modes, &peers));
        return;
    }
    println!(
        "bench: {} rounds of {phase_ms} ms phases, {parallel} churning thread(s), {}",
        rounds,
        cpu.map_or("all CPUs".to_owned(), |c| format!("everything on CPU {c}"))
    );
    let results = run_rounds(&modes, rounds, (phase_ms, parallel), (without, &peers));
    report::medians(&results);
    report::against_bpftrace(&results);
    report::traced(&results);
    let (events, pct) = paced(
        10_000.0,
        median(&results.traced.events_per_conn),
        4 * phase_ms,
        without,
    );
    println!(
        "conntrace at {events:.0} kernel events/s (paced churn): {pct:.2}% of one core (target ≤ 5% at 10k events/s)"
    );
    costs::report(PORT, phase_ms, parallel, without);
    costs::report(OTHER_PORT, phase_ms, parallel, without);
    for a in absent {
        println!("{}", a.line);
    }
    report::undisturbed_rates(&results);
}
