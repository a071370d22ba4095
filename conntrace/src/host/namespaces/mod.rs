//! Facts about a network namespace that a verdict needs, read from the kernel when asked (the
//! engine's [`NamespaceLookup`]): its own addresses and interfaces (rtnetlink dumps, cached),
//! its route to an address (`ip route get`), its conntrack table, the local ports held towards
//! a destination (`ip_local_port_range` and sock_diag) and its TcpExt counters.
//!
//! Namespaces are named by inode, as events carry them, and opened through `/run/netns/*` or
//! `/proc/PID/ns/net` of a process in them ([`crate::host::netns::processes`]). Every query
//! runs in a short-lived thread that enters the namespace with setns() and then opens its
//! netlink socket or reads its files there; the caller's namespace never changes. Per-namespace
//! sysctls are read in that thread from `/proc/sys` (which shows the reading thread's
//! namespace; there is no `/proc/PID/sys`), counters from `/proc/thread-self/net/netstat`
//! (`/proc/self/net` would show the main thread's namespace). Needs CAP_SYS_ADMIN (setns).
//!
//! Where it can fail: a namespace with neither a process nor a `/run/netns` name cannot be
//! opened (every method answers `None`); answers are at most [`REFRESH`] old for addresses,
//! interfaces and routes; a caller waits [`TIMEOUT`] at most for a query.

mod rtnl;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, TCP_LISTEN, TCP_TIME_WAIT},
    inet::{InetResponseHeader, StateFlags},
};
use tracing::debug;

use self::rtnl::Snapshot;
use crate::{
    engine::lookup::{ConntrackTable, NamespaceLookup, PortUse, Route},
    host::{
        counters,
        netns::{self, EnterError},
        sockdiag,
    },
};

/// How old a cached snapshot (addresses, interfaces) or route may be before a miss refreshes
/// it; also how often the namespaces are enumerated again when one is not found.
pub const REFRESH: Duration = Duration::from_secs(1);

/// How long a caller waits for the thread in the namespace; the thread finishes on its own.
pub const TIMEOUT: Duration = Duration::from_millis(500);

/// Cached routes above this many are dropped when stale.
const MAX_ROUTES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum NsError {
    #[error("network namespace {0}: no process in it and no /run/netns name")]
    NotFound(u32),
    #[error(transparent)]
    Enter(#[from] EnterError),
    #[error("{what} in {path}: no answer within {TIMEOUT:?}")]
    Timeout { what: &'static str, path: PathBuf },
    #[error("netlink socket(NETLINK_ROUTE): {0}")]
    Socket(io::Error),
    #[error("connect netlink socket to the kernel: {0}")]
    Connect(io::Error),
    #[error("send {step} request: {source}")]
    Send {
        step: &'static str,
        source: io::Error,
    },
    #[error("receive {step} reply: {source}")]
    Receive {
        step: &'static str,
        source: io::Error,
    },
    #[error("receive {step} reply: datagram of {len} bytes truncated")]
    Truncated { step: &'static str, len: usize },
    #[error("decode {step} reply: {source}")]
    Decode {
        step: &'static str,
        source: netlink_packet_core::DecodeError,
    },
    #[error("decode {step} reply: {what}")]
    Unexpected {
        step: &'static str,
        what: &'static str,
    },
    #[error("{step} failed: {}", io::Error::from_raw_os_error(*.errno))]
    Kernel { step: &'static str, errno: i32 },
    #[error("read {path}: {source}")]
    Read {
        path: &'static str,
        source: io::Error,
    },
    #[error("parse {path}: {text:?}")]
    Parse { path: &'static str, text: String },
    #[error(transparent)]
    Diag(#[from] sockdiag::DiagError),
}

/// Runs `f` in a short-lived thread that first enters the network namespace `ns` (opened from
/// `path`), waiting [`TIMEOUT`] at most. `what` names the query in errors.
fn in_namespace<T: Send + 'static>(
    ns: File,
    path: &Path,
    what: &'static str,
    f: impl FnOnce() -> Result<T, NsError> + Send + 'static,
) -> Result<T, NsError> {
    let rx = netns::spawn_in(ns, path, "netns-lookup", f)?;
    match rx.recv_timeout(TIMEOUT) {
        Ok(res) => res?,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(NsError::Timeout {
            what,
            path: path.to_path_buf(),
        }),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(EnterError::Panicked {
            path: path.to_path_buf(),
        }
        .into()),
    }
}

/// Where each network namespace can be opened, by inode: `/run/netns/NAME` first, then
/// `/proc/PID/ns/net` of a process in it.
fn scan() -> HashMap<u32, PathBuf> {
    let mut paths: HashMap<u32, PathBuf> = crate::host::netns::processes()
        .into_iter()
        .map(|(netns, pid)| (netns, PathBuf::from(format!("/proc/{pid}/ns/net"))))
        .collect();
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for entry in dir.filter_map(Result::ok) {
            let path = entry.path();
            if let Some(ino) = inode(&path) {
                paths.insert(ino, path);
            }
        }
    }
    paths
}

/// The namespace inode `path` opens, if it is one.
fn inode(path: &Path) -> Option<u32> {
    u32::try_from(std::fs::metadata(path).ok()?.ino()).ok()
}

/// Reads a file that the thread's namespace decides (`/proc/sys/net/...`,
/// `/proc/thread-self/net/...`); `Ok(None)` when it does not exist there.
fn read_optional(path: &'static str) -> Result<Option<String>, NsError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(NsError::Read { path, source }),
    }
}

fn read(path: &'static str) -> Result<String, NsError> {
    read_optional(path)?.ok_or_else(|| NsError::Read {
        path,
        source: io::ErrorKind::NotFound.into(),
    })
}

fn parse_u64(path: &'static str, text: &str) -> Result<u64, NsError> {
    text.trim().parse().map_err(|_| NsError::Parse {
        path,
        text: text.to_owned(),
    })
}

const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const CT_COUNT: &str = "/proc/sys/net/netfilter/nf_conntrack_count";
const CT_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
const NETSTAT: &str = "/proc/thread-self/net/netstat";
const SOMAXCONN: &str = "/proc/sys/net/core/somaxconn";

/// `net.ipv4.ip_local_port_range` as the file shows it (`"32768\t60999\n"`): first and last
/// port.
fn port_range(text: &str) -> Option<[u16; 2]> {
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    let (lo, hi) = (ports.next()?.ok()?, ports.next()?.ok()?);
    (ports.next().is_none() && lo <= hi).then_some([lo, hi])
}

/// Counts the sockets `header` adds to `dst`'s [`PortUse`] (remote end `dst`, local port in
/// `range`; an IPv4-mapped IPv6 remote counts as IPv4).
fn count_port(use_: &mut PortUse, dst: SocketAddr, h: &InetResponseHeader) {
    let id = &h.socket_id;
    let [lo, hi] = use_.range;
    if h.state == TCP_LISTEN
        || id.destination_port != dst.port()
        || id.destination_address.to_canonical() != dst.ip().to_canonical()
        || !(lo..=hi).contains(&id.source_port)
    {
        return;
    }
    use_.to_destination += 1;
    if h.state == TCP_TIME_WAIT {
        use_.time_wait += 1;
    }
}

/// In the thread's namespace: the port range, and the TCP sockets of every state towards
/// `dst` (sock_diag dumps of AF_INET and AF_INET6, which holds IPv4-mapped sockets).
fn ports_here(dst: SocketAddr) -> Result<PortUse, NsError> {
    let text = read(PORT_RANGE)?;
    let range = port_range(&text).ok_or(NsError::Parse {
        path: PORT_RANGE,
        text: text.clone(),
    })?;
    let mut use_ = PortUse {
        range,
        to_destination: 0,
        time_wait: 0,
    };
    let socket = sockdiag::open()?;
    let families: &[u8] = if dst.is_ipv4() {
        &[AF_INET, AF_INET6]
    } else {
        &[AF_INET6]
    };
    for (seq, &family) in (1..).zip(families) {
        let states = StateFlags::all() - StateFlags::LISTEN;
        sockdiag::dump_tcp(&socket, seq, family, states, &mut |r| {
            count_port(&mut use_, dst, &r.header);
        })?;
    }
    Ok(use_)
}

/// In the thread's namespace: its conntrack count against the global maximum, `None` when
/// conntrack is not loaded there (no `nf_conntrack_count`).
fn conntrack_here() -> Result<Option<ConntrackTable>, NsError> {
    let Some(count) = read_optional(CT_COUNT)? else {
        return Ok(None);
    };
    Ok(Some(ConntrackTable {
        count: parse_u64(CT_COUNT, &count)?,
        max: parse_u64(CT_MAX, &read(CT_MAX)?)?,
    }))
}

/// A snapshot and when it was taken; `None` when the namespace could not be read then.
struct Cached<T> {
    at: Instant,
    value: Option<T>,
}

/// The real [`NamespaceLookup`]: asks the kernel, caching addresses, interfaces and routes
/// for [`REFRESH`].
#[derive(Default)]
pub struct NamespaceCache {
    paths: HashMap<u32, PathBuf>,
    scanned_at: Option<Instant>,
    snapshots: HashMap<u32, Cached<Snapshot>>,
    routes: HashMap<(u32, IpAddr), Cached<Route>>,
}

impl NamespaceCache {
    /// Opens namespace `netns`, checking that the path still leads to it (a process may have
    /// exited, its pid been reused); enumerates the namespaces again, at most once per
    /// [`REFRESH`], when it does not.
    fn open(&mut self, netns: u32) -> Result<(File, PathBuf), NsError> {
        let first = self.try_open(netns);
        if let Ok(Some(found)) = first {
            return Ok(found);
        }
        if self.scanned_at.is_some_and(|at| at.elapsed() < REFRESH) {
            return first?.ok_or(NsError::NotFound(netns));
        }
        self.paths = scan();
        self.scanned_at = Some(Instant::now());
        self.try_open(netns)?.ok_or(NsError::NotFound(netns))
    }

    /// The namespace through its known path; `None` when there is none or it now leads to
    /// another namespace.
    fn try_open(&self, netns: u32) -> Result<Option<(File, PathBuf)>, NsError> {
        let Some(path) = self.paths.get(&netns) else {
            return Ok(None);
        };
        match netns::open(path, Some(netns)) {
            Ok(file) => Ok(Some((file, path.clone()))),
            Err(EnterError::Changed { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs `f` in namespace `netns` (see [`in_namespace`]).
    fn query<T: Send + 'static>(
        &mut self,
        netns: u32,
        what: &'static str,
        f: impl FnOnce() -> Result<T, NsError> + Send + 'static,
    ) -> Result<T, NsError> {
        let (file, path) = self.open(netns)?;
        in_namespace(file, &path, what, f)
    }

    /// The namespace's snapshot, taken again when the cached one does not answer (`hit` is
    /// false) and is older than [`REFRESH`]; a cached answer costs a map look-up, a new one a
    /// thread and two dumps (about 0.6 ms here). `None` when it cannot be read.
    fn snapshot(&mut self, netns: u32, hit: impl Fn(&Snapshot) -> bool) -> Option<&Snapshot> {
        let fresh =
            |c: &Cached<Snapshot>| c.at.elapsed() < REFRESH || c.value.as_ref().is_some_and(&hit);
        if !self.snapshots.get(&netns).is_some_and(fresh) {
            let value = self
                .query(netns, "address and link dumps", || {
                    rtnl::snapshot(&rtnl::open()?)
                })
                .inspect(|s| {
                    if s.skipped > 0 {
                        debug!(netns, skipped = s.skipped, "undecodable rtnetlink messages");
                    }
                })
                .map_err(|error| debug!(netns, %error, "namespace addresses unreadable"))
                .ok();
            let at = Instant::now();
            self.snapshots.insert(netns, Cached { at, value });
        }
        self.snapshots.get(&netns)?.value.as_ref()
    }

    /// The route to `dst`, from the kernel, with its interface's name.
    fn lookup_route(&mut self, netns: u32, dst: IpAddr) -> Result<Route, NsError> {
        let answer = self.query(netns, "route lookup", move || {
            rtnl::route_get(&rtnl::open()?, dst)
        })?;
        let dev = answer.oif.and_then(|i| self.interface(Some(netns), i));
        Ok(Route {
            kind: answer.kind,
            dev,
            gateway: answer.gateway,
        })
    }

    /// `res`'s value; its error logged at debug and dropped.
    fn logged<T>(netns: u32, what: &str, res: Result<T, NsError>) -> Option<T> {
        res.map_err(|error| debug!(netns, %error, "{what} unreadable"))
            .ok()
    }
}

impl NamespaceLookup for NamespaceCache {
    fn is_local(&mut self, netns: Option<u32>, addr: IpAddr) -> Option<bool> {
        let snap = self.snapshot(netns?, |s| s.is_local(addr))?;
        Some(snap.is_local(addr))
    }

    fn route_to(&mut self, netns: Option<u32>, dst: IpAddr) -> Option<Route> {
        let netns = netns?;
        if let Some(c) = self.routes.get(&(netns, dst))
            && c.at.elapsed() < REFRESH
        {
            return c.value.clone();
        }
        let value = Self::logged(netns, "route", self.lookup_route(netns, dst));
        if self.routes.len() >= MAX_ROUTES {
            self.routes.retain(|_, c| c.at.elapsed() < REFRESH);
        }
        let at = Instant::now();
        let cached = Cached { at, value };
        self.routes.insert((netns, dst), cached);
        self.routes.get(&(netns, dst))?.value.clone()
    }

    fn interface(&mut self, netns: Option<u32>, ifindex: u32) -> Option<String> {
        let snap = self.snapshot(netns?, |s| s.links.contains_key(&ifindex))?;
        snap.links.get(&ifindex).cloned()
    }

    fn conntrack(&mut self, netns: Option<u32>) -> Option<ConntrackTable> {
        let netns = netns?;
        let res = self.query(netns, "conntrack sysctls", conntrack_here);
        Self::logged(netns, "conntrack table", res)?
    }

    fn ports_to(&mut self, netns: Option<u32>, dst: SocketAddr) -> Option<PortUse> {
        let netns = netns?;
        let res = self.query(netns, "port range and sockets", move || ports_here(dst));
        Self::logged(netns, "local ports", res)
    }

    fn somaxconn(&mut self, netns: Option<u32>) -> Option<u32> {
        let netns = netns?;
        let res = self.query(netns, "net.core.somaxconn", || read(SOMAXCONN));
        let text = Self::logged(netns, "net.core.somaxconn", res)?;
        text.trim().parse().ok()
    }

    fn tcp_ext(&mut self, netns: Option<u32>, counter: &str) -> Option<u64> {
        let netns = netns?;
        let res = self.query(netns, "TcpExt counters", || read(NETSTAT));
        counters::tcp_ext_counter(&Self::logged(netns, "TcpExt counters", res)?, counter)
    }
}
