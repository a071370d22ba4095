//! A verdict's `detail`: reason-specific facts, one type per family of reasons. Each is
//! serialized by serde as one JSON object (`detail`); a member is left out when the kernel did
//! not report that fact (never a made-up 0). The JSON Schema is generated from these types.

use schemars::JsonSchema;
use serde::Serialize;

use super::{Direction, Reason};
use crate::engine::{
    facts::{DropReason, NfHook, TcpFlags, TcpState},
    lookup::{Confidence, ConntrackTable, FirewallRule, Listener, Route},
};

fn is_false(b: &bool) -> bool {
    !*b
}

/// The reason-specific facts of a verdict, by family of reasons.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Detail {
    /// `established`, `unexpected_listener`.
    Established(EstablishedDetail),
    /// A stall (`stalled_no_greeting`, `stalled_no_response`, `not_accepted`) and its follow-up.
    Stall(Box<StallDetail>),
    /// A connection that closed: a failed handshake (`refused_no_listener`, `syn_timeout`,
    /// `icmp_unreachable`, or the drop that explains it) or an established connection's end
    /// (`reset_by_peer`, `timeout`).
    Closed(Box<ClosedDetail>),
    /// This host refused a SYN without a socket (server `refused_no_listener`,
    /// `refused_bound_elsewhere`).
    Refusal(RefusalDetail),
    /// `connect()` failed before any packet (`no_route`).
    Connect(ConnectDetail),
    /// A listener's accept queue overflowed (`listen_overflow`, from the namespace's counter).
    Overflow(OverflowDetail),
    /// A connection attempt with no socket on this host: its dropped packets, or its SYN cookie
    /// (`syncookie_ack_lost`).
    Attempt(Box<AttemptDetail>),
}

/// Dropped packets of one kind (reason, direction, hook) during a handshake.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct DroppedKind {
    /// The kernel's drop reason.
    pub kernel_reason: DropReason,
    pub direction: Direction,
    /// Union of the dropped segments' TCP flags.
    pub tcp_flags: TcpFlags,
    pub count: u32,
    /// Where the kernel dropped them (`symbol+offset`), from the first one.
    pub location: String,
    /// For netfilter drops: the hook, from the kernel stack at the drop.
    pub hook: Option<NfHook>,
}

/// The firewall's answer of a `policy drop` chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
pub enum Policy {
    #[serde(rename = "drop")]
    Drop,
}

/// The rule behind a netfilter drop (`detail.rule`): a rule, or a chain's `policy drop`.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum RuleRef {
    Rule(FirewallRule),
    Policy {
        family: String,
        table: String,
        chain: String,
        policy: Policy,
    },
}

/// What the handshake's drops tell: the drops themselves and, when one explains the failure,
/// where it happened and which firewall rule did it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
pub struct DropFacts {
    /// The handshake's dropped packets, by kind.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drops: Vec<DroppedKind>,
    /// The netfilter hook of the drop that explains the failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<NfHook>,
    /// The rule that dropped it, from the firewall's own counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleRef>,
    /// Several rules counted packets: any of them may have dropped these.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_candidates: Option<Vec<FirewallRule>>,
    /// How sure the naming of `rule` or `rule_candidates` is, from the counters alone, as of
    /// the look-up at the connection's first drop of that kind (later ones are only counted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_confidence: Option<Confidence>,
    /// Why the rule could not be named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_not_found: Option<String>,
    /// A REJECT rule's answer, in iptables' spelling (`tcp-reset`, `icmp-port-unreachable`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reject_with: Option<String>,
    /// Packets of the explaining kind dropped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u32>,
    /// Where the explaining drop happened (`symbol+offset`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// `rp_filter_drop`: the interfaces the reverse-path check compared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rp_filter: Option<RpFilterFacts>,
    /// `conntrack_table_full`: the namespace's table when the drop came.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<ConntrackTable>,
    /// `neighbour_failed`: the next hop whose link-layer address could not be resolved, when
    /// it is not the other end itself (the gateway of this namespace's route to it, read at
    /// the verdict).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_hop: Option<std::net::IpAddr>,
    /// Drops of this connection's packets in namespaces that forward them (routers seen from
    /// this host).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub path_drops: Vec<PathDrop>,
    /// The drops that explain the verdict happened at the connection's other end, in this
    /// network namespace (inode) of the same host: `drops`, `hook` and `rule` are that
    /// namespace's, `direction` as its packets travelled there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_netns: Option<u32>,
}

/// `rp_filter_drop`: why the reverse-path filter refused the packets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
pub struct RpFilterFacts {
    /// The interface the packets arrived on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arrived_on: Option<String>,
    /// The interface the route back to their source leaves by.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route_back_via: Option<String>,
    /// The namespace's TcpExtIPReversePathFilter counter when the verdict was decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counter: Option<u64>,
}

/// Dropped packets of one kind in a namespace that forwards the connection's traffic.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct PathDrop {
    /// The forwarding namespace.
    pub netns: Option<u32>,
    pub kernel_reason: DropReason,
    pub location: String,
    /// Union of the dropped segments' TCP flags.
    pub tcp_flags: TcpFlags,
    pub count: u32,
    /// The interface they arrived on there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arrived_on: Option<String>,
}

/// A listening socket as a verdict names it.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct ListenerRef {
    /// `ip:port` (`[ip]:port` for IPv6).
    pub address: String,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// An IPv6 listener's `IPV6_V6ONLY` (sock_diag): `true`, it takes no IPv4 connection.
    /// Absent for IPv4 listeners and when unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub v6only: Option<bool>,
}

impl From<&Listener> for ListenerRef {
    fn from(l: &Listener) -> Self {
        Self {
            address: l.addr.to_string(),
            pid: l.pid,
            comm: l.comm.clone(),
            v6only: l.v6only,
        }
    }
}

/// The listener a connection waits in, and its accept queue (sock_diag).
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
pub struct QueueFacts {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listener: Option<ListenerRef>,
    /// Connections waiting to be accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accept_queue: Option<u32>,
    /// The queue's limit: the listen() backlog (capped by net.core.somaxconn).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backlog: Option<u32>,
    /// The listener's namespace's `net.core.somaxconn` (the cap on any backlog there), read
    /// when the verdict is made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub somaxconn: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
pub struct EstablishedDetail {
    /// Dropped packets that delayed the handshake (a retransmitted SYN got through).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drops: Vec<DroppedKind>,
    /// The handshake completed with a SYN cookie.
    #[serde(skip_serializing_if = "is_false")]
    pub syn_cookie: bool,
    /// Server: whether accept() returned it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accepted: Option<bool>,
    /// Server: from ESTABLISHED to accept() returning it (0 when accept() came first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accept_delay_ms: Option<f64>,
    /// `unexpected_listener`: the processes `--expect-comm` named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_comm: Option<Vec<String>>,
}

/// How a stuck connection ended (`detail.ended_by` of a `failed` follow-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum EndedBy {
    /// The failure the kernel reported.
    Failure(Reason),
    Close(CloseKind),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
pub enum CloseKind {
    #[serde(rename = "orderly close")]
    Orderly,
    #[serde(rename = "close")]
    Close,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
pub struct StallDetail {
    #[serde(flatten)]
    pub connection: EstablishedDetail,
    /// `stalled`: how long it had been stuck when reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<f64>,
    /// A follow-up: how long it was stuck in all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stuck_ms: Option<f64>,
    /// A `failed` follow-up: the state it closed from, and what ended it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closed_from: Option<TcpState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_by: Option<EndedBy>,
    /// A `failed` follow-up whose end was a retransmission timeout (`ended_by`
    /// `pmtu_blackhole` or `timeout`): that end's `retransmits` and `path_answer`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retransmits: Option<Retransmits>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_answer: Option<PathAnswer>,
    /// `zero_window`: whose window is zero and what waits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowFacts>,
    #[serde(flatten)]
    pub queue: QueueFacts,
    /// A client's stall (`stalled_no_greeting`, `stalled_no_response`) whose handshake packets
    /// the other end dropped, when conntrace sees that end on this host (`peer_netns`): which
    /// drops and which rule. The stall stays the verdict's reason: it is what the client sees.
    #[serde(flatten)]
    pub drops: DropFacts,
}

/// Which end stopped reading (`detail.window.stopped_reading` of `zero_window`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reader {
    /// The peer: it advertises a zero window, this host's data waits to be sent.
    Peer,
    /// A local process: its receive queue is full and this host advertises a zero window.
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, JsonSchema)]
pub struct WindowFacts {
    pub stopped_reading: Reader,
    /// Bytes waiting: in the send queue (peer) or in the receive queue (local).
    pub queued_bytes: u64,
}

/// Why a client's handshake timed out (`detail.cause` of `syn_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SynTimeoutCause {
    /// The kernel gave up retransmitting the SYN (ETIMEDOUT).
    KernelGaveUp,
    /// The application closed the socket while still in SYN_SENT.
    ApplicationClosed,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct ClosedDetail {
    /// The state the socket left for TCP_CLOSE.
    pub closed_from: TcpState,
    /// Whether a RST arrived during the handshake.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rst_received: Option<bool>,
    /// The state an established connection was in when a RST arrived.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rst_received_in: Option<TcpState>,
    /// How long it had been established (absent when its start was not seen).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub established_ms: Option<f64>,
    /// `true`: it was established before conntrace saw it (opened before conntrace started,
    /// its first events were lost, or it was forgotten after an hour without events). How long it had been established is unknown, and the
    /// verdict's `duration_ms` counts from the first event conntrace saw of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_before_trace: Option<bool>,
    /// `icmp_unreachable`: the ICMP kinds that map to the errno.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp: Option<&'static str>,
    /// SYNs that got no answer before one was answered (ICMP rate limiting).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unanswered_syns: Option<u32>,
    /// `true`: the first SYN's ICMP answer came while `connect()` still held the socket. The
    /// kernel set it aside as a soft error (`sk_err_soft`) and retransmitted the SYN; the
    /// retransmission's answer ended the connection. The wait was the retransmission timeout,
    /// not ICMP rate limiting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_answer_while_busy: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<SynTimeoutCause>,
    /// `syn_timeout`: after how long.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_ms: Option<f64>,
    /// Data retransmissions of the established connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retransmits: Option<Retransmits>,
    /// `pmtu_blackhole`: the path's answer ("fragmentation needed"), when one was seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_answer: Option<PathAnswer>,
    /// `true`: the ring buffer lost events while this connection lived (for one first seen
    /// at its close, at any time before), and its verdict would have depended on one (a
    /// client's `ECONNREFUSED` without a RST seen: a RST lost, or an ICMP port unreachable;
    /// taken for the RST).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events_lost: Option<bool>,
    /// A failed handshake's ICMP answers that this host dropped (its own INPUT rule, say).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer_dropped: Option<AnswerDropped>,
    /// `no_route` of a connection that had its route: `true`, the socket had no route left
    /// when it closed (its retransmissions' lookups failed; an ICMP answer leaves the route).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route_lost: Option<bool>,
    /// `no_route` of an idle connection that timed out after its route went: the
    /// namespace's route to the other end, read when the verdict was made (`kind` `none`,
    /// `unreachable`, `prohibit` or `blackhole`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<Route>,
    /// `syn_timeout` of a client: the listener it tried, in another network namespace of this
    /// host, overflowed its accept queue while the client waited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_listen_queue: Option<PeerListenQueue>,
    #[serde(flatten)]
    pub drops: DropFacts,
    #[serde(flatten)]
    pub queue: QueueFacts,
}

impl ClosedDetail {
    pub fn new(closed_from: TcpState) -> Self {
        Self {
            closed_from,
            rst_received: None,
            rst_received_in: None,
            established_ms: None,
            started_before_trace: None,
            icmp: None,
            unanswered_syns: None,
            first_answer_while_busy: None,
            cause: None,
            after_ms: None,
            retransmits: None,
            path_answer: None,
            answer_dropped: None,
            events_lost: None,
            route_lost: None,
            route: None,
            peer_listen_queue: None,
            drops: DropFacts::default(),
            queue: QueueFacts::default(),
        }
    }
}

/// A listener in another network namespace of this host whose accept queue overflowed while
/// a client of it waited for an answer to its SYNs: a full queue refuses SYNs without a drop
/// (no drop reason names them), so the client only sees silence.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct PeerListenQueue {
    /// The listener's network namespace (inode).
    pub netns: u32,
    /// The listener's address (`0.0.0.0:3306` for one bound to every address).
    #[schemars(with = "String")]
    pub listener: std::net::SocketAddr,
    /// Overflows counted there (growth of its namespace's `TcpExtListenOverflows` while it was
    /// full) from the client's first SYN to the verdict.
    pub overflows: u64,
    /// Its accept queue length and limit (the `listen()` backlog) when last seen full.
    pub accept_queue: u32,
    pub backlog: u32,
    /// Its namespace's `net.core.somaxconn` (the cap on any backlog there), read when the
    /// verdict is made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub somaxconn: Option<u32>,
}

/// An established connection's data retransmissions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, JsonSchema)]
pub struct Retransmits {
    pub count: u32,
    /// The largest and the smallest retransmitted payload, in bytes: of one retransmission,
    /// which with segmentation offload (TSO/GSO) may carry several segments (7,240 bytes at
    /// MSS 1448 was seen), so `largest_bytes` can exceed the MSS.
    pub largest_bytes: u32,
    pub smallest_bytes: u32,
    /// The connection's MSS (`mss_cache`) at the last retransmission, when read and at least
    /// `TCP_MIN_MSS` (88; a smaller one is the kernel's floor, `tcp_min_snd_mss` less options,
    /// as it keeps with the connection's route gone: no path's).
    pub mss: Option<u32>,
    /// The most segments the peer had acknowledged selectively (SACK) above the first
    /// unacknowledged one at a retransmission (`tcp_sock.sacked_out`): above 0, later data
    /// got through while the retransmitted segments did not. `null` when not read.
    pub sacked_out: Option<u32>,
}

/// ICMP errors answering a handshake that this host dropped before TCP saw them
/// (`detail.answer_dropped`): the client waited for an answer that had come.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct AnswerDropped {
    /// The (last) error's type as iptables' `--reject-with` names it without its `icmp-`
    /// prefix: `port-unreachable`, `host-prohibited`, `admin-prohibited`, ...; `type T code C`
    /// for others.
    pub icmp: String,
    /// Where this host dropped them: the drop reason, hook and count.
    pub dropped: DroppedKind,
    /// The rule (or policy) that dropped them, when found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleRef>,
}

/// The "fragmentation needed" (ICMPv6 "packet too big") answer of a hop on the path.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct PathAnswer {
    /// The MTU the hop announced.
    pub mtu: Option<u32>,
    /// Where this host dropped it, when it did: the drop reason, hook and rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped: Option<DroppedKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleRef>,
}

/// Which packet a socket-less RST answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
pub enum Answered {
    #[serde(rename = "SYN")]
    Syn,
    /// The packet could not be read; the RST is taken as a refusal.
    #[serde(rename = "unknown")]
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct RefusalDetail {
    /// This host answered with a RST.
    pub rst_sent: bool,
    pub answered: Answered,
    /// `refused_bound_elsewhere`: the sockets listening on the port at other addresses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listeners: Option<Vec<ListenerRef>>,
}

/// The system call that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Syscall {
    Connect,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct ConnectDetail {
    pub syscall: Syscall,
    /// Packets the connection sent: none.
    pub packets_sent: u32,
    /// `ephemeral_ports_exhausted`: `net.ipv4.ip_local_port_range` (first, last).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_range: Option<[u16; 2]>,
    /// `ephemeral_ports_exhausted`: sockets holding a local port towards the destination, and
    /// how many of them are in TIME_WAIT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sockets_to_destination: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_wait: Option<u32>,
    /// `no_route`: the namespace's route to the destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<Route>,
    /// `true` when `connect()`'s errno was not seen but inferred from what its socket did
    /// (quiet mode, `ephemeral_ports_exhausted`: SYN_SENT and back to CLOSE without ever
    /// getting a local port, which only a failed port search does); absent when `connect()`
    /// reported it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errno_inferred: Option<bool>,
    /// `connect_denied`: `true` when a cgroup program (`cgroup/connect4`, `connect6`) refused
    /// `connect()`, as the root cgroup's programs saw it (quiet mode without fexit); absent
    /// when the refusal came from `connect()`'s result, which does not say who refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_by_cgroup_program: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct OverflowDetail {
    /// Growth of the namespace's TcpExtListenOverflows while this listener was full.
    pub overflows: u64,
    #[serde(flatten)]
    pub queue: QueueFacts,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
pub struct AttemptDetail {
    #[serde(flatten)]
    pub drops: DropFacts,
    /// SYN-ACKs this host sent with a cookie for the attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cookies_sent: Option<u32>,
    /// The listener answered the final ACK with a RST: the cookie did not validate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cookie_invalid: Option<bool>,
    #[serde(flatten)]
    pub queue: QueueFacts,
}

impl Detail {
    /// The drop facts of a family that has them.
    pub fn drop_facts(&self) -> Option<&DropFacts> {
        match self {
            Self::Closed(d) => Some(&d.drops),
            Self::Attempt(d) => Some(&d.drops),
            Self::Stall(d) => Some(&d.drops),
            _ => None,
        }
    }

    pub fn drop_facts_mut(&mut self) -> Option<&mut DropFacts> {
        match self {
            Self::Closed(d) => Some(&mut d.drops),
            Self::Attempt(d) => Some(&mut d.drops),
            Self::Stall(d) => Some(&mut d.drops),
            _ => None,
        }
    }

    /// The listener and queue facts of a family that has them.
    pub fn queue(&self) -> Option<&QueueFacts> {
        match self {
            Self::Closed(d) => Some(&d.queue),
            Self::Attempt(d) => Some(&d.queue),
            Self::Stall(d) => Some(&d.queue),
            Self::Overflow(d) => Some(&d.queue),
            _ => None,
        }
    }

    pub fn queue_mut(&mut self) -> Option<&mut QueueFacts> {
        match self {
            Self::Closed(d) => Some(&mut d.queue),
            Self::Attempt(d) => Some(&mut d.queue),
            Self::Stall(d) => Some(&mut d.queue),
            Self::Overflow(d) => Some(&mut d.queue),
            _ => None,
        }
    }

    /// `unanswered_syns` of an ICMP answer that came to a retransmitted SYN.
    pub fn unanswered_syns(&self) -> Option<u32> {
        match self {
            Self::Closed(d) => d.unanswered_syns,
            _ => None,
        }
    }

    /// Whether conntrace first saw the connection established (`started_before_trace`).
    pub fn started_before_trace(&self) -> bool {
        matches!(self, Self::Closed(d) if d.started_before_trace == Some(true))
    }

    /// Whether this is the end of a connection that had completed its handshake.
    pub fn established(&self) -> bool {
        matches!(self, Self::Closed(d) if !matches!(d.closed_from, TcpState::SynSent | TcpState::SynRecv))
    }

    /// A client's `syn_timeout` toward a listener of this host whose queue overflowed.
    pub fn peer_listen_queue(&self) -> Option<&PeerListenQueue> {
        match self {
            Self::Closed(d) => d.peer_listen_queue.as_ref(),
            _ => None,
        }
    }

    /// Whether the first SYN's ICMP answer came while `connect()` held the socket.
    pub fn first_answer_while_busy(&self) -> bool {
        matches!(self, Self::Closed(d) if d.first_answer_while_busy == Some(true))
    }
}
