//! The reason engine's input: kernel facts in plain Rust types, independent of the wire format
//! (`kernel::decode` builds them from ring-buffer records; `host::counters` from TcpExt
//! counters). A fact the kernel side could not read is `None`, never a made-up 0.

pub mod names;

use std::net::{IpAddr, SocketAddr};

pub use self::names::{DropReason, Errno, NfHook, TcpFlags, TcpState};

/// Addresses and ports from the reporting host's point of view (`s` = local).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FourTuple {
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
}

impl FourTuple {
    /// The same connection seen from the other end.
    pub fn reversed(self) -> Self {
        Self {
            saddr: self.daddr,
            sport: self.dport,
            daddr: self.saddr,
            dport: self.sport,
        }
    }
}

/// The task that was current when the kernel fired the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    /// Thread-group id: the process.
    pub pid: u32,
    /// At most 15 bytes: kept inline, as every kernel event carries one.
    pub comm: compact_str::CompactString,
}

/// Facts every event carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Network namespace inode; `None` when the kernel side could not read it.
    pub netns: Option<u32>,
    pub proc: Proc,
}

/// A TCP packet of a traced port that the kernel dropped (`skb:kfree_skb`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedPacket {
    pub meta: Meta,
    /// `skb->sk` and the tracepoint's `rx_sk`; 0 when none.
    pub sk: u64,
    pub rx_sk: u64,
    /// The local port of `sk` (`None`: no `sk`, or unreadable).
    pub sk_port: Option<u16>,
    /// The state of that socket (`sk`, else `rx_sk`; `None`: neither, or unreadable).
    pub sk_state: Option<TcpState>,
    /// The packet's own tuple (s = its source).
    pub packet: FourTuple,
    pub reason: DropReason,
    /// Where it was dropped (`symbol+offset`).
    pub location: String,
    pub tcp_flags: TcpFlags,
    /// For netfilter drops: the hook, from the kernel stack at the drop.
    pub hook: Option<NfHook>,
    /// The interface the packet arrived on (`skb->skb_iif`), for a received packet.
    pub ifindex: Option<u32>,
    /// The packet is an ICMP error about a TCP segment of a traced port: `packet` is then the
    /// segment the error quotes (s = its source), and this the error.
    pub icmp: Option<Icmp>,
}

/// An ICMP (or ICMPv6) error about a TCP segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Icmp {
    pub icmp_type: u8,
    pub code: u8,
    /// "Fragmentation needed" (ICMPv6 "packet too big"): the next hop's MTU.
    pub mtu: Option<u32>,
}

impl Icmp {
    /// The error's name as iptables' `--reject-with` spells it without its `icmp-` /
    /// `icmp6-` prefix (`port-unreachable`, `host-prohibited`, `adm-prohibited`, ...), else
    /// `type T code C`.
    pub fn name(&self, ipv6: bool) -> String {
        let known = match (ipv6, self.icmp_type, self.code) {
            (false, 3, 0) => "net-unreachable",
            (false, 3, 1) => "host-unreachable",
            (false, 3, 2) => "proto-unreachable",
            (false, 3, 3) => "port-unreachable",
            (false, 3, 4) => "fragmentation-needed",
            (false, 3, 9) => "net-prohibited",
            (false, 3, 10) => "host-prohibited",
            (false, 3, 13) => "admin-prohibited",
            (true, 1, 0) => "no-route",
            (true, 1, 1) => "adm-prohibited",
            (true, 1, 3) => "addr-unreachable",
            (true, 1, 4) => "port-unreachable",
            (true, 2, _) => "packet-too-big",
            (_, t, c) => return format!("type {t} code {c}"),
        };
        known.to_owned()
    }

    /// "Fragmentation needed" / "packet too big": the path's MTU answer.
    pub fn is_too_big(&self, ipv6: bool) -> bool {
        if ipv6 {
            self.icmp_type == 2
        } else {
            self.icmp_type == 3 && self.code == 4
        }
    }
}

/// One routing table's failed answer to a route lookup that `connect()` made
/// (`fib:fib_table_lookup`, `fib6:fib6_table_lookup`: the tracepoint's `err`).
///
/// Linux walks its routing rules (without custom rules: the main table; IPv6 always the local
/// table first) and each table answers; a miss lets the walk go on to the next table, any
/// other error ends it and is what `connect()` returns. When every table misses, `connect()`
/// returns ENETUNREACH (`fib_lookup`, `fib6_rule_lookup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableAnswer {
    /// `-EAGAIN`: no route in this table (IPv4), or a `throw` route: the walk goes on.
    Miss,
    /// IPv4 `-EHOSTUNREACH`: an `unreachable` route. Ends the walk.
    Unreachable,
    /// IPv6 `-EHOSTUNREACH`: an `unreachable` route, or no route in this table: IPv6 derives
    /// `err` from the route's type, and its "no route" entry (`fib6_null_entry`) is itself an
    /// unreachable route. Only the namespace's own route tells them apart.
    MissOrUnreachable,
    /// `-EACCES`: a `prohibit` route. Ends the walk.
    Prohibit,
    /// `-EINVAL`: a `blackhole` route. Ends the walk.
    Blackhole,
    /// Any other error, as this positive errno.
    Other(Errno),
}

impl TableAnswer {
    /// The answer a `fib6_table_lookup` (`ipv6`) or `fib_table_lookup` traced as `err` (< 0).
    pub fn from_kernel(ipv6: bool, err: i32) -> Self {
        match Errno::from_raw(err) {
            Errno::EAGAIN => Self::Miss,
            Errno::EHOSTUNREACH if ipv6 => Self::MissOrUnreachable,
            Errno::EHOSTUNREACH => Self::Unreachable,
            Errno::EACCES => Self::Prohibit,
            Errno::EINVAL => Self::Blackhole,
            e => Self::Other(e),
        }
    }

    /// Whether the walk may have gone on to the next table after this answer.
    pub fn may_go_on(self) -> bool {
        matches!(self, Self::Miss | Self::MissOrUnreachable)
    }
}

/// A connection's receive window, as the namespace's socket listing shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The peer advertises a zero window: `queued` bytes wait in this socket's send queue.
    PeerZero { queued: u64 },
    /// This socket advertises a zero window: `queued` bytes wait in its receive queue, unread.
    LocalFull { queued: u64 },
    /// Data flows again.
    Open,
}

/// Quiet mode: when a server connection was accepted, as far as the kernel knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// accept() returned it at this time (CLOCK_MONOTONIC ns; the fentry path).
    At(u64),
    /// A process held it when it began to shut down: accepted, at a time not recorded.
    Seen,
}

/// Quiet mode: what the kernel kept about a connection until it needed userspace (the event
/// that needed it follows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnHistory {
    /// When the history was written; the connection's namespace; the connect()ing process
    /// for a client, the process that closed it for a server (pid 0 with an empty comm when
    /// none did yet).
    pub meta: Meta,
    pub sk: u64,
    pub server: bool,
    /// Local end first, as of the connection's last state change the kernel saw.
    pub tuple: FourTuple,
    /// SYN_SENT (client) or the child's SYN_RECV (server), CLOCK_MONOTONIC ns.
    pub started_ns: u64,
    pub established_ns: Option<u64>,
    pub accepted: Option<Accepted>,
    /// An orderly shutdown (FIN) had started.
    pub orderly: bool,
}

/// Quiet mode: a check of a connection established past the stall timeout (sock_diag): what
/// it has done so far. Sent once when the connection is found stuck, then when it moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// It has received data (`tcpi_bytes_received > 0`).
    pub received: bool,
    /// It has sent data (`tcpi_bytes_sent > 0`).
    pub sent: bool,
    /// Server: a process holds it (`idiag_inode != 0`): accepted.
    pub accepted: bool,
}

/// A socket's route when it closed (`StateChange::route_cache`), each fact `None` where it
/// was not read. A retransmission whose route lookup failed leaves no cached route and zeroes
/// the route capabilities; an ICMP answer leaves both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteAtClose {
    /// Whether it still had a cached route (`sk_dst_cache`). IPv6 drops a timed-out
    /// socket's cached route whatever the cause.
    pub cached: Option<bool>,
    /// Whether its last route lookup gave it a route (`sk_route_caps` nonzero).
    pub caps: Option<bool>,
}

/// What a connection followed in quiet mode had done when it started or ended closing
/// (`StateChange::progress`): quiet mode sends no first-data or accept event for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closing {
    /// It had received data (`tcp_sock.bytes_received > 0`).
    pub received: bool,
    /// A process held the socket (`sock.sk_socket` set): a server connection was accepted.
    pub owned: bool,
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
        /// On a change to CLOSE: the socket's error, if it had one (else its soft error).
        sk_err: Option<Errno>,
        /// On a change to CLOSE: the socket's soft error (`sk_err_soft`), if it had one: an
        /// ICMP error that came while a process held the socket.
        sk_err_soft: Option<Errno>,
        /// Quiet mode, a connection userspace follows that starts or ends closing: what it
        /// had done by then. `None` when not read.
        closing: Option<Closing>,
        /// On a change to CLOSE: the socket's route then (default otherwise).
        route: RouteAtClose,
    },
    /// `inet_sk_error_report`. `errno` is `None` when the error was 0: an ICMP error came
    /// while the process held the socket and went to `sk_err_soft`.
    SocketError {
        meta: Meta,
        tuple: FourTuple,
        errno: Option<Errno>,
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
        /// The kernel's reset reason (`enum sk_rst_reason` name, 6.10+).
        reason: Option<String>,
        /// Without a socket: TCP flags of the packet the reset answers, when readable.
        answered_flags: Option<TcpFlags>,
    },
    SynRetransmit {
        meta: Meta,
        sk: u64,
        tuple: FourTuple,
    },
    /// A segment of a connection past its handshake was retransmitted
    /// (`tcp:tcp_retransmit_skb`): `bytes` of payload, the connection's MSS then and the
    /// segments the peer had SACKed above the first unacknowledged one (`sacked_out`).
    Retransmit {
        meta: Meta,
        sk: u64,
        tuple: FourTuple,
        bytes: Option<u32>,
        mss: Option<u32>,
        sacked_out: Option<u32>,
    },
    /// A traced connection's window changed (the namespace's socket listing, polled).
    Window {
        meta: Meta,
        tuple: FourTuple,
        window: Window,
    },
    /// `accept()` returned socket `sk` to the current task.
    Accepted { meta: Meta, sk: u64 },
    /// The kernel dropped a TCP packet of a traced port (`skb:kfree_skb`).
    Dropped(DroppedPacket),
    /// The first data a socket received (`outgoing == false`) or sent.
    FirstData { meta: Meta, sk: u64, outgoing: bool },
    /// A listener sent a SYN cookie: `tuple` is the SYN-ACK's (s = the listener).
    CookieSent { meta: Meta, tuple: FourTuple },
    /// A listener's accept queue overflowed: its namespace's `TcpExtListenOverflows` counter grew
    /// by `overflows` while the queue was full (read from /proc, not from an eBPF program).
    ListenOverflow {
        meta: Meta,
        listener: SocketAddr,
        accept_queue: u32,
        backlog: u32,
        overflows: u64,
    },
    /// Quiet mode: a connection's history, before its first event userspace sees.
    History(ConnHistory),
    /// Quiet mode: what a connection past the stall timeout has done (userspace's check).
    Progress {
        meta: Meta,
        sk: u64,
        progress: Progress,
    },
    /// A route lookup of `connect()` failed in routing table `table` (quiet mode, without
    /// the syscall tracepoints). `meta` names the connecting process; `tuple` is the lookup's
    /// flow: `saddr` unspecified until the kernel chose a source, `sport` 0 until a port was
    /// chosen. One `connect()` makes one or more lookups, each trying one or more tables.
    RouteLookupFailed {
        meta: Meta,
        tuple: FourTuple,
        table: u32,
        answer: TableAnswer,
    },
    /// `connect()` returned `-errno` (not EINPROGRESS). `tuple.saddr`/`sport` are unspecified.
    /// `cgroup_refusal`: a cgroup program refused it (seen at the root cgroup's `connect`
    /// hooks), whatever errno that program chose.
    ConnectFailed {
        meta: Meta,
        sk: u64,
        tuple: FourTuple,
        errno: Errno,
        cgroup_refusal: bool,
    },
}

impl KernelEvent {
    /// A state change with nothing read at close (no errors, no closing progress, no route):
    /// what tests build most.
    #[cfg(test)]
    pub fn state(meta: Meta, sk: u64, tuple: FourTuple, old: TcpState, new: TcpState) -> Self {
        Self::State {
            meta,
            sk,
            tuple,
            old,
            new,
            sk_err: None,
            sk_err_soft: None,
            closing: None,
            route: RouteAtClose::default(),
        }
    }

    /// The socket the event is about, when it names one.
    pub fn sk(&self) -> Option<u64> {
        match self {
            Self::State { sk, .. }
            | Self::ResetReceived { sk, .. }
            | Self::SynRetransmit { sk, .. }
            | Self::Progress { sk, .. } => Some(*sk),
            Self::History(h) => Some(h.sk),
            _ => None,
        }
    }
}
