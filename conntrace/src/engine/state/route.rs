//! `connect()` calls seen only through their failed route lookups (quiet mode, where the
//! syscall is not traced): each lookup's failed table answers, grouped into walks of the
//! routing rules, held for a short grace until it is clear that the `connect()` did not go on.
//!
//! What one `connect()` traces (measured on 6.18, see `conntrace-ebpf/src/fib.rs` for what the
//! kernel side leaves out, notably misses in the local table):
//!
//! * IPv4: one lookup (`ip_route_connect`, no source address yet) whose walk fails ends
//!   `connect()`; a walk is one table (the main table) without custom rules, else each table
//!   of the rules in order until one answers with anything but a miss;
//! * IPv6 (`ip6_dst_lookup_tail`): a lookup without a source address, then, with the source
//!   the kernel picked, the same lookup again: two walks for one `connect()`.

use std::net::IpAddr;

use super::HashMap;
use crate::engine::facts::{Errno, FourTuple, Meta, TableAnswer};

/// A `connect()`'s key: namespace, process (pid), destination address and port.
pub type RouteKey = (Option<u32>, u32, IpAddr, u16);

/// Most walks kept per key: a process that retries faster than the grace period.
const MAX_WALKS_PER_KEY: usize = 64;

/// One walk of the routing rules for one route lookup: the tables that answered it with an
/// error, in the order they answered.
#[derive(Debug, Clone)]
pub struct Walk {
    /// The last answer's event: the connecting process, its namespace, the time.
    pub meta: Meta,
    /// The lookup's flow: the source it asked for (unspecified until the kernel chose one),
    /// the local port (0 until chosen), the destination.
    pub tuple: FourTuple,
    /// (table, answer), in order.
    pub answers: Vec<(u32, TableAnswer)>,
}

impl Walk {
    /// Whether an answer of `table` to a lookup from `src` belongs to this walk: the same
    /// lookup (same source), a table this walk has not asked yet, and no answer so far that
    /// ended the walk.
    fn continued_by(&self, src: IpAddr, table: u32) -> bool {
        self.tuple.saddr == src
            && self.answers.iter().all(|&(t, _)| t != table)
            && self.answers.last().is_none_or(|(_, a)| a.may_go_on())
    }

    /// The answer the walk ended with: an error that stops it, or the last table's miss.
    pub fn last_answer(&self) -> TableAnswer {
        self.answers
            .last()
            .map_or(TableAnswer::Miss, |&(_, answer)| answer)
    }

    /// When its last answer came (CLOCK_MONOTONIC ns).
    pub fn last_ns(&self) -> u64 {
        self.meta.ts_ns
    }
}

/// The walks not yet decided, by `connect()` key, oldest first.
pub struct RouteWalks {
    /// Most keys held at once.
    max: usize,
    by_key: HashMap<RouteKey, Vec<Walk>>,
}

impl RouteWalks {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            by_key: HashMap::default(),
        }
    }

    /// Adds one table's failed answer to a lookup of `connect()`: it continues the key's last
    /// walk or starts a new one. False when there is no room (the answer is dropped).
    pub fn add(&mut self, meta: Meta, tuple: FourTuple, table: u32, answer: TableAnswer) -> bool {
        let key = (meta.netns, meta.proc.pid, tuple.daddr, tuple.dport);
        if !self.by_key.contains_key(&key) && self.by_key.len() >= self.max {
            return false;
        }
        let walks = self.by_key.entry(key).or_default();
        if let Some(last) = walks.last_mut()
            && last.continued_by(tuple.saddr, table)
        {
            last.answers.push((table, answer));
            last.meta = meta;
            return true;
        }
        // IPv6 looks the route up without a source first, then again from the source it
        // picked: the first walk is the same connect() as the second.
        if tuple.daddr.is_ipv6()
            && !tuple.saddr.is_unspecified()
            && walks.last().is_some_and(|w| w.tuple.saddr.is_unspecified())
        {
            walks.pop();
        }
        if walks.len() >= MAX_WALKS_PER_KEY {
            walks.remove(0);
        }
        walks.push(Walk {
            meta,
            tuple,
            answers: vec![(table, answer)],
        });
        true
    }

    /// The `connect()` of `key` went on (SYN_SENT) or reported its result itself: its last
    /// walk, if any, was not its end. Returns whether there was one.
    pub fn settle(&mut self, key: &RouteKey) -> bool {
        let Some(walks) = self.by_key.get_mut(key) else {
            return false;
        };
        let settled = walks.pop().is_some();
        if walks.is_empty() {
            self.by_key.remove(key);
        }
        settled
    }

    /// Removes and returns the walks whose last answer is at least `grace_ns` old (all of them
    /// when `all`), oldest first within each key.
    pub fn take_ready(&mut self, now_ns: u64, grace_ns: u64, all: bool) -> Vec<Walk> {
        let mut ready = Vec::new();
        self.by_key.retain(|_, walks| {
            let n = walks
                .iter()
                .take_while(|w| all || now_ns >= w.last_ns().saturating_add(grace_ns))
                .count();
            ready.extend(walks.drain(..n));
            !walks.is_empty()
        });
        ready.sort_by_key(Walk::last_ns);
        ready
    }
}

/// A connected socket's route lookups that failed: once its route changed (deleted, its
/// device gone), each retransmission looks the route up again
/// (`inet_sk_rebuild_header`, `inet6_sk_rebuild_header`), fails, and sends nothing; the
/// failure stays as the socket's soft error and becomes its error when the kernel gives up.
/// A SYN-ACK's or a reset's lookup is kept the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LostRoute {
    /// The table that answered last, and its answer.
    pub table: u32,
    pub answer: TableAnswer,
    /// Failed table answers seen.
    pub lookups: u32,
    /// When the first and the last came (CLOCK_MONOTONIC ns).
    pub first_ns: u64,
    pub last_ns: u64,
}

impl LostRoute {
    /// One more failed answer.
    pub fn add(&mut self, table: u32, answer: TableAnswer, ts_ns: u64) {
        self.table = table;
        self.answer = answer;
        self.lookups = self.lookups.saturating_add(1);
        self.first_ns = self.first_ns.min(ts_ns);
        self.last_ns = self.last_ns.max(ts_ns);
    }

    /// Whether the lookups' failure is what a socket's error `errno` says: ENETUNREACH for
    /// no route (a miss), EHOSTUNREACH for an `unreachable` route (either for IPv6's answer,
    /// which is both), EACCES for `prohibit`, EINVAL for `blackhole`.
    pub fn explains(&self, errno: Errno) -> bool {
        match self.answer {
            TableAnswer::Miss => errno == Errno::ENETUNREACH,
            TableAnswer::Unreachable => errno == Errno::EHOSTUNREACH,
            // IPv6's "no route" entry is an unreachable route whose error is ENETUNREACH.
            TableAnswer::MissOrUnreachable => {
                errno == Errno::EHOSTUNREACH || errno == Errno::ENETUNREACH
            }
            TableAnswer::Prohibit => errno == Errno::EACCES,
            TableAnswer::Blackhole => errno == Errno::EINVAL,
            TableAnswer::Other(e) => errno == e,
        }
    }
}

/// [`LostRoute`]s by the socket's tuple (this host's end first), until its connection takes
/// them or they are forgotten; at most `max`.
pub struct LostRoutes {
    by_tuple: HashMap<FourTuple, LostRoute>,
    max: usize,
}

impl LostRoutes {
    pub fn new(max: usize) -> Self {
        Self {
            by_tuple: HashMap::default(),
            max,
        }
    }

    /// Keeps a failed answer to the lookup of `tuple`'s route; false when full.
    pub fn note(&mut self, tuple: FourTuple, table: u32, answer: TableAnswer, ts_ns: u64) -> bool {
        if let Some(lost) = self.by_tuple.get_mut(&tuple) {
            lost.add(table, answer, ts_ns);
            return true;
        }
        if self.by_tuple.len() >= self.max {
            return false;
        }
        self.by_tuple.insert(
            tuple,
            LostRoute {
                table,
                answer,
                lookups: 1,
                first_ns: ts_ns,
                last_ns: ts_ns,
            },
        );
        true
    }

    /// The failed lookups kept for `tuple`, taken.
    pub fn take(&mut self, tuple: &FourTuple) -> Option<LostRoute> {
        self.by_tuple.remove(tuple)
    }

    /// Forgets those whose last failure is `keep_ns` old.
    pub fn forget_older_than(&mut self, now_ns: u64, keep_ns: u64) {
        self.by_tuple
            .retain(|_, lost| now_ns < lost.last_ns.saturating_add(keep_ns));
    }
}
