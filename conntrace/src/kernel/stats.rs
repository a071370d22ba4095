//! What conntrace's own programs cost the kernel (`--bpf-stats`), from the kernel's BPF run-time
//! statistics.
//!
//! The kernel counts each program's runs and run time only while statistics are enabled. They
//! are enabled with `bpf(BPF_ENABLE_STATS)`, which returns a file descriptor: statistics stay
//! on while any such descriptor is open, so they end with conntrace, even when it is killed, and
//! the machine's own setting (`kernel.bpf_stats_enabled`) is never written. While on, the kernel
//! reads the clock around every run of every BPF program on the machine (a few tens of ns).

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
};

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
    #[error(
        "read the recursion misses of program {program} (bpf(BPF_OBJ_GET_INFO_BY_FD)): {source}"
    )]
    Misses {
        program: &'static str,
        #[source]
        source: std::io::Error,
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
        self.programs()
            .map(|found| {
                let (program, loaded) = found?;
                let info = loaded
                    .info()
                    .map_err(|source| StatsError::Read { program, source })?;
                Ok(ProgramCost {
                    program,
                    runs: info.run_count(),
                    run_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                })
            })
            .collect()
    }

    /// How often the kernel skipped each active program because that program was already
    /// running on the CPU (the kernel's `recursion_misses`, counted since 5.12 whatever the
    /// statistics setting): a state change in softirq context on top of a process's state
    /// change, say. Each miss is an event conntrace never saw. Programs without any are not
    /// listed. Errors: `bpf(BPF_OBJ_GET_INFO_BY_FD)` (a kernel before 5.12 reports none).
    pub fn program_misses(&self) -> Result<BTreeMap<&'static str, u64>, StatsError> {
        let mut misses = BTreeMap::new();
        for found in self.programs() {
            let (program, loaded) = found?;
            let fd = loaded
                .fd()
                .map_err(|source| StatsError::Read { program, source })?;
            let n = recursion_misses(fd.as_fd().as_raw_fd())
                .map_err(|source| StatsError::Misses { program, source })?;
            if n > 0 {
                misses.insert(program, n);
            }
        }
        Ok(misses)
    }

    /// Each active program once (a program attached at several hooks is one), in the `ready`
    /// record's order, with its loaded self. Errors: one not loaded (never, for a name in
    /// `active`).
    fn programs(
        &self,
    ) -> impl Iterator<Item = Result<(&'static str, &aya::programs::Program), StatsError>> {
        self.active
            .iter()
            .enumerate()
            .filter(|(i, a)| !self.active[..*i].iter().any(|b| b.name == a.name))
            .map(|(_, a)| {
                let loaded = self.ebpf.program(a.name).ok_or(StatsError::Read {
                    program: a.name,
                    source: aya::programs::ProgramError::NotLoaded,
                })?;
                Ok((a.name, loaded))
            })
    }
}

/// `bpf_prog_info.recursion_misses` of the program behind `fd` (0 where the kernel's struct
/// ends before it).
fn recursion_misses(fd: std::os::fd::RawFd) -> std::io::Result<u64> {
    use aya_obj::generated::bpf_prog_info;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // SAFETY: a plain-data C struct; all zeroes is a valid value.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: fd as u32,
        info_len: size_of::<bpf_prog_info>() as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: the `info` member of `union bpf_attr`; the kernel writes at most `info_len`
    // bytes to `info`.
    unsafe { super::sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    let end = std::mem::offset_of!(bpf_prog_info, recursion_misses) + size_of::<u64>();
    Ok(if (attr.info_len as usize) >= end {
        info.recursion_misses
    } else {
        0
    })
}
