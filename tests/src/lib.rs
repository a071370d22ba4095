//! Harness for conntrace's integration tests: two hosts made of network namespaces, the real
//! conntrace binary with its real eBPF programs, and test peers. Everything created here is
//! removed on drop, also when a test panics. Helpers panic instead of returning errors.
//!
//! A scenario starts with [`Scenario`] (root check, two hosts, set-up steps in them, server,
//! conntrace); every child process a test starts is held by a [`Proc`] (killed on drop), every
//! scratch directory is a [`TempDir`] (removed on drop); every container ([`containers`]) is
//! removed on drop too.

pub mod bpf_sys;
pub mod bpftool;
pub mod cgroup;
mod conntrace;
pub mod containers;
mod hosts;
mod process;
mod scenario;

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
};

pub use conntrace::{
    Conntrace, Line, attach_args, conntrace_bin, drops_in, lifecycle_misses, only_verdict_in,
    ready_timeout, summary_of, validate, verdict_line, verdict_lines_in, verdicts_in,
};
pub use hosts::{Hosts, Netns, ThreeHosts, TwoHosts, fresh_name};
pub use process::{Proc, TempDir};
pub use scenario::Scenario;

/// The port the scenarios serve and trace (MySQL's, as in the stuck-connection story).
pub const PORT: u16 = 3306;

/// conntrace's `--follow` modes. A scenario whose facts reach userspace by another path in
/// each mode (quiet: no syscall tracepoints) runs in both and asserts the same verdicts.
pub const FOLLOW_MODES: [&str; 2] = ["quiet", "streaming"];

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Panics unless running as root: the scenarios load eBPF programs and create namespaces.
/// Lacking privileges is not a missing kernel feature, so they fail rather than skip.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the scenarios need root: run `cargo xtask test` as root"
    );
}

fn bin(env: &str, fallback: &str) -> PathBuf {
    std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        root.join(fallback)
    })
}

/// Path of one of this crate's binaries (`ctpeer`, `ctload`): cargo builds them into
/// `target/<profile>/`, the test executables into `target/<profile>/deps/`, and the benchmark
/// runs from `target/<profile>/` itself.
pub fn helper_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let beside = exe.with_file_name(name);
    let path = if beside.exists() {
        beside
    } else {
        let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
        dir.join(name)
    };
    assert!(path.exists(), "{} not built", path.display());
    path
}

/// Path of the test peer binary.
pub fn ctpeer() -> PathBuf {
    helper_bin("ctpeer")
}

/// A `/proc/PID/status` memory figure (`VmRSS`, `VmHWM`) in MiB; 0 when unreadable.
pub fn proc_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Spawns `ctpeer MODE ADDR PORT EXTRA...` in `ns`, stdout piped.
fn spawn_ctpeer(ns: &Netns, mode: &str, addr: &str, port: u16, extra: &[&str]) -> Proc {
    spawn_ctpeer_with(ns, mode, (addr, port), extra, |_| {})
}

fn spawn_ctpeer_with(
    ns: &Netns,
    mode: &str,
    (addr, port): (&str, u16),
    extra: &[&str],
    prepare: impl FnOnce(&mut std::process::Command),
) -> Proc {
    let mut cmd = ns.command(ctpeer().to_str().expect("utf-8 path"));
    cmd.args([mode, addr, &port.to_string()])
        .args(extra)
        .stdout(Stdio::piped());
    prepare(&mut cmd);
    Proc::spawn(&mut cmd, &format!("ctpeer {mode}"))
}

/// Starts `ctpeer serve` in `ns` and waits until it listens.
pub fn serve(ns: &Netns, addr: &str, port: u16, extra: &[&str]) -> Proc {
    let mut server = spawn_ctpeer(ns, "serve", addr, port, extra);
    let mut line = String::new();
    BufReader::new(server.child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read ctpeer");
    assert_eq!(line.trim(), "listening", "ctpeer serve did not start");
    server
}

/// Starts `ctpeer connect` in `ns`; read its results with [`Proc::json_lines`].
pub fn connect(ns: &Netns, addr: &str, port: u16, extra: &[&str]) -> Proc {
    spawn_ctpeer(ns, "connect", addr, port, extra).read_stdout()
}

/// [`connect`] from a process in cgroup `group` (whose programs refuse its `connect()`s).
pub fn connect_in_cgroup(
    ns: &Netns,
    group: &cgroup::ConnectRefused,
    (addr, port): (&str, u16),
    extra: &[&str],
) -> Proc {
    spawn_ctpeer_with(ns, "connect", (addr, port), extra, |cmd| group.enter(cmd)).read_stdout()
}

/// Prints why a test does not run its checks here; `cargo xtask vm-test` counts a passing test
/// that printed a line containing "skip" as skipped. Only for kernel features that are absent.
pub fn skip(reason: &str) {
    println!("SKIP: {reason}");
}
