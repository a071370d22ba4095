//! Quiet mode's stall check: the kernel keeps healthy connections to itself and traces neither
//! first data nor accept() (those hooks run for every segment or every system call), so every
//! tenth of `--stall-timeout` (100 ms at least, 1 s at most: 300 ms by default) the
//! connections it follows (`CONN_SLOTS`, read in place, and `CONNS`, read in batches) are
//! looked at here. One established longer than `--stall-timeout` and not yet seen moving is
//! asked about over sock_diag, by its exact tuple in its namespace: has it received data
//! (`tcpi_bytes_received`), sent any, is a process holding it (`idiag_inode`, accepted)? A
//! connection found stuck goes to the engine (its history, then a [`Progress`] saying so) and
//! to the kernel's `WATCH` map, so that everything it does from then on reaches userspace;
//! it is asked about at every check until it moves (the engine's `resolved`) or closes. One
//! found moving is not asked about again.
//!
//! Cost: a read of 8,192 slots in memory and one `BPF_MAP_LOOKUP_BATCH` per 1,024 connections
//! in the overflow map per check, and one sock_diag request (a hash lookup in the kernel, no
//! table walk) per connection past the timeout until it is seen moving; a load test of short
//! connections asks none.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use conntrace_common::quiet::{History, flags};
use tracing::debug;

use super::windows::{diag::NsDiag, tcp_info::Sample};
use crate::{
    engine::facts::{FourTuple, KernelEvent, Meta, Proc, Progress},
    kernel::decode::{conn_history, four_tuple},
};

/// The shortest and the longest time between two checks: a tenth of the stall timeout in
/// between, so a stall is reported at most a tenth late while a check (a walk of the kernel's
/// 8,192 slots and the overflow map's 65,536 buckets) stays off the profile of a quiet run.
const CHECK_EVERY_MIN: Duration = Duration::from_millis(100);
const CHECK_EVERY_MAX: Duration = Duration::from_secs(1);

/// How long a followed connection has been established before its namespace's windows are
/// watched (a dump walks the kernel's whole established hash: under a load test of short
/// connections, thousands of TIME_WAIT sockets). A zero window is seen from then on.
const WINDOWS_AFTER_NS: u64 = 1_000_000_000;

/// How soon a namespace missing from the list is looked for again.
const RESCAN_AFTER: Duration = Duration::from_secs(1);
/// Checks between two prunings of the memory of connections gone.
const PRUNE_EVERY: u32 = 50;
/// Checks in a row at which sock_diag has no full socket for a followed connection the
/// kernel still holds before its entry is taken as one whose close the kernel skipped.
const GONE_CHECKS: u8 = 2;

/// sock_diag's answer about one connection.
#[derive(Debug)]
pub enum Answer {
    /// Its full socket, with what it has done.
    Found(Sample),
    /// No full socket with its tuple (none at all, or a TIME_WAIT one): it closed.
    Gone,
    /// Not answerable now (the namespace unreadable, a netlink error: logged).
    Unknown,
}

/// What one check found.
#[derive(Debug, Default)]
pub struct Checked {
    /// For the engine, in order.
    pub events: Vec<KernelEvent>,
    /// Connections whose close the kernel skipped (its program was running on that CPU
    /// already): (socket address, start). Their entries are the kernel's to drop; a stalled
    /// one among them never gets its follow-up.
    pub unseen_closes: Vec<(u64, u64)>,
    /// Namespaces holding followed connections established for [`WINDOWS_AFTER_NS`] at
    /// least: where the window watch dumps sockets.
    pub namespaces: HashSet<u32>,
}

/// Time between two checks for stall timeout `timeout` (0: stalls are off; the check still
/// serves window reports, at the longest interval).
pub fn check_every(timeout: Duration) -> Duration {
    if timeout.is_zero() {
        return CHECK_EVERY_MAX;
    }
    (timeout / 10).clamp(CHECK_EVERY_MIN, CHECK_EVERY_MAX)
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
    /// Connections sock_diag found closed while the kernel still held them, by socket
    /// address: their start and the checks in a row that found them so.
    gone: HashMap<u64, (u64, u8)>,
    diag: Diag,
    /// Every followed connection, by socket address, as of the last check: filled by the
    /// caller from the kernel's table before each [`Self::check`].
    pub snapshot: Vec<(u64, History)>,
    checks: u32,
    every_ns: u64,
    next_ns: u64,
}

impl StallCheck {
    /// A check of connections established longer than `timeout` (0: stalls are off, and only
    /// the tuple index is kept).
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout_ns: u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX),
            moved: HashMap::new(),
            stuck: HashMap::new(),
            gone: HashMap::new(),
            diag: Diag::default(),
            snapshot: Vec::new(),
            checks: 0,
            every_ns: check_every(timeout).as_nanos() as u64,
            next_ns: 0,
        }
    }

    /// Whether a check is due at `now_ns` (CLOCK_MONOTONIC); if so, the next one is due
    /// [`check_every`] later.
    pub fn due(&mut self, now_ns: u64) -> bool {
        if now_ns < self.next_ns {
            return false;
        }
        self.next_ns = now_ns + self.every_ns;
        true
    }

    /// The followed connection with `tuple` (local end first) in namespace `netns`, as of the
    /// last check: for a report (a zero window) about a connection the engine has not seen.
    pub fn history_of(&self, netns: Option<u32>, tuple: &FourTuple) -> Option<(u64, History)> {
        self.snapshot
            .iter()
            .find(|(_, h)| netns_of(h) == netns && four_tuple(&h.tuple) == *tuple)
            .copied()
    }

    /// Looks at [`Self::snapshot`] at `now_ns`, asking sock_diag about connections past the
    /// timeout; `watch` is called for each one found stuck as soon as it is (socket address,
    /// start), so that the kernel reports its close even if it comes during the check.
    pub fn check(&mut self, now_ns: u64, watch: impl FnMut(u64, u64)) -> Checked {
        let mut diag = std::mem::take(&mut self.diag);
        diag.let_go_of_deleted();
        let out = self.check_with(now_ns, |netns, h| diag.ask(netns, h), watch);
        self.diag = diag;
        out
    }

    /// [`Self::check`] with `ask` answering for a connection in a namespace.
    fn check_with(
        &mut self,
        now_ns: u64,
        mut ask: impl FnMut(u32, &History) -> Answer,
        mut watch: impl FnMut(u64, u64),
    ) -> Checked {
        let mut out = Checked::default();
        let snapshot = std::mem::take(&mut self.snapshot);
        self.checks = self.checks.wrapping_add(1);
        if self.checks.is_multiple_of(PRUNE_EVERY) {
            let live: HashMap<u64, u64> =
                snapshot.iter().map(|(sk, h)| (*sk, h.started_ns)).collect();
            let same = |sk: &u64, started: &u64| live.get(sk) == Some(started);
            self.moved.retain(|sk, started| same(sk, started));
            self.stuck.retain(|sk, (started, _)| same(sk, started));
            self.gone.retain(|sk, (started, _)| same(sk, started));
        }
        for (sk, h) in &snapshot {
            let netns = netns_of(h);
            if h.established_ns == 0 {
                continue;
            }
            if let Some(n) = netns
                && now_ns >= h.established_ns.saturating_add(WINDOWS_AFTER_NS)
            {
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
            let sample = match ask(n, h) {
                Answer::Found(sample) => sample,
                Answer::Gone => {
                    self.found_gone((*sk, h.started_ns), &mut out);
                    continue;
                }
                Answer::Unknown => continue,
            };
            self.gone.remove(sk);
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
            if self.report(now_ns, (*sk, h), progress, moving, &mut out) {
                watch(*sk, h.started_ns);
            }
        }
        self.snapshot = snapshot;
        out
    }

    /// Connection `sk` (started at `started`), which the kernel still holds, has no full
    /// socket: closed as the kernel removes it, or long ago with its close skipped. Found so
    /// [`GONE_CHECKS`] times in a row, it is the latter.
    fn found_gone(&mut self, (sk, started): (u64, u64), out: &mut Checked) {
        let seen = match self.gone.get(&sk) {
            Some((s, n)) if *s == started => n + 1,
            _ => 1,
        };
        if seen < GONE_CHECKS {
            self.gone.insert(sk, (started, seen));
            return;
        }
        self.gone.remove(&sk);
        self.stuck.remove(&sk);
        self.moved.remove(&sk);
        out.unseen_closes.push((sk, started));
    }

    /// Sends what changed about connection `sk`: found stuck (its history and its progress;
    /// true: watch it from now on), or moving now.
    fn report(
        &mut self,
        now_ns: u64,
        (sk, h): (u64, &History),
        progress: Progress,
        moving: bool,
        out: &mut Checked,
    ) -> bool {
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
                self.stuck.insert(sk, (h.started_ns, progress));
                return true;
            }
        }
        false
    }
}

/// sock_diag sockets, one per namespace asked about, and where the namespaces are.
#[derive(Default)]
struct Diag {
    sockets: HashMap<u32, NsDiag>,
    paths: HashMap<u32, PathBuf>,
    /// When `paths` was last listed.
    listed_at: Option<Instant>,
    buf: Vec<u8>,
}

impl Diag {
    /// Closes the sockets of namespaces their path no longer opens (deleted, or their process
    /// gone): an open socket keeps its namespace, and its devices, alive. Such a namespace's
    /// path is looked up again when it is next asked about.
    fn let_go_of_deleted(&mut self) {
        let paths = &mut self.paths;
        self.sockets.retain(|&netns, _| {
            let opens = paths
                .get(&netns)
                .is_some_and(|p| super::netns::still_opens(p, netns));
            if !opens {
                paths.remove(&netns);
            }
            opens
        });
    }

    /// The sock_diag record of connection `h` in namespace `netns`, [`Answer::Gone`] when it
    /// has no full socket, [`Answer::Unknown`] when it cannot be asked about (logged).
    fn ask(&mut self, netns: u32, h: &History) -> Answer {
        if !self.sockets.contains_key(&netns) {
            if !self.paths.contains_key(&netns)
                && self.listed_at.is_none_or(|at| at.elapsed() >= RESCAN_AFTER)
            {
                self.paths = super::netns::paths();
                self.listed_at = Some(Instant::now());
            }
            let Some(path) = self.paths.get(&netns) else {
                return Answer::Unknown;
            };
            match NsDiag::open(path, netns) {
                Ok(s) => {
                    self.sockets.insert(netns, s);
                }
                Err(error) => {
                    debug!(%error, netns, "stall check: namespace unreadable");
                    self.paths.remove(&netns);
                    return Answer::Unknown;
                }
            }
        }
        let Some(socket) = self.sockets.get_mut(&netns) else {
            return Answer::Unknown;
        };
        match socket.socket(&h.tuple, &mut self.buf) {
            Ok(Some(sample)) => Answer::Found(sample),
            Ok(None) => Answer::Gone,
            Err(error) => {
                debug!(%error, netns, "stall check: sock_diag");
                self.sockets.remove(&netns);
                Answer::Unknown
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use conntrace_common::{AF_INET, Tuple};

    use super::*;
    use crate::host::windows::tcp_info::TcpInfo;

    const SEC: u64 = 1_000_000_000;

    /// A check's output and the connections it watched.
    struct Run {
        checked: Checked,
        watched: Vec<(u64, u64)>,
    }

    impl std::ops::Deref for Run {
        type Target = Checked;
        fn deref(&self) -> &Checked {
            &self.checked
        }
    }

    impl StallCheck {
        /// A check where `ask`'s `None` is sock_diag finding no socket.
        fn checked(
            &mut self,
            now_ns: u64,
            mut ask: impl FnMut(u32, &History) -> Option<Sample>,
        ) -> Run {
            let mut watched = Vec::new();
            let checked = self.check_with(
                now_ns,
                |n, h| ask(n, h).map_or(Answer::Gone, Answer::Found),
                |sk, started| watched.push((sk, started)),
            );
            Run { checked, watched }
        }
    }

    fn history(sport: u16, server: bool, established_ns: u64) -> History {
        let mut tuple = Tuple {
            family: AF_INET,
            sport,
            dport: if server { 40000 } else { 3306 },
            ..Tuple::default()
        };
        tuple.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        tuple.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        History {
            started_ns: 1,
            established_ns,
            tuple,
            netns: 7,
            flags: if server { flags::SERVER } else { 0 },
            ..History::default()
        }
    }

    fn sample(received: u64, inode: u32) -> Sample {
        Sample {
            rqueue: 0,
            wqueue: 0,
            state: 1,
            timer: 0,
            info: TcpInfo {
                probes: 0,
                rcv_mss: 536,
                snd_wnd: None,
                rcv_wnd: None,
                bytes_received: Some(received),
                sent_data: Some(false),
            },
            skmem: None,
            inode,
        }
    }

    fn kinds(c: &Checked) -> Vec<&'static str> {
        c.events
            .iter()
            .map(|e| match e {
                KernelEvent::History(_) => "history",
                KernelEvent::Progress { progress, .. } if progress.received => "received",
                KernelEvent::Progress { progress, .. } if progress.accepted => "accepted",
                KernelEvent::Progress { .. } => "stuck",
                _ => "other",
            })
            .collect()
    }

    #[test]
    fn a_client_without_data_past_the_timeout_is_sent_once_then_when_it_moves() {
        let mut s = StallCheck::new(Duration::from_secs(3));
        s.snapshot = vec![(0xa, history(41000, false, SEC))];
        // Not yet past the timeout: nobody is asked.
        let c = s.checked(3 * SEC, |_, _| panic!("asked too early"));
        assert!(c.events.is_empty() && c.namespaces.contains(&7));
        let c = s.checked(4 * SEC, |netns, _| {
            assert_eq!(netns, 7);
            Some(sample(0, 0))
        });
        assert_eq!(kinds(&c), ["history", "stuck"]);
        assert_eq!(c.watched, [(0xa, 1)]);
        // Still stuck: nothing new.
        assert!(
            s.checked(5 * SEC, |_, _| Some(sample(0, 0)))
                .events
                .is_empty()
        );
        // Data came: one progress, and it is not asked about again.
        let c = s.checked(6 * SEC, |_, _| Some(sample(6, 0)));
        assert_eq!(kinds(&c), ["received"]);
        assert!(
            s.checked(7 * SEC, |_, _| panic!("asked again"))
                .events
                .is_empty()
        );
    }

    #[test]
    fn a_connection_seen_moving_is_never_sent() {
        let mut s = StallCheck::new(Duration::from_secs(3));
        s.snapshot = vec![(0xa, history(41000, false, SEC))];
        assert!(
            s.checked(5 * SEC, |_, _| Some(sample(10, 0)))
                .events
                .is_empty()
        );
        assert!(
            s.checked(6 * SEC, |_, _| panic!("asked again"))
                .events
                .is_empty()
        );
        // The address reused by a new connection is a new connection.
        let mut h = history(41002, false, 7 * SEC);
        h.started_ns = 2;
        s.snapshot = vec![(0xa, h)];
        let c = s.checked(11 * SEC, |_, _| Some(sample(0, 0)));
        assert_eq!(kinds(&c), ["history", "stuck"]);
    }

    #[test]
    fn a_server_is_stuck_until_a_process_holds_it() {
        let mut s = StallCheck::new(Duration::from_secs(3));
        s.snapshot = vec![(0xb, history(3306, true, SEC))];
        let c = s.checked(5 * SEC, |_, _| Some(sample(0, 0)));
        assert_eq!(kinds(&c), ["history", "stuck"]);
        let c = s.checked(6 * SEC, |_, _| Some(sample(0, 12345)));
        assert_eq!(kinds(&c), ["accepted"]);
        // One the kernel saw accepted is not asked about.
        let mut h = history(3306, true, SEC);
        h.flags |= flags::ACCEPTED;
        let mut s = StallCheck::new(Duration::from_secs(3));
        s.snapshot = vec![(0xc, h)];
        assert!(s.checked(5 * SEC, |_, _| panic!("asked")).events.is_empty());
    }

    #[test]
    fn gone_handshakes_and_stalls_off_ask_nothing() {
        let mut s = StallCheck::new(Duration::from_secs(3));
        s.snapshot = vec![
            (0xa, history(41000, false, SEC)),
            (0xd, history(0, false, 0)),
        ];
        // Gone when asked (it closed between the batch read and the question).
        let c = s.checked(5 * SEC, |_, _| None);
        assert!(c.events.is_empty() && c.watched.is_empty());
        let mut off = StallCheck::new(Duration::ZERO);
        off.snapshot = s.snapshot.clone();
        let c = off.checked(99 * SEC, |_, _| panic!("stalls are off"));
        assert!(c.events.is_empty());
        assert_eq!(
            c.namespaces.len(),
            1,
            "handshakes in progress name no namespace"
        );
    }

    #[test]
    fn a_connection_the_kernel_holds_with_no_socket_at_two_checks_had_its_close_skipped() {
        let mut s = StallCheck::new(Duration::from_secs(3));
        s.snapshot = vec![(0xa, history(41000, false, SEC))];
        let c = s.checked(5 * SEC, |_, _| Some(sample(0, 0)));
        assert_eq!(kinds(&c), ["history", "stuck"]);
        // Closed as the kernel removes it: once is not enough.
        let c = s.checked(6 * SEC, |_, _| None);
        assert!(c.events.is_empty() && c.unseen_closes.is_empty());
        // Not answerable: no conclusion either way.
        let c = s.check_with(7 * SEC, |_, _| Answer::Unknown, |_, _| {});
        assert!(c.unseen_closes.is_empty());
        let c = s.checked(8 * SEC, |_, _| None);
        assert_eq!(c.unseen_closes, [(0xa, 1)]);
        // Forgotten: its entry is the kernel's to drop, and it is not asked about again.
        s.snapshot.clear();
        assert!(s.checked(9 * SEC, |_, _| None).unseen_closes.is_empty());
        // Its address's next connection is a new one.
        let mut h = history(41002, false, 9 * SEC);
        h.started_ns = 2;
        s.snapshot = vec![(0xa, h)];
        let c = s.checked(13 * SEC, |_, _| None);
        assert!(
            c.unseen_closes.is_empty(),
            "one check of the new connection"
        );
    }

    #[test]
    fn the_history_of_a_tuple_is_found_in_its_namespace() {
        let mut s = StallCheck::new(Duration::from_secs(3));
        s.snapshot = vec![(0xa, history(41000, false, SEC))];
        let t = four_tuple(&s.snapshot[0].1.tuple);
        assert_eq!(s.history_of(Some(7), &t).map(|(sk, _)| sk), Some(0xa));
        assert_eq!(s.history_of(Some(8), &t), None);
    }
}
