//! What the host tells beyond the eBPF programs, each behind the trait the engine takes (or as
//! events it is fed): which sockets listen on a port and their queues ([`listeners`], through
//! [`sockdiag`]), which firewall rule counted a drop ([`rules`]), the namespaces' TcpExt
//! counters ([`counters`]), and a process in each network namespace ([`netns`]) through which
//! the others enter it. None of them runs on the event hot path.

pub mod containers;
pub mod counters;
pub mod listeners;
pub mod netns;
pub mod rules;
pub mod sockdiag;
