//! TCP state transitions: where connections start, become established and close.

use super::{
    Engine, decide,
    model::{FourTuple, Meta, Side, TcpState},
    verdict::Verdict,
};

impl Engine {
    pub(super) fn on_state(
        &mut self,
        meta: Meta,
        sk: u64,
        tuple: FourTuple,
        (old, new, sk_err): (TcpState, TcpState, Option<i32>),
        out: &mut Vec<Verdict>,
    ) {
        let ts = meta.ts_ns;
        let starts = matches!(
            (old, new),
            (_, TcpState::SynSent) | (TcpState::Listen, TcpState::SynRecv)
        );
        if starts {
            self.retire(sk, ts, out);
        }
        let known = self.by_sk.contains_key(&sk);
        match (old, new) {
            (_, TcpState::SynSent) => {
                // connect(): the current task is the connecting process.
                let proc = Some(meta.proc.clone());
                let c = self.new_conn(sk, Side::Client, &meta, tuple, new, proc);
                self.insert(sk, c, out);
                return;
            }
            (TcpState::Listen, TcpState::SynRecv) | (TcpState::SynRecv, TcpState::Established)
                if !known =>
            {
                // A passive child socket; it runs in softirq context, so no process yet.
                let c = self.new_conn(sk, Side::Server, &meta, tuple, TcpState::SynRecv, None);
                self.insert(sk, c, out);
                self.adopt_attempt(sk);
            }
            (TcpState::SynSent, _) if !known => {
                // We missed connect() (started before us, or the event was lost).
                let c = self.new_conn(sk, Side::Client, &meta, tuple, old, None);
                self.insert(sk, c, out);
            }
            _ if !known => return,
            _ => {}
        }
        let Some(c) = self.by_sk.get(&sk).and_then(|id| self.conns.get_mut(id)) else {
            return;
        };
        c.last_ns = ts;
        if tuple.sport != 0 {
            c.tuple = tuple;
        }
        c.state = new;
        let mut verdict = None;
        match new {
            TcpState::Established => {
                c.established_ns = Some(ts);
                match c.side {
                    Side::Client => {
                        self.summary.established.0 += 1;
                        self.summary
                            .connect_latency(ts.saturating_sub(c.started_ns));
                    }
                    Side::Server => self.summary.established.1 += 1,
                }
                // A client knows its process from connect(); a server waits for accept().
                if (c.side == Side::Client || c.accepted_ns.is_some()) && !c.reported {
                    c.reported = true;
                    verdict = decide::on_established(c, ts, &self.cfg);
                }
            }
            TcpState::FinWait1 | TcpState::CloseWait | TcpState::LastAck | TcpState::Closing => {
                c.orderly_close = true;
            }
            TcpState::Close => {
                c.closed = Some((ts, old));
                if let Some(errno) = sk_err {
                    c.errno.get_or_insert(errno);
                }
            }
            _ => {}
        }
        if let Some(v) = verdict {
            self.emit(out, v);
        }
        if new == TcpState::Close {
            // An error report that came before this connection's full tuple was known; one
            // older than the connection itself belongs to an earlier socket.
            let key = self.conn_mut(sk).map(|c| (c.tuple, c.started_ns));
            if let Some((tuple, started)) = key
                && let Some(orphan) = self.orphan_errors.remove(&tuple)
                && orphan.ts_ns >= started
                && let Some(c) = self.conn_mut(sk)
            {
                c.set_error(orphan.errno);
            }
            if let Some(&id) = self.by_sk.get(&sk)
                && !self.closing.contains(&id)
            {
                self.closing.push(id);
            }
            self.decide_ready(ts, out);
        }
    }
}
