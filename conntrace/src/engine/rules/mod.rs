//! Every reason's rule, one file per family of reasons; `REASONS` (`verdict::reason`) names the
//! file that decides each. Rules are pure functions of the engine's facts (`state`): they read
//! a connection or an attempt and return its verdict; they never touch the table.
//!
//! * `established.rs`: `established`, `unexpected_listener`.
//! * `connect.rs`: connect() failures before any packet (`no_route`,
//!   `ephemeral_ports_exhausted`, `connect_denied`).
//! * `handshake.rs`: failed handshakes without a drop that explains them (`refused_no_listener`,
//!   `syn_timeout`, `icmp_unreachable`, `unknown`).
//! * `teardown.rs`: established connections that end badly (`reset_by_peer`, `timeout`,
//!   `socket_destroyed`).
//! * `drops.rs`: the kernel drops that explain a failure (`netfilter_drop`, `netfilter_reject`,
//!   `conntrack_table_full`, `rp_filter_drop`, `neighbour_failed`, `kernel_drop`), and `drop`
//!   records for the rest.
//! * `path.rs`: `pmtu_blackhole`.
//! * `listener.rs`: the listener's view (`listen_overflow`, `refused_bound_elsewhere`).
//! * `cookies.rs`: `syncookie_ack_lost`.
//! * `stalls.rs`: `stalled_no_greeting`, `stalled_no_response`, `not_accepted`, `zero_window`.

pub mod connect;
pub mod cookies;
pub mod drops;
pub mod established;
pub mod handshake;
pub mod listener;
pub mod path;
pub mod stalls;
pub mod teardown;

use super::{
    config::EngineConfig,
    facts::{Errno, FourTuple, Meta},
    lookup::Route,
    state::{Conn, HandshakeDrop},
    verdict::{Detail, Outcome, Reason, Side, Verdict, detail::PathDrop},
};

/// Milliseconds from `from_ns` to `to_ns`, to the microsecond.
pub fn ms(from_ns: u64, to_ns: u64) -> f64 {
    (to_ns.saturating_sub(from_ns) / 1_000) as f64 / 1_000.0
}

/// A verdict about connection `c` at `ts_ns`, with what every verdict carries.
pub(super) fn base(
    c: &Conn,
    ts_ns: u64,
    outcome: Outcome,
    reason: Reason,
    detail: Detail,
) -> Verdict {
    Verdict {
        ts_ns,
        sk: Some(c.sk),
        side: c.side,
        outcome,
        reason,
        kernel_reason: None,
        errno: c.errno().or(c.connect_errno),
        saddr: Some(c.tuple.saddr),
        sport: (c.tuple.sport != 0).then_some(c.tuple.sport),
        daddr: c.tuple.daddr,
        dport: c.tuple.dport,
        netns: c.netns,
        pid: c.proc.as_ref().map(|p| p.pid),
        comm: c.proc.as_ref().map(|p| p.comm.to_string()),
        container: None,
        duration_ms: ms(c.started_ns, ts_ns),
        syn_retransmits: c.syn_retransmits,
        detail,
    }
}

/// A failed verdict without a socket on this host (a refused or dropped SYN, a failed
/// `connect()`): `tuple` is s = this host.
pub(super) fn socketless(meta: &Meta, tuple: FourTuple, side: Side, detail: Detail) -> Verdict {
    Verdict {
        ts_ns: meta.ts_ns,
        sk: None,
        side,
        outcome: Outcome::Failed,
        reason: Reason::Unknown,
        kernel_reason: None,
        errno: None,
        saddr: (!tuple.saddr.is_unspecified()).then_some(tuple.saddr),
        sport: (tuple.sport != 0).then_some(tuple.sport),
        daddr: tuple.daddr,
        dport: tuple.dport,
        netns: meta.netns,
        pid: None,
        comm: None,
        container: None,
        duration_ms: 0.0,
        syn_retransmits: 0,
        detail,
    }
}

/// The ICMP errors an errno stands for, where an ICMP error set it: `detail.icmp`.
pub(super) fn icmp_of(e: Errno) -> &'static str {
    match e {
        Errno::ECONNREFUSED => "port-unreachable",
        Errno::ENETUNREACH => "net-unreachable or net-prohibited",
        Errno::EHOSTUNREACH => "host-unreachable, host-prohibited or admin-prohibited",
        _ => "prohibited",
    }
}

/// Drops of a connection's packets at its other end, in another namespace of this host
/// (conntrace traces both ends there): that end's connection's `late_drops`, or the drops
/// kept for its tuple while it was not followed.
pub(crate) struct PeerDrops<'a> {
    pub netns: Option<u32>,
    pub drops: &'a [HandshakeDrop],
}

/// The verdict of a connection that reached CLOSE, or `None` for an orderly end: its
/// handshake's failure or its end's, then the drop that explains a silent failure. An
/// established connection's end is explained by its own late drops, else by its peer's
/// (`peer`), else by its retransmissions (`pmtu_blackhole`, with `path_drops`: its packets'
/// drops in namespaces of this host that forward them). `route_now`: its namespace's route
/// to the other end, where `connect::may_have_lost_route_idle` asked for it.
pub(super) fn closed(
    c: &Conn,
    peer: Option<PeerDrops>,
    (route_now, path_drops): (Option<&Route>, &[PathDrop]),
    cfg: &EngineConfig,
) -> Option<Verdict> {
    if c.established_ns().is_some() {
        let mut v = teardown::ended(c, route_now)?;
        path::note_retransmits(c, &mut v);
        if drops::explains_end(&v, &c.late_drops) {
            drops::explain_end(&mut v, &c.late_drops);
        } else if let Some(p) = peer.filter(|p| drops::explains_end(&v, p.drops)) {
            drops::explain_end(&mut v, p.drops);
            if let Some(facts) = v.detail.drop_facts_mut() {
                facts.peer_netns = p.netns;
            }
        } else {
            path::explain(c, &mut v, path_drops);
        }
        return Some(v);
    }
    let mut v = handshake::failed(c, cfg)?;
    if drops::explains_silence(c, &v) {
        drops::explain(&mut v, &c.drops);
    } else if let Some(facts) = v.detail.drop_facts_mut() {
        facts.drops = drops::kinds(&c.drops);
    }
    path::note_answers_dropped(c, &mut v);
    Some(v)
}
