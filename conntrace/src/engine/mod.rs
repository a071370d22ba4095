//! The reason engine: kernel events in, verdicts out. Pure: no kernel, no clock, no I/O.
//!
//! * `facts`: the input (`KernelEvent`) and the kernel's names (states, flags, errnos, drop
//!   reasons, hooks);
//! * `state`: what is known of each connection and attempt, in the table that owns them;
//! * `rules`: every reason's rule, one file per family, pure functions of that state;
//! * `verdict`: the output (verdicts with typed details, drop records, the summary);
//! * `lookup`: what the engine may ask the host (listeners, firewall rules), behind traits.
//!
//! This file holds the entry points and the life cycle of a connection in the table (created,
//! decided, forgotten); `events.rs` applies each kind of event to the state.
//!
//! Connections are keyed by the kernel's socket address (`sk`), because the first event of a
//! client connection (CLOSE→SYN_SENT) fires before the local port is chosen. Facts that come
//! without a socket address (error reports) are joined by 4-tuple. A closed connection waits a
//! short grace period for facts that the kernel emits around the close in an order that varies
//! between versions; it is decided as soon as the facts are complete.

mod config;
mod events;
pub mod facts;
pub mod lookup;
mod rules;
mod state;
#[cfg(test)]
mod tests;
pub mod verdict;

pub use self::{
    config::EngineConfig,
    lookup::{Listener, ListenerLookup, NamespaceLookup, Route, RuleLookup},
    rules::{drops::NORMAL as NORMAL_DROP_REASONS, listener::is_cookie_check},
    state::rate::RECORDS_PER_SECOND,
};
use self::{
    facts::KernelEvent,
    state::{Conn, ConnId, Decided, Report, Table},
    verdict::{DropRecord, Reason, Side, Summary, Verdict},
};

/// What the engine may ask the host; each absent one leaves its facts out.
#[derive(Default)]
struct Lookups {
    /// Listening sockets, for refusals and queues.
    listeners: Option<Box<dyn ListenerLookup>>,
    /// The firewall rule behind a netfilter drop.
    rules: Option<Box<dyn RuleLookup>>,
    /// A namespace's addresses, routes, interfaces, conntrack table, ports and counters.
    namespaces: Option<Box<dyn NamespaceLookup>>,
}

pub struct Engine {
    cfg: EngineConfig,
    lookups: Lookups,
    table: Table,
    /// Records admitted lately, by window (a namespace and a kind), for the per-second cap.
    windows: state::RateWindows,
    /// Drop records not yet taken by the caller.
    drops: Vec<DropRecord>,
    /// Listener overflows lately, for the `syn_timeout` of their clients on this host.
    overflows: state::Overflows,
    summary: Summary,
    /// When userspace last found that the ring buffer had lost events (monotonic ns).
    lost_at_ns: Option<u64>,
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Self {
        Self {
            table: Table::new(cfg.max_connections, cfg.max_attempts, cfg.max_kept_drops),
            cfg,
            lookups: Lookups::default(),
            windows: state::RateWindows::default(),
            drops: Vec::new(),
            overflows: state::Overflows::default(),
            summary: Summary::default(),
            lost_at_ns: None,
        }
    }

    /// The ring buffer lost events before `now_ns` (its loss counter grew since the last
    /// look, before the events now read): a connection that lived then may lack some of its
    /// own, and its verdict does not infer from their absence. The latest such time counts:
    /// the marks come from several CPUs' events and from the counter, not in time order.
    pub fn events_lost(&mut self, now_ns: u64) {
        self.lost_at_ns = Some(self.lost_at_ns.map_or(now_ns, |at| at.max(now_ns)));
    }

    /// Lets the engine ask which sockets listen on a port when this host refuses a SYN.
    pub fn with_listener_lookup(mut self, lookup: Box<dyn ListenerLookup>) -> Self {
        self.lookups.listeners = Some(lookup);
        self
    }

    /// Lets the engine look for the firewall rule behind a netfilter drop.
    pub fn with_rule_lookup(mut self, lookup: Box<dyn RuleLookup>) -> Self {
        self.lookups.rules = Some(lookup);
        self
    }

    /// Lets the engine ask about namespaces: addresses, routes, conntrack, ports, counters.
    pub fn with_namespace_lookup(mut self, lookup: Box<dyn NamespaceLookup>) -> Self {
        self.lookups.namespaces = Some(lookup);
        self
    }

    /// Drop records produced since the last call.
    pub fn take_drops(&mut self) -> Vec<DropRecord> {
        std::mem::take(&mut self.drops)
    }

    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// The run's counts, for what is counted outside the engine (the kernel's, in quiet mode).
    pub fn summary_mut(&mut self) -> &mut Summary {
        &mut self.summary
    }

    /// From now on, keeps a log of the handshake attempts it follows without a connection (a
    /// SYN or final ACK dropped before any socket had it): quiet mode asks the kernel to
    /// stream a listener's child with such a tuple, so that the handshake's completion
    /// reaches the attempt.
    pub fn log_attempts(&mut self) {
        self.table.log_attempts();
    }

    /// The attempts opened (`true`) and closed (`false`) since the last call, as (namespace,
    /// tuple with this host's end first), in order; empty unless [`Engine::log_attempts`].
    pub fn take_attempt_log(&mut self) -> Vec<(Option<u32>, facts::FourTuple, bool)> {
        self.table
            .take_attempt_log()
            .into_iter()
            .map(|((netns, tuple), open)| (netns, tuple, open))
            .collect()
    }

    /// Whether a connection with `tuple` (local end first) in namespace `netns` is tracked.
    pub fn knows(&self, netns: Option<u32>, tuple: &facts::FourTuple) -> bool {
        self.table
            .id_by_tuple(tuple)
            .and_then(|id| self.table.get(id))
            .is_some_and(|c| c.netns == netns || netns.is_none())
    }

    /// Connections tracked now.
    pub fn tracked(&self) -> usize {
        self.table.len()
    }

    /// Feeds one kernel event; returns the verdicts it completes.
    pub fn handle(&mut self, ev: KernelEvent) -> Vec<Verdict> {
        self.summary.events += 1;
        let mut out = Vec::new();
        let sk = ev.sk();
        self.apply(ev, &mut out);
        if let Some(sk) = sk {
            self.table.index_tuple(sk);
        }
        out
    }

    /// Advances time: decides what waited long enough, expires what never resolved.
    pub fn tick(&mut self, now_ns: u64) -> Vec<Verdict> {
        let mut out = Vec::new();
        self.decide_ready(now_ns, &mut out);
        self.decide_attempts(now_ns, false, &mut out);
        self.decide_route_walks(now_ns, false, &mut out);
        self.detect_stalls(now_ns, &mut out);
        let idle = self.cfg.idle_expiry_ns;
        for id in self.table.ids_where(|c| now_ns >= c.last_ns + idle) {
            if let Some(c) = self.table.remove(id) {
                self.forget(&c);
            }
        }
        let keep = 10 * self.cfg.grace_ns.max(100_000_000);
        self.summary.unmatched_errors += self.table.forget_older_than(now_ns, keep);
        self.windows.prune(now_ns);
        out
    }

    /// Ends the run: decides every closed connection now; open ones stay unresolved.
    pub fn finish(&mut self, now_ns: u64) -> Vec<Verdict> {
        let mut out = self.tick(now_ns);
        let far = now_ns.saturating_add(self.cfg.grace_ns);
        self.decide_ready(far, &mut out);
        self.decide_attempts(now_ns, true, &mut out);
        self.decide_route_walks(now_ns, true, &mut out);
        for c in self.table.drain() {
            if self.cfg.report_established
                && c.side == Side::Server
                && c.report == Report::Pending
                && c.established_ns().is_some()
            {
                // Established but not yet reported when the run ends: report what is known.
                let v = rules::established::established(&c, now_ns);
                self.emit(&mut out, v);
            }
            self.forget(&c);
        }
        // Error reports still waiting for their connection at the end never found it.
        self.summary.unmatched_errors += self.table.forget_older_than(u64::MAX, 0);
        out
    }

    /// Completes a verdict with what the injected look-ups know, counts it and hands it out.
    fn emit(&mut self, out: &mut Vec<Verdict>, mut v: Verdict) {
        if rules::listener::wants_listeners(&v)
            && let Some(lookup) = self.lookups.listeners.as_mut()
            && let Some(port) = v.sport
        {
            let holder = v.sk.and_then(|sk| lookup.holder(v.netns, port, sk));
            let listeners = lookup.listening_on(v.netns, port);
            rules::listener::with_listeners(&mut v, &listeners, holder.as_ref());
        }
        if v.pid.is_none()
            && v.sk.is_some()
            && let (Some(lookup), Some(tuple)) = (self.lookups.listeners.as_mut(), v.tuple())
        {
            // No accept() or connect() seen (quiet mode without an accept hook, a connection
            // opened before conntrace started): the process holding the socket now, else, for
            // a connection open before conntrace started, the one that held it then.
            let owner = lookup.owner(v.netns, tuple).or_else(|| {
                v.detail
                    .started_before_trace()
                    .then(|| lookup.owner_at_start(v.netns, tuple))
                    .flatten()
            });
            if let Some(p) = owner {
                rules::established::held_by(&mut v, p);
            }
        }
        if let Some(ns) = self.lookups.namespaces.as_mut() {
            rules::connect::complete(&mut v, ns.as_mut());
            rules::drops::complete(&mut v, ns.as_mut());
        }
        if matches!(
            v.reason,
            Reason::StalledNoGreeting | Reason::StalledNoResponse | Reason::SynTimeout
        ) && let Some(tuple) = v.tuple()
            && let Some((netns, drops)) = self.table.peer_handshake_drops(v.netns, tuple)
        {
            rules::drops::describe_peer(&mut v, netns, &drops);
        }
        if v.reason == Reason::RefusedNoListener
            && let Some(tuple) = v.tuple()
            && let Some((netns, drops)) = self.table.peer_handshake_drops(v.netns, tuple)
        {
            rules::drops::refused_by_peer_rule(&mut v, netns, &drops);
        }
        if let Some(tuple) = v.tuple()
            && let Some(facts) = v.detail.drop_facts_mut()
        {
            facts.path_drops = self.table.path_drops(tuple);
        }
        rules::drops::refused_on_path(&mut v);
        let namespaces = &mut self.lookups.namespaces;
        rules::listener::describe_peer_queue(&mut v, &self.overflows, |netns, addr| {
            namespaces.as_mut()?.is_local(Some(netns), addr)
        });
        if let Some(ns) = self.lookups.namespaces.as_mut() {
            rules::listener::with_somaxconn(&mut v, |netns| ns.somaxconn(netns));
        }
        self.summary.count(&v);
        out.push(v);
    }

    /// Adds a connection, deciding or forgetting what held its socket address before.
    fn insert(&mut self, conn: Conn, out: &mut Vec<Verdict>) -> ConnId {
        self.retire(conn.sk, conn.started_ns, out);
        let (id, evicted) = self.table.insert(conn);
        for c in evicted {
            self.forget(&c);
        }
        id
    }

    /// A new socket starts at `sk`: the kernel freed the old one, so every event it will ever
    /// have is already here. Decide it now if it closed; otherwise its end was not observable
    /// (e.g. FIN_WAIT1 straight to TIME_WAIT) and it is forgotten.
    fn retire(&mut self, sk: u64, now_ns: u64, out: &mut Vec<Verdict>) {
        let Some(old) = self.table.id_of(sk) else {
            return;
        };
        if self.table.get(old).is_some_and(|c| c.closed().is_some()) {
            self.finalize(old, now_ns, out);
        } else if let Some(c) = self.table.remove(old) {
            self.forget(&c);
        }
    }

    /// A connection leaves the table without a terminal event: counted if it never got a
    /// verdict.
    fn forget(&mut self, c: &Conn) {
        if c.report == Report::Pending && c.established_ns().is_none() {
            self.summary.expired_unresolved += 1;
        }
    }

    /// Decides closed connections whose facts are complete, or whose grace period ran out. A
    /// handshake that failed in silence waits out the grace period even with its errno: the
    /// drop that explains it (a failed neighbour, say) can come microseconds after the close.
    fn decide_ready(&mut self, now_ns: u64, out: &mut Vec<Verdict>) {
        let grace = self.cfg.grace_ns;
        let ready = self.table.closing_where(|c| match c.closed() {
            Some((at, _)) => {
                let complete = c.errno().is_some_and(|e| {
                    c.established_ns().is_some() || !rules::drops::silent_errno(e)
                }) && !rules::handshake::refused_without_reset(c);
                complete || now_ns >= at + grace
            }
            None => true,
        });
        for id in ready {
            self.finalize(id, now_ns, out);
        }
    }

    /// Removes a closed connection and emits its verdict, if it has one.
    fn finalize(&mut self, id: ConnId, now_ns: u64, out: &mut Vec<Verdict>) {
        let Some(mut c) = self.table.remove(id) else {
            return;
        };
        c.events_lost = self
            .lost_at_ns
            .is_some_and(|at| c.start_missed || at >= c.started_ns);
        let decided = Decided {
            at_ns: now_ns,
            daddr: c.tuple.daddr,
            dport: c.tuple.dport,
            pid: c.proc.as_ref().map(|p| p.pid),
        };
        self.table.remember_decided(c.sk, decided);
        if let Some(errno) = c.errno() {
            self.table.remember_decided_error(c.tuple, now_ns, errno);
        }
        let route_now = self.route_now(&c);
        let peer = self
            .table
            .peer_drops(&c)
            .map(|(netns, drops)| rules::PeerDrops { netns, drops });
        let path_drops = self.table.path_drops(c.tuple);
        let ended = rules::closed(&c, peer, (route_now.as_ref(), &path_drops), &self.cfg);
        if let Some(stall) = c.open_stall() {
            if let Some(v) = rules::stalls::closed_while_stuck(&c, stall, ended) {
                self.emit(out, v);
            }
        } else if let Some(v) = ended {
            self.emit(out, v);
        } else if c.side == Side::Server
            && c.report == Report::Pending
            && c.established_ns().is_some()
            && self.cfg.report_established
        {
            // Closed before anyone saw accept() return it.
            let at = c.closed().map_or(now_ns, |(t, _)| t);
            let mut v = rules::established::established(&c, at);
            if let verdict::Detail::Established(d) = &mut v.detail {
                d.accepted = Some(false);
            }
            self.emit(out, v);
        }
    }

    /// The namespace's route to `c`'s other end, read only for a connection that may have
    /// lost its route while idle (`rules::connect::may_have_lost_route_idle`).
    fn route_now(&mut self, c: &Conn) -> Option<Route> {
        if !rules::connect::may_have_lost_route_idle(c) {
            return None;
        }
        self.lookups
            .namespaces
            .as_mut()?
            .route_to(c.netns, c.tuple.daddr)
    }

    /// Emits `stalled` verdicts for connections stuck past the stall timeout.
    fn detect_stalls(&mut self, now_ns: u64, out: &mut Vec<Verdict>) {
        let timeout = self.cfg.stall_timeout_ns;
        if timeout == 0 {
            // `--stall-timeout 0`: stall verdicts are off.
            return;
        }
        let mut verdicts = Vec::new();
        let known = (self.cfg.quiet, self.cfg.quiet || self.cfg.first_data_traced);
        for c in self.table.conns_mut() {
            if let Some(stall) = rules::stalls::stuck(c, now_ns, timeout, known) {
                // The stall stands in for the established verdict.
                c.report = Report::Stalled(stall);
                verdicts.push(rules::stalls::stalled(c, stall, now_ns));
            }
        }
        for v in verdicts {
            self.emit(out, v);
        }
    }

    /// Verdicts of attempts that ended (all of them when `all`).
    fn decide_attempts(&mut self, now_ns: u64, all: bool, out: &mut Vec<Verdict>) {
        for key in self.table.attempts_where(|a| all || a.ended(now_ns)) {
            let Some(a) = self.table.take_attempt(&key) else {
                continue;
            };
            if a.cookies.is_some() {
                self.summary.listener(&a.tuple).cookies_failed += 1;
            }
            // A SYN flood (spoofed sources) ends in one failed attempt per SYN: at most
            // RECORDS_PER_SECOND verdicts per local port in any second of their decisions, the
            // rest counted (and in the listener's `cookies_failed` for cookies). Attempts whose
            // peer answered have their own budget: a flood's verdicts must not hide a real
            // client's. (By the second of an attempt's last packet instead, the window was gone
            // when its attempts were decided, seconds later, and nothing was capped.)
            let kind = if a.answered() {
                "answered"
            } else {
                "unanswered"
            };
            let window = (key.0, format!("attempts {} {kind}", a.tuple.sport));
            if !self.within_rate(window, now_ns) {
                self.summary.attempt_verdicts_suppressed += 1;
                continue;
            }
            self.table.remember_decided_attempt(key, &a);
            let v = rules::drops::attempt_verdict(&a);
            self.emit(out, v);
        }
    }

    /// Counts one record against its window (a namespace and a kind); false when the window
    /// admitted [`RECORDS_PER_SECOND`] in the second up to `ts_ns`.
    fn within_rate(&mut self, key: (Option<u32>, String), ts_ns: u64) -> bool {
        self.windows.admit(key, ts_ns)
    }
}
