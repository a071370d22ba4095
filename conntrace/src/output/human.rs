//! Readable lines. By default one compact line per verdict (time of day in UTC, side, reason,
//! the connection as client -> server, who, and the one fact that matters), cut to 120 columns
//! on a terminal and whole in a pipe or a file, with the reason's advice printed once, under
//! its first occurrence; `--wide` gives the full line with every fact and the advice on each.
//! The summary at exit is a table.

use std::collections::BTreeMap;

use super::{
    Clock, Final, Lost, Ready, Record, advice,
    fact::{count, key_fact},
    live,
};
use crate::{
    engine::verdict::{
        Detail, Direction, DropRecord, Outcome, Reason, Side, Summary, Verdict, detail::RuleRef,
    },
    identity::Container,
};

/// Widest compact line, in characters.
pub const WIDTH: usize = 120;

/// Distinct pieces of concrete advice kept per reason (another rule, another destination):
/// each is printed under the first verdict it belongs to, and in the summary.
pub const ADVICE_PER_REASON: usize = 3;

/// The human format's state: which advice was already printed.
#[derive(Debug)]
pub struct Human {
    pub wide: bool,
    pub colour: bool,
    /// Compact lines are cut to `width` (on a terminal; a pipe or a file gets them whole).
    pub cut: bool,
    /// [`WIDTH`], or a narrower terminal's width ([`Human::fit_to`]).
    width: usize,
    advised: BTreeMap<Reason, Advised>,
}

/// The concrete advice given for one reason.
#[derive(Debug, Default)]
struct Advised {
    /// At most [`ADVICE_PER_REASON`], in the order first given.
    texts: Vec<String>,
    /// Verdicts whose advice was none of `texts`, once `texts` was full.
    others: u64,
}

impl Advised {
    /// `text` when it was not given yet and there is room for it.
    fn new_text(&mut self, text: String) -> Option<String> {
        if self.texts.contains(&text) {
            return None;
        }
        if self.texts.len() == ADVICE_PER_REASON {
            self.others += 1;
            return None;
        }
        self.texts.push(text.clone());
        Some(text)
    }
}

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

fn netns(n: Option<u32>) -> String {
    n.map_or_else(|| "netns:?".to_owned(), |n| format!("netns:{n}"))
}

/// `HH:MM:SS.mmm` of an RFC 3339 time.
fn time_of_day(rfc3339: &str) -> &str {
    rfc3339.get(11..23).unwrap_or(rfc3339)
}

/// Cuts `line` to `width` characters, marking the cut.
pub(super) fn fit(mut line: String, width: usize) -> String {
    if line.chars().count() > width {
        let end = line
            .char_indices()
            .nth(width - 1)
            .map_or(line.len(), |(i, _)| i);
        line.truncate(end);
        line.push('…');
    }
    line
}

/// The connection's ends as (client, server), whichever side reports it.
fn ends(v: &Verdict) -> (String, String) {
    let here = endpoint(v.saddr, v.sport);
    let there = endpoint(Some(v.daddr), Some(v.dport));
    match v.side {
        Side::Client => (here, there),
        Side::Server => (there, here),
    }
}

/// The connection as `client -> server`; a per-listener verdict (no connection: the other
/// end unspecified, port 0) as `listener ADDR:PORT`, `*` for one bound to every address.
fn connection(v: &Verdict) -> String {
    if v.dport == 0 && v.daddr.is_unspecified() {
        return match v.saddr {
            Some(_) => format!("listener {}", endpoint(v.saddr, v.sport)),
            None => format!(
                "listener *:{}",
                v.sport.map_or("?".into(), |p| p.to_string())
            ),
        };
    }
    let (client, server) = ends(v);
    format!("{client} -> {server}")
}

/// The namespace, or its container (`podman:mysqld`, `k8s:shop/db-0/mysql`) when it has one.
fn place(netns_: Option<u32>, container: Option<&Container>) -> String {
    container.map_or_else(|| netns(netns_), Container::short)
}

/// The process (and its container), or the namespace's container, or the namespace.
fn who(v: &Verdict) -> String {
    match (&v.comm, v.pid, &v.container) {
        (Some(c), Some(p), Some(ct)) => format!("{c}[{p}]@{}", ct.short()),
        (Some(c), Some(p), None) => format!("{c}[{p}]"),
        _ => place(v.netns, v.container.as_ref()),
    }
}

impl Human {
    pub fn new(wide: bool, colour: bool, cut: bool) -> Self {
        Self {
            wide,
            colour,
            cut,
            width: WIDTH,
            advised: BTreeMap::new(),
        }
    }

    /// Cuts and wraps at a terminal's `columns` where it is narrower than [`WIDTH`] (no
    /// narrower than 40), so that no line wraps there.
    pub fn fit_to(mut self, columns: Option<usize>) -> Self {
        self.width = columns.map_or(WIDTH, |c| c.clamp(40, WIDTH));
        self
    }

    /// The text of one record (without its final newline; it may span lines).
    pub fn text(&mut self, record: &Record<'_>, clock: &Clock) -> String {
        match record {
            Record::Ready(r) => ready(r, self.wide),
            Record::Verdict(v) if self.wide => wide_verdict(v, clock, self.colour),
            Record::Verdict(v) => self.verdict(v, clock),
            Record::Drop(d) => drop_line(d, clock, self.wide, self.cut.then_some(self.width)),
            Record::Lost(l) => lost(l, clock),
            Record::Summary(f) => summary(f, &self.advised),
        }
    }

    /// The compact verdict line, and its concrete advice under the first verdict that needs it.
    fn verdict(&mut self, v: &Verdict, clock: &Clock) -> String {
        let ts = clock.rfc3339(v.ts_ns);
        let head = format!("{} {} ", time_of_day(&ts), v.side.name());
        let code = format!("{:<19}", v.reason.code());
        let tail = format!(" {} {} {}", connection(v), who(v), key_fact(v));
        let mut line = format!("{head}{code}{tail}");
        if self.cut {
            line = fit(line, self.width);
        }
        if self.colour {
            // Only the plain text counts against the width: colour codes take no column.
            let rest = line.split_off(head.len() + code.len());
            line.truncate(head.len());
            line.push_str(&live::paint(&code, v.outcome));
            line.push_str(&rest);
        }
        if v.outcome != Outcome::Established
            && let Some(text) = self
                .advised
                .entry(v.reason)
                .or_default()
                .new_text(advice::concrete(v))
        {
            line.push('\n');
            line.push_str(&wrap("  what to do: ", &text, self.width));
        }
        line
    }
}

/// `text` after `prefix`, wrapped at `width` with continuation lines indented as deep.
fn wrap(prefix: &str, text: &str, width: usize) -> String {
    let indent = " ".repeat(prefix.len());
    let mut out = prefix.to_owned();
    let mut col = prefix.len();
    for word in text.split(' ') {
        let len = word.chars().count();
        if col > indent.len() && col + 1 + len > width {
            out.push('\n');
            out.push_str(&indent);
            col = indent.len();
        } else if col > indent.len() {
            out.push(' ');
            col += 1;
        }
        out.push_str(word);
        col += len;
    }
    out
}

/// The `detail` facts worth a glance, for the wide line.
fn facts(v: &Verdict) -> Vec<String> {
    let mut out = Vec::new();
    if v.detail.started_before_trace() {
        out.push("opened before conntrace started: its duration is unknown".to_owned());
    }
    if let Detail::Stall(d) = &v.detail {
        // The stall's own times: the line's duration is the handshake's.
        if let Some(ms) = d.stuck_ms {
            out.push(format!("stuck {ms:.0} ms"));
        }
        if let Some(ms) = d.waited_ms {
            out.push(format!("waited {ms:.0} ms"));
        }
    }
    if let Some(d) = v.detail.drop_facts() {
        if let Some(hook) = d.hook {
            out.push(format!("hook {hook}"));
        }
        match &d.rule {
            Some(RuleRef::Rule(r)) => {
                out.push(format!(
                    "rule {} {} {}: {}",
                    r.family, r.table, r.chain, r.text
                ));
            }
            Some(RuleRef::Policy {
                family,
                table,
                chain,
                ..
            }) => out.push(format!("policy drop of {family} {table} {chain}")),
            None => {}
        }
        if let Some(rs) = &d.rule_candidates {
            out.push(format!("{} candidate rules", rs.len()));
        }
        if let Some(with) = &d.reject_with {
            out.push(format!("reject with {with}"));
        }
    }
    if let Some(q) = v.detail.queue()
        && let (Some(q), Some(b)) = (q.accept_queue, q.backlog)
    {
        out.push(format!("accept queue {q}/{b}"));
    }
    if let Some(n) = v.detail.unanswered_syns() {
        out.push(super::fact::unanswered_syns(n));
    }
    if v.detail.first_answer_while_busy() {
        out.push("first answer came during connect()".to_owned());
    }
    out
}

/// The full verdict line (`--wide`): every fact, and the advice.
fn wide_verdict(v: &Verdict, clock: &Clock, colour: bool) -> String {
    let who = match (&v.comm, v.pid) {
        (Some(c), Some(p)) => format!("{c}[{p}]"),
        _ => "-".to_owned(),
    };
    let side = v.side.name();
    // Stalls and their follow-ups share the reason code: say which it is.
    let label = match v.outcome {
        Outcome::Stalled => format!("{} (stalled)", v.reason.code()),
        Outcome::Resolved => format!("{} (resolved)", v.reason.code()),
        // A stall's follow-up: the connection failed after it was reported stalled.
        Outcome::Failed if matches!(v.detail, Detail::Stall(_)) => {
            format!("{} (failed)", v.reason.code())
        }
        Outcome::Established | Outcome::Failed => v.reason.code().to_owned(),
    };
    let label = if colour {
        live::paint(&format!("{label:<11}"), v.outcome)
    } else {
        format!("{label:<11}")
    };
    let mut line = format!(
        "{} {side:<6} {label} {} {who} {} ({}",
        clock.rfc3339(v.ts_ns),
        connection(v),
        match &v.container {
            Some(c) => format!("{} {}", netns(v.netns), c.short()),
            None => netns(v.netns),
        },
        v.kernel_reason.as_deref().unwrap_or("-"),
    );
    if !v.detail.started_before_trace() {
        line.push_str(&format!(", {:.1} ms", v.duration_ms));
    }
    if v.syn_retransmits > 0 {
        let n = u64::from(v.syn_retransmits);
        line.push_str(&format!(", {}", count(n, "SYN retransmit")));
    }
    line.push(')');
    let facts = facts(v);
    if !facts.is_empty() {
        line.push_str(&format!(" [{}]", facts.join(", ")));
    }
    if v.outcome != Outcome::Established {
        // The verdict's own advice (its rule, listener, queue), as the compact line gives it
        // once.
        line.push_str(" — ");
        line.push_str(&advice::concrete(v));
    }
    line
}

fn ready(r: &Ready, wide: bool) -> String {
    let ports = if r.ports.is_empty() {
        "all ports".to_owned()
    } else {
        r.ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut line = format!(
        "conntrace ready: tracing TCP {ports} on kernel {} ({}",
        r.kernel,
        count(r.programs.len() as u64, "program"),
    );
    if wide {
        let paths: Vec<String> = r
            .attach_paths
            .iter()
            .map(|(c, p)| format!("{c}={p}"))
            .collect();
        line.push_str(&format!("; {})", paths.join(" ")));
    } else {
        line.push_str("); times are UTC");
    }
    line
}

fn drop_line(d: &DropRecord, clock: &Clock, wide: bool, cut: Option<usize>) -> String {
    let ts = clock.rfc3339(d.ts_ns);
    let (open, close) = if wide { ("(", ")") } else { ("", "") };
    let line = format!(
        "{} drop   {:<19} {} {} {} {} {open}{} at {}{close}",
        if wide { &ts } else { time_of_day(&ts) },
        d.kernel_reason,
        endpoint(Some(d.saddr), Some(d.sport)),
        if d.direction == Direction::In {
            "<-"
        } else {
            "->"
        },
        endpoint(Some(d.daddr), Some(d.dport)),
        place(d.netns, d.container.as_ref()),
        d.tcp_flags,
        d.location,
    );
    match cut {
        Some(width) if !wide => fit(line, width),
        _ => line,
    }
}

fn lost(l: &Lost, clock: &Clock) -> String {
    format!(
        "{} LOST {} kernel events (total {}): verdicts may be missing; raise --ring-buffer-bytes",
        clock.rfc3339(l.ts_ns),
        l.new,
        l.count
    )
}

/// The summary table printed at exit: counts and concrete advice per reason (each piece the
/// compact lines gave, else the first verdict's), the top failing peers and ports, and the
/// handshake-time percentiles.
fn summary(f: &Final<'_>, advised: &BTreeMap<Reason, Advised>) -> String {
    let s = f.summary;
    let mut out = format!(
        "summary: {}, {}, {} lost, {} expired unresolved, in {:.1} s",
        count(s.by_outcome.values().sum::<u64>(), "verdict"),
        count(s.events, "kernel event"),
        f.lost_events,
        s.expired_unresolved,
        f.duration_ms / 1000.0
    );
    if !s.by_reason.is_empty() {
        out.push_str("\n  reason                    count  what to do");
        for (reason, n) in &s.by_reason {
            let given = advised.get(reason).filter(|a| !a.texts.is_empty());
            let first = given.map_or_else(
                || {
                    s.examples
                        .get(reason)
                        .map_or_else(|| reason.advice().to_owned(), advice::concrete)
                },
                |a| a.texts[0].clone(),
            );
            out.push_str(&format!("\n  {:<24} {n:>6}  {first}", reason.code()));
            let indent = " ".repeat(2 + 24 + 1 + 6 + 2);
            for text in given.iter().flat_map(|a| &a.texts[1..]) {
                out.push_str(&format!("\n{indent}{text}"));
            }
            if let Some(a) = given.filter(|a| a.others > 0) {
                out.push_str(&format!(
                    "\n{indent}({} with other specifics: --wide or --json names them)",
                    count(a.others, "more verdict")
                ));
            }
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
            "\n  {} drop records not printed (more than {} a second of one reason; counted above)",
            s.drop_records_suppressed,
            crate::engine::RECORDS_PER_SECOND
        ));
    }
    if let Some((n, p50, p90, p99, max)) = s.latency_percentiles() {
        out.push_str(&format!(
            "\n  connect latency ({}): p50 {p50:.2} ms, p90 {p90:.2} ms, p99 {p99:.2} ms, max {max:.2} ms",
            count(n, "handshake")
        ));
    }
    for m in f.cookie_mismatches() {
        out.push_str(&format!(
            "\n  warning: netns {} sent {} SYN cookies on traced listeners by conntrace's count, {} by its TcpExtSyncookiesSent",
            m.netns, m.traced, m.counter
        ));
    }
    out.push_str(&per_program(
        "kernel reads that failed (facts left absent)",
        &f.read_failures,
    ));
    out.push_str(&per_program(
        "runs the kernel skipped (the program already ran on that CPU; their events missed)",
        &f.program_misses,
    ));
    if let Some(programs) = &f.programs {
        out.push_str(&program_costs(programs));
    }
    out
}

/// A summary line `label: program (n), ...`; empty when `counts` is.
fn per_program(label: &str, counts: &std::collections::BTreeMap<&'static str, u64>) -> String {
    if counts.is_empty() {
        return String::new();
    }
    let list: Vec<String> = counts.iter().map(|(p, n)| format!("{p} ({n})")).collect();
    format!("\n  {label}: {}", list.join(", "))
}

/// The summary's table of what each program cost the kernel (`--bpf-stats`).
fn program_costs(programs: &[crate::kernel::stats::ProgramCost]) -> String {
    let mut out =
        String::from("\n  eBPF program (--bpf-stats)            runs   ns/run  run time ms");
    for p in programs {
        let per_run = p.run_ns.checked_div(p.runs).unwrap_or(0);
        out.push_str(&format!(
            "\n  {:<32} {:>10} {per_run:>8} {:>12.3}",
            p.program,
            p.runs,
            p.run_ns as f64 / 1e6
        ));
    }
    out
}
