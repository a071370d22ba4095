//! Concrete advice for a reason, from the first verdict that had it: the rule that dropped, the
//! command that would accept the client, the listener's address, the queue it overflowed.

use std::net::SocketAddr;

use crate::engine::{
    facts::NfHook,
    verdict::{
        Detail, Reason, Side, Verdict,
        detail::{AnswerDropped, DropFacts, ListenerRef, RuleRef},
    },
};

/// The command that would let this connection through the rule that dropped it.
fn accept_command(v: &Verdict, facts: &DropFacts) -> Option<String> {
    let (family, table, chain) = match facts.rule.as_ref()? {
        RuleRef::Rule(r) => (&r.family, &r.table, &r.chain),
        RuleRef::Policy {
            family,
            table,
            chain,
            ..
        } => (family, table, chain),
    };
    // Where the rule is: this end, or the other one (`peer_netns`), whose remote end is ours.
    let (remote, local_port, remote_port) = match facts.peer_netns {
        None => (v.daddr, v.sport.unwrap_or(v.dport), v.dport),
        Some(_) => (v.saddr?, v.dport, v.sport?),
    };
    // The peer the rule must let in (or out) and the service port.
    let (peer_is_source, peer, port) = if facts.hook == Some(NfHook::Output) {
        (false, remote, remote_port)
    } else {
        (true, remote, local_port)
    };
    let v6 = peer.is_ipv6();
    if table == "filter" && (family == "ip" || family == "ip6") {
        // iptables-nft manages these tables: answer in iptables' terms.
        let tool = if v6 { "ip6tables" } else { "iptables" };
        let dir = if peer_is_source { "-s" } else { "-d" };
        return Some(format!(
            "{tool} -I {chain} -p tcp {dir} {peer} --dport {port} -j ACCEPT"
        ));
    }
    let proto = if v6 { "ip6" } else { "ip" };
    let dir = if peer_is_source { "saddr" } else { "daddr" };
    Some(format!(
        "nft insert rule {family} {table} {chain} {proto} {dir} {peer} tcp dport {port} accept"
    ))
}

/// What to do about a listener that does not accept() fast enough, naming its namespace's
/// `net.core.somaxconn` when it was read.
fn accept_faster(somaxconn: Option<u32>) -> String {
    let cap = match somaxconn {
        Some(n) => format!("net.core.somaxconn (now {n} there)"),
        None => "net.core.somaxconn in its namespace".into(),
    };
    format!(
        "does not accept() fast enough: raise its listen() backlog and {cap}, or find why it is slow or stopped"
    )
}

/// The server's end of the connection: `ip:port`.
fn server(v: &Verdict) -> String {
    match (v.sport, v.saddr) {
        (Some(p), Some(a)) if v.side == Side::Server => SocketAddr::new(a, p).to_string(),
        _ => SocketAddr::new(v.daddr, v.dport).to_string(),
    }
}

/// "in the other end's namespace (netns N), " when the explaining drops happened there.
fn at_peer(facts: &DropFacts) -> String {
    facts
        .peer_netns
        .map(|n| format!("in the other end's namespace (netns {n}), "))
        .unwrap_or_default()
}

/// ", run in that namespace" when the rule is at the other end: the command is for there.
fn run_there(facts: &DropFacts) -> &'static str {
    if facts.peer_netns.is_some() {
        ", run in that namespace"
    } else {
        ""
    }
}

/// A forwarding namespace's drop as a phrase: `2 × NETFILTER_DROP at nft_do_chain+0x3e8,
/// arrived on veth1`.
fn path_drop_text(p: &crate::engine::verdict::detail::PathDrop) -> String {
    let on = p
        .arrived_on
        .as_deref()
        .map(|i| format!(", arrived on {i}"))
        .unwrap_or_default();
    format!("{} × {} at {}{on}", p.count, p.kernel_reason, p.location)
}

/// A `syn_timeout` whose ICMP answers this host dropped: that rule, then where the answers
/// came from when the rule there is known.
fn answers_dropped_here(v: &Verdict, a: &AnswerDropped) -> String {
    let hook = a.dropped.hook.map_or("a netfilter", NfHook::chain_name);
    let rule = match &a.rule {
        Some(RuleRef::Rule(r)) => format!("rule `{}`", r.text),
        Some(RuleRef::Policy { chain, .. }) => format!("chain {chain}'s drop policy"),
        None => "rule".into(),
    };
    let accept = if v.daddr.is_ipv6() {
        "ip6tables -I INPUT -p icmpv6 --icmpv6-type destination-unreachable -j ACCEPT"
    } else {
        "iptables -I INPUT -p icmp --icmp-type destination-unreachable -j ACCEPT"
    };
    let from = match v.detail.drop_facts() {
        Some(DropFacts {
            rule: Some(RuleRef::Rule(r)),
            peer_netns: Some(n),
            ..
        }) => format!("; they came from `{}` in netns {n}", r.text),
        _ => String::new(),
    };
    format!(
        "this host's {hook} {rule} dropped the ICMP {} answers to its SYNs, so connect() waited for ETIMEDOUT instead of failing at once; let ICMP errors in (`{accept}`){from}",
        a.icmp
    )
}

/// One or two sentences of advice for this verdict's reason, naming its specifics.
pub fn concrete(v: &Verdict) -> String {
    let drops = v.detail.drop_facts();
    if let (Reason::SynTimeout, Detail::Closed(d)) = (v.reason, &v.detail)
        && let Some(a) = &d.answer_dropped
    {
        return answers_dropped_here(v, a);
    }
    match v.reason {
        Reason::NetfilterDrop
        | Reason::SyncookieAckLost
        | Reason::StalledNoGreeting
        | Reason::StalledNoResponse
        | Reason::SynTimeout
            if drops.is_some_and(|d| d.rule.is_some()) =>
        {
            let facts = drops.expect("checked above");
            let rule = match &facts.rule {
                Some(RuleRef::Rule(r)) => r.text.as_str(),
                _ => "policy drop",
            };
            let cmd = accept_command(v, facts).unwrap_or_default();
            let hook = facts.hook.map_or("a netfilter", NfHook::chain_name);
            format!(
                "{}{hook} rule `{rule}` drops it; to accept this peer{}: `{cmd}`",
                at_peer(facts),
                run_there(facts)
            )
        }
        Reason::IcmpUnreachable if v.detail.first_answer_while_busy() => {
            "the ICMP answer to the first SYN came while connect() still held the socket: the kernel set it aside and the client waited for its SYN retransmit; `-j REJECT --reject-with tcp-reset` fails at once, or accept the port".into()
        }
        Reason::IcmpUnreachable if v.detail.unanswered_syns().is_some() => {
            "an ICMP REJECT is rate-limited (1 s after a burst of 6 per destination): bursts of clients wait for SYN retransmits; use `-j REJECT --reject-with tcp-reset`, or accept the port".into()
        }
        Reason::Timeout if matches!(&v.detail, Detail::Closed(d) if d.retransmits.is_none()) => {
            format!(
                "{} stopped answering its keepalive or zero-window probes (no data was retransmitted): the peer or the path went away, or a firewall drops its packets",
                SocketAddr::new(v.daddr, v.dport)
            )
        }
        Reason::IcmpUnreachable if v.detail.established() => format!(
            "after the connection was established, its packets to {} were answered with ICMP unreachable: a REJECT rule or a route on the path changed (conntrace on that host names the rule)",
            SocketAddr::new(v.daddr, v.dport)
        ),
        Reason::IcmpUnreachable => format!(
            "a router or firewall answered the SYN to {} with ICMP unreachable: check the REJECT rules and routes on the path (conntrace on that host names the rule)",
            server(v)
        ),
        Reason::NetfilterReject => {
            let facts = drops;
            let icmp = facts
                .and_then(|d| d.reject_with.as_deref())
                .is_none_or(|w| w.starts_with("icmp"));
            let rule = match facts.and_then(|d| d.rule.as_ref()) {
                Some(RuleRef::Rule(r)) => {
                    let hook = facts.and_then(|d| d.hook).map_or("a netfilter", NfHook::chain_name);
                    let cmd = facts.and_then(|d| accept_command(v, d));
                    let there = facts.map(run_there).unwrap_or_default();
                    let accept = cmd
                        .map(|c| format!("; to accept this peer{there}: `{c}`"))
                        .unwrap_or_default();
                    format!(
                        "{}{hook} rule `{}` rejects it{accept}",
                        facts.map(at_peer).unwrap_or_default(),
                        r.text
                    )
                }
                _ => match facts.and_then(|d| d.path_drops.first()) {
                    Some(p) => format!(
                        "a REJECT rule in netns {}, which forwards the connection, answers it ({}): check that router's FORWARD rules (kube-proxy rejects a Service without endpoints)",
                        p.netns.map_or("?".into(), |n| n.to_string()),
                        path_drop_text(p)
                    ),
                    None => "a REJECT rule answers it".to_owned(),
                },
            };
            if icmp && !v.detail.established() {
                format!(
                    "{rule}. Its ICMP answers are rate-limited (1 s after a burst of 6 per destination), so bursts of clients wait for SYN retransmits: `--reject-with tcp-reset` fails them at once"
                )
            } else {
                rule
            }
        }
        Reason::RefusedBoundElsewhere => {
            let listeners: &[ListenerRef] = match &v.detail {
                Detail::Refusal(d) => d.listeners.as_deref().unwrap_or_default(),
                _ => &[],
            };
            let named: Vec<String> = listeners
                .iter()
                .map(|l| match l.v6only {
                    Some(true) => format!("{} (IPV6_V6ONLY)", l.address),
                    _ => l.address.clone(),
                })
                .collect();
            let also = if listeners.iter().any(|l| l.v6only == Some(true)) {
                ", or have it clear IPV6_V6ONLY on its [::] socket (its own setsockopt; net.ipv6.bindv6only only sets the default)"
            } else {
                ""
            };
            format!(
                "the service listens on {} only; make it bind {} or 0.0.0.0 (MySQL: bind-address = 0.0.0.0){also}",
                named.join(", "),
                v.saddr.map(|a| a.to_string()).unwrap_or_default()
            )
        }
        Reason::RefusedNoListener => format!(
            "nothing listens on {}: start the service, or point the client at the right address",
            server(v)
        ),
        Reason::ListenOverflow | Reason::NotAccepted => {
            let q = v.detail.queue();
            let queue = match (q.and_then(|q| q.accept_queue), q.and_then(|q| q.backlog)) {
                (Some(q), Some(b)) => format!("accept queue {q}/{b}; "),
                _ => String::new(),
            };
            let who = q
                .and_then(|q| q.listener.as_ref())
                .and_then(|l| l.comm.as_deref())
                .unwrap_or("the server");
            format!(
                "{queue}{who} {}",
                accept_faster(q.and_then(|q| q.somaxconn))
            )
        }
        Reason::StalledNoGreeting | Reason::StalledNoResponse => format!(
            "the server at {} never answered: check it for syncookie_ack_lost, listen_overflow or not_accepted, and give the client application-level connect and read timeouts (e.g. MySQL connect_timeout, read_timeout) so it fails fast",
            server(v)
        ),
        Reason::SynTimeout => match v.detail.peer_listen_queue() {
            Some(q) => format!(
                "the listener {} in netns {} had a full accept queue ({}/{}, {} overflows while this client waited): it refuses SYNs without a drop; its process {}",
                q.listener,
                q.netns,
                q.accept_queue,
                q.backlog,
                q.overflows,
                accept_faster(q.somaxconn)
            ),
            None => match drops.and_then(|d| d.path_drops.first()) {
                Some(p) => format!(
                    "SYNs to {} were dropped in netns {}, which forwards them ({}): check that router's FORWARD rules, conntrack table and reverse-path filter",
                    server(v),
                    p.netns.map_or("?".into(), |n| n.to_string()),
                    path_drop_text(p)
                ),
                None => format!(
                    "SYNs to {} went unanswered: run conntrace on that host; a firewall drop there shows as netfilter_drop with its rule",
                    server(v)
                ),
            },
        },
        Reason::NeighbourFailed => match drops.and_then(|d| d.next_hop) {
            Some(hop) => format!(
                "the next hop {hop} (the gateway to {}) does not answer ARP/neighbour discovery: a wrong gateway in the route, or that router or the link is down",
                v.daddr
            ),
            None => format!(
                "{} does not answer ARP/neighbour discovery: wrong address, or the host or link is down",
                v.daddr
            ),
        },
        Reason::RpFilterDrop => match drops.and_then(|d| d.rp_filter.as_ref()) {
            Some(rp) => format!(
                "the reverse-path filter drops packets from {} arriving on {}: its route back leaves by {}; fix the routing, or set net.ipv4.conf.{}.rp_filter=2 (loose)",
                v.daddr,
                rp.arrived_on.as_deref().unwrap_or("?"),
                rp.route_back_via.as_deref().unwrap_or("?"),
                rp.arrived_on.as_deref().unwrap_or("IFACE"),
            ),
            None => v.reason.advice().to_owned(),
        },
        Reason::ConntrackTableFull => match drops.and_then(|d| d.conntrack) {
            Some(ct) => format!(
                "the conntrack table of netns {} is full ({} of {}): raise net.netfilter.nf_conntrack_max in the host namespace, shorten conntrack timeouts, or exempt this traffic (notrack)",
                v.netns.map_or_else(|| "?".to_owned(), |n| n.to_string()),
                ct.count,
                ct.max
            ),
            None => v.reason.advice().to_owned(),
        },
        Reason::EphemeralPortsExhausted => match &v.detail {
            Detail::Connect(d) => format!(
                "all local ports {} towards {}:{} are taken ({} sockets, {} in TIME_WAIT): reuse connections, widen net.ipv4.ip_local_port_range, or let the server close first",
                d.port_range
                    .map_or_else(|| "?".to_owned(), |[a, b]| format!("{a}-{b}")),
                v.daddr,
                v.dport,
                d.sockets_to_destination
                    .map_or_else(|| "?".to_owned(), |n| n.to_string()),
                d.time_wait.map_or_else(|| "?".to_owned(), |n| n.to_string()),
            ),
            _ => v.reason.advice().to_owned(),
        },
        Reason::ResetByPeer => match v.side {
            Side::Client => format!(
                "the server {} aborted the connection (RST): check its logs, its idle and connection limits, or a middlebox's idle timeout on the path",
                server(v)
            ),
            Side::Server => format!(
                "the client {} aborted the connection (RST): its application closed the socket with data unread, gave up waiting (its own timeout), or was killed; check the client's timeouts and logs",
                v.daddr
            ),
        },
        _ => v.reason.advice().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{
        facts::TcpState,
        lookup::{FirewallRule, RuleAction},
        verdict::{
            Outcome,
            detail::{AttemptDetail, ClosedDetail, ListenerRef, RefusalDetail},
        },
    };

    fn verdict(reason: Reason, detail: Detail) -> Verdict {
        Verdict {
            ts_ns: 0,
            sk: None,
            side: Side::Server,
            outcome: Outcome::Failed,
            reason,
            kernel_reason: None,
            errno: None,
            saddr: Some("10.0.0.2".parse().expect("ip")),
            sport: Some(3306),
            daddr: "10.0.0.1".parse().expect("ip"),
            dport: 40000,
            netns: Some(1),
            pid: None,
            comm: None,
            container: None,
            duration_ms: 0.0,
            syn_retransmits: 0,
            detail,
        }
    }

    fn dropped_by(family: &str, table: &str, chain: &str) -> Detail {
        let mut d = AttemptDetail::default();
        d.drops.hook = Some(NfHook::Input);
        d.drops.rule = Some(RuleRef::Rule(FirewallRule {
            comment: None,
            backend: Default::default(),
            iptables: None,
            family: family.into(),
            table: table.into(),
            chain: chain.into(),
            handle: 2,
            text: "tcp dport 3306 drop".into(),
            action: RuleAction::Drop,
            packets: 3,
        }));
        Detail::Attempt(Box::new(d))
    }

    #[test]
    fn a_dropping_rule_gets_the_command_that_accepts_the_client() {
        let v = verdict(Reason::NetfilterDrop, dropped_by("ip", "filter", "INPUT"));
        assert_eq!(
            concrete(&v),
            "INPUT rule `tcp dport 3306 drop` drops it; to accept this peer: `iptables -I INPUT -p tcp -s 10.0.0.1 --dport 3306 -j ACCEPT`"
        );
        let v = verdict(Reason::NetfilterDrop, dropped_by("inet", "fw", "in"));
        assert!(
            concrete(&v)
                .contains("`nft insert rule inet fw in ip saddr 10.0.0.1 tcp dport 3306 accept`"),
            "{}",
            concrete(&v)
        );
    }

    #[test]
    fn a_rule_at_the_other_end_is_named_there_with_the_command_for_that_end() {
        // The client's verdict (10.0.0.1:40000 -> 10.0.0.2:3306), the server's INPUT rule.
        let Detail::Attempt(attempt) = dropped_by("ip", "filter", "INPUT") else {
            unreachable!()
        };
        let mut d = ClosedDetail::new(TcpState::Established);
        d.drops = attempt.drops;
        d.drops.peer_netns = Some(4026532249);
        let mut v = verdict(Reason::NetfilterDrop, Detail::Closed(Box::new(d)));
        v.side = Side::Client;
        (v.saddr, v.sport) = (Some("10.0.0.1".parse().expect("ip")), Some(40000));
        (v.daddr, v.dport) = ("10.0.0.2".parse().expect("ip"), 3306);
        assert_eq!(
            concrete(&v),
            "in the other end's namespace (netns 4026532249), INPUT rule `tcp dport 3306 drop` drops it; to accept this peer, run in that namespace: `iptables -I INPUT -p tcp -s 10.0.0.1 --dport 3306 -j ACCEPT`"
        );
    }

    #[test]
    fn a_syn_timeout_toward_a_full_queue_on_this_host_names_the_listener() {
        let mut d = ClosedDetail::new(TcpState::SynSent);
        d.peer_listen_queue = Some(crate::output::tests::peer_listen_queue());
        let mut v = verdict(Reason::SynTimeout, Detail::Closed(Box::new(d)));
        v.side = Side::Client;
        let text = concrete(&v);
        assert!(
            text.starts_with(
                "the listener 10.0.0.2:3306 in netns 4026532249 had a full accept queue (2/1, 4 overflows while this client waited)"
            ) && text.contains("net.core.somaxconn (now 64 there)"),
            "{text}"
        );
        let v = verdict(
            Reason::SynTimeout,
            Detail::Closed(Box::new(ClosedDetail::new(TcpState::SynSent))),
        );
        assert!(concrete(&v).contains("went unanswered"), "{}", concrete(&v));
    }

    #[test]
    fn a_reset_names_the_end_that_sent_it() {
        let mut v = verdict(
            Reason::ResetByPeer,
            Detail::Closed(Box::new(ClosedDetail::new(TcpState::Established))),
        );
        assert!(
            concrete(&v).starts_with("the client 10.0.0.1 aborted the connection (RST)"),
            "{}",
            concrete(&v)
        );
        v.side = Side::Client;
        (v.daddr, v.dport) = ("10.0.0.2".parse().expect("ip"), 3306);
        assert!(
            concrete(&v).starts_with("the server 10.0.0.2:3306 aborted the connection (RST)"),
            "{}",
            concrete(&v)
        );
    }

    #[test]
    fn a_timeout_without_retransmissions_speaks_of_probes() {
        let v = verdict(
            Reason::Timeout,
            Detail::Closed(Box::new(ClosedDetail::new(TcpState::Established))),
        );
        assert!(
            concrete(&v).starts_with("10.0.0.1:40000 stopped answering its keepalive"),
            "{}",
            concrete(&v)
        );
    }

    #[test]
    fn icmp_rejects_point_at_tcp_reset_and_bound_elsewhere_names_the_listener() {
        let mut d = AttemptDetail::default();
        d.drops.reject_with = Some("icmp-port-unreachable".into());
        let v = verdict(Reason::NetfilterReject, Detail::Attempt(Box::new(d)));
        assert!(concrete(&v).contains("--reject-with tcp-reset"));
        let bound_elsewhere = |address: &str, v6only| {
            concrete(&verdict(
                Reason::RefusedBoundElsewhere,
                Detail::Refusal(RefusalDetail {
                    rst_sent: true,
                    answered: crate::engine::verdict::detail::Answered::Syn,
                    listeners: Some(vec![ListenerRef {
                        address: address.into(),
                        pid: Some(1),
                        comm: Some("mysqld".into()),
                        v6only,
                    }]),
                }),
            ))
        };
        let a = bound_elsewhere("127.0.0.1:3306", None);
        assert!(
            a.contains("listens on 127.0.0.1:3306 only; make it bind 10.0.0.2"),
            "{a}"
        );
        let a = bound_elsewhere("[::]:3306", Some(true));
        assert!(
            a.contains("listens on [::]:3306 (IPV6_V6ONLY) only; make it bind 10.0.0.2 or 0.0.0.0")
                && a.contains("or have it clear IPV6_V6ONLY on its [::] socket"),
            "{a}"
        );
    }

    #[test]
    fn a_reject_names_its_rule_and_only_rate_limited_answers_talk_of_rate_limits() {
        let Detail::Attempt(mut d) = dropped_by("ip", "filter", "INPUT") else {
            unreachable!("an attempt")
        };
        d.drops.reject_with = Some("icmp-host-prohibited".into());
        let a = concrete(&verdict(Reason::NetfilterReject, Detail::Attempt(d)));
        assert!(
            a.starts_with("INPUT rule `tcp dport 3306 drop` rejects it; to accept this peer: `iptables -I INPUT -p tcp -s 10.0.0.1 --dport 3306 -j ACCEPT`. Its ICMP answers are rate-limited"),
            "{a}"
        );
        // The client: an ICMP answer to its first SYN is no rate limit.
        let mut v = verdict(
            Reason::IcmpUnreachable,
            Detail::Closed(Box::new(ClosedDetail::new(TcpState::SynSent))),
        );
        v.side = Side::Client;
        let a = concrete(&v);
        assert!(!a.contains("rate-limited"), "{a}");
        assert!(
            a.contains("answered the SYN to 10.0.0.1:40000 with ICMP"),
            "{a}"
        );
        let mut d = ClosedDetail::new(TcpState::SynSent);
        d.unanswered_syns = Some(2);
        v.detail = Detail::Closed(Box::new(d));
        assert!(concrete(&v).contains("rate-limited"), "{}", concrete(&v));
    }

    #[test]
    fn ipv6_endpoints_in_advice_are_bracketed() {
        let mut v = verdict(
            Reason::RefusedNoListener,
            Detail::Closed(Box::new(ClosedDetail::new(TcpState::SynSent))),
        );
        (v.saddr, v.daddr) = (
            Some("fd12:3::2".parse().expect("ip")),
            "fd12:3::1".parse().expect("ip"),
        );
        let a = concrete(&v);
        assert!(
            a.starts_with("nothing listens on [fd12:3::2]:3306: "),
            "{a}"
        );
    }
}
