//! Stalled connections: established, then stuck. A client that received nothing within
//! `--stall-timeout` (`stalled_no_greeting`: a server-first protocol's greeting never came;
//! `stalled_no_response`: a request got no answer), a server connection nobody accepted
//! (`not_accepted`), a connection whose receiver stopped reading (`zero_window`). One `stalled`
//! verdict when the timeout passes, then one follow-up:
//! `resolved` when data comes or accept() returns, `failed` when the connection ends still
//! stuck, each with how long it was stuck.

use super::{base, established::connection_detail, ms};
use crate::engine::{
    facts::Window,
    state::{Conn, Stall},
    verdict::{
        Detail, Outcome, Reason, Side, Verdict,
        detail::{CloseKind, EndedBy, Reader, StallDetail, WindowFacts},
    },
};

/// Why a connection counts as stuck now, if it does. `checked`: data and accept() are known
/// only from a check (quiet mode), so only a connection the check found stuck can be.
/// `data_known`: a client's first data is traced (or checked); without it a client is stuck
/// only for a zero window.
pub(crate) fn stuck(
    c: &Conn,
    now_ns: u64,
    timeout_ns: u64,
    (checked, data_known): (bool, bool),
) -> Option<Stall> {
    let since_ns = c.established_ns()?;
    if c.closed().is_some() || c.was_stalled() {
        return None;
    }
    if let Some((_, since_ns)) = c.window {
        // A zero window: the receiving application stopped reading.
        return (now_ns >= since_ns + timeout_ns).then_some(Stall {
            reason: Reason::ZeroWindow,
            since_ns,
        });
    }
    if c.started_before_trace {
        // When it last received, or whether it was accepted, is older than conntrace.
        return None;
    }
    if now_ns < since_ns + timeout_ns || (checked && !c.found_stuck) {
        return None;
    }
    let reason = match c.side {
        Side::Client if c.first_rx_ns.is_none() && data_known => {
            if c.first_tx_ns.is_some() {
                Reason::StalledNoResponse
            } else {
                Reason::StalledNoGreeting
            }
        }
        Side::Server if !c.accepted() => Reason::NotAccepted,
        _ => return None,
    };
    Some(Stall { reason, since_ns })
}

/// Whose window is zero, and what waits.
fn window(c: &Conn) -> Option<WindowFacts> {
    match c.window? {
        (Window::PeerZero { queued }, _) => Some(WindowFacts {
            stopped_reading: Reader::Peer,
            queued_bytes: queued,
        }),
        (Window::LocalFull { queued }, _) => Some(WindowFacts {
            stopped_reading: Reader::Local,
            queued_bytes: queued,
        }),
        (Window::Open, _) => None,
    }
}

/// A verdict of stall `s` at `ts_ns` with `outcome`, its kernel reason and its detail.
fn verdict(
    c: &Conn,
    s: Stall,
    ts_ns: u64,
    outcome: Outcome,
    how: String,
    d: StallDetail,
) -> Verdict {
    let d = StallDetail {
        window: d.window.or_else(|| window(c)),
        ..d
    };
    let mut v = base(c, ts_ns, outcome, s.reason, Detail::Stall(Box::new(d)));
    v.duration_ms = ms(c.started_ns, s.since_ns);
    v.kernel_reason = Some(how);
    v
}

/// The first `stalled` verdict.
pub(crate) fn stalled(c: &Conn, s: Stall, now_ns: u64) -> Verdict {
    let how = match s.reason {
        Reason::NotAccepted => "established, not accepted",
        Reason::StalledNoResponse => "established, data sent, nothing received",
        Reason::ZeroWindow => "zero window",
        _ => "established, nothing received",
    };
    let d = StallDetail {
        connection: connection_detail(c, s.since_ns),
        waited_ms: Some(ms(s.since_ns, now_ns)),
        ..StallDetail::default()
    };
    verdict(c, s, now_ns, Outcome::Stalled, how.into(), d)
}

/// The `resolved` follow-up: data came (client) or accept() returned it (server).
pub(crate) fn resolved(c: &Conn, s: Stall, now_ns: u64) -> Verdict {
    let how = match s.reason {
        Reason::NotAccepted => "accepted",
        Reason::ZeroWindow => "window open",
        _ => "data received",
    };
    let d = StallDetail {
        connection: connection_detail(c, s.since_ns),
        stuck_ms: Some(ms(s.since_ns, now_ns)),
        ..StallDetail::default()
    };
    verdict(c, s, now_ns, Outcome::Resolved, how.into(), d)
}

/// A connection that closed while stuck: one follow-up of its stall. `failed`, naming how it
/// ended (`ended`: the failure the kernel reported, or none for a close), except a zero
/// window that ended in an orderly close: every byte before the FINs was read and
/// acknowledged, so the window had opened: `resolved`, by the close at the latest.
pub(crate) fn closed_while_stuck(c: &Conn, s: Stall, ended: Option<Verdict>) -> Option<Verdict> {
    let (at, from) = c.closed()?;
    if s.reason == Reason::ZeroWindow && ended.is_none() && c.orderly() {
        return Some(resolved(c, s, at));
    }
    let how = ended
        .as_ref()
        .and_then(|v| v.kernel_reason.clone())
        .unwrap_or_else(|| format!("closed from {from}"));
    let ended_by = match &ended {
        Some(e) => EndedBy::Failure(e.reason),
        None if from == crate::engine::facts::TcpState::FinWait1 || c.orderly() => {
            EndedBy::Close(CloseKind::Orderly)
        }
        None => EndedBy::Close(CloseKind::Close),
    };
    let (retransmits, path_answer) = match ended.as_ref().map(|e| &e.detail) {
        Some(Detail::Closed(e)) => (e.retransmits, e.path_answer.clone()),
        _ => (None, None),
    };
    let d = StallDetail {
        connection: connection_detail(c, s.since_ns),
        stuck_ms: Some(ms(s.since_ns, at)),
        closed_from: Some(from),
        ended_by: Some(ended_by),
        retransmits,
        path_answer,
        ..StallDetail::default()
    };
    let mut v = verdict(c, s, at, Outcome::Failed, how, d);
    if let Some(e) = ended {
        v.errno = e.errno;
    }
    Some(v)
}
