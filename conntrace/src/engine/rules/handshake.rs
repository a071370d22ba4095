//! Failed handshakes, as the socket and `connect()` tell them: `refused_no_listener`,
//! `syn_timeout`, `icmp_unreachable` and `unknown`. A drop that explains a silent
//! failure turns it into the drop's reason afterwards (`drops.rs`).

use conntrace_common::tcp::flags;

use super::{base, ms, socketless};
use crate::engine::{
    config::EngineConfig,
    facts::{Errno, FourTuple, Meta, TcpFlags, TcpState},
    state::{Conn, SocketError},
    verdict::{
        Detail, Outcome, Reason, Side, Verdict,
        detail::{Answered, ClosedDetail, RefusalDetail, SynTimeoutCause},
    },
};

/// The verdict of a connection that closed before its handshake completed.
pub(crate) fn failed(c: &Conn, cfg: &EngineConfig) -> Option<Verdict> {
    let (at, from) = c.closed()?;
    if c.side == Side::Client
        && c.tuple.sport == 0
        && (c.connect_errno.is_some() || super::connect::never_got_a_port(c))
    {
        // No local port was ever chosen: connect() failed before any packet.
        return super::connect::closed_before_any_packet(c);
    }
    let errno = c.errno().or(c.connect_errno);
    let mut d = ClosedDetail::new(from);
    let (reason, kernel_reason) = if c.side == Side::Server {
        // A passive connection that died in SYN_RECV (its final ACK never came, or a RST did).
        d.rst_received = Some(c.rst_received.is_some());
        (Reason::Unknown, from.name().into())
    } else if c.rst_received.is_some() {
        d.rst_received = Some(true);
        let kernel = errno.map_or_else(|| "RST received in SYN_SENT".into(), |e| e.to_string());
        (Reason::RefusedNoListener, kernel)
    } else {
        client_error(c, errno, at, cfg, &mut d)
    };
    let mut v = base(c, at, Outcome::Failed, reason, Detail::Closed(Box::new(d)));
    v.kernel_reason = Some(kernel_reason);
    v.errno = errno;
    Some(v)
}

/// A client refused without a RST seen ([`client_error`]'s ECONNREFUSED): an ICMP answer, or
/// a refusal whose RST event was lost. The engine lets it wait out the grace period, so that
/// a loss the kernel counted while its last events were read (noted before the next read)
/// reaches its verdict (`events_lost`).
pub(crate) fn refused_without_reset(c: &Conn) -> bool {
    c.side == Side::Client
        && c.rst_received.is_none()
        && c.established_ns().is_none()
        && c.errno().or(c.connect_errno) == Some(Errno::ECONNREFUSED)
}

/// A client whose handshake ended without a RST: what its error says.
fn client_error(
    c: &Conn,
    errno: Option<Errno>,
    at: u64,
    cfg: &EngineConfig,
    d: &mut ClosedDetail,
) -> (Reason, String) {
    let from = d.closed_from;
    if let Some(e) = errno
        && super::connect::route_lost(c, e)
    {
        // Its SYN went out; the route went away and the retransmissions found none.
        d.route_lost = Some(true);
        return (Reason::NoRoute, e.to_string());
    }
    match errno {
        Some(Errno::ECONNREFUSED) if cfg.resets_observed && !c.events_lost => {
            // ECONNREFUSED without a RST: an ICMP port unreachable (e.g. REJECT).
            d.icmp = Some(super::icmp_of(Errno::ECONNREFUSED));
            unanswered_syns(c, d);
            (Reason::IcmpUnreachable, Errno::ECONNREFUSED.to_string())
        }
        Some(Errno::ECONNREFUSED) => {
            // RSTs are not traced here, or events were lost meanwhile (its RST may be one):
            // a refusal is the likelier of the two, and the detail says why it is a guess.
            d.events_lost = c.events_lost.then_some(true);
            (Reason::RefusedNoListener, Errno::ECONNREFUSED.to_string())
        }
        Some(e @ (Errno::EHOSTUNREACH | Errno::ENETUNREACH | Errno::EACCES | Errno::EPERM)) => {
            d.icmp = Some(super::icmp_of(e));
            unanswered_syns(c, d);
            (Reason::IcmpUnreachable, e.to_string())
        }
        Some(Errno::ETIMEDOUT) => {
            d.cause = Some(SynTimeoutCause::KernelGaveUp);
            d.after_ms = Some(ms(c.started_ns, at));
            (Reason::SynTimeout, Errno::ETIMEDOUT.to_string())
        }
        Some(e) => (Reason::Unknown, e.to_string()),
        None if from == TcpState::SynSent && c.error == SocketError::Soft => {
            // An ICMP error ended the handshake, but `sk_error_report()` wakes the application
            // before its tracepoint reads `sk_err`: the application, on another CPU, read the
            // error (connect(), SO_ERROR) and cleared it first.
            d.icmp = Some("unknown: the application read the error before it could be seen");
            unanswered_syns(c, d);
            (
                Reason::IcmpUnreachable,
                "ICMP error read by the application first".into(),
            )
        }
        None if from == TcpState::SynSent => {
            d.cause = Some(SynTimeoutCause::ApplicationClosed);
            d.after_ms = Some(ms(c.started_ns, at));
            (Reason::SynTimeout, "closed in TCP_SYN_SENT".into())
        }
        None => (Reason::Unknown, from.name().into()),
    }
}

/// An ICMP answer that ended a retransmitted SYN. Either the first SYNs went unanswered: a
/// REJECT's ICMP is rate-limited per destination (`net.ipv4.icmp_ratelimit`, 1 s after a burst
/// of 6), so a client opening connections quickly waits for its SYN retransmits. Or the first
/// SYN's answer came while `connect()` still held the socket (on a fast path it comes back
/// before `connect()` returns): the kernel kept it as a soft error, which the socket still has
/// at its close, and retransmitted.
fn unanswered_syns(c: &Conn, d: &mut ClosedDetail) {
    if c.syn_retransmits == 0 {
        return;
    }
    let mut unanswered = c.syn_retransmits;
    if c.soft_errno.is_some() {
        d.first_answer_while_busy = Some(true);
        unanswered -= 1;
    }
    d.unanswered_syns = (unanswered > 0).then_some(unanswered);
}

/// This host sent a RST because no socket matched the packet. Only a SYN answered that way
/// is a refused connection; when the packet could not be read, the RST is taken as one.
pub(crate) fn refused_without_socket(
    meta: &Meta,
    tuple: FourTuple,
    reason: Option<String>,
    answered_flags: Option<TcpFlags>,
) -> Option<Verdict> {
    if answered_flags.is_some_and(|f| !f.has(flags::SYN) || f.has(flags::ACK)) {
        return None;
    }
    let detail = Detail::Refusal(RefusalDetail {
        rst_sent: true,
        answered: if answered_flags.is_some() {
            Answered::Syn
        } else {
            Answered::Unknown
        },
        listeners: None,
    });
    let mut v = socketless(meta, tuple, Side::Server, detail);
    v.reason = Reason::RefusedNoListener;
    v.kernel_reason = Some(reason.unwrap_or_else(|| "RST sent: no socket".into()));
    Some(v)
}
