//! The table of connections and attempts, the one owner of their indexes: by socket address
//! (every socket event names one), by 4-tuple (facts that come without one), the connections
//! waiting for their verdict after CLOSE, and the short-lived memories that keep late facts
//! from being counted twice. Nothing outside this module touches an index.

use std::collections::BTreeMap;

use super::{
    HashMap,
    attempt::{self, Attempt, HandshakeDrop},
    conn::Conn,
    route::RouteWalks,
};
use crate::engine::{
    facts::{Errno, FourTuple},
    verdict::detail::PathDrop,
};

/// Path drops, and drops of connections not followed, are kept this long after the last one:
/// a connection can take minutes to die.
const PATH_DROPS_KEEP_NS: u64 = 300_000_000_000;

/// A connection's key in the table, in creation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(u64);

/// An attempt's key: the namespace and the tuple (s = this host).
pub type AttemptKey = (Option<u32>, FourTuple);

/// What identifies a decided connection for late syscall results.
#[derive(Debug, Clone, Copy)]
pub struct Decided {
    pub at_ns: u64,
    pub daddr: std::net::IpAddr,
    pub dport: u16,
    pub pid: Option<u32>,
}

/// Drops kept by tuple, in the namespace `netns`, the last at `last_ns`: an established
/// connection's that no followed connection owned (quiet mode keeps a healthy one in the
/// kernel; a pool's opened before conntrace), dropped before they reached its socket; or a
/// decided attempt's.
#[derive(Debug, Clone)]
pub struct KeptDrops {
    pub netns: Option<u32>,
    pub last_ns: u64,
    pub drops: Vec<HandshakeDrop>,
}

/// A socket error that has not found its connection yet (the local port may still be unknown).
#[derive(Debug, Clone, Copy)]
pub struct OrphanError {
    pub ts_ns: u64,
    pub errno: Option<Errno>,
}

pub struct Table {
    /// Most connections tracked at once (and, separately, most of each short-lived memory).
    max: usize,
    /// Most attempts tracked at once, and most decided attempts remembered.
    max_attempts: usize,
    /// Most connections whose drops are kept without a connection here (`path_drops`,
    /// `unfollowed_drops`).
    max_kept_drops: usize,
    next_id: u64,
    /// Ordered by creation: the first entry is the oldest.
    conns: BTreeMap<ConnId, Conn>,
    by_sk: HashMap<u64, ConnId>,
    /// Full 4-tuple (local port known) → connection.
    by_tuple: HashMap<FourTuple, ConnId>,
    /// Connections that reached CLOSE and wait for their verdict (at most those of the last
    /// grace period), so deciding them never walks the whole table.
    closing: Vec<ConnId>,
    attempts: HashMap<AttemptKey, Attempt>,
    orphan_errors: HashMap<FourTuple, OrphanError>,
    /// Sockets decided recently: a late `connect()` result for the same socket, destination and
    /// process is not a new failure (the address alone may already belong to a new socket).
    recently_decided: HashMap<u64, Decided>,
    /// The errors of connections decided recently, by tuple: the kernel reports a reset's
    /// error (`inet_sk_error_report`) after the close that carried it, so a verdict may be
    /// out before its report comes.
    decided_errors: HashMap<FourTuple, (u64, Errno)>,
    /// RSTs received by sockets no tracked connection owns, by socket address: when.
    unowned_resets: HashMap<u64, u64>,
    /// SYNs this host refused without a socket just now: the kernel then frees the SYN with
    /// NO_SOCKET, which is the refusal itself, not another drop.
    recent_refusals: HashMap<AttemptKey, u64>,
    /// Drops of forwarded packets, by connection (either end first: see [`path_key`]), with
    /// when the last came.
    path_drops: HashMap<FourTuple, (u64, Vec<PathDrop>)>,
    /// `connect()` calls seen only through their failed route lookups, not yet decided.
    route_walks: RouteWalks,
    /// Drops of established connections not followed here, by tuple (this host's end
    /// first): the connection takes them when it is followed, its other end reads them.
    unfollowed_drops: HashMap<FourTuple, KeptDrops>,
    /// The drops of attempts decided recently, by tuple: the handshake never completed, and
    /// the other end's stall may end after that.
    decided_attempts: HashMap<FourTuple, KeptDrops>,
    /// Attempts opened (true) and closed (false) since the last [`Table::take_attempt_log`],
    /// when [`Table::log_attempts`] asked for them.
    attempt_log: Option<Vec<(AttemptKey, bool)>>,
}

/// A connection's key for path drops, the same from both ends: the lower end first.
fn path_key(t: FourTuple) -> FourTuple {
    let r = t.reversed();
    if (t.saddr, t.sport) <= (r.saddr, r.sport) {
        t
    } else {
        r
    }
}

impl Table {
    pub fn new(max: usize, max_attempts: usize, max_kept_drops: usize) -> Self {
        Self {
            max,
            max_attempts,
            max_kept_drops,
            next_id: 0,
            conns: BTreeMap::new(),
            by_sk: HashMap::default(),
            by_tuple: HashMap::default(),
            closing: Vec::new(),
            attempts: HashMap::default(),
            orphan_errors: HashMap::default(),
            recently_decided: HashMap::default(),
            decided_errors: HashMap::default(),
            unowned_resets: HashMap::default(),
            recent_refusals: HashMap::default(),
            path_drops: HashMap::default(),
            route_walks: RouteWalks::new(max),
            unfollowed_drops: HashMap::default(),
            decided_attempts: HashMap::default(),
            attempt_log: None,
        }
    }

    /// The failed route lookups of `connect()` calls not yet decided.
    pub fn route_walks_mut(&mut self) -> &mut RouteWalks {
        &mut self.route_walks
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn id_of(&self, sk: u64) -> Option<ConnId> {
        self.by_sk.get(&sk).copied()
    }

    pub fn id_by_tuple(&self, tuple: &FourTuple) -> Option<ConnId> {
        self.by_tuple.get(tuple).copied()
    }

    /// The other end of connection `c` in another namespace of this host, when it is
    /// followed too: the connection whose tuple is `c`'s reversed.
    pub fn peer_of(&self, c: &Conn) -> Option<&Conn> {
        self.peer(c.netns, c.tuple).filter(|p| p.sk != c.sk)
    }

    /// The followed connection at the other end of `tuple` in `netns`: the reversed tuple,
    /// in another namespace.
    fn peer(&self, netns: Option<u32>, tuple: FourTuple) -> Option<&Conn> {
        self.get(self.id_by_tuple(&tuple.reversed())?)
            .filter(|p| p.netns != netns)
    }

    /// The handshake drops at the other end of the connection `tuple` in `netns`, in another
    /// namespace of this host or in the same one (loopback): its followed peer's, else those of the attempt the other end
    /// follows without a connection (its final ACK still dropped there), or decided lately.
    /// As (that namespace, the drops).
    pub fn peer_handshake_drops(
        &self,
        netns: Option<u32>,
        tuple: FourTuple,
    ) -> Option<(Option<u32>, Vec<HandshakeDrop>)> {
        if let Some(p) = self.peer(netns, tuple).filter(|p| !p.drops.is_empty()) {
            return Some((p.netns, p.drops.clone()));
        }
        let reversed = tuple.reversed();
        // Both ends in one namespace (loopback, or a host's own address): the attempt of the
        // reversed tuple there is the other end's.
        self.attempts
            .get(&(netns, reversed))
            .map(|a| (netns, a.drops.clone()))
            .or_else(|| {
                self.attempts
                    .iter()
                    .find(|((ns, t), _)| *t == reversed && *ns != netns)
                    .map(|((ns, _), a)| (*ns, a.drops.clone()))
            })
            .or_else(|| {
                self.decided_attempts
                    .get(&reversed)
                    .map(|k| (k.netns, k.drops.clone()))
            })
    }

    /// The drops at the other end of connection `c`, in another namespace of this host: its
    /// followed peer's late drops, else those kept for the reversed tuple while that end was
    /// not followed. As (that namespace, the drops).
    pub fn peer_drops(&self, c: &Conn) -> Option<(Option<u32>, &[HandshakeDrop])> {
        if let Some(p) = self.peer_of(c) {
            return Some((p.netns, &p.late_drops));
        }
        self.unfollowed_drops
            .get(&c.tuple.reversed())
            .filter(|u| u.netns != c.netns)
            .map(|u| (u.netns, u.drops.as_slice()))
    }

    pub fn get(&self, id: ConnId) -> Option<&Conn> {
        self.conns.get(&id)
    }

    pub fn get_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.conns.get_mut(&id)
    }

    pub fn by_sk(&self, sk: u64) -> Option<&Conn> {
        self.get(self.id_of(sk)?)
    }

    pub fn by_sk_mut(&mut self, sk: u64) -> Option<&mut Conn> {
        let id = self.id_of(sk)?;
        self.conns.get_mut(&id)
    }

    /// Adds a connection, indexed by its socket address; returns the oldest connections
    /// dropped to make room.
    pub fn insert(&mut self, conn: Conn) -> (ConnId, Vec<Conn>) {
        let mut evicted = Vec::new();
        while self.conns.len() >= self.max {
            let Some(&oldest) = self.conns.keys().next() else {
                break;
            };
            evicted.extend(self.remove(oldest));
        }
        let id = ConnId(self.next_id);
        self.next_id += 1;
        self.by_sk.insert(conn.sk, id);
        self.conns.insert(id, conn);
        (id, evicted)
    }

    /// Removes a connection and every index entry that points to it.
    pub fn remove(&mut self, id: ConnId) -> Option<Conn> {
        let c = self.conns.remove(&id)?;
        if self.by_sk.get(&c.sk) == Some(&id) {
            self.by_sk.remove(&c.sk);
        }
        if self.by_tuple.get(&c.tuple) == Some(&id) {
            self.by_tuple.remove(&c.tuple);
        }
        self.closing.retain(|&x| x != id);
        Some(c)
    }

    /// Indexes the connection of `sk` by its tuple once the local port is known; it takes the
    /// drops kept for that tuple in its namespace while it was not followed.
    pub fn index_tuple(&mut self, sk: u64) {
        if let Some(id) = self.id_of(sk)
            && let Some(c) = self.conns.get_mut(&id)
            && c.tuple.sport != 0
        {
            self.by_tuple.insert(c.tuple, id);
            let own = self
                .unfollowed_drops
                .get(&c.tuple)
                .is_some_and(|u| u.netns == c.netns || u.netns.is_none() || c.netns.is_none());
            if own && let Some(u) = self.unfollowed_drops.remove(&c.tuple) {
                for d in u.drops {
                    attempt::record(&mut c.late_drops, d);
                }
            }
        }
    }

    /// The connection reached CLOSE: it waits for its verdict.
    pub fn mark_closing(&mut self, id: ConnId) {
        if !self.closing.contains(&id) {
            self.closing.push(id);
        }
    }

    /// Closing connections for which `ready` holds (or which are gone).
    pub fn closing_where(&self, ready: impl Fn(&Conn) -> bool) -> Vec<ConnId> {
        self.closing
            .iter()
            .copied()
            .filter(|id| self.conns.get(id).is_none_or(&ready))
            .collect()
    }

    /// Connections for which `pred` holds.
    pub fn ids_where(&self, pred: impl Fn(&Conn) -> bool) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|(_, c)| pred(c))
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn conns_mut(&mut self) -> impl Iterator<Item = &mut Conn> {
        self.conns.values_mut()
    }

    /// Empties the table, returning every connection.
    pub fn drain(&mut self) -> Vec<Conn> {
        self.by_sk.clear();
        self.by_tuple.clear();
        self.closing.clear();
        std::mem::take(&mut self.conns).into_values().collect()
    }

    // Attempts.

    pub fn attempt(&self, key: &AttemptKey) -> Option<&Attempt> {
        self.attempts.get(key)
    }

    pub fn attempt_mut(&mut self, key: &AttemptKey) -> Option<&mut Attempt> {
        self.attempts.get_mut(key)
    }

    /// The attempt at `key`, made with `new` when there is none and there is room.
    pub fn attempt_entry(
        &mut self,
        key: AttemptKey,
        new: impl FnOnce() -> Attempt,
    ) -> Option<&mut Attempt> {
        if !self.attempts.contains_key(&key) {
            if self.attempts.len() >= self.max_attempts {
                return None;
            }
            if let Some(log) = self.attempt_log.as_mut() {
                log.push((key, true));
            }
        }
        Some(self.attempts.entry(key).or_insert_with(new))
    }

    pub fn has_room_for_attempt(&self, key: &AttemptKey) -> bool {
        self.attempts.len() < self.max_attempts || self.attempts.contains_key(key)
    }

    pub fn take_attempt(&mut self, key: &AttemptKey) -> Option<Attempt> {
        let a = self.attempts.remove(key)?;
        if let Some(log) = self.attempt_log.as_mut() {
            log.push((*key, false));
        }
        Some(a)
    }

    /// Keeps the drops of attempt `key`, just decided without its handshake completing, for
    /// its other end's later verdicts and its own late packets (a cookie's: the client goes on
    /// sending on a connection it believes established).
    pub fn remember_decided_attempt(&mut self, (netns, tuple): AttemptKey, a: &Attempt) {
        if (a.drops.is_empty() && a.cookies.is_none())
            || (!self.decided_attempts.contains_key(&tuple)
                && self.decided_attempts.len() >= self.max_attempts)
        {
            return;
        }
        let kept = KeptDrops {
            netns,
            last_ns: a.last_ns(),
            drops: a.drops.clone(),
        };
        self.decided_attempts.insert(tuple, kept);
    }

    /// Whether attempt `key` was decided lately (kept by [`Table::remember_decided_attempt`]).
    pub fn was_decided_attempt(&self, (netns, tuple): &AttemptKey) -> bool {
        self.decided_attempts
            .get(tuple)
            .is_some_and(|k| k.netns == *netns)
    }

    /// Keeps a log of the attempts opened and closed from now on.
    pub fn log_attempts(&mut self) {
        self.attempt_log.get_or_insert_with(Vec::new);
    }

    /// The attempts opened (true) and closed (false) since the last call, in order.
    pub fn take_attempt_log(&mut self) -> Vec<(AttemptKey, bool)> {
        self.attempt_log
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Keys of the attempts for which `ended` holds.
    pub fn attempts_where(&self, ended: impl Fn(&Attempt) -> bool) -> Vec<AttemptKey> {
        self.attempts
            .iter()
            .filter(|(_, a)| ended(a))
            .map(|(k, _)| *k)
            .collect()
    }

    // Short-lived memories.

    /// Keeps an error report for the connection whose tuple it names; false when full.
    pub fn keep_orphan_error(&mut self, tuple: FourTuple, error: OrphanError) -> bool {
        if self.orphan_errors.len() >= self.max {
            return false;
        }
        self.orphan_errors.insert(tuple, error);
        true
    }

    pub fn take_orphan_error(&mut self, tuple: &FourTuple) -> Option<OrphanError> {
        self.orphan_errors.remove(tuple)
    }

    /// The drops kept for the established connection `tuple` in `netns` while it is not
    /// followed, if any.
    pub fn unfollowed_drops(
        &self,
        netns: Option<u32>,
        tuple: &FourTuple,
    ) -> Option<&[HandshakeDrop]> {
        self.unfollowed_drops
            .get(tuple)
            .filter(|u| u.netns == netns)
            .map(|u| u.drops.as_slice())
    }

    /// Keeps drop `d` of the established connection `tuple` in `netns`, not followed here;
    /// false when full.
    pub fn keep_unfollowed_drop(
        &mut self,
        netns: Option<u32>,
        tuple: FourTuple,
        d: HandshakeDrop,
    ) -> bool {
        if !self.unfollowed_drops.contains_key(&tuple)
            && self.unfollowed_drops.len() >= self.max_kept_drops
        {
            return false;
        }
        let u = self
            .unfollowed_drops
            .entry(tuple)
            .or_insert_with(|| KeptDrops {
                netns,
                last_ns: d.last_ns,
                drops: Vec::new(),
            });
        u.last_ns = u.last_ns.max(d.last_ns);
        attempt::record(&mut u.drops, d);
        true
    }

    pub fn remember_decided(&mut self, sk: u64, d: Decided) {
        self.recently_decided.insert(sk, d);
    }

    /// Remembers that the connection of `tuple`, decided at `at_ns`, had error `errno`.
    pub fn remember_decided_error(&mut self, tuple: FourTuple, at_ns: u64, errno: Errno) {
        if self.decided_errors.len() < self.max {
            self.decided_errors.insert(tuple, (at_ns, errno));
        }
    }

    /// Whether a connection of `tuple` decided recently had error `errno` (`None`: a report
    /// that found the error already read by the process, any error): a report of it now
    /// repeats what its verdict already says.
    pub fn decided_with_error(&self, tuple: &FourTuple, errno: Option<Errno>) -> bool {
        self.decided_errors
            .get(tuple)
            .is_some_and(|(_, e)| errno.is_none_or(|errno| *e == errno))
    }

    /// A RST received by socket `sk` at `at_ns` that no tracked connection owns: the close
    /// that follows it (a connection opened before conntrace started) claims it.
    pub fn remember_unowned_reset(&mut self, sk: u64, at_ns: u64) {
        if self.unowned_resets.len() < self.max {
            self.unowned_resets.insert(sk, at_ns);
        }
    }

    /// When socket `sk` received a RST no connection owned, if it did.
    pub fn take_unowned_reset(&mut self, sk: u64) -> Option<u64> {
        self.unowned_resets.remove(&sk)
    }

    pub fn recently_decided(&self, sk: u64) -> Option<&Decided> {
        self.recently_decided.get(&sk)
    }

    pub fn remember_refusal(&mut self, key: AttemptKey, ts_ns: u64) {
        if self.recent_refusals.len() < self.max {
            self.recent_refusals.insert(key, ts_ns);
        }
    }

    pub fn was_refused(&self, key: &AttemptKey) -> bool {
        self.recent_refusals.contains_key(key)
    }

    /// A forwarded packet of connection `tuple` was dropped (merged with drops of its kind in
    /// the same namespace); false when the table is full.
    pub fn add_path_drop(&mut self, tuple: FourTuple, ts_ns: u64, new: PathDrop) -> bool {
        let key = path_key(tuple);
        if !self.path_drops.contains_key(&key) && self.path_drops.len() >= self.max_kept_drops {
            return false;
        }
        let (last, drops) = self.path_drops.entry(key).or_insert((ts_ns, Vec::new()));
        *last = ts_ns;
        match drops
            .iter_mut()
            .find(|d| d.netns == new.netns && d.kernel_reason == new.kernel_reason)
        {
            Some(d) => {
                d.count += new.count;
                d.tcp_flags |= new.tcp_flags;
            }
            None => drops.push(new),
        }
        true
    }

    /// The forwarded packets of connection `tuple` that were dropped.
    pub fn path_drops(&self, tuple: FourTuple) -> Vec<PathDrop> {
        self.path_drops
            .get(&path_key(tuple))
            .map(|(_, d)| d.clone())
            .unwrap_or_default()
    }

    /// Forgets memories older than `keep_ns`; returns how many error reports expired without
    /// finding their connection.
    pub fn forget_older_than(&mut self, now_ns: u64, keep_ns: u64) -> u64 {
        self.path_drops
            .retain(|_, (last, _)| now_ns < *last + PATH_DROPS_KEEP_NS);
        self.unfollowed_drops
            .retain(|_, u| now_ns < u.last_ns + PATH_DROPS_KEEP_NS);
        self.decided_attempts
            .retain(|_, k| now_ns < k.last_ns + PATH_DROPS_KEEP_NS);
        self.recently_decided
            .retain(|_, d| now_ns < d.at_ns + keep_ns);
        self.recent_refusals.retain(|_, at| now_ns < *at + keep_ns);
        self.decided_errors
            .retain(|_, (at, _)| now_ns < *at + keep_ns);
        self.unowned_resets.retain(|_, at| now_ns < *at + keep_ns);
        let before = self.orphan_errors.len();
        self.orphan_errors.retain(|_, o| now_ns < o.ts_ns + keep_ns);
        (before - self.orphan_errors.len()) as u64
    }
}
