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

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

use crate::{kernel::LoadError, output::OutputError, run::RunError};

/// Exit codes (documented in the README).
mod exit {
    pub const RUNTIME: u8 = 1;
    // 2: usage errors, returned by clap itself.
    pub const PRIVILEGES: u8 = 3;
    pub const UNSUPPORTED_KERNEL: u8 = 4;
}

/// Capabilities conntrace needs when not run as root (README, "Requirements"): loading and
/// attaching the programs, reading kernel memory from them, netlink and `nft`, and tracefs
/// (mode 0700). CAP_SYS_ADMIN, which covers them all, is also what entering other network
/// namespaces needs (rule counters, listen queues).
const CAPS: &[(u32, &str)] = &[
    (39, "CAP_BPF"),
    (38, "CAP_PERFMON"),
    (12, "CAP_NET_ADMIN"),
    (2, "CAP_DAC_READ_SEARCH"),
];
const CAP_SYS_ADMIN: u32 = 21;

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

fn missing_caps() -> Vec<&'static str> {
    let eff = effective_caps();
    if eff & (1 << CAP_SYS_ADMIN) != 0 {
        return Vec::new();
    }
    CAPS.iter()
        .filter(|(bit, _)| eff & (1 << bit) == 0)
        .map(|(_, n)| *n)
        .collect()
}

/// Run with file capabilities (setcap) instead of root, the children conntrace starts (`nft`,
/// to read rule counters) would not inherit CAP_NET_ADMIN: raise it into the inheritable and
/// ambient sets of this thread, the one that starts them. Root needs nothing of the kind.
fn pass_net_admin_to_children() {
    use caps::{CapSet, Capability};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return;
    }
    let raised = caps::raise(None, CapSet::Inheritable, Capability::CAP_NET_ADMIN)
        .and_then(|()| caps::raise(None, CapSet::Ambient, Capability::CAP_NET_ADMIN));
    if let Err(error) = raised {
        tracing::warn!(%error, "cannot pass CAP_NET_ADMIN to `nft`: firewall rules will not be named");
    }
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
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

    let missing = missing_caps();
    if missing.is_empty() {
        pass_net_admin_to_children();
    } else {
        eprintln!(
            "conntrace: missing privileges: run as root, or give the binary {} (and CAP_SYS_ADMIN to name firewall rules and listen queues in other namespaces) with setcap; see README, \"Requirements\"",
            missing.join(", ")
        );
        return ExitCode::from(exit::PRIVILEGES);
    }

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
