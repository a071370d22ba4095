//! Churn through a traced port (bounded for CI: 3 s at 2,000 connections a second, which the
//! debug build the tests use keeps up with; the 1M-connection soak runs longer, see README):
//! memory stays flat and the summary's counts are exact, one `established` verdict per
//! connection per side.

use std::time::Duration;

use conntrace_tests::{Conntrace, TwoHosts, helper_bin, proc_mib, require_root};
use serde_json::Value;

const PORT: u16 = 3306;
/// Connections a second in all.
const RATE: &str = "2000";

#[test]
fn churn_keeps_memory_flat_and_counts_exact() {
    require_root();
    let hosts = TwoHosts::new();
    hosts
        .client
        .exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"]);
    let load = helper_bin("ctload");
    let load = load.to_str().expect("utf-8 path");
    let mut server = hosts
        .server
        .command(load)
        .args(["serve", &hosts.server_ip, &PORT.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn ctload serve");
    std::thread::sleep(Duration::from_millis(200));
    let ct = Conntrace::start(&["--port", "3306", "--all", "--ring-buffer-bytes", "16777216"]);
    let pid = ct.pid();
    let churn = |ms: u64| -> u64 {
        let out = hosts
            .client
            .command(load)
            .args([
                "churn",
                &hosts.server_ip,
                &PORT.to_string(),
                "--for-ms",
                &ms.to_string(),
                "--rate",
                RATE,
            ])
            .output()
            .expect("run ctload churn");
        let line: Value = serde_json::from_slice(&out.stdout).expect("ctload's line");
        assert_eq!(line["failed"], 0, "{line}");
        line["connections"].as_u64().expect("connections")
    };
    let mut connections = churn(1000);
    std::thread::sleep(Duration::from_millis(500));
    let warm = proc_mib(pid, "VmRSS");
    connections += churn(2000);
    std::thread::sleep(Duration::from_millis(500));
    let after = proc_mib(pid, "VmRSS");
    let values = ct.stop();
    server.kill().ok();
    server.wait().ok();
    let summary = values.last().expect("summary");
    println!(
        "MEASURED soak: {connections} connections, RSS {warm:.1} MiB after the first third, {after:.1} MiB at the end, {} lost",
        summary["lost_events"]
    );
    assert_eq!(summary["lost_events"], 0, "{summary}");
    // Every connection, both ends: one established verdict each, nothing else.
    assert_eq!(
        summary["by_reason"]["established"],
        2 * connections,
        "{summary}"
    );
    assert_eq!(summary["verdicts"], 2 * connections, "{summary}");
    assert_eq!(summary["expired_unresolved"], 0, "{summary}");
    assert!(
        after < warm + 16.0,
        "memory grew from {warm:.1} to {after:.1} MiB"
    );
}
