//! `--compare-with BIN`: what each program costs in this build (`CONNTRACE_BIN`) against
//! another one (BIN), both tracing one churn at once, each with `--bpf-stats`.
//!
//! Run one after the other, two builds' per-program figures differed by more than a change
//! to a program moved them: this machine's speed moves by a third between stretches of
//! seconds. Run together, both see the same connections at the same moments, and only their
//! own instructions differ. Each build's programs run one after the other at every hook,
//! in the order they were attached, so the order of the starts is swapped every other run.

use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use conntrace_tests::{Conntrace, PORT, Scenario, attach_args};
use serde_json::Value;

use crate::{
    costs::{figures, per_run},
    stats::median,
};

/// Each program's (runs, run_ns) in a `--bpf-stats` summary, by name.
pub fn programs(summary: &Value) -> BTreeMap<String, (u64, u64)> {
    summary["programs"]
        .as_array()
        .map(|list| {
            figures(list)
                .into_iter()
                .map(|(name, runs, ns)| (name.to_owned(), (runs, ns)))
                .collect()
        })
        .unwrap_or_default()
}

/// Per program that ran at least once a connection in both builds: (ns a run here, ns a run
/// in the other build), and the same for all programs in µs per connection.
pub fn pair(
    this: &BTreeMap<String, (u64, u64)>,
    other: &BTreeMap<String, (u64, u64)>,
    connections: f64,
) -> Vec<(String, f64, f64)> {
    let connections = connections.max(1.0);
    let per_run = |(runs, ns): (u64, u64)| per_run(runs, ns);
    let mut out: Vec<(String, f64, f64)> = this
        .iter()
        .filter_map(|(name, &here)| {
            let &there = other.get(name)?;
            (here.0 as f64 >= connections && there.0 as f64 >= connections)
                .then(|| (name.clone(), per_run(here), per_run(there)))
        })
        .collect();
    let total = |m: &BTreeMap<String, (u64, u64)>| {
        m.values().map(|&(_, ns)| ns as f64).sum::<f64>() / 1e3 / connections
    };
    out.push(("all programs (µs/conn)".into(), total(this), total(other)));
    out
}

/// `runs` runs of `phase_ms` ms each; prints each run's pairs and the medians.
pub fn report(other: &Path, runs: u64, phase_ms: u64, parallel: u64) {
    assert!(
        other.exists(),
        "--compare-with {}: no such file",
        other.display()
    );
    let port = PORT.to_string();
    let start_this = || Conntrace::start(&["--port", &port, "--bpf-stats"]);
    let start_other = || {
        let mut command = Command::new(other);
        command
            .arg("--json")
            .args(attach_args())
            .args(["--port", &port, "--bpf-stats"]);
        Conntrace::spawn(command, "the compared conntrace")
    };
    let mut figures: BTreeMap<String, Figures> = BTreeMap::new();
    for run in 1..=runs {
        let setup = Scenario::churn(PORT);
        let (this, that) = if run % 2 == 1 {
            let this = start_this();
            (this, start_other())
        } else {
            let that = start_other();
            (start_this(), that)
        };
        // Both past their start-up (namespaces, sockets, runtimes).
        std::thread::sleep(Duration::from_secs(1));
        let churn = crate::churn(
            &setup.hosts.client,
            &setup.hosts.server_ip,
            phase_ms,
            parallel,
        );
        let (here, there) = (this.stop(), that.stop());
        let summary = |values: &[Value]| programs(values.last().expect("summary"));
        let pairs = pair(&summary(&here), &summary(&there), churn.connections);
        let started_first = if run % 2 == 1 { "this" } else { "other" };
        println!(
            "run {run} ({:.0} connections, {started_first} build started first):",
            churn.connections
        );
        for (name, a, b) in pairs {
            println!(
                "  {name:<32} this {a:>8.3} other {b:>8.3} this/other {:.3}",
                a / b
            );
            let entry = figures.entry(name).or_default();
            entry.this.push(a);
            entry.other.push(b);
            entry.this_first.push(run % 2 == 1);
        }
    }
    println!(
        "medians over {runs} runs (ns a run; all programs in µs a connection), and the order-balanced ratio:"
    );
    for (name, f) in &figures {
        let (a, b) = (&f.this, &f.other);
        let (ma, mb) = (median(a), median(b));
        println!(
            "  {name:<32} this {ma:>8.3} other {mb:>8.3} this/other {:.3} balanced {:.3}",
            ma / mb,
            balanced(a, b, &f.this_first)
        );
    }
}

/// One program's figures over the runs that have it (a program below one run a connection
/// in a run has none from it): this build's, the other's, and whether this one started
/// first in that run.
#[derive(Default)]
struct Figures {
    this: Vec<f64>,
    other: Vec<f64>,
    this_first: Vec<bool>,
}

/// this/other with the order of attachment cancelled: the program attached first to a
/// tracepoint runs first and meets the socket's and packet's cache lines cold, the second
/// finds them warm (tens of ns a run on this project's host, either build). The geometric
/// mean of the median ratio of the runs where this build started first (`this_first`, one
/// flag per figure of `a` and `b`) and of those where the other one did.
fn balanced(a: &[f64], b: &[f64], this_first: &[bool]) -> f64 {
    let ratios = |first: bool| -> Vec<f64> {
        a.iter()
            .zip(b)
            .zip(this_first)
            .filter(|&(_, &f)| f == first)
            .map(|((x, y), _)| x / y)
            .collect()
    };
    let (this_first, other_first) = (ratios(true), ratios(false));
    match (this_first.is_empty(), other_first.is_empty()) {
        (false, false) => (median(&this_first) * median(&other_first)).sqrt(),
        (false, true) => median(&this_first),
        (true, _) => median(&other_first),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_the_programs_both_builds_ran_per_connection() {
        let summary = |json: &str| programs(&serde_json::from_str(json).expect("JSON"));
        let this = summary(
            r#"{"programs":[{"program":"lifecycle","runs":1000,"run_ns":90000},{"program":"drops","runs":100,"run_ns":9000},{"program":"fib","runs":900,"run_ns":36000}]}"#,
        );
        let other = summary(
            r#"{"programs":[{"program":"lifecycle","runs":1000,"run_ns":120000},{"program":"drops","runs":100,"run_ns":20000}]}"#,
        );
        let pairs = pair(&this, &other, 100.0);
        assert_eq!(
            pairs,
            vec![
                ("drops".to_owned(), 90.0, 200.0),
                ("lifecycle".to_owned(), 90.0, 120.0),
                ("all programs (µs/conn)".to_owned(), 1.35, 1.4),
            ],
            "fib ran in one build only"
        );
    }

    #[test]
    fn the_balanced_ratio_cancels_the_order_of_attachment() {
        // This build 10 % dearer when attached first, 10 % cheaper when second: no difference.
        let a = [110.0, 90.0, 110.0, 90.0];
        let b = [100.0; 4];
        let alternate = [true, false, true, false];
        assert!((balanced(&a, &b, &alternate) - (1.1f64 * 0.9).sqrt()).abs() < 1e-12);
        // A run missing (the program below one run a connection there): each figure keeps
        // its own run's order instead of its neighbour's.
        let gap = [true, true, false];
        assert!(
            (balanced(&[110.0, 110.0, 90.0], &[100.0; 3], &gap) - (1.1f64 * 0.9).sqrt()).abs()
                < 1e-12
        );
        assert!((balanced(&[80.0, 80.0], &[100.0, 100.0], &[true, false]) - 0.8).abs() < 1e-12);
        assert_eq!(balanced(&[50.0], &[100.0], &[true]), 0.5);
        assert_eq!(balanced(&[50.0], &[100.0], &[false]), 0.5);
    }
}
