//! What the engine may ask the host, behind traits so that it stays pure: the binary injects
//! the real look-ups (`host::listeners`, `host::rules`), tests inject tables.

use std::net::SocketAddr;

use schemars::JsonSchema;
use serde::Serialize;

use super::facts::NfHook;

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
}

/// Tells the engine which sockets listen on a port in a network namespace.
pub trait ListenerLookup {
    fn listening_on(&mut self, netns: Option<u32>, port: u16) -> Vec<Listener>;
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
    #[serde(skip)]
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

/// Finds the netfilter rule behind a drop without changing the firewall.
pub trait RuleLookup {
    /// `ipv6`: the dropped packet's IP version selects `ip6`/`inet` over `ip`/`inet` tables.
    fn find(&mut self, netns: Option<u32>, hook: Option<NfHook>, ipv6: bool) -> RuleFinding;
}
