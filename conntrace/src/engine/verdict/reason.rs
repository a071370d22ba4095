//! Verdict reasons: stable snake_case codes, each with its one table row: the sides that report
//! it, how conntrace decides it, the advice, and the file of `engine/rules/` that decides it.
//! `conntrace explain`, the human output and the README's table all read this table.

use schemars::JsonSchema;
use serde::Serialize;

/// Stable verdict codes. Never renamed; new ones are added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, JsonSchema)]
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
    RpFilterDrop,
    ConntrackTableFull,
    KernelDrop,
    EphemeralPortsExhausted,
    ConnectDenied,
    PmtuBlackhole,
    ZeroWindow,
    SocketDestroyed,
}

/// One reason's documentation.
#[derive(Debug, Clone, Copy)]
pub struct ReasonDoc {
    pub reason: Reason,
    pub code: &'static str,
    /// Which ends report it: `client`, `server` or `client, server`.
    pub sides: &'static str,
    /// How conntrace decides it from the kernel's facts.
    pub decided: &'static str,
    /// One line of advice.
    pub advice: &'static str,
    /// The file under `conntrace/src/engine/rules/` whose rule decides it.
    pub home: &'static str,
}

macro_rules! doc {
    ($reason:ident, $code:literal, $sides:literal, $home:literal, $decided:literal, $advice:literal $(,)?) => {
        ReasonDoc {
            reason: Reason::$reason,
            code: $code,
            sides: $sides,
            home: $home,
            decided: $decided,
            advice: $advice,
        }
    };
}

/// Every reason, in the order `explain` lists them.
pub const REASONS: &[ReasonDoc] = &[
    doc!(
        Established,
        "established",
        "client, server",
        "established.rs",
        "The socket reached TCP_ESTABLISHED (sock:inet_sock_set_state). Printed only with --all; a server verdict waits for accept() to name the accepting process.",
        "connection established"
    ),
    doc!(
        RefusedNoListener,
        "refused_no_listener",
        "client, server",
        "handshake.rs",
        "Client: a RST arrived in SYN_SENT (tcp:tcp_receive_reset) and the socket reported ECONNREFUSED. Server: this host sent a RST without a socket (tcp:tcp_send_reset, reset reason NO_SOCKET) in answer to a SYN, read from the packet's TCP header.",
        "nothing listens on that address and port: start the service, or check the address it binds to"
    ),
    doc!(
        RefusedBoundElsewhere,
        "refused_bound_elsewhere",
        "server",
        "listener.rs",
        "A socket-less RST answered a SYN while sock_diag shows a listener on the same port at another address (and none on the wildcard address).",
        "the service listens on this port, but on another address: make it bind the address clients use (or 0.0.0.0)"
    ),
    doc!(
        UnexpectedListener,
        "unexpected_listener",
        "server",
        "established.rs",
        "With --expect-comm, accept() returned the connection to a process whose comm is not in the list.",
        "a process outside --expect-comm accepted the connection: another program holds the port (ss -ltnp)"
    ),
    doc!(
        SynTimeout,
        "syn_timeout",
        "client",
        "handshake.rs",
        "The socket went from SYN_SENT to CLOSE with ETIMEDOUT after SYN retransmits (tcp:tcp_retransmit_skb), or the application closed it in SYN_SENT, and no drop on this host explains it. When the server listens in another network namespace of this host and its accept queue overflowed meanwhile (TcpExtListenOverflows, polled every second: a SYN a full queue refuses is no drop), detail.peer_listen_queue names that listener.",
        "SYNs went unanswered: a firewall drops them, or the host is down or unreachable"
    ),
    doc!(
        NetfilterDrop,
        "netfilter_drop",
        "client, server",
        "drops.rs",
        "skb:kfree_skb reported NETFILTER_DROP for a packet of the handshake. The kernel stack at the drop names the hook (ip_local_deliver: INPUT, __ip_local_out: OUTPUT, ...); the firewall's own rule counters, read with `nft -a list ruleset` in the namespace at start-up and at the first drop, name the rule. The firewall is never changed.",
        "a firewall rule dropped the handshake (see detail.hook and detail.rule): allow the port, or make the rule REJECT with tcp-reset so clients fail at once"
    ),
    doc!(
        NetfilterReject,
        "netfilter_reject",
        "client, server",
        "drops.rs",
        "As netfilter_drop, and the rule whose counter moved is a REJECT: detail.reject_with is its answer. Server: a REJECT answered the client's SYN. Client: its own OUTPUT chain rejected the SYN (e.g. kube-proxy's REJECT for a Service without endpoints); the application saw the REJECT's answer (ECONNREFUSED, EHOSTUNREACH).",
        "a firewall REJECT rule answered the SYN (see detail.reject_with and detail.rule): allow the port if the service should be reachable"
    ),
    doc!(
        IcmpUnreachable,
        "icmp_unreachable",
        "client, server",
        "handshake.rs",
        "The socket failed in SYN_SENT with ECONNREFUSED without any RST received (an ICMP port unreachable), or with EHOSTUNREACH, ENETUNREACH, EACCES or EPERM. detail.unanswered_syns counts the SYNs that got no answer first (ICMP rate limiting); detail.first_answer_while_busy says the first SYN's answer came while connect() held the socket, so the kernel set it aside and retransmitted. An established socket that closed with one of those errors and no RST (teardown.rs): its retransmissions were answered with ICMP errors, which the kernel reports instead of ETIMEDOUT.",
        "a router or firewall answered with ICMP unreachable: check REJECT rules and routes on the path; ICMP answers are rate-limited, so bursts of connections wait for SYN retransmits (detail.unanswered_syns), where --reject-with tcp-reset fails at once"
    ),
    doc!(
        RpFilterDrop,
        "rp_filter_drop",
        "server",
        "drops.rs",
        "skb:kfree_skb reported IP_RPFILTER for the handshake's packets: the reverse-path filter dropped them because the route back to their source leaves by another interface (detail.rp_filter names both and the namespace's TcpExtIPReversePathFilter counter).",
        "the reverse-path filter drops packets whose source is routed out of another interface: fix the routes (asymmetric routing), or set net.ipv4.conf.<if>.rp_filter=2 (loose) there"
    ),
    doc!(
        ConntrackTableFull,
        "conntrack_table_full",
        "client, server",
        "drops.rs",
        "skb:kfree_skb reported NETFILTER_DROP at nf_hook_slow (no rule: nft rules drop in nft_do_chain) while the namespace's conntrack table is full (detail.conntrack: nf_conntrack_count against nf_conntrack_max). Never blamed on a rule.",
        "the conntrack table is full: raise net.netfilter.nf_conntrack_max (in the host namespace), shorten conntrack timeouts, or exempt this traffic with a notrack rule"
    ),
    doc!(
        KernelDrop,
        "kernel_drop",
        "client, server",
        "drops.rs",
        "skb:kfree_skb dropped the handshake's packets for a reason with no code of its own: kernel_reason is the kernel's drop reason (enum skb_drop_reason, named from BTF, so reasons of newer kernels flow through) and detail.location where it happened.",
        "the kernel dropped the handshake: look up kernel_reason (enum skb_drop_reason) and detail.location"
    ),
    doc!(
        NoRoute,
        "no_route",
        "client, server",
        "connect.rs",
        "This host's routing table has no route to the other end. Either connect() itself failed before any packet: ENETUNREACH or EHOSTUNREACH, or EACCES/EINVAL where the namespace's route to the destination is a prohibit or blackhole route (detail.route); the errno is connect()'s own result (fexit, or the syscall when connections stream), or, in quiet mode without fexit, worked out from the routing tables' failed answers to its route lookup (fib:fib_table_lookup, fib6:fib6_table_lookup), misses checked against the namespace's route. Or a connection lost the route it had (deleted, its device gone): its retransmissions looked the route up again and failed, and the kernel gave up with that error (ENETUNREACH, EHOSTUNREACH, EACCES), leaving the socket without a route when it closed (detail.route_lost): IPv4 with no cached route (sk_dst_cache), IPv6, which drops a timed-out socket's cached route whatever the cause, with its route capabilities zeroed by the failed lookup (sk_route_caps), both read at CLOSE. An ICMP answer leaves the route in place: icmp_unreachable. Or an idle IPv4 connection whose route went before its next segment: that segment is freed before it has an IP header (IP_OUTNOROUTES), nothing is in flight, and the kernel gives up probing with ETIMEDOUT; with no route cached at its close and none in the namespace's routing table when the verdict is made (detail.route), it is no_route, else timeout.",
        "this host has no route to the other end: check the routing table (and the device) of its namespace"
    ),
    doc!(
        EphemeralPortsExhausted,
        "ephemeral_ports_exhausted",
        "client",
        "connect.rs",
        "connect() failed with EADDRNOTAVAIL before any packet: every port of net.ipv4.ip_local_port_range towards that destination is taken (detail.port_range, detail.sockets_to_destination, detail.time_wait from sock_diag). Where connect()'s result is not traced (quiet mode without fexit), EADDRNOTAVAIL is inferred from a socket that went SYN_SENT and back to CLOSE without ever getting a local port (detail.errno_inferred).",
        "the client ran out of local ports towards this destination: reuse connections (pooling, keep-alive), widen net.ipv4.ip_local_port_range, or let the server close first so TIME_WAIT stays there"
    ),
    doc!(
        ConnectDenied,
        "connect_denied",
        "client",
        "connect.rs",
        "connect() failed before any packet and no route explains it: a cgroup BPF connect program (detail.refused_by_cgroup_program where conntrace's own root-cgroup programs saw it, whatever errno it chose) or an LSM (SELinux, AppArmor) refused it (EPERM, EACCES).",
        "a local policy refused the connection: check cgroup BPF programs (bpftool cgroup tree) and the LSM's audit log"
    ),
    doc!(
        NeighbourFailed,
        "neighbour_failed",
        "client, server",
        "drops.rs",
        "skb:kfree_skb reported NEIGH_FAILED for the handshake's packets: ARP or neighbour discovery for the next hop got no answer.",
        "the next hop never answered ARP/neighbour discovery: the address is not on the link, or the host is down"
    ),
    doc!(
        ListenOverflow,
        "listen_overflow",
        "server",
        "listener.rs",
        "Per connection: skb:kfree_skb reported TCP_LISTEN_OVERFLOW for its final ACK. Per listener: the namespace's TcpExtListenOverflows counter grew while a traced listener's accept queue was full (sock_diag), as a SYN refused for a full queue has no drop reason.",
        "the listener's accept queue was full: the server does not call accept() fast enough; raise the backlog or fix the server"
    ),
    doc!(
        SyncookieAckLost,
        "syncookie_ack_lost",
        "server",
        "cookies.rs",
        "A SYN-ACK for the 4-tuple left with a SYN cookie (fentry:cookie_v4_init_sequence, or net:net_dev_queue: a SYN-ACK without an owning request socket). No socket was created for that 4-tuple afterwards. Drops of the final ACK seen meanwhile name where it went.",
        "a SYN cookie was sent and no socket was ever created: the client's final ACK was lost or dropped (see detail.hook), and the client believes it is connected"
    ),
    doc!(
        StalledNoGreeting,
        "stalled_no_greeting",
        "client",
        "stalls.rs",
        "Established for --stall-timeout with no byte received and none sent: when connections stream, from the first-data hooks (sock:sk_data_ready, sock:sock_send_length); in quiet mode (the default), from a check every tenth of --stall-timeout (100 ms to 1 s) that asks sock_diag about connections past the timeout (tcpi_bytes_received, data sent). One follow-up: resolved when data comes, failed when the connection ends.",
        "connected, but the server never spoke first (MySQL, SMTP, ...): on the server, look for syncookie_ack_lost, listen_overflow or not_accepted; the server may have no socket for this connection"
    ),
    doc!(
        StalledNoResponse,
        "stalled_no_response",
        "client",
        "stalls.rs",
        "Established for --stall-timeout, data sent, nothing received. One follow-up as for stalled_no_greeting.",
        "the request went out but nothing came back: the server is stuck or has no socket for this connection"
    ),
    doc!(
        NotAccepted,
        "not_accepted",
        "server",
        "stalls.rs",
        "The child socket was established for --stall-timeout and accept() had not returned it: when connections stream, from the accept hooks; in quiet mode, no process held the socket (sock_diag's idiag_inode) at a check (every tenth of --stall-timeout). Resolved when accept() does.",
        "the kernel finished the handshake but the application has not called accept(): it is stopped, blocked or overloaded"
    ),
    doc!(
        ZeroWindow,
        "zero_window",
        "client, server",
        "stalls.rs",
        "outcome stalled: an established connection's window stayed zero for --stall-timeout (the namespace's socket listing, sock_diag, polled each second): on the sender's side the peer stopped reading (data waits in the send queue), on the receiver's side the local process does not read (its receive queue is full); detail.window says which. Then resolved or failed like the other stalls.",
        "the receiving application stopped reading: find why it is stuck (detail.window names who stopped reading); the sender blocks meanwhile"
    ),
    doc!(
        ResetByPeer,
        "reset_by_peer",
        "client, server",
        "teardown.rs",
        "An established connection received a RST (tcp:tcp_receive_reset) or reported ECONNRESET.",
        "the other end aborted an established connection (RST): on a client, check the server's logs and its idle/limit settings; on a server, the client's timeouts (it gave up, or closed with data unread)"
    ),
    doc!(
        Timeout,
        "timeout",
        "client, server",
        "teardown.rs",
        "An established connection closed with ETIMEDOUT: its retransmissions (detail.retransmits), or without any its keepalive or zero-window probes, went unanswered. From a closing state (closed_from TCP_FIN_WAIT1, TCP_CLOSING, TCP_LAST_ACK) after the application closed it: its last data or FIN was never acknowledged.",
        "an established connection died of retransmission timeout: the peer or path went away"
    ),
    doc!(
        SocketDestroyed,
        "socket_destroyed",
        "client, server",
        "teardown.rs",
        "An established connection closed with ECONNABORTED: this host's kernel aborted it on request (tcp_abort, through sock_diag's SOCK_DESTROY: `ss -K`, or an agent such as Cilium's socket load-balancer closing connections to a removed backend). The peer sees a RST (reset_by_peer).",
        "something on this host killed the socket (`ss -K`, a CNI or service-mesh agent closing connections to a backend that went away): check which tool destroys sockets here, and let the application reconnect"
    ),
    doc!(
        PmtuBlackhole,
        "pmtu_blackhole",
        "client, server",
        "path.rs",
        "An established connection died (ETIMEDOUT) while only full-size segments were retransmitted (tcp:tcp_retransmit_skb with the segment's length and the MSS, detail.retransmits): a hop with a smaller MTU drops them and its \"fragmentation needed\" never arrives (detail.path_answer says where this host dropped it, when seen; the router's own drops are in detail.path_drops when conntrace sees it).",
        "a path-MTU black hole: let ICMP fragmentation-needed (type 3 code 4) through the firewalls on the path, clamp the MSS (iptables -j TCPMSS --clamp-mss-to-pmtu) or lower the MTU, or set net.ipv4.tcp_mtu_probing=1"
    ),
    doc!(
        Unknown,
        "unknown",
        "client, server",
        "handshake.rs",
        "The facts matched no rule; kernel_reason and detail carry everything the kernel said.",
        "the kernel's facts did not match a known failure: see kernel_reason and detail"
    ),
];

impl Reason {
    /// This reason's row of [`REASONS`].
    pub fn doc(self) -> &'static ReasonDoc {
        REASONS
            .iter()
            .find(|d| d.reason == self)
            .unwrap_or(&REASONS[REASONS.len() - 1])
    }

    pub fn code(self) -> &'static str {
        self.doc().code
    }

    /// One line of advice, shown beside human-readable verdicts.
    pub fn advice(self) -> &'static str {
        self.doc().advice
    }

    /// Parses a reason code as printed in verdicts.
    pub fn from_code(code: &str) -> Option<Self> {
        REASONS
            .iter()
            .find(|d| d.code == code.trim())
            .map(|d| d.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_a_row() {
        let schema = serde_json::to_value(schemars::schema_for!(Reason)).unwrap();
        let codes: Vec<&str> = schema["enum"]
            .as_array()
            .expect("an enum of codes")
            .iter()
            .filter_map(|c| c.as_str())
            .collect();
        assert_eq!(codes.len(), REASONS.len());
        for code in codes {
            assert!(REASONS.iter().any(|d| d.code == code), "{code} has no row");
        }
    }

    /// The rows of README.md's table of reasons (section `## Reasons`): each row's code and
    /// sides, `both` standing for client and server.
    fn readme_rows() -> Vec<(String, Vec<String>)> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        let readme = std::fs::read_to_string(&path).expect("read README.md");
        let (_, section) = readme
            .split_once("\n## Reasons\n")
            .expect("README.md has a `## Reasons` section");
        let section = section.split("\n#").next().unwrap_or(section);
        section
            .lines()
            .filter_map(|line| {
                let (code, rest) = line.strip_prefix("| `")?.split_once("` |")?;
                let sides = match rest.split('|').next()?.trim() {
                    "both" => vec!["client".to_owned(), "server".to_owned()],
                    side => vec![side.to_owned()],
                };
                Some((code.to_owned(), sides))
            })
            .collect()
    }

    #[test]
    fn the_readme_table_has_every_reason_with_its_sides_in_this_order() {
        let rows = readme_rows();
        for d in REASONS {
            let mut sides: Vec<String> = rows
                .iter()
                .filter(|(code, _)| code == d.code)
                .flat_map(|(_, sides)| sides.iter().cloned())
                .collect();
            sides.sort();
            sides.dedup();
            assert!(
                !sides.is_empty(),
                "README.md's Reasons table has no row for `{}`",
                d.code
            );
            let want: Vec<&str> = d.sides.split(", ").collect();
            assert_eq!(
                sides, want,
                "README.md's Reasons table gives `{}` other sides than REASONS",
                d.code
            );
        }
        let mut order: Vec<&str> = Vec::new();
        for (code, _) in &rows {
            assert!(
                Reason::from_code(code).is_some(),
                "README.md's Reasons table has a row for `{code}`, which is no reason code"
            );
            if order.last() != Some(&code.as_str()) {
                order.push(code);
            }
        }
        let codes: Vec<&str> = REASONS.iter().map(|d| d.code).collect();
        assert_eq!(
            order, codes,
            "README.md's Reasons table lists the reasons in REASONS' order, one group of rows each"
        );
    }

    #[test]
    fn every_reason_has_one_row_whose_code_is_its_serialized_name() {
        for d in REASONS {
            assert_eq!(d.reason.code(), d.code);
            assert_eq!(
                serde_json::to_value(d.reason).unwrap(),
                serde_json::Value::from(d.code)
            );
            assert_eq!(Reason::from_code(d.code), Some(d.reason));
            assert_eq!(REASONS.iter().filter(|o| o.reason == d.reason).count(), 1);
            let home = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("src/engine/rules")
                .join(d.home);
            assert!(
                home.exists(),
                "{}: {} does not exist",
                d.code,
                home.display()
            );
        }
    }
}
