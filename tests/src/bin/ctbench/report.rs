//! What the rounds measured, and the lines the bench prints from it: each mode's median, the
//! rounds' own ratios, CPU per connection, the bpftrace peers, the floors and the last line.

use std::collections::BTreeMap;

use super::stats::{UNDISTURBED, interval, median, undisturbed};
use super::{SLICE_MS, Traced};

/// Every phase's figures, by mode (in round order).
#[derive(Default)]
pub struct Results {
    /// Connections a second, per phase.
    pub rates: BTreeMap<&'static str, Vec<f64>>,
    /// CPU microseconds per connection (client + server + tracer), per phase.
    pub cost: BTreeMap<&'static str, Vec<f64>>,
    /// Every [`SLICE_MS`] slice's rate, per phase.
    pub slices: BTreeMap<&'static str, Vec<Vec<f64>>>,
    /// conntrace's own figures from the `traced` phases.
    pub traced: Traced,
}

impl Results {
    /// A mode's undisturbed rate over all its phases' slices.
    fn undisturbed(&self, mode: &str) -> f64 {
        undisturbed(&self.slices[mode])
    }

    /// `mode`'s undisturbed rate over `base`'s, with its resampled 95% interval:
    /// `R (LO to HI)`.
    fn ratio(&self, mode: &str, base: &str) -> String {
        let r = self.undisturbed(mode) / self.undisturbed(base);
        let (lo, hi) = interval(&self.slices[mode], &self.slices[base]);
        format!("{r:.3} ({lo:.3} to {hi:.3})")
    }
}

/// The medians of each mode's phases, the rounds' own ratios and CPU per connection.
pub fn medians(r: &Results) {
    let width = r.rates.keys().map(|m| m.len()).max().unwrap_or(0);
    let base = median(&r.rates["untraced"]);
    let base_cost = median(&r.cost["untraced"]);
    for (mode, rates) in &r.rates {
        let c = median(&r.cost[mode]);
        println!(
            "median {mode:<width$} {:>9.0} connections/s  ratio {:.3}  {c:>6.1} µs CPU/connection  cost ratio {:.3}",
            median(rates),
            median(rates) / base,
            base_cost / c
        );
    }
    // Each round's own ratio too: a drift of the machine that spans a round cancels out of it.
    let paired = |mode: &str| {
        let ratios: Vec<f64> = r.rates[mode]
            .iter()
            .zip(&r.rates["untraced"])
            .map(|(x, base)| x / base)
            .collect();
        let (lo, hi) = ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        format!(
            "{mode}/untraced={:.3} ({lo:.3} to {hi:.3})",
            median(&ratios)
        )
    };
    println!(
        "paired (median of the rounds' own ratios, with their range): {} {}",
        paired("traced"),
        paired("unrelated")
    );
    // Throughput moves with whatever else the machine runs; CPU per connection much less.
    println!(
        "cpu: untraced/traced={:.3} untraced/unrelated={:.3} (CPU per connection, client + server + tracer)",
        base_cost / median(&r.cost["traced"]),
        base_cost / median(&r.cost["unrelated"])
    );
}

/// conntrace tracing the churned port against the bpftrace peers that ran: throughput ratios
/// and CPU per connection.
pub fn against_bpftrace(r: &Results) {
    let peers: Vec<&str> = ["bpftrace", "bpftrace-hooks"]
        .into_iter()
        .filter(|m| r.rates.contains_key(m))
        .collect();
    if peers.is_empty() {
        return;
    }
    let traced = median(&r.rates["traced"]);
    let ratios: Vec<String> = peers
        .iter()
        .map(|m| format!("traced/{m}={:.3}", traced / median(&r.rates[m])))
        .collect();
    let cpu: Vec<String> = peers
        .iter()
        .map(|m| format!("{m} {:.1}", median(&r.cost[m])))
        .collect();
    println!(
        "vs bpftrace: {} (connections/s); CPU µs/connection: traced {:.1}, {}",
        ratios.join(" "),
        median(&r.cost["traced"]),
        cpu.join(", ")
    );
}

/// conntrace's kernel events, CPU, memory and losses in the `traced` phases, and what the
/// `bpftrace-hooks` peer counted.
pub fn traced(r: &Results) {
    let t = &r.traced;
    println!(
        "conntrace while traced: {:.0} kernel events/s ({:.1} per connection), {:.1}% of one core, peak RSS {:.1} MiB, {} lost",
        median(&t.events_per_s),
        median(&t.events_per_conn),
        median(&t.cpu_pct),
        t.peak_rss,
        t.lost
    );
    if let Some(hits) = &t.hook_hits {
        let list: Vec<String> = hits.iter().map(|(p, n)| format!("{p} {n:.2}")).collect();
        println!(
            "bpftrace-hooks counted per connection (first phase, after its port filters): {}",
            list.join(", ")
        );
    }
}

/// Every mode's undisturbed rate and its ratio to untraced, then the floors (whichever of
/// the two ran), then the last line.
pub fn undisturbed_rates(r: &Results) {
    let list: Vec<String> = r
        .slices
        .keys()
        .map(|m| format!("{m} {:.0} ({})", r.undisturbed(m), r.ratio(m, "untraced")))
        .collect();
    println!(
        "undisturbed rate (p{:.0} of a mode's {SLICE_MS} ms slices, {} of them; ratio to untraced, with the 95% interval of phases resampled): {}",
        UNDISTURBED * 100.0,
        r.slices["untraced"].iter().map(Vec::len).sum::<usize>(),
        list.join(", ")
    );
    if let Some(line) = floor_line(r) {
        println!("{line}");
    }
    println!(
        "bench: traced/untraced={:.3} unrelated/untraced={:.3} lost={}",
        r.undisturbed("traced") / r.undisturbed("untraced"),
        r.undisturbed("unrelated") / r.undisturbed("untraced"),
        r.traced.lost
    );
}

/// The floor modes that ran: each against untraced, and conntrace against each (the churned
/// port against `floor`, another port against `floor-unrelated`), with intervals.
fn floor_line(r: &Results) -> Option<String> {
    let mut parts = Vec::new();
    let mut cpu = Vec::new();
    for (floor, traced) in [("floor", "traced"), ("floor-unrelated", "unrelated")] {
        if !r.slices.contains_key(floor) {
            continue;
        }
        parts.push(format!(
            "{floor}/untraced={} {traced}/{floor}={}",
            r.ratio(floor, "untraced"),
            r.ratio(traced, floor)
        ));
        cpu.push(format!("{floor} {:.1}", median(&r.cost[floor])));
    }
    (!parts.is_empty()).then(|| {
        format!(
            "floor (an empty program on each of conntrace's hooks, undisturbed rates, 95% intervals): {}; CPU µs/connection {}",
            parts.join(" "),
            cpu.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results(modes: &[(&'static str, f64)]) -> Results {
        let mut r = Results::default();
        for &(mode, rate) in modes {
            r.rates.insert(mode, vec![rate; 3]);
            r.cost.insert(mode, vec![1e6 / rate; 3]);
            r.slices.insert(mode, vec![vec![rate; 4]; 3]);
        }
        r
    }

    #[test]
    fn the_floor_line_has_whichever_floor_ran() {
        let none = results(&[("untraced", 100.0), ("traced", 90.0), ("unrelated", 95.0)]);
        assert_eq!(floor_line(&none), None);
        let one = results(&[
            ("untraced", 100.0),
            ("traced", 90.0),
            ("unrelated", 95.0),
            ("floor", 96.0),
        ]);
        let line = floor_line(&one).expect("a floor line");
        assert!(
            line.contains("floor/untraced=0.960 (0.960 to 0.960) traced/floor=0.938"),
            "{line}"
        );
        assert!(!line.contains("floor-unrelated"), "{line}");
        let both = results(&[
            ("untraced", 100.0),
            ("traced", 90.0),
            ("unrelated", 95.0),
            ("floor", 96.0),
            ("floor-unrelated", 98.0),
        ]);
        let line = floor_line(&both).expect("a floor line");
        assert!(
            line.contains(
                "floor-unrelated/untraced=0.980 (0.980 to 0.980) unrelated/floor-unrelated=0.969"
            ),
            "{line}"
        );
        assert!(
            line.ends_with("CPU µs/connection floor 10416.7, floor-unrelated 10204.1"),
            "{line}"
        );
    }
}
