//! conntrace's own image (`Containerfile`), run as the README and the DaemonSet run it: with
//! Podman, in the host's PID and network namespaces, with only the documented capabilities and
//! mounts. `cargo xtask test` builds the image from the debug binary (CONNTRACE_IMAGE).
//!
//! The host's network namespace is allowed here only because conntrace reads it and changes
//! nothing there: the tests check that the machine's firewall and sysctls, and the rulesets of
//! the test's own hosts, are exactly as they were.

use std::{process::Command, time::Duration};

use conntrace_tests::{
    Conntrace, Netns, PORT, Scenario, attach_args, connect, containers, helper_bin,
    only_verdict_in, proc_mib,
};
use serde_json::Value;

/// The capabilities the README and deploy/kubernetes/daemonset.yaml give the container (all
/// others dropped); README "Requirements" says why each is needed.
const CAPS: &[&str] = &[
    "BPF",
    "PERFMON",
    "NET_ADMIN",
    "NET_RAW",
    "SYS_ADMIN",
    "SYS_PTRACE",
    "SYSLOG",
];

/// `podman run` of conntrace's image as the README shows it; `args` go to conntrace. With
/// `runtime_socket`, that socket's directory is mounted read-only and given to conntrace
/// (`--docker-socket`), as the README mounts the runtime's socket.
fn podman_run(
    container: &containers::Container,
    image: &str,
    runtime_socket: Option<&std::path::Path>,
    args: &[&str],
) -> Command {
    let mut cmd = containers::podman();
    cmd.args(["run", "--rm", "--name", &container.name])
        .args(["--pid", "host", "--network", "host"])
        .args([
            "--read-only",
            "--cap-drop",
            "all",
            "--cap-add",
            &CAPS.join(","),
        ])
        .args(["-v", "/sys/kernel/tracing:/sys/kernel/tracing:ro"])
        .args(["-v", "/sys/kernel/btf:/sys/kernel/btf:ro"])
        .args(["-v", "/run/netns:/run/netns:ro,rslave"])
        .args(["-e", &format!("NODE_NAME={NODE}")])
        .args([
            "-e",
            &format!(
                "RUST_LOG={}",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "conntrace=warn".into())
            ),
        ]);
    if let Some(socket) = runtime_socket {
        let dir = socket.parent().expect("the socket's directory").display();
        cmd.args(["-v", &format!("{dir}:{dir}:ro")]);
    }
    cmd.arg(image).arg("--json").args(attach_args());
    if let Some(socket) = runtime_socket {
        cmd.arg("--docker-socket").arg(socket);
    }
    cmd.args(args);
    cmd
}

/// The node name the container is given (`NODE_NAME`, as the DaemonSet's downward API sets it).
const NODE: &str = "image-test-node";

/// A namespace's nftables ruleset without its counters (which the test's traffic moves).
fn ruleset(ns: &Netns) -> String {
    let text = ns.exec(&["nft", "list", "ruleset"]);
    let mut words: Vec<&str> = Vec::new();
    let mut tokens = text.split_whitespace().peekable();
    while let Some(t) = tokens.next() {
        if matches!(t, "packets" | "bytes") {
            tokens.next();
            continue;
        }
        words.push(t);
    }
    words.join(" ")
}

/// GET http://`addr``path`: status and body.
fn get(addr: &str, path: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut resp = agent
        .get(format!("http://{addr}{path}"))
        .call()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().expect("body"))
}

/// A loopback address with a port free now.
fn free_loopback_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

#[test]
fn conntrace_in_its_image_names_the_rule_and_both_sides_verdicts() {
    conntrace_tests::require_root();
    let image = containers::conntrace_image();
    containers::run_netns_mount();
    let root = containers::RootNamespace::now();
    let metrics = free_loopback_addr();
    let container = containers::Container::named("ct-image");
    // Podman's Docker-compatible API, for the container names (the README mounts the
    // runtime's socket read-only).
    let service = containers::PodmanService::start();
    // conntrace first, the hosts after: the namespaces appear while it runs, as pods do on a
    // node, and reach its container through the /run/netns mount (rslave).
    let ct = Conntrace::spawn(
        podman_run(
            &container,
            &image,
            Some(&service.socket()),
            &["--port", "3306", "--metrics-addr", &metrics],
        ),
        "podman run conntrace's image",
    );
    assert_eq!(get(&metrics, "/healthz"), (200, "ok\n".to_owned()));
    let Scenario { hosts, .. } = Scenario::new()
        .in_server(&[
            "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "3306", "-j", "DROP",
        ])
        .in_client(&["sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"]);
    let (server_rules, client_rules) = (ruleset(&hosts.server), ruleset(&hosts.client));
    // A "mysqld" container in the server's namespace (nothing listens: the rule drops first).
    let mysqld = containers::PodmanContainer::run("mysqld", &hosts.server);
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &["--sport", "41033", "--timeout-ms", "20000"],
    );
    let client_pid = client.pid();
    let results = client.json_lines(Duration::from_secs(30));
    assert_eq!(results[0]["errno"], 110, "ETIMEDOUT only: {results:?}");
    let values = ct.stop_after_verdict_in(hosts.client.inode());

    // The client: SYNs unanswered, by the connecting process, seen from inside the container.
    let c = only_verdict_in(&values, hosts.client.inode());
    assert_eq!(
        (&c["side"], &c["reason"], &c["errno"]),
        (&"client".into(), &"syn_timeout".into(), &"ETIMEDOUT".into()),
        "{c}"
    );
    assert_eq!(c["detail"]["cause"], "kernel_gave_up", "{c}");
    assert_eq!(
        (c["pid"].as_u64(), c["comm"].as_str()),
        (Some(u64::from(client_pid)), Some("ct-client")),
        "host PIDs: {c}"
    );
    assert_eq!(
        (c["saddr"].as_str(), c["sport"].as_u64()),
        (Some(hosts.client_ip.as_str()), Some(41033))
    );
    assert_eq!(
        (c["daddr"].as_str(), c["dport"].as_u64()),
        (Some(hosts.server_ip.as_str()), Some(3306))
    );
    let syns = c["syn_retransmits"].as_u64().expect("count") + 1;
    // The server: every SYN dropped by the rule, named by `nft` inside the image.
    let s = only_verdict_in(&values, hosts.server.inode());
    assert_eq!(
        (&s["side"], &s["reason"], &s["kernel_reason"]),
        (
            &"server".into(),
            &"netfilter_drop".into(),
            &"NETFILTER_DROP".into()
        ),
        "{s}"
    );
    assert_eq!(s["detail"]["hook"], "INPUT", "{s}");
    let rule = &s["detail"]["rule"];
    assert_eq!(
        (
            &rule["family"],
            &rule["table"],
            &rule["chain"],
            &rule["text"]
        ),
        (
            &Value::from("ip"),
            &Value::from("filter"),
            &Value::from("INPUT"),
            &Value::from("tcp dport 3306 drop")
        ),
        "{s}"
    );
    // The rule's counter moved by the time of the look-up (the first drop): at least one.
    assert!(rule["packets"].as_u64() >= Some(1), "{s}");
    assert_eq!(s["detail"]["dropped"], syns, "{s}");
    assert_eq!(
        (s["saddr"].as_str(), s["sport"].as_u64()),
        (Some(hosts.server_ip.as_str()), Some(3306))
    );
    assert_eq!(
        (s["daddr"].as_str(), s["dport"].as_u64()),
        (Some(hosts.client_ip.as_str()), Some(41033))
    );
    println!("conntrace in its image, client: {c}\nconntrace in its image, server: {s}");
    // The server's verdict has no process: its namespace names the container, through the
    // runtime's API on the mounted socket. The client is no container's: null.
    assert_eq!(
        (
            &s["container"]["runtime"],
            &s["container"]["id"],
            &s["container"]["name"],
            &s["container"]["via"]
        ),
        (
            &Value::from("podman"),
            &Value::from(mysqld.id.as_str()),
            &Value::from(mysqld.name()),
            &Value::from("netns")
        ),
        "{s}"
    );
    assert_eq!(c["container"], Value::Null, "{c}");
    // NODE_NAME on every record, from the ready line to the summary.
    for v in &values {
        assert_eq!(v["node"], NODE, "{v}");
    }
    drop(mysqld);
    drop(service);

    // conntrace changed no rule, here or anywhere.
    assert_eq!(ruleset(&hosts.server), server_rules);
    assert_eq!(ruleset(&hosts.client), client_rules);
    drop(hosts);
    drop(container);
    assert_eq!(containers::RootNamespace::now(), root);
}

fn daemonset() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/kubernetes/daemonset.yaml");
    std::fs::read_to_string(&path).expect("read deploy/kubernetes/daemonset.yaml")
}

/// The limit deploy/kubernetes/daemonset.yaml sets on `resource` (`memory: 256Mi` → MiB).
fn daemonset_limit(resource: &str) -> f64 {
    let text = daemonset();
    let value = text
        .lines()
        .skip_while(|l| l.trim() != "limits:")
        .find_map(|l| l.trim().strip_prefix(&format!("{resource}:")))
        .unwrap_or_else(|| panic!("no {resource} limit in the DaemonSet"))
        .trim()
        .to_owned();
    value
        .strip_suffix("Mi")
        .unwrap_or_else(|| panic!("{resource} limit {value}: want Mi"))
        .parse()
        .expect("MiB")
}

/// The DaemonSet's container args (its `args:` list), with `--metrics-addr` moved to `metrics`
/// (a free loopback port: the test must not take the node port).
fn daemonset_args(metrics: &str) -> Vec<String> {
    let text = daemonset();
    let mut args: Vec<String> = text
        .lines()
        .skip_while(|l| l.trim() != "args:")
        .skip(1)
        .filter(|l| !l.trim().starts_with('#'))
        .map_while(|l| l.trim().strip_prefix("- "))
        .map(|a| a.trim_matches('"').to_owned())
        .collect();
    assert!(!args.is_empty(), "no args in the DaemonSet");
    let at = args
        .iter()
        .position(|a| a == "--metrics-addr")
        .expect("the DaemonSet serves metrics");
    args[at + 1] = metrics.to_owned();
    args
}

/// The container's memory (its cgroup's peak: the process, and the BPF maps it created, which
/// the kernel charges to the memory cgroup) and CPU while it traces a connection churn, with
/// the DaemonSet's arguments (every port), against the DaemonSet's memory limit. CI: 3 s at 2,000
/// connections a second with the debug image. The figures behind the DaemonSet's requests come
/// from the release image, e.g. `CONNTRACE_IMAGE=localhost/conntrace:latest
/// CONNTRACE_IMAGE_CHURN_RATE=20000` (0: as fast as the machine allows).
#[test]
fn conntrace_in_its_image_stays_within_the_daemonset_limits_under_churn() {
    conntrace_tests::require_root();
    let image = containers::conntrace_image();
    let rate: u64 = std::env::var("CONNTRACE_IMAGE_CHURN_RATE")
        .ok()
        .map_or(2000, |r| r.parse().expect("CONNTRACE_IMAGE_CHURN_RATE"));
    let ms: u64 = std::env::var("CONNTRACE_IMAGE_CHURN_MS")
        .ok()
        .map_or(3000, |r| r.parse().expect("CONNTRACE_IMAGE_CHURN_MS"));
    let root = containers::RootNamespace::now();
    let churn = Scenario::churn(PORT);
    let container = containers::Container::named("ct-image-churn");
    // The DaemonSet's own arguments: every port, its ring buffer, metrics and probe.
    let metrics = free_loopback_addr();
    let args = daemonset_args(&metrics);
    let args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--json")
        .collect();
    let ct = Conntrace::spawn(
        podman_run(&container, &image, None, &args),
        "podman run conntrace's image",
    );
    assert_eq!(get(&metrics, "/healthz"), (200, "ok\n".to_owned()));
    let pid = container.host_pid();
    assert_ne!(pid, 0, "the container's process");
    let idle = containers::CgroupFigures::of(pid);
    let hosts = &churn.hosts;
    let started = std::time::Instant::now();
    let out = hosts
        .client
        .command(helper_bin("ctload").to_str().expect("utf-8 path"))
        .args(["churn", &hosts.server_ip, &PORT.to_string()])
        .args(["--for-ms", &ms.to_string(), "--rate", &rate.to_string()])
        .output()
        .expect("run ctload churn");
    let line: Value = serde_json::from_slice(&out.stdout).expect("ctload's line");
    let busy = containers::CgroupFigures::of(pid);
    let secs = started.elapsed().as_secs_f64();
    let (rss, hwm) = (proc_mib(pid, "VmRSS"), proc_mib(pid, "VmHWM"));
    let values = ct.stop();
    let summary = values.last().expect("summary");
    let connections = line["connections"].as_u64().expect("connections");
    let cpu = (busy.cpu_s - idle.cpu_s) / secs;
    println!(
        "MEASURED image: {connections} connections in {secs:.1} s ({:.0}/s), {} kernel events ({:.0}/s), {} lost; container CPU {:.1} % of a core; memory cgroup {:.1} MiB at the end, peak {:.1} MiB (peak after start-up {:.1} MiB); conntrace RSS {rss:.1} MiB, peak {hwm:.1} MiB",
        connections as f64 / secs,
        summary["kernel_events"],
        summary["kernel_events"].as_f64().unwrap_or_default() / secs,
        summary["lost_events"],
        100.0 * cpu,
        busy.now_mib,
        busy.peak_mib,
        idle.peak_mib,
    );
    assert_eq!(line["failed"], 0, "{line}");
    // Every port is traced: the machine's other connections count too.
    assert!(
        summary["established"]["client"].as_u64() >= Some(connections),
        "{summary}"
    );
    let limit = daemonset_limit("memory");
    assert!(
        busy.peak_mib < limit,
        "memory peak {:.1} MiB over the DaemonSet's limit {limit} MiB",
        busy.peak_mib
    );
    drop(churn);
    drop(container);
    assert_eq!(containers::RootNamespace::now(), root);
}
