//! `connect()` failures before any packet left: `no_route`, `ephemeral_ports_exhausted`,
//! `connect_denied` (and `unknown` for an errno no rule knows). The namespace's route and its
//! ports towards the destination complete the verdict. `no_route` is also the end of a
//! connection whose route went away later ([`route_lost`]).
//!
//! Where the errno comes from: `connect()`'s own result (`fexit:inet_stream_connect`, or the
//! `connect` syscall tracepoints when connections stream), else, in quiet mode, the walk of
//! the routing rules its route lookup failed in ([`route_failed`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::socketless;
use crate::engine::{
    facts::{Errno, FourTuple, Meta, TableAnswer, TcpState},
    lookup::{NamespaceLookup, Route, RouteKind},
    state::{Conn, SocketError, Walk},
    verdict::{
        Detail, Outcome, Reason, Side, Verdict,
        detail::{ConnectDetail, Syscall},
    },
};

/// Errors only a handshake produces (a RST, an ICMP answer, a timeout).
const HANDSHAKE_ERRORS: [Errno; 3] = [Errno::ECONNREFUSED, Errno::ETIMEDOUT, Errno::ECONNRESET];
/// `connect()` results that are not a connection failure.
const NOT_A_FAILURE: [Errno; 4] = [Errno::EALREADY, Errno::EISCONN, Errno::EINTR, Errno::EAGAIN];

/// The reason an errno of `connect()` before any packet stands for (before the route is
/// looked at: EACCES and EINVAL can also come from a prohibit or blackhole route).
fn reason(errno: Errno) -> Reason {
    match errno {
        Errno::ENETUNREACH | Errno::EHOSTUNREACH => Reason::NoRoute,
        Errno::EADDRNOTAVAIL => Reason::EphemeralPortsExhausted,
        Errno::EPERM | Errno::EACCES => Reason::ConnectDenied,
        _ => Reason::Unknown,
    }
}

/// `cgroup_refusal`: see [`failed`].
fn detail(cgroup_refusal: bool) -> Detail {
    Detail::Connect(ConnectDetail {
        syscall: Syscall::Connect,
        packets_sent: 0,
        port_range: None,
        sockets_to_destination: None,
        time_wait: None,
        route: None,
        errno_inferred: None,
        refused_by_cgroup_program: cgroup_refusal.then_some(true),
    })
}

/// `connect()` failed before the socket changed state (no packet was sent).
///
/// `socket_known`: the kernel side resolved the socket, so a lifecycle event would have been
/// seen had a SYN gone out. Without it, errors that only a handshake produces are left to the
/// lifecycle events rather than reported twice. `cgroup_refusal`: a cgroup program refused it
/// (the root cgroup's programs saw so): `connect_denied` whatever errno it chose (a
/// socket load-balancer's EHOSTUNREACH for a service without backends is no route's).
pub(crate) fn failed(
    meta: &Meta,
    tuple: FourTuple,
    errno: Errno,
    (socket_known, cgroup_refusal): (bool, bool),
) -> Option<Verdict> {
    if !cgroup_refusal
        && (NOT_A_FAILURE.contains(&errno) || (!socket_known && HANDSHAKE_ERRORS.contains(&errno)))
    {
        return None;
    }
    let mut v = socketless(meta, tuple, Side::Client, detail(cgroup_refusal));
    v.reason = if cgroup_refusal {
        Reason::ConnectDenied
    } else {
        reason(errno)
    };
    v.kernel_reason = Some(errno.to_string());
    v.errno = Some(errno);
    v.saddr = None;
    v.sport = None;
    v.pid = Some(meta.proc.pid);
    v.comm = Some(meta.proc.comm.to_string());
    Some(v)
}

/// The verdict of a `connect()` whose route lookup failed, known only from the tables' answers
/// (quiet mode), and whose socket never moved to SYN_SENT: what `connect()` returned is the
/// answer that ended the walk (EHOSTUNREACH, EACCES, EINVAL: `fib_rules_lookup` stops at any
/// answer but a miss), or ENETUNREACH when every table missed (`fib_lookup`,
/// `fib6_rule_lookup`).
///
/// A table that answered with a route is not traced, so a walk that ended with a miss is
/// checked against the namespace's own route (`route`, `None` when unknown): a route there
/// means a later table had one and this lookup was not the end of its `connect()`; an IPv6
/// "no route or unreachable route" answer takes the route's kind. Without the route, a miss
/// is ENETUNREACH.
pub(crate) fn route_failed(walk: &Walk, route: Option<&Route>) -> Option<Verdict> {
    let errno = match walk.last_answer() {
        TableAnswer::Unreachable => Errno::EHOSTUNREACH,
        TableAnswer::Prohibit => Errno::EACCES,
        TableAnswer::Blackhole => Errno::EINVAL,
        TableAnswer::Other(e) => e,
        TableAnswer::Miss | TableAnswer::MissOrUnreachable => match route.map(|r| r.kind) {
            None | Some(RouteKind::None) => Errno::ENETUNREACH,
            Some(RouteKind::Unreachable) => Errno::EHOSTUNREACH,
            Some(RouteKind::Prohibit) => Errno::EACCES,
            Some(RouteKind::Blackhole) => Errno::EINVAL,
            Some(RouteKind::Unicast | RouteKind::Local | RouteKind::Other) => return None,
        },
    };
    // As the syscall reports it: the local end is not known.
    let tuple = FourTuple {
        saddr: match walk.tuple.daddr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        },
        sport: 0,
        ..walk.tuple
    };
    let mut v = failed(&walk.meta, tuple, errno, (false, false))?;
    if let (Detail::Connect(d), Some(route)) = (&mut v.detail, route) {
        // As the kernel answered: `complete` does not read it again.
        d.route = Some(route.clone());
    }
    Some(v)
}

/// Errors a route lookup gives (no route; unreachable, prohibit routes), which an ICMP answer
/// gives too.
const ROUTE_ERRORS: [Errno; 3] = [Errno::ENETUNREACH, Errno::EHOSTUNREACH, Errno::EACCES];

/// Whether connection `c`, ended with `errno`, lost the route it had: its retransmissions
/// looked the route up again (`inet_sk_rebuild_header`, `inet6_sk_rebuild_header`) and this
/// host's routing table failed them with what `errno` says (ENETUNREACH: no route;
/// EHOSTUNREACH, EACCES: an unreachable or prohibit route). Such a lookup leaves the socket
/// without a cached route and zeroes its route capabilities; an ICMP answer gives the same
/// errnos but leaves both (`icmp_unreachable`). IPv4 is told by the cached route. IPv6 drops
/// a timed-out socket's cached route whatever the cause (`ip6_negative_advice`), so there the
/// capabilities tell. (The failed lookups themselves, `fib:fib_table_lookup`, name no
/// namespace for a connected socket: a forwarding namespace's lookups of the same 4-tuple
/// looked the same.)
pub(crate) fn route_lost(c: &Conn, errno: Errno) -> bool {
    let route = &c.route_at_close;
    let gone = if c.tuple.daddr.is_ipv4() {
        route.cached
    } else {
        route.caps
    };
    gone == Some(false) && ROUTE_ERRORS.contains(&errno)
}

/// Whether established connection `c` could have timed out because its route went while it
/// was idle: it ended with ETIMEDOUT, without a reset, and no route cached at its close. Its
/// next segment then found no route before it had an IP header (`__ip_queue_xmit`: `IP_OUTNOROUTES`), which
/// sets no soft error; nothing was in flight to retransmit, so the kernel probed and gave up
/// with ETIMEDOUT. Only the namespace's routing table can tell ([`route_gone`]): the engine
/// reads it for these connections alone.
pub(crate) fn may_have_lost_route_idle(c: &Conn) -> bool {
    c.established_ns().is_some()
        && c.errno().or(c.connect_errno) == Some(Errno::ETIMEDOUT)
        && c.rst_received.is_none()
        && c.route_at_close.cached == Some(false)
}

/// Whether `route` (the namespace's route to a connection's other end, read at its verdict)
/// gives no usable route: none at all, or an unreachable, prohibit or blackhole route.
pub(crate) fn route_gone(route: &Route) -> bool {
    matches!(
        route.kind,
        RouteKind::None | RouteKind::Unreachable | RouteKind::Prohibit | RouteKind::Blackhole
    )
}

/// Whether client socket `c` went SYN_SENT and back to CLOSE without ever getting a local
/// port, with nothing else seen: no SYN retransmitted, no error, no reset, no drop.
///
/// `tcp_v4_connect` (and `tcp_v6_connect`) moves the socket to SYN_SENT before
/// `inet_hash_connect` picks a local port, and back to CLOSE when that fails: EADDRNOTAVAIL
/// when every port of `ip_local_port_range` is taken towards the destination (or ENOMEM).
/// Every later failure (a route for the new ports, `tcp_connect`) and every ordinary end of a
/// handshake (refused, timed out, closed by the application) comes after the port was chosen,
/// and the state change then carries it.
pub(crate) fn never_got_a_port(c: &Conn) -> bool {
    c.side == Side::Client
        && c.tuple.sport == 0
        && c.closed()
            .is_some_and(|(_, from)| from == TcpState::SynSent)
        && c.syn_retransmits == 0
        && c.error == SocketError::None
        && c.rst_received.is_none()
        && c.drops.is_empty()
}

/// A client socket that went SYN_SENT and back to CLOSE without a local port: connect()
/// failed with `connect_errno` before any packet (EADDRNOTAVAIL: no free port). Where
/// `connect()`'s result is not traced (quiet mode without fexit) and the socket
/// [`never_got_a_port`], EADDRNOTAVAIL is inferred: `detail.errno_inferred`, and the
/// `kernel_reason` says what was seen instead of an errno.
pub(crate) fn closed_before_any_packet(c: &Conn) -> Option<Verdict> {
    let (at, _) = c.closed()?;
    let (errno, inferred) = match c.connect_errno {
        Some(errno) => (errno, false),
        None if never_got_a_port(c) => (Errno::EADDRNOTAVAIL, true),
        None => return None,
    };
    let mut v = super::base(c, at, Outcome::Failed, reason(errno), detail(false));
    v.kernel_reason = Some(if inferred {
        "closed in TCP_SYN_SENT without a local port".into()
    } else {
        errno.to_string()
    });
    v.errno = Some(errno);
    v.sport = None;
    if inferred && let Detail::Connect(d) = &mut v.detail {
        d.errno_inferred = Some(true);
    }
    Some(v)
}

/// Completes a connect() failure with the namespace's route and ports towards the destination;
/// a prohibit or blackhole route makes an EACCES or EINVAL a `no_route`.
pub(crate) fn complete(v: &mut Verdict, ns: &mut dyn NamespaceLookup) {
    let Detail::Connect(d) = &mut v.detail else {
        return;
    };
    match v.reason {
        Reason::EphemeralPortsExhausted => {
            if let Some(ports) = ns.ports_to(v.netns, SocketAddr::new(v.daddr, v.dport)) {
                d.port_range = Some(ports.range);
                d.sockets_to_destination = Some(ports.to_destination);
                d.time_wait = Some(ports.time_wait);
            }
        }
        Reason::NoRoute | Reason::ConnectDenied | Reason::Unknown => {
            // Read as the kernel answered (a route lookup's walk), else now.
            let Some(route) = d.route.take().or_else(|| ns.route_to(v.netns, v.daddr)) else {
                return;
            };
            let by_route = match (v.errno, route.kind) {
                // A cgroup program's refusal is its own, whatever the route.
                _ if d.refused_by_cgroup_program == Some(true) => false,
                (Some(Errno::EACCES), RouteKind::Prohibit) => true,
                (Some(Errno::EINVAL), RouteKind::Blackhole) => true,
                _ => v.reason == Reason::NoRoute,
            };
            if by_route {
                v.reason = Reason::NoRoute;
                d.route = Some(route);
            }
        }
        _ => {}
    }
}
