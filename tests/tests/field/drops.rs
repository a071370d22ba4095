//! Inputs 2, 3 and 7: a kernel drop that explains a failure becomes its verdict, on the host
//! that dropped: the server's reverse-path filter, the server's full conntrack table, the
//! client's own kube-proxy REJECT, and a neighbour failure that arrives just after the close.

use std::time::{Duration, Instant};

use conntrace_tests::{Netns, PORT, Scenario, TempDir, TwoHosts, connect, drops_in, fresh_name};
use serde_json::Value;

use crate::{assert_peer_failed, detail, expect_verdicts, report, stop_after, subnet_of};

/// A second link of the server, to a namespace of its own, and a second client address the
/// server routes back out of that link: the server's reverse-path filter refuses the client.
struct AsymmetricReturn {
    /// The namespace at the far end of the server's second link (kept until the test ends).
    _far: Netns,
    /// The client's second address, the source of its connection.
    client_alias: String,
    /// The server's second interface, where the route back to `client_alias` leaves.
    server_other_if: String,
}

impl AsymmetricReturn {
    fn new(h: &TwoHosts) -> Self {
        let n = subnet_of(&h.client_ip).to_owned();
        let far = Netns::new(&fresh_name("ctf"));
        let (server_other_if, far_if) = (fresh_name("so"), fresh_name("fo"));
        h.server.veth(&server_other_if, &far, &far_if);
        h.server.addr(&format!("10.89.{n}.2/24"), &server_other_if);
        far.addr(&format!("10.89.{n}.1/24"), &far_if);
        let client_alias = format!("10.88.{n}.1");
        h.client.addr(&format!("{client_alias}/32"), &h.client_if);
        // The server's route back to the client's second address leaves by its other link.
        h.server.exec(&[
            "ip",
            "route",
            "add",
            &format!("10.88.{n}.0/24"),
            "via",
            &format!("10.89.{n}.1"),
            "dev",
            &server_other_if,
        ]);
        for conf in ["all", &h.server_if, &server_other_if] {
            h.server
                .sysctl(&format!("net.ipv4.conf.{conf}.rp_filter=1"));
        }
        // ARP from the odd source would go unanswered too (EHOSTUNREACH, a neighbour failure):
        // a static entry leaves the SYNs' drop as the only failure.
        let mac = h.server.mac(&h.server_if);
        h.client.exec(&[
            "ip",
            "neigh",
            "replace",
            &h.server_ip,
            "lladdr",
            &mac,
            "dev",
            &h.client_if,
            "nud",
            "permanent",
        ]);
        Self {
            _far: far,
            client_alias,
            server_other_if,
        }
    }
}

#[test]
fn a_reverse_path_filter_drop_is_rp_filter_drop_on_the_server_and_a_syn_timeout_on_the_client() {
    let scenario = Scenario::new().in_client(&["sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"]);
    let path = AsymmetricReturn::new(&scenario.hosts);
    let Scenario {
        hosts,
        ct,
        server: _server,
    } = scenario
        .serve(&["--greeting", "hello"])
        .conntrace(&["--port", "3306"]);
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &["--bind", &path.client_alias, "--timeout-ms", "20000"],
    );
    let results = client.json_lines(Duration::from_secs(30));
    // tcp_syn_retries=1: 3 SYNs (1 s apart, linear), ETIMEDOUT after about 3 s.
    assert_peer_failed(&results[0], 110, 2500.0..6000.0);
    let (client_ns, server_ns) = (hosts.client.inode(), hosts.server.inode());
    let values = stop_after(
        ct,
        Duration::from_secs(3),
        &[(client_ns, "failed"), (server_ns, "failed")],
    );
    report(
        "rp_filter",
        &values,
        &[("client", client_ns), ("server", server_ns)],
    );

    let c = &expect_verdicts(&values, client_ns, &["client failed syn_timeout ETIMEDOUT"])[0];
    assert_eq!(c["saddr"], path.client_alias.as_str(), "{c}");
    let syns = c["syn_retransmits"].as_u64().expect("count") + 1;
    let s = &expect_verdicts(&values, server_ns, &["server failed rp_filter_drop -"])[0];
    assert_eq!(s["kernel_reason"], "IP_RPFILTER", "{s}");
    assert_eq!(
        (&s["sport"], s["daddr"].as_str(), &s["dport"]),
        (
            &Value::from(3306),
            Some(path.client_alias.as_str()),
            &c["sport"]
        ),
        "{s}"
    );
    assert_eq!(
        detail(s, "rp_filter.arrived_on"),
        hosts.server_if.as_str(),
        "{s}"
    );
    assert_eq!(
        detail(s, "rp_filter.route_back_via"),
        path.server_other_if.as_str(),
        "{s}"
    );
    assert!(
        detail(s, "rp_filter.counter").as_u64() >= Some(syns),
        "TcpExtIPReversePathFilter counts every SYN ({syns}): {s}"
    );
    assert!(drops_in(&values, server_ns).is_empty(), "joined, not loose");
}

/// Fills the namespace's conntrack table to the global nf_conntrack_max (read-only in a child
/// namespace; the limit compares the namespace's own count with it) with ASSURED entries, which
/// early drop cannot evict. Returns the max. Entries are inserted through ctnetlink inside
/// `ns`: nothing is created in the machine's own table.
fn fill_conntrack(ns: &Netns, server_ip: &str) -> u64 {
    let read = |key: &str| -> u64 {
        let text = ns.exec(&["cat", &format!("/proc/sys/net/netfilter/{key}")]);
        text.trim().parse().expect("a number")
    };
    let max = read("nf_conntrack_max");
    let dir = TempDir::new("ct-fill");
    let file = dir.join("entries");
    let missing = max - read("nf_conntrack_count");
    let entries: String = (0..missing + 50)
        .map(|i| {
            format!(
                "-I -p tcp -s 198.18.{}.{} -d {server_ip} --sport {} --dport 80 --state ESTABLISHED --status ASSURED,SEEN_REPLY -t 3600\n",
                i / 60_000,
                1 + i / 250 % 240,
                1024 + i % 60_000,
            )
        })
        .collect();
    std::fs::write(&file, entries).expect("write the entries");
    let (slab_before, started) = (conntrack_slab_mib(), Instant::now());
    // The inserts past the limit fail ("not enough memory"): the exit status says nothing,
    // but a conntrack that did not run says so (`ip netns exec`: `exec of "conntrack"
    // failed`).
    let out = ns
        .command("conntrack")
        .args(["-R", file.to_str().expect("utf-8 path")])
        .output()
        .expect("run conntrack -R");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !said.starts_with("exec of"),
        "conntrack did not run (Debian's conntrack package; `cargo xtask setup` installs it): {}",
        said.trim()
    );
    let count = read("nf_conntrack_count");
    println!(
        "MEASURED conntrack fill: {count}/{max} entries in {:.1} s, nf_conntrack slab +{:.0} MiB",
        started.elapsed().as_secs_f64(),
        conntrack_slab_mib() - slab_before
    );
    assert_eq!(
        count,
        max,
        "the server's table is full; conntrack -R said: {}",
        said.lines().take(3).collect::<Vec<_>>().join(" | ")
    );
    max
}

/// Memory of the nf_conntrack slab cache (all namespaces), from /proc/slabinfo.
fn conntrack_slab_mib() -> f64 {
    let info = std::fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    info.lines()
        .find(|l| l.starts_with("nf_conntrack "))
        .map_or(0.0, |l| {
            let f: Vec<f64> = l
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            f[1] * f[2] / (1024.0 * 1024.0)
        })
}

/// The machine's own conntrack count (read only).
fn root_conntrack_count() -> u64 {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
        .map_or(0, |s| s.trim().parse().unwrap_or(0))
}

#[test]
fn a_full_conntrack_table_is_conntrack_table_full_never_a_rule() {
    let root_before = root_conntrack_count();
    let scenario = Scenario::new()
        // A conntrack match makes the server's namespace track connections.
        .in_server(&[
            "iptables",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "-m",
            "conntrack",
            "--ctstate",
            "NEW,ESTABLISHED",
            "-j",
            "ACCEPT",
        ])
        .in_client(&["sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"]);
    let max = fill_conntrack(&scenario.hosts.server, &scenario.hosts.server_ip);
    let Scenario {
        hosts,
        ct,
        server: _server,
    } = scenario
        .serve(&["--greeting", "hello"])
        .conntrace(&["--port", "3306"]);
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &["--blocking", "--timeout-ms", "20000"],
    );
    let results = client.json_lines(Duration::from_secs(30));
    assert_peer_failed(&results[0], 110, 2500.0..6000.0);
    let (client_ns, server_ns) = (hosts.client.inode(), hosts.server.inode());
    let values = stop_after(
        ct,
        Duration::from_secs(3),
        &[(client_ns, "failed"), (server_ns, "failed")],
    );
    let started = Instant::now();
    hosts.server.exec(&["conntrack", "-F"]);
    println!(
        "MEASURED conntrack flush: {:.1} s; root count {root_before} before, {} after",
        started.elapsed().as_secs_f64(),
        root_conntrack_count()
    );
    assert!(
        root_conntrack_count() < root_before + 1000,
        "nothing in the machine's own table"
    );
    report(
        "conntrack_full",
        &values,
        &[("client", client_ns), ("server", server_ns)],
    );

    expect_verdicts(&values, client_ns, &["client failed syn_timeout ETIMEDOUT"]);
    let s = &expect_verdicts(
        &values,
        server_ns,
        &["server failed conntrack_table_full -"],
    )[0];
    assert_eq!(s["kernel_reason"], "NETFILTER_DROP", "{s}");
    assert_eq!(detail(s, "hook"), "PREROUTING", "{s}");
    assert_eq!(
        detail(s, "conntrack"),
        &serde_json::json!({"count": max, "max": max}),
        "{s}"
    );
    assert!(detail(s, "rule").is_null(), "never blamed on a rule: {s}");
    assert!(drops_in(&values, server_ns).is_empty(), "joined, not loose");
}

/// kube-proxy's REJECT for a service without endpoints, in a chain jumped to from the client's
/// OUTPUT.
fn kube_services_reject(h: &TwoHosts) {
    h.client.exec(&["iptables", "-N", "KUBE-SERVICES"]);
    h.client
        .exec(&["iptables", "-A", "OUTPUT", "-j", "KUBE-SERVICES"]);
    h.client.exec(&[
        "iptables",
        "-A",
        "KUBE-SERVICES",
        "-p",
        "tcp",
        "-d",
        &h.server_ip,
        "--dport",
        "3306",
        "-m",
        "comment",
        "--comment",
        "default/mysql has no endpoints",
        "-j",
        "REJECT",
        "--reject-with",
        "icmp-port-unreachable",
    ]);
}

#[test]
fn the_clients_own_kube_proxy_reject_is_netfilter_reject_naming_the_rule_and_its_comment() {
    let Scenario {
        hosts,
        ct,
        server: _server,
    } = Scenario::new()
        .with(kube_services_reject)
        .serve(&["--greeting", "hello"])
        .conntrace(&["--port", "3306"]);
    // A blocking connect(): the first ICMP arrives while connect() holds the socket and only
    // sets a soft error; the retransmitted SYN's ICMP refuses the connection, about 1 s in.
    let client = connect(
        &hosts.client,
        &hosts.server_ip,
        PORT,
        &["--blocking", "--timeout-ms", "10000"],
    );
    let results = client.json_lines(Duration::from_secs(20));
    assert_peer_failed(&results[0], 111, 500.0..3000.0);
    let (client_ns, server_ns) = (hosts.client.inode(), hosts.server.inode());
    let values = stop_after(ct, Duration::from_secs(2), &[(client_ns, "failed")]);
    report(
        "output_reject",
        &values,
        &[("client", client_ns), ("server", server_ns)],
    );

    let c = &expect_verdicts(
        &values,
        client_ns,
        &["client failed netfilter_reject ECONNREFUSED"],
    )[0];
    assert_eq!(detail(c, "hook"), "OUTPUT", "{c}");
    assert_eq!(detail(c, "reject_with"), "icmp-port-unreachable", "{c}");
    assert_eq!(detail(c, "rule.chain"), "KUBE-SERVICES", "{c}");
    assert_eq!(
        detail(c, "rule.comment"),
        "default/mysql has no endpoints",
        "{c}"
    );
    assert_eq!(c["comm"], "ct-client", "{c}");
    // The SYN never left the client.
    expect_verdicts(&values, server_ns, &[]);
}

#[test]
fn a_neighbour_failure_that_arrives_just_after_the_close_still_explains_it() {
    let Scenario { hosts, ct, .. } = Scenario::new()
        .in_client(&["sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"])
        .conntrace(&["--port", "3306"]);
    // On the veth subnet, but nobody has it: ARP gives up after 3 probes (3 s), in the same
    // tick as the SYN budget of tcp_syn_retries=1. The TCP timer runs first: ETIMEDOUT, and
    // the queued SYN is freed with NEIGH_FAILED microseconds after the socket closed.
    let nobody = hosts.unowned_ip(77);
    let client = connect(&hosts.client, &nobody, PORT, &["--timeout-ms", "20000"]);
    let results = client.json_lines(Duration::from_secs(30));
    assert_peer_failed(&results[0], 110, 2500.0..6000.0);
    let client_ns = hosts.client.inode();
    let values = stop_after(ct, Duration::from_secs(2), &[(client_ns, "failed")]);
    report("neighbour_late", &values, &[("client", client_ns)]);

    let c = &expect_verdicts(
        &values,
        client_ns,
        &["client failed neighbour_failed ETIMEDOUT"],
    )[0];
    assert_eq!(c["kernel_reason"], "NEIGH_FAILED", "{c}");
    assert_eq!(c["daddr"], nobody.as_str(), "{c}");
    let drops = detail(c, "drops").as_array().cloned().unwrap_or_default();
    assert!(
        drops.iter().any(|d| d["kernel_reason"] == "NEIGH_FAILED"),
        "{c}"
    );
    let loose: Vec<Value> = drops_in(&values, client_ns)
        .into_iter()
        .filter(|d| d["kernel_reason"] == "NEIGH_FAILED")
        .collect();
    assert!(
        loose.is_empty(),
        "joined, not a separate record: {loose:#?}"
    );
}
