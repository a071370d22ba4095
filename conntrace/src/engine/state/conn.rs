//! What the engine knows about one connection: the facts the kernel reported, and where the
//! connection is in its life (`Phase`) and in its reporting (`Report`).

use super::attempt::HandshakeDrop;
use crate::engine::{
    facts::{Errno, FourTuple, Icmp, Meta, Proc, RouteAtClose, TcpState, Window},
    verdict::{Reason, Side, detail::Retransmits},
};

/// Where a connection is in its life, as the engine has seen it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// SYN_SENT (client) or SYN_RECV (server): the handshake is under way.
    Handshake,
    /// The handshake completed at `since_ns`; `orderly` once a shutdown (FIN) started.
    Established { since_ns: u64, orderly: bool },
    /// Reached TCP_CLOSE at `at_ns`, leaving `from`.
    Closed {
        at_ns: u64,
        from: TcpState,
        /// When it had been established.
        established_ns: Option<u64>,
        /// An orderly shutdown (FIN) had started.
        orderly: bool,
    },
}

/// A connection's stall: stuck since `since_ns` for `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    pub reason: Reason,
    /// When the stuck time started (ESTABLISHED).
    pub since_ns: u64,
}

/// What has been reported about a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// Nothing yet.
    Pending,
    /// Its established verdict was decided (printed with `--all`, or an
    /// `unexpected_listener`).
    Established,
    /// Reported `stalled`; no follow-up yet.
    Stalled(Stall),
    /// The stall's follow-up (`resolved` or `failed`) went out.
    Settled(Stall),
}

/// The error a socket reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketError {
    None,
    /// Reported with 0: an ICMP error came while the process held the socket; it went to
    /// `sk_err_soft`, which SO_ERROR hands out (and clears).
    Soft,
    Errno(Errno),
}

/// How the handshake completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// SYN, SYN-ACK, ACK with a request socket (or a client's connect()).
    Normal,
    /// The listener answered with a SYN cookie and validated the final ACK.
    SynCookie,
}

#[derive(Debug, Clone)]
pub struct Conn {
    /// Kernel socket address: the key the table indexes it by.
    pub sk: u64,
    pub side: Side,
    pub netns: Option<u32>,
    pub tuple: FourTuple,
    pub started_ns: u64,
    pub last_ns: u64,
    pub proc: Option<Proc>,
    /// The kernel's TCP state at the last event.
    pub state: TcpState,
    pub phase: Phase,
    pub report: Report,
    /// Server side: when accept() returned it.
    pub accepted_ns: Option<u64>,
    /// Server side: accepted at a time not recorded (quiet mode without an accept hook).
    pub accepted_seen: bool,
    /// Quiet mode: a check past the stall timeout found it without data (client) or not
    /// accepted (server).
    pub found_stuck: bool,
    pub syn_retransmits: u32,
    pub error: SocketError,
    pub connect_errno: Option<Errno>,
    /// Its soft error at close (`sk_err_soft`): an ICMP error that came while a process held
    /// the socket; the kernel went on retransmitting.
    pub soft_errno: Option<Errno>,
    /// State in which a RST was received.
    pub rst_received: Option<TcpState>,
    /// Packets of its handshake the kernel dropped.
    pub drops: Vec<HandshakeDrop>,
    /// Packets the kernel dropped once it was established.
    pub late_drops: Vec<HandshakeDrop>,
    /// Its route when it closed, where read.
    pub route_at_close: RouteAtClose,
    /// Its data retransmissions once established.
    pub retransmits: Option<Retransmits>,
    /// The window, when not open, and since when.
    pub window: Option<(Window, u64)>,
    /// A "fragmentation needed" about its segments, and this host's drop of it if any.
    pub too_big: Option<(Icmp, Option<HandshakeDrop>)>,
    /// The ICMP errors answering its handshake that this host dropped before TCP saw them
    /// (its own firewall's INPUT, say): the last one's type, and the drops.
    pub answers_dropped: Option<(Icmp, Vec<HandshakeDrop>)>,
    /// The ring buffer lost events while it lived, or at all when its start was missed (set
    /// when it is decided): an event of its own (a RST received) may be among them.
    pub events_lost: bool,
    /// When it first received and first sent data.
    pub first_rx_ns: Option<u64>,
    pub first_tx_ns: Option<u64>,
    pub opening: Opening,
    /// First seen established or closing ([`Conn::mid_life`]): its start is unknown.
    pub started_before_trace: bool,
    /// First seen after its start (a client first seen leaving SYN_SENT, or mid-life): it
    /// started before conntrace, or its first events were lost, so `started_ns` is only when
    /// it was first seen, and a loss at any earlier time may hold its events.
    pub start_missed: bool,
}

impl Conn {
    pub fn new(sk: u64, side: Side, meta: &Meta, tuple: FourTuple, state: TcpState) -> Self {
        Self {
            sk,
            side,
            netns: meta.netns,
            tuple,
            started_ns: meta.ts_ns,
            last_ns: meta.ts_ns,
            proc: None,
            state,
            phase: Phase::Handshake,
            report: Report::Pending,
            accepted_ns: None,
            accepted_seen: false,
            found_stuck: false,
            syn_retransmits: 0,
            error: SocketError::None,
            connect_errno: None,
            soft_errno: None,
            rst_received: None,
            drops: Vec::new(),
            late_drops: Vec::new(),
            route_at_close: RouteAtClose::default(),
            retransmits: None,
            window: None,
            too_big: None,
            answers_dropped: None,
            events_lost: false,
            first_rx_ns: None,
            first_tx_ns: None,
            opening: Opening::Normal,
            started_before_trace: false,
            start_missed: false,
        }
    }

    /// A connection first seen in `state`, already established or closing: opened before
    /// conntrace started, or its first events were lost. Its opening has nothing left to
    /// report (no `established` verdict, no greeting or accept() stall); how it ends does.
    pub fn mid_life(sk: u64, side: Side, meta: &Meta, tuple: FourTuple, state: TcpState) -> Self {
        let mut c = Self::new(sk, side, meta, tuple, state);
        c.phase = Phase::Established {
            since_ns: meta.ts_ns,
            orderly: state != TcpState::Established,
        };
        c.report = Report::Established;
        c.started_before_trace = true;
        c.start_missed = true;
        c
    }

    /// The earliest time a fact about this connection can date from: its start, or for one
    /// first seen mid-life, `grace_ns` before that (its error report comes just before the
    /// close that made conntrace see it).
    pub fn started_bound(&self, grace_ns: u64) -> u64 {
        if self.started_before_trace {
            self.started_ns.saturating_sub(grace_ns)
        } else {
            self.started_ns
        }
    }

    /// When it reached ESTABLISHED, if it did.
    pub fn established_ns(&self) -> Option<u64> {
        match self.phase {
            Phase::Handshake => None,
            Phase::Established { since_ns, .. } => Some(since_ns),
            Phase::Closed { established_ns, .. } => established_ns,
        }
    }

    /// When it reached CLOSE and the state it left, if it did.
    pub fn closed(&self) -> Option<(u64, TcpState)> {
        match self.phase {
            Phase::Closed { at_ns, from, .. } => Some((at_ns, from)),
            _ => None,
        }
    }

    /// An orderly shutdown (FIN) started.
    pub fn orderly(&self) -> bool {
        matches!(
            self.phase,
            Phase::Established { orderly: true, .. } | Phase::Closed { orderly: true, .. }
        )
    }

    pub fn establish(&mut self, ts_ns: u64) {
        if let Phase::Handshake = self.phase {
            self.phase = Phase::Established {
                since_ns: ts_ns,
                orderly: false,
            };
        }
    }

    /// An orderly shutdown started (FIN_WAIT1, CLOSE_WAIT, LAST_ACK, CLOSING).
    pub fn start_shutdown(&mut self) {
        if let Phase::Established { orderly, .. } = &mut self.phase {
            *orderly = true;
        }
    }

    pub fn close(&mut self, at_ns: u64, from: TcpState) {
        self.phase = Phase::Closed {
            at_ns,
            from,
            established_ns: self.established_ns(),
            orderly: self.orderly(),
        };
    }

    /// The socket's error as an errno, when it reported one.
    pub fn errno(&self) -> Option<Errno> {
        match self.error {
            SocketError::Errno(e) => Some(e),
            _ => None,
        }
    }

    /// Records a reported socket error (`None`: reported with 0, a soft error). The first
    /// errno stays.
    pub fn set_error(&mut self, errno: Option<Errno>) {
        match (self.error, errno) {
            (SocketError::Errno(_), _) => {}
            (_, Some(e)) => self.error = SocketError::Errno(e),
            (_, None) => self.error = SocketError::Soft,
        }
    }

    /// The stall it is reported in, without a follow-up yet.
    pub fn open_stall(&self) -> Option<Stall> {
        match self.report {
            Report::Stalled(s) => Some(s),
            _ => None,
        }
    }

    /// Counts a data retransmission of `bytes` (when read) with the MSS and the SACKed
    /// segments (`sacked_out`) then. An MSS below
    /// the kernel's `TCP_MIN_MSS` (88) is no path's: it is the kernel's floor,
    /// `net.ipv4.tcp_min_snd_mss` (48 by default) less the options, which `mss_cache` falls to
    /// when the connection's route went away (36 was seen), and it is left out. (A floor raised
    /// above 88 by an administrator shows as it is.)
    pub fn retransmitted(&mut self, bytes: Option<u32>, mss: Option<u32>, sacked_out: Option<u32>) {
        const TCP_MIN_MSS: u32 = 88;
        let mss = mss.filter(|&m| m >= TCP_MIN_MSS);
        let r = self.retransmits.get_or_insert(Retransmits {
            count: 0,
            largest_bytes: bytes.unwrap_or(0),
            smallest_bytes: bytes.unwrap_or(u32::MAX),
            mss,
            sacked_out: None,
        });
        if let Some(n) = sacked_out {
            r.sacked_out = Some(r.sacked_out.map_or(n, |most| most.max(n)));
        }
        r.count += 1;
        if let Some(bytes) = bytes {
            r.largest_bytes = r.largest_bytes.max(bytes);
            r.smallest_bytes = r.smallest_bytes.min(bytes);
        }
        if mss.is_some() {
            r.mss = mss;
        }
    }

    /// Server side: whether accept() returned it (at a known time or not).
    pub fn accepted(&self) -> bool {
        self.accepted_ns.is_some() || self.accepted_seen
    }

    /// Whether it was reported stalled (with or without a follow-up since).
    pub fn was_stalled(&self) -> bool {
        matches!(self.report, Report::Stalled(_) | Report::Settled(_))
    }
}
