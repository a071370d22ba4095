//! Quiet mode's two facts: a connection's history (what the kernel kept until it needed
//! userspace) and a check of a connection past the stall timeout. The history makes the
//! connection what its streamed events would have made it; the check stands in for the
//! first-data and accept() events quiet mode does not trace.

use super::super::{
    Engine,
    facts::{Accepted, ConnHistory, Meta, Progress, TcpState},
    state::{Conn, Report},
    verdict::{Side, Verdict},
};

impl Engine {
    /// A connection's history: a new connection with what the kernel knew, or (a history
    /// written again, or after a check brought the connection here) more facts for a known one.
    pub(super) fn on_history(&mut self, h: ConnHistory, out: &mut Vec<Verdict>) {
        if let Some(c) = self.table.by_sk_mut(h.sk)
            && c.closed().is_none()
        {
            merge(c, &h);
            return;
        }
        let side = if h.server { Side::Server } else { Side::Client };
        let meta = Meta {
            ts_ns: h.started_ns,
            ..h.meta.clone()
        };
        let state = match (h.established_ns, side) {
            (Some(_), _) => TcpState::Established,
            (None, Side::Client) => TcpState::SynSent,
            (None, Side::Server) => TcpState::SynRecv,
        };
        let mut c = Conn::new(h.sk, side, &meta, h.tuple, state);
        if side == Side::Client || h.meta.proc.pid != 0 {
            // SYN_SENT ran in the connect()ing task; a server's close() in its process.
            c.proc = Some(h.meta.proc.clone());
        }
        c.last_ns = h.meta.ts_ns;
        merge(&mut c, &h);
        self.insert(c, out);
        if h.server {
            self.adopt_attempt(h.sk);
        }
    }

    /// A check of a connection past the stall timeout: it is stuck, or data or accept() came
    /// (its `resolved` follow-up, when it was reported stalled).
    pub(super) fn on_progress(
        &mut self,
        meta: &Meta,
        sk: u64,
        p: Progress,
        out: &mut Vec<Verdict>,
    ) {
        let Some(c) = self.table.by_sk_mut(sk) else {
            return;
        };
        c.found_stuck = match c.side {
            Side::Client => !p.received,
            Side::Server => !p.accepted && !c.accepted(),
        };
        let server = c.side == Side::Server;
        let unaccepted = !c.accepted();
        if p.sent {
            self.on_first_data(sk, true, meta.ts_ns, out);
        }
        if p.received {
            self.on_first_data(sk, false, meta.ts_ns, out);
        }
        if server && p.accepted && unaccepted {
            self.on_accepted(meta.ts_ns, sk, None, out);
        }
    }
}

/// Adds the facts of history `h` to connection `c`.
fn merge(c: &mut Conn, h: &ConnHistory) {
    if h.tuple.sport != 0 {
        c.tuple = h.tuple;
    }
    if c.netns.is_none() {
        c.netns = h.meta.netns;
    }
    if c.proc.is_none() && h.meta.proc.pid != 0 {
        c.proc = Some(h.meta.proc.clone());
    }
    if let Some(at) = h.established_ns {
        c.establish(at);
        if c.state == TcpState::SynSent || c.state == TcpState::SynRecv {
            c.state = TcpState::Established;
        }
    }
    if h.orderly {
        c.start_shutdown();
    }
    match h.accepted {
        Some(Accepted::At(at)) => {
            c.accepted_ns.get_or_insert(at);
        }
        Some(Accepted::Seen) => c.accepted_seen = true,
        None => {}
    }
    if c.established_ns().is_some()
        && (c.side == Side::Client || c.accepted())
        && c.report == Report::Pending
    {
        // Quiet mode reports no established verdicts (no --all), only moves the report on.
        c.report = Report::Established;
    }
}
