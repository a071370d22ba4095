//! Listen-queue overflows, from the kernel's own counters.
//!
//! A SYN that finds a listener's accept queue full is discarded without a drop reason on every
//! kernel: `tcp_conn_request` counts it in `TcpExtListenOverflows` and the packet is consumed, so
//! `kfree_skb` never sees it. (A final ACK dropped for a full queue has the drop reason
//! `TCP_LISTEN_OVERFLOW` on recent kernels and is attributed per connection; older kernels count
//! it here only.) So once a second, for each network namespace, the counter is read from its
//! `netstat`: `/proc/PID/net/netstat` of a process in it, else, for a namespace named under
//! /run/netns with no process yet, a `netstat` opened inside it by a short-lived thread
//! (setns, CAP_SYS_ADMIN). Either file stays bound to its namespace and is read again from the
//! start at each poll. When the counter grew, the listeners on traced ports whose accept queue
//! is full right now (sock_diag, entered through the same namespace: queue > backlog) are
//! reported.
//!
//! Where it can fail: the counter is per namespace, not per listener, so when several traced
//! listeners are full each is reported with the namespace's whole count; a queue that filled
//! and drained between two polls is named only when it was seen full at a poll in the last
//! [`RECENTLY_FULL`] (the growth is its, with the queue as last seen: a queue that overflows
//! in bursts is full at some polls and drained at others), else the overflow is only logged; a namespace
//! with neither a process nor a name cannot be read, and a named one cannot without
//! CAP_SYS_ADMIN. An open `netstat` keeps its namespace alive: each poll first lets go of the
//! namespaces whose file no longer opens them (deleted, or their process gone; a namespace
//! that lives on is found again through another process at the next rescan, 10 s).

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io::{Read as _, Seek as _, SeekFrom},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tracing::debug;

use crate::{
    engine::facts::{KernelEvent, Meta, Proc},
    host::{netns, sockdiag},
};

/// How often the namespaces are enumerated again (new containers, exited processes).
const RESCAN_EVERY: Duration = Duration::from_secs(10);

/// How long a listener seen full at a poll takes the namespace's overflows counted while no
/// traced listener is full at the poll.
const RECENTLY_FULL: Duration = Duration::from_millis(3_500);

/// The `TcpExt` counters the summary reports the growth of, per namespace.
pub const COUNTERS: [&str; 8] = [
    "IPReversePathFilter",
    "SyncookiesSent",
    "SyncookiesRecv",
    "SyncookiesFailed",
    "ListenOverflows",
    "ListenDrops",
    "TCPReqQFullDoCookies",
    "TCPReqQFullDrop",
];

type Counters = BTreeMap<&'static str, u64>;

/// Watches `TcpExtListenOverflows` in every network namespace, and keeps the other
/// [`COUNTERS`] for the summary.
pub struct OverflowWatch {
    /// Traced ports; empty means all.
    ports: Vec<u16>,
    /// Each namespace read, by inode.
    sources: HashMap<u32, Source>,
    scanned_at: Instant,
    /// The counters when the namespace was first read (zero for a namespace born after
    /// start-up: everything it counted happened while traced), and at the last poll.
    baseline: HashMap<u32, Counters>,
    /// The start-up scan is done: namespaces found later were created since.
    started: bool,
    last: HashMap<u32, Counters>,
    /// The traced listeners seen full at a poll, by namespace.
    full: FullListeners,
}

/// A listener on a traced port with its accept queue and backlog.
type FullListener = (SocketAddr, u32, u32);

/// The traced listeners each namespace had full when its overflow counter last grew.
#[derive(Debug, Default)]
struct FullListeners(HashMap<u32, (Instant, Vec<FullListener>)>);

impl FullListeners {
    /// Who takes the overflows namespace `netns` counted since the last poll, at `now`:
    /// the listeners full now (remembered), else those seen full within [`RECENTLY_FULL`].
    fn blame(
        &mut self,
        netns: u32,
        full_now: Vec<FullListener>,
        now: Instant,
    ) -> Vec<FullListener> {
        if !full_now.is_empty() {
            self.0.insert(netns, (now, full_now.clone()));
            return full_now;
        }
        match self.0.get(&netns) {
            Some((at, seen)) if now.saturating_duration_since(*at) <= RECENTLY_FULL => seen.clone(),
            _ => Vec::new(),
        }
    }

    /// Forgets namespaces no longer read.
    fn retain(&mut self, read: impl Fn(u32) -> bool) {
        self.0.retain(|netns, _| read(*netns));
    }
}

/// Every `TcpExt` counter in the text of `/proc/net/netstat` (a `TcpExt:` line of names, then
/// one of values), as (name without the prefix, value); `None` without both lines.
fn tcp_ext_all(netstat: &str) -> Option<impl Iterator<Item = (&str, u64)>> {
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let values: Vec<&str> = values.split_whitespace().skip(1).collect();
    Some(
        names
            .split_whitespace()
            .skip(1)
            .zip(values)
            .filter_map(|(name, value)| Some((name, value.parse().ok()?))),
    )
}

/// The [`COUNTERS`] from the text of `/proc/net/netstat`; counters this kernel lacks are left
/// out.
pub fn tcp_ext(netstat: &str) -> Option<Counters> {
    Some(
        tcp_ext_all(netstat)?
            .filter_map(|(name, value)| Some((*COUNTERS.iter().find(|c| **c == name)?, value)))
            .collect(),
    )
}

/// One `TcpExt` counter (`IPReversePathFilter`, `ListenOverflows`, ...) from the text of
/// `/proc/net/netstat`; `None` when this kernel lacks it.
pub fn tcp_ext_counter(netstat: &str, name: &str) -> Option<u64> {
    tcp_ext_all(netstat)?.find_map(|(n, value)| (n == name).then_some(value))
}

/// Where one namespace is read: its `netstat`, and a file that opens the namespace (where its
/// listeners are listed).
struct Source {
    ns_path: PathBuf,
    netstat: File,
}

impl Source {
    /// Through a process in namespace `netns`: no setns needed. `None` when the process has
    /// gone, or its pid now belongs to another namespace.
    fn of_process(netns: u32, pid: i32) -> Option<Self> {
        let netstat = File::open(format!("/proc/{pid}/net/netstat")).ok()?;
        let ns_path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        // Checked after the open: the file is bound to the namespace the process had then.
        netns::open(&ns_path, Some(netns)).ok()?;
        Some(Self { ns_path, netstat })
    }

    /// Inside the namespace `ns_path` opens (`/run/netns/NAME`), entered by a short-lived
    /// thread: a namespace with no process yet.
    fn of_named(netns: u32, ns_path: &Path) -> Result<Self, String> {
        let ns = netns::open(ns_path, Some(netns)).map_err(|e| e.to_string())?;
        // The file stays bound to the namespace it was opened in.
        let netstat = netns::run_in(&ns, ns_path, "netstat-open", || {
            File::open("/proc/thread-self/net/netstat")
                .map_err(|e| format!("open /proc/thread-self/net/netstat: {e}"))
        })
        .map_err(|e| e.to_string())??;
        Ok(Self {
            ns_path: ns_path.to_path_buf(),
            netstat,
        })
    }

    /// Through `path` as [`netns::path`] gives it: a process's namespace file, else a name.
    fn of_path(netns: u32, path: &Path) -> Option<Self> {
        let pid = path
            .strip_prefix("/proc")
            .ok()
            .and_then(|rest| rest.iter().next())
            .and_then(|pid| pid.to_str()?.parse().ok());
        match pid {
            Some(pid) => Self::of_process(netns, pid),
            None => Self::of_named(netns, path)
                .inspect_err(|error| debug!(%error, netns, "namespace counters unreadable"))
                .ok(),
        }
    }

    /// The counters now, from the start of the file.
    fn read(&mut self) -> Option<Counters> {
        let mut text = String::new();
        self.netstat.seek(SeekFrom::Start(0)).ok()?;
        self.netstat.read_to_string(&mut text).ok()?;
        tcp_ext(&text)
    }
}

impl OverflowWatch {
    /// Reads every namespace's counter now: overflows before start-up are not reported.
    pub fn new(ports: &[u16]) -> Self {
        let mut w = Self {
            ports: ports.to_vec(),
            sources: HashMap::new(),
            scanned_at: Instant::now(),
            baseline: HashMap::new(),
            last: HashMap::new(),
            started: false,
            full: FullListeners::default(),
        };
        w.rescan();
        w.started = true;
        w
    }

    /// How much each counter grew since the namespace was first read, per namespace; only
    /// namespaces and counters that moved.
    pub fn growth(&self) -> BTreeMap<u32, Counters> {
        self.last
            .iter()
            .filter_map(|(netns, last)| {
                let base = self.baseline.get(netns)?;
                let grown: Counters = last
                    .iter()
                    .filter_map(|(k, v)| {
                        let d = v.saturating_sub(base.get(k).copied().unwrap_or(0));
                        (d > 0).then_some((*k, d))
                    })
                    .collect();
                (!grown.is_empty()).then_some((*netns, grown))
            })
            .collect()
    }

    /// Finds the namespaces now: a process in each, else its /run/netns name. Those gone
    /// close their file (it holds the namespace alive); new ones are opened and, the first
    /// time, get their baseline.
    fn rescan(&mut self) {
        let pids = crate::host::netns::processes();
        let named = crate::host::netns::named();
        self.scanned_at = Instant::now();
        self.sources
            .retain(|n, _| pids.contains_key(n) || named.contains_key(n));
        // Names first: they outlive any one process.
        for (&netns, path) in &named {
            if self.sources.contains_key(&netns) {
                continue;
            }
            match Source::of_named(netns, path) {
                Ok(source) => {
                    self.sources.insert(netns, source);
                }
                Err(error) => debug!(%error, netns, "namespace counters unreadable"),
            }
        }
        for (&netns, &pid) in &pids {
            if !self.sources.contains_key(&netns)
                && let Some(source) = Source::of_process(netns, pid)
            {
                self.sources.insert(netns, source);
            }
        }
        for (&netns, source) in &mut self.sources {
            if !self.baseline.contains_key(&netns)
                && let Some(c) = source.read()
            {
                // A namespace first seen after start-up was created since: everything it
                // counted happened while traced (one that had neither a process nor a name at
                // start-up is the exception: its earlier counts show too).
                let base = if self.started {
                    Counters::new()
                } else {
                    c.clone()
                };
                self.baseline.insert(netns, base);
                self.last.insert(netns, c);
            }
        }
    }

    /// Closes the `netstat` of each namespace its path no longer opens (its name removed, its
    /// process gone): the open file would keep the namespace and its devices alive. One that
    /// lives on is opened again at once through another name or process.
    fn let_go_of_deleted(&mut self) {
        let stale: Vec<u32> = self
            .sources
            .iter()
            .filter(|(netns, source)| !netns::still_opens(&source.ns_path, **netns))
            .map(|(netns, _)| *netns)
            .collect();
        for netns in stale {
            self.sources.remove(&netns);
            if let Some(source) = netns::path(netns).and_then(|p| Source::of_path(netns, &p)) {
                self.sources.insert(netns, source);
            }
        }
    }

    fn traced(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.contains(&port)
    }

    /// Listeners on traced ports in the namespace `ns_path` opens whose accept queue is full
    /// (the kernel's test: more queued than the backlog), from sock_diag.
    fn full_listeners(&self, ns_path: &Path) -> Vec<(SocketAddr, u32, u32)> {
        match sockdiag::listeners(ns_path, None) {
            Ok(all) => all
                .into_iter()
                .filter(|l| self.traced(l.addr.port()) && l.accept_queue > l.backlog)
                .map(|l| (l.addr, l.accept_queue, l.backlog))
                .collect(),
            Err(error) => {
                debug!(%error, path = %ns_path.display(), "listen queues unreadable");
                Vec::new()
            }
        }
    }

    /// One event per full traced listener in each namespace whose counter grew since the last
    /// poll. `now_ns` is CLOCK_MONOTONIC.
    pub fn poll(&mut self, now_ns: u64) -> Vec<KernelEvent> {
        if self.scanned_at.elapsed() >= RESCAN_EVERY {
            self.rescan();
        }
        self.let_go_of_deleted();
        let mut events = Vec::new();
        let mut grown = Vec::new();
        for (&netns, source) in &mut self.sources {
            let Some(counters) = source.read() else {
                continue;
            };
            let overflows = |c: &Counters| c.get("ListenOverflows").copied().unwrap_or(0);
            let now = overflows(&counters);
            let before = self
                .last
                .insert(netns, counters)
                .map_or(now, |c| overflows(&c));
            if now > before {
                grown.push((netns, now - before, source.ns_path.clone()));
            }
        }
        let sources = &self.sources;
        self.full.retain(|netns| sources.contains_key(&netns));
        for (netns, overflows, ns_path) in grown {
            let full_now = self.full_listeners(&ns_path);
            let full = self.full.blame(netns, full_now, Instant::now());
            if full.is_empty() {
                debug!(
                    netns,
                    overflows, "listen overflows, but no traced listener is or was just full"
                );
            }
            for (listener, accept_queue, backlog) in full {
                events.push(KernelEvent::ListenOverflow {
                    meta: Meta {
                        ts_ns: now_ns,
                        netns: Some(netns),
                        proc: Proc {
                            pid: 0,
                            comm: compact_str::CompactString::default(),
                        },
                    },
                    listener,
                    accept_queue,
                    backlog,
                    overflows,
                });
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflows_counted_after_the_queue_drained_are_the_listener_seen_full_just_before() {
        let mut f = FullListeners::default();
        let l: SocketAddr = "0.0.0.0:3306".parse().unwrap();
        let t0 = Instant::now();
        assert!(f.blame(7, Vec::new(), t0).is_empty(), "never seen full");
        assert_eq!(f.blame(7, vec![(l, 5, 4)], t0), [(l, 5, 4)]);
        // Drained at the next polls: still the one that was full, as it was then.
        let s = Duration::from_secs(1);
        assert_eq!(f.blame(7, Vec::new(), t0 + s), [(l, 5, 4)]);
        assert_eq!(f.blame(7, Vec::new(), t0 + 3 * s), [(l, 5, 4)]);
        assert!(
            f.blame(8, Vec::new(), t0 + s).is_empty(),
            "another namespace"
        );
        // Long after: another listener's (or an untraced port's) overflows, not its.
        assert!(f.blame(7, Vec::new(), t0 + 5 * s).is_empty());
        f.retain(|netns| netns != 7);
        assert!(f.blame(7, Vec::new(), t0 + s).is_empty(), "namespace gone");
    }

    #[test]
    fn reads_tcp_ext_counters_from_netstat() {
        let text = "TcpExt: SyncookiesSent SyncookiesRecv EmbryonicRsts ListenOverflows ListenDrops\n\
                    TcpExt: 3 1 5 17 19\n\
                    IpExt: InNoRoutes\n\
                    IpExt: 0\n";
        let c = tcp_ext(text).expect("TcpExt");
        assert_eq!(
            c.into_iter().collect::<Vec<_>>(),
            [
                ("ListenDrops", 19),
                ("ListenOverflows", 17),
                ("SyncookiesRecv", 1),
                ("SyncookiesSent", 3)
            ]
        );
        assert_eq!(tcp_ext_counter(text, "EmbryonicRsts"), Some(5));
        assert_eq!(tcp_ext_counter(text, "IPReversePathFilter"), None);
        assert_eq!(
            tcp_ext_counter(text, "InNoRoutes"),
            None,
            "IpExt, not TcpExt"
        );
        assert_eq!(tcp_ext("IpExt: A\nIpExt: 1\n"), None);
        assert_eq!(tcp_ext("TcpExt: ListenOverflows\n"), None, "no values line");
    }
}
