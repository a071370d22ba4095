//! Runs a firewall listing tool (`nft`, `iptables-nft-save`, `iptables-legacy-save`, ...) inside
//! a network namespace: the child joins the namespace with `setns(CLONE_NEWNET)` between fork
//! and exec, so conntrace itself never changes namespace. Also finds the namespaces to look in.

use std::{
    fs::File,
    io::{self, Read},
    os::{
        fd::{AsRawFd as _, BorrowedFd},
        unix::{fs::MetadataExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};
use tracing::debug;

/// The tools answer in milliseconds; a hung one is killed after this.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(2);

/// A listing command: program, arguments, and the Debian package that ships it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    pub program: &'static str,
    pub args: &'static [&'static str],
    pub package: &'static str,
}

/// `nft -a list ruleset`: every nftables table, with rule handles and counters.
pub const NFT: Tool = Tool {
    program: "nft",
    args: &["-a", "list", "ruleset"],
    package: "nftables",
};
/// `iptables-nft-save -c`: the `ip` tables iptables-nft manages, as iptables rules with
/// `[packets:bytes]` counters and their comments (which `nft` does not print).
pub const IPTABLES_NFT_SAVE: Tool = Tool {
    program: "iptables-nft-save",
    args: &["-c"],
    package: "iptables",
};
pub const IP6TABLES_NFT_SAVE: Tool = Tool {
    program: "ip6tables-nft-save",
    args: &["-c"],
    package: "iptables",
};
/// `iptables-legacy-save -c`: the x_tables (iptables-legacy) rules, invisible to `nft`. It
/// dumps only the tables listed in the namespace's `/proc/net/ip_tables_names`, so it creates
/// none.
pub const IPTABLES_LEGACY_SAVE: Tool = Tool {
    program: "iptables-legacy-save",
    args: &["-c"],
    package: "iptables",
};
pub const IP6TABLES_LEGACY_SAVE: Tool = Tool {
    program: "ip6tables-legacy-save",
    args: &["-c"],
    package: "iptables",
};

impl Tool {
    /// The command line as an operator would type it: `nft -a list ruleset`.
    pub fn command(&self) -> String {
        std::iter::once(self.program)
            .chain(self.args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The program from PATH, else from the sbin directories a service's PATH may lack;
    /// `None` when it is nowhere.
    fn path(&self) -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let sbin = ["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from);
        std::env::split_paths(&path)
            .chain(sbin)
            .map(|dir| dir.join(self.program))
            .find(|p| p.is_file())
    }
}

/// Why a tool gave no listing. Each names the command and, where one exists, the namespace.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("`{program}` not found: install {package}")]
    NotFound {
        program: &'static str,
        package: &'static str,
    },
    #[error("setns(CLONE_NEWNET) into {path} for `{command}`: {source}", path = path.display())]
    Setns {
        command: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("run `{command}` in netns {netns}: {source}")]
    Spawn {
        command: String,
        netns: u32,
        source: io::Error,
    },
    #[error("wait for `{command}` in netns {netns}: {source}")]
    Wait {
        command: String,
        netns: u32,
        source: io::Error,
    },
    #[error("`{command}` in netns {netns} ran over {}s: killed", TOOL_TIMEOUT.as_secs())]
    Timeout { command: String, netns: u32 },
    #[error("`{command}` in netns {netns} ({status}): {stderr}")]
    Failed {
        command: String,
        netns: u32,
        status: ExitStatus,
        stderr: String,
    },
}

impl ToolError {
    /// Whether every later run of the same tool would fail the same way (missing, hanging):
    /// start-up stops trying it in other namespaces.
    pub fn is_hopeless(&self) -> bool {
        matches!(self, Self::NotFound { .. } | Self::Timeout { .. })
    }
}

/// Runs `tool` inside namespace `ns` (inode `netns`, opened from `path`) and returns its
/// standard output, lossily decoded. Blocks for the run (milliseconds; killed after
/// [`TOOL_TIMEOUT`]). A non-zero exit is [`ToolError::Failed`] with the trimmed stderr, even
/// when some output came (iptables-nft-save prints a partial listing when it cannot parse a
/// rule).
pub fn run_in(netns: u32, path: &Path, ns: &File, tool: Tool) -> Result<String, ToolError> {
    let command = tool.command();
    let program = tool.path().ok_or(ToolError::NotFound {
        program: tool.program,
        package: tool.package,
    })?;
    let spawn_error = |source| ToolError::Spawn {
        command: command.clone(),
        netns,
        source,
    };
    // The child writes one byte here when setns fails, to tell that from a failed exec.
    let (mut marker, marker_tx) = io::pipe().map_err(spawn_error)?;
    let (ns_fd, marker_fd) = (ns.as_raw_fd(), marker_tx.as_raw_fd());
    let mut child = Command::new(program);
    child
        .args(tool.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: runs in the forked child before exec and only makes async-signal-safe system
    // calls (setns, write) on descriptors the parent keeps open until spawn returns.
    unsafe {
        child.pre_exec(move || {
            setns(BorrowedFd::borrow_raw(ns_fd), CloneFlags::CLONE_NEWNET).map_err(|errno| {
                // If this write fails, the parent reports a failed spawn instead.
                libc::write(marker_fd, b"s".as_ptr().cast(), 1);
                io::Error::from(errno)
            })
        })
    };
    let spawned = child.spawn();
    drop(marker_tx);
    let child = match spawned {
        Ok(child) => child,
        Err(source) => {
            let mut byte = [0u8; 1];
            return Err(match marker.read(&mut byte) {
                Ok(1) => ToolError::Setns {
                    command,
                    path: path.to_owned(),
                    source,
                },
                _ => spawn_error(source),
            });
        }
    };
    let (status, out, err) = collect(child, netns, &command)?;
    if !status.success() {
        return Err(ToolError::Failed {
            command,
            netns,
            status,
            stderr: String::from_utf8_lossy(&err).trim().to_owned(),
        });
    }
    debug!(netns, command, bytes = out.len(), "firewall listed");
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Waits for `child` (killing it after [`TOOL_TIMEOUT`]) while reading both pipes, so a large
/// listing cannot fill a pipe and stall it: (exit status, stdout, stderr).
fn collect(
    mut child: std::process::Child,
    netns: u32,
    command: &str,
) -> Result<(ExitStatus, Vec<u8>, Vec<u8>), ToolError> {
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            pipe.map_or(Ok(0), |mut p| p.read_to_end(&mut bytes))
                .map(|_| bytes)
        })
    };
    let out = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let err = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let wait_error = |source| ToolError::Wait {
        command: command.to_owned(),
        netns,
        source,
    };
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(wait_error)? {
            break status;
        }
        if started.elapsed() > TOOL_TIMEOUT {
            // The readers end by themselves when the pipes close.
            child.kill().map_err(wait_error)?;
            child.wait().map_err(wait_error)?;
            return Err(ToolError::Timeout {
                command: command.to_owned(),
                netns,
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let joined = |reader: std::thread::JoinHandle<io::Result<Vec<u8>>>| {
        let read = reader
            .join()
            .map_err(|_| io::Error::other("pipe reader panicked"));
        read.and_then(|r| r).map_err(wait_error)
    };
    Ok((status, joined(out)?, joined(err)?))
}

/// Whether the namespace behind `path` certainly has no iptables-legacy table of the family:
/// for `/proc/PID/ns/net`, `/proc/PID/net/ip_tables_names` (`ip6_tables_names`) is empty or
/// absent. `false` when unknown (a `/run/netns` name has no process to look through): then
/// the legacy tool is run.
pub fn no_legacy_tables(path: &Path, ipv6: bool) -> bool {
    let Some(pid) = path
        .strip_prefix("/proc")
        .ok()
        .and_then(|p| p.components().next())
        .and_then(|c| c.as_os_str().to_str())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
    else {
        return false;
    };
    let names = if ipv6 {
        "ip6_tables_names"
    } else {
        "ip_tables_names"
    };
    match std::fs::read_to_string(format!("/proc/{pid}/net/{names}")) {
        Ok(text) => text.trim().is_empty(),
        Err(error) => error.kind() == io::ErrorKind::NotFound,
    }
}

/// Opens `path` and checks that it still is namespace `netns` (a PID may have been reused):
/// `Ok(None)` when it is another namespace now.
pub fn open_netns(netns: u32, path: &Path) -> io::Result<Option<File>> {
    let ns = File::open(path)?;
    let ino = ns.metadata()?.ino();
    Ok((ino == u64::from(netns)).then_some(ns))
}
