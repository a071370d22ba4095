//! Counts over a run, kept by the engine as verdicts go out.

use std::{collections::BTreeMap, net::IpAddr};

use schemars::JsonSchema;
use serde::Serialize;

use conntrace_common::quiet::{LATENCY_BUCKETS, latency_bucket, latency_bucket_bounds};

use super::{Detail, Outcome, Reason, Verdict};
use crate::engine::facts::{DropReason, FourTuple};

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
    pub drops_by_reason: BTreeMap<DropReason, u64>,
    /// Drops not written as `drop` records because more than
    /// [`RECORDS_PER_SECOND`](crate::engine::RECORDS_PER_SECOND) of one reason came within a
    /// second (sliding) in one namespace (still counted in `drops_by_reason`).
    pub drop_records_suppressed: u64,
    /// Verdicts of attempts without a socket (dropped SYNs, failed SYN cookies, refusals of
    /// SYNs nobody listens for) not written
    /// because more than [`RECORDS_PER_SECOND`](crate::engine::RECORDS_PER_SECOND) ended within
    /// a second (sliding) at one local port (a SYN flood), counted apart for attempts whose peer answered
    /// (`Attempt::answered`) and the others; failed cookies are still counted in the
    /// listener's `cookies_failed`.
    pub attempt_verdicts_suppressed: u64,
    /// Drops of forwarded packets (neither end local to the dropping namespace).
    pub forwarded_drops: u64,
    /// SYN cookies seen sent on traced ports, by namespace (to compare with its
    /// TcpExtSyncookiesSent).
    pub cookies_by_netns: BTreeMap<u32, u64>,
    /// Per listener (`ip:port`): SYN cookies and queue overflows.
    pub listeners: BTreeMap<String, ListenerCounts>,
    /// Failed or stalled verdicts by the remote end's address.
    pub failing_peers: BTreeMap<IpAddr, u64>,
    /// Failed or stalled verdicts by service port (the server's port; 0 when unknown).
    pub failing_ports: BTreeMap<u16, u64>,
    /// Client handshake times (SYN_SENT to ESTABLISHED): counts by
    /// [`latency_bucket`] of the microseconds (empty until the first).
    pub connect_latency: Vec<u64>,
    /// Quiet mode: what the kernel kept to itself.
    pub kernel_kept: Option<KernelKept>,
    /// The first verdict of each failure reason: the concrete case the advice names.
    pub examples: BTreeMap<Reason, Verdict>,
}

/// Where a `listen_overflow` verdict counts in [`Summary::listeners`]: the address clients
/// reached (`saddr:sport`), or, for one from the namespace's counter on a listener bound to
/// no single address (`saddr` null), that listener's own address (`0.0.0.0:3306`), from
/// `detail.listener` or else the family's unspecified address.
fn overflow_key(v: &Verdict) -> Option<String> {
    let sport = v.sport?;
    if let Some(saddr) = v.saddr {
        return Some(std::net::SocketAddr::new(saddr, sport).to_string());
    }
    if let Detail::Overflow(d) = &v.detail
        && let Some(l) = &d.queue.listener
    {
        return Some(l.address.clone());
    }
    let unspecified: IpAddr = if v.daddr.is_ipv6() {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    };
    Some(std::net::SocketAddr::new(unspecified, sport).to_string())
}

/// Quiet mode: connections the kernel followed without sending their events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, JsonSchema)]
pub struct KernelKept {
    /// Connections that closed healthy and never reached userspace.
    pub closed_quietly: u64,
    /// Connections whose history the kernel sent when they needed userspace (a failure, a
    /// reset, a retransmission, a drop, a stall).
    pub histories: u64,
    /// Connections that found the kernel's table full (their slot of 8,192 another socket's
    /// and the 65,536-entry overflow map full) and sent every event instead.
    pub table_full: u64,
    /// Handshake attempts (a dropped SYN or final ACK, a cookie) whose tuple found the kernel's
    /// table of followed attempts (4,096 tuples; an IPv4 attempt takes two) full, under a flood
    /// of attempts: while any was open, every listener's child sent its events, so that each
    /// attempt still saw its handshake complete.
    pub attempt_table_full: u64,
    /// Connections the kernel still held, established past `--stall-timeout`, that sock_diag
    /// found closed at two checks in a row: the kernel skipped the program at their close
    /// (see `program_misses`). Their entries were dropped; a stalled one among them got no
    /// follow-up.
    pub closes_unseen: u64,
    /// Connections userspace found stuck (or with a zero window) that found the kernel's table
    /// of watched connections (`WATCH`, 8,192) full: their close reaches userspace only if the
    /// check sees it (a stall may then end without its follow-up, counted in `closes_unseen`).
    pub watch_full: u64,
}

/// What happened at one listener over the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
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
    /// Records a client handshake time.
    pub fn connect_latency(&mut self, ns: u64) {
        self.add_latency_counts(std::iter::once((latency_bucket(ns / 1_000), 1)));
    }

    /// Adds handshake counts by bucket (the kernel's, in quiet mode).
    pub fn add_latency_counts(&mut self, counts: impl IntoIterator<Item = (u32, u64)>) {
        for (bucket, n) in counts {
            if n == 0 || bucket >= LATENCY_BUCKETS {
                continue;
            }
            if self.connect_latency.is_empty() {
                self.connect_latency = vec![0; LATENCY_BUCKETS as usize];
            }
            self.connect_latency[bucket as usize] += n;
        }
    }

    /// (count, p50, p90, p99, max) of the handshake times in milliseconds: each the upper
    /// bound of its histogram bucket (at most 12.5 % above the true value).
    pub fn latency_percentiles(&self) -> Option<(u64, f64, f64, f64, f64)> {
        let total: u64 = self.connect_latency.iter().sum();
        if total == 0 {
            return None;
        }
        let upper_ms = |b: usize| latency_bucket_bounds(b as u32).1 as f64 / 1000.0;
        let at = |q: f64| {
            // The smallest bucket whose cumulative count reaches rank ceil(q * total).
            let rank = ((q * total as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (b, &n) in self.connect_latency.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return upper_ms(b);
                }
            }
            upper_ms(self.connect_latency.len() - 1)
        };
        Some((total, at(0.5), at(0.9), at(0.99), at(1.0)))
    }

    /// The `n` largest entries of a count map, largest first.
    pub fn top<K: Clone + Ord>(map: &BTreeMap<K, u64>, n: usize) -> Vec<(K, u64)> {
        let mut v: Vec<(K, u64)> = map.iter().map(|(k, c)| (k.clone(), *c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }

    /// Counts a verdict that goes out.
    pub fn count(&mut self, v: &Verdict) {
        *self.by_outcome.entry(v.outcome).or_default() += 1;
        *self.by_reason.entry(v.reason).or_default() += 1;
        if matches!(v.outcome, Outcome::Failed | Outcome::Stalled) {
            if !v.daddr.is_unspecified() {
                *self.failing_peers.entry(v.daddr).or_default() += 1;
            }
            *self
                .failing_ports
                .entry(v.service_port().unwrap_or(0))
                .or_default() += 1;
            self.examples.entry(v.reason).or_insert_with(|| v.clone());
        }
        if v.reason == Reason::ListenOverflow
            && let Some(key) = overflow_key(v)
        {
            let n = match &v.detail {
                Detail::Overflow(d) => d.overflows,
                _ => 1,
            };
            self.listeners.entry(key).or_default().overflows += n;
        }
    }

    /// The counts of the listener at `tuple`'s local end (the address clients reached).
    pub(crate) fn listener(&mut self, tuple: &FourTuple) -> &mut ListenerCounts {
        let key = std::net::SocketAddr::new(tuple.saddr, tuple.sport).to_string();
        self.listeners.entry(key).or_default()
    }
}
