//! What conntrace's own eBPF programs cost the kernel, as metrics (`--bpf-stats` only):
//! `conntrace_bpf_program_run_seconds_total{program}` and
//! `conntrace_bpf_program_runs_total{program}`, from the kernel's BPF run-time statistics.
//! The run loop sets the latest readings; without `--bpf-stats` none are ever set and neither
//! metric is exposed.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter},
    registry::Unit,
};

use crate::kernel::stats::ProgramCost;

const RUN_TIME_HELP: &str = "Time the kernel spent running this conntrace eBPF program, from the kernel's bpf_stats (run_time_ns); only collected with --bpf-stats.";
const RUNS_HELP: &str = "Runs of this conntrace eBPF program, from the kernel's bpf_stats (run_cnt); only collected with --bpf-stats.";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: String,
}

/// The latest per-program readings, shared between the run loop and the metrics server.
#[derive(Debug, Clone, Default)]
pub struct ProgramCosts(Arc<Mutex<Option<Vec<ProgramCost>>>>);

impl ProgramCosts {
    /// Replaces the readings (the kernel's totals since each program was loaded).
    pub fn set(&self, costs: Vec<ProgramCost>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(costs);
    }
}

impl Collector for ProgramCosts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let costs = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(costs) = costs.as_ref() else {
            return Ok(());
        };
        let seconds = Unit::Seconds;
        {
            let mut family = encoder.encode_descriptor(
                "bpf_program_run",
                RUN_TIME_HELP,
                Some(&seconds),
                MetricType::Counter,
            )?;
            for c in costs {
                let labels = ProgramLabels {
                    program: c.program.to_owned(),
                };
                ConstCounter::new(c.run_ns as f64 / 1e9).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family =
            encoder.encode_descriptor("bpf_program_runs", RUNS_HELP, None, MetricType::Counter)?;
        for c in costs {
            let labels = ProgramLabels {
                program: c.program.to_owned(),
            };
            ConstCounter::new(c.runs).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Metrics;
    use crate::kernel::stats::ProgramCost;

    /// The `conntrace_bpf_program_*` part of the exposition.
    fn bpf_lines(text: &str) -> String {
        text.lines()
            .filter(|l| l.contains("conntrace_bpf_program"))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    #[test]
    fn absent_without_bpf_stats() {
        let text = Metrics::new(4096, false, None).encode();
        assert_eq!(bpf_lines(&text), "", "{text}");
    }

    #[test]
    fn run_time_and_runs_per_program() {
        let m = Metrics::new(4096, false, None);
        m.set_program_costs(vec![
            ProgramCost {
                program: "inet_sock_set_state",
                runs: 800_000,
                run_ns: 196_000_000,
            },
            ProgramCost {
                program: "kfree_skb",
                runs: 3,
                run_ns: 1_500,
            },
        ]);
        let text = m.encode();
        assert_eq!(
            bpf_lines(&text),
            r#"# HELP conntrace_bpf_program_run_seconds Time the kernel spent running this conntrace eBPF program, from the kernel's bpf_stats (run_time_ns); only collected with --bpf-stats.
# TYPE conntrace_bpf_program_run_seconds counter
# UNIT conntrace_bpf_program_run_seconds seconds
conntrace_bpf_program_run_seconds_total{program="inet_sock_set_state"} 0.196
conntrace_bpf_program_run_seconds_total{program="kfree_skb"} 0.0000015
# HELP conntrace_bpf_program_runs Runs of this conntrace eBPF program, from the kernel's bpf_stats (run_cnt); only collected with --bpf-stats.
# TYPE conntrace_bpf_program_runs counter
conntrace_bpf_program_runs_total{program="inet_sock_set_state"} 800000
conntrace_bpf_program_runs_total{program="kfree_skb"} 3
"#
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
