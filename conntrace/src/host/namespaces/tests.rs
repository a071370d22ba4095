//! Parsers and the cache without privileges; then, as root only (else they print "SKIP: needs
//! root"), each look-up against namespaces the test creates (`ct-nstest-PID-N`, deleted on
//! drop, also when a check fails). Traffic stays inside those namespaces.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream, UdpSocket},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use netlink_packet_sock_diag::inet::SocketId;

use super::*;
use crate::engine::lookup::RouteKind;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address literal")
}

#[test]
fn port_range_text() {
    assert_eq!(port_range("32768\t60999\n"), Some([32768, 60999]));
    assert_eq!(port_range("40000 40001"), Some([40000, 40001]));
    for bad in ["", "40000", "2 1", "1 2 3", "1 70000", "a b"] {
        assert_eq!(port_range(bad), None, "{bad:?}");
    }
}

/// A sock_diag header for a socket `local` -> `remote` in `state`.
fn diag(local: &str, remote: &str, state: u8) -> InetResponseHeader {
    let (local, remote): (SocketAddr, SocketAddr) =
        (local.parse().unwrap(), remote.parse().unwrap());
    let mut socket_id = if local.is_ipv4() {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    (socket_id.source_address, socket_id.source_port) = (local.ip(), local.port());
    (socket_id.destination_address, socket_id.destination_port) = (remote.ip(), remote.port());
    InetResponseHeader {
        family: if local.is_ipv4() { AF_INET } else { AF_INET6 },
        state,
        timer: None,
        socket_id,
        recv_queue: 0,
        send_queue: 0,
        uid: 0,
        inode: 0,
    }
}

#[test]
fn ports_count_sockets_towards_the_destination_in_the_range() {
    use netlink_packet_sock_diag::constants::{TCP_ESTABLISHED, TCP_SYN_SENT};
    let dst: SocketAddr = "10.0.0.2:3306".parse().unwrap();
    let mut use_ = PortUse {
        range: [40000, 40001],
        to_destination: 0,
        time_wait: 0,
    };
    let sockets = [
        diag("10.0.0.1:40000", "10.0.0.2:3306", TCP_TIME_WAIT),
        diag(
            "[::ffff:10.0.0.1]:40001",
            "[::ffff:10.0.0.2]:3306",
            TCP_ESTABLISHED,
        ),
        diag("10.0.0.1:39999", "10.0.0.2:3306", TCP_TIME_WAIT), // outside the range
        diag("10.0.0.1:40001", "10.0.0.2:3307", TCP_SYN_SENT),  // another port
        diag("10.0.0.1:40001", "10.0.0.3:3306", TCP_SYN_SENT),  // another host
        diag("0.0.0.0:40000", "0.0.0.0:0", TCP_LISTEN),
    ];
    for h in &sockets {
        count_port(&mut use_, dst, h);
    }
    assert_eq!((use_.to_destination, use_.time_wait), (2, 1));
}

#[test]
fn no_namespace_no_answer() {
    let mut cache = NamespaceCache::default();
    let dst: SocketAddr = "127.0.0.1:1".parse().unwrap();
    assert_eq!(cache.is_local(None, ip("127.0.0.1")), None);
    assert_eq!(cache.route_to(None, ip("127.0.0.1")), None);
    assert_eq!(cache.interface(None, 1), None);
    assert_eq!(cache.conntrack(None), None);
    assert_eq!(cache.ports_to(None, dst), None);
    assert_eq!(cache.tcp_ext(None, "TW"), None);
    // Inode 1 is no namespace: one scan of /proc, then the miss is not scanned for again
    // within REFRESH.
    assert_eq!(cache.is_local(Some(1), ip("127.0.0.1")), None);
    let scanned = cache.scanned_at.expect("scanned once");
    assert_eq!(cache.route_to(Some(1), ip("127.0.0.1")), None);
    assert!(matches!(cache.open(1), Err(NsError::NotFound(1))));
    assert_eq!(cache.scanned_at, Some(scanned));
}

// --- As root, in namespaces made here ---

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        println!("SKIP: needs root (setns, ip netns add)");
    }
    root
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace made for one test, deleted on drop.
struct TestNs {
    name: String,
    inode: u32,
}

impl TestNs {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("ct-nstest-{}-{n}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        // From here on the guard deletes it, whatever fails next.
        let mut ns = Self { name, inode: 0 };
        ns.inode = inode(Path::new(&format!("/run/netns/{}", ns.name))).expect("netns inode");
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME ARGS...`
    fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    fn sysctl(&self, settings: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", &self.name, "sysctl", "-q", "-w"];
        full.extend_from_slice(settings);
        sh(&full);
    }

    fn ifindex(&self, dev: &str) -> u32 {
        let line = self.ip(&["-o", "link", "show", dev]);
        line.split(':')
            .next()
            .unwrap()
            .trim()
            .parse()
            .expect("ifindex")
    }

    /// Runs `f` in a thread inside the namespace (its sockets are the namespace's).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = PathBuf::from(format!("/run/netns/{}", self.name));
        let ns = netns::open(&path, None).expect("open netns");
        netns::run_in(&ns, &path, "test-netns", f).expect("run in the namespace")
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let ok = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("warning: could not delete netns {}", self.name);
        }
    }
}

fn route(kind: RouteKind, dev: Option<&str>, gateway: Option<&str>) -> Option<Route> {
    Some(Route {
        kind,
        dev: dev.map(str::to_owned),
        gateway: gateway.map(ip),
    })
}

#[test]
fn addresses_interfaces_and_every_route_kind() {
    if !is_root() {
        return;
    }
    let ns = TestNs::new();
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    for cmd in [
        "link set v0 up",
        "link set v1 up",
        "addr add 10.231.0.1/24 dev v0",
        "addr add fd00:231::1/64 dev v0 nodad",
        "route add 10.232.0.0/24 via 10.231.0.2",
        "route add unreachable 10.233.1.0/24",
        "route add prohibit 10.233.2.0/24",
        "route add blackhole 10.233.3.0/24",
        "-6 route add unreachable fd00:233::/64",
        "addr add 10.236.0.1/24 dev lo",
        "addr add fd00:236::1/64 dev lo",
    ] {
        ns.ip(&cmd.split(' ').collect::<Vec<_>>());
    }
    let (mut cache, n) = (NamespaceCache::default(), Some(ns.inode));
    for (addr, local) in [
        ("10.231.0.1", true),
        ("127.0.0.5", true),
        ("::1", true),
        ("fd00:231::1", true),
        ("10.231.0.2", false),
        ("fd00:231::2", false),
        // As `ip route get` says: an IPv4 prefix on lo is local, an IPv6 one is not.
        ("10.236.0.9", true),
        ("fd00:236::9", false),
    ] {
        assert_eq!(cache.is_local(n, ip(addr)), Some(local), "{addr}");
    }
    assert_eq!(cache.interface(n, ns.ifindex("v0")).as_deref(), Some("v0"));
    assert_eq!(cache.interface(n, 1).as_deref(), Some("lo"));
    assert_eq!(cache.interface(n, 999), None);
    let cases = [
        ("10.231.0.5", route(RouteKind::Unicast, Some("v0"), None)),
        (
            "10.232.0.7",
            route(RouteKind::Unicast, Some("v0"), Some("10.231.0.2")),
        ),
        ("10.231.0.1", route(RouteKind::Local, Some("lo"), None)),
        ("10.231.0.255", route(RouteKind::Other, Some("v0"), None)),
        ("10.233.1.1", route(RouteKind::Unreachable, None, None)),
        ("10.233.2.1", route(RouteKind::Prohibit, None, None)),
        ("10.233.3.1", route(RouteKind::Blackhole, None, None)),
        ("10.250.0.1", route(RouteKind::None, None, None)),
        ("fd00:231::9", route(RouteKind::Unicast, Some("v0"), None)),
        ("fd00:233::1", route(RouteKind::Unreachable, None, None)),
        ("fd00:250::1", route(RouteKind::None, None, None)),
    ];
    for (dst, want) in cases {
        assert_eq!(cache.route_to(n, ip(dst)), want, "route to {dst}");
    }
    assert_eq!(cache.tcp_ext(n, "IPReversePathFilter"), Some(0));
    assert_eq!(cache.tcp_ext(n, "NoSuchCounter"), None);
}

#[test]
fn a_miss_refreshes_the_addresses_after_a_second_and_a_hit_is_cheap() {
    if !is_root() {
        return;
    }
    let ns = TestNs::new();
    let (mut cache, n) = (NamespaceCache::default(), Some(ns.inode));
    assert_eq!(cache.is_local(n, ip("127.0.0.1")), Some(true));
    ns.ip(&["addr", "add", "10.234.0.1/32", "dev", "lo"]);
    assert_eq!(
        cache.is_local(n, ip("10.234.0.1")),
        Some(false),
        "within a second the cached snapshot answers"
    );
    let started = Instant::now();
    for _ in 0..10_000 {
        assert_eq!(cache.is_local(n, ip("127.0.0.1")), Some(true));
    }
    let per_call = started.elapsed() / 10_000;
    println!("cached is_local: {per_call:?} a call");
    assert!(per_call < Duration::from_micros(50), "{per_call:?}");
    thread::sleep(REFRESH + Duration::from_millis(100));
    let started = Instant::now();
    assert_eq!(cache.is_local(n, ip("10.234.0.1")), Some(true));
    println!("refreshing is_local: {:?}", started.elapsed());
}

/// The ephemeral-port exhaustion of notes/issue13-facts.md §5a on loopback: a range of two
/// ports, two connections the client closes first, a third connect() that fails.
#[test]
fn ports_held_in_time_wait() {
    if !is_root() {
        return;
    }
    let ns = TestNs::new();
    ns.sysctl(&[
        "net.ipv4.ip_local_port_range=40000 40001",
        "net.ipv4.tcp_tw_reuse=0",
    ]);
    let dst: SocketAddr = "127.0.0.1:5123".parse().unwrap();
    let third = ns.run(move || {
        let timeout = Some(Duration::from_secs(2));
        let listener = TcpListener::bind(dst).expect("listen");
        for _ in 0..2 {
            let mut client = TcpStream::connect_timeout(&dst, Duration::from_secs(2)).unwrap();
            let (mut server, _) = listener.accept().unwrap();
            server.set_read_timeout(timeout).unwrap();
            client.write_all(b"x").unwrap();
            drop(client); // the client closes first...
            let mut buf = Vec::new();
            server
                .read_to_end(&mut buf)
                .expect("read until the client's FIN");
            drop(server); // ...then the server: the client's socket goes TIME_WAIT
        }
        TcpStream::connect_timeout(&dst, Duration::from_secs(2)).map_err(|e| e.raw_os_error())
    });
    assert_eq!(third.err(), Some(Some(libc::EADDRNOTAVAIL)));
    let (mut cache, n) = (NamespaceCache::default(), Some(ns.inode));
    let want = PortUse {
        range: [40000, 40001],
        to_destination: 2,
        time_wait: 2,
    };
    // The server's FIN turns the clients' FIN_WAIT2 into TIME_WAIT at once on loopback; wait
    // a little all the same.
    let deadline = Instant::now() + Duration::from_secs(2);
    while cache.ports_to(n, dst) != Some(want) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(cache.ports_to(n, dst), Some(want));
    let other: SocketAddr = "127.0.0.1:5124".parse().unwrap();
    assert_eq!(cache.ports_to(n, other).map(|p| p.to_destination), Some(0));
    // The namespace's own counters (the host's are far larger): two segments with data sent,
    // two sockets into TIME_WAIT.
    assert!(cache.tcp_ext(n, "TCPOrigDataSent").is_some_and(|c| c >= 2));
    assert_eq!(cache.tcp_ext(n, "TW"), Some(2));
}

/// §2 of notes/issue13-facts.md: a source whose return route leaves by another interface is
/// dropped by rp_filter=1 and counted in TcpExtIPReversePathFilter; the look-ups name the
/// arrival interface and the route back.
#[test]
fn reverse_path_filter_facts() {
    if !is_root() {
        return;
    }
    let (client, server) = (TestNs::new(), TestNs::new());
    client.ip(&[
        "link",
        "add",
        "a0",
        "type",
        "veth",
        "peer",
        "name",
        "b0",
        "netns",
        &server.name,
    ]);
    server.ip(&["link", "add", "b1", "type", "veth", "peer", "name", "b2"]);
    for cmd in [
        "addr add 10.235.0.1/24 dev a0",
        "addr add 10.235.9.1/32 dev a0",
        "link set a0 up",
    ] {
        client.ip(&cmd.split(' ').collect::<Vec<_>>());
    }
    for cmd in [
        "addr add 10.235.0.2/24 dev b0",
        "addr add 10.235.3.2/24 dev b1",
        "link set b0 up",
        "link set b1 up",
        "link set b2 up",
        "route add 10.235.9.0/24 via 10.235.3.1 dev b1",
    ] {
        server.ip(&cmd.split(' ').collect::<Vec<_>>());
    }
    server.sysctl(&[
        "net.ipv4.conf.all.rp_filter=1",
        "net.ipv4.conf.b0.rp_filter=1",
    ]);
    // The server would not answer ARP from the odd source either (§2a): a static neighbour.
    let b0 = server.ip(&["-o", "link", "show", "b0"]);
    let mac = b0
        .split("link/ether ")
        .nth(1)
        .and_then(|s| s.split(' ').next());
    let mac = mac.expect("b0 MAC address");
    client.ip(&[
        "neigh",
        "replace",
        "10.235.0.2",
        "lladdr",
        mac,
        "dev",
        "a0",
        "nud",
        "permanent",
    ]);
    let (mut cache, s) = (NamespaceCache::default(), Some(server.inode));
    assert_eq!(cache.tcp_ext(s, "IPReversePathFilter"), Some(0));
    client.run(|| {
        let udp = UdpSocket::bind("10.235.9.1:0").expect("bind the odd source");
        for _ in 0..3 {
            udp.send_to(b"x", "10.235.0.2:9").expect("send");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(2);
    while cache.tcp_ext(s, "IPReversePathFilter") != Some(3) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(cache.tcp_ext(s, "IPReversePathFilter"), Some(3));
    assert_eq!(
        cache.tcp_ext(Some(client.inode), "IPReversePathFilter"),
        Some(0)
    );
    let back = cache.route_to(s, ip("10.235.9.1"));
    assert_eq!(
        back,
        route(RouteKind::Unicast, Some("b1"), Some("10.235.3.1"))
    );
    assert_eq!(
        cache.interface(s, server.ifindex("b0")).as_deref(),
        Some("b0")
    );
    assert_eq!(
        cache.is_local(s, ip("10.235.9.1")),
        Some(false),
        "forwarded-looking"
    );
}

#[test]
fn conntrack_table_of_the_namespace() {
    if !is_root() {
        return;
    }
    let ns = TestNs::new();
    let n = Some(ns.inode);
    let mut cache = NamespaceCache::default();
    let found = cache.conntrack(n);
    let count = ns.run(|| std::fs::read_to_string(CT_COUNT).ok());
    let Some(count) = count else {
        assert_eq!(found, None, "no nf_conntrack_count in the namespace");
        println!("conntrack not loaded here: None");
        return;
    };
    let max = std::fs::read_to_string(CT_MAX).expect("global nf_conntrack_max");
    let want = ConntrackTable {
        count: count.trim().parse().unwrap(),
        max: max.trim().parse().unwrap(),
    };
    assert_eq!(found, Some(want));
    // Make the namespace track (a conntrack match registers its hooks), then a connection.
    let rule = "-A OUTPUT -m conntrack --ctstate NEW,ESTABLISHED -j ACCEPT";
    let mut iptables = vec!["ip", "netns", "exec", &ns.name, "iptables"];
    iptables.extend(rule.split(' '));
    sh(&iptables);
    ns.run(|| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    });
    let tracked = cache.conntrack(n).expect("conntrack table");
    assert!(tracked.count >= 1, "{tracked:?}");
    assert_eq!(tracked.max, want.max, "the global maximum");
}
