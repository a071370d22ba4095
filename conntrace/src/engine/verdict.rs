//! The reason engine's output.

use std::{collections::BTreeMap, net::IpAddr};

use serde_json::{Map, Value};

use super::model::{Outcome, Reason, Side};

/// One connection's verdict. Times are CLOCK_MONOTONIC; the output layer turns them into UTC.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub ts_ns: u64,
    pub side: Side,
    pub outcome: Outcome,
    pub reason: Reason,
    /// The kernel's own name for what happened: errno name, reset reason, TCP state.
    pub kernel_reason: Option<String>,
    /// The socket's error as an errno name, when it got one.
    pub errno: Option<String>,
    /// Local end; unknown when the kernel never assigned it (e.g. no route).
    pub saddr: Option<IpAddr>,
    pub sport: Option<u16>,
    pub daddr: IpAddr,
    pub dport: u16,
    pub netns: u32,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// Connect start (client) or child socket creation (server) to the verdict's event.
    pub duration_ms: f64,
    pub syn_retransmits: u32,
    pub detail: Map<String, Value>,
}

/// Which way a dropped packet was going, from this host's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Received (or being received) by this host.
    In,
    /// Sent by a local socket.
    Out,
}

/// A packet the kernel dropped on a traced port (`drop` record).
#[derive(Debug, Clone, PartialEq)]
pub struct DropRecord {
    pub ts_ns: u64,
    pub netns: u32,
    pub direction: Direction,
    /// `s` = this host's end, as in verdicts.
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    /// The kernel's drop reason (`enum skb_drop_reason` name).
    pub kernel_reason: String,
    /// Where the kernel dropped it (`symbol+offset`).
    pub location: String,
    /// TCP flags of the dropped segment, e.g. `SYN`, `ACK|FIN`.
    pub tcp_flags: String,
    /// The sending process, for outgoing packets dropped in its context.
    pub pid: Option<u32>,
    pub comm: Option<String>,
}

/// Counts over a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub by_outcome: BTreeMap<Outcome, u64>,
    pub by_reason: BTreeMap<Reason, u64>,
    /// Connections forgotten before any verdict (table full or no event for too long).
    pub expired_unresolved: u64,
    /// Kernel events processed.
    pub events: u64,
    /// Handshakes completed (TCP_ESTABLISHED) on traced ports: (client side, server side).
    /// Counted with or without `--all`, so a run's connection count is exact either way.
    pub established: (u64, u64),
    /// Error reports that matched no connection.
    pub unmatched_errors: u64,
    /// Resets this host sent, without a socket, to segments other than a SYN (late or stray
    /// packets of connections already gone): not refusals, only counted.
    pub stray_resets: u64,
    /// Dropped packets on traced ports, by kernel drop reason.
    pub drops_by_reason: BTreeMap<String, u64>,
    /// Drops not written as `drop` records because more than 50 of one reason came in one
    /// second in one namespace (still counted in `drops_by_reason`).
    pub drop_records_suppressed: u64,
    /// Failed SYN-cookie attempts not written as verdicts because more than 50 ended in one
    /// second at one listener (a SYN flood); still counted in the listener's `cookies_failed`.
    pub attempt_verdicts_suppressed: u64,
    /// Per listener (`ip:port`): SYN cookies and queue overflows.
    pub listeners: BTreeMap<String, ListenerCounts>,
    /// Failed or stalled verdicts by the remote end's address.
    pub failing_peers: BTreeMap<IpAddr, u64>,
    /// Failed or stalled verdicts by service port (the server's port).
    pub failing_ports: BTreeMap<u16, u64>,
    /// Client handshake times (SYN_SENT to ESTABLISHED), microseconds; at most
    /// [`LATENCY_SAMPLES`] are kept.
    pub connect_latency_us: Vec<u32>,
    /// The first verdict of each failure reason: the concrete case the advice names.
    pub examples: BTreeMap<Reason, Verdict>,
}

/// Most handshake times kept for the latency percentiles (4 MB).
pub const LATENCY_SAMPLES: usize = 1 << 20;

impl Summary {
    /// Records a client handshake time.
    pub fn connect_latency(&mut self, ns: u64) {
        if self.connect_latency_us.len() < LATENCY_SAMPLES {
            self.connect_latency_us
                .push(u32::try_from(ns / 1_000).unwrap_or(u32::MAX));
        }
    }

    /// (count, p50, p90, p99, max) of the handshake times in milliseconds.
    pub fn latency_percentiles(&self) -> Option<(usize, f64, f64, f64, f64)> {
        let mut v = self.connect_latency_us.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let at = |q: f64| f64::from(v[((v.len() - 1) as f64 * q).round() as usize]) / 1000.0;
        Some((v.len(), at(0.5), at(0.9), at(0.99), at(1.0)))
    }

    /// The `n` largest entries of a count map, largest first.
    pub fn top<K: Clone + Ord>(map: &BTreeMap<K, u64>, n: usize) -> Vec<(K, u64)> {
        let mut v: Vec<(K, u64)> = map.iter().map(|(k, c)| (k.clone(), *c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }
}

/// What happened at one listener over the run.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ListenerCounts {
    /// SYN-ACKs sent with a cookie.
    pub cookies_sent: u64,
    /// Cookie attempts that became a connection.
    pub cookies_validated: u64,
    /// Cookie attempts that never did (`syncookie_ack_lost`).
    pub cookies_failed: u64,
    /// Accept-queue overflows (the namespace's counter growth while this listener was full,
    /// plus final ACKs dropped for it).
    pub overflows: u64,
}

impl Summary {
    pub fn count(&mut self, v: &Verdict) {
        *self.by_outcome.entry(v.outcome).or_default() += 1;
        *self.by_reason.entry(v.reason).or_default() += 1;
        if matches!(v.outcome, Outcome::Failed | Outcome::Stalled) {
            if !v.daddr.is_unspecified() {
                *self.failing_peers.entry(v.daddr).or_default() += 1;
            }
            let port = match v.side {
                Side::Server => v.sport.unwrap_or(0),
                Side::Client => v.dport,
            };
            *self.failing_ports.entry(port).or_default() += 1;
            self.examples.entry(v.reason).or_insert_with(|| v.clone());
        }
        if v.reason == Reason::ListenOverflow
            && let (Some(saddr), Some(sport)) = (v.saddr, v.sport)
        {
            let n = v.detail.get("overflows").and_then(Value::as_u64);
            self.listeners
                .entry(std::net::SocketAddr::new(saddr, sport).to_string())
                .or_default()
                .overflows += n.unwrap_or(1);
        }
    }

    /// The counts of the listener at `tuple`'s local end.
    pub(crate) fn listener(&mut self, tuple: &super::model::FourTuple) -> &mut ListenerCounts {
        let key = std::net::SocketAddr::new(tuple.saddr, tuple.sport).to_string();
        self.listeners.entry(key).or_default()
    }
}
