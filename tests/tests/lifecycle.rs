//! Lifecycle: nothing stays attached after conntrace is killed, and two conntrace processes
//! trace at once.

use std::time::Duration;

use conntrace_tests::{Conntrace, PORT, Scenario, connect, require_root};
use serde_json::Value;

fn all_programs() -> Vec<Value> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("run bpftool (package bpftool)");
    serde_json::from_slice(&out.stdout).expect("bpftool's JSON")
}

#[test]
fn after_sigkill_no_program_stays_loaded() {
    require_root();
    let ids_now = || -> Vec<u64> {
        all_programs()
            .iter()
            .filter_map(|p| p["id"].as_u64())
            .collect()
    };
    // The programs conntrace loads: those that appear while it starts (tests run one at a
    // time, so nothing else loads programs meanwhile).
    let before = ids_now();
    let ct = Conntrace::start(&["--port", "3306"]);
    let pid = ct.pid();
    let ids: Vec<u64> = ids_now()
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    assert!(ids.len() >= 10, "conntrace loaded its programs: {ids:?}");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    drop(ct);
    // The kernel frees programs and their attachments with the last file descriptor.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<u64> = all_programs()
            .iter()
            .filter_map(|p| p["id"].as_u64())
            .filter(|id| ids.contains(id))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "programs still loaded after SIGKILL: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_conntrace_processes_trace_at_once() {
    let Scenario { hosts, ct, .. } = Scenario::new().conntrace(&["--port", "3306"]);
    let second = Conntrace::start(&["--port", "3306"]);
    connect(&hosts.client, &hosts.server_ip, PORT, &[]).json_lines(Duration::from_secs(10));
    let client_ns = hosts.client.inode();
    for ct in [ct, second] {
        ct.wait_for(Duration::from_secs(3), |l| {
            l.value["netns"] == client_ns && l.value["reason"] == "refused_no_listener"
        });
        let values = ct.stop();
        let refused = values
            .iter()
            .filter(|v| v["event"] == "verdict" && v["reason"] == "refused_no_listener")
            .count();
        assert_eq!(refused, 2, "both sides, in each process: {values:#?}");
    }
}

#[test]
fn without_leaves_capabilities_out_and_says_so() {
    let Scenario { hosts, ct, .. } = Scenario::new()
        // Two capabilities every supported kernel has a tracepoint for (first data has none
        // before 6.3, so --attach tracepoints would have nothing to leave out there).
        .conntrace(&["--port", "3306", "--without", "syn-cookies,drops"]);
    connect(&hosts.client, &hosts.server_ip, PORT, &[]).json_lines(Duration::from_secs(10));
    let client_ns = hosts.client.inode();
    ct.wait_for(Duration::from_secs(3), |l| {
        l.value["netns"] == client_ns && l.value["reason"] == "refused_no_listener"
    });
    let values = ct.stop();
    let ready = values
        .iter()
        .find(|v| v["event"] == "ready")
        .expect("a ready line");
    for cap in ["syn_cookies", "drops"] {
        assert!(
            ready["unavailable"]
                .as_array()
                .expect("unavailable")
                .iter()
                .any(|u| u["capability"] == cap && u["reason"] == "left out with --without"),
            "{cap} listed as left out: {ready:#}"
        );
        assert!(
            ready["programs"]
                .as_array()
                .expect("programs")
                .iter()
                .all(|p| p["capability"] != cap),
            "{cap} attached anyway: {ready:#}"
        );
        assert!(ready["attach_paths"].get(cap).is_none(), "{ready:#}");
    }
}

#[test]
fn without_lifecycle_is_refused() {
    require_root();
    let out = std::process::Command::new(conntrace_tests::conntrace_bin())
        .args([
            "--port",
            "3306",
            "--without",
            "lifecycle",
            "--duration",
            "1s",
        ])
        .output()
        .expect("run conntrace");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("lifecycle") && stderr.contains("--without"),
        "names the capability and the flag: {stderr}"
    );
}
