//! The reason engine's input: kernel facts in plain Rust types, independent of the wire format.

use std::net::IpAddr;

use serde::Serialize;

/// TCP states as numbered by the kernel's uapi `enum` (`include/net/tcp_states.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    Other(i32),
}

impl TcpState {
    pub fn from_kernel(v: i32) -> Self {
        match v {
            1 => Self::Established,
            2 => Self::SynSent,
            3 => Self::SynRecv,
            4 => Self::FinWait1,
            5 => Self::FinWait2,
            6 => Self::TimeWait,
            7 => Self::Close,
            8 => Self::CloseWait,
            9 => Self::LastAck,
            10 => Self::Listen,
            11 => Self::Closing,
            12 => Self::NewSynRecv,
            other => Self::Other(other),
        }
    }

    pub fn name(self) -> String {
        match self {
            Self::Established => "TCP_ESTABLISHED".into(),
            Self::SynSent => "TCP_SYN_SENT".into(),
            Self::SynRecv => "TCP_SYN_RECV".into(),
            Self::FinWait1 => "TCP_FIN_WAIT1".into(),
            Self::FinWait2 => "TCP_FIN_WAIT2".into(),
            Self::TimeWait => "TCP_TIME_WAIT".into(),
            Self::Close => "TCP_CLOSE".into(),
            Self::CloseWait => "TCP_CLOSE_WAIT".into(),
            Self::LastAck => "TCP_LAST_ACK".into(),
            Self::Listen => "TCP_LISTEN".into(),
            Self::Closing => "TCP_CLOSING".into(),
            Self::NewSynRecv => "TCP_NEW_SYN_RECV".into(),
            Self::Other(v) => format!("TCP_STATE_{v}"),
        }
    }
}

/// A netfilter hook point (the chains iptables names after them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum NfHook {
    #[serde(rename = "PREROUTING")]
    PreRouting,
    #[serde(rename = "INPUT")]
    Input,
    #[serde(rename = "FORWARD")]
    Forward,
    #[serde(rename = "OUTPUT")]
    Output,
    #[serde(rename = "POSTROUTING")]
    PostRouting,
}

impl NfHook {
    /// The nftables hook name: `input`.
    pub fn nft_name(self) -> &'static str {
        match self {
            Self::PreRouting => "prerouting",
            Self::Input => "input",
            Self::Forward => "forward",
            Self::Output => "output",
            Self::PostRouting => "postrouting",
        }
    }
}

/// Addresses and ports from the reporting host's point of view (`s` = local).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FourTuple {
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
}

/// The task that was current when the kernel fired the event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Proc {
    pub pid: u32,
    pub tid: u32,
    /// At most 15 bytes: kept inline, as every kernel event carries one.
    pub comm: compact_str::CompactString,
}

/// Facts every event carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Network namespace inode, 0 if the kernel side could not tell.
    pub netns: u32,
    pub proc: Proc,
}

/// A TCP packet of a traced port that the kernel dropped (`skb:kfree_skb`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedPacket {
    pub meta: Meta,
    /// `skb->sk` and the tracepoint's `rx_sk`; 0 when none.
    pub sk: u64,
    pub rx_sk: u64,
    /// The packet's own tuple (s = its source).
    pub packet: FourTuple,
    /// The kernel's drop reason (`enum skb_drop_reason` name).
    pub reason: String,
    /// Where it was dropped (`symbol+offset`).
    pub location: String,
    pub tcp_flags: u8,
    /// For netfilter drops: the hook, from the kernel stack at the drop.
    pub hook: Option<NfHook>,
}

/// One kernel fact, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    State {
        meta: Meta,
        sk: u64,
        tuple: FourTuple,
        old: TcpState,
        new: TcpState,
        /// On a change to CLOSE: the socket's error (positive errno), if it had one.
        sk_err: Option<i32>,
    },
    /// `inet_sk_error_report`; `errno` is positive.
    SocketError {
        meta: Meta,
        tuple: FourTuple,
        errno: i32,
    },
    ResetReceived {
        meta: Meta,
        sk: u64,
        tuple: FourTuple,
    },
    /// `sk == 0`: the kernel answered a packet that matched no socket.
    ResetSent {
        meta: Meta,
        sk: u64,
        tuple: FourTuple,
        state: Option<TcpState>,
        reason: Option<String>,
        /// Without a socket: TCP flags of the packet the reset answers, when readable.
        answered_flags: Option<u8>,
    },
    SynRetransmit {
        meta: Meta,
        sk: u64,
        tuple: FourTuple,
    },
    Accepted {
        meta: Meta,
        sk: u64,
        fd: i64,
    },
    /// The kernel dropped a TCP packet of a traced port (`skb:kfree_skb`).
    Dropped(DroppedPacket),
    /// The first data a socket received (`outgoing == false`) or sent.
    FirstData {
        meta: Meta,
        sk: u64,
        outgoing: bool,
    },
    /// A listener sent a SYN cookie: `tuple` is the SYN-ACK's (s = the listener).
    CookieSent {
        meta: Meta,
        tuple: FourTuple,
    },
    /// A listener's accept queue overflowed: its namespace's `TcpExtListenOverflows` counter grew
    /// by `overflows` while the queue was full (read from /proc, not from an eBPF program).
    ListenOverflow {
        meta: Meta,
        listener: std::net::SocketAddr,
        accept_queue: u32,
        backlog: u32,
        overflows: u64,
    },
    /// `connect()` returned `-errno` (not EINPROGRESS). `tuple.saddr`/`sport` are unspecified.
    ConnectFailed {
        meta: Meta,
        sk: u64,
        tuple: FourTuple,
        errno: i32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Client,
    Server,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Established,
    Failed,
    /// Established but stuck: no data, or not accepted, within `--stall-timeout`.
    Stalled,
    /// A stalled connection got going (data came, accept() returned).
    Resolved,
}

/// Stable verdict codes. Never renamed; new ones are added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Established,
    RefusedNoListener,
    SynTimeout,
    NoRoute,
    IcmpUnreachable,
    ResetByPeer,
    Timeout,
    UnexpectedListener,
    RefusedBoundElsewhere,
    NetfilterDrop,
    NetfilterReject,
    NeighbourFailed,
    ListenOverflow,
    StalledNoGreeting,
    StalledNoResponse,
    NotAccepted,
    SyncookieAckLost,
    Unknown,
}

impl Reason {
    pub fn code(self) -> &'static str {
        match self {
            Self::Established => "established",
            Self::RefusedNoListener => "refused_no_listener",
            Self::SynTimeout => "syn_timeout",
            Self::NoRoute => "no_route",
            Self::IcmpUnreachable => "icmp_unreachable",
            Self::ResetByPeer => "reset_by_peer",
            Self::Timeout => "timeout",
            Self::UnexpectedListener => "unexpected_listener",
            Self::RefusedBoundElsewhere => "refused_bound_elsewhere",
            Self::NetfilterDrop => "netfilter_drop",
            Self::NetfilterReject => "netfilter_reject",
            Self::NeighbourFailed => "neighbour_failed",
            Self::ListenOverflow => "listen_overflow",
            Self::StalledNoGreeting => "stalled_no_greeting",
            Self::StalledNoResponse => "stalled_no_response",
            Self::NotAccepted => "not_accepted",
            Self::SyncookieAckLost => "syncookie_ack_lost",
            Self::Unknown => "unknown",
        }
    }

    /// One line of advice, shown beside human-readable verdicts.
    pub fn advice(self) -> &'static str {
        match self {
            Self::Established => "connection established",
            Self::RefusedNoListener => {
                "nothing listens on that address and port: start the service, or check the address it binds to"
            }
            Self::SynTimeout => {
                "SYNs went unanswered: a firewall drops them, or the host is down or unreachable"
            }
            Self::NoRoute => {
                "the client has no route to the destination: check its routing table and address"
            }
            Self::IcmpUnreachable => {
                "a router or firewall answered with ICMP unreachable: check REJECT rules and routes on the path; ICMP answers are rate-limited, so bursts of connections wait for SYN retransmits (detail.unanswered_syns), where --reject-with tcp-reset fails at once"
            }
            Self::RefusedBoundElsewhere => {
                "the service listens on this port, but on another address: make it bind the address clients use (or 0.0.0.0)"
            }
            Self::UnexpectedListener => {
                "a process outside --expect-comm accepted the connection: another program holds the port (ss -ltnp)"
            }
            Self::ResetByPeer => {
                "the peer aborted an established connection (RST): check the server's logs and its idle/limit settings"
            }
            Self::Timeout => {
                "an established connection died of retransmission timeout: the peer or path went away"
            }
            Self::NetfilterDrop => {
                "a firewall rule dropped the handshake (see detail.hook and detail.rule): allow the port, or make the rule REJECT with tcp-reset so clients fail at once"
            }
            Self::NetfilterReject => {
                "a firewall REJECT rule answered the SYN (see detail.reject_with and detail.rule): allow the port if the service should be reachable"
            }
            Self::NeighbourFailed => {
                "the next hop never answered ARP/neighbour discovery: the address is not on the link, or the host is down"
            }
            Self::ListenOverflow => {
                "the listener's accept queue was full: the server does not call accept() fast enough; raise the backlog or fix the server"
            }
            Self::StalledNoGreeting => {
                "connected, but the server never spoke first (MySQL, SMTP, ...): on the server, look for syncookie_ack_lost, listen_overflow or not_accepted; the server may have no socket for this connection"
            }
            Self::StalledNoResponse => {
                "the request went out but nothing came back: the server is stuck or has no socket for this connection"
            }
            Self::NotAccepted => {
                "the kernel finished the handshake but the application has not called accept(): it is stopped, blocked or overloaded"
            }
            Self::SyncookieAckLost => {
                "a SYN cookie was sent and no socket was ever created: the client's final ACK was lost or dropped (see detail.hook), and the client believes it is connected"
            }
            Self::Unknown => {
                "the kernel's facts did not match a known failure: see kernel_reason and detail"
            }
        }
    }
}

/// A socket listening on a port, and the process holding it when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub addr: std::net::SocketAddr,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// Connections waiting in its accept queue, and the queue's limit (the listen() backlog),
    /// when known (/proc/net/tcp's rx_queue and tx_queue for a listener).
    pub accept_queue: Option<u32>,
    pub backlog: Option<u32>,
}

/// Tells the engine which sockets listen on a port in a network namespace. The engine stays
/// pure: the real look-up (/proc) is injected by the binary, tests inject a table.
pub trait ListenerLookup {
    fn listening_on(&mut self, netns: u32, port: u16) -> Vec<Listener>;
}

/// What a netfilter rule does with the packets it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleAction {
    Drop,
    /// REJECT: the kernel answers; `with` in iptables' spelling: `icmp-port-unreachable`,
    /// `icmp-host-prohibited`, `icmp6-adm-prohibited`, `tcp-reset`, ...
    Reject {
        with: String,
    },
}

/// A firewall rule as the ruleset listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallRule {
    /// nftables family: `ip`, `ip6`, `inet`.
    pub family: String,
    pub table: String,
    pub chain: String,
    /// nftables rule handle.
    pub handle: u64,
    /// The rule as `nft list` prints it, without its counter and handle: `tcp dport 3306 drop`.
    pub text: String,
    pub action: RuleAction,
    /// Packets it matched since the baseline (start-up, or the namespace's first sighting).
    pub packets: u64,
}

/// Which rule dropped a packet, as far as the firewall's own counters tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleFinding {
    /// Exactly one dropping or rejecting rule at the hook counted packets since the baseline.
    Rule(FirewallRule),
    /// Several did: any of them may have dropped this connection's packets.
    Candidates(Vec<FirewallRule>),
    /// No rule counted, and a base chain at the hook has policy drop.
    Policy {
        family: String,
        table: String,
        chain: String,
    },
    /// The rule could not be found; `why` says what was missing (no `nft`, no counters, ...).
    NotFound { why: String },
}

/// Finds the netfilter rule behind a drop without changing the firewall. The engine stays pure:
/// the binary injects the real look-up (rule counters read with `nft`), tests inject a table.
pub trait RuleLookup {
    /// `ipv6`: the dropped packet's IP version selects `ip6`/`inet` over `ip`/`inet` tables.
    fn find(&mut self, netns: u32, hook: Option<NfHook>, ipv6: bool) -> RuleFinding;
}
