//! The binary's edges: usage errors, output errors, a reader that goes away.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use conntrace_tests::{Proc, TempDir, conntrace_bin, require_root};

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
    for (args, needle) in [
        (&["--port", "0"][..], "out of range 1-65535"),
        (&["--port", "70000"][..], "out of range 1-65535"),
        (&["--port", "abc"][..], "is not a port number"),
        (&["--duration", "soon"][..], "is not a duration"),
        (&["--ring-buffer-bytes", "5000"][..], "power of two"),
    ] {
        let (code, stderr) = run(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
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

#[test]
fn closed_pipe_is_a_normal_exit() {
    require_root();
    let mut conntrace = Proc::spawn(
        Command::new(conntrace_bin())
            .args(["--port", "3306", "--json", "--duration", "2s"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
        "conntrace",
    );
    // Like `conntrace --json | head -1`: read the ready line, then close the pipe.
    let mut first = String::new();
    BufReader::new(conntrace.child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("read");
    assert!(first.starts_with(r#"{"event":"ready""#), "{first}");
    let status = conntrace.wait(Duration::from_secs(15), "conntrace with a closed pipe");
    assert_eq!(
        status.code(),
        Some(0),
        "writing to a closed pipe must end the run quietly"
    );
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
    for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"] {
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
fn file_capabilities_instead_of_root_are_enough() {
    require_root();
    // A copy of the binary with the capabilities the README lists, run as nobody.
    let dir = TempDir::new("ct-caps");
    let bin = dir.join("conntrace");
    std::fs::copy(conntrace_bin(), &bin).expect("copy conntrace");
    let caps = "cap_bpf,cap_perfmon,cap_net_admin,cap_sys_admin,cap_dac_read_search+ep";
    let setcap = Command::new("setcap")
        .args([caps, bin.to_str().expect("utf-8")])
        .status()
        .expect("run setcap (package libcap2-bin)");
    assert!(setcap.success());
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .args(["--json", "--port", "3306", "--duration", "1s"])
        .current_dir("/")
        .output()
        .expect("run setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("{\"event\":\"ready\""), "{stdout}");
    assert!(stdout.contains("\"event\":\"summary\""), "{stdout}");
    // `nft` inherited CAP_NET_ADMIN: no warning about rule counters.
    assert!(!stderr.contains("rule counter"), "{stderr}");
}
