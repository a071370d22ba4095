//! `pmtu_blackhole`: an established connection that died while full-size segments were
//! retransmitted, never acknowledged: a hop with a smaller MTU drops them, and its
//! "fragmentation needed" never reaches this host (or this host drops it). Either every
//! retransmitted segment was full-size, or short ones got through meanwhile: the peer SACKed
//! later data (a request's short tail, sent again as a tail loss probe) while the full-size
//! ones before it stayed unacknowledged. A peer that is gone SACKs nothing; but when every
//! segment in flight is full-size (a request or answer larger than the congestion window),
//! a peer that went away retransmits only full-size ones too. Where conntrace sees the path
//! (a forwarding namespace of this host), its drops decide: a drop of this connection for
//! another cause there (a failed neighbour, a FORWARD rule), and none for its size
//! (`PKT_TOO_BIG`), nor a "fragmentation needed" seen here, nor later data SACKed, keeps it
//! a `timeout`.
//!
//! Also the other answers from the path that this host dropped: a failed handshake's ICMP
//! errors (`detail.answer_dropped`).

use super::drops;
use crate::engine::{
    facts::DropReason,
    state::{Conn, DropContext, HandshakeDrop},
    verdict::{
        Detail, Reason, Verdict,
        detail::{AnswerDropped, PathAnswer, PathDrop, RuleRef},
    },
};

/// Fewest retransmissions that make a black hole: one lost full-size segment is no pattern.
const MIN_RETRANSMITS: u32 = 2;
/// Without a known MSS, the smallest retransmitted segment that counts as full-size: above
/// any MTU a tunnel or a PPPoE link leaves (1400) less headers.
const FULL_SIZE_BYTES: u32 = 1200;

/// `detail.retransmits`: an established connection's data retransmissions, if any.
pub(crate) fn note_retransmits(c: &Conn, v: &mut Verdict) {
    if let (Some(r), Detail::Closed(d)) = (c.retransmits, &mut v.detail) {
        d.retransmits = Some(r);
    }
}

/// Makes a connection's `timeout` a `pmtu_blackhole` when its retransmissions say so, and
/// completes it with the path's answer. `path_drops`: the drops of its packets in namespaces
/// of this host that forward them. Returns whether it did.
pub(crate) fn explain(c: &Conn, v: &mut Verdict, path_drops: &[PathDrop]) -> bool {
    let Some(r) = c.retransmits else {
        return false;
    };
    let full = r.mss.unwrap_or(FULL_SIZE_BYTES);
    let sacked = r.sacked_out.is_some_and(|n| n > 0);
    let full_size = if sacked {
        r.largest_bytes >= full
    } else {
        r.smallest_bytes >= full
    };
    if v.reason != Reason::Timeout || r.count < MIN_RETRANSMITS || !full_size {
        return false;
    }
    let too_big = |p: &PathDrop| p.kernel_reason.as_str() == DropReason::PKT_TOO_BIG;
    let path_says_size = path_drops.iter().any(too_big) || c.too_big.is_some() || sacked;
    if !path_drops.is_empty() && !path_says_size {
        // The path dropped its packets for another cause: a peer or a route that went.
        return false;
    }
    v.reason = Reason::PmtuBlackhole;
    if let Detail::Closed(d) = &mut v.detail {
        d.path_answer = c.too_big.as_ref().map(|(icmp, dropped)| PathAnswer {
            mtu: icmp.mtu,
            dropped: dropped.as_ref().map(drops::kind),
            rule: dropped.as_ref().and_then(rule_of_drop),
        });
    }
    true
}

/// `detail.answer_dropped` of a failed handshake whose ICMP answers this host dropped before
/// TCP saw them (its own firewall's INPUT dropping ICMP, say): why it waited for an answer
/// that had come. Not for one refused by a RST, which did get its answer.
pub(crate) fn note_answers_dropped(c: &Conn, v: &mut Verdict) {
    let (Some((icmp, drops)), Detail::Closed(d)) = (&c.answers_dropped, &mut v.detail) else {
        return;
    };
    if c.rst_received.is_some() {
        return;
    }
    // The drop that happened most, and the rule it names.
    let Some(most) = drops.iter().max_by_key(|d| d.count) else {
        return;
    };
    d.answer_dropped = Some(AnswerDropped {
        icmp: icmp.name(c.tuple.daddr.is_ipv6()),
        dropped: drops::kind(most),
        rule: rule_of_drop(most),
    });
}

/// The rule (or policy) that a netfilter drop's look-up named, if one.
fn rule_of_drop(hs: &HandshakeDrop) -> Option<RuleRef> {
    match hs.context.as_deref() {
        Some(DropContext::Rule(finding)) => rule_of(finding),
        _ => None,
    }
}

/// The one rule (or policy) a finding names.
fn rule_of(finding: &crate::engine::lookup::RuleFinding) -> Option<RuleRef> {
    use crate::engine::{lookup::RuleFinding, verdict::detail::Policy};
    match finding {
        RuleFinding::Rule { rule, .. } => Some(RuleRef::Rule(rule.clone())),
        RuleFinding::Policy {
            family,
            table,
            chain,
        } => Some(RuleRef::Policy {
            family: family.clone(),
            table: table.clone(),
            chain: chain.clone(),
            policy: Policy::Drop,
        }),
        RuleFinding::Candidates { .. } | RuleFinding::NotFound { .. } => None,
    }
}
