//! Lifecycle: nothing stays attached after conntrace is killed, two conntrace processes
//! trace at once, and a namespace deleted while conntrace runs is not kept alive by it.

use std::time::{Duration, Instant};

use conntrace_tests::{
    Conntrace, Netns, PORT, Scenario, TwoHosts, bpftool, connect, fresh_name, require_root,
};

#[test]
fn after_sigkill_no_program_stays_loaded() {
    require_root();
    let ids_now = || -> Vec<u64> {
        bpftool::programs()
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
    // Each program of the ready line is loaded once (the accept-queue iterator too, though it
    // is run on demand, not attached).
    let listed = ct.ready()["programs"].as_array().map_or(0, Vec::len);
    assert!(
        listed > 0 && ids.len() >= listed,
        "conntrace loaded its {listed} programs: {ids:?}"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    drop(ct);
    // The kernel frees programs and their attachments with the last file descriptor.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<u64> = bpftool::programs()
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

/// A program the verifier rejects falls back to a dearer hook without a word at the default
/// log level (a hash of a BTF-typed socket pointer once sent the `tp_btf` lifecycle and drop
/// programs to the classic tracepoints). The kernel refusing a hook (fentry's EPERM, a
/// missing function) is the host's; the verifier's refusal (EACCES, `bpf(BPF_PROG_LOAD)`)
/// is conntrace's own bug, in every mode.
#[test]
fn the_verifier_accepts_every_program_conntrace_tries() {
    require_root();
    for follow in ["quiet", "streaming"] {
        let ct = Conntrace::start(&["--port", "3306", "--follow", follow]);
        let ready = ct.ready();
        let refused: Vec<String> = ready["unavailable"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|u| {
                let reason = u["reason"].as_str()?;
                (reason.contains("BPF_PROG_LOAD") && reason.contains("os error 13"))
                    .then(|| format!("{}: {reason}", u["name"]))
            })
            .collect();
        assert!(
            refused.is_empty(),
            "--follow {follow}: the verifier refused {refused:#?}"
        );
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

/// conntrace keeps a file open in every namespace (its `netstat`, read each second for listen
/// overflows) and sockets in those with traced connections. An open file keeps its namespace,
/// and the namespace's devices, alive: a namespace deleted while conntrace runs must still go
/// within a poll or two, as it does without conntrace.
#[test]
fn a_namespace_deleted_while_conntrace_runs_goes_with_its_devices() {
    require_root();
    let hosts = TwoHosts::new();
    // A namespace with no process, linked to the client by a veth pair, there before conntrace
    // starts (so its start-up scan opens it).
    let doomed = Netns::new(&fresh_name("ctd"));
    let (here, there) = (fresh_name("vd"), fresh_name("vp"));
    hosts.client.veth(&here, &doomed, &there);
    let ct = Conntrace::start(&["--port", "3306"]);
    // Its counters are read at least once.
    std::thread::sleep(Duration::from_millis(1500));
    let deleted = Instant::now();
    drop(doomed);
    let link_there = || {
        std::process::Command::new("ip")
            .args(["-n", &hosts.client.name, "link", "show", &here])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // Bounded: 50 looks, 100 ms apart.
    let gone = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        !link_there()
    });
    let after = deleted.elapsed();
    println!("MEASURED the deleted namespace's veth peer went {after:?} after `ip netns del`");
    assert!(
        gone,
        "the veth pair of a deleted namespace is still there 5 s later: conntrace keeps it alive"
    );
    assert!(after < Duration::from_secs(3), "{after:?}");
    ct.stop();
}
