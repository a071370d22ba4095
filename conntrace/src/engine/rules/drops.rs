//! Kernel drops that explain a failure: `netfilter_drop`, `netfilter_reject` (the rule is a
//! REJECT), `conntrack_table_full` (a netfilter drop outside any rule while the table is full),
//! `rp_filter_drop`, `neighbour_failed`, and `kernel_drop` for every other reason (named from
//! BTF, so reasons a newer kernel adds flow through); a full accept queue's drop is
//! `listen_overflow` (`listener.rs`). Drops that are a normal part of TCP ([`NORMAL`]) explain
//! nothing and are only counted; any other drop that explains nothing is a `drop` record.

use conntrace_common::tcp::flags;

use super::{cookies, listener, ms, socketless};
use crate::engine::{
    facts::{DropReason, Errno, FourTuple, Meta, Proc, TcpFlags, TcpState},
    lookup::{FirewallRule, RuleAction, RuleFinding},
    state::{Attempt, Conn, HandshakeDrop, attempt::DropContext},
    verdict::{
        Detail, Direction, DropRecord, Outcome, Reason, Side, Verdict,
        detail::{DroppedKind, Policy, RuleRef},
    },
};

/// Drop reasons that are a normal part of TCP: a healthy connection has them (the peer's FIN
/// purged with the socket, ICMP errors purged from a closed socket's error queue, a window
/// probe, a retransmission of data already received). They are counted in the summary
/// (`drops_by_reason`) and printed only with `--show-normal-drops`.
pub const NORMAL: [&str; 3] = ["QUEUE_PURGE", "TCP_OLD_SEQUENCE", "TCP_OLD_DATA"];

/// Drops normal only where they happen, as (reason, location prefix, without a SYN): a segment
/// for a TIME_WAIT socket (a FIN or ACK that crossed the close) is freed with NOT_SPECIFIED in
/// `tcp_v4_rcv`/`tcp_v6_rcv`; a late FIN or ACK for a socket already closed, with TCP_FLAGS in
/// `tcp_v4_do_rcv`/`tcp_v6_do_rcv`; and kernels without QUEUE_PURGE (6.1) free the peer's FIN
/// purged with a closed socket with NOT_SPECIFIED in `sk_stream_kill_queues` (measured on
/// 6.1.0-57: one per orderly close), and any other queue they purge (a closed socket's error
/// queue, holding the ICMP error of a failed connect) with NOT_SPECIFIED in `skb_queue_purge`
/// (measured on 6.1.0-57 after `neighbour_failed`), where later kernels say QUEUE_PURGE; a FIN
/// that crosses the close and finds the socket already in CLOSE is TCP_CLOSE in
/// `tcp_rcv_state_process` (measured on 6.12 under emulation, where closes are slow: 1 in 25).
pub const NORMAL_AT: [(&str, &str); 7] = [
    ("NOT_SPECIFIED", "tcp_v4_rcv"),
    ("NOT_SPECIFIED", "tcp_v6_rcv"),
    ("NOT_SPECIFIED", "sk_stream_kill_queues"),
    ("NOT_SPECIFIED", "skb_queue_purge"),
    ("TCP_CLOSE", "tcp_rcv_state_process"),
    ("TCP_FLAGS", "tcp_v4_do_rcv"),
    ("TCP_FLAGS", "tcp_v6_do_rcv"),
];

/// Whether a drop is a normal part of TCP ([`NORMAL`], [`NORMAL_AT`]).
pub(crate) fn is_normal(reason: &DropReason, location: &str, tcp_flags: TcpFlags) -> bool {
    let at = |prefix: &str| {
        location
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('+'))
    };
    NORMAL.contains(&reason.as_str())
        || (!tcp_flags.has(flags::SYN)
            && NORMAL_AT
                .iter()
                .any(|(r, l)| reason.as_str() == *r && at(l)))
}

/// Whether a netfilter drop happened outside any rule's code: nft and iptables-nft rules drop
/// in `nft_do_chain`; conntrack (and iptables-legacy rules) make `nf_hook_slow` drop.
pub(crate) fn outside_rules(location: &str) -> bool {
    location.starts_with("nf_hook_slow")
}

/// The verdict reason a drop stands for, if it explains a failure.
pub(crate) fn cause(d: &HandshakeDrop) -> Option<Reason> {
    match d.reason.as_str() {
        DropReason::NETFILTER_DROP => Some(match d.context.as_deref() {
            Some(DropContext::ConntrackFull(_)) => Reason::ConntrackTableFull,
            _ => Reason::NetfilterDrop,
        }),
        DropReason::IP_RPFILTER => Some(Reason::RpFilterDrop),
        // This host's routing table had no route for the packet (`ip_queue_xmit`).
        DropReason::IP_OUTNOROUTES => Some(Reason::NoRoute),
        DropReason::NEIGH_FAILED => Some(Reason::NeighbourFailed),
        r if listener::is_overflow_drop(r, &d.location) => Some(Reason::ListenOverflow),
        // A SYN nobody listens for: the refusal (`handshake.rs`), not a drop.
        DropReason::NO_SOCKET => None,
        _ if is_normal(&d.reason, &d.location, d.tcp_flags) => None,
        _ => Some(Reason::KernelDrop),
    }
}

/// What a drop with no connection on this host is worth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Explains {
    /// It explains a failed attempt: gathered per attempt into one verdict.
    Attempt,
    /// It explains nothing alone: a `drop` record.
    Record,
    /// A normal part of TCP: only counted.
    Nothing,
}

/// What drop `d` is worth without a connection (`attempt`: an attempt for its tuple exists;
/// `socket`: the state of the packet's socket, when it had one). Only a handshake's own
/// packets open an attempt: a SYN or SYN-ACK, or, for the drops that always meant a failed
/// handshake here (a firewall, a full queue, a dead neighbour), any; never a packet whose
/// socket is past its handshake (a TIME_WAIT socket's).
pub(crate) fn explains(d: &HandshakeDrop, attempt: bool, socket: Option<TcpState>) -> Explains {
    let Some(reason) = cause(d) else {
        return if is_normal(&d.reason, &d.location, d.tcp_flags) {
            Explains::Nothing
        } else {
            Explains::Record
        };
    };
    let classic = matches!(
        reason,
        Reason::NetfilterDrop | Reason::ListenOverflow | Reason::NeighbourFailed
    ) || d.context.is_some();
    if socket.is_some_and(TcpState::past_handshake) {
        Explains::Record
    } else if attempt || classic || d.tcp_flags.has(flags::SYN) {
        Explains::Attempt
    } else {
        Explains::Record
    }
}

/// `detail.drops`: the handshake's drops, by kind.
pub(crate) fn kinds(drops: &[HandshakeDrop]) -> Vec<DroppedKind> {
    drops.iter().map(kind).collect()
}

/// One drop as a verdict lists it (a `detail.drops` entry).
pub(crate) fn kind(d: &HandshakeDrop) -> DroppedKind {
    DroppedKind {
        kernel_reason: d.reason.clone(),
        direction: d.direction,
        tcp_flags: d.tcp_flags,
        count: d.count,
        location: d.location.clone(),
        hook: d.hook,
    }
}

/// Whether a handshake that failed with `errno` failed in silence: a timeout or the local
/// stack's own unreachable, which a drop on the way may explain.
pub(crate) fn silent_errno(errno: Errno) -> bool {
    matches!(
        errno,
        Errno::ETIMEDOUT | Errno::EHOSTUNREACH | Errno::ENETUNREACH
    )
}

/// Whether the handshake of `c` failed in silence (no answer, or the local stack's own
/// unreachable), so that a drop on the way is the cause; or, with no RST received, this host
/// dropped its own outgoing handshake packets, which is the cause whatever ICMP answered (a
/// local REJECT's answer is the consequence).
pub(crate) fn explains_silence(c: &Conn, v: &Verdict) -> bool {
    if c.established_ns().is_some() {
        return false;
    }
    let own = c
        .drops
        .iter()
        .any(|d| d.direction == Direction::Out && cause(d).is_some());
    let silent = matches!(v.reason, Reason::SynTimeout | Reason::Unknown)
        || (v.reason == Reason::IcmpUnreachable && v.errno == Some(Errno::EHOSTUNREACH));
    c.rst_received.is_none() && (own || silent)
}

/// How long before an established connection's end a drop can still explain it: twice the
/// longest retransmission interval (`TCP_RTO_MAX`, 120 s), longer than keepalive's 75 s. A
/// drop from earlier in its life was recovered from.
const END_DROPS_WITHIN_NS: u64 = 240_000_000_000;

/// How soon after a netfilter drop a RST is that rule's answer where the rule is unknown: a
/// REJECT answers the packet it drops at once; a peer's own abort comes whenever it comes.
const RST_AFTER_REJECT_NS: u64 = 20_000_000;

/// What the rule found for a netfilter drop did with the packet.
#[derive(PartialEq)]
enum RuleKind {
    /// A DROP rule or a drop policy: nothing answered.
    Dropped,
    /// A REJECT rule: it answered.
    Rejected,
    /// Not named (no counters, several kinds, not looked up).
    Unknown,
}

fn rule_kind(d: &HandshakeDrop) -> RuleKind {
    let kind = |r: &FirewallRule| match r.action {
        RuleAction::Drop => RuleKind::Dropped,
        RuleAction::Reject { .. } => RuleKind::Rejected,
    };
    match d.context.as_deref() {
        Some(DropContext::Rule(RuleFinding::Rule { rule, .. })) => kind(rule),
        Some(DropContext::Rule(RuleFinding::Candidates { rules, .. })) => {
            let mut kinds = rules.iter().map(kind);
            let first = kinds.next().unwrap_or(RuleKind::Unknown);
            if kinds.all(|k| k == first) {
                first
            } else {
                RuleKind::Unknown
            }
        }
        Some(DropContext::Rule(RuleFinding::Policy { .. })) => RuleKind::Dropped,
        _ => RuleKind::Unknown,
    }
}

/// Whether `drops` (an established connection's, at either end) explain how it ended at
/// `v.ts_ns`: a silent death or an ICMP answer after drops that explain a failure (only drops
/// of its last [`END_DROPS_WITHIN_NS`] count), or a RST that a netfilter drop's REJECT sent:
/// the rule is a REJECT, or, unnamed, the drop came just before the RST
/// ([`RST_AFTER_REJECT_NS`]).
pub(crate) fn explains_end(v: &Verdict, drops: &[HandshakeDrop]) -> bool {
    let within = |d: &&HandshakeDrop, ns: u64| d.last_ns.saturating_add(ns) >= v.ts_ns;
    let mut recent = drops.iter().filter(|d| within(d, END_DROPS_WITHIN_NS));
    match v.reason {
        Reason::Timeout | Reason::Unknown | Reason::IcmpUnreachable => {
            recent.any(|d| cause(d).is_some())
        }
        Reason::ResetByPeer => recent.any(|d| {
            d.reason == DropReason::NETFILTER_DROP
                && match rule_kind(d) {
                    RuleKind::Rejected => true,
                    RuleKind::Dropped => false,
                    RuleKind::Unknown => within(&d, RST_AFTER_REJECT_NS),
                }
        }),
        _ => false,
    }
}

/// Names the drop that explains an established connection's end ([`explains_end`]). A RST it
/// explains is a REJECT's answer, `netfilter_reject` even where the rule could not be named;
/// an ICMP answer is a REJECT's where the rule is one (then `detail.icmp` stays).
pub(crate) fn explain_end(v: &mut Verdict, drops: &[HandshakeDrop]) {
    let reset = v.reason == Reason::ResetByPeer;
    let icmp = match &v.detail {
        Detail::Closed(d) => d.icmp,
        _ => None,
    };
    explain(v, drops);
    if reset && v.reason == Reason::NetfilterDrop {
        v.reason = Reason::NetfilterReject;
    }
    if v.reason == Reason::NetfilterReject
        && let Detail::Closed(d) = &mut v.detail
    {
        // The ICMP answer came from the rule, wherever it is.
        d.icmp = icmp;
    }
}

/// Names the drops of a client's handshake at its other end (`netns`) in its verdict's
/// detail: its SYNs dropped there (a `syn_timeout`), or its final ACK, so that the server
/// never had the connection to greet it (a stall). The reason stays (it is what the client
/// sees); the drops say why. Nothing for drops that explain nothing.
pub(crate) fn describe_peer(v: &mut Verdict, netns: Option<u32>, drops: &[HandshakeDrop]) {
    if !drops.iter().any(|d| cause(d).is_some()) {
        return;
    }
    name_drops(v, drops, false);
    if let Some(facts) = v.detail.drop_facts_mut() {
        facts.peer_netns = netns;
    }
}

/// A client refused by a RST (`refused_no_listener`) whose SYN the other end, in another
/// namespace of this host (`netns`), dropped in netfilter: the SYN never reached a socket
/// there, so the RST was the REJECT rule's (`--reject-with tcp-reset`), not a closed port's.
/// `netfilter_reject`, naming that end's rule; the errno stays. Nothing otherwise.
pub(crate) fn refused_by_peer_rule(v: &mut Verdict, netns: Option<u32>, drops: &[HandshakeDrop]) {
    let syn_dropped = |d: &HandshakeDrop| {
        d.reason.as_str() == DropReason::NETFILTER_DROP
            && d.direction == Direction::In
            && d.tcp_flags.has(flags::SYN)
            && !d.tcp_flags.has(flags::ACK)
    };
    let dropped: Vec<HandshakeDrop> = drops.iter().filter(|d| syn_dropped(d)).cloned().collect();
    if v.reason != Reason::RefusedNoListener || v.side != Side::Client || dropped.is_empty() {
        return;
    }
    let kernel_reason = v.kernel_reason.clone();
    name_drops(v, &dropped, true);
    if v.reason == Reason::NetfilterDrop {
        // A RST answered it: the rule rejected, even where it could not be named.
        v.reason = Reason::NetfilterReject;
    }
    v.kernel_reason = kernel_reason;
    if let Some(facts) = v.detail.drop_facts_mut() {
        facts.peer_netns = netns;
    }
}

/// A client refused by a RST (`refused_no_listener`) whose SYN a namespace forwarding it on
/// this host dropped in netfilter (`detail.path_drops`): the SYN never reached the server, so
/// the RST was that router's REJECT (`--reject-with tcp-reset`, e.g. kube-proxy's for a
/// Service without endpoints). `netfilter_reject`; the errno stays.
pub(crate) fn refused_on_path(v: &mut Verdict) {
    if v.reason != Reason::RefusedNoListener || v.side != Side::Client {
        return;
    }
    let Some(facts) = v.detail.drop_facts_mut() else {
        return;
    };
    let rejected = facts.path_drops.iter().any(|p| {
        p.kernel_reason.as_str() == DropReason::NETFILTER_DROP && p.tcp_flags.has(flags::SYN)
    });
    if rejected {
        facts.reject_with = Some("tcp-reset".into());
        v.reason = Reason::NetfilterReject;
    }
}

/// Names the drop that explains a failed handshake as the verdict's reason, and lists all of
/// its drops in `detail.drops`. The most frequent explaining drop wins.
pub(crate) fn explain(v: &mut Verdict, drops: &[HandshakeDrop]) {
    name_drops(v, drops, true);
}

/// Lists `drops` in the verdict's detail and names the explaining one (hook, count, rule),
/// making its cause the verdict's reason when `as_reason`.
fn name_drops(v: &mut Verdict, drops: &[HandshakeDrop], as_reason: bool) {
    if drops.is_empty() {
        return;
    }
    if let Some(facts) = v.detail.drop_facts_mut() {
        facts.drops = kinds(drops);
    }
    let explaining = drops
        .iter()
        .filter_map(|d| cause(d).map(|r| (r, d)))
        .max_by_key(|(_, d)| d.count);
    let Some((reason, d)) = explaining else {
        return;
    };
    if as_reason {
        v.outcome = Outcome::Failed;
        v.reason = reason;
        v.kernel_reason = Some(d.reason.to_string());
        if let Detail::Closed(closed) = &mut v.detail
            && matches!(reason, Reason::NeighbourFailed | Reason::NetfilterDrop)
        {
            // The unreachable came from this host's own stack, not from the network.
            closed.icmp = None;
            closed.unanswered_syns = None;
        }
    }
    if let Some(facts) = v.detail.drop_facts_mut() {
        facts.hook = d.hook;
        facts.dropped = Some(d.count);
        if matches!(
            reason,
            Reason::KernelDrop | Reason::ConntrackTableFull | Reason::RpFilterDrop
        ) {
            facts.location = Some(d.location.clone());
        }
        match d.context.as_deref() {
            Some(DropContext::ConntrackFull(ct)) => facts.conntrack = Some(*ct),
            Some(DropContext::RpFilter(rp)) => facts.rp_filter = Some(rp.clone()),
            _ => {}
        }
    }
    if let Some(DropContext::Rule(finding)) = d.context.as_deref() {
        apply_rule(v, finding.clone());
    }
    if as_reason && v.side == Side::Server {
        // The SYNs the client sent for this attempt, less the first.
        let syns: u32 = drops
            .iter()
            .filter(|d| d.direction == Direction::In && d.tcp_flags.has(flags::SYN))
            .map(|d| d.count)
            .sum();
        v.syn_retransmits = v.syn_retransmits.max(syns.saturating_sub(1));
    }
}

/// Names the firewall rule behind a netfilter drop. A REJECT rule makes the verdict
/// `netfilter_reject`: the kernel dropped the SYN and answered it.
pub(crate) fn apply_rule(v: &mut Verdict, finding: RuleFinding) {
    let reject_with = |rules: &[&FirewallRule]| -> Option<String> {
        let mut withs = rules.iter().map(|r| match &r.action {
            RuleAction::Reject { with } => Some(with.clone()),
            RuleAction::Drop => None,
        });
        let first = withs.next()??;
        withs
            .all(|w| w.as_deref() == Some(first.as_str()))
            .then_some(first)
    };
    let Some(facts) = v.detail.drop_facts_mut() else {
        return;
    };
    let rejected = match finding {
        RuleFinding::Rule { rule, confidence } => {
            let with = reject_with(&[&rule]);
            facts.rule = Some(RuleRef::Rule(rule));
            facts.rule_confidence = Some(confidence);
            with
        }
        RuleFinding::Candidates { rules, confidence } => {
            let with = reject_with(&rules.iter().collect::<Vec<_>>());
            facts.rule_candidates = Some(rules);
            facts.rule_confidence = Some(confidence);
            with
        }
        RuleFinding::Policy {
            family,
            table,
            chain,
        } => {
            facts.rule = Some(RuleRef::Policy {
                family,
                table,
                chain,
                policy: Policy::Drop,
            });
            None
        }
        RuleFinding::NotFound { why } => {
            facts.rule_not_found = Some(why);
            None
        }
    };
    if let Some(with) = rejected {
        facts.reject_with = Some(with);
        // A REJECT answered: for a dropped handshake that is the verdict itself; for others
        // (a lost cookie ACK) a fact about the drop.
        if v.reason == Reason::NetfilterDrop {
            v.reason = Reason::NetfilterReject;
        }
    }
}

/// Which side of the connection this host is, from the dropped segments: a SYN coming in or a
/// SYN-ACK going out is a server's; the rest is a client's.
fn attempt_side(drops: &[HandshakeDrop]) -> Side {
    let server = drops.iter().any(|d| match d.direction {
        Direction::In => !d.tcp_flags.has(flags::SYN) || !d.tcp_flags.has(flags::ACK),
        Direction::Out => d.tcp_flags.is_syn_ack(),
        Direction::Forward => false,
    });
    if server { Side::Server } else { Side::Client }
}

/// The verdict of an attempt that ended without a connection on this host.
pub(crate) fn attempt_verdict(a: &Attempt) -> Verdict {
    let detail = Detail::Attempt(Box::default());
    let mut v = socketless(&a.meta, a.tuple, attempt_side(&a.drops), detail);
    v.duration_ms = ms(a.first_ns(), a.last_ns());
    v.ts_ns = a.last_ns();
    if let Some(p) = &a.proc {
        v.pid = Some(p.pid);
        v.comm = Some(p.comm.to_string());
    }
    explain(&mut v, &a.drops);
    if let Some(c) = a.cookies {
        cookies::ack_lost(&mut v, c);
    }
    v
}

/// Completes a drop verdict with what the namespace tells at the verdict (the drop's context
/// was taken at its first packet): the reverse-path filter's counter now, so it covers every
/// packet of the attempt; a failed neighbour resolution's next hop.
pub(crate) fn complete(v: &mut Verdict, ns: &mut dyn crate::engine::lookup::NamespaceLookup) {
    if v.reason == Reason::NeighbourFailed {
        // Resolution fails for the next hop: through a gateway, that router's address.
        let gateway = ns.route_to(v.netns, v.daddr).and_then(|r| r.gateway);
        if let Some(gw) = gateway.filter(|&gw| gw != v.daddr)
            && let Some(facts) = v.detail.drop_facts_mut()
        {
            facts.next_hop = Some(gw);
        }
        return;
    }
    if v.reason != Reason::RpFilterDrop {
        return;
    }
    let netns = v.netns;
    if let Some(rp) = v.detail.drop_facts_mut().and_then(|d| d.rp_filter.as_mut())
        && let Some(now) = ns.tcp_ext(netns, "IPReversePathFilter")
    {
        rp.counter = Some(now);
    }
}

/// A forwarded packet's drop as it travelled: `s` is its source.
pub(crate) fn forwarded_record(
    meta: &Meta,
    packet: FourTuple,
    d: &crate::engine::facts::DroppedPacket,
) -> DropRecord {
    DropRecord {
        ts_ns: meta.ts_ns,
        direction: Direction::Forward,
        kernel_reason: d.reason.clone(),
        location: d.location.clone(),
        tcp_flags: d.tcp_flags,
        saddr: packet.saddr,
        sport: packet.sport,
        daddr: packet.daddr,
        dport: packet.dport,
        netns: meta.netns,
        pid: None,
        comm: None,
        container: None,
    }
}

/// A dropped packet as this host sees it: `s` is this host's end.
pub(crate) fn record(
    meta: &Meta,
    packet: FourTuple,
    outgoing: bool,
    proc: Option<Proc>,
    (reason, location, tcp_flags): (DropReason, String, TcpFlags),
) -> DropRecord {
    let (direction, local) = if outgoing {
        (Direction::Out, packet)
    } else {
        (Direction::In, packet.reversed())
    };
    DropRecord {
        ts_ns: meta.ts_ns,
        direction,
        kernel_reason: reason,
        location,
        tcp_flags,
        saddr: local.saddr,
        sport: local.sport,
        daddr: local.daddr,
        dport: local.dport,
        netns: meta.netns,
        pid: proc.as_ref().map(|p| p.pid),
        comm: proc.map(|p| p.comm.to_string()),
        container: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_drops_by_reason_or_by_where_they_happen() {
        let fin_ack = TcpFlags(flags::FIN | flags::ACK);
        let normal = |reason: &str, at: &str, f| is_normal(&DropReason::new(reason), at, f);
        assert!(normal("QUEUE_PURGE", "sk_stream_kill_queues+0x58", fin_ack));
        // 6.1 has no QUEUE_PURGE: the same purge is NOT_SPECIFIED there.
        assert!(normal(
            "NOT_SPECIFIED",
            "sk_stream_kill_queues+0x58",
            fin_ack
        ));
        assert!(normal("NOT_SPECIFIED", "tcp_v4_rcv+0x81", fin_ack));
        assert!(normal("TCP_CLOSE", "tcp_rcv_state_process+0xf7", fin_ack));
        // Not at a normal place, or a SYN: a failure's drop.
        assert!(!normal(
            "NOT_SPECIFIED",
            "ip_rcv_finish_core+0x25b",
            fin_ack
        ));
        assert!(!normal(
            "NOT_SPECIFIED",
            "sk_stream_kill_queues_other+0x8",
            fin_ack
        ));
        assert!(!normal(
            "NOT_SPECIFIED",
            "tcp_v4_rcv+0x81",
            TcpFlags(flags::SYN)
        ));
        assert!(!normal("NETFILTER_DROP", "nft_do_chain+0x3e8", fin_ack));
    }
}
