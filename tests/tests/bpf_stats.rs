//! `--bpf-stats`: the summary lists every active program with its runs and run time, nothing
//! changes without the flag, and the kernel's run-time statistics end with conntrace, even when
//! it is killed.

use std::time::Duration;

use conntrace_tests::{
    Conntrace, PORT, Scenario,
    bpftool::{program_id, run_count},
    connect, require_root, skip,
};
use serde_json::Value;

/// A refused connection from the client to the server (nothing listens): a few runs of the
/// lifecycle program on both ends.
fn refused_connection(hosts: &conntrace_tests::TwoHosts, ct: &Conntrace) {
    connect(&hosts.client, &hosts.server_ip, PORT, &[]).json_lines(Duration::from_secs(10));
    let client_ns = hosts.client.inode();
    ct.wait_for(Duration::from_secs(3), |l| {
        l.value["netns"] == client_ns && l.value["reason"] == "refused_no_listener"
    });
}

/// The name of the program that serves `lifecycle` (a tracepoint or a tp_btf program).
fn lifecycle_program(ready: &Value) -> String {
    ready["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["capability"] == "lifecycle")
        .and_then(|p| p["name"].as_str())
        .expect("a lifecycle program in the ready record")
        .to_owned()
}

#[test]
fn the_summary_lists_each_programs_runs_and_run_time() {
    let Scenario { hosts, ct, .. } = Scenario::new().conntrace(&["--port", "3306", "--bpf-stats"]);
    refused_connection(&hosts, &ct);
    let ready = ct.ready();
    let values = ct.stop();
    let summary = values.last().expect("summary");
    let programs = summary["programs"]
        .as_array()
        .expect("programs with --bpf-stats");
    let names = |list: &[Value], field: &str| -> Vec<String> {
        list.iter()
            .filter_map(|p| p[field].as_str().map(str::to_owned))
            .collect()
    };
    let active = ready["programs"].as_array().expect("ready programs");
    assert_eq!(names(programs, "program"), names(active, "name"));
    let name = lifecycle_program(&ready);
    let lifecycle = programs
        .iter()
        .find(|p| p["program"] == name.as_str())
        .expect("the lifecycle program");
    // Both ends' CLOSE -> SYN_SENT/SYN_RECV -> CLOSE, at least.
    assert!(lifecycle["runs"].as_u64() >= Some(2), "{lifecycle}");
    assert!(lifecycle["run_ns"].as_u64() > Some(0), "{lifecycle}");
}

#[test]
fn without_the_flag_the_summary_has_no_programs() {
    let Scenario { hosts, ct, .. } = Scenario::new().conntrace(&["--port", "3306"]);
    refused_connection(&hosts, &ct);
    let values = ct.stop();
    let summary = values.last().expect("summary");
    assert!(summary.get("programs").is_none(), "{summary}");
}

#[test]
fn statistics_end_when_conntrace_is_killed() {
    require_root();
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    if sysctl.trim() != "0" {
        skip("kernel.bpf_stats_enabled is on machine-wide: nothing to see go off");
        return;
    }
    let Scenario { hosts, .. } = Scenario::new();
    // A conntrace without the flag, whose lifecycle program counts runs only while another
    // process holds the statistics on.
    let plain = Conntrace::start(&["--port", "3306"]);
    let name = lifecycle_program(&plain.ready());
    let id = program_id(plain.pid(), &name);
    let with_stats = Conntrace::start(&["--port", "3306", "--bpf-stats"]);
    refused_connection(&hosts, &plain);
    let counted = run_count(id);
    assert!(counted >= 2, "counted while --bpf-stats runs: {counted}");
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(with_stats.pid() as i32, libc::SIGKILL) };
    drop(with_stats);
    // The program runs for every TCP state change on the machine (it filters ports itself),
    // so it counts other traffic until the statistics are off: read the count after the kill.
    let after_kill = run_count(id);
    refused_connection(&hosts, &plain);
    assert_eq!(
        run_count(id),
        after_kill,
        "the statistics stayed on after the --bpf-stats conntrace was killed"
    );
    plain.stop();
}
