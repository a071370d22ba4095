//! Which sockets listen on a port in a network namespace (sock_diag, with their accept queue
//! and backlog), and which processes hold them (/proc, through `procfs`). Used to tell "nothing
//! listens" from "something listens, but on another address" when the kernel refuses a SYN,
//! and to name the queue of a listener that overflows or does not accept. In an SO_REUSEPORT
//! group several sockets listen on one port, each with its own queue: the accept-queue
//! iterator (`kernel::accept_queues`) tells which of them holds a queued connection.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::Path,
    time::{Duration, Instant},
};

use conntrace_common::{AcceptQueueEntry, accept};

use procfs::{
    net::TcpState,
    process::{FDTarget, Process, all_processes},
};

use tracing::debug;

use crate::{
    engine::{
        Listener, ListenerLookup,
        facts::{FourTuple, Proc, TcpState as EngineTcpState},
    },
    host::{
        owners::StartOwners,
        sockdiag,
        windows::{diag::NsDiag, tcp_info::Sample},
    },
    kernel::accept_queues::AcceptQueues,
};

/// How long a look-up is reused: refusals come in bursts (a client retrying, a SYN flood).
const CACHE_FOR: Duration = Duration::from_secs(2);

fn netns_of(p: &Process) -> Option<u64> {
    std::fs::metadata(format!("/proc/{}/ns/net", p.pid()))
        .ok()
        .map(|m| m.ino())
}

/// A listening socket and the process holding it, with the socket's inode: the key by which
/// the accept-queue iterator names listeners.
#[derive(Debug, Clone)]
struct Held {
    inode: u64,
    listener: Listener,
}

/// Calls `each` with every socket file descriptor of `processes` (the process, the socket's
/// inode), as `ss -p` finds them; processes whose descriptors cannot be read are skipped.
pub(crate) fn each_socket_fd<'a>(
    processes: impl IntoIterator<Item = &'a Process>,
    mut each: impl FnMut(&Process, u64),
) {
    for p in processes {
        let Ok(fds) = p.fd() else { continue };
        for fd in fds.filter_map(Result::ok) {
            if let FDTarget::Socket(inode) = fd.target {
                each(p, inode);
            }
        }
    }
}

/// Process `p` as verdicts name it (its comm empty when unreadable).
pub(crate) fn proc_of(p: &Process) -> Proc {
    Proc {
        pid: p.pid() as u32,
        comm: p.stat().map(|s| s.comm.into()).unwrap_or_default(),
    }
}

/// What sock_diag (or /proc/net/tcp, which lacks the rest) tells of a listening socket.
#[derive(Clone, Copy)]
struct SocketFacts {
    addr: SocketAddr,
    accept_queue: Option<u32>,
    backlog: Option<u32>,
    v6only: Option<bool>,
}

impl SocketFacts {
    /// The listener these facts describe, held by `pid` (`comm`) when known.
    fn listener(self, pid: Option<u32>, comm: Option<String>) -> Listener {
        Listener {
            addr: self.addr,
            pid,
            comm,
            accept_queue: self.accept_queue,
            backlog: self.backlog,
            v6only: self.v6only,
        }
    }
}

/// Listening sockets on `port` in network namespace `netns`, with the processes holding them
/// and each socket's inode. Empty when no process of that namespace can be found or /proc
/// cannot be read.
fn held_sockets(netns: u32, port: u16) -> Vec<Held> {
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
    let sockets = listen_sockets(any, netns, port);
    if sockets.is_empty() {
        return Vec::new();
    }
    let mut found: Vec<Held> = Vec::new();
    let mut seen = HashSet::new();
    each_socket_fd(&in_ns, |p, inode| {
        if let Some(facts) = sockets.get(&inode)
            && seen.insert((inode, p.pid()))
        {
            let comm = p.stat().ok().map(|s| s.comm);
            let listener = facts.listener(Some(p.pid() as u32), comm);
            found.push(Held { inode, listener });
        }
    });
    // Sockets no process holds (or we could not see) are listed without one.
    for (&inode, facts) in &sockets {
        if !seen.iter().any(|(i, _)| *i == inode) {
            let listener = facts.listener(None, None);
            found.push(Held { inode, listener });
        }
    }
    found.sort_by_key(|h| (h.listener.addr, h.listener.pid));
    found
}

/// The LISTEN sockets on `port` of the namespace `any` is in, by inode.
fn listen_sockets(any: &Process, netns: u32, port: u16) -> HashMap<u64, SocketFacts> {
    // sock_diag lists the listeners with their queue and its limit (the backlog), as `ss -ltn`
    // shows them; /proc/net/tcp has no backlog, so it is only the fallback when sock_diag is
    // not allowed (no CAP_SYS_ADMIN to enter the namespace): queues unknown.
    let mut sockets = HashMap::new();
    match sockdiag::listeners(
        Path::new(&format!("/proc/{}/ns/net", any.pid())),
        Some(port),
    ) {
        Ok(found) => {
            for l in found {
                let facts = SocketFacts {
                    addr: l.addr,
                    accept_queue: Some(l.accept_queue),
                    backlog: Some(l.backlog),
                    v6only: l.v6only,
                };
                sockets.insert(l.inode, facts);
            }
        }
        Err(error) => {
            debug!(%error, netns, port, "listen queues unknown");
            for table in [any.tcp(), any.tcp6()].into_iter().flatten() {
                for e in table {
                    if e.state == TcpState::Listen && e.local_address.port() == port {
                        let facts = SocketFacts {
                            addr: e.local_address,
                            accept_queue: None,
                            backlog: None,
                            v6only: None,
                        };
                        sockets.insert(e.inode, facts);
                    }
                }
            }
        }
    }
    sockets
}

/// The accept-queue iterator's records of one namespace, as of `at`.
struct QueueSnapshot {
    at: Instant,
    entries: Vec<AcceptQueueEntry>,
}

/// How soon a snapshot that lacks the asked-for connection is taken again: a connection
/// queued after it may be asked for next. Bounds the iterator to a few runs a second per
/// namespace even when every look-up misses.
const RETAKE_AFTER: Duration = Duration::from_millis(250);

/// sock_diag's record of the full socket `tuple` (local end first) in namespace `netns`, or
/// `None` when there is none (a request or TIME_WAIT socket carries no `tcp_info`) or the
/// namespace cannot be asked (logged at debug: `step` names the look-up).
fn diag_socket(netns: u32, tuple: FourTuple, step: &str) -> Option<Sample> {
    let path = crate::host::netns::path(netns)?;
    let mut diag = match NsDiag::open(&path, netns) {
        Ok(d) => d,
        Err(error) => {
            debug!(%error, netns, "{step}: namespace unreadable");
            return None;
        }
    };
    diag.socket(&crate::kernel::decode::wire_tuple(tuple), &mut Vec::new())
        .map_err(|error| debug!(%error, netns, "{step}: sock_diag"))
        .ok()?
}

/// The state of the full socket `tuple` (local end first) in namespace `netns` now
/// (sock_diag's `idiag_state`); `None` when there is none or it cannot be asked.
pub fn socket_state(netns: u32, tuple: FourTuple) -> Option<EngineTcpState> {
    diag_socket(netns, tuple, "socket state")
        .map(|s| EngineTcpState::from_kernel(i32::from(s.state)))
}

/// The process holding connected socket `tuple` (local end first) in namespace `netns`: its
/// inode from sock_diag (0 while no process holds it), then the process with that socket among
/// its file descriptors (/proc, as `ss -p` finds it). `None` when any step finds nothing.
pub fn owner_of(netns: u32, tuple: FourTuple) -> Option<Proc> {
    let sample = diag_socket(netns, tuple, "socket owner")?;
    if sample.inode == 0 {
        return None;
    }
    let inode = u64::from(sample.inode);
    all_processes()
        .ok()?
        .filter_map(Result::ok)
        .filter(|p| netns_of(p) == Some(u64::from(netns)))
        .find_map(|p| {
            let mut holds = false;
            each_socket_fd([&p], |_, i| holds |= i == inode);
            holds.then(|| proc_of(&p))
        })
}

/// The listeners on a port, with a short cache per (netns, port), and, when the accept-queue
/// iterator is loaded, the listener holding a queued connection (cached per namespace).
#[derive(Default)]
pub struct ListenerCache {
    entries: HashMap<(u32, u16), (Instant, Vec<Held>)>,
    queues: Option<AcceptQueues>,
    snapshots: HashMap<u32, QueueSnapshot>,
    start_owners: Option<StartOwners>,
}

impl ListenerCache {
    /// A cache that also answers [`ListenerLookup::holder`] with `queues` (the tracer's
    /// iterator; `None` where the kernel refused it: `holder` then answers `None`).
    pub fn new(queues: Option<AcceptQueues>) -> Self {
        Self {
            queues,
            ..Self::default()
        }
    }

    /// Also answers [`ListenerLookup::owner_at_start`], from `owners`.
    pub fn with_start_owners(mut self, owners: StartOwners) -> Self {
        self.start_owners = Some(owners);
        self
    }

    /// The listeners on `port` in `netns`, with their inodes; cached for [`CACHE_FOR`].
    fn held(&mut self, netns: u32, port: u16) -> &[Held] {
        let now = Instant::now();
        self.entries
            .retain(|_, (at, _)| now.duration_since(*at) < CACHE_FOR);
        &self
            .entries
            .entry((netns, port))
            .or_insert_with(|| (now, held_sockets(netns, port)))
            .1
    }

    /// The iterator's record for child socket `child_sk` in `netns`: from the cached
    /// snapshot, or from a new run when the snapshot lacks it and is older than
    /// [`RETAKE_AFTER`]. A failed run is cached as an empty snapshot (logged at debug).
    fn queued(&mut self, netns: u32, child_sk: u64) -> Option<AcceptQueueEntry> {
        let find = |s: &QueueSnapshot| s.entries.iter().find(|e| e.child_sk == child_sk).copied();
        let now = Instant::now();
        self.snapshots
            .retain(|_, s| now.duration_since(s.at) < CACHE_FOR);
        if let Some(snapshot) = self.snapshots.get(&netns) {
            if let Some(entry) = find(snapshot) {
                return Some(entry);
            }
            if now.duration_since(snapshot.at) < RETAKE_AFTER {
                return None;
            }
        }
        let queues = self.queues.as_mut()?;
        let entries = match crate::host::netns::path(netns) {
            Some(path) => queues.run(&path).unwrap_or_else(|error| {
                debug!(%error, netns, "accept queues unknown");
                Vec::new()
            }),
            None => {
                debug!(netns, "accept queues unknown: no path to the namespace");
                Vec::new()
            }
        };
        let snapshot = QueueSnapshot { at: now, entries };
        let found = find(&snapshot);
        self.snapshots.insert(netns, snapshot);
        found
    }
}

impl ListenerLookup for ListenerCache {
    fn listening_on(&mut self, netns: Option<u32>, port: u16) -> Vec<Listener> {
        // A namespace the kernel could not name cannot be entered.
        let Some(netns) = netns else {
            return Vec::new();
        };
        self.held(netns, port)
            .iter()
            .map(|h| h.listener.clone())
            .collect()
    }

    /// The listener socket whose accept queue holds `child_sk`, named by its inode (the
    /// process holding it, from /proc), with that socket's own queue and backlog as the
    /// iterator read them. `None` without the iterator, for a connection in no queue on
    /// `port`, or a socket no listener on the port has.
    fn holder(&mut self, netns: Option<u32>, port: u16, child_sk: u64) -> Option<Listener> {
        let netns = netns?;
        if self.queues.is_none() || child_sk == 0 {
            return None;
        }
        let entry = self
            .queued(netns, child_sk)
            .filter(|e| e.port == port && e.listener_ino != 0)?;
        let held = self.held(netns, port);
        let h = held.iter().find(|h| h.inode == entry.listener_ino)?;
        let read = entry.flags & accept::flags::BACKLOG_UNREAD == 0;
        Some(Listener {
            accept_queue: read.then_some(entry.ack_backlog),
            backlog: read.then_some(entry.max_ack_backlog),
            ..h.listener.clone()
        })
    }

    fn owner(&mut self, netns: Option<u32>, tuple: FourTuple) -> Option<Proc> {
        owner_of(netns?, tuple)
    }

    fn owner_at_start(&mut self, netns: Option<u32>, tuple: FourTuple) -> Option<Proc> {
        self.start_owners.as_mut()?.get(netns?, tuple)
    }

    fn socket_state(&mut self, netns: Option<u32>, tuple: FourTuple) -> Option<EngineTcpState> {
        socket_state(netns?, tuple)
    }
}
