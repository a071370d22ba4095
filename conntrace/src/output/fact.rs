//! The one fact that matters for a verdict's reason, for the compact human line: the rule
//! that dropped, the errno and how long, the queue, the window, the MTU.

use crate::engine::{
    facts::NfHook,
    is_cookie_check,
    verdict::{
        Detail, Outcome, Reason, Verdict,
        detail::{CloseKind, EndedBy, Reader, RuleRef},
    },
};

fn ms(v: f64) -> String {
    format!("{v:.0} ms")
}

/// Where a netfilter drop happened and which rule did it: ``INPUT `tcp dport 3306 drop```,
/// with ``at peer netns N`` when that was at the connection's other end.
fn rule(v: &Verdict) -> Option<String> {
    let d = v.detail.drop_facts()?;
    let hook = d.hook?;
    let at = d
        .peer_netns
        .map(|n| format!(" at peer netns {n}"))
        .unwrap_or_default();
    let rule = match (&d.rule, &d.rule_candidates) {
        (Some(RuleRef::Rule(r)), _) => format!("`{}`", r.text),
        (Some(RuleRef::Policy { chain, .. }), _) => format!("policy drop of {chain}"),
        (None, Some(rs)) => format!("one of {} rules", rs.len()),
        (None, None) if d.rule_not_found.is_some() => "rule not found".to_owned(),
        (None, None) => return Some(format!("{}{at}", hook.chain_name())),
    };
    let with = d
        .reject_with
        .as_deref()
        .map(|w| format!(" with {w}"))
        .unwrap_or_default();
    Some(format!("{hook} {rule}{with}{at}"))
}

fn queue(v: &Verdict) -> Option<String> {
    let q = v.detail.queue()?;
    Some(format!("accept queue {}/{}", q.accept_queue?, q.backlog?))
}

fn ended(by: EndedBy) -> &'static str {
    match by {
        EndedBy::Failure(reason) => reason.code(),
        EndedBy::Close(CloseKind::Orderly) => "orderly close",
        EndedBy::Close(CloseKind::Close) => "close",
    }
}

/// A stall's fact: how long, and (`not_accepted`) the queue, (`zero_window`) who stopped
/// reading, (a client's) the rule that dropped its handshake at the other end.
fn stall(v: &Verdict, d: &crate::engine::verdict::detail::StallDetail) -> String {
    let mut extra = queue(v).map(|q| format!(", {q}")).unwrap_or_default();
    if let Some(r) = rule(v) {
        extra.push_str(&format!(", {r}"));
    }
    if let Some(w) = d.window {
        let who = match w.stopped_reading {
            Reader::Peer => "peer",
            Reader::Local => "local process",
        };
        extra.push_str(&format!(
            ", {who} stopped reading, {} B queued",
            w.queued_bytes
        ));
    }
    match (d.waited_ms, d.stuck_ms, d.ended_by) {
        (Some(w), _, _) => format!("stuck {}{extra}", ms(w)),
        (None, Some(s), Some(by)) => format!("failed after {} stuck: {}", ms(s), ended(by)),
        (None, Some(s), None) => format!(
            "resolved after {}: {}",
            ms(s),
            v.kernel_reason.as_deref().unwrap_or_default()
        ),
        (None, None, _) => v.kernel_reason.clone().unwrap_or_default(),
    }
}

/// The drop families' fact: the rule, the table, the interfaces, the reason and place.
fn dropped(v: &Verdict) -> String {
    let kernel = v.kernel_reason.clone().unwrap_or_default();
    let Some(d) = v.detail.drop_facts() else {
        return kernel;
    };
    match v.reason {
        Reason::ConntrackTableFull => match d.conntrack {
            Some(ct) => format!("conntrack table full: {}/{}", ct.count, ct.max),
            None => kernel,
        },
        Reason::RpFilterDrop => match &d.rp_filter {
            Some(rp) => format!(
                "IP_RPFILTER: in on {}, route back via {}",
                rp.arrived_on.as_deref().unwrap_or("?"),
                rp.route_back_via.as_deref().unwrap_or("?")
            ),
            None => kernel,
        },
        Reason::SyncookieAckLost => {
            let overflow = d.drops.iter().find(|k| is_cookie_check(&k.location));
            match (rule(v), overflow, d.drops.first()) {
                (Some(rule), ..) => format!("cookie sent, no socket; ACK dropped at {rule}"),
                (None, Some(k), _) => format!(
                    "cookie validated, no socket: accept queue full ({} at {}, {}x)",
                    k.kernel_reason, k.location, k.count
                ),
                (None, None, Some(k)) => format!(
                    "cookie sent, no socket; ACK dropped: {} at {}",
                    k.kernel_reason, k.location
                ),
                (None, None, None) => "cookie sent, no socket; no ACK seen".to_owned(),
            }
        }
        Reason::NetfilterDrop | Reason::NetfilterReject => rule(v).unwrap_or(kernel),
        _ => format!(
            "{kernel}{}",
            d.location
                .as_deref()
                .map(|l| format!(" at {l}"))
                .unwrap_or_default()
        ),
    }
}

/// `pmtu_blackhole`: the retransmitted size and the path's answer.
fn blackhole(v: &Verdict) -> String {
    let Detail::Closed(d) = &v.detail else {
        return String::new();
    };
    let mut out = match d.retransmits {
        Some(r) => format!("{} full-size ({} B) retransmits", r.count, r.largest_bytes),
        None => String::new(),
    };
    match &d.path_answer {
        Some(a) => out.push_str(&format!(
            ", path MTU {}{}",
            a.mtu.map_or_else(|| "?".to_owned(), |m| m.to_string()),
            a.dropped
                .as_ref()
                .and_then(|x| x.hook)
                .map(|h| format!(" dropped at {}", NfHook::chain_name(h)))
                .unwrap_or_default()
        )),
        None => out.push_str(", no ICMP came back"),
    }
    out
}

/// connect() before any packet: the errno, and the ports or route.
fn connect(v: &Verdict, errno: String) -> String {
    if let Detail::Closed(d) = &v.detail {
        return if d.route_lost == Some(true) {
            format!("{errno}: its route went away")
        } else {
            errno
        };
    }
    let Detail::Connect(d) = &v.detail else {
        return errno;
    };
    match (d.port_range, d.time_wait, &d.route) {
        (Some([a, b]), tw, _) => format!(
            "{errno}: ports {a}-{b} taken{}",
            tw.map(|n| format!(" ({n} TIME_WAIT)")).unwrap_or_default()
        ),
        (_, _, Some(r)) => format!(
            "{errno}, route {}",
            serde_json::to_value(r.kind)
                .ok()
                .and_then(|k| k.as_str().map(str::to_owned))
                .unwrap_or_default()
        ),
        _ => format!("{errno}, no packet sent"),
    }
}

/// The one fact that matters for this verdict's reason.
pub(crate) fn key_fact(v: &Verdict) -> String {
    let fact = the_fact(v);
    if v.detail.started_before_trace() {
        format!("{fact}, opened before conntrace started")
    } else {
        fact
    }
}

fn the_fact(v: &Verdict) -> String {
    let errno = v
        .errno
        .map(|e| e.to_string())
        .or_else(|| v.kernel_reason.clone())
        .unwrap_or_default();
    let syns = match v.syn_retransmits {
        0 => String::new(),
        n => format!(", {} SYNs", n + 1),
    };
    if let Detail::Stall(d) = &v.detail {
        return stall(v, d);
    }
    if v.outcome == Outcome::Established {
        return format!("handshake {:.1} ms", v.duration_ms);
    }
    match v.reason {
        Reason::NetfilterDrop
        | Reason::NetfilterReject
        | Reason::SyncookieAckLost
        | Reason::ConntrackTableFull
        | Reason::RpFilterDrop
        | Reason::KernelDrop => dropped(v),
        Reason::ListenOverflow | Reason::NotAccepted => {
            queue(v).unwrap_or_else(|| v.kernel_reason.clone().unwrap_or_default())
        }
        Reason::SynTimeout | Reason::Timeout => {
            // A SYN timeout whose SYNs the other end's rule dropped, or its full accept
            // queue refused, seen on this host.
            let at = rule(v)
                .or_else(|| {
                    let q = v.detail.peer_listen_queue()?;
                    Some(format!(
                        "peer accept queue full at netns {} ({}/{})",
                        q.netns, q.accept_queue, q.backlog
                    ))
                })
                .map(|r| format!(", {r}"))
                .unwrap_or_default();
            format!("{errno} in {}{syns}{at}", ms(v.duration_ms))
        }
        Reason::PmtuBlackhole => blackhole(v),
        Reason::NoRoute | Reason::EphemeralPortsExhausted | Reason::ConnectDenied => {
            connect(v, errno)
        }
        Reason::UnexpectedListener => v.kernel_reason.clone().unwrap_or_default(),
        Reason::RefusedBoundElsewhere => match &v.detail {
            Detail::Refusal(d) => {
                let at: Vec<&str> = d
                    .listeners
                    .iter()
                    .flatten()
                    .map(|l| l.address.as_str())
                    .collect();
                format!("listens on {} only", at.join(", "))
            }
            _ => errno,
        },
        _ => {
            let unanswered = match v.detail.unanswered_syns() {
                Some(n) => format!(", {}", unanswered_syns(n)),
                None if v.detail.first_answer_while_busy() => {
                    ", first answer came during connect()".to_owned()
                }
                None => String::new(),
            };
            match (&v.errno, &v.kernel_reason) {
                (Some(e), Some(k)) if e.to_string() != *k => format!("{e} ({k}){unanswered}"),
                _ => format!("{errno}{unanswered}{syns}"),
            }
        }
    }
}

/// "1 SYN unanswered first", "2 SYNs unanswered first".
pub fn unanswered_syns(n: u32) -> String {
    format!("{} unanswered first", count(u64::from(n), "SYN"))
}

/// "1 verdict", "2 verdicts": `n` and `noun`, plural unless `n` is 1.
pub fn count(n: u64, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::{key_fact, rule};
    use crate::engine::verdict::Detail;

    #[test]
    fn a_syn_timeout_toward_a_full_queue_on_this_host_says_so() {
        let mut v = crate::output::tests::syn_timeout();
        let plain = key_fact(&v);
        if let Detail::Closed(d) = &mut v.detail {
            d.peer_listen_queue = Some(crate::output::tests::peer_listen_queue());
        }
        assert_eq!(
            key_fact(&v),
            format!("{plain}, peer accept queue full at netns 4026532249 (2/1)")
        );
    }

    #[test]
    fn a_rule_at_the_other_end_says_where() {
        let mut v = crate::output::tests::netfilter_drop();
        assert_eq!(rule(&v).as_deref(), Some("INPUT `tcp dport 3306 drop`"));
        if let Some(d) = v.detail.drop_facts_mut() {
            d.peer_netns = Some(4026532249);
        }
        assert_eq!(
            rule(&v).as_deref(),
            Some("INPUT `tcp dport 3306 drop` at peer netns 4026532249")
        );
    }
}
