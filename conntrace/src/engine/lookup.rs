//! What the engine may ask the host, behind traits so that it stays pure: the binary injects
//! the real look-ups (`host::listeners`, `host::rules`), tests inject tables.

use std::net::{IpAddr, SocketAddr};

use schemars::JsonSchema;
use serde::Serialize;

use super::facts::{FourTuple, NfHook, Proc, TcpState};

/// A socket listening on a port, and the process holding it when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// Connections waiting in its accept queue, and the queue's limit (the listen() backlog),
    /// when known (sock_diag).
    pub accept_queue: Option<u32>,
    pub backlog: Option<u32>,
    /// An IPv6 listener's `IPV6_V6ONLY` (sock_diag): set, `[::]` takes no IPv4 connection.
    /// `None` for IPv4 listeners or when unknown (/proc/net/tcp6 does not say).
    pub v6only: Option<bool>,
}

/// Tells the engine which sockets listen on a port in a network namespace.
pub trait ListenerLookup {
    fn listening_on(&mut self, netns: Option<u32>, port: u16) -> Vec<Listener>;

    /// The listener on `port` whose accept queue holds the established child socket
    /// `child_sk` (an SO_REUSEPORT group has several listeners on one port), with its own
    /// queue; `None` when unknown.
    fn holder(&mut self, netns: Option<u32>, port: u16, child_sk: u64) -> Option<Listener> {
        let _ = (netns, port, child_sk);
        None
    }

    /// The process holding the connected socket `tuple` (local end first) in `netns` now:
    /// the accepting process of a server connection where no accept hook named it (quiet
    /// mode). `None` when the socket is gone, no process holds it, or it cannot be asked.
    fn owner(&mut self, netns: Option<u32>, tuple: FourTuple) -> Option<Proc> {
        let _ = (netns, tuple);
        None
    }

    /// The process that held connected socket `tuple` (local end first) in `netns` when
    /// conntrace started: for a connection already open then, whose socket is gone when its
    /// verdict is made. `None` when not known.
    fn owner_at_start(&mut self, netns: Option<u32>, tuple: FourTuple) -> Option<Proc> {
        let _ = (netns, tuple);
        None
    }

    /// The state of the full socket holding `tuple` (local end first) in `netns` now
    /// (sock_diag): whether a packet that reached no socket belongs to a connection this
    /// host has. `None` when there is none (a request or TIME_WAIT socket does not count) or
    /// it cannot be asked.
    fn socket_state(&mut self, netns: Option<u32>, tuple: FourTuple) -> Option<TcpState> {
        let _ = (netns, tuple);
        None
    }
}

/// What a route lookup in a namespace found (`ip route get`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    /// A unicast route: packets leave by `dev`.
    Unicast,
    /// The address is this namespace's own.
    Local,
    /// `unreachable` route (EHOSTUNREACH).
    Unreachable,
    /// `prohibit` route (EACCES).
    Prohibit,
    /// `blackhole` route (EINVAL).
    Blackhole,
    /// No route at all (ENETUNREACH).
    None,
    /// Any other route type (broadcast, multicast, throw, ...).
    Other,
}

/// A namespace's route to an address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct Route {
    pub kind: RouteKind,
    /// The device packets leave by, for a unicast route.
    pub dev: Option<String>,
    pub gateway: Option<IpAddr>,
}

/// A namespace's connection tracking table (`nf_conntrack_count` of the namespace against the
/// global `nf_conntrack_max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
pub struct ConntrackTable {
    pub count: u64,
    pub max: u64,
}

/// Who holds local ports towards one destination (`ip_local_port_range`, sock_diag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
pub struct PortUse {
    /// `net.ipv4.ip_local_port_range` of the namespace: first and last port.
    pub range: [u16; 2],
    /// TCP sockets of the namespace with a local port in the range and this destination.
    pub to_destination: u32,
    /// Of those, in TIME_WAIT.
    pub time_wait: u32,
}

/// Facts about a network namespace, read from the host when a verdict needs them.
pub trait NamespaceLookup {
    /// Whether `addr` is one of the namespace's own addresses; `None` when unknown.
    fn is_local(&mut self, netns: Option<u32>, addr: IpAddr) -> Option<bool>;
    /// The namespace's route to `dst`.
    fn route_to(&mut self, netns: Option<u32>, dst: IpAddr) -> Option<Route>;
    /// The name of interface `ifindex` in the namespace.
    fn interface(&mut self, netns: Option<u32>, ifindex: u32) -> Option<String>;
    /// The namespace's conntrack table, when conntrack is loaded there.
    fn conntrack(&mut self, netns: Option<u32>) -> Option<ConntrackTable>;
    /// Local ports held towards `dst`.
    fn ports_to(&mut self, netns: Option<u32>, dst: SocketAddr) -> Option<PortUse>;
    /// The namespace's `net.core.somaxconn`; `None` when unknown.
    fn somaxconn(&mut self, _netns: Option<u32>) -> Option<u32> {
        None
    }
    /// A TcpExt counter of the namespace (`/proc/net/netstat`, without the `TcpExt` prefix).
    fn tcp_ext(&mut self, netns: Option<u32>, counter: &str) -> Option<u64>;
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

/// Where a rule lives.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, JsonSchema, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum RuleBackend {
    /// nftables: `nft` rules and the iptables-nft rules stored in it.
    #[default]
    Nftables,
    /// x_tables, loaded with iptables-legacy (`iptables-legacy-save`).
    IptablesLegacy,
}

/// How sure the naming of a rule is, from the counters alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Confidence {
    /// Exactly one rule's counter moved by exactly the packets the attempt lost.
    Exact,
    /// Only one dropping rule's counter moved at all, though not by exactly that count.
    OnlyOne,
    /// Several moved and the count does not single one out: the first is the closest fit.
    Ambiguous,
}

/// A firewall rule as the ruleset listing shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct FirewallRule {
    /// nftables family: `ip`, `ip6`, `inet`.
    pub family: String,
    pub table: String,
    pub chain: String,
    /// nftables rule handle.
    pub handle: u64,
    /// The rule as `nft list` prints it, without its counter and handle: `tcp dport 3306 drop`.
    pub text: String,
    /// The rule's comment (`-m comment --comment`, as `iptables-save` shows it), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    pub backend: RuleBackend,
    /// For an iptables-nft rule: the line `iptables-save` prints for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iptables: Option<String>,
    #[serde(skip)]
    pub action: RuleAction,
    /// Packets it matched since the baseline (start-up, or the namespace's first sighting),
    /// as read when it was looked up (a connection's first drop of a kind).
    pub packets: u64,
}

/// Which rule dropped a packet, as far as the firewall's own counters tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleFinding {
    /// One dropping or rejecting rule at the hook counted the packets.
    Rule {
        rule: FirewallRule,
        confidence: Confidence,
    },
    /// Several did, most likely first: any of them may have dropped this connection's packets.
    Candidates {
        rules: Vec<FirewallRule>,
        confidence: Confidence,
    },
    /// No rule counted, and a base chain at the hook has policy drop.
    Policy {
        family: String,
        table: String,
        chain: String,
    },
    /// The rule could not be found; `why` says what was missing (no `nft`, no counters, ...).
    NotFound { why: String },
}

/// The drop a rule is looked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleQuery {
    /// The namespace that dropped the packet (inode).
    pub netns: Option<u32>,
    pub hook: Option<NfHook>,
    /// The dropped packet's IP version: `ip6`/`inet` and ip6tables-legacy tables, else
    /// `ip`/`inet` and iptables-legacy.
    pub ipv6: bool,
    /// Packets of this attempt dropped at this hook so far; 0: unknown.
    pub dropped: u32,
    /// CLOCK_MONOTONIC ns of the attempt's first drop: counts are measured from the last
    /// reading finished before it (else from start-up).
    pub first_drop_ns: Option<u64>,
    /// CLOCK_MONOTONIC ns of its last drop: a reading started before it is not reused.
    pub last_drop_ns: Option<u64>,
    /// The `kfree_skb` location (`nft_do_chain+0x3e8`): a drop in `nft_do_chain` was made by
    /// nftables, so iptables-legacy is not consulted.
    pub location: Option<String>,
}

/// Finds the netfilter rule behind a drop without changing the firewall.
pub trait RuleLookup {
    fn find(&mut self, query: &RuleQuery) -> RuleFinding;
}
