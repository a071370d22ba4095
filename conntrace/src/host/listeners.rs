//! Which sockets listen on a port in a network namespace (sock_diag, with their accept queue
//! and backlog), and which processes hold them (/proc, through `procfs`). Used to tell "nothing
//! listens" from "something listens, but on another address" when the kernel refuses a SYN,
//! and to name the queue of a listener that overflows or does not accept.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use procfs::{
    net::TcpState,
    process::{FDTarget, Process, all_processes},
};

use std::path::Path;

use tracing::debug;

use crate::{
    engine::{
        Listener, ListenerLookup,
        facts::{FourTuple, Proc},
    },
    host::{sockdiag, windows::diag::NsDiag},
};

/// How long a look-up is reused: refusals come in bursts (a client retrying, a SYN flood).
const CACHE_FOR: Duration = Duration::from_secs(2);

fn netns_of(p: &Process) -> Option<u64> {
    std::fs::metadata(format!("/proc/{}/ns/net", p.pid()))
        .ok()
        .map(|m| m.ino())
}

/// Listening sockets on `port` in network namespace `netns`, with the processes holding them.
/// Empty when no process of that namespace can be found or /proc cannot be read.
pub fn listening_on(netns: u32, port: u16) -> Vec<Listener> {
    let Ok(procs) = all_processes() else {
        return Vec::new();
    };
    let in_ns: Vec<Process> = procs
        .filter_map(Result::ok)
        .filter(|p| netns_of(p) == Some(u64::from(netns)))
        .collect();
    // /proc/PID/net/tcp{,6} show the sockets of PID's network namespace.
    let Some(any) = in_ns.first() else {
        return Vec::new();
    };
    // sock_diag lists the listeners with their queue and its limit (the backlog), as `ss -ltn`
    // shows them; /proc/net/tcp has no backlog, so it is only the fallback when sock_diag is
    // not allowed (no CAP_SYS_ADMIN to enter the namespace): queues unknown.
    let mut sockets: HashMap<u64, (SocketAddr, Option<u32>, Option<u32>)> = HashMap::new();
    match sockdiag::listeners(
        Path::new(&format!("/proc/{}/ns/net", any.pid())),
        Some(port),
    ) {
        Ok(found) => {
            for l in found {
                sockets.insert(l.inode, (l.addr, Some(l.accept_queue), Some(l.backlog)));
            }
        }
        Err(error) => {
            debug!(%error, netns, port, "listen queues unknown");
            for table in [any.tcp(), any.tcp6()].into_iter().flatten() {
                for e in table {
                    if e.state == TcpState::Listen && e.local_address.port() == port {
                        sockets.insert(e.inode, (e.local_address, None, None));
                    }
                }
            }
        }
    }
    if sockets.is_empty() {
        return Vec::new();
    }
    let mut found: Vec<Listener> = Vec::new();
    let mut seen = HashSet::new();
    for p in &in_ns {
        let Ok(fds) = p.fd() else { continue };
        for fd in fds.filter_map(Result::ok) {
            if let FDTarget::Socket(inode) = fd.target
                && let Some(&(addr, queue, backlog)) = sockets.get(&inode)
                && seen.insert((inode, p.pid()))
            {
                let comm = p.stat().ok().map(|s| s.comm);
                found.push(Listener {
                    addr,
                    pid: Some(p.pid() as u32),
                    comm,
                    accept_queue: queue,
                    backlog,
                });
            }
        }
    }
    // Sockets no process holds (or we could not see) are listed without one.
    for (inode, &(addr, queue, backlog)) in &sockets {
        if !seen.iter().any(|(i, _)| i == inode) {
            found.push(Listener {
                addr,
                pid: None,
                comm: None,
                accept_queue: queue,
                backlog,
            });
        }
    }
    found.sort_by_key(|l| (l.addr, l.pid));
    found
}

/// The process holding connected socket `tuple` (local end first) in namespace `netns`: its
/// inode from sock_diag (0 while no process holds it), then the process with that socket among
/// its file descriptors (/proc, as `ss -p` finds it). `None` when any step finds nothing.
pub fn owner_of(netns: u32, tuple: FourTuple) -> Option<Proc> {
    let path = crate::host::windows::namespaces().remove(&netns)?;
    let mut diag = match NsDiag::open(&path, netns) {
        Ok(d) => d,
        Err(error) => {
            debug!(%error, netns, "socket owner: namespace unreadable");
            return None;
        }
    };
    let sample = diag
        .socket(&wire_tuple(tuple), &mut Vec::new())
        .map_err(|error| debug!(%error, netns, "socket owner: sock_diag"))
        .ok()??;
    if sample.inode == 0 {
        return None;
    }
    let inode = u64::from(sample.inode);
    all_processes()
        .ok()?
        .filter_map(Result::ok)
        .filter(|p| netns_of(p) == Some(u64::from(netns)))
        .find_map(|p| {
            let holds = p
                .fd()
                .ok()?
                .filter_map(Result::ok)
                .any(|fd| matches!(fd.target, FDTarget::Socket(i) if i == inode));
            holds.then(|| Proc {
                pid: p.pid() as u32,
                comm: p.stat().map(|s| s.comm.into()).unwrap_or_default(),
            })
        })
}

/// A tuple as the kernel's records carry it (IPv4 in the first 4 bytes).
fn wire_tuple(t: FourTuple) -> conntrace_common::Tuple {
    let mut w = conntrace_common::Tuple {
        sport: t.sport,
        dport: t.dport,
        ..conntrace_common::Tuple::default()
    };
    match (t.saddr, t.daddr) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            w.family = conntrace_common::AF_INET;
            w.saddr[..4].copy_from_slice(&s.octets());
            w.daddr[..4].copy_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            w.family = conntrace_common::AF_INET6;
            w.saddr = v6(s).octets();
            w.daddr = v6(d).octets();
        }
    }
    w
}

/// [`listening_on`] with a short cache per (netns, port).
#[derive(Default)]
pub struct ListenerCache {
    entries: HashMap<(u32, u16), (Instant, Vec<Listener>)>,
}

impl ListenerLookup for ListenerCache {
    fn listening_on(&mut self, netns: Option<u32>, port: u16) -> Vec<Listener> {
        // A namespace the kernel could not name cannot be entered.
        let Some(netns) = netns else {
            return Vec::new();
        };
        let now = Instant::now();
        self.entries
            .retain(|_, (at, _)| now.duration_since(*at) < CACHE_FOR);
        self.entries
            .entry((netns, port))
            .or_insert_with(|| (now, listening_on(netns, port)))
            .1
            .clone()
    }

    fn owner(&mut self, netns: Option<u32>, tuple: FourTuple) -> Option<Proc> {
        owner_of(netns?, tuple)
    }
}
