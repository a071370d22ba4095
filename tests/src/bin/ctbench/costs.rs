//! The per-program phase: the traced churn once more, with `conntrace --bpf-stats`, and what
//! each of conntrace's programs cost per connection. It is not one of the compared phases: the
//! kernel's run-time statistics add two clock reads to every program run, which would skew
//! their ratios.
//!
//! Those clock reads are inside the measured time too: a program that leaves at its first
//! compare (`fib_table_lookup` on a lookup that succeeded, `net_dev_queue` on a packet with an
//! owner) shows what they cost on this machine. The cheapest program that runs at least once
//! per connection is that floor, and the last column is each program's time above it: its own
//! work.

use conntrace_tests::{Conntrace, PORT, Scenario};
use serde_json::Value;

pub fn per_run(runs: u64, run_ns: u64) -> f64 {
    if runs == 0 {
        0.0
    } else {
        run_ns as f64 / runs as f64
    }
}

/// One program's line: runs, runs per connection (or per request), ns per run, µs per
/// connection, and µs per connection of its time above the floor (`above_ns` in all).
fn line(name: &str, runs: u64, run_ns: u64, above_ns: f64, connections: f64) -> String {
    format!(
        "  {name:<32} {runs:>10} {:>9.2} {:>7.0} {:>9.3} {:>11.3}",
        runs as f64 / connections,
        per_run(runs, run_ns),
        run_ns as f64 / 1e3 / connections,
        above_ns / 1e3 / connections
    )
}

/// Each program of a `--bpf-stats` summary's `programs`: (name, runs, run_ns), in order.
pub fn figures(programs: &[Value]) -> Vec<(&str, u64, u64)> {
    programs
        .iter()
        .map(|p| {
            (
                p["program"].as_str().unwrap_or("?"),
                p["runs"].as_u64().unwrap_or(0),
                p["run_ns"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// The table for a summary's `programs` and the phase's count of `unit`s (`conn`, or `req`
/// for the pooled workload's requests), with the floor: the cheapest ns a run of a program
/// that runs at least once per unit.
pub fn table(programs: &[Value], connections: f64, unit: &str) -> (Vec<String>, f64) {
    let connections = connections.max(1.0);
    let figures = figures(programs);
    let floor = figures
        .iter()
        .filter(|(_, n, _)| *n as f64 >= connections)
        .map(|(_, n, ns)| per_run(*n, *ns))
        .min_by(f64::total_cmp)
        .unwrap_or(0.0);
    let mut lines = vec![format!(
        "  {:<32} {:>10} {:>9} {:>7} {:>9} {:>11}",
        "program",
        "runs",
        format!("runs/{unit}"),
        "ns/run",
        format!("µs/{unit}"),
        "above floor"
    )];
    let (mut runs, mut run_ns, mut above) = (0, 0, 0.0);
    for &(name, n, ns) in &figures {
        let own = (ns as f64 - floor * n as f64).max(0.0);
        runs += n;
        run_ns += ns;
        above += own;
        lines.push(line(name, n, ns, own, connections));
    }
    lines.push(line("all programs", runs, run_ns, above, connections));
    (lines, floor)
}

/// Runs `workload` under `conntrace ARGS` (which has `--bpf-stats`): its result, and the
/// summary's `programs` with its kernel event count (none without `programs`).
pub fn with_bpf_stats<R>(
    args: &[&str],
    workload: impl FnOnce() -> R,
) -> (R, Option<(Vec<Value>, f64)>) {
    let ct = Conntrace::start(args);
    let run = workload();
    let values = ct.stop();
    let summary = values.last().expect("summary");
    let stats = summary["programs"].as_array().map(|p| {
        let events = summary["kernel_events"].as_f64().unwrap_or(0.0);
        (p.clone(), events)
    });
    (run, stats)
}

/// Runs the phase with conntrace tracing `port` (the churned one, or another to see what an
/// unrelated port costs) and prints the table and the kernel events per connection.
pub fn report(port: u16, phase_ms: u64, parallel: u64, without: Option<&str>) {
    let setup = Scenario::churn(PORT);
    let which = if port == PORT {
        "the churned port"
    } else {
        "another port"
    };
    let port = port.to_string();
    let mut args = vec!["--port", port.as_str(), "--bpf-stats"];
    if let Some(without) = without {
        args.extend(["--without", without]);
    }
    let (run, stats) = with_bpf_stats(&args, || {
        crate::churn(
            &setup.hosts.client,
            &setup.hosts.server_ip,
            phase_ms,
            parallel,
        )
    });
    let Some((programs, events)) = stats else {
        println!("per program: conntrace --bpf-stats wrote no `programs` in its summary");
        return;
    };
    let programs = &programs;
    println!(
        "per program, tracing {which} (conntrace --bpf-stats, a separate phase, not in the ratios: {:.0} connections, {:.0}/s):",
        run.connections, run.per_second
    );
    let (lines, floor) = table(programs, run.connections, "conn");
    for l in lines {
        println!("{l}");
    }
    println!(
        "statistics floor: {floor:.0} ns a run, the cheapest program's (one compare and out): what bpf_stats' own clock reads cost here; \"above floor\" is each program's own work"
    );
    println!(
        "kernel events per connection (--bpf-stats phase): {:.2} ({events:.0} events / {:.0} connections)",
        events / run.connections.max(1.0),
        run.connections
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn per_connection_figures() {
        let programs: Vec<serde_json::Value> = serde_json::from_str(
            r#"[{"program":"inet_sock_set_state","runs":800000,"run_ns":196000000},{"program":"fib_table_lookup","runs":900000,"run_ns":31500000},{"program":"kfree_skb","runs":0,"run_ns":0}]"#,
        )
        .expect("JSON");
        let (lines, floor) = super::table(&programs, 100_000.0, "conn");
        assert_eq!(floor, 35.0, "fib_table_lookup's ns a run");
        assert_eq!(
            lines.join("\n"),
            "  program                                runs runs/conn  ns/run   µs/conn above floor
  inet_sock_set_state                  800000      8.00     245     1.960       1.680
  fib_table_lookup                     900000      9.00      35     0.315       0.000
  kfree_skb                                 0      0.00       0     0.000       0.000
  all programs                        1700000     17.00     134     2.275       1.680"
        );
    }
}
