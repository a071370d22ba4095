//! Command-line interface.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use conntrace_common::DEFAULT_RING_BYTES;

/// Names the kernel's reason for every failed or stalled TCP connection.
///
/// conntrace attaches eBPF programs to the kernel's TCP tracepoints and prints one verdict per
/// failed or stalled connection (and per established one with --all), on whichever host it runs.
#[derive(Debug, Parser)]
#[command(
    name = "conntrace",
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// TCP port to trace (local or remote); repeatable and comma-separated. Default: every port.
    #[arg(short, long = "port", value_name = "PORT", value_delimiter = ',', value_parser = parse_port)]
    pub ports: Vec<u16>,

    /// Print JSON Lines (see docs/events.md) instead of readable lines.
    #[arg(long)]
    pub json: bool,

    /// Readable lines with every fact and the advice on each verdict's line, instead of one
    /// compact line per verdict (cut to 120 columns on a terminal) with each advice once.
    #[arg(long, conflicts_with = "json")]
    pub wide: bool,

    /// Write records to FILE instead of stdout: created with mode 0600, or emptied first when
    /// it exists (like a shell's `>`).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Stop after this long (e.g. 30s, 500ms, 5m). Default: until SIGINT or SIGTERM.
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// How long an established connection may go without receiving data (client) or being
    /// accepted (server) before it is reported stalled: 100ms to 30m, or 0 to turn stall
    /// verdicts off.
    #[arg(long, value_name = "D", default_value = "3s", value_parser = parse_stall_timeout)]
    pub stall_timeout: Duration,

    /// Also print a verdict for every established connection.
    #[arg(long)]
    pub all: bool,

    /// Only this process should accept connections on the traced ports (e.g. mysqld);
    /// repeatable and comma-separated. Any other acceptor gives an `unexpected_listener`
    /// verdict. Compared by the kernel's comm: its first 15 bytes.
    #[arg(long = "expect-comm", value_name = "NAME", value_delimiter = ',', value_parser = parse_comm)]
    pub expect_comm: Vec<String>,

    /// Also print `drop` records for drops that are a normal part of TCP (the peer's FIN purged
    /// with a closed socket, window probes, retransmissions of data already received:
    /// QUEUE_PURGE, TCP_OLD_SEQUENCE, TCP_OLD_DATA). They are always counted in the summary.
    #[arg(long)]
    pub show_normal_drops: bool,

    /// Size of the kernel→userspace ring buffer in bytes (a power of two, at least 4096).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_RING_BYTES, value_parser = parse_ring_bytes)]
    pub ring_buffer_bytes: u32,

    /// Do not attach these capabilities (comma-separated), e.g. `syn-cookies` on a host whose
    /// packet rate makes a per-packet program unwelcome. `lifecycle` cannot be left out. The
    /// `ready` line lists what was left out under `unavailable`.
    #[arg(long, value_name = "CAPABILITY", value_delimiter = ',', value_enum)]
    pub without: Vec<crate::kernel::attach::Capability>,

    /// Which kernel hooks to use: `best` picks, per capability, the best path this kernel
    /// allows (fentry/fexit where they attach, tracepoints otherwise); `tracepoints` uses
    /// tracepoints only (and the root cgroup's `connect` hooks, which have no other form). The
    /// `ready` line shows the path each capability got.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = crate::kernel::attach::AttachMode::Best)]
    pub attach: crate::kernel::attach::AttachMode,

    /// How healthy connections are followed: `quiet` keeps them in the kernel (only failing,
    /// stalled or reset connections reach userspace, with their history: cheap enough to leave
    /// running through a load test); `streaming` sends every connection's events to userspace
    /// and attaches the accept()/connect() hooks (what `--all` and `--expect-comm` need, and
    /// what they choose). Default: quiet unless --all or --expect-comm is given.
    #[arg(long, value_name = "MODE", value_enum)]
    pub follow: Option<FollowArg>,

    /// The node (host) name written on every record as `node` and put on every metric as the
    /// label `node`, for a fleet of agents feeding one store. Default: the NODE_NAME
    /// environment variable (the DaemonSet sets it from the downward API); none when unset or
    /// empty.
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub node: Option<String>,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Also label the verdict and drop metrics with `container` (runtime:name) and `pod`
    /// (namespace/name). One series per container and reason: on a node whose containers come
    /// and go (Kubernetes), the series grow with every new container name until restart.
    #[arg(long, requires = "metrics_addr", conflicts_with = "no_containers")]
    pub metrics_container_labels: bool,

    /// Trace only this container's network namespace (its name as `container.name` shows it,
    /// or 12 or more leading digits of its id); repeatable and comma-separated. Containers that
    /// share the host's network namespace cannot be selected.
    #[arg(
        long = "container",
        value_name = "NAME",
        value_delimiter = ',',
        conflicts_with = "no_containers"
    )]
    pub containers: Vec<String>,

    /// Trace only this Kubernetes pod's network namespace; repeatable and comma-separated.
    #[arg(long = "pod", value_name = "NAMESPACE/NAME", value_delimiter = ',', value_parser = parse_pod, conflicts_with = "no_containers")]
    pub pods: Vec<(String, String)>,

    /// Docker Engine API socket to name containers with (Docker, or Podman's `podman system
    /// service`); repeatable. Default: /var/run/docker.sock, /run/podman/podman.sock.
    #[arg(long = "docker-socket", value_name = "PATH")]
    pub docker_sockets: Vec<PathBuf>,

    /// containerd API socket to name containers with (also Kubernetes pods, in its `k8s.io`
    /// namespace); repeatable. Default: /run/containerd/containerd.sock,
    /// /run/k3s/containerd/containerd.sock.
    #[arg(long = "containerd-socket", value_name = "PATH")]
    pub containerd_sockets: Vec<PathBuf>,

    /// Do not look up containers: every record's `container` is null.
    #[arg(long)]
    pub no_containers: bool,

    /// Report what each of conntrace's eBPF programs costs the kernel: runs and run time, in
    /// the summary (`programs`) and the metrics. Turns on the kernel's BPF run-time statistics
    /// (bpf(BPF_ENABLE_STATS)) for as long as conntrace runs; they go off when it exits, even
    /// when killed. While on, the kernel reads the clock around every run of every BPF program
    /// on the machine (a few tens of ns each).
    #[arg(long)]
    pub bpf_stats: bool,

    /// Log more to stderr (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// What to do instead of tracing.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Explain a reason code: what it means, how conntrace decides it, what to do.
    /// Without a code, list them all.
    Explain {
        /// A reason code, e.g. syncookie_ack_lost.
        reason: Option<String>,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout, e.g. `conntrace man > conntrace.1`.
    Man,
    /// Print the JSON Schema of the records `--json` writes (docs/events.schema.json).
    Schema,
    /// Join verdicts of the same connections seen on different hosts (JSON Lines files written
    /// with --json, e.g. the client's and the server's) into one story per connection.
    Merge {
        /// JSON Lines files written by `conntrace --json`.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Largest clock difference between the hosts.
        #[arg(long, value_name = "D", default_value = "2s", value_parser = parse_duration)]
        max_skew: Duration,
        /// Print JSON Lines instead of readable lines.
        #[arg(long)]
        json: bool,
    },
}

/// `--follow`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FollowArg {
    Quiet,
    Streaming,
}

impl Cli {
    /// The command line, parsed and checked: a usage error (exit 2, clap's message) ends the
    /// process here.
    pub fn parse_checked() -> Self {
        let cli = Self::parse();
        if let Err(error) = cli.check() {
            error.exit();
        }
        cli
    }

    /// What the parser alone cannot see: flags that need every connection in userspace given
    /// with `--follow quiet`, more ports than the kernel filters, `--without lifecycle`.
    pub fn check(&self) -> Result<(), clap::Error> {
        use clap::{CommandFactory as _, error::ErrorKind};
        // Named as invoked, as clap's own errors are.
        let name = std::env::args_os()
            .next()
            .and_then(|a| Some(std::path::Path::new(&a).file_name()?.to_str()?.to_owned()));
        let command = || match &name {
            Some(n) => Self::command().bin_name(n),
            None => Self::command(),
        };
        let usage = |kind, message: String| Err(command().error(kind, message));
        if matches!(self.follow, Some(FollowArg::Quiet)) {
            let needs = match (self.all, self.expect_comm.is_empty()) {
                (true, _) => Some("--all"),
                (false, false) => Some("--expect-comm"),
                (false, true) => None,
            };
            if let Some(flag) = needs {
                return usage(
                    ErrorKind::ArgumentConflict,
                    format!(
                        "{flag} needs every connection in userspace: it cannot be used with \
                         --follow quiet (leave --follow out, or give --follow streaming)"
                    ),
                );
            }
        }
        let mut ports = self.ports.clone();
        ports.sort_unstable();
        ports.dedup();
        if ports.len() > conntrace_common::MAX_PORTS as usize {
            return usage(
                ErrorKind::ValueValidation,
                format!(
                    "{} ports given: at most {} can be filtered in the kernel",
                    ports.len(),
                    conntrace_common::MAX_PORTS
                ),
            );
        }
        if self
            .without
            .contains(&crate::kernel::attach::Capability::Lifecycle)
        {
            return usage(
                ErrorKind::InvalidValue,
                "--without lifecycle: every verdict is built on the lifecycle program, it cannot \
                 be left out"
                    .to_owned(),
            );
        }
        Ok(())
    }

    /// How healthy connections are followed: as `--follow` says, else streaming when a flag
    /// needs every connection (`--all`, `--expect-comm`), else quiet.
    pub fn follow(&self) -> crate::kernel::attach::Follow {
        use crate::kernel::attach::Follow;
        match self.follow {
            Some(FollowArg::Quiet) => Follow::Quiet,
            Some(FollowArg::Streaming) => Follow::Streaming,
            None if self.all || !self.expect_comm.is_empty() => Follow::Streaming,
            None => Follow::Quiet,
        }
    }
}

pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is out of range 1-65535")),
        Err(_) => Err(format!("`{s}` is not a port number (1-65535)")),
    }
}

/// A process name as the kernel stores it (`comm`, at most 15 bytes).
pub fn parse_comm(s: &str) -> Result<String, String> {
    let name = s.trim();
    if name.is_empty() {
        return Err("the process name is empty".into());
    }
    let mut end = name.len().min(15);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    Ok(name[..end].to_owned())
}

/// `NAMESPACE/NAME` of a Kubernetes pod.
pub fn parse_pod(s: &str) -> Result<(String, String), String> {
    match s.trim().split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => Err(format!("`{s}` is not NAMESPACE/NAME")),
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration like 30s or 500ms: {e}"))?;
    if d.is_zero() {
        return Err("the duration must be greater than zero".into());
    }
    Ok(d)
}

/// Shortest `--stall-timeout`: connections are checked for stalls every 100 ms.
pub const STALL_TIMEOUT_MIN: Duration = Duration::from_millis(100);
/// Longest `--stall-timeout`: a connection without any event for an hour is forgotten, so a
/// longer timeout could never fire.
pub const STALL_TIMEOUT_MAX: Duration = Duration::from_secs(30 * 60);

/// A `--stall-timeout`: 0 (stall verdicts off), or from [`STALL_TIMEOUT_MIN`] to
/// [`STALL_TIMEOUT_MAX`].
pub fn parse_stall_timeout(s: &str) -> Result<Duration, String> {
    let d = match humantime::parse_duration(s.trim()) {
        Ok(d) => d,
        Err(_) if s.trim() == "0" => return Ok(Duration::ZERO),
        Err(e) => return Err(format!("`{s}` is not a duration like 3s or 500ms: {e}")),
    };
    if d.is_zero() {
        return Ok(d);
    }
    if d < STALL_TIMEOUT_MIN {
        return Err(format!(
            "`{s}` is shorter than 100ms, how often connections are checked for stalls (0 turns stall verdicts off)"
        ));
    }
    if d > STALL_TIMEOUT_MAX {
        return Err(format!(
            "`{s}` is longer than 30m: a connection without any event for an hour is forgotten"
        ));
    }
    Ok(d)
}

pub fn parse_ring_bytes(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of bytes"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two of at least 4096"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_repeatable_and_comma_separated() {
        let cli =
            Cli::try_parse_from(["conntrace", "--port", "3306,5432", "-p", "80"]).expect("parse");
        assert_eq!(cli.ports, vec![3306, 5432, 80]);
        assert!(
            Cli::try_parse_from(["conntrace"])
                .expect("parse")
                .ports
                .is_empty()
        );
    }

    #[test]
    fn invalid_ports_are_rejected() {
        for bad in ["0", "70000", "abc", "-1"] {
            assert!(
                Cli::try_parse_from(["conntrace", "--port", bad]).is_err(),
                "{bad} accepted"
            );
        }
    }

    fn check(args: &[&str]) -> Result<(), clap::error::ErrorKind> {
        let cli = Cli::try_parse_from(std::iter::once("conntrace").chain(args.iter().copied()))
            .expect("parse");
        cli.check().map_err(|e| e.kind())
    }

    #[test]
    fn flags_that_need_streaming_are_refused_with_follow_quiet() {
        use clap::error::ErrorKind;
        assert_eq!(
            check(&["--all", "--follow", "quiet"]),
            Err(ErrorKind::ArgumentConflict)
        );
        assert_eq!(
            check(&["--expect-comm", "mysqld", "--follow", "quiet"]),
            Err(ErrorKind::ArgumentConflict)
        );
        assert_eq!(check(&["--all"]), Ok(()));
        assert_eq!(check(&["--all", "--follow", "streaming"]), Ok(()));
        assert_eq!(check(&["--follow", "quiet"]), Ok(()));
    }

    #[test]
    fn more_ports_than_the_kernel_filters_and_without_lifecycle_are_usage_errors() {
        use clap::error::ErrorKind;
        let max = conntrace_common::MAX_PORTS as u16;
        let list = |n: u16| {
            (1000..1000 + n)
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        assert_eq!(check(&["--port", &list(max)]), Ok(()));
        assert_eq!(
            check(&["--port", &list(max + 1)]),
            Err(ErrorKind::ValueValidation)
        );
        // A port given twice is one port.
        assert_eq!(check(&["--port", &list(max), "--port", "1000"]), Ok(()));
        assert_eq!(
            check(&["--without", "lifecycle"]),
            Err(ErrorKind::InvalidValue)
        );
        assert_eq!(check(&["--without", "syn-cookies"]), Ok(()));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_stall_timeout("0"), Ok(Duration::ZERO));
        assert_eq!(
            parse_stall_timeout("1500ms"),
            Ok(Duration::from_millis(1500))
        );
        assert!(parse_stall_timeout("soon").is_err());
        assert_eq!(parse_stall_timeout("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_stall_timeout("100ms"), Ok(STALL_TIMEOUT_MIN));
        assert_eq!(parse_stall_timeout("30m"), Ok(STALL_TIMEOUT_MAX));
        for short in ["1ns", "99ms"] {
            let e = parse_stall_timeout(short).unwrap_err();
            assert!(e.contains("shorter than 100ms"), "{short}: {e}");
        }
        let e = parse_stall_timeout("2h").unwrap_err();
        assert!(e.contains("longer than 30m"), "{e}");
        let cli = Cli::try_parse_from(["conntrace", "--duration", "2s", "--stall-timeout", "1s"])
            .expect("parse");
        assert_eq!(cli.duration, Some(Duration::from_secs(2)));
        assert_eq!(cli.stall_timeout, Duration::from_secs(1));
    }

    #[test]
    fn expected_comms_are_kernel_comm_names() {
        let cli = Cli::try_parse_from([
            "conntrace",
            "--expect-comm",
            "mysqld,mariadbd",
            "--expect-comm",
            "a-very-long-process-name",
        ])
        .expect("parse");
        assert_eq!(
            cli.expect_comm,
            vec!["mysqld", "mariadbd", "a-very-long-pro"]
        );
        assert!(Cli::try_parse_from(["conntrace", "--expect-comm", ""]).is_err());
    }

    #[test]
    fn container_and_pod_selectors() {
        let cli = Cli::try_parse_from([
            "conntrace",
            "--container",
            "mysqld,web",
            "--pod",
            "shop/db-0",
        ])
        .expect("parse");
        assert_eq!(cli.containers, vec!["mysqld", "web"]);
        assert_eq!(cli.pods, vec![("shop".to_owned(), "db-0".to_owned())]);
        for bad in ["db-0", "/db-0", "shop/", "a/b/c"] {
            assert!(parse_pod(bad).is_err(), "{bad} accepted");
        }
        assert!(Cli::try_parse_from(["conntrace", "--container", "x", "--no-containers"]).is_err());
        assert!(Cli::try_parse_from(["conntrace", "--metrics-container-labels"]).is_err());
    }

    #[test]
    fn bpf_stats_only_when_asked() {
        assert!(!Cli::try_parse_from(["conntrace"]).expect("parse").bpf_stats);
        assert!(
            Cli::try_parse_from(["conntrace", "--bpf-stats"])
                .expect("parse")
                .bpf_stats
        );
    }

    #[test]
    fn ring_sizes() {
        assert_eq!(parse_ring_bytes("4096"), Ok(4096));
        assert!(parse_ring_bytes("5000").is_err());
        assert!(parse_ring_bytes("2048").is_err());
    }
}
