//! The binary's edges: usage errors, output errors, a reader that goes away.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use conntrace_tests::{
    Conntrace, PORT, Proc, Scenario, TempDir, connect, conntrace_bin, only_verdict_in,
    require_root, verdicts_in,
};
use serde_json::Value;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(conntrace_bin())
        .args(args)
        .output()
        .expect("run conntrace");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invalid_ports_and_durations_are_usage_errors() {
    let many_ports = (1000..1065)
        .map(|p: u16| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    for (args, needle) in [
        (&["--port", "0"][..], "out of range 1-65535"),
        (&["--port", "70000"][..], "out of range 1-65535"),
        (&["--port", "abc"][..], "is not a port number"),
        (&["--duration", "soon"][..], "is not a duration"),
        (&["--ring-buffer-bytes", "5000"][..], "power of two"),
        (&["--stall-timeout", "1ns"][..], "shorter than 100ms"),
        (&["--stall-timeout", "2h"][..], "longer than 30m"),
        (
            &["--all", "--follow", "quiet"][..],
            "cannot be used with --follow quiet",
        ),
        (
            &["--expect-comm", "mysqld", "--follow", "quiet"][..],
            "cannot be used with --follow quiet",
        ),
        (&["--without", "lifecycle"][..], "cannot be left out"),
        (
            &["--port", many_ports.as_str()][..],
            "at most 64 can be filtered",
        ),
    ] {
        let (code, stderr) = run(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn it_runs_under_ip_netns_exec_whose_fresh_sys_has_no_tracefs() {
    // `ip netns exec` gives its command a mount namespace of its own with a fresh /sys:
    // conntrace mounts tracefs there (never in the host's mount namespace) and runs.
    require_root();
    let ns = conntrace_tests::Netns::new(&format!("ctx{}", std::process::id()));
    let bin = conntrace_bin();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(&bin)
        .args(["--port", "3306", "--json", "--duration", "1s"])
        .output()
        .expect("run conntrace under ip netns exec");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.starts_with("{\"event\":\"ready\""),
        "{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("mounted it at /sys/kernel/tracing there"),
        "{stderr}"
    );
}

#[test]
fn unwritable_output_fails_before_loading_anything() {
    require_root();
    let (code, stderr) = run(&[
        "--port",
        "3306",
        "-o",
        "/nonexistent-dir/out.json",
        "--duration",
        "1s",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(
        stderr.trim(),
        "conntrace: cannot create output file /nonexistent-dir/out.json: No such file or directory (os error 2)"
    );
}

/// Starts conntrace with `args` and stdout piped, reads its ready line, then closes the pipe
/// (like `conntrace --json | head -1`).
fn reader_leaves_after_ready(args: &[&str]) -> Proc {
    let mut conntrace = Proc::spawn(
        Command::new(conntrace_bin())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
        "conntrace",
    );
    let mut first = String::new();
    BufReader::new(conntrace.child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("read");
    assert!(first.starts_with(r#"{"event":"ready""#), "{first}");
    conntrace
}

#[test]
fn closed_pipe_is_a_normal_exit() {
    require_root();
    let mut conntrace =
        reader_leaves_after_ready(&["--port", "3306", "--json", "--duration", "2s"]);
    let status = conntrace.wait(Duration::from_secs(15), "conntrace with a closed pipe");
    assert_eq!(
        status.code(),
        Some(0),
        "writing to a closed pipe must end the run quietly"
    );
}

#[test]
fn a_closed_pipe_ends_a_quiet_run_that_has_nothing_to_write() {
    require_root();
    // No --duration and no traffic: quiet mode writes nothing after the ready line, so the
    // closed pipe must be noticed without a write.
    let mut conntrace = reader_leaves_after_ready(&["--port", "3306", "--json"]);
    let status = conntrace.wait(
        Duration::from_secs(5),
        "conntrace after its reader closed the pipe",
    );
    assert_eq!(status.code(), Some(0), "a reader that left is a normal end");
}

#[test]
fn sigint_right_after_ready_still_ends_with_a_summary() {
    require_root();
    for _ in 0..3 {
        let ct = conntrace_tests::Conntrace::start(&["--port", "3306"]);
        // stop() sends SIGINT at once and checks a clean exit and a final summary line.
        let values = ct.stop();
        assert_eq!(values.last().expect("lines")["event"], "summary");
    }
}

#[test]
fn without_privileges_it_names_the_capabilities_and_exits_3() {
    require_root();
    // The same binary as an unprivileged user (nobody), no capabilities.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(conntrace_bin())
        .args(["--port", "3306"])
        .output()
        .expect("run setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    for cap in [
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_DAC_READ_SEARCH",
        "CAP_NET_ADMIN",
        "CAP_SYS_ADMIN",
        "CAP_SYS_PTRACE",
    ] {
        assert!(stderr.contains(cap), "{cap} not named: {stderr}");
    }
}

#[test]
fn merge_names_the_file_and_line_of_a_malformed_record() {
    let dir = TempDir::new("ct-bad");
    let path = dir.join("bad.jsonl");
    std::fs::write(&path, "{\"event\":\"ready\"}\nnot json\n").expect("write");
    let (code, stderr) = run(&["merge", path.to_str().expect("utf-8")]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("{}:2:", path.display())),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let (code, stderr) = run(&["merge", "/nonexistent/ct.jsonl"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("/nonexistent/ct.jsonl"), "{stderr}");
}

#[test]
fn a_metrics_address_in_use_fails_before_loading_anything() {
    require_root();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (code, stderr) = run(&["--metrics-addr", &addr, "--duration", "1s"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("listen for metrics on {addr}")),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn a_runtime_socket_that_is_missing_or_no_socket_is_named_at_start_up() {
    require_root();
    let dir = TempDir::new("ct-sockets");
    let file = dir.join("not-a-socket");
    std::fs::write(&file, "").expect("write a plain file");
    let missing = dir.join("missing.sock");
    let (code, stderr) = run(&[
        "--port",
        "3306",
        "--docker-socket",
        missing.to_str().expect("utf-8"),
        "--containerd-socket",
        file.to_str().expect("utf-8"),
        "--duration",
        "1s",
    ]);
    // Not fatal (a runtime may start later): conntrace traces, and says so on stderr.
    assert_eq!(code, 0, "{stderr}");
    for (flag, path, why) in [
        ("--docker-socket", &missing, "No such file or directory"),
        ("--containerd-socket", &file, "not a socket"),
    ] {
        assert!(
            stderr.lines().any(|l| l.contains(flag)
                && l.contains(path.to_str().expect("utf-8"))
                && l.contains(why)),
            "{flag} {}: {why}, in:\n{stderr}",
            path.display()
        );
    }
}

/// The file capabilities the README's setcap line gives (each one's reason is there).
const DOCUMENTED_CAPS: &str = "cap_bpf,cap_perfmon,cap_dac_read_search,cap_net_admin,cap_net_raw,cap_sys_admin,cap_sys_ptrace,cap_syslog";

/// A copy of the binary with file capabilities `caps`, in a directory `nobody` can enter.
fn with_file_caps(caps: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new("ct-caps");
    let bin = dir.join("conntrace");
    std::fs::copy(conntrace_bin(), &bin).expect("copy conntrace");
    let setcap = Command::new("setcap")
        .args([&format!("{caps}+ep"), bin.to_str().expect("utf-8")])
        .status()
        .expect("run setcap (package libcap2-bin)");
    assert!(setcap.success());
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    (dir, bin)
}

/// `program` as nobody (setpriv execs it: same pid, so signals reach it).
fn as_nobody(program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(program)
        .current_dir("/");
    cmd
}

/// What conntrace, run as nobody with file capabilities `caps`, saw of one connection that a
/// DROP in the server's INPUT times out. The server's namespace has no name by then: a root
/// process holds it, so it is found only through that process's /proc/PID/ns/net, as a
/// container's namespace is.
struct NobodyRun {
    values: Vec<Value>,
    stderr: String,
    client: u64,
    server: u64,
    client_pid: u32,
}

impl NobodyRun {
    /// The one verdict in `netns`; a failure shows what conntrace said on stderr too.
    fn only_verdict_in(&self, netns: u64) -> Value {
        let verdicts = verdicts_in(&self.values, netns);
        if verdicts.len() != 1 {
            eprintln!("conntrace's stderr (as nobody):\n{}", self.stderr);
        }
        only_verdict_in(&self.values, netns)
    }
}

fn dropped_connection_as_nobody(caps: &str) -> NobodyRun {
    let (_dir, bin) = with_file_caps(caps);
    let Scenario { mut hosts, .. } = Scenario::new()
        .in_server(&[
            "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "3306", "-j", "DROP",
        ])
        .in_client(&["sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"]);
    let (client, server) = (hosts.client.inode(), hosts.server.inode());
    let holder = Proc::spawn(hosts.server.command("sleep").arg("120"), "sleep");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::metadata(format!("/proc/{}/ns/net", holder.pid()))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .ok()
        != Some(server)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "sleep did not enter the namespace"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    hosts.server.unname();
    let log = TempDir::new("ct-caps-log");
    let stderr_path = log.join("stderr");
    let mut cmd = as_nobody(&bin);
    cmd.args(["--json", "--port", "3306"])
        .env("RUST_LOG", "conntrace=warn")
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"));
    let ct = Conntrace::spawn(cmd, "conntrace as nobody");
    let peer = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &["--sport", "41044", "--timeout-ms", "20000"],
    );
    let client_pid = peer.pid();
    let results = peer.json_lines(Duration::from_secs(30));
    assert_eq!(results[0]["errno"], 110, "ETIMEDOUT only: {results:?}");
    let values = ct.stop_after_verdict_in(client);
    drop(holder);
    NobodyRun {
        values,
        stderr: std::fs::read_to_string(&stderr_path).expect("stderr"),
        client,
        server,
        client_pid,
    }
}

#[test]
fn file_capabilities_instead_of_root_are_enough() {
    require_root();
    // The README's capabilities, run as nobody: everything root names is named.
    let run = dropped_connection_as_nobody(DOCUMENTED_CAPS);
    assert!(!run.stderr.contains("WARN"), "{}", run.stderr);
    let c = run.only_verdict_in(run.client);
    assert_eq!(
        (&c["reason"], &c["errno"]),
        (&"syn_timeout".into(), &"ETIMEDOUT".into())
    );
    assert_eq!(
        (c["pid"].as_u64(), c["comm"].as_str()),
        (Some(u64::from(run.client_pid)), Some("ct-client"))
    );
    let s = run.only_verdict_in(run.server);
    assert_eq!(s["reason"], "netfilter_drop", "{s}");
    // CAP_SYSLOG: kallsyms addresses name the drop's location and its hook.
    assert_eq!(s["detail"]["hook"], "INPUT", "{s}");
    let location = s["detail"]["drops"][0]["location"]
        .as_str()
        .unwrap_or_default();
    assert!(location.starts_with("nft_do_chain+"), "{s}");
    // CAP_SYS_PTRACE finds the unnamed namespace, CAP_SYS_ADMIN enters it, CAP_NET_ADMIN
    // lets `nft` (given the capability as an ambient one) list its rules.
    assert_eq!(s["detail"]["rule"]["text"], "tcp dport 3306 drop", "{s}");
}

#[test]
fn without_the_naming_capabilities_it_traces_and_says_what_is_not_named() {
    require_root();
    const CAPS: &str = "cap_bpf,cap_perfmon,cap_dac_read_search";
    if perf_events_need_sys_admin(CAPS) {
        return;
    }
    let run = dropped_connection_as_nobody(CAPS);
    for cap in [
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_SYS_ADMIN",
        "CAP_SYS_PTRACE",
    ] {
        assert!(
            run.stderr.contains(&format!("without {cap}: ")),
            "{cap} not named: {}",
            run.stderr
        );
    }
    // CAP_SYSLOG is named where kallsyms hides its addresses from nobody (here:
    // perf_event_paranoid 2), and then the hook and location are unnamed.
    let head = as_nobody(Path::new("head"))
        .args(["-c", "16", "/proc/kallsyms"])
        .output()
        .expect("run head as nobody");
    let hidden = String::from_utf8_lossy(&head.stdout).starts_with("0000000000000000");
    assert_eq!(
        run.stderr.contains("without CAP_SYSLOG: "),
        hidden,
        "{}",
        run.stderr
    );
    let c = run.only_verdict_in(run.client);
    assert_eq!(c["reason"], "syn_timeout", "{c}");
    let s = run.only_verdict_in(run.server);
    assert_eq!(s["reason"], "netfilter_drop", "{s}");
    assert!(s["detail"]["rule"].is_null(), "{s}");
    assert!(s["detail"]["rule_not_found"].is_string(), "{s}");
    if hidden {
        assert!(s["detail"]["hook"].is_null(), "{s}");
    }
}

/// True, after checking how conntrace says so, where the kernel lets only CAP_SYS_ADMIN open
/// perf events (Debian's kernels at `kernel.perf_event_paranoid` 3, their default): run as
/// nobody with `caps` (no CAP_SYS_ADMIN), conntrace then cannot attach its classic
/// tracepoints and exits 3 naming CAP_SYS_ADMIN and the sysctl. Elsewhere (this project's
/// host: 2) it must not say so.
fn perf_events_need_sys_admin(caps: &str) -> bool {
    let (_dir, bin) = with_file_caps(caps);
    let out = as_nobody(&bin)
        .args(["--port", "3306", "--duration", "1s"])
        .output()
        .expect("run setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let restricted = stderr.contains("perf_event_open(2) only with CAP_SYS_ADMIN");
    let paranoid: i32 = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .expect("read kernel.perf_event_paranoid")
        .trim()
        .parse()
        .expect("a number");
    if !restricted {
        assert!(paranoid <= 2 || out.status.code() == Some(0), "{stderr}");
        return false;
    }
    assert!(
        paranoid > 2,
        "restricted at perf_event_paranoid {paranoid}: {stderr}"
    );
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with("conntrace: missing privileges: CAP_SYS_ADMIN needed to trace"),
        "{stderr}"
    );
    println!(
        "kernel.perf_event_paranoid {paranoid}: perf events need CAP_SYS_ADMIN here, and conntrace says so"
    );
    true
}

#[test]
fn cap_sys_admin_does_not_open_tracefs_the_error_names_cap_dac_read_search() {
    require_root();
    let (_dir, bin) = with_file_caps("cap_bpf,cap_perfmon,cap_net_admin,cap_sys_admin");
    let out = as_nobody(&bin)
        .args(["--port", "3306", "--duration", "1s"])
        .output()
        .expect("run setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with(
            "conntrace: missing privileges: CAP_DAC_READ_SEARCH needed to trace (read tracefs"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("CAP_SYS_PTRACE, CAP_SYSLOG needed to name"),
        "{stderr}"
    );
}
