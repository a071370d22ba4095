//! One readable line per record.

use super::{Clock, Record};
use crate::engine::{model::Outcome, verdict::Verdict};

fn endpoint(addr: Option<std::net::IpAddr>, port: Option<u16>) -> String {
    let a = addr.map_or_else(
        || "?".to_owned(),
        |a| {
            if a.is_ipv6() {
                format!("[{a}]")
            } else {
                a.to_string()
            }
        },
    );
    let p = port.map_or_else(|| "?".to_owned(), |p| p.to_string());
    format!("{a}:{p}")
}

/// The `detail` facts worth a glance: where a firewall dropped, which rule, the listen queue.
fn facts(v: &Verdict) -> Vec<String> {
    let d = &v.detail;
    let text = |key: &str| d.get(key).and_then(|x| x.as_str());
    let mut out = Vec::new();
    if let Some(hook) = text("hook") {
        out.push(format!("hook {hook}"));
    }
    if let Some(r) = d.get("rule") {
        let field = |k: &str| r.get(k).and_then(|x| x.as_str()).unwrap_or("?");
        let place = format!("{} {} {}", field("family"), field("table"), field("chain"));
        match r.get("text").and_then(|x| x.as_str()) {
            Some(rule) => out.push(format!("rule {place}: {rule}")),
            None => out.push(format!("policy drop of {place}")),
        }
    }
    if let Some(n) = d.get("rule_candidates").and_then(|x| x.as_array()) {
        out.push(format!("{} candidate rules", n.len()));
    }
    if let Some(with) = text("reject_with") {
        out.push(format!("reject with {with}"));
    }
    if let (Some(q), Some(b)) = (d.get("accept_queue"), d.get("backlog")) {
        out.push(format!("accept queue {q}/{b}"));
    }
    if let Some(n) = d.get("unanswered_syns") {
        out.push(format!("{n} SYNs unanswered first"));
    }
    out
}

fn verdict(v: &Verdict, clock: &Clock, colour: bool) -> String {
    let who = match (&v.comm, v.pid) {
        (Some(c), Some(p)) => format!("{c}[{p}]"),
        _ => "-".to_owned(),
    };
    let side = match v.side {
        crate::engine::model::Side::Client => "client",
        crate::engine::model::Side::Server => "server",
    };
    // Stalls and their follow-ups share the reason code: say which it is.
    let label = match v.outcome {
        Outcome::Stalled => format!("{} (stalled)", v.reason.code()),
        Outcome::Resolved => format!("{} (resolved)", v.reason.code()),
        Outcome::Established | Outcome::Failed => v.reason.code().to_owned(),
    };
    let label = if colour {
        super::live::paint(&format!("{label:<11}"), v.outcome)
    } else {
        format!("{label:<11}")
    };
    let mut line = format!(
        "{} {side:<6} {label} {} -> {} {who} netns:{} ({}",
        clock.rfc3339(v.ts_ns),
        endpoint(v.saddr, v.sport),
        endpoint(Some(v.daddr), Some(v.dport)),
        v.netns,
        v.kernel_reason.as_deref().unwrap_or("-"),
    );
    line.push_str(&format!(", {:.1} ms", v.duration_ms));
    if v.syn_retransmits > 0 {
        line.push_str(&format!(", {} SYN retransmits", v.syn_retransmits));
    }
    line.push(')');
    let facts = facts(v);
    if !facts.is_empty() {
        line.push_str(&format!(" [{}]", facts.join(", ")));
    }
    if v.outcome != Outcome::Established {
        line.push_str(" — ");
        line.push_str(v.reason.advice());
    }
    line
}

pub(super) fn line(record: &Record<'_>, clock: &Clock, colour: bool) -> String {
    match record {
        Record::Ready(r) => {
            let ports = if r.ports.is_empty() {
                "all ports".to_owned()
            } else {
                r.ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let paths: Vec<String> = r
                .attach_paths
                .iter()
                .map(|(c, p)| format!("{c}={p}"))
                .collect();
            format!(
                "conntrace ready: tracing TCP {ports} on kernel {} ({} programs; {})",
                r.kernel,
                r.programs.len(),
                paths.join(" ")
            )
        }
        Record::Verdict(v) => verdict(v, clock, colour),
        Record::Drop(d) => format!(
            "{} drop   {:<11} {} {} {} netns:{} ({} at {})",
            clock.rfc3339(d.ts_ns),
            d.kernel_reason,
            endpoint(Some(d.saddr), Some(d.sport)),
            if d.direction == crate::engine::verdict::Direction::In {
                "<-"
            } else {
                "->"
            },
            endpoint(Some(d.daddr), Some(d.dport)),
            d.netns,
            d.tcp_flags,
            d.location,
        ),
        Record::Lost { total, new, ts_ns } => {
            format!(
                "{} LOST {new} kernel events (total {total}): verdicts may be missing; raise --ring-buffer-bytes",
                clock.rfc3339(*ts_ns)
            )
        }
        Record::Summary(f) => summary(f),
    }
}

/// The summary table printed at exit: counts and concrete advice per reason, the top failing
/// peers and ports, and the handshake-time percentiles.
fn summary(f: &super::Final<'_>) -> String {
    use crate::engine::verdict::Summary;
    let s = f.summary;
    let mut out = format!(
        "summary: {} verdicts, {} kernel events, {} lost, {} expired unresolved, in {:.1} s",
        s.by_outcome.values().sum::<u64>(),
        s.events,
        f.lost_events,
        s.expired_unresolved,
        f.duration_ms / 1000.0
    );
    if !s.by_reason.is_empty() {
        out.push_str("\n  reason                    count  what to do");
        for (reason, n) in &s.by_reason {
            let advice = s
                .examples
                .get(reason)
                .map_or_else(|| reason.advice().to_owned(), super::advice::concrete);
            out.push_str(&format!("\n  {:<24} {n:>6}  {advice}", reason.code()));
        }
    }
    let peers = Summary::top(&s.failing_peers, 5);
    if !peers.is_empty() {
        let list: Vec<String> = peers.iter().map(|(p, n)| format!("{p} ({n})")).collect();
        out.push_str(&format!("\n  top failing peers: {}", list.join(", ")));
    }
    let ports = Summary::top(&s.failing_ports, 5);
    if !ports.is_empty() {
        let list: Vec<String> = ports.iter().map(|(p, n)| format!("{p} ({n})")).collect();
        out.push_str(&format!("\n  top failing ports: {}", list.join(", ")));
    }
    if s.drop_records_suppressed > 0 {
        out.push_str(&format!(
            "\n  {} drop records not printed (more than 50 a second of one reason; counted above)",
            s.drop_records_suppressed
        ));
    }
    if let Some((n, p50, p90, p99, max)) = s.latency_percentiles() {
        out.push_str(&format!(
            "\n  connect latency ({n} handshakes): p50 {p50:.2} ms, p90 {p90:.2} ms, p99 {p99:.2} ms, max {max:.2} ms"
        ));
    }
    out
}
