//! What conntrace's own programs cost the kernel (`--bpf-stats`), from the kernel's BPF run-time
//! statistics.
//!
//! The kernel counts each program's runs and run time only while statistics are enabled. They
//! are enabled with `bpf(BPF_ENABLE_STATS)`, which returns a file descriptor: statistics stay
//! on while any such descriptor is open, so they end with conntrace, even when it is killed, and
//! the machine's own setting (`kernel.bpf_stats_enabled`) is never written. While on, the kernel
//! reads the clock around every run of every BPF program on the machine (a few tens of ns).

use std::os::fd::OwnedFd;

use schemars::JsonSchema;
use serde::Serialize;

use super::Tracer;

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error(
        "enable the kernel's BPF run-time statistics (bpf(BPF_ENABLE_STATS)): {0}; it needs CAP_SYS_ADMIN and Linux 5.8 or later"
    )]
    Enable(#[source] std::io::Error),
    #[error(
        "read the run-time statistics of program {program} (bpf(BPF_OBJ_GET_INFO_BY_FD)): {source}"
    )]
    Read {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
}

/// The kernel's BPF run-time statistics, on while this value lives (it holds the descriptor
/// `bpf(BPF_ENABLE_STATS)` returned).
#[derive(Debug)]
pub struct RunTimeStats {
    _fd: OwnedFd,
}

impl RunTimeStats {
    pub fn enable() -> Result<Self, StatsError> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map(|fd| Self { _fd: fd })
            .map_err(|e| StatsError::Enable(e.io_error))
    }
}

/// One program's runs and run time since it was loaded (counted while statistics were on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct ProgramCost {
    /// The program's name, as in the `ready` record's `programs`.
    pub program: &'static str,
    /// How often the kernel ran it.
    pub runs: u64,
    /// Nanoseconds it ran in all (the kernel's `run_time_ns`).
    pub run_ns: u64,
}

impl Tracer {
    /// Runs and run time of every active program, in the `ready` record's order. Counted only
    /// while [`RunTimeStats`] are on (else zeros).
    pub fn program_costs(&self) -> Result<Vec<ProgramCost>, StatsError> {
        let mut costs: Vec<ProgramCost> = Vec::with_capacity(self.active.len());
        for active in &self.active {
            if costs.iter().any(|c| c.program == active.name) {
                continue;
            }
            let info = self
                .ebpf
                .program(active.name)
                .ok_or(aya::programs::ProgramError::NotLoaded)
                .and_then(aya::programs::Program::info)
                .map_err(|source| StatsError::Read {
                    program: active.name,
                    source,
                })?;
            costs.push(ProgramCost {
                program: active.name,
                runs: info.run_count(),
                run_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
            });
        }
        Ok(costs)
    }
}
