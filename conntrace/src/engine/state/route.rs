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
use crate::engine::{
    facts::{FourTuple, Meta, TableAnswer},
    lookup::Route,
};

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
    /// The namespace's route to the destination (`ip route get`), read when the last answer
    /// came: `None` when not read or unreadable. Read then, not at the decision a grace
    /// period later, by when a route put back (a script's `ip route add` right after its
    /// test) would hide the failure.
    pub route: Option<Route>,
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
    /// walk or starts a new one. Returns that walk (its `route` not read yet), or `None` when
    /// there is no room (the answer is dropped).
    pub fn add(
        &mut self,
        meta: Meta,
        tuple: FourTuple,
        table: u32,
        answer: TableAnswer,
    ) -> Option<&mut Walk> {
        let key = (meta.netns, meta.proc.pid, tuple.daddr, tuple.dport);
        if !self.by_key.contains_key(&key) && self.by_key.len() >= self.max {
            return None;
        }
        let walks = self.by_key.entry(key).or_default();
        if walks
            .last()
            .is_some_and(|last| last.continued_by(tuple.saddr, table))
        {
            let last = walks.last_mut()?;
            last.answers.push((table, answer));
            last.meta = meta;
            last.route = None;
            return Some(last);
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
            route: None,
        });
        walks.last_mut()
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
