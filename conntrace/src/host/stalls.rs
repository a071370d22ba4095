//! Quiet mode's stall check: the kernel keeps healthy connections to itself and traces neither
//! first data nor accept() (those hooks run for every segment or every system call), so every
//! 100 ms the connections it follows (`CONNS`, read in batches) are looked at here. One
//! established longer than `--stall-timeout` and not yet seen moving is asked about over
//! sock_diag, by its exact tuple in its namespace: has it received data
//! (`tcpi_bytes_received`), sent any, is a process holding it (`idiag_inode`, accepted)? A
//! connection found stuck goes to the engine (its history, then a [`Progress`] saying so) and
//! to the kernel's `WATCH` map, so that everything it does from then on reaches userspace;
//! it is asked about at every check until it moves (the engine's `resolved`) or closes. One
//! found moving is not asked about again.
//!
//! Cost: one `BPF_MAP_LOOKUP_BATCH` per 1,024 followed connections per check, and one
//! sock_diag request (a hash lookup in the kernel, no table walk) per connection past the
//! timeout until it is seen moving; a load test of short connections asks none.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use conntrace_common::quiet::{History, flags};
use tracing::debug;

use super::windows::{diag::NsDiag, namespaces, tcp_info::Sample};
use crate::{
    engine::facts::{FourTuple, KernelEvent, Meta, Proc, Progress},
    kernel::decode::{conn_history, four_tuple},
};

/// How soon a namespace missing from the list is looked for again.
const RESCAN_AFTER: Duration = Duration::from_secs(1);
/// Checks between two prunings of the memory of connections gone.
const PRUNE_EVERY: u32 = 50;

/// What one check found.
#[derive(Debug, Default)]
pub struct Checked {
    /// For the engine, in order.
    pub events: Vec<KernelEvent>,
    /// Connections to report from now on: (socket address, start).
    pub watch: Vec<(u64, u64)>,
    /// Namespaces holding followed connections that completed their handshake.
    pub namespaces: HashSet<u32>,
}

/// The namespace of a followed connection, when the kernel read it.
fn netns_of(h: &History) -> Option<u32> {
    (h.flags & flags::NETNS_UNREAD == 0).then_some(h.netns)
}

/// The stall check's memory between checks.
pub struct StallCheck {
    timeout_ns: u64,
    /// Connections seen moving, by socket address: their start.
    moved: HashMap<u64, u64>,
    /// Connections found stuck, by socket address: their start and the progress last sent.
    stuck: HashMap<u64, (u64, Progress)>,
    sockets: HashMap<u32, NsDiag>,
    paths: HashMap<u32, PathBuf>,
    listed_at: Instant,
    /// Every followed connection, by socket address, as of the last check: filled by the
    /// caller from the kernel's table before each [`Self::check`].
    pub snapshot: Vec<(u64, History)>,
    checks: u32,
    buf: Vec<u8>,
}

impl StallCheck {
    /// A check of connections established longer than `timeout` (0: stalls are off, and only
    /// the tuple index is kept).
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout_ns: u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX),
            moved: HashMap::new(),
            stuck: HashMap::new(),
            sockets: HashMap::new(),
            paths: HashMap::new(),
            listed_at: Instant::now() - RESCAN_AFTER,
            snapshot: Vec::new(),
            checks: 0,
            buf: Vec::new(),
        }
    }

    /// The followed connection with `tuple` (local end first) in namespace `netns`, as of the
    /// last check: for a report (a zero window) about a connection the engine has not seen.
    pub fn history_of(&self, netns: Option<u32>, tuple: &FourTuple) -> Option<(u64, History)> {
        self.snapshot
            .iter()
            .find(|(_, h)| netns_of(h) == netns && four_tuple(&h.tuple) == *tuple)
            .copied()
    }

    /// Looks at [`Self::snapshot`] at `now_ns`.
    pub fn check(&mut self, now_ns: u64) -> Checked {
        let mut out = Checked::default();
        let snapshot = std::mem::take(&mut self.snapshot);
        self.checks = self.checks.wrapping_add(1);
        if self.checks.is_multiple_of(PRUNE_EVERY) {
            let live: HashMap<u64, u64> =
                snapshot.iter().map(|(sk, h)| (*sk, h.started_ns)).collect();
            let same = |sk: &u64, started: &u64| live.get(sk) == Some(started);
            self.moved.retain(|sk, started| same(sk, started));
            self.stuck.retain(|sk, (started, _)| same(sk, started));
        }
        for (sk, h) in &snapshot {
            let netns = netns_of(h);
            if h.established_ns == 0 {
                continue;
            }
            if let Some(n) = netns {
                out.namespaces.insert(n);
            }
            if self.timeout_ns == 0
                || now_ns < h.established_ns.saturating_add(self.timeout_ns)
                || self.moved.get(sk) == Some(&h.started_ns)
            {
                continue;
            }
            if self
                .stuck
                .get(sk)
                .is_some_and(|(started, _)| *started != h.started_ns)
            {
                // The address holds a new connection now.
                self.stuck.remove(sk);
            }
            let server = h.flags & flags::SERVER != 0;
            if server && h.flags & flags::ACCEPTED != 0 && !self.stuck.contains_key(sk) {
                self.moved.insert(*sk, h.started_ns);
                continue;
            }
            let Some(n) = netns else {
                continue;
            };
            let Some(sample) = self.ask(n, h) else {
                continue;
            };
            let progress = Progress {
                received: sample.info.bytes_received.is_some_and(|b| b > 0),
                sent: sample.info.sent_data.unwrap_or(false),
                accepted: sample.inode != 0,
            };
            let moving = if server {
                progress.accepted
            } else {
                progress.received
            };
            self.report(now_ns, (*sk, h), progress, moving, &mut out);
        }
        self.snapshot = snapshot;
        out
    }

    /// Sends what changed about connection `sk`: found stuck (its history, its progress, and
    /// a watch), or moving now.
    fn report(
        &mut self,
        now_ns: u64,
        (sk, h): (u64, &History),
        progress: Progress,
        moving: bool,
        out: &mut Checked,
    ) {
        let meta = |netns| Meta {
            ts_ns: now_ns,
            netns,
            proc: Proc {
                pid: 0,
                comm: compact_str::CompactString::default(),
            },
        };
        match self.stuck.get(&sk) {
            Some((_, last)) if *last == progress => {}
            Some(_) => {
                let history = conn_history(sk, h, now_ns);
                out.events.push(KernelEvent::Progress {
                    meta: meta(history.meta.netns),
                    sk,
                    progress,
                });
                if moving {
                    self.stuck.remove(&sk);
                    self.moved.insert(sk, h.started_ns);
                } else {
                    self.stuck.insert(sk, (h.started_ns, progress));
                }
            }
            None if moving => {
                self.moved.insert(sk, h.started_ns);
            }
            None => {
                let history = conn_history(sk, h, now_ns);
                let netns = history.meta.netns;
                out.events.push(KernelEvent::History(history));
                out.events.push(KernelEvent::Progress {
                    meta: meta(netns),
                    sk,
                    progress,
                });
                out.watch.push((sk, h.started_ns));
                self.stuck.insert(sk, (h.started_ns, progress));
            }
        }
    }

    /// The sock_diag record of connection `h` in namespace `netns`; `None` when it is gone or
    /// cannot be asked about (logged).
    fn ask(&mut self, netns: u32, h: &History) -> Option<Sample> {
        if !self.sockets.contains_key(&netns) {
            if !self.paths.contains_key(&netns) && self.listed_at.elapsed() >= RESCAN_AFTER {
                self.paths = namespaces();
                self.listed_at = Instant::now();
            }
            let path = self.paths.get(&netns)?;
            match NsDiag::open(path, netns) {
                Ok(s) => {
                    self.sockets.insert(netns, s);
                }
                Err(error) => {
                    debug!(%error, netns, "stall check: namespace unreadable");
                    self.paths.remove(&netns);
                    return None;
                }
            }
        }
        let socket = self.sockets.get_mut(&netns)?;
        match socket.socket(&h.tuple, &mut self.buf) {
            Ok(sample) => sample,
            Err(error) => {
                debug!(%error, netns, "stall check: sock_diag");
                self.sockets.remove(&netns);
                None
            }
        }
    }
}
