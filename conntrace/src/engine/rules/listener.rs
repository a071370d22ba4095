//! The listener's view: `listen_overflow` (the accept queue was full) and
//! `refused_bound_elsewhere` (a refused SYN while the service listens at another address),
//! and the queue facts that `not_accepted` and `listen_overflow` verdicts carry.

use std::net::{IpAddr, SocketAddr};

use super::socketless;
use crate::engine::{
    facts::{DropReason, FourTuple, Meta},
    lookup::Listener,
    state::Overflows,
    verdict::{
        Detail, Reason, Side, Verdict,
        detail::{ListenerRef, OverflowDetail, QueueFacts},
    },
};

/// A final ACK dropped because the accept queue was full: recent kernels name it
/// TCP_LISTEN_OVERFLOW; a SYN cookie's ACK that validated but got no socket
/// (`tcp_get_cookie_sock`: the child could not be made, the accept queue full above all) is
/// NO_SOCKET in `cookie_v4_check`/`cookie_v6_check` (6.10+).
pub(crate) fn is_overflow_drop(reason: &str, location: &str) -> bool {
    reason == DropReason::TCP_LISTEN_OVERFLOW
        || (reason == DropReason::NO_SOCKET && is_cookie_check(location))
}

/// Whether a drop location is the SYN cookie check of a listener's ACK.
pub fn is_cookie_check(location: &str) -> bool {
    ["cookie_v4_check", "cookie_v6_check"].iter().any(|f| {
        location
            .strip_prefix(f)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('+'))
    })
}

/// Whether the verdict needs the listeners on its port: to tell a refusal from a service bound
/// elsewhere, or to name the queue it waits in.
pub(crate) fn wants_listeners(v: &Verdict) -> bool {
    v.side == Side::Server
        && matches!(
            v.reason,
            Reason::ListenOverflow | Reason::NotAccepted | Reason::RefusedNoListener
        )
}

/// Completes a server verdict with the listeners on its port (`listeners`), and, for a
/// connection waiting in an accept queue, the listener that holds it (`holder`: in an
/// SO_REUSEPORT group, not just any listener on the port).
pub(crate) fn with_listeners(v: &mut Verdict, listeners: &[Listener], holder: Option<&Listener>) {
    bound_elsewhere(v, listeners);
    match holder {
        Some(l) => queue(v, std::slice::from_ref(l)),
        None => queue(v, listeners),
    }
}

/// A server refusal (no socket matched the SYN) while sockets listen on the same port at other
/// addresses: the service is bound elsewhere (the seed's MySQL on 127.0.0.1 only), or to IPv4
/// alone (`0.0.0.0`) for an IPv6 client, or to IPv6 alone (`[::]` with `IPV6_V6ONLY`) for an
/// IPv4 one. A listener on the refused address itself, IPv4's wildcard for an IPv4 one, or
/// IPv6's (which takes IPv4 too unless `IPV6_V6ONLY`; unknown counts as not set) would have
/// matched; then the refusal has another cause and the verdict stays as it is.
fn bound_elsewhere(v: &mut Verdict, listeners: &[Listener]) {
    if v.side != Side::Server || v.reason != Reason::RefusedNoListener || listeners.is_empty() {
        return;
    }
    let would_match = |l: &Listener| {
        let ip = l.addr.ip();
        let takes_ipv4 = ip.is_ipv4() || l.v6only != Some(true);
        Some(ip) == v.saddr
            || (ip.is_unspecified()
                && match v.saddr {
                    Some(s) if s.is_ipv4() => takes_ipv4,
                    _ => ip.is_ipv6(),
                })
    };
    if v.saddr.is_none() || listeners.iter().any(would_match) {
        return;
    }
    v.reason = Reason::RefusedBoundElsewhere;
    if let Detail::Refusal(d) = &mut v.detail {
        d.listeners = Some(listeners.iter().map(ListenerRef::from).collect());
    }
}

/// For a full or unaccepted queue: the listener's accept queue and backlog, and who holds it.
fn queue(v: &mut Verdict, listeners: &[Listener]) {
    if !matches!(v.reason, Reason::ListenOverflow | Reason::NotAccepted) {
        return;
    }
    let Some(l) = listeners
        .iter()
        .find(|l| Some(l.addr.ip()) == v.saddr)
        .or_else(|| listeners.iter().find(|l| l.addr.ip().is_unspecified()))
    else {
        return;
    };
    if let Some(q) = v.detail.queue_mut() {
        q.listener = Some(ListenerRef::from(l));
        q.accept_queue = l.accept_queue.or(q.accept_queue);
        q.backlog = l.backlog.or(q.backlog);
    }
}

/// A client's `syn_timeout` toward a listener in another namespace of this host that
/// overflowed its accept queue while the client waited (`overflows`): that queue refused its
/// SYNs, which the client saw only as silence. Only a listener whose namespace owns the
/// client's destination address (`owns(netns, addr)`: `None` when unknown, then only a
/// listener bound to that very address) can have had them; drops of its packets, at either
/// end or on the path, explain it instead.
pub(crate) fn describe_peer_queue(
    v: &mut Verdict,
    overflows: &Overflows,
    mut owns: impl FnMut(u32, IpAddr) -> Option<bool>,
) {
    if v.side != Side::Client || v.reason != Reason::SynTimeout {
        return;
    }
    let server = SocketAddr::new(v.daddr, v.dport);
    let from = v.ts_ns.saturating_sub((v.duration_ms * 1e6) as u64);
    let (netns, to) = (v.netns, v.ts_ns);
    let Detail::Closed(d) = &mut v.detail else {
        return;
    };
    if !d.drops.drops.is_empty() || !d.drops.path_drops.is_empty() {
        return;
    }
    d.peer_listen_queue = overflows.reached(netns, server, (from, to), |ns, bound| {
        match owns(ns, server.ip()) {
            Some(owned) => owned,
            None => bound == server.ip(),
        }
    });
}

/// The `net.core.somaxconn` of the namespace whose listener a full or unaccepted queue, or a
/// client's timeout toward a full one, is about (`somaxconn(netns)`): the advice to raise a
/// backlog names that namespace's cap, not conntrace's own.
pub(crate) fn with_somaxconn(
    v: &mut Verdict,
    mut somaxconn: impl FnMut(Option<u32>) -> Option<u32>,
) {
    if let Detail::Closed(d) = &mut v.detail
        && let Some(q) = &mut d.peer_listen_queue
    {
        q.somaxconn = somaxconn(Some(q.netns));
        return;
    }
    if matches!(v.reason, Reason::ListenOverflow | Reason::NotAccepted)
        && let Some(netns) = v.netns
        && let Some(q) = v.detail.queue_mut()
    {
        q.somaxconn = somaxconn(Some(netns));
    }
}

/// A listener-level overflow from the kernel's counter: no single client to name, so the
/// remote end is the unspecified address and port 0.
pub(crate) fn overflow(
    meta: &Meta,
    listener: SocketAddr,
    (accept_queue, backlog): (u32, u32),
    overflows: u64,
) -> Verdict {
    let unspecified = match listener {
        SocketAddr::V4(_) => IpAddr::from([0u8; 4]),
        SocketAddr::V6(_) => IpAddr::from([0u16; 8]),
    };
    let tuple = FourTuple {
        saddr: listener.ip(),
        sport: listener.port(),
        daddr: unspecified,
        dport: 0,
    };
    let detail = Detail::Overflow(OverflowDetail {
        overflows,
        queue: QueueFacts {
            listener: None,
            accept_queue: Some(accept_queue),
            backlog: Some(backlog),
            somaxconn: None,
        },
    });
    let mut v = socketless(meta, tuple, Side::Server, detail);
    v.reason = Reason::ListenOverflow;
    v.kernel_reason = Some("TcpExtListenOverflows".into());
    v
}
