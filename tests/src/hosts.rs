//! Hosts on one machine: network namespaces joined by veth pairs, deleted on drop. Two hosts
//! share one link ([`TwoHosts`]); three ([`ThreeHosts`]) reach each other through a router.

use std::{
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::sh;

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
    /// False after [`Netns::unname`]: the namespace then goes with its last process.
    named: bool,
}

impl Netns {
    pub fn new(name: &str) -> Self {
        sh(&["ip", "netns", "add", name]);
        let ns = Self {
            name: name.to_owned(),
            named: true,
        };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Inode of the namespace, as conntrace reports it in `netns`.
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(format!("/run/netns/{}", self.name))
            .expect("stat netns")
            .ino()
    }

    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Sets a sysctl in this namespace (`net.ipv4.tcp_syn_retries=1`).
    pub fn sysctl(&self, setting: &str) {
        self.exec(&["sysctl", "-qw", setting]);
    }

    /// A veth pair from this namespace (`name`) to `peer` (`peer_name`), both ends up. It is
    /// created inside the namespaces: nothing appears in the machine's own, even for a moment.
    pub fn veth(&self, name: &str, peer: &Netns, peer_name: &str) {
        self.exec(&[
            "ip", "link", "add", name, "type", "veth", "peer", "name", peer_name, "netns",
            &peer.name,
        ]);
        self.exec(&["ip", "link", "set", name, "up"]);
        peer.exec(&["ip", "link", "set", peer_name, "up"]);
    }

    /// Adds `addr` (`10.0.0.1/24`) to the interface `dev`.
    pub fn addr(&self, addr: &str, dev: &str) {
        self.exec(&["ip", "addr", "add", addr, "dev", dev]);
    }

    /// The interface's link-layer address (`ip -j link`).
    pub fn mac(&self, dev: &str) -> String {
        let out = self.exec(&["ip", "-j", "link", "show", "dev", dev]);
        let links: serde_json::Value = serde_json::from_str(&out).expect("ip -j link is JSON");
        links[0]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("no address for {dev}: {out}"))
            .to_owned()
    }

    /// Runs `ip -6 ARGS` in this namespace.
    pub fn ip6(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-6"];
        full.extend_from_slice(args);
        self.exec(&full)
    }

    /// Waits until a TCP connection of this namespace to remote `port` is established
    /// (`ss`), polling every 20 ms for at most `timeout`; panics when none is.
    pub fn wait_established(&self, port: u16, timeout: std::time::Duration) {
        let filter = format!("dport = :{port}");
        let start = std::time::Instant::now();
        while start.elapsed() < timeout {
            let out = self.exec(&["ss", "-Htn", "state", "established", &filter]);
            if !out.trim().is_empty() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!(
            "no connection to port {port} established in {timeout:?} in {}",
            self.name
        );
    }

    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Netns {
    /// Removes the namespace's name (`/run/netns/NAME`): like a Docker container's, it is then
    /// known only through `/proc/PID/ns/net` of the processes in it, and goes with the last of
    /// them. Make every change in it first: [`Netns::exec`] needs the name.
    pub fn unname(&mut self) {
        sh(&["ip", "netns", "del", &self.name]);
        self.named = false;
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.named {
            return;
        }
        // Deleting the namespace removes its interfaces, routes and firewall rules.
        let status = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("warning: could not delete netns {}", self.name);
        }
    }
}

static NEXT: AtomicU32 = AtomicU32::new(1);

/// A fresh id for the names of one test's namespaces and interfaces, and its subnet number
/// (100..250; the third byte of the test's addresses).
fn fresh_id() -> (String, u32) {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let id = format!("{}{n}", std::process::id() % 100_000);
    (id, 100 + (std::process::id() % 50) * 3 + n % 3)
}

/// A name for one more namespace or interface a test makes itself: `prefix` and a fresh id
/// (15 characters at most for a 3-character prefix, the limit for an interface name).
pub fn fresh_name(prefix: &str) -> String {
    format!("{prefix}{}", fresh_id().0)
}

/// A client and a server namespace joined by a veth pair on 10.77.N.0/24 and fd77:N::/64.
pub struct TwoHosts {
    pub client: Netns,
    pub server: Netns,
    /// The interfaces of the veth pair, in the client and in the server.
    pub client_if: String,
    pub server_if: String,
    pub client_ip: String,
    pub server_ip: String,
    pub client_ip6: String,
    pub server_ip6: String,
}

impl TwoHosts {
    pub fn new() -> Self {
        let (id, subnet) = fresh_id();
        let client = Netns::new(&format!("ctc{id}"));
        let server = Netns::new(&format!("cts{id}"));
        let (vc, vs) = (format!("vc{id}"), format!("vs{id}"));
        sh(&[
            "ip", "link", "add", &vc, "type", "veth", "peer", "name", &vs,
        ]);
        sh(&["ip", "link", "set", &vc, "netns", &client.name]);
        sh(&["ip", "link", "set", &vs, "netns", &server.name]);
        let client_ip = format!("10.77.{subnet}.1");
        let server_ip = format!("10.77.{subnet}.2");
        client.exec(&["ip", "addr", "add", &format!("{client_ip}/24"), "dev", &vc]);
        server.exec(&["ip", "addr", "add", &format!("{server_ip}/24"), "dev", &vs]);
        let client_ip6 = format!("fd77:{subnet}::1");
        let server_ip6 = format!("fd77:{subnet}::2");
        client.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{client_ip6}/64"),
            "dev",
            &vc,
            "nodad",
        ]);
        server.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{server_ip6}/64"),
            "dev",
            &vs,
            "nodad",
        ]);
        client.exec(&["ip", "link", "set", &vc, "up"]);
        server.exec(&["ip", "link", "set", &vs, "up"]);
        Self {
            client,
            server,
            client_if: vc,
            server_if: vs,
            client_ip,
            server_ip,
            client_ip6,
            server_ip6,
        }
    }
}

impl TwoHosts {
    /// An address on the hosts' IPv4 subnet that neither host owns (`last` is its last byte).
    pub fn unowned_ip(&self, last: u8) -> String {
        let (net, _) = self.client_ip.rsplit_once('.').expect("IPv4 address");
        format!("{net}.{last}")
    }
}

impl Default for TwoHosts {
    fn default() -> Self {
        Self::new()
    }
}

/// A client and a server in different subnets, joined through a third namespace that routes
/// between them (`ip_forward=1` inside it only, as a Docker or Kubernetes node does for its
/// containers): client 10.78.N.1 — 10.78.N.254 router 10.79.N.254 — 10.79.N.2 server, with
/// the endpoints' default routes via the router; for IPv6 the same on fd78:N::/64 and
/// fd79:N::/64 (router `::fe`, IPv6 forwarding inside it only). The veth pairs are created
/// inside the namespaces.
pub struct ThreeHosts {
    pub client: Netns,
    pub router: Netns,
    pub server: Netns,
    pub client_ip: String,
    pub server_ip: String,
    pub client_ip6: String,
    pub server_ip6: String,
    /// The router's address on the client's link, and on the server's.
    pub router_client_ip: String,
    pub router_server_ip: String,
    /// The client's interface, the router's towards the client and towards the server, the
    /// server's.
    pub client_if: String,
    pub router_client_if: String,
    pub router_server_if: String,
    pub server_if: String,
}

impl ThreeHosts {
    pub fn new() -> Self {
        let (id, subnet) = fresh_id();
        let client = Netns::new(&format!("ctc{id}"));
        let router = Netns::new(&format!("ctr{id}"));
        let server = Netns::new(&format!("cts{id}"));
        let (client_if, router_client_if) = (format!("vc{id}"), format!("rc{id}"));
        let (router_server_if, server_if) = (format!("rs{id}"), format!("vs{id}"));
        client.veth(&client_if, &router, &router_client_if);
        server.veth(&server_if, &router, &router_server_if);
        let (client_net, server_net) = (format!("10.78.{subnet}"), format!("10.79.{subnet}"));
        let (client_net6, server_net6) = (format!("fd78:{subnet}:"), format!("fd79:{subnet}:"));
        let hosts = Self {
            client_ip: format!("{client_net}.1"),
            server_ip: format!("{server_net}.2"),
            client_ip6: format!("{client_net6}:1"),
            server_ip6: format!("{server_net6}:2"),
            router_client_ip: format!("{client_net}.254"),
            router_server_ip: format!("{server_net}.254"),
            client,
            router,
            server,
            client_if,
            router_client_if,
            router_server_if,
            server_if,
        };
        let h = &hosts;
        h.client.addr(&format!("{}/24", h.client_ip), &h.client_if);
        h.router
            .addr(&format!("{}/24", h.router_client_ip), &h.router_client_if);
        h.router
            .addr(&format!("{}/24", h.router_server_ip), &h.router_server_if);
        h.server.addr(&format!("{}/24", h.server_ip), &h.server_if);
        h.client
            .exec(&["ip", "route", "add", "default", "via", &h.router_client_ip]);
        h.server
            .exec(&["ip", "route", "add", "default", "via", &h.router_server_ip]);
        h.router.sysctl("net.ipv4.ip_forward=1");
        hosts.add_ipv6(&client_net6, &server_net6);
        hosts
    }
}

impl ThreeHosts {
    /// IPv6 on the two links (`NET::1`/`NET::2` the endpoints, `NET::fe` the router), the
    /// endpoints' default routes via the router, forwarding in the router. Addresses skip
    /// duplicate address detection (usable at once) and each end's neighbour is fixed: with
    /// neighbour discovery the first packet through the router was lost (a first connection
    /// took a SYN retransmission, one second, and its RTO stayed at the 3 s fallback).
    fn add_ipv6(&self, client_net6: &str, server_net6: &str) {
        let (client_gw, server_gw) = (format!("{client_net6}:fe"), format!("{server_net6}:fe"));
        let links = [
            (&self.client, &self.client_if, &self.client_ip6, &client_gw),
            (
                &self.router,
                &self.router_client_if,
                &client_gw,
                &self.client_ip6,
            ),
            (
                &self.router,
                &self.router_server_if,
                &server_gw,
                &self.server_ip6,
            ),
            (&self.server, &self.server_if, &self.server_ip6, &server_gw),
        ];
        for (ns, dev, addr, _) in links {
            ns.ip6(&["addr", "add", &format!("{addr}/64"), "dev", dev, "nodad"]);
        }
        self.client
            .ip6(&["route", "add", "default", "via", &client_gw]);
        self.server
            .ip6(&["route", "add", "default", "via", &server_gw]);
        self.router.sysctl("net.ipv6.conf.all.forwarding=1");
        // Each end's neighbour: the address at the other end of its link.
        let other_end = |i: usize| links[i ^ 1];
        for (i, (ns, dev, _, neighbour)) in links.iter().enumerate() {
            let (peer, peer_dev, ..) = other_end(i);
            let lladdr = peer.mac(peer_dev);
            ns.ip6(&[
                "neigh",
                "add",
                neighbour,
                "lladdr",
                &lladdr,
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
    }
}

impl Default for ThreeHosts {
    fn default() -> Self {
        Self::new()
    }
}

/// What every scenario's hosts have: a client, a server and the server's address. The steps of
/// [`crate::Scenario`] work on any of them.
pub trait Hosts {
    fn client(&self) -> &Netns;
    fn server(&self) -> &Netns;
    /// The server's IPv4 address, the one the scenarios serve on.
    fn server_ip(&self) -> &str;
    /// The server's IPv6 address.
    fn server_ip6(&self) -> &str;
}

impl Hosts for TwoHosts {
    fn client(&self) -> &Netns {
        &self.client
    }
    fn server(&self) -> &Netns {
        &self.server
    }
    fn server_ip(&self) -> &str {
        &self.server_ip
    }
    fn server_ip6(&self) -> &str {
        &self.server_ip6
    }
}

impl Hosts for ThreeHosts {
    fn client(&self) -> &Netns {
        &self.client
    }
    fn server(&self) -> &Netns {
        &self.server
    }
    fn server_ip(&self) -> &str {
        &self.server_ip
    }
    fn server_ip6(&self) -> &str {
        &self.server_ip6
    }
}
