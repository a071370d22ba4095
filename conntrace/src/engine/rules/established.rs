//! `established` (with `--all`) and `unexpected_listener`: a handshake that completed, and who
//! accepted it.

use super::{base, drops, ms};
use crate::engine::{
    config::EngineConfig,
    facts::TcpState,
    state::{Conn, Opening},
    verdict::{Detail, Outcome, Reason, Side, Verdict, detail::EstablishedDetail},
};

/// What an established connection's verdicts say about it: drops that delayed its handshake,
/// a SYN cookie, and (server) whether and when accept() returned it.
pub(crate) fn connection_detail(c: &Conn, established_ns: u64) -> EstablishedDetail {
    let server = c.side == Side::Server;
    EstablishedDetail {
        drops: drops::kinds(&c.drops),
        syn_cookie: c.opening == Opening::SynCookie,
        accepted: server.then_some(c.accepted()),
        // accept() can return before the ESTABLISHED event fires (the child is queued first):
        // the delay is then 0.
        accept_delay_ms: c
            .accepted_ns
            .filter(|_| server)
            .map(|accepted| ms(established_ns, accepted)),
        expected_comm: None,
    }
}

/// A verdict's socket is held by process `p` (found after the fact: no accept() or connect()
/// was seen); a server's was accepted by it.
pub(crate) fn held_by(v: &mut Verdict, p: crate::engine::facts::Proc) {
    v.pid = Some(p.pid);
    v.comm = Some(p.comm.to_string());
    let d = match &mut v.detail {
        Detail::Established(d) => d,
        Detail::Stall(s) => &mut s.connection,
        _ => return,
    };
    if v.side == Side::Server {
        d.accepted = Some(true);
    }
}

/// The verdict of a connection that completed its handshake, at `ts_ns`.
pub(crate) fn established(c: &Conn, ts_ns: u64) -> Verdict {
    let at = c.established_ns().unwrap_or(ts_ns);
    let detail = Detail::Established(connection_detail(c, at));
    let mut v = base(c, ts_ns, Outcome::Established, Reason::Established, detail);
    v.duration_ms = ms(c.started_ns, at);
    v.kernel_reason = Some(TcpState::Established.name().into());
    v
}

/// What a connection that just became established-and-attributed reports: an
/// `unexpected_listener` failure when a server connection was accepted by a process outside
/// `--expect-comm`, else an `established` verdict with `--all`, else nothing.
pub(crate) fn on_established(c: &Conn, ts_ns: u64, cfg: &EngineConfig) -> Option<Verdict> {
    if c.side == Side::Server
        && !cfg.expected_comms.is_empty()
        && let Some(p) = &c.proc
        && !cfg.expected_comms.iter().any(|e| e == p.comm.as_str())
    {
        let mut v = established(c, ts_ns);
        v.outcome = Outcome::Failed;
        v.reason = Reason::UnexpectedListener;
        v.kernel_reason = Some(format!("accepted by {}", p.comm));
        if let Detail::Established(d) = &mut v.detail {
            d.expected_comm = Some(cfg.expected_comms.clone());
        }
        return Some(v);
    }
    cfg.report_established.then(|| established(c, ts_ns))
}
