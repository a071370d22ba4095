//! The reason engine: kernel events in, verdicts out. Pure: no kernel, no clock, no I/O.
//!
//! Connections are keyed by the kernel's socket address (`sk`), because the first event of a
//! client connection (CLOSE→SYN_SENT) fires before the local port is chosen. Facts that come
//! without a socket address (error reports) are joined by 4-tuple. A closed connection waits a
//! short grace period for facts that the kernel emits around the close in an order that varies
//! between versions; it is decided as soon as the facts are complete.

mod decide;
mod drops;
pub mod model;
mod stall;
mod state;
#[cfg(test)]
mod tests;
mod timers;
pub mod verdict;

use std::collections::BTreeMap;

/// The engine's look-ups run for every kernel event: a fast hash, still randomly keyed, since
/// remote addresses and ports are chosen by whoever sends SYNs.
type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;

use self::{
    model::{FourTuple, KernelEvent, Meta, Proc, Side, TcpState},
    verdict::{Summary, Verdict},
};

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Emit a verdict for established connections too (`--all`).
    pub report_established: bool,
    /// How long a server connection may wait for accept() before its verdict goes out.
    pub stall_timeout_ns: u64,
    /// How long a closed connection waits for late facts (error report) before it is decided.
    pub grace_ns: u64,
    /// Most connections tracked at once; the oldest are forgotten (and counted) beyond it.
    pub max_connections: usize,
    /// A connection with no event for this long is forgotten (and counted if unresolved).
    pub idle_expiry_ns: u64,
    /// Whether resets are observed (the reset tracepoints attached). Without them, ECONNREFUSED
    /// cannot be told apart from an ICMP port unreachable.
    pub resets_observed: bool,
    /// Whether the kernel traces resets sent without a socket (`tcp_send_reset` from 6.10).
    /// Before that a refused SYN shows only as its `NO_SOCKET` drop, which then is the
    /// server's refusal.
    pub socketless_resets_traced: bool,
    /// `--expect-comm`: the only processes that should accept connections on the traced ports;
    /// empty means any.
    pub expected_comms: Vec<String>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            report_established: false,
            stall_timeout_ns: 3_000_000_000,
            grace_ns: 200_000_000,
            max_connections: 65_536,
            idle_expiry_ns: 3_600_000_000_000,
            resets_observed: true,
            socketless_resets_traced: true,
            expected_comms: Vec::new(),
        }
    }
}

/// What the engine knows about one connection.
#[derive(Debug, Clone)]
pub(crate) struct Conn {
    /// Kernel socket address: the key of `by_sk`.
    pub sk: u64,
    pub side: Side,
    pub netns: u32,
    pub tuple: FourTuple,
    pub started_ns: u64,
    pub last_ns: u64,
    pub proc: Option<Proc>,
    pub state: TcpState,
    /// Set when the connection reached ESTABLISHED.
    pub established_ns: Option<u64>,
    /// Server side: when accept() returned it.
    pub accepted_ns: Option<u64>,
    /// Set when it reached CLOSE, with the state it left.
    pub closed: Option<(u64, TcpState)>,
    pub syn_retransmits: u32,
    pub errno: Option<i32>,
    pub connect_errno: Option<i32>,
    /// State in which a RST was received.
    pub rst_received: Option<TcpState>,
    /// An established (or failure) verdict has been emitted.
    pub reported: bool,
    /// Set when an orderly shutdown (FIN) started.
    pub orderly_close: bool,
    /// An error was reported while the process held the socket (`sk_err` 0, `sk_err_soft` set).
    pub soft_error: bool,
    /// Packets of its handshake the kernel dropped.
    pub drops: Vec<drops::HandshakeDrop>,
    /// When it first received and first sent data.
    pub first_rx_ns: Option<u64>,
    pub first_tx_ns: Option<u64>,
    /// Set once it was reported stalled.
    pub stall: Option<stall::Stall>,
    /// Its handshake completed with a SYN cookie.
    pub syn_cookie: bool,
}

impl Conn {
    /// Records a reported socket error. 0 means an ICMP error came while the process held the
    /// socket: it went to `sk_err_soft`, which SO_ERROR hands out (and clears).
    fn set_error(&mut self, errno: i32) {
        if errno == 0 {
            self.soft_error = true;
        } else {
            self.errno.get_or_insert(errno);
        }
    }
}

/// What identifies a decided connection for late syscall results.
#[derive(Debug, Clone, Copy)]
struct Decided {
    at_ns: u64,
    daddr: std::net::IpAddr,
    dport: u16,
    pid: Option<u32>,
}

/// A `SocketError` that has not found its connection yet (the local port may still be unknown).
#[derive(Debug, Clone)]
struct OrphanError {
    ts_ns: u64,
    errno: i32,
}

pub use self::model::{Listener, ListenerLookup, RuleLookup};

pub struct Engine {
    cfg: EngineConfig,
    /// Look-up of listening sockets, for refusals; none: refusals are not looked into.
    listeners: Option<Box<dyn ListenerLookup>>,
    /// Look-up of the firewall rule behind a netfilter drop; none: rules are not looked for.
    rules: Option<Box<dyn RuleLookup>>,
    next_id: u64,
    /// Ordered by creation: the first entry is the oldest.
    conns: BTreeMap<u64, Conn>,
    by_sk: HashMap<u64, u64>,
    /// Full 4-tuple (local port known) → connection, for facts without a socket address.
    by_tuple: HashMap<FourTuple, u64>,
    /// Connections that reached CLOSE and wait for their verdict (a short list: at most those
    /// of the last grace period), so deciding them never walks the whole table.
    closing: Vec<u64>,
    orphan_errors: HashMap<FourTuple, OrphanError>,
    /// Sockets decided recently: a late `connect()` result for the same socket, destination and
    /// process is not a new failure (the address alone may already belong to a new socket).
    recently_decided: HashMap<u64, Decided>,
    /// SYNs this host refused without a socket just now (netns, tuple, when): the kernel then
    /// frees the SYN with NO_SOCKET, which is the refusal itself, not another drop.
    recent_refusals: HashMap<(u32, FourTuple), u64>,
    /// Drop records written this second, by netns and reason (the second, the count).
    drop_windows: HashMap<(u32, String), (u64, u32)>,
    /// Drops of connection attempts that have no connection here, by netns and tuple.
    attempts: HashMap<(u32, FourTuple), drops::Attempt>,
    /// Drop records not yet taken by the caller.
    drops: Vec<verdict::DropRecord>,
    summary: Summary,
}

/// Errno number → name (`111` → `ECONNREFUSED`).
pub fn errno_name(errno: i32) -> String {
    match nix::errno::Errno::from_raw(errno) {
        nix::errno::Errno::UnknownErrno => format!("errno {errno}"),
        e => format!("{e:?}"),
    }
}

fn ms(from_ns: u64, to_ns: u64) -> f64 {
    (to_ns.saturating_sub(from_ns) / 1_000) as f64 / 1_000.0
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Self {
        Self {
            cfg,
            listeners: None,
            rules: None,
            next_id: 0,
            conns: BTreeMap::new(),
            by_sk: HashMap::default(),
            by_tuple: HashMap::default(),
            closing: Vec::new(),
            orphan_errors: HashMap::default(),
            recently_decided: HashMap::default(),
            attempts: HashMap::default(),
            recent_refusals: HashMap::default(),
            drop_windows: HashMap::default(),
            drops: Vec::new(),
            summary: Summary::default(),
        }
    }

    /// Lets the engine ask which sockets listen on a port when this host refuses a SYN.
    pub fn with_listener_lookup(mut self, lookup: Box<dyn ListenerLookup>) -> Self {
        self.listeners = Some(lookup);
        self
    }

    /// Lets the engine look for the firewall rule behind a netfilter drop.
    pub fn with_rule_lookup(mut self, lookup: Box<dyn RuleLookup>) -> Self {
        self.rules = Some(lookup);
        self
    }

    /// Drop records produced since the last call.
    pub fn take_drops(&mut self) -> Vec<verdict::DropRecord> {
        std::mem::take(&mut self.drops)
    }

    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    pub fn tracked(&self) -> usize {
        self.conns.len()
    }

    /// Completes a verdict with what the injected look-ups know, counts it and hands it out.
    fn emit(&mut self, out: &mut Vec<Verdict>, mut v: Verdict) {
        match v.reason {
            model::Reason::ListenOverflow
            | model::Reason::NotAccepted
            | model::Reason::RefusedNoListener => {
                if let Some(lookup) = self.listeners.as_mut()
                    && v.side == Side::Server
                    && let Some(port) = v.sport
                {
                    let listeners = lookup.listening_on(v.netns, port);
                    decide::bound_elsewhere(&mut v, &listeners);
                    decide::queue_detail(&mut v, &listeners);
                }
            }
            _ => {}
        }
        self.summary.count(&v);
        out.push(v);
    }

    fn insert(&mut self, sk: u64, conn: Conn, out: &mut Vec<Verdict>) -> u64 {
        self.retire(sk, conn.started_ns, out);
        while self.conns.len() >= self.cfg.max_connections {
            let Some((oldest, c)) = self.conns.pop_first() else {
                break;
            };
            self.unindex(oldest, &c);
            self.forget(c);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.conns.insert(id, conn);
        self.by_sk.insert(sk, id);
        id
    }

    /// A new socket starts at `sk`: the kernel freed the old one, so every event it will ever
    /// have is already here. Decide it now if it closed; otherwise its end was not observable
    /// (e.g. FIN_WAIT1 straight to TIME_WAIT) and it is forgotten.
    fn retire(&mut self, sk: u64, now_ns: u64, out: &mut Vec<Verdict>) {
        let Some(&old) = self.by_sk.get(&sk) else {
            return;
        };
        if self.conns.get(&old).is_some_and(|c| c.closed.is_some()) {
            self.finalize(old, now_ns, out);
        } else if let Some(c) = self.conns.remove(&old) {
            self.unindex(old, &c);
            self.forget(c);
        }
    }

    fn unindex(&mut self, id: u64, c: &Conn) {
        if self.by_sk.get(&c.sk) == Some(&id) {
            self.by_sk.remove(&c.sk);
        }
        if self.by_tuple.get(&c.tuple) == Some(&id) {
            self.by_tuple.remove(&c.tuple);
        }
    }

    /// Indexes the connection of `sk` by its tuple once the local port is known.
    fn index_tuple(&mut self, sk: u64) {
        if let Some(&id) = self.by_sk.get(&sk)
            && let Some(c) = self.conns.get(&id)
            && c.tuple.sport != 0
        {
            self.by_tuple.insert(c.tuple, id);
        }
    }

    /// Drops a connection without a terminal event; counts it if it never got a verdict.
    fn forget(&mut self, c: Conn) {
        if !c.reported && c.established_ns.is_none() {
            self.summary.expired_unresolved += 1;
        }
    }

    fn new_conn(
        &self,
        sk: u64,
        side: Side,
        meta: &Meta,
        tuple: FourTuple,
        state: TcpState,
        proc: Option<Proc>,
    ) -> Conn {
        Conn {
            sk,
            side,
            netns: meta.netns,
            tuple,
            started_ns: meta.ts_ns,
            last_ns: meta.ts_ns,
            proc,
            state,
            established_ns: None,
            accepted_ns: None,
            closed: None,
            syn_retransmits: 0,
            errno: None,
            connect_errno: None,
            rst_received: None,
            reported: false,
            orderly_close: false,
            soft_error: false,
            drops: Vec::new(),
            first_rx_ns: None,
            first_tx_ns: None,
            stall: None,
            syn_cookie: false,
        }
    }

    fn conn_mut(&mut self, sk: u64) -> Option<&mut Conn> {
        let id = *self.by_sk.get(&sk)?;
        self.conns.get_mut(&id)
    }

    /// Feeds one kernel event; returns the verdicts it completes.
    pub fn handle(&mut self, ev: KernelEvent) -> Vec<Verdict> {
        self.summary.events += 1;
        let mut out = Vec::new();
        let sk = match &ev {
            KernelEvent::State { sk, .. }
            | KernelEvent::ResetReceived { sk, .. }
            | KernelEvent::SynRetransmit { sk, .. } => Some(*sk),
            _ => None,
        };
        self.dispatch(ev, &mut out);
        if let Some(sk) = sk {
            self.index_tuple(sk);
        }
        out
    }

    fn dispatch(&mut self, ev: KernelEvent, out: &mut Vec<Verdict>) {
        match ev {
            KernelEvent::State {
                meta,
                sk,
                tuple,
                old,
                new,
                sk_err,
            } => self.on_state(meta, sk, tuple, (old, new, sk_err), out),
            KernelEvent::SocketError { meta, tuple, errno } => {
                let found = self
                    .by_tuple
                    .get(&tuple)
                    .and_then(|id| self.conns.get_mut(id))
                    .filter(|c| c.errno.is_none());
                match found {
                    Some(c) => {
                        c.set_error(errno);
                        c.last_ns = meta.ts_ns;
                    }
                    None if self.orphan_errors.len() < self.cfg.max_connections => {
                        self.orphan_errors.insert(
                            tuple,
                            OrphanError {
                                ts_ns: meta.ts_ns,
                                errno,
                            },
                        );
                    }
                    None => self.summary.unmatched_errors += 1,
                }
                self.decide_ready(meta.ts_ns, out);
            }
            KernelEvent::ResetReceived { meta, sk, tuple } => {
                if let Some(c) = self.conn_mut(sk) {
                    c.rst_received.get_or_insert(c.state);
                    c.tuple = tuple;
                    c.last_ns = meta.ts_ns;
                }
            }
            KernelEvent::ResetSent {
                meta,
                sk,
                tuple,
                reason,
                answered_flags,
                ..
            } => {
                if sk != 0 {
                    if let Some(c) = self.conn_mut(sk) {
                        c.last_ns = meta.ts_ns;
                    } else if let Some(a) = self.attempts.get_mut(&(meta.netns, tuple)) {
                        // A listener answering a cookie attempt's ACK with a RST: the cookie
                        // failed validation.
                        a.cookie_rejected = a.cookies > 0;
                    }
                } else if let Some(v) =
                    decide::refused_without_socket(&meta, tuple, reason, answered_flags)
                {
                    if self.recent_refusals.len() < self.cfg.max_connections {
                        self.recent_refusals.insert((meta.netns, tuple), meta.ts_ns);
                    }
                    self.emit(out, v);
                } else {
                    // A late or stray segment (an ACK, FIN or data for a socket already gone).
                    self.summary.stray_resets += 1;
                }
            }
            KernelEvent::SynRetransmit { meta, sk, tuple } => {
                if self.conn_mut(sk).is_none() {
                    let c = self.new_conn(sk, Side::Client, &meta, tuple, TcpState::SynSent, None);
                    self.insert(sk, c, out);
                }
                if let Some(c) = self.conn_mut(sk) {
                    c.syn_retransmits += 1;
                    c.tuple = tuple;
                    c.last_ns = meta.ts_ns;
                }
            }
            KernelEvent::Accepted { meta, sk, .. } => {
                let mut verdict = None;
                // Direct field access: the connection and the settings are borrowed together.
                if let Some(c) = self.by_sk.get(&sk).and_then(|id| self.conns.get_mut(id)) {
                    c.proc = Some(meta.proc.clone());
                    c.accepted_ns = Some(meta.ts_ns);
                    c.last_ns = meta.ts_ns;
                    // The child is queued before its ESTABLISHED event fires, so accept() may be
                    // seen first; the verdict then waits for ESTABLISHED.
                    if c.side == Side::Server && !c.reported && c.established_ns.is_some() {
                        c.reported = true;
                        verdict = decide::on_established(c, meta.ts_ns, &self.cfg);
                    } else if c.side == Side::Server {
                        verdict = Self::stall_accepted(c, meta.ts_ns);
                    }
                }
                if let Some(v) = verdict {
                    self.emit(out, v);
                }
            }
            KernelEvent::Dropped(d) => self.on_drop(d, out),
            KernelEvent::FirstData { meta, sk, outgoing } => {
                self.on_first_data(sk, outgoing, meta.ts_ns, out);
            }
            KernelEvent::CookieSent { meta, tuple } => self.on_cookie(meta, tuple),
            KernelEvent::ListenOverflow {
                meta,
                listener,
                accept_queue,
                backlog,
                overflows,
            } => {
                let v =
                    decide::listen_overflow(&meta, listener, (accept_queue, backlog), overflows);
                self.emit(out, v);
            }
            KernelEvent::ConnectFailed {
                meta,
                sk,
                tuple,
                errno,
            } => {
                if let Some(c) = self.conn_mut(sk) {
                    c.connect_errno = Some(errno);
                    c.last_ns = meta.ts_ns;
                } else if self.recently_decided.get(&sk).is_some_and(|d| {
                    sk != 0
                        && d.daddr == tuple.daddr
                        && d.dport == tuple.dport
                        && d.pid == Some(meta.proc.pid)
                }) {
                    // connect() reporting a failure whose verdict is already out.
                } else if let Some(v) = decide::connect_failed(&meta, tuple, errno, sk != 0) {
                    self.emit(out, v);
                }
            }
        }
    }
}
