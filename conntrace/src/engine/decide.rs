//! Which reason a set of kernel facts means. Every rule is here, in one place.

use serde_json::{Map, Value, json};

use super::{
    Conn, EngineConfig,
    drops::HandshakeDrop,
    errno_name,
    model::{
        FirewallRule, FourTuple, Listener, Meta, Outcome, Reason, RuleAction, RuleFinding, Side,
        TcpState,
    },
    ms,
    verdict::{Direction, Verdict},
};

const ENETUNREACH: i32 = 101;
const EHOSTUNREACH: i32 = 113;
const ECONNREFUSED: i32 = 111;
const ETIMEDOUT: i32 = 110;
const ECONNRESET: i32 = 104;
const EACCES: i32 = 13;
const EPERM: i32 = 1;
/// Errors only a handshake produces (a RST, an ICMP answer, a timeout).
const HANDSHAKE_ERRORS: [i32; 3] = [ECONNREFUSED, ETIMEDOUT, ECONNRESET];
/// `connect()` results that are not a connection failure.
const NOT_A_FAILURE: [i32; 4] = [
    114, /* EALREADY */
    106, /* EISCONN */
    4,   /* EINTR */
    11,  /* EAGAIN */
];

fn base(c: &Conn, ts_ns: u64, outcome: Outcome, reason: Reason) -> Verdict {
    Verdict {
        ts_ns,
        side: c.side,
        outcome,
        reason,
        kernel_reason: None,
        errno: c.errno.or(c.connect_errno).map(errno_name),
        saddr: Some(c.tuple.saddr),
        sport: (c.tuple.sport != 0).then_some(c.tuple.sport),
        daddr: c.tuple.daddr,
        dport: c.tuple.dport,
        netns: c.netns,
        pid: c.proc.as_ref().map(|p| p.pid),
        comm: c.proc.as_ref().map(|p| p.comm.to_string()),
        duration_ms: ms(c.started_ns, ts_ns),
        syn_retransmits: c.syn_retransmits,
        detail: Map::new(),
    }
}

/// The verdict of a connection that completed its handshake.
pub(super) fn established(c: &Conn, ts_ns: u64) -> Verdict {
    let at = c.established_ns.unwrap_or(ts_ns);
    let mut v = base(c, at, Outcome::Established, Reason::Established);
    v.ts_ns = ts_ns;
    v.duration_ms = ms(c.started_ns, at);
    v.kernel_reason = Some(TcpState::Established.name());
    if !c.drops.is_empty() {
        // Dropped packets that delayed the handshake (a retransmitted SYN got through).
        v.detail
            .insert("drops".into(), super::drops::drops_detail(&c.drops));
    }
    if c.syn_cookie {
        v.detail.insert("syn_cookie".into(), json!(true));
    }
    if c.side == Side::Server {
        v.detail
            .insert("accepted".into(), json!(c.accepted_ns.is_some()));
        if let Some(accepted) = c.accepted_ns {
            // accept() can return before the ESTABLISHED event fires (the child is queued
            // first): the delay is then 0.
            v.detail
                .insert("accept_delay_ms".into(), json!(ms(at, accepted)));
        }
    }
    v
}

/// What a connection that just became established-and-attributed reports: an
/// `unexpected_listener` failure when a server connection was accepted by a process outside
/// `--expect-comm`, else an `established` verdict with `--all`, else nothing.
pub(super) fn on_established(c: &Conn, ts_ns: u64, cfg: &EngineConfig) -> Option<Verdict> {
    if c.side == Side::Server
        && !cfg.expected_comms.is_empty()
        && let Some(p) = &c.proc
        && !cfg.expected_comms.iter().any(|e| e == p.comm.as_str())
    {
        let mut v = established(c, ts_ns);
        v.outcome = Outcome::Failed;
        v.reason = Reason::UnexpectedListener;
        v.kernel_reason = Some(format!("accepted by {}", p.comm));
        v.detail
            .insert("expected_comm".into(), json!(cfg.expected_comms));
        return Some(v);
    }
    cfg.report_established.then(|| established(c, ts_ns))
}

/// Whether a closed connection can be decided without waiting for more events.
pub(super) fn facts_complete(c: &Conn) -> bool {
    c.errno.is_some()
}

/// The verdict of a connection that reached CLOSE, or `None` for an orderly end.
pub(super) fn closed(c: &Conn, cfg: &EngineConfig) -> Option<Verdict> {
    let (at, from) = c.closed?;
    let errno = c.errno.or(c.connect_errno);
    let mut detail = Map::new();
    detail.insert("closed_from".into(), from.name().into());
    let (outcome, reason, kernel_reason) = if c.established_ns.is_none() {
        if c.side == Side::Server {
            // A passive connection that died in SYN_RECV (its final ACK never came, or a RST did).
            detail.insert("rst_received".into(), json!(c.rst_received.is_some()));
            (Outcome::Failed, Reason::Unknown, from.name())
        } else if c.rst_received.is_some() {
            detail.insert("rst_received".into(), json!(true));
            (
                Outcome::Failed,
                Reason::RefusedNoListener,
                errno.map_or_else(|| "RST received in SYN_SENT".into(), errno_name),
            )
        } else {
            match errno {
                Some(ECONNREFUSED) if cfg.resets_observed => {
                    // ECONNREFUSED without a RST: an ICMP port unreachable (e.g. REJECT).
                    detail.insert("icmp".into(), json!("port-unreachable"));
                    unanswered_syns(c, &mut detail);
                    (
                        Outcome::Failed,
                        Reason::IcmpUnreachable,
                        errno_name(ECONNREFUSED),
                    )
                }
                Some(ECONNREFUSED) => (
                    Outcome::Failed,
                    Reason::RefusedNoListener,
                    errno_name(ECONNREFUSED),
                ),
                Some(e @ (EHOSTUNREACH | ENETUNREACH | EACCES | EPERM)) => {
                    detail.insert(
                        "icmp".into(),
                        json!(match e {
                            ENETUNREACH => "net-unreachable or net-prohibited",
                            EHOSTUNREACH => "host-unreachable, host-prohibited or admin-prohibited",
                            _ => "prohibited",
                        }),
                    );
                    unanswered_syns(c, &mut detail);
                    (Outcome::Failed, Reason::IcmpUnreachable, errno_name(e))
                }
                Some(ETIMEDOUT) => {
                    detail.insert("cause".into(), json!("kernel_gave_up"));
                    detail.insert("after_ms".into(), json!(ms(c.started_ns, at)));
                    (Outcome::Failed, Reason::SynTimeout, errno_name(ETIMEDOUT))
                }
                Some(e) => (Outcome::Failed, Reason::Unknown, errno_name(e)),
                None if from == TcpState::SynSent && c.soft_error => {
                    // The ICMP error arrived while connect() held the socket: the kernel kept
                    // it as a soft error, the application read it (SO_ERROR) and closed.
                    detail.insert(
                        "icmp".into(),
                        json!("unknown: the application read the error before it could be seen"),
                    );
                    (
                        Outcome::Failed,
                        Reason::IcmpUnreachable,
                        "ICMP error while the socket was busy".into(),
                    )
                }
                None if from == TcpState::SynSent => {
                    detail.insert("cause".into(), json!("application_closed"));
                    detail.insert("after_ms".into(), json!(ms(c.started_ns, at)));
                    (
                        Outcome::Failed,
                        Reason::SynTimeout,
                        "closed in TCP_SYN_SENT".into(),
                    )
                }
                None => (Outcome::Failed, Reason::Unknown, from.name()),
            }
        }
    } else if let Some(state) = c.rst_received {
        detail.insert("rst_received_in".into(), state.name().into());
        detail.insert(
            "established_ms".into(),
            json!(ms(c.established_ns.unwrap_or(at), at)),
        );
        (
            Outcome::Failed,
            Reason::ResetByPeer,
            errno.map_or_else(|| errno_name(ECONNRESET), errno_name),
        )
    } else {
        match errno {
            Some(ETIMEDOUT) => {
                detail.insert(
                    "established_ms".into(),
                    json!(ms(c.established_ns.unwrap_or(at), at)),
                );
                (Outcome::Failed, Reason::Timeout, errno_name(ETIMEDOUT))
            }
            Some(ECONNRESET) => (Outcome::Failed, Reason::ResetByPeer, errno_name(ECONNRESET)),
            Some(e) if !c.orderly_close => (Outcome::Failed, Reason::Unknown, errno_name(e)),
            // An orderly or application-initiated end: nothing to report.
            _ => return None,
        }
    };
    let mut v = base(c, at, outcome, reason);
    v.kernel_reason = Some(kernel_reason);
    v.errno = errno.map(errno_name);
    v.detail = detail;
    // A handshake that failed in silence (no answer, or the local stack's own unreachable)
    // with packets dropped on the way: the drop is the cause.
    let silent = matches!(v.reason, Reason::SynTimeout | Reason::Unknown)
        || (v.reason == Reason::IcmpUnreachable && errno == Some(EHOSTUNREACH));
    if c.established_ns.is_none() && c.rst_received.is_none() && silent {
        apply_drops(&mut v, &c.drops);
    } else if !c.drops.is_empty() {
        v.detail
            .insert("drops".into(), super::drops::drops_detail(&c.drops));
    }
    Some(v)
}

/// An ICMP answer that came only to a retransmitted SYN: the first SYNs went unanswered. A
/// REJECT's ICMP is rate-limited per destination (`net.ipv4.icmp_ratelimit`, 1 s after a burst
/// of 6), so a client opening connections quickly waits for its SYN retransmits.
fn unanswered_syns(c: &Conn, detail: &mut Map<String, Value>) {
    if c.syn_retransmits > 0 {
        detail.insert("unanswered_syns".into(), json!(c.syn_retransmits));
    }
}

/// The verdict reason a kernel drop reason stands for, if it explains a failed handshake.
fn drop_cause(kernel_reason: &str) -> Option<Reason> {
    use super::drops::{LISTEN_OVERFLOW, NEIGH_FAILED, NETFILTER_DROP};
    match kernel_reason {
        NETFILTER_DROP => Some(Reason::NetfilterDrop),
        LISTEN_OVERFLOW => Some(Reason::ListenOverflow),
        NEIGH_FAILED => Some(Reason::NeighbourFailed),
        _ => None,
    }
}

/// Names the drop that explains a failed handshake as the verdict's reason, and lists all of
/// its drops in `detail.drops`. The most frequent explaining drop wins.
pub(super) fn apply_drops(v: &mut Verdict, drops: &[HandshakeDrop]) {
    if drops.is_empty() {
        return;
    }
    v.detail
        .insert("drops".into(), super::drops::drops_detail(drops));
    let cause = drops
        .iter()
        .filter_map(|d| drop_cause(&d.reason).map(|r| (r, d)))
        .max_by_key(|(_, d)| d.count);
    let Some((reason, d)) = cause else { return };
    v.outcome = Outcome::Failed;
    v.reason = reason;
    v.kernel_reason = Some(d.reason.clone());
    if reason == Reason::NeighbourFailed {
        // The unreachable came from this host's own neighbour layer, not from the network.
        v.detail.remove("icmp");
    }
    if let Some(hook) = d.hook {
        v.detail.insert("hook".into(), json!(hook));
    }
    if let Some(finding) = d.rule.clone() {
        apply_rule(v, finding);
    }
    v.detail.insert("dropped".into(), json!(d.count));
    if v.side == Side::Server {
        // The SYNs the client sent for this attempt, less the first.
        const SYN: u8 = 0x02;
        let syns: u32 = drops
            .iter()
            .filter(|d| d.direction == Direction::In && d.tcp_flags & SYN != 0)
            .map(|d| d.count)
            .sum();
        v.syn_retransmits = v.syn_retransmits.max(syns.saturating_sub(1));
    }
}

/// A verdict without a socket on this host (a refused or dropped SYN, a failed `connect()`):
/// `tuple` is s = this host.
pub(super) fn socketless(meta: &Meta, tuple: FourTuple, side: Side) -> Verdict {
    Verdict {
        ts_ns: meta.ts_ns,
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
        duration_ms: 0.0,
        syn_retransmits: 0,
        detail: Map::new(),
    }
}

/// `connect()` failed before the socket changed state (no packet was sent).
///
/// `socket_known`: the kernel side resolved the socket, so a lifecycle event would have been
/// seen had a SYN gone out. Without it, errors that only a handshake produces are left to the
/// lifecycle events rather than reported twice.
pub(super) fn connect_failed(
    meta: &Meta,
    tuple: FourTuple,
    errno: i32,
    socket_known: bool,
) -> Option<Verdict> {
    if NOT_A_FAILURE.contains(&errno) || (!socket_known && HANDSHAKE_ERRORS.contains(&errno)) {
        return None;
    }
    let reason = match errno {
        ENETUNREACH | EHOSTUNREACH => Reason::NoRoute,
        _ => Reason::Unknown,
    };
    let mut v = socketless(meta, tuple, Side::Client);
    v.reason = reason;
    v.kernel_reason = Some(errno_name(errno));
    v.errno = Some(errno_name(errno));
    v.saddr = None;
    v.sport = None;
    v.pid = Some(meta.proc.pid);
    v.comm = Some(meta.proc.comm.to_string());
    v.detail.insert("syscall".into(), Value::from("connect"));
    v.detail.insert("packets_sent".into(), Value::from(0));
    Some(v)
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// This host sent a RST because no socket matched the packet. Only a SYN answered that way
/// is a refused connection; when the packet could not be read, the RST is taken as one.
pub(super) fn refused_without_socket(
    meta: &Meta,
    tuple: FourTuple,
    reason: Option<String>,
    answered_flags: Option<u8>,
) -> Option<Verdict> {
    if answered_flags.is_some_and(|f| f & TCP_SYN == 0 || f & TCP_ACK != 0) {
        return None;
    }
    let mut v = socketless(meta, tuple, Side::Server);
    v.reason = Reason::RefusedNoListener;
    v.kernel_reason = Some(reason.unwrap_or_else(|| "RST sent: no socket".into()));
    v.detail.insert("rst_sent".into(), Value::Bool(true));
    v.detail.insert(
        "answered".into(),
        json!(if answered_flags.is_some() {
            "SYN"
        } else {
            "unknown"
        }),
    );
    Some(v)
}

/// `SYN`, `ACK|FIN`, ... for a TCP flags byte.
pub(super) fn tcp_flag_names(flags: u8) -> String {
    const NAMES: [(u8, &str); 8] = [
        (0x02, "SYN"),
        (0x10, "ACK"),
        (0x01, "FIN"),
        (0x04, "RST"),
        (0x08, "PSH"),
        (0x20, "URG"),
        (0x40, "ECE"),
        (0x80, "CWR"),
    ];
    let names: Vec<&str> = NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, n)| *n)
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join("|")
    }
}

/// A dropped packet as this host sees it: `s` is this host's end.
pub(super) fn drop_record(
    meta: &Meta,
    packet: FourTuple,
    outgoing: bool,
    proc: Option<super::model::Proc>,
    reason: String,
    location: String,
    tcp_flags: u8,
) -> super::verdict::DropRecord {
    use super::verdict::{Direction, DropRecord};
    let (direction, saddr, sport, daddr, dport) = if outgoing {
        (
            Direction::Out,
            packet.saddr,
            packet.sport,
            packet.daddr,
            packet.dport,
        )
    } else {
        (
            Direction::In,
            packet.daddr,
            packet.dport,
            packet.saddr,
            packet.sport,
        )
    };
    DropRecord {
        ts_ns: meta.ts_ns,
        netns: meta.netns,
        direction,
        saddr,
        sport,
        daddr,
        dport,
        kernel_reason: reason,
        location,
        tcp_flags: tcp_flag_names(tcp_flags),
        pid: proc.as_ref().map(|p| p.pid),
        comm: proc.map(|p| p.comm.to_string()),
    }
}

/// A server refusal (no socket matched the SYN) while sockets listen on the same port at other
/// addresses: the service is bound elsewhere (the seed's MySQL on 127.0.0.1 only). A listener on
/// the refused address itself or on a wildcard address would have matched; then the refusal has
/// another cause and the verdict stays as it is.
pub(super) fn bound_elsewhere(v: &mut Verdict, listeners: &[Listener]) {
    if v.side != Side::Server || v.reason != Reason::RefusedNoListener || listeners.is_empty() {
        return;
    }
    if listeners
        .iter()
        .any(|l| Some(l.addr.ip()) == v.saddr || l.addr.ip().is_unspecified())
    {
        return;
    }
    v.reason = Reason::RefusedBoundElsewhere;
    let list: Vec<Value> = listeners
        .iter()
        .map(|l| json!({ "address": l.addr.to_string(), "pid": l.pid, "comm": l.comm }))
        .collect();
    v.detail.insert("listeners".into(), Value::Array(list));
}

fn rule_json(r: &FirewallRule) -> Value {
    json!({
        "family": r.family,
        "table": r.table,
        "chain": r.chain,
        "handle": r.handle,
        "text": r.text,
        "packets": r.packets,
    })
}

/// Names the firewall rule behind a netfilter drop. A REJECT rule makes the verdict
/// `netfilter_reject`: the kernel dropped the SYN and answered it.
pub(super) fn apply_rule(v: &mut Verdict, finding: RuleFinding) {
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
    let rejected = match finding {
        RuleFinding::Rule(r) => {
            v.detail.insert("rule".into(), rule_json(&r));
            reject_with(&[&r])
        }
        RuleFinding::Candidates(rs) => {
            v.detail.insert(
                "rule_candidates".into(),
                Value::Array(rs.iter().map(rule_json).collect()),
            );
            reject_with(&rs.iter().collect::<Vec<_>>())
        }
        RuleFinding::Policy {
            family,
            table,
            chain,
        } => {
            v.detail.insert(
                "rule".into(),
                json!({ "family": family, "table": table, "chain": chain, "policy": "drop" }),
            );
            None
        }
        RuleFinding::NotFound { why } => {
            v.detail.insert("rule_not_found".into(), json!(why));
            None
        }
    };
    if let Some(with) = rejected {
        // A REJECT answered: for a dropped handshake that is the verdict itself; for others
        // (a lost cookie ACK) a fact about the drop.
        if v.reason == Reason::NetfilterDrop {
            v.reason = Reason::NetfilterReject;
        }
        v.detail.insert("reject_with".into(), json!(with));
    }
}

/// A listener-level overflow from the kernel's counter: no single client to name, so the
/// remote end is the unspecified address and port 0.
pub(super) fn listen_overflow(
    meta: &Meta,
    listener: std::net::SocketAddr,
    (accept_queue, backlog): (u32, u32),
    overflows: u64,
) -> Verdict {
    let unspecified = match listener {
        std::net::SocketAddr::V4(_) => std::net::IpAddr::from([0u8; 4]),
        std::net::SocketAddr::V6(_) => std::net::IpAddr::from([0u16; 8]),
    };
    let tuple = FourTuple {
        saddr: listener.ip(),
        sport: listener.port(),
        daddr: unspecified,
        dport: 0,
    };
    let mut v = socketless(meta, tuple, Side::Server);
    v.reason = Reason::ListenOverflow;
    v.kernel_reason = Some("TcpExtListenOverflows".into());
    v.detail.insert("overflows".into(), json!(overflows));
    v.detail.insert("accept_queue".into(), json!(accept_queue));
    v.detail.insert("backlog".into(), json!(backlog));
    v
}

/// For a listen-queue overflow: the listener's accept queue and backlog, and who holds it.
pub(super) fn queue_detail(v: &mut Verdict, listeners: &[Listener]) {
    if !matches!(v.reason, Reason::ListenOverflow | Reason::NotAccepted) {
        return;
    }
    let Some(l) = listeners
        .iter()
        .find(|l| Some(l.addr.ip()) == v.saddr)
        .or_else(|| listeners.iter().find(|l| l.addr.ip().is_unspecified()))
    else {
        return;
    };
    v.detail.insert(
        "listener".into(),
        json!({ "address": l.addr.to_string(), "pid": l.pid, "comm": l.comm }),
    );
    v.detail
        .insert("accept_queue".into(), json!(l.accept_queue));
    v.detail.insert("backlog".into(), json!(l.backlog));
}
