//! Concrete advice for a reason, from the first verdict that had it: the rule that dropped, the
//! command that would accept the client, the listener's address, the queue it overflowed.

use serde_json::Value;

use crate::engine::{model::Reason, verdict::Verdict};

fn text<'a>(v: &'a Verdict, key: &str) -> Option<&'a str> {
    v.detail.get(key).and_then(Value::as_str)
}

/// The command that would let this connection through the rule that dropped it.
fn accept_command(v: &Verdict) -> Option<String> {
    let rule = v.detail.get("rule")?;
    let field = |k: &str| rule.get(k).and_then(Value::as_str);
    let (family, table, chain) = (field("family")?, field("table")?, field("chain")?);
    let hook = text(v, "hook").unwrap_or("INPUT");
    // The peer the rule must let in (or out) and the service port.
    let (peer_is_source, peer, port) = if hook == "OUTPUT" {
        (false, v.daddr, v.dport)
    } else {
        (true, v.daddr, v.sport.unwrap_or(v.dport))
    };
    let v6 = peer.is_ipv6();
    if table == "filter" && (family == "ip" || family == "ip6") {
        // iptables-nft manages these tables: answer in iptables' terms.
        let tool = if v6 { "ip6tables" } else { "iptables" };
        let dir = if peer_is_source { "-s" } else { "-d" };
        return Some(format!(
            "{tool} -I {chain} -p tcp {dir} {} --dport {port} -j ACCEPT",
            peer
        ));
    }
    let proto = if v6 { "ip6" } else { "ip" };
    let dir = if peer_is_source { "saddr" } else { "daddr" };
    Some(format!(
        "nft insert rule {family} {table} {chain} {proto} {dir} {} tcp dport {port} accept",
        peer
    ))
}

fn somaxconn() -> Option<String> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .map(|s| s.trim().to_owned())
}

/// One or two sentences of advice for this verdict's reason, naming its specifics.
pub fn concrete(v: &Verdict) -> String {
    let server = || match v.sport {
        Some(p) if v.side == crate::engine::model::Side::Server => {
            format!("{}:{p}", v.saddr.map(|a| a.to_string()).unwrap_or_default())
        }
        _ => format!("{}:{}", v.daddr, v.dport),
    };
    match v.reason {
        Reason::NetfilterDrop | Reason::SyncookieAckLost if v.detail.get("rule").is_some() => {
            let rule = v.detail["rule"]
                .get("text")
                .and_then(Value::as_str)
                .unwrap_or("policy drop");
            let cmd = accept_command(v).unwrap_or_default();
            format!(
                "{} rule `{rule}` drops it; to accept this peer: `{cmd}`",
                text(v, "hook").unwrap_or("a netfilter")
            )
        }
        Reason::NetfilterReject | Reason::IcmpUnreachable
            if text(v, "reject_with").is_none_or(|w| w.starts_with("icmp")) =>
        {
            "an ICMP REJECT is rate-limited (1 s after a burst of 6 per destination): bursts of clients wait for SYN retransmits; use `-j REJECT --reject-with tcp-reset`, or accept the port".into()
        }
        Reason::RefusedBoundElsewhere => {
            let listeners: Vec<&str> = v
                .detail
                .get("listeners")
                .and_then(Value::as_array)
                .map(|ls| ls.iter().filter_map(|l| l["address"].as_str()).collect())
                .unwrap_or_default();
            format!(
                "the service listens on {} only; make it bind {} or 0.0.0.0 (MySQL: bind-address = 0.0.0.0)",
                listeners.join(", "),
                v.saddr.map(|a| a.to_string()).unwrap_or_default()
            )
        }
        Reason::RefusedNoListener => format!(
            "nothing listens on {}: start the service, or point the client at the right address",
            server()
        ),
        Reason::ListenOverflow | Reason::NotAccepted => {
            let queue = match (v.detail.get("accept_queue"), v.detail.get("backlog")) {
                (Some(q), Some(b)) if !q.is_null() => format!("accept queue {q}/{b}; "),
                _ => String::new(),
            };
            let who = v
                .detail
                .get("listener")
                .and_then(|l| l["comm"].as_str())
                .unwrap_or("the server");
            format!(
                "{queue}{who} does not accept() fast enough: raise its listen() backlog and net.core.somaxconn (now {}), or find why it is slow or stopped",
                somaxconn().unwrap_or_else(|| "?".into())
            )
        }
        Reason::StalledNoGreeting | Reason::StalledNoResponse => format!(
            "the server at {} never answered: check it for syncookie_ack_lost, listen_overflow or not_accepted, and give the client application-level connect and read timeouts (e.g. MySQL connect_timeout, read_timeout) so it fails fast",
            server()
        ),
        Reason::SynTimeout => format!(
            "SYNs to {} went unanswered: run conntrace on that host; a firewall drop there shows as netfilter_drop with its rule",
            server()
        ),
        Reason::NeighbourFailed => format!(
            "{} does not answer ARP/neighbour discovery: wrong address, or the host or link is down",
            v.daddr
        ),
        _ => v.reason.advice().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::engine::model::{Outcome, Side};

    fn verdict(reason: Reason, side: Side, detail: serde_json::Value) -> Verdict {
        Verdict {
            ts_ns: 0,
            side,
            outcome: Outcome::Failed,
            reason,
            kernel_reason: None,
            errno: None,
            saddr: Some("10.0.0.2".parse().expect("ip")),
            sport: Some(3306),
            daddr: "10.0.0.1".parse().expect("ip"),
            dport: 40000,
            netns: 1,
            pid: None,
            comm: None,
            duration_ms: 0.0,
            syn_retransmits: 0,
            detail: detail.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn a_dropping_rule_gets_the_command_that_accepts_the_client() {
        let rule = json!({"family":"ip","table":"filter","chain":"INPUT","handle":2,"text":"tcp dport 3306 drop","packets":3});
        let v = verdict(
            Reason::NetfilterDrop,
            Side::Server,
            json!({"hook":"INPUT","rule":rule}),
        );
        let a = concrete(&v);
        assert!(a.contains("rule `tcp dport 3306 drop`"), "{a}");
        assert!(
            a.contains("`iptables -I INPUT -p tcp -s 10.0.0.1 --dport 3306 -j ACCEPT`"),
            "{a}"
        );
        let nft = json!({"family":"inet","table":"fw","chain":"in","handle":4,"text":"tcp dport 3306 drop","packets":1});
        let v = verdict(
            Reason::NetfilterDrop,
            Side::Server,
            json!({"hook":"INPUT","rule":nft}),
        );
        assert!(
            concrete(&v)
                .contains("`nft insert rule inet fw in ip saddr 10.0.0.1 tcp dport 3306 accept`"),
            "{}",
            concrete(&v)
        );
    }

    #[test]
    fn icmp_rejects_point_at_tcp_reset_and_bound_elsewhere_names_the_listener() {
        let v = verdict(
            Reason::NetfilterReject,
            Side::Server,
            json!({"reject_with":"icmp-port-unreachable"}),
        );
        assert!(concrete(&v).contains("--reject-with tcp-reset"));
        let v = verdict(
            Reason::RefusedBoundElsewhere,
            Side::Server,
            json!({"listeners":[{"address":"127.0.0.1:3306","pid":1,"comm":"mysqld"}]}),
        );
        let a = concrete(&v);
        assert!(
            a.contains("listens on 127.0.0.1:3306 only; make it bind 10.0.0.2"),
            "{a}"
        );
    }
}
