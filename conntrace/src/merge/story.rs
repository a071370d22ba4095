//! One connection's story from both ends. A table of rules: a client reason, a server reason
//! and a sentence whose `{fact}`s are filled in from the two verdicts. First match wins.

use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;

use super::Verdict;

/// The members of a verdict's `detail` that stories use; the rest is ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Facts {
    hook: Option<String>,
    rule: Option<Rule>,
    rule_candidates: Option<Vec<Rule>>,
    rule_not_found: Option<String>,
    reject_with: Option<String>,
    cookie_invalid: Option<bool>,
    accept_queue: Option<u64>,
    backlog: Option<u64>,
    listener: Option<Listener>,
    listeners: Option<Vec<Listener>>,
    pub(super) stuck_ms: Option<f64>,
    waited_ms: Option<f64>,
    location: Option<String>,
    conntrack: Option<Conntrack>,
    rp_filter: Option<RpFilter>,
    path_answer: Option<PathAnswer>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Conntrack {
    count: Option<u64>,
    max: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RpFilter {
    arrived_on: Option<String>,
    route_back_via: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PathAnswer {
    mtu: Option<u64>,
    dropped: Option<PathAnswerDrop>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PathAnswerDrop {
    hook: Option<String>,
}

/// A firewall rule, or a chain's policy, as `detail.rule` names it.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Rule {
    family: Option<String>,
    table: Option<String>,
    chain: Option<String>,
    text: Option<String>,
    policy: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Listener {
    address: Option<String>,
    comm: Option<String>,
}

/// Milliseconds as a duration, when given and representable.
pub(super) fn duration(ms: Option<f64>) -> Option<Duration> {
    Duration::try_from_secs_f64(ms? / 1000.0).ok()
}

const STALLED: &[&str] = &["stalled_no_greeting", "stalled_no_response"];

/// (client reasons, server reasons, sentence).
#[rustfmt::skip]
const RULES: &[(&[&str], &[&str], &str)] = &[
    (&["stalled_no_greeting"], &["syncookie_ack_lost"], "the server never created this connection: it answered with a SYN cookie and the client's final ACK {ack_fate}{waited}"),
    (&["stalled_no_greeting"], &["listen_overflow"], "the server's accept queue was full{queue} when the final ACK came: it has no socket for this connection{waited}"),
    (STALLED, &["not_accepted"], "the server's application did not accept() the connection{comm}{waited}"),
    (STALLED, &["established"], "the server's application accepted the connection{comm} and sent nothing back{waited}"),
    (&["syn_timeout"], &["netfilter_drop"], "the server's firewall dropped the SYNs{at}{rule}"),
    (&["syn_timeout"], &["conntrack_table_full"], "the server's conntrack table was full{conntrack}: it dropped the SYNs before any rule"),
    (&["syn_timeout"], &["rp_filter_drop"], "the server's reverse-path filter dropped the SYNs{rp_filter}"),
    (&["syn_timeout"], &["kernel_drop"], "the server's kernel dropped the SYNs{drop}"),
    (STALLED, &["pmtu_blackhole"], "a path-MTU black hole: the server's full-size segments never arrived{path_answer}{waited}"),
    (&["zero_window"], &["zero_window"], "the server's application stopped reading{comm}: the client's data waits in its send queue"),
    (&["icmp_unreachable", "refused_no_listener"], &["netfilter_reject"], "the server's REJECT rule answered{reject_with}{rule}"),
    (&["refused_no_listener"], &["refused_bound_elsewhere"], "nothing listens on {server}; the service listens on {listeners}"),
    (&["refused_no_listener"], &["refused_no_listener"], "nothing listens on {server}"),
    (&["established"], &["established"], "established"),
];

/// The verdicts a rule matched, and the client's verdicts of that connection.
struct Pair<'a> {
    client: &'a Verdict,
    server: &'a Verdict,
    all_client: &'a [&'a Verdict],
    server_addr: Option<SocketAddr>,
}

/// The story of one connection; `client` and `server` are its verdicts per side, by `ts`.
pub(super) fn tell(
    client: &[&Verdict],
    server: &[&Verdict],
    server_addr: Option<SocketAddr>,
    max_skew: Duration,
) -> String {
    match (client.is_empty(), server.is_empty()) {
        (_, true) => return format!("client only: {}", summary(client)),
        (true, _) => return format!("server only: {}", summary(server)),
        _ => {}
    }
    let (client, server) = (telling(client), telling(server));
    for (client_reasons, server_reasons, sentence) in RULES {
        let c = first_of(&client, client_reasons);
        let s = first_of(&server, server_reasons);
        if let (Some(c), Some(s)) = (c, s) {
            let all_client = &client;
            let pair = Pair {
                client: c,
                server: s,
                all_client,
                server_addr,
            };
            return fill(sentence, &pair);
        }
    }
    let first = |vs: &[&Verdict]| vs.iter().map(|v| v.ts).min();
    let order = match (first(&client), first(&server)) {
        (Some(c), Some(s)) => match s.duration_since(c) {
            Ok(d) if d > max_skew => format!("; the client reported {} before the server", secs(d)),
            Err(e) if e.duration() > max_skew => {
                format!(
                    "; the server reported {} before the client",
                    secs(e.duration())
                )
            }
            _ => String::new(),
        },
        _ => String::new(),
    };
    format!(
        "client: {}; server: {}{order}",
        summary(&client),
        summary(&server)
    )
}

fn first_of<'a>(verdicts: &[&'a Verdict], reasons: &[&str]) -> Option<&'a Verdict> {
    verdicts
        .iter()
        .copied()
        .find(|v| reasons.contains(&v.reason.as_str()))
}

/// The sentence with each `{fact}` replaced.
fn fill(sentence: &str, p: &Pair) -> String {
    let (mut out, mut rest) = (String::new(), sentence);
    while let Some((before, after)) = rest.split_once('{') {
        let Some((name, after)) = after.split_once('}') else {
            break;
        };
        out.push_str(before);
        out.push_str(&fact(name, p));
        rest = after;
    }
    out + rest
}

fn fact(name: &str, p: &Pair) -> String {
    let d = &p.server.detail;
    match name {
        "ack_fate" => match (d.hook.as_deref(), rule(d)) {
            _ if d.cookie_invalid == Some(true) => {
                "was answered with a RST: the cookie did not validate".to_owned()
            }
            (Some(hook), Some(rule)) => format!("was dropped by {hook} {rule}"),
            (Some(hook), None) => format!("was dropped at {hook}{}", not_found(d)),
            (None, _) => "was lost".to_owned(),
        },
        "waited" => {
            let stall = p.all_client.iter().filter(|v| v.reason == p.client.reason);
            let ms =
                stall.flat_map(|v| [duration(v.detail.stuck_ms), duration(v.detail.waited_ms)]);
            around("; the client waited ", ms.flatten().max().map(secs), "")
        }
        "queue" => match (d.accept_queue, d.backlog) {
            (Some(queue), Some(backlog)) => format!(" ({queue}/{backlog})"),
            _ => String::new(),
        },
        "comm" => {
            let listener = d.listener.as_ref().and_then(|l| l.comm.as_deref());
            around(
                " (",
                p.server.comm.as_deref().or(listener),
                " on the server)",
            )
        }
        "at" => around(" at ", d.hook.as_deref(), ""),
        "conntrack" => match d.conntrack.as_ref().map(|c| (c.count, c.max)) {
            Some((Some(count), Some(max))) => format!(" ({count} of {max} entries)"),
            _ => String::new(),
        },
        "rp_filter" => match &d.rp_filter {
            Some(rp) => format!(
                ": they came in on {} while the route back to the client leaves by {}",
                rp.arrived_on.as_deref().unwrap_or("?"),
                rp.route_back_via.as_deref().unwrap_or("?")
            ),
            None => String::new(),
        },
        "drop" => format!(
            " ({}{})",
            p.server.kernel_reason.as_deref().unwrap_or("?"),
            around(" at ", d.location.as_deref(), "")
        ),
        "path_answer" => match &d.path_answer {
            Some(a) => format!(
                "; a hop announced MTU {}{}",
                a.mtu.map_or_else(|| "?".to_owned(), |m| m.to_string()),
                around(
                    ", and the server dropped that answer at ",
                    a.dropped.as_ref().and_then(|x| x.hook.as_deref()),
                    ""
                )
            ),
            None => "; no hop's answer reached the server".to_owned(),
        },
        "rule" => rule(d).map_or_else(|| not_found(d), |rule| format!(": {rule}")),
        "reject_with" => around(" (", d.reject_with.as_deref(), ")"),
        "server" => p
            .server_addr
            .map_or_else(|| "?".to_owned(), |a| a.to_string()),
        "listeners" => {
            let all = d.listeners.iter().flatten();
            let addresses: Vec<&str> = all.filter_map(|l| l.address.as_deref()).collect();
            addresses.join(", ")
        }
        _ => format!("{{{name}}}"),
    }
}

fn around(before: &str, value: Option<impl AsRef<str>>, after: &str) -> String {
    value.map_or_else(String::new, |v| format!("{before}{}{after}", v.as_ref()))
}

/// The firewall rule(s) `detail` names: rule `TEXT` (FAMILY TABLE CHAIN), or a chain's policy.
fn rule(d: &Facts) -> Option<String> {
    let one = |r: &Rule| {
        let at = [&r.family, &r.table, &r.chain].map(|k| k.as_deref().unwrap_or("?"));
        let at = at.join(" ");
        match (&r.text, &r.policy) {
            (Some(rule), _) => Some(format!("rule `{rule}` ({at})")),
            (None, Some(policy)) => Some(format!("chain policy {policy} ({at})")),
            (None, None) => None,
        }
    };
    if let Some(rule) = &d.rule {
        return one(rule);
    }
    let all: Vec<String> = d.rule_candidates.iter().flatten().filter_map(one).collect();
    (!all.is_empty()).then(|| all.join(" or "))
}

fn not_found(d: &Facts) -> String {
    around(" (no rule named: ", d.rule_not_found.as_deref(), ")")
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// A side's reason codes, each once, in the order they were first reported.
pub(super) fn distinct_reasons<'a>(verdicts: &[&'a Verdict]) -> Vec<&'a str> {
    let mut reasons: Vec<&str> = Vec::new();
    for v in verdicts {
        if !reasons.contains(&v.reason.as_str()) {
            reasons.push(&v.reason);
        }
    }
    reasons
}

/// `REASON (KERNEL_REASON), ...`: the kernel's words from each reason's last verdict.
fn summary(verdicts: &[&Verdict]) -> String {
    let said = |reason: &str| {
        let last = verdicts.iter().rev().find(|v| v.reason == reason);
        let kernel = last.and_then(|v| v.kernel_reason.as_ref());
        format!("{reason}{}", around(" (", kernel, ")"))
    };
    let all: Vec<String> = distinct_reasons(verdicts).into_iter().map(said).collect();
    all.join(", ")
}

/// `established` says little when the same side also reported a failure: left out then.
fn telling<'a>(verdicts: &[&'a Verdict]) -> Vec<&'a Verdict> {
    let failures: Vec<&Verdict> = verdicts
        .iter()
        .copied()
        .filter(|v| v.reason != "established")
        .collect();
    if failures.is_empty() {
        verdicts.to_vec()
    } else {
        failures
    }
}
