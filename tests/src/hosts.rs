//! Two hosts on one machine: network namespaces joined by a veth pair, deleted on drop.

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

/// A client and a server namespace joined by a veth pair on 10.77.N.0/24 and fd77:N::/64.
pub struct TwoHosts {
    pub client: Netns,
    pub server: Netns,
    pub client_ip: String,
    pub server_ip: String,
    pub client_ip6: String,
    pub server_ip6: String,
}

impl TwoHosts {
    pub fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}{n}", std::process::id() % 100_000);
        let subnet = 100 + (std::process::id() % 50) * 3 + n % 3;
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
