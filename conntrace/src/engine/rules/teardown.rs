//! Established connections that end badly: `reset_by_peer`, `timeout`, `icmp_unreachable` (its
//! retransmissions answered with ICMP errors), `no_route` (its route went away under its
//! retransmissions, `connect::route_lost`, or while it was idle, `connect::route_gone`) and
//! `socket_destroyed` (and `unknown` for an error no rule knows). An orderly or
//! application-initiated end has no verdict.

use super::{base, connect, icmp_of, ms};
use crate::engine::{
    facts::Errno,
    lookup::Route,
    state::Conn,
    verdict::{Detail, Outcome, Reason, Verdict, detail::ClosedDetail},
};

/// The verdict of an established connection that reached CLOSE, or `None` for a good end.
/// `route_now` is its namespace's route to the other end, read at the verdict where
/// `connect::may_have_lost_route_idle` asked for it.
pub(crate) fn ended(c: &Conn, route_now: Option<&Route>) -> Option<Verdict> {
    let (at, from) = c.closed()?;
    let since = c.established_ns().unwrap_or(at);
    let errno = c.errno().or(c.connect_errno);
    let mut d = ClosedDetail::new(from);
    // How long it was established, where its start was seen.
    let established_ms = (!c.started_before_trace).then(|| ms(since, at));
    d.started_before_trace = c.started_before_trace.then_some(true);
    let lost = errno.filter(|&e| connect::route_lost(c, e));
    let idle_lost =
        route_now.filter(|r| connect::may_have_lost_route_idle(c) && connect::route_gone(r));
    let (reason, kernel_reason) = if let Some(state) = c.rst_received {
        d.rst_received_in = Some(state);
        d.established_ms = established_ms;
        (Reason::ResetByPeer, errno.unwrap_or(Errno::ECONNRESET))
    } else if let Some(e) = lost {
        // No RST, no ICMP: this host's routes failed its retransmissions.
        d.established_ms = established_ms;
        d.route_lost = Some(true);
        (Reason::NoRoute, e)
    } else if let Some(route) = idle_lost {
        // Idle when its route went: no RST, no ICMP, no soft error, and its namespace has no
        // usable route now.
        d.established_ms = established_ms;
        d.route_lost = Some(true);
        d.route = Some(route.clone());
        (Reason::NoRoute, Errno::ETIMEDOUT)
    } else {
        match errno {
            Some(Errno::ETIMEDOUT) => {
                d.established_ms = established_ms;
                (Reason::Timeout, Errno::ETIMEDOUT)
            }
            Some(Errno::ECONNRESET) => (Reason::ResetByPeer, Errno::ECONNRESET),
            Some(
                e @ (Errno::ECONNREFUSED
                | Errno::EHOSTUNREACH
                | Errno::ENETUNREACH
                | Errno::EACCES
                | Errno::EPERM),
            ) => {
                // No RST: its retransmissions were answered with ICMP errors, which the kernel
                // keeps as a soft error and reports instead of ETIMEDOUT when it gives up.
                d.established_ms = established_ms;
                d.icmp = Some(icmp_of(e));
                (Reason::IcmpUnreachable, e)
            }
            Some(Errno::ECONNABORTED) => {
                // tcp_abort(): SOCK_DESTROY (`ss -K`, a CNI agent) asked this host's kernel.
                d.established_ms = established_ms;
                (Reason::SocketDestroyed, Errno::ECONNABORTED)
            }
            Some(e) if !c.orderly() => (Reason::Unknown, e),
            // An orderly or application-initiated end: nothing to report.
            _ => return None,
        }
    };
    let mut v = base(c, at, Outcome::Failed, reason, Detail::Closed(Box::new(d)));
    v.kernel_reason = Some(kernel_reason.to_string());
    v.errno = errno;
    Some(v)
}
