//! Stalled connections: established, then stuck. A client that received nothing within
//! `--stall-timeout` (a server-first protocol's greeting never came, or a request got no
//! answer), a server connection nobody accepted. One `stalled` verdict when the timeout
//! passes, then one follow-up: `resolved` when data comes or accept() returns, `failed` when
//! the connection ends still stuck, each with how long it was stuck.

use serde_json::json;

use super::{
    Conn, Engine, decide,
    model::{Outcome, Reason, Side, TcpState},
    ms,
    verdict::Verdict,
};

/// A connection's stall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stall {
    pub reason: Reason,
    /// When the stuck time started (ESTABLISHED).
    pub since_ns: u64,
    /// A follow-up was emitted.
    pub settled: bool,
}

/// Why a connection counts as stuck now, if it does.
fn stuck(c: &Conn, now_ns: u64, timeout_ns: u64) -> Option<(Reason, u64)> {
    let at = c.established_ns?;
    if c.closed.is_some() || c.stall.is_some() || now_ns < at + timeout_ns {
        return None;
    }
    match c.side {
        Side::Client if c.first_rx_ns.is_none() => Some((
            if c.first_tx_ns.is_some() {
                Reason::StalledNoResponse
            } else {
                Reason::StalledNoGreeting
            },
            at,
        )),
        Side::Server if c.accepted_ns.is_none() => Some((Reason::NotAccepted, at)),
        _ => None,
    }
}

/// The first `stalled` verdict.
fn stalled(c: &Conn, reason: Reason, since_ns: u64, now_ns: u64) -> Verdict {
    let mut v = decide::established(c, now_ns);
    v.outcome = Outcome::Stalled;
    v.reason = reason;
    v.kernel_reason = Some(match reason {
        Reason::NotAccepted => "established, not accepted".into(),
        Reason::StalledNoResponse => "established, data sent, nothing received".into(),
        _ => "established, nothing received".into(),
    });
    v.detail
        .insert("waited_ms".into(), json!(ms(since_ns, now_ns)));
    v
}

/// A follow-up: the stall ended (`resolved`) or the connection did (`failed`).
fn follow_up(c: &Conn, s: Stall, now_ns: u64, outcome: Outcome, how: &str) -> Verdict {
    let mut v = decide::established(c, now_ns);
    v.outcome = outcome;
    v.reason = s.reason;
    v.kernel_reason = Some(how.into());
    v.detail
        .insert("stuck_ms".into(), json!(ms(s.since_ns, now_ns)));
    v
}

impl Engine {
    /// Emits `stalled` verdicts for connections stuck past the stall timeout.
    pub(super) fn detect_stalls(&mut self, now_ns: u64, out: &mut Vec<Verdict>) {
        let timeout = self.cfg.stall_timeout_ns;
        if timeout == 0 {
            // `--stall-timeout 0`: stall verdicts are off.
            return;
        }
        let mut verdicts = Vec::new();
        for c in self.conns.values_mut() {
            if let Some((reason, since)) = stuck(c, now_ns, timeout) {
                c.stall = Some(Stall {
                    reason,
                    since_ns: since,
                    settled: false,
                });
                // The stall stands in for the established verdict.
                c.reported = true;
                verdicts.push(stalled(c, reason, since, now_ns));
            }
        }
        for v in verdicts {
            self.emit(out, v);
        }
    }

    /// The first data in one direction: a stalled client that receives gets going.
    pub(super) fn on_first_data(
        &mut self,
        sk: u64,
        outgoing: bool,
        ts_ns: u64,
        out: &mut Vec<Verdict>,
    ) {
        let Some(c) = self.conn_mut(sk) else { return };
        c.last_ns = ts_ns;
        if outgoing {
            c.first_tx_ns.get_or_insert(ts_ns);
            return;
        }
        c.first_rx_ns.get_or_insert(ts_ns);
        let v = match c.stall {
            Some(s) if !s.settled && s.reason != Reason::NotAccepted => {
                c.stall = Some(Stall { settled: true, ..s });
                Some(follow_up(c, s, ts_ns, Outcome::Resolved, "data received"))
            }
            _ => None,
        };
        if let Some(v) = v {
            self.emit(out, v);
        }
    }

    /// accept() returned a connection: one reported `not_accepted` gets its follow-up.
    pub(super) fn stall_accepted(c: &mut Conn, ts_ns: u64) -> Option<Verdict> {
        let s = c
            .stall
            .filter(|s| !s.settled && s.reason == Reason::NotAccepted)?;
        c.stall = Some(Stall { settled: true, ..s });
        Some(follow_up(c, s, ts_ns, Outcome::Resolved, "accepted"))
    }
}

/// A connection that closed while stuck: one `failed` follow-up of its stall, naming how it
/// ended (the failure the kernel reported, or an orderly close).
pub(super) fn closed_while_stuck(c: &Conn, ended: Option<Verdict>) -> Option<Verdict> {
    let s = c.stall.filter(|s| !s.settled)?;
    let (at, from) = c.closed?;
    let how = ended
        .as_ref()
        .and_then(|v| v.kernel_reason.clone())
        .unwrap_or_else(|| format!("closed from {}", from.name()));
    let mut v = follow_up(c, s, at, Outcome::Failed, &how);
    v.detail.insert("closed_from".into(), from.name().into());
    if let Some(e) = ended {
        v.errno = e.errno;
        v.detail.insert("ended_by".into(), json!(e.reason.code()));
    } else {
        let who = if from == TcpState::FinWait1 || c.orderly_close {
            "orderly close"
        } else {
            "close"
        };
        v.detail.insert("ended_by".into(), json!(who));
    }
    Some(v)
}
