//! `conntrace explain [REASON]`: what a reason code means, how conntrace decides it, what to do.

use std::io::Write;

use crate::engine::model::Reason;

/// Every reason code, in the order `explain` lists them.
pub const ALL: [Reason; 18] = [
    Reason::Established,
    Reason::RefusedNoListener,
    Reason::RefusedBoundElsewhere,
    Reason::UnexpectedListener,
    Reason::SynTimeout,
    Reason::NetfilterDrop,
    Reason::NetfilterReject,
    Reason::IcmpUnreachable,
    Reason::NoRoute,
    Reason::NeighbourFailed,
    Reason::ListenOverflow,
    Reason::SyncookieAckLost,
    Reason::StalledNoGreeting,
    Reason::StalledNoResponse,
    Reason::NotAccepted,
    Reason::ResetByPeer,
    Reason::Timeout,
    Reason::Unknown,
];

/// Which side reports it, and how conntrace decides it from the kernel's facts.
pub fn how_decided(reason: Reason) -> (&'static str, &'static str) {
    match reason {
        Reason::Established => (
            "client, server",
            "The socket reached TCP_ESTABLISHED (sock:inet_sock_set_state). Printed only with --all; a server verdict waits for accept() to name the accepting process.",
        ),
        Reason::RefusedNoListener => (
            "client, server",
            "Client: a RST arrived in SYN_SENT (tcp:tcp_receive_reset) and the socket reported ECONNREFUSED. Server: this host sent a RST without a socket (tcp:tcp_send_reset, reset reason NO_SOCKET) in answer to a SYN, read from the packet's TCP header.",
        ),
        Reason::RefusedBoundElsewhere => (
            "server",
            "A socket-less RST answered a SYN while /proc shows a listener on the same port at another address (and none on the wildcard address).",
        ),
        Reason::UnexpectedListener => (
            "server",
            "With --expect-comm, accept() (syscalls:sys_exit_accept4) returned the connection to a process whose comm is not in the list.",
        ),
        Reason::SynTimeout => (
            "client",
            "The socket went from SYN_SENT to CLOSE with ETIMEDOUT after SYN retransmits (tcp:tcp_retransmit_skb), or the application closed it in SYN_SENT, and no drop on this host explains it.",
        ),
        Reason::NetfilterDrop => (
            "client, server",
            "skb:kfree_skb reported NETFILTER_DROP for a packet of the handshake. The kernel stack at the drop names the hook (ip_local_deliver: INPUT, __ip_local_out: OUTPUT, ...); the firewall's own rule counters, read with `nft -a list ruleset` in the namespace at start-up and at the verdict, name the rule. The firewall is never changed.",
        ),
        Reason::NetfilterReject => (
            "server",
            "As netfilter_drop, and the rule whose counter moved is a REJECT: detail.reject_with is its answer.",
        ),
        Reason::IcmpUnreachable => (
            "client",
            "The socket failed in SYN_SENT with ECONNREFUSED without any RST received (an ICMP port unreachable), or with EHOSTUNREACH, ENETUNREACH, EACCES or EPERM. detail.unanswered_syns counts the SYNs that got no answer first (ICMP rate limiting).",
        ),
        Reason::NoRoute => (
            "client",
            "connect() itself failed with ENETUNREACH or EHOSTUNREACH (syscalls:sys_exit_connect): no packet left the host.",
        ),
        Reason::NeighbourFailed => (
            "client, server",
            "skb:kfree_skb reported NEIGH_FAILED for the handshake's packets: ARP or neighbour discovery for the next hop got no answer.",
        ),
        Reason::ListenOverflow => (
            "server",
            "Per connection: skb:kfree_skb reported TCP_LISTEN_OVERFLOW for its final ACK. Per listener: the namespace's TcpExtListenOverflows counter grew while a traced listener's accept queue was full (sock_diag), as a SYN refused for a full queue has no drop reason.",
        ),
        Reason::SyncookieAckLost => (
            "server",
            "A SYN-ACK for the 4-tuple left without an owning request socket (net:net_dev_queue): a SYN cookie. No socket was created for that 4-tuple afterwards. Drops of the final ACK seen meanwhile name where it went.",
        ),
        Reason::StalledNoGreeting => (
            "client",
            "Established for --stall-timeout with no byte received (sock:sk_data_ready) and none sent (sock:sock_send_length). One follow-up: resolved when data comes, failed when the connection ends.",
        ),
        Reason::StalledNoResponse => (
            "client",
            "Established for --stall-timeout, data sent, nothing received. One follow-up as for stalled_no_greeting.",
        ),
        Reason::NotAccepted => (
            "server",
            "The child socket was established for --stall-timeout and accept() had not returned it. Resolved when accept() does.",
        ),
        Reason::ResetByPeer => (
            "client, server",
            "An established connection received a RST (tcp:tcp_receive_reset) or reported ECONNRESET.",
        ),
        Reason::Timeout => (
            "client, server",
            "An established connection closed with ETIMEDOUT: its retransmissions went unanswered.",
        ),
        Reason::Unknown => (
            "client, server",
            "The facts matched no rule above; kernel_reason and detail carry everything the kernel said.",
        ),
    }
}

/// Writes the explanation of one reason.
pub fn write_one(out: &mut impl Write, reason: Reason) -> std::io::Result<()> {
    let (side, how) = how_decided(reason);
    writeln!(out, "{} ({side})", reason.code())?;
    writeln!(out, "  how conntrace decides: {how}")?;
    writeln!(out, "  what to do: {}", reason.advice())
}

/// Parses a reason code as printed in verdicts.
pub fn parse(code: &str) -> Option<Reason> {
    ALL.into_iter().find(|r| r.code() == code.trim())
}

/// `conntrace explain [REASON]`. An unknown code is an error listing the known ones.
pub fn run(out: &mut impl Write, code: Option<&str>) -> Result<(), ExplainError> {
    match code {
        Some(code) => {
            let reason = parse(code).ok_or_else(|| ExplainError::Unknown(code.to_owned()))?;
            write_one(out, reason)?;
        }
        None => {
            for reason in ALL {
                write_one(out, reason)?;
                writeln!(out)?;
            }
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("unknown reason `{0}`: `conntrace explain` lists them all")]
    Unknown(String),
    #[error("write the explanation: {0}")]
    Write(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_listed_and_parses_back() {
        let mut text = Vec::new();
        run(&mut text, None).expect("explain all");
        let text = String::from_utf8(text).expect("utf-8");
        for r in ALL {
            assert_eq!(parse(r.code()), Some(r));
            assert!(
                text.contains(&format!("{} (", r.code())),
                "{} missing",
                r.code()
            );
        }
        assert!(matches!(
            run(&mut Vec::new(), Some("nope")),
            Err(ExplainError::Unknown(_))
        ));
    }
}
