//! Container scenarios: real Podman containers and containerd tasks in the test's own network
//! namespaces, the real conntrace naming them on its records (`container`), and `--container` /
//! `--pod` tracing only theirs. Every container is removed on drop; none uses Podman's bridge
//! network, and nothing changes in the machine's own namespace.

use std::time::Duration;

use conntrace_tests::{
    Conntrace, PORT, Scenario, TempDir, connect,
    containers::{
        CtrContainer, PodmanContainer, PodmanService, TEST_BASE as BASE_IMAGE, ctr_has, podman_has,
        unique,
    },
    verdicts_in,
};
use serde_json::{Value, json};

/// The verdict of `side` in `netns` whose client port is `client_port`.
fn verdict_of(values: &[Value], netns: u64, side: &str, client_port: u16) -> Value {
    let port = if side == "client" { "sport" } else { "dport" };
    verdicts_in(values, netns)
        .into_iter()
        .find(|v| v["side"] == side && v[port] == client_port)
        .unwrap_or_else(|| {
            panic!("no {side} verdict for port {client_port} in {netns}: {values:?}")
        })
}

/// The `container` a Podman container gets on records.
fn podman_container(c: &PodmanContainer) -> Value {
    json!({
        "runtime": "podman",
        "id": c.id,
        "name": c.name(),
        "image": {"name": BASE_IMAGE},
        "k8s": null,
    })
}

/// `v`'s container without `via` (which depends on whether its process was still alive).
fn container_of(v: &Value) -> Value {
    let mut c = v["container"].clone();
    if let Some(o) = c.as_object_mut() {
        o.remove("via");
    }
    c
}

/// Waits for the client verdict of `client_port`, then stops conntrace.
fn stop_after_client(ct: Conntrace, netns: u64, client_port: u16) -> Vec<Value> {
    ct.wait_for(Duration::from_secs(5), |l| {
        l.value["event"] == "verdict"
            && l.value["netns"] == netns
            && l.value["sport"] == client_port
    });
    ct.stop()
}

#[test]
fn podman_containers_name_the_server_and_the_client() {
    let service = PodmanService::start();
    let socket = service.socket();
    let scenario = Scenario::new().in_client(&["sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"]);
    // A "mysqld" container with nothing listening on 3306, and an application container.
    let mysqld = PodmanContainer::run("mysqld", &scenario.hosts.server);
    let app = PodmanContainer::run("app", &scenario.hosts.client);
    let Scenario { hosts, ct, .. } = scenario.conntrace(&[
        "--port",
        "3306",
        "--docker-socket",
        socket.to_str().expect("utf-8 path"),
    ]);
    let refused = app.connect(&hosts.server_ip, PORT, &["--sport", "41101"]);
    assert_eq!(refused.json_lines(Duration::from_secs(10))[0]["errno"], 111);
    // The same behind an INPUT DROP rule in the server's namespace.
    hosts.server.exec(&[
        "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "3306", "-j", "DROP",
    ]);
    let dropped = app.connect(
        &hosts.server_ip,
        PORT,
        &["--sport", "41102", "--timeout-ms", "20000"],
    );
    assert_eq!(dropped.json_lines(Duration::from_secs(30))[0]["errno"], 110);
    let values = stop_after_client(ct, hosts.client.inode(), 41102);

    let (srv, cli) = (hosts.server.inode(), hosts.client.inode());
    let refused_server = verdict_of(&values, srv, "server", 41101);
    println!("CONTAINER VERDICT: {refused_server}");
    assert_eq!(refused_server["reason"], "refused_no_listener");
    // No process on the server side: the namespace names the container.
    assert_eq!(refused_server["pid"], Value::Null);
    assert_eq!(refused_server["container"]["via"], "netns");
    assert_eq!(container_of(&refused_server), podman_container(&mysqld));
    let dropped_server = verdict_of(&values, srv, "server", 41102);
    assert_eq!(
        dropped_server["reason"], "netfilter_drop",
        "{dropped_server}"
    );
    assert_eq!(container_of(&dropped_server), podman_container(&mysqld));
    for (port, reason) in [(41101, "refused_no_listener"), (41102, "syn_timeout")] {
        let client = verdict_of(&values, cli, "client", port);
        assert_eq!(client["reason"], reason, "{client}");
        assert_eq!(client["comm"], "ct-client");
        assert_eq!(container_of(&client), podman_container(&app), "{client}");
    }
    let names = (mysqld.name().to_owned(), app.name().to_owned());
    drop((mysqld, app));
    assert!(
        !podman_has(&names.0) && !podman_has(&names.1),
        "containers left"
    );
}

#[test]
fn containerd_pod_labels_name_the_pod_and_pod_traces_only_it() {
    let none = TempDir::new("ct-no-docker");
    let scenario = Scenario::new();
    let (id, pod) = (unique("ct-db"), unique("db"));
    let db = CtrContainer::run(
        &id,
        &scenario.hosts.server,
        &[
            ("io.kubernetes.pod.namespace", "shop"),
            ("io.kubernetes.pod.name", &pod),
            ("io.kubernetes.container.name", "mysql"),
        ],
    );
    let selector = format!("shop/{pod}");
    let Scenario { hosts, ct, .. } = scenario.conntrace(&[
        "--port",
        "3306",
        "--containerd-socket",
        "/run/containerd/containerd.sock",
        "--docker-socket",
        none.join("docker.sock").to_str().expect("utf-8 path"),
        "--pod",
        &selector,
    ]);
    let client = connect(&hosts.client, &hosts.server_ip, PORT, &["--sport", "41111"]);
    assert_eq!(client.json_lines(Duration::from_secs(10))[0]["errno"], 111);
    let values = ct.stop_after_verdict_in(hosts.server.inode());

    let v = verdict_of(&values, hosts.server.inode(), "server", 41111);
    println!("POD VERDICT: {v}");
    assert_eq!(v["reason"], "refused_no_listener");
    assert_eq!(
        v["container"],
        json!({
            "runtime": "containerd",
            "id": id,
            "name": "mysql",
            "image": {"name": BASE_IMAGE},
            "k8s": {"namespace": "shop", "pod": pod, "container": "mysql"},
            "via": "netns",
        })
    );
    // --pod: the client's namespace (no container) is not traced, nor any other.
    only_in(&values, hosts.server.inode());
    drop(db);
    assert!(!ctr_has(&id), "container {id} left");
}

/// Every verdict and drop is in namespace `netns`.
fn only_in(values: &[Value], netns: u64) {
    let others: Vec<&Value> = values
        .iter()
        .filter(|v| (v["event"] == "verdict" || v["event"] == "drop") && v["netns"] != netns)
        .collect();
    assert!(
        others.is_empty(),
        "records outside netns {netns}: {others:?}"
    );
}

#[test]
fn container_filter_traces_only_that_container() {
    let service = PodmanService::start();
    let socket = service.socket();
    let scenario = Scenario::new();
    let mysqld = PodmanContainer::run("only", &scenario.hosts.server);
    let Scenario { hosts, ct, .. } = scenario.conntrace(&[
        "--port",
        "3306",
        "--docker-socket",
        socket.to_str().expect("utf-8 path"),
        "--container",
        mysqld.name(),
    ]);
    let client = connect(&hosts.client, &hosts.server_ip, PORT, &["--sport", "41121"]);
    assert_eq!(client.json_lines(Duration::from_secs(10))[0]["errno"], 111);
    let values = ct.stop_after_verdict_in(hosts.server.inode());

    let v = verdict_of(&values, hosts.server.inode(), "server", 41121);
    assert_eq!(container_of(&v), podman_container(&mysqld));
    // The client ran in a namespace without a container: not traced.
    assert!(verdicts_in(&values, hosts.client.inode()).is_empty());
    only_in(&values, hosts.server.inode());
}
