//! Each kind of kernel event applied to the engine's facts: where connections start, become
//! established and close; errors, resets and retransmits; accept(); first data; drops and
//! cookies. Decisions are left to `rules`; this file only records and routes.

mod drops;
mod quiet;
mod route;

use super::{
    Engine,
    facts::{Errno, FourTuple, KernelEvent, Meta, Proc, RouteAtClose, TcpFlags, TcpState, Window},
    rules,
    state::{Conn, OrphanError, Report},
    verdict::{Side, Verdict},
};

/// A socket's errors at its close.
struct SocketErrors {
    /// `sk_err`, else `sk_err_soft`.
    error: Option<Errno>,
    /// `sk_err_soft`.
    soft: Option<Errno>,
    /// The socket's route (read at CLOSE).
    route: RouteAtClose,
}

impl Engine {
    /// Applies one event to the state, pushing the verdicts it completes.
    pub(super) fn apply(&mut self, ev: KernelEvent, out: &mut Vec<Verdict>) {
        match ev {
            KernelEvent::State {
                meta,
                sk,
                tuple,
                old,
                new,
                sk_err,
                sk_err_soft,
                closing,
                route,
            } => {
                if let Some(closing) = closing {
                    self.on_closing(&meta, sk, closing, out);
                }
                let errors = SocketErrors {
                    error: sk_err,
                    soft: sk_err_soft,
                    route,
                };
                self.on_state(meta, sk, tuple, (old, new, errors), out);
            }
            KernelEvent::SocketError { meta, tuple, errno } => {
                self.on_socket_error(&meta, tuple, errno);
                self.decide_ready(meta.ts_ns, out);
            }
            KernelEvent::ResetReceived { meta, sk, tuple } => {
                if let Some(c) = self.table.by_sk_mut(sk) {
                    c.rst_received.get_or_insert(c.state);
                    c.tuple = tuple;
                    c.last_ns = meta.ts_ns;
                } else {
                    self.table.remember_unowned_reset(sk, meta.ts_ns);
                }
            }
            KernelEvent::ResetSent {
                meta,
                sk,
                tuple,
                reason,
                answered_flags,
            } => self.on_reset_sent(meta, sk, tuple, reason, answered_flags, out),
            KernelEvent::SynRetransmit { meta, sk, tuple } => {
                if self.table.by_sk(sk).is_none() {
                    let c = Conn::new(sk, Side::Client, &meta, tuple, TcpState::SynSent);
                    self.insert(c, out);
                }
                if let Some(c) = self.table.by_sk_mut(sk) {
                    c.syn_retransmits += 1;
                    c.tuple = tuple;
                    c.last_ns = meta.ts_ns;
                }
            }
            KernelEvent::Retransmit {
                meta,
                sk,
                tuple,
                bytes,
                mss,
                sacked_out,
            } => {
                if self.table.by_sk(sk).is_none() {
                    // Data retransmitted by a connection opened before conntrace started: how
                    // it ends may need them (`timeout`, `pmtu_blackhole`).
                    self.adopt_mid_life(&meta, sk, tuple, TcpState::Established, out);
                }
                if let Some(c) = self.table.by_sk_mut(sk) {
                    c.retransmitted(bytes, mss, sacked_out);
                    c.tuple = tuple;
                    c.last_ns = meta.ts_ns;
                }
            }
            KernelEvent::Window {
                meta,
                tuple,
                window,
            } => self.on_window(&meta, tuple, window, out),
            KernelEvent::Accepted { meta, sk } => {
                self.on_accepted(meta.ts_ns, sk, Some(meta.proc), out);
            }
            KernelEvent::History(h) => self.on_history(h, out),
            KernelEvent::Progress { meta, sk, progress } => {
                self.on_progress(&meta, sk, progress, out);
            }
            KernelEvent::Dropped(d) => self.on_drop(d, out),
            KernelEvent::FirstData { meta, sk, outgoing } => {
                self.on_first_data(sk, outgoing, meta.ts_ns, out);
            }
            KernelEvent::CookieSent { meta, tuple } => self.on_cookie(&meta, tuple),
            KernelEvent::ListenOverflow {
                meta,
                listener,
                accept_queue,
                backlog,
                overflows,
            } => {
                let queue = (accept_queue, backlog);
                self.overflows
                    .record(meta.ts_ns, meta.netns, listener, queue, overflows);
                let v = rules::listener::overflow(&meta, listener, queue, overflows);
                self.emit(out, v);
            }
            KernelEvent::ConnectFailed {
                meta,
                sk,
                tuple,
                errno,
                cgroup_refusal,
            } => self.on_connect_failed(&meta, sk, tuple, (errno, cgroup_refusal), out),
            KernelEvent::RouteLookupFailed {
                meta,
                tuple,
                table,
                answer,
            } => self.on_route_lookup_failed(meta, tuple, table, answer),
        }
    }

    fn on_state(
        &mut self,
        meta: Meta,
        sk: u64,
        tuple: FourTuple,
        (old, new, errors): (TcpState, TcpState, SocketErrors),
        out: &mut Vec<Verdict>,
    ) {
        let ts = meta.ts_ns;
        if matches!(
            (old, new),
            (_, TcpState::SynSent) | (TcpState::Listen, TcpState::SynRecv)
        ) {
            self.retire(sk, ts, out);
        }
        let known = self.table.id_of(sk).is_some();
        match (old, new) {
            (_, TcpState::SynSent) => {
                // connect(): the current task is the connecting process.
                self.settle_route_walk(&meta, &tuple);
                let mut c = Conn::new(sk, Side::Client, &meta, tuple, new);
                c.proc = Some(meta.proc.clone());
                self.insert(c, out);
                return;
            }
            (TcpState::Listen, TcpState::SynRecv) | (TcpState::SynRecv, TcpState::Established)
                if !known =>
            {
                // A passive child socket; it runs in softirq context, so no process yet.
                let c = Conn::new(sk, Side::Server, &meta, tuple, TcpState::SynRecv);
                self.insert(c, out);
                self.adopt_attempt(sk);
            }
            (TcpState::SynSent, _) if !known => {
                // We missed connect() (started before us, or the event was lost).
                let mut c = Conn::new(sk, Side::Client, &meta, tuple, old);
                c.start_missed = true;
                self.insert(c, out);
            }
            (
                TcpState::Established
                | TcpState::FinWait1
                | TcpState::FinWait2
                | TcpState::CloseWait
                | TcpState::LastAck
                | TcpState::Closing
                | TcpState::TimeWait,
                _,
            ) if !known => {
                // Opened before conntrace started (or its first events were lost): followed
                // from here, so that how it ends is reported.
                self.adopt_mid_life(&meta, sk, tuple, old, out);
            }
            _ if !known => return,
            _ => {}
        }
        let Some(id) = self.table.id_of(sk) else {
            return;
        };
        let Some(c) = self.table.get_mut(id) else {
            return;
        };
        c.last_ns = ts;
        if tuple.sport != 0 {
            c.tuple = tuple;
        }
        c.state = new;
        let mut verdict = None;
        match new {
            TcpState::Established if self.cfg.quiet => {
                // The kernel counts handshakes in quiet mode; the event only moves the phase.
                c.establish(ts);
                if (c.side == Side::Client || c.accepted()) && c.report == Report::Pending {
                    c.report = Report::Established;
                    verdict = rules::established::on_established(c, ts, &self.cfg);
                }
            }
            TcpState::Established => {
                c.establish(ts);
                match c.side {
                    Side::Client => {
                        self.summary.established.0 += 1;
                        self.summary
                            .connect_latency(ts.saturating_sub(c.started_ns));
                    }
                    Side::Server => self.summary.established.1 += 1,
                }
                // A client knows its process from connect(); a server waits for accept().
                if (c.side == Side::Client || c.accepted_ns.is_some())
                    && c.report == Report::Pending
                {
                    c.report = Report::Established;
                    verdict = rules::established::on_established(c, ts, &self.cfg);
                }
            }
            TcpState::FinWait1 | TcpState::CloseWait | TcpState::LastAck | TcpState::Closing => {
                c.start_shutdown();
            }
            TcpState::Close => {
                c.close(ts, old);
                if let Some(errno) = errors.error {
                    c.set_error(Some(errno));
                }
                c.soft_errno = errors.soft;
                c.route_at_close = errors.route;
            }
            _ => {}
        }
        if let Some(v) = verdict {
            self.emit(out, v);
        }
        if (old, new) == (TcpState::SynRecv, TcpState::Established) {
            // On older kernels (Debian's 6.1 and 6.12) a child's SYN_RECV event carries its
            // listener's wildcard peer (`inet_csk_clone_lock` changes the state before it
            // copies the peer in): its attempt (a cookie, drops of its SYN) is taken over now
            // that the tuple is whole.
            self.adopt_attempt(sk);
        }
        if new == TcpState::Close {
            self.join_orphan_error(id);
            self.table.mark_closing(id);
            self.decide_ready(ts, out);
        }
    }

    /// Follows socket `sk`, first seen in `state` (established or closing), from here, found by
    /// its tuple at once (whatever event adopted it); a RST it received just before is its own.
    fn adopt_mid_life(
        &mut self,
        meta: &Meta,
        sk: u64,
        tuple: FourTuple,
        state: TcpState,
        out: &mut Vec<Verdict>,
    ) {
        let side = self.side_of_unseen_start(&tuple);
        let mut c = Conn::mid_life(sk, side, meta, tuple, state);
        if self
            .table
            .take_unowned_reset(sk)
            .is_some_and(|at| meta.ts_ns.saturating_sub(at) <= self.cfg.grace_ns)
        {
            c.rst_received = Some(state);
        }
        self.insert(c, out);
        self.table.index_tuple(sk);
    }

    /// The side of a connection whose start was not seen, by `tuple` (s = this host): the end
    /// whose own port is traced and whose peer's is not is the server; where both or neither
    /// are, the end on the lower port (a service's, not an ephemeral one).
    fn side_of_unseen_start(&self, tuple: &FourTuple) -> Side {
        let ports = &self.cfg.ports;
        let traced = |p: u16| ports.is_empty() || ports.contains(&p);
        match (traced(tuple.sport), traced(tuple.dport)) {
            (true, false) => Side::Server,
            (false, true) => Side::Client,
            _ if tuple.sport < tuple.dport => Side::Server,
            _ => Side::Client,
        }
    }

    /// An error report that came before this connection's full tuple was known; one older
    /// than the connection itself belongs to an earlier socket.
    fn join_orphan_error(&mut self, id: super::state::ConnId) {
        let Some((tuple, started)) = self
            .table
            .get(id)
            .map(|c| (c.tuple, c.started_bound(self.cfg.grace_ns)))
        else {
            return;
        };
        if let Some(orphan) = self.table.take_orphan_error(&tuple)
            && orphan.ts_ns >= started
            && let Some(c) = self.table.get_mut(id)
        {
            c.set_error(orphan.errno);
        }
    }

    fn on_socket_error(&mut self, meta: &Meta, tuple: FourTuple, errno: Option<Errno>) {
        if tuple.dport == 0 {
            // tcp_disconnect() clears the peer's port, then reports ECONNRESET on the socket
            // this host aborted itself (a close with SO_LINGER 0, connect(AF_UNSPEC), a closed
            // listener's unaccepted children). Its state change already told the abort; the
            // error is no connection's failure.
            return;
        }
        let found = self
            .table
            .id_by_tuple(&tuple)
            .and_then(|id| self.table.get_mut(id))
            // One with this errno already (from its close) is the same report again.
            .filter(|c| c.errno().is_none() || c.errno() == errno);
        match found {
            Some(c) => {
                c.set_error(errno);
                c.last_ns = meta.ts_ns;
            }
            None => {
                if self.table.decided_with_error(&tuple, errno) {
                    // The report of an error its connection's verdict already gave.
                    return;
                }
                let orphan = OrphanError {
                    ts_ns: meta.ts_ns,
                    errno,
                };
                if !self.table.keep_orphan_error(tuple, orphan) {
                    self.summary.unmatched_errors += 1;
                }
            }
        }
    }

    fn on_reset_sent(
        &mut self,
        meta: Meta,
        sk: u64,
        tuple: FourTuple,
        reason: Option<String>,
        answered_flags: Option<TcpFlags>,
        out: &mut Vec<Verdict>,
    ) {
        if sk != 0 {
            if let Some(c) = self.table.by_sk_mut(sk) {
                c.last_ns = meta.ts_ns;
            } else if let Some(a) = self.table.attempt_mut(&(meta.netns, tuple))
                && let Some(cookies) = a.cookies.as_mut()
            {
                // A listener answering a cookie attempt's ACK with a RST: the cookie failed
                // validation.
                cookies.rejected = true;
            }
        } else if let Some(v) =
            rules::handshake::refused_without_socket(&meta, tuple, reason, answered_flags)
        {
            self.table.remember_refusal((meta.netns, tuple), meta.ts_ns);
            self.emit_refusal(out, v);
        } else {
            // A late or stray segment (an ACK, FIN or data for a socket already gone).
            self.summary.stray_resets += 1;
        }
    }

    /// A refusal without a socket (a RST to a SYN nobody listens for), within the cap: a SYN
    /// flood from spoofed sources at a closed port would be one line per SYN. At most
    /// [`RECORDS_PER_SECOND`](crate::engine::RECORDS_PER_SECOND) per local port in any
    /// second; the rest counted (`attempt_verdicts_suppressed`).
    pub(in crate::engine) fn emit_refusal(&mut self, out: &mut Vec<Verdict>, v: Verdict) {
        // A server's verdict: `s` is this host's end, the refusing port.
        let port = v.sport.unwrap_or(0);
        if !self.within_rate((v.netns, format!("refusals {port}")), v.ts_ns) {
            self.summary.attempt_verdicts_suppressed += 1;
            return;
        }
        self.emit(out, v);
    }

    /// accept() returned `sk` at `ts_ns` to `proc` (none: a check found it accepted).
    fn on_accepted(&mut self, ts_ns: u64, sk: u64, proc: Option<Proc>, out: &mut Vec<Verdict>) {
        let mut verdict = None;
        if let Some(c) = self.table.by_sk_mut(sk) {
            if proc.is_some() {
                c.proc = proc;
            }
            c.accepted_ns = Some(ts_ns);
            c.last_ns = ts_ns;
            // The child is queued before its ESTABLISHED event fires, so accept() may be seen
            // first; the verdict then waits for ESTABLISHED.
            if c.side == Side::Server && c.report == Report::Pending && c.established_ns().is_some()
            {
                c.report = Report::Established;
                verdict = rules::established::on_established(c, ts_ns, &self.cfg);
            } else if c.side == Side::Server
                && let Some(stall) = c.open_stall()
                && stall.reason == super::verdict::Reason::NotAccepted
            {
                c.report = Report::Settled(stall);
                verdict = Some(rules::stalls::resolved(c, stall, ts_ns));
            }
        }
        if let Some(v) = verdict {
            self.emit(out, v);
        }
    }

    /// The first data in one direction: a stalled client that receives gets going.
    fn on_first_data(&mut self, sk: u64, outgoing: bool, ts_ns: u64, out: &mut Vec<Verdict>) {
        let Some(c) = self.table.by_sk_mut(sk) else {
            return;
        };
        c.last_ns = ts_ns;
        if outgoing {
            c.first_tx_ns.get_or_insert(ts_ns);
            return;
        }
        c.first_rx_ns.get_or_insert(ts_ns);
        let v = match c.open_stall() {
            Some(s) if s.reason != super::verdict::Reason::NotAccepted => {
                c.report = Report::Settled(s);
                Some(rules::stalls::resolved(c, s, ts_ns))
            }
            _ => None,
        };
        if let Some(v) = v {
            self.emit(out, v);
        }
    }

    /// A connection's window closed or opened again: a stall reported for it resolves when
    /// it opens.
    fn on_window(&mut self, meta: &Meta, tuple: FourTuple, window: Window, out: &mut Vec<Verdict>) {
        let Some(c) = self
            .table
            .id_by_tuple(&tuple)
            .and_then(|id| self.table.get_mut(id))
            .filter(|c| c.netns == meta.netns || meta.netns.is_none())
        else {
            return;
        };
        // A poll that finds the socket gone reports it open. After an orderly close the
        // reader had read (a FIN comes after the data): the stall resolved, by the close at
        // the latest. After any other close the window opened because the socket went: the
        // close (decided after a grace period) is the stall's follow-up.
        let at = match c.closed() {
            None => meta.ts_ns,
            Some((closed_at, _)) if c.orderly() && window == Window::Open => {
                meta.ts_ns.min(closed_at)
            }
            Some(_) => return,
        };
        c.last_ns = meta.ts_ns;
        let v = match window {
            Window::Open => {
                c.window = None;
                match c.open_stall() {
                    Some(s) if s.reason == super::verdict::Reason::ZeroWindow => {
                        c.report = Report::Settled(s);
                        Some(rules::stalls::resolved(c, s, at))
                    }
                    _ => None,
                }
            }
            closed => {
                let since = c.window.map_or(meta.ts_ns, |(_, since)| since);
                c.window = Some((closed, since));
                None
            }
        };
        if let Some(v) = v {
            self.emit(out, v);
        }
    }

    fn on_connect_failed(
        &mut self,
        meta: &Meta,
        sk: u64,
        tuple: FourTuple,
        (errno, cgroup_refusal): (Errno, bool),
        out: &mut Vec<Verdict>,
    ) {
        self.settle_route_walk(meta, &tuple);
        // The socket's address may still name an earlier connection whose end was not seen
        // (the middle of an orderly close is not traced): only a handshake towards the same
        // destination is this connect()'s.
        let this_connect = |c: &&mut super::state::Conn| {
            c.side == Side::Client
                && c.established_ns().is_none()
                && (c.tuple.daddr, c.tuple.dport) == (tuple.daddr, tuple.dport)
        };
        if let Some(c) = self.table.by_sk_mut(sk).filter(this_connect) {
            c.connect_errno = Some(errno);
            c.last_ns = meta.ts_ns;
        } else if self.table.recently_decided(sk).is_some_and(|d| {
            sk != 0
                && d.daddr == tuple.daddr
                && d.dport == tuple.dport
                && d.pid == Some(meta.proc.pid)
        }) {
            // connect() reporting a failure whose verdict is already out.
        } else if let Some(v) =
            rules::connect::failed(meta, tuple, errno, (sk != 0, cgroup_refusal))
        {
            self.emit(out, v);
        }
    }
}
