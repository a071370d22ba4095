//! The per-program phase: the traced churn once more, with `conntrace --bpf-stats`, and what
//! each of conntrace's programs cost per connection. It is not one of the compared phases: the
//! kernel's run-time statistics add two clock reads to every program run, which would skew
//! their ratios.

use conntrace_tests::{Conntrace, PORT, Scenario};
use serde_json::Value;

/// One program's line: runs, runs per connection, ns per run, µs per connection.
fn line(name: &str, runs: u64, run_ns: u64, connections: f64) -> String {
    let per_run = if runs == 0 {
        0.0
    } else {
        run_ns as f64 / runs as f64
    };
    format!(
        "  {name:<32} {runs:>10} {:>9.2} {per_run:>7.0} {:>9.3}",
        runs as f64 / connections,
        run_ns as f64 / 1e3 / connections
    )
}

/// The table for a summary's `programs` and the phase's connection count.
pub fn table(programs: &[Value], connections: f64) -> Vec<String> {
    let connections = connections.max(1.0);
    let mut lines = vec![format!(
        "  {:<32} {:>10} {:>9} {:>7} {:>9}",
        "program", "runs", "runs/conn", "ns/run", "µs/conn"
    )];
    let (mut runs, mut run_ns) = (0, 0);
    for p in programs {
        let n = p["runs"].as_u64().unwrap_or(0);
        let ns = p["run_ns"].as_u64().unwrap_or(0);
        runs += n;
        run_ns += ns;
        lines.push(line(
            p["program"].as_str().unwrap_or("?"),
            n,
            ns,
            connections,
        ));
    }
    lines.push(line("all programs", runs, run_ns, connections));
    lines
}

/// Runs the phase and prints the table and the kernel events per connection.
pub fn report(phase_ms: u64, parallel: u64, without: Option<&str>) {
    let setup = Scenario::churn(PORT);
    let port = PORT.to_string();
    let mut args = vec!["--port", port.as_str(), "--bpf-stats"];
    if let Some(without) = without {
        args.extend(["--without", without]);
    }
    let ct = Conntrace::start(&args);
    let run = crate::churn(
        &setup.hosts.client,
        &setup.hosts.server_ip,
        phase_ms,
        parallel,
    );
    let values = ct.stop();
    let summary = values.last().expect("summary");
    let Some(programs) = summary["programs"].as_array() else {
        println!("per program: conntrace --bpf-stats wrote no `programs` in its summary");
        return;
    };
    let events = summary["kernel_events"].as_f64().unwrap_or(0.0);
    println!(
        "per program (conntrace --bpf-stats, a separate phase, not in the ratios: {:.0} connections, {:.0}/s):",
        run.connections, run.per_second
    );
    for l in table(programs, run.connections) {
        println!("{l}");
    }
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
            r#"[{"program":"inet_sock_set_state","runs":800000,"run_ns":196000000},{"program":"kfree_skb","runs":0,"run_ns":0}]"#,
        )
        .expect("JSON");
        assert_eq!(
            super::table(&programs, 100_000.0).join("\n"),
            "  program                                runs runs/conn  ns/run   µs/conn
  inet_sock_set_state                  800000      8.00     245     1.960
  kfree_skb                                 0      0.00       0     0.000
  all programs                         800000      8.00     245     1.960"
        );
    }
}
