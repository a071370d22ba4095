//! Time: closed connections decided once their facts are complete or their grace period ran
//! out, server connections reported when accept() is late, idle ones forgotten, the run ended.

use serde_json::json;

use super::{Conn, Decided, Engine, decide, model::Side, verdict::Verdict};

impl Engine {
    /// Decides closed connections whose facts are complete, or whose grace period ran out.
    pub(super) fn decide_ready(&mut self, now_ns: u64, out: &mut Vec<Verdict>) {
        let grace = self.cfg.grace_ns;
        let conns = &self.conns;
        let ready: Vec<u64> = self
            .closing
            .iter()
            .copied()
            .filter(|id| {
                conns.get(id).is_none_or(|c| match c.closed {
                    Some((at, _)) => decide::facts_complete(c) || now_ns >= at + grace,
                    None => true,
                })
            })
            .collect();
        for id in ready {
            self.finalize(id, now_ns, out);
        }
    }

    /// Removes a closed connection and emits its verdict, if it has one.
    pub(super) fn finalize(&mut self, id: u64, now_ns: u64, out: &mut Vec<Verdict>) {
        self.closing.retain(|&c| c != id);
        let Some(c) = self.conns.remove(&id) else {
            return;
        };
        self.unindex(id, &c);
        let pid = c.proc.as_ref().map(|p| p.pid);
        self.recently_decided.insert(
            c.sk,
            Decided {
                at_ns: now_ns,
                daddr: c.tuple.daddr,
                dport: c.tuple.dport,
                pid,
            },
        );
        let ended = decide::closed(&c, &self.cfg);
        if c.stall.is_some_and(|s| !s.settled) {
            if let Some(v) = super::stall::closed_while_stuck(&c, ended) {
                self.emit(out, v);
            }
        } else if let Some(v) = ended {
            self.emit(out, v);
        } else if c.side == Side::Server
            && !c.reported
            && c.established_ns.is_some()
            && self.cfg.report_established
        {
            // Closed before anyone saw accept() return it.
            let mut v = decide::established(&c, c.closed.map_or(now_ns, |(t, _)| t));
            v.detail.insert("accepted".into(), json!(false));
            self.emit(out, v);
        }
    }

    /// Advances time: decides what waited long enough, expires what never resolved.
    pub fn tick(&mut self, now_ns: u64) -> Vec<Verdict> {
        let mut out = Vec::new();
        self.decide_ready(now_ns, &mut out);
        self.decide_attempts(now_ns, false, &mut out);
        self.detect_stalls(now_ns, &mut out);
        let idle = self.cfg.idle_expiry_ns;
        let stale: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| now_ns >= c.last_ns + idle)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some(c) = self.conns.remove(&id) {
                self.unindex(id, &c);
                self.forget(c);
            }
        }
        let keep = 10 * grace_or(self.cfg.grace_ns);
        self.recently_decided.retain(|_, d| now_ns < d.at_ns + keep);
        self.recent_refusals.retain(|_, at| now_ns < *at + keep);
        let second = now_ns / 1_000_000_000;
        self.drop_windows.retain(|_, (s, _)| *s + 1 >= second);
        let orphans_before = self.orphan_errors.len();
        self.orphan_errors
            .retain(|_, o| now_ns < o.ts_ns + 10 * grace_or(self.cfg.grace_ns));
        self.summary.unmatched_errors += (orphans_before - self.orphan_errors.len()) as u64;
        out
    }

    /// Ends the run: decides every closed connection now; open ones stay unresolved.
    pub fn finish(&mut self, now_ns: u64) -> Vec<Verdict> {
        let mut out = self.tick(now_ns);
        let far = now_ns.saturating_add(self.cfg.grace_ns);
        self.decide_ready(far, &mut out);
        self.decide_attempts(now_ns, true, &mut out);
        let open: Vec<Conn> = std::mem::take(&mut self.conns).into_values().collect();
        self.by_sk.clear();
        self.by_tuple.clear();
        for c in open {
            if self.cfg.report_established
                && c.side == Side::Server
                && !c.reported
                && c.established_ns.is_some()
            {
                // Established but not yet reported when the run ends: report what is known.
                let v = decide::established(&c, now_ns);
                self.emit(&mut out, v);
            }
            self.forget(c);
        }
        out
    }
}

fn grace_or(grace: u64) -> u64 {
    grace.max(100_000_000)
}
