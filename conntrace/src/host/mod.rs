//! What the host tells beyond the eBPF programs, each behind the trait the engine takes (or as
//! events it is fed): which sockets listen on a port and their queues ([`listeners`], through
//! [`sockdiag`]), which firewall rule counted a drop ([`rules`]: nftables, iptables-nft with
//! its comment, iptables-legacy), the namespaces' TcpExt counters ([`counters`]), a
//! namespace's addresses, routes, interfaces, conntrack table and local ports
//! ([`namespaces`]), zero windows of traced connections ([`windows`], polled through
//! sock_diag), the processes holding the connections open at start-up ([`owners`]), and a
//! process in each network namespace ([`netns`]) through which the others enter it. None of them runs on the event hot path but the address check of
//! [`namespaces`], which answers from a cache.

pub mod containers;
pub mod counters;
pub mod listeners;
pub mod namespaces;
pub mod netns;
pub mod owners;
pub mod rules;
pub mod sockdiag;
pub mod stalls;
pub mod windows;
