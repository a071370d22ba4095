//! conntrace: names the kernel's reason for every failed or stalled TCP connection.

mod cli;
mod engine;
mod explain;
mod host;
mod identity;
mod kernel;
mod merge;
mod output;
mod run;

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

use crate::{kernel::LoadError, output::OutputError, run::RunError};

/// Exit codes (documented in the README).
mod exit {
    pub const RUNTIME: u8 = 1;
    // 2: usage errors, returned by clap itself.
    pub const PRIVILEGES: u8 = 3;
    pub const UNSUPPORTED_KERNEL: u8 = 4;
}

/// A capability conntrace uses when not run as root (README, "Requirements"), and what for.
struct Need {
    bit: u32,
    name: &'static str,
    /// What it is for, or what is missing without it.
    why: &'static str,
}

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYSLOG: u32 = 34;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Without these conntrace cannot trace at all: it exits 3. CAP_SYS_ADMIN also covers the
/// first two (the kernel's `bpf_capable()` and `perfmon_capable()`).
const TRACE: &[Need] = &[
    Need {
        bit: CAP_BPF,
        name: "CAP_BPF",
        why: "load the eBPF programs and maps",
    },
    Need {
        bit: CAP_PERFMON,
        name: "CAP_PERFMON",
        why: "attach them to tracepoints and let them read kernel memory",
    },
];

/// Needed only when tracefs is not readable as it is (mode 0700, owned by root).
const TRACEFS: Need = Need {
    bit: CAP_DAC_READ_SEARCH,
    name: "CAP_DAC_READ_SEARCH",
    why: "read tracefs (0700 root): tracepoint ids and formats",
};

/// Needed where the kernel lets only CAP_SYS_ADMIN call perf_event_open(2) (Debian's and
/// Ubuntu's kernels at `kernel.perf_event_paranoid` 3, their default): the classic tracepoints
/// are attached through it.
const PERF_RESTRICTED: Need = Need {
    bit: CAP_SYS_ADMIN,
    name: "CAP_SYS_ADMIN",
    why: "attach to tracepoints: this kernel allows perf_event_open(2) only with CAP_SYS_ADMIN (kernel.perf_event_paranoid above 2 on Debian's kernels; `sysctl kernel.perf_event_paranoid=2` lifts it)",
};

/// Without these conntrace traces, but names less: each one's `why` says what is missing.
const NAMING: &[Need] = &[
    Need {
        bit: CAP_NET_ADMIN,
        name: "CAP_NET_ADMIN",
        why: "firewall rules are not named (`nft` needs it)",
    },
    Need {
        bit: CAP_NET_RAW,
        name: "CAP_NET_RAW",
        why: "iptables-legacy rules are not named (`iptables-legacy-save` opens a raw socket)",
    },
    Need {
        bit: CAP_SYS_ADMIN,
        name: "CAP_SYS_ADMIN",
        why: "rules and listen queues of other network namespaces are not named (setns)",
    },
    Need {
        bit: CAP_SYS_PTRACE,
        name: "CAP_SYS_PTRACE",
        why: "namespaces known only through other users' processes (/proc/PID/ns/net, e.g. containers') are not found",
    },
    Need {
        bit: CAP_SYSLOG,
        name: "CAP_SYSLOG",
        why: "drop locations and netfilter hooks are not named (/proc/kallsyms hides addresses: kptr_restrict, perf_event_paranoid >= 2)",
    },
];

/// Effective capability set of this process (capget(2)).
fn effective_caps() -> u64 {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a v3 header and room for two data structs, as capget(2) requires.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    u64::from(data[0].effective) | (u64::from(data[1].effective) << 32)
}

/// False when tracefs's event directory exists but this process may not list it (tried, not
/// guessed from the capabilities: root owns it, and CAP_SYS_ADMIN does not bypass file
/// permissions). Not mounted at all is a kernel problem (exit 4), not a privilege one.
fn tracefs_readable() -> bool {
    let mut denied = false;
    for dir in [
        "/sys/kernel/tracing/events",
        "/sys/kernel/debug/tracing/events",
    ] {
        match std::fs::read_dir(dir) {
            Ok(_) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => denied = true,
            Err(_) => {}
        }
    }
    !denied
}

/// Whether effective capability set `eff` (capget(2)'s bits) holds capability `bit`.
fn has_cap(eff: u64, bit: u32) -> bool {
    eff & (1 << bit) != 0
}

/// True when this process may not open a system-wide perf event although the kernel's own
/// rules would let its capabilities (`eff`) do so: Debian's restriction (perf_event_open(2)
/// fails with EACCES for all but CAP_SYS_ADMIN when `kernel.perf_event_paranoid` is above 2),
/// found by trying a disabled software dummy event on CPU 0 (opened and closed at once).
fn perf_events_restricted(eff: u64) -> bool {
    if has_cap(eff, CAP_SYS_ADMIN) || !has_cap(eff, CAP_PERFMON) {
        // CAP_SYS_ADMIN passes the restriction; without CAP_PERFMON tracing is refused anyway.
        return false;
    }
    use conntrace_common::perf::{PERF_FLAG_FD_CLOEXEC, PERF_TYPE_SOFTWARE, PerfEventAttrV0};
    const PERF_COUNT_SW_DUMMY: u64 = 9;
    const DISABLED: u64 = 1;
    let attr = PerfEventAttrV0 {
        kind: PERF_TYPE_SOFTWARE,
        size: size_of::<PerfEventAttrV0>() as u32,
        config: PERF_COUNT_SW_DUMMY,
        flags: DISABLED,
        ..PerfEventAttrV0::default()
    };
    // SAFETY: perf_event_open(2) with a valid VER0 attr; pid -1, cpu 0: every task on CPU 0;
    // no group; the fd it returns is closed below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &raw const attr,
            -1,
            0,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd >= 0 {
        // SAFETY: closes the descriptor just opened, owned by no one else.
        unsafe { libc::close(fd as i32) };
        return false;
    }
    std::io::Error::last_os_error().raw_os_error() == Some(libc::EACCES)
}

/// True when /proc/kallsyms shows this process real addresses.
fn kallsyms_addresses_visible() -> bool {
    let mut head = [0u8; 16];
    std::fs::File::open("/proc/kallsyms")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok_and(|()| {
            head.iter()
                .take_while(|b| b.is_ascii_hexdigit())
                .any(|&b| b != b'0')
        })
}

/// What the effective set `eff` lacks: the capabilities without which conntrace cannot trace,
/// and those without which it names less. `tracefs_ok` and `kallsyms_ok` say whether tracefs
/// and kallsyms addresses are readable already (then their capabilities are not needed);
/// `perf_restricted` whether perf_event_open(2) needs CAP_SYS_ADMIN here
/// ([`perf_events_restricted`]).
fn missing_caps(
    eff: u64,
    tracefs_ok: bool,
    kallsyms_ok: bool,
    perf_restricted: bool,
) -> (Vec<&'static Need>, Vec<&'static Need>) {
    let has = |bit: u32| has_cap(eff, bit);
    let mut trace: Vec<&Need> = TRACE
        .iter()
        .filter(|n| !has(n.bit) && !has(CAP_SYS_ADMIN))
        .collect();
    if !tracefs_ok && !has(TRACEFS.bit) {
        trace.push(&TRACEFS);
    }
    let perf = perf_restricted && !has(CAP_SYS_ADMIN);
    if perf {
        trace.push(&PERF_RESTRICTED);
    }
    // CAP_SYSLOG only matters when kallsyms hides the addresses from this process; a
    // CAP_SYS_ADMIN needed to trace is named there only.
    let not_needed = |n: &Need| {
        has(n.bit) || (n.bit == CAP_SYSLOG && kallsyms_ok) || (n.bit == CAP_SYS_ADMIN && perf)
    };
    let naming = NAMING.iter().filter(|n| !not_needed(n)).collect();
    (trace, naming)
}

fn names(needs: &[&Need]) -> String {
    needs.iter().map(|n| n.name).collect::<Vec<_>>().join(", ")
}

/// The one-line privilege error (exit 3): what is missing to trace, and what else is missing
/// to name rules, namespaces and drop locations.
fn privilege_error(trace: &[&Need], naming: &[&Need]) -> String {
    let mut msg = format!(
        "conntrace: missing privileges: {} needed to trace ({})",
        names(trace),
        trace.iter().map(|n| n.why).collect::<Vec<_>>().join("; ")
    );
    if !naming.is_empty() {
        msg += &format!(
            "; {} needed to name rules, namespaces and drop locations",
            names(naming)
        );
    }
    msg + ": run as root, or give the binary `setcap cap_bpf,cap_perfmon,cap_dac_read_search,cap_net_admin,cap_net_raw,cap_sys_admin,cap_sys_ptrace,cap_syslog+ep`; see README, \"Requirements\""
}

/// Run with file capabilities (setcap) instead of root, the children conntrace starts to read
/// rule counters would not inherit what they need: `nft` and `iptables-*-save` CAP_NET_ADMIN,
/// `iptables-legacy-save` also CAP_NET_RAW (its raw socket) and CAP_DAC_READ_SEARCH
/// (`/proc/net/ip_tables_names` is `0440 root`). Raise each one this process has into the
/// inheritable and ambient sets of this thread, the one that starts them. Root needs nothing
/// of the kind.
fn pass_caps_to_children(eff: u64) {
    use caps::{CapSet, Capability};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return;
    }
    let wanted = [
        (CAP_NET_ADMIN, Capability::CAP_NET_ADMIN),
        (CAP_NET_RAW, Capability::CAP_NET_RAW),
        (CAP_DAC_READ_SEARCH, Capability::CAP_DAC_READ_SEARCH),
    ];
    for (bit, cap) in wanted {
        if !has_cap(eff, bit) {
            continue;
        }
        let raised = caps::raise(None, CapSet::Inheritable, cap)
            .and_then(|()| caps::raise(None, CapSet::Ambient, cap));
        if let Err(error) = raised {
            tracing::warn!(%error, "cannot pass {cap} to the firewall listing tools: rules may not be named");
        }
    }
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse_checked();
    if let Some(command) = &cli.command {
        return subcommand(command);
    }
    let default_level = match cli.verbose {
        0 => "conntrace=info",
        1 => "conntrace=debug",
        _ => "conntrace=trace",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .init();

    let eff = effective_caps();
    let (trace, naming) = missing_caps(
        eff,
        tracefs_readable(),
        kallsyms_addresses_visible(),
        perf_events_restricted(eff),
    );
    if !trace.is_empty() {
        eprintln!("{}", privilege_error(&trace, &naming));
        return ExitCode::from(exit::PRIVILEGES);
    }
    for need in &naming {
        tracing::warn!("without {}: {}", need.name, need.why);
    }
    pass_caps_to_children(eff);

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("conntrace: start the async runtime: {e}");
            return ExitCode::from(exit::RUNTIME);
        }
    };
    match runtime.block_on(run::run(&cli)) {
        Ok(()) | Err(RunError::Output(OutputError::Closed)) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code(&e);
            // anyhow only here, at the edge. Every error's message already names its cause,
            // so the top-level message is the whole story, on one line.
            eprintln!("conntrace: {}", anyhow::Error::from(e));
            ExitCode::from(code)
        }
    }
}

/// `explain` and `merge`: no kernel, no privileges.
fn subcommand(command: &cli::Command) -> ExitCode {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = match command {
        cli::Command::Explain { reason } => {
            explain::run(&mut out, reason.as_deref()).map_err(anyhow::Error::from)
        }
        cli::Command::Merge {
            files,
            max_skew,
            json,
        } => merge::run(files, *max_skew, *json, &mut out).map_err(anyhow::Error::from),
        cli::Command::Completions { shell } => {
            let mut cmd = <cli::Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "conntrace", &mut out);
            Ok(())
        }
        cli::Command::Schema => serde_json::to_writer_pretty(&mut out, &output::record::schema())
            .map_err(anyhow::Error::from)
            .and_then(|()| std::io::Write::write_all(&mut out, b"\n").map_err(Into::into)),
        cli::Command::Man => {
            let cmd = <cli::Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .map_err(|e| anyhow::Error::from(e).context("render the man page"))
        }
    };
    let result = result.and_then(|()| std::io::Write::flush(&mut out).map_err(Into::into));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("conntrace: {e:#}");
            ExitCode::from(exit::RUNTIME)
        }
    }
}

/// A reader that closed the pipe (`| head`) ends the output normally.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn exit_code(e: &RunError) -> u8 {
    match e {
        RunError::Load(
            LoadError::Btf(_)
            | LoadError::Layout(_)
            | LoadError::KernelRelease(_)
            | LoadError::Required { .. },
        ) => exit::UNSUPPORTED_KERNEL,
        _ => exit::RUNTIME,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = (1 << CAP_BPF)
        | (1 << CAP_PERFMON)
        | (1 << CAP_NET_ADMIN)
        | (1 << CAP_NET_RAW)
        | (1 << CAP_SYS_ADMIN)
        | (1 << CAP_SYS_PTRACE)
        | (1 << CAP_SYSLOG)
        | (1 << CAP_DAC_READ_SEARCH);

    fn missing(eff: u64, tracefs_ok: bool, kallsyms_ok: bool) -> (String, String) {
        let (trace, naming) = missing_caps(eff, tracefs_ok, kallsyms_ok, false);
        (names(&trace), names(&naming))
    }

    #[test]
    fn the_documented_set_misses_nothing() {
        assert_eq!(missing(ALL, false, false), (String::new(), String::new()));
    }

    #[test]
    fn nothing_at_all_names_every_capability() {
        assert_eq!(
            missing(0, false, false),
            (
                "CAP_BPF, CAP_PERFMON, CAP_DAC_READ_SEARCH".to_owned(),
                "CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_SYSLOG".to_owned()
            )
        );
        let (trace, naming) = missing_caps(0, false, false, false);
        let line = privilege_error(&trace, &naming);
        assert!(!line.contains('\n'), "{line}");
        assert!(line.starts_with("conntrace: missing privileges: CAP_BPF, CAP_PERFMON, CAP_DAC_READ_SEARCH needed to trace (load the eBPF programs and maps; "), "{line}");
    }

    #[test]
    fn sys_admin_covers_bpf_and_perfmon_but_not_file_permissions() {
        let eff = ALL & !(1 << CAP_BPF) & !(1 << CAP_PERFMON) & !(1 << CAP_DAC_READ_SEARCH);
        assert_eq!(missing(eff, true, true), (String::new(), String::new()));
        // tracefs unreadable: CAP_SYS_ADMIN does not help.
        assert_eq!(missing(eff, false, true).0, "CAP_DAC_READ_SEARCH");
    }

    #[test]
    fn where_perf_events_are_restricted_sys_admin_is_needed_to_trace_and_named_once() {
        let eff = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_DAC_READ_SEARCH);
        let (trace, naming) = missing_caps(eff, true, true, true);
        assert_eq!(names(&trace), "CAP_SYS_ADMIN");
        assert_eq!(names(&naming), "CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_PTRACE");
        let line = privilege_error(&trace, &naming);
        assert!(
            line.starts_with("conntrace: missing privileges: CAP_SYS_ADMIN needed to trace (attach to tracepoints: this kernel allows perf_event_open(2) only with CAP_SYS_ADMIN"),
            "{line}"
        );
        // With CAP_SYS_ADMIN nothing changes.
        assert_eq!(missing(ALL, true, true), (String::new(), String::new()));
        let (trace, _) = missing_caps(ALL, true, true, true);
        assert!(trace.is_empty());
    }

    #[test]
    fn naming_capabilities_only_warn_and_syslog_only_when_kallsyms_hides_addresses() {
        let eff = (1 << CAP_BPF) | (1 << CAP_PERFMON);
        assert_eq!(
            missing(eff, true, true),
            (
                String::new(),
                "CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_ADMIN, CAP_SYS_PTRACE".to_owned()
            )
        );
        assert_eq!(
            missing(eff, true, false).1,
            "CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_SYSLOG"
        );
    }
}
