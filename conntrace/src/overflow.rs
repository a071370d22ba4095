//! Listen-queue overflows, from the kernel's own counters.
//!
//! A SYN that finds a listener's accept queue full is discarded without a drop reason on every
//! kernel: `tcp_conn_request` counts it in `TcpExtListenOverflows` and the packet is consumed, so
//! `kfree_skb` never sees it. (A final ACK dropped for a full queue has the drop reason
//! `TCP_LISTEN_OVERFLOW` on recent kernels and is attributed per connection; older kernels count
//! it here only.) So once a second, for each network namespace, the counter is read from
//! `/proc/PID/net/netstat` of a process in it; when it grew, the listeners on traced ports whose
//! accept queue is full right now (`/proc/PID/net/tcp{,6}`: rx_queue > tx_queue) are reported.
//!
//! Where it can fail: the counter is per namespace, not per listener, so when several traced
//! listeners are full each is reported with the namespace's whole count; a queue that filled
//! and drained between two polls is not named (the overflow is then only logged); a namespace
//! with no process in it cannot be read.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::Path,
    time::{Duration, Instant},
};

use tracing::debug;

use crate::{
    engine::model::{KernelEvent, Meta, Proc},
    sockdiag,
};

/// How often the namespaces are enumerated again (new containers, exited processes).
const RESCAN_EVERY: Duration = Duration::from_secs(10);

/// Watches `TcpExtListenOverflows` in every network namespace.
pub struct OverflowWatch {
    /// Traced ports; empty means all.
    ports: Vec<u16>,
    /// A process in each namespace, by namespace inode.
    pids: HashMap<u32, i32>,
    scanned_at: Instant,
    /// The counter at the last poll.
    counts: HashMap<u32, u64>,
}

/// `ListenOverflows` from the text of `/proc/net/netstat` (a `TcpExt:` line of names, then one
/// of values).
pub fn listen_overflows(netstat: &str) -> Option<u64> {
    let mut tcp_ext = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (tcp_ext.next()?, tcp_ext.next()?);
    let idx = names
        .split_whitespace()
        .position(|n| n == "ListenOverflows")?;
    values.split_whitespace().nth(idx)?.parse().ok()
}

fn read_count(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/netstat")).ok()?;
    listen_overflows(&text)
}

/// One process per network namespace, from `/proc/*/ns/net`.
fn scan() -> HashMap<u32, i32> {
    let mut pids = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in dir.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/ns/net")) {
            pids.entry(m.ino() as u32).or_insert(pid);
        }
    }
    pids
}

impl OverflowWatch {
    /// Reads every namespace's counter now: overflows before start-up are not reported.
    pub fn new(ports: &[u16]) -> Self {
        let mut w = Self {
            ports: ports.to_vec(),
            pids: HashMap::new(),
            scanned_at: Instant::now(),
            counts: HashMap::new(),
        };
        w.rescan();
        w
    }

    fn rescan(&mut self) {
        self.pids = scan();
        self.scanned_at = Instant::now();
        let pids = &self.pids;
        self.counts.retain(|netns, _| pids.contains_key(netns));
        for (&netns, &pid) in &self.pids {
            if !self.counts.contains_key(&netns)
                && let Some(n) = read_count(pid)
            {
                self.counts.insert(netns, n);
            }
        }
    }

    fn traced(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.contains(&port)
    }

    /// Listeners on traced ports in `pid`'s namespace whose accept queue is full (the kernel's
    /// test: more queued than the backlog), from sock_diag.
    fn full_listeners(&self, pid: i32) -> Vec<(SocketAddr, u32, u32)> {
        let path = format!("/proc/{pid}/ns/net");
        match sockdiag::listeners(Path::new(&path), None) {
            Ok(all) => all
                .into_iter()
                .filter(|l| self.traced(l.addr.port()) && l.accept_queue > l.backlog)
                .map(|l| (l.addr, l.accept_queue, l.backlog))
                .collect(),
            Err(error) => {
                debug!(%error, pid, "listen queues unreadable");
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
        let mut events = Vec::new();
        let pids: Vec<(u32, i32)> = self.pids.iter().map(|(&n, &p)| (n, p)).collect();
        for (netns, pid) in pids {
            let Some(now) = read_count(pid) else {
                continue;
            };
            let before = self.counts.insert(netns, now).unwrap_or(now);
            if now <= before {
                continue;
            }
            let full = self.full_listeners(pid);
            if full.is_empty() {
                debug!(
                    netns,
                    overflows = now - before,
                    "listen overflows, but no traced listener is full now"
                );
            }
            for (listener, accept_queue, backlog) in full {
                events.push(KernelEvent::ListenOverflow {
                    meta: Meta {
                        ts_ns: now_ns,
                        netns,
                        proc: Proc {
                            pid: 0,
                            tid: 0,
                            comm: String::new(),
                        },
                    },
                    listener,
                    accept_queue,
                    backlog,
                    overflows: now - before,
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
    fn reads_listen_overflows_from_netstat() {
        let text = "TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops\n\
                    TcpExt: 0 0 17 19\n\
                    IpExt: InNoRoutes\n\
                    IpExt: 0\n";
        assert_eq!(listen_overflows(text), Some(17));
        assert_eq!(listen_overflows("IpExt: A\nIpExt: 1\n"), None);
        assert_eq!(listen_overflows("TcpExt: ListenOverflows\n"), None);
    }
}
