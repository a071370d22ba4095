//! Dropped packets of a handshake, and connection attempts that have no socket on this host
//! (a SYN dropped before any socket existed, a SYN answered with a cookie).

use conntrace_common::tcp;

use crate::engine::{
    facts::{DropReason, FourTuple, Meta, NfHook, Proc, TcpFlags},
    lookup::{ConntrackTable, RuleFinding},
    verdict::{Direction, detail::RpFilterFacts},
};

/// With no new drop for this long beyond the SYN backoff's next expected retransmit, an
/// attempt has ended (the peer gave up, or got through and a connection took over).
pub const ATTEMPT_QUIET_NS: u64 = 1_500_000_000;

/// Drops of one kind (same reason, direction and hook) during one handshake.
#[derive(Debug, Clone, PartialEq)]
pub struct HandshakeDrop {
    pub reason: DropReason,
    pub location: String,
    pub hook: Option<NfHook>,
    pub direction: Direction,
    /// Union of the dropped segments' TCP flags.
    pub tcp_flags: TcpFlags,
    pub count: u32,
    pub first_ns: u64,
    pub last_ns: u64,
    /// The interface the first one arrived on (`skb_iif`).
    pub ifindex: Option<u32>,
    /// What the host told at the first drop of this kind (the ruleset or the table may
    /// change before the verdict). Boxed: 200 bytes inline, absent from most drops, and
    /// every open attempt keeps its drops (a SYN flood's tens of thousands).
    pub context: Option<Box<DropContext>>,
}

/// What the host told about a kind of drop when its first packet was dropped.
#[derive(Debug, Clone, PartialEq)]
pub enum DropContext {
    /// A netfilter drop in a rule's code: the rule, from the firewall's counters.
    Rule(RuleFinding),
    /// A netfilter drop outside any rule (`nf_hook_slow`) while the conntrack table was full.
    ConntrackFull(ConntrackTable),
    /// A reverse-path filter drop: the interfaces it compared, and its counter.
    RpFilter(RpFilterFacts),
}

impl HandshakeDrop {
    pub fn same_kind(&self, other: &Self) -> bool {
        self.reason == other.reason && self.direction == other.direction && self.hook == other.hook
    }
}

/// Adds one dropped packet to a list of drops, merging it with drops of the same kind.
pub fn record(drops: &mut Vec<HandshakeDrop>, new: HandshakeDrop) {
    match drops.iter_mut().find(|d| d.same_kind(&new)) {
        Some(d) => {
            d.count += new.count;
            d.tcp_flags |= new.tcp_flags;
            d.last_ns = d.last_ns.max(new.last_ns);
        }
        None => {
            // One kind at a time: a plain push makes room for four, and most attempts (a
            // flood's) have one kind of drop.
            drops.reserve_exact(1);
            drops.push(new);
        }
    }
}

/// SYN cookies a listener sent for one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cookies {
    pub sent: u32,
    pub first_ns: u64,
    pub last_ns: u64,
    /// The listener answered the attempt's ACK with a RST: the cookie did not validate.
    pub rejected: bool,
}

/// A connection attempt with no connection on this host, keyed by netns and tuple (s = this
/// host).
#[derive(Debug, Clone)]
pub struct Attempt {
    pub meta: Meta,
    pub tuple: FourTuple,
    pub drops: Vec<HandshakeDrop>,
    pub proc: Option<Proc>,
    pub cookies: Option<Cookies>,
}

impl Attempt {
    pub fn new(meta: &Meta, tuple: FourTuple, proc: Option<Proc>) -> Self {
        Self {
            meta: meta.clone(),
            tuple,
            drops: Vec::new(),
            proc,
            cookies: None,
        }
    }

    pub fn first_ns(&self) -> u64 {
        let drops = self.drops.iter().map(|d| d.first_ns);
        drops
            .chain(self.cookies.map(|c| c.first_ns))
            .min()
            .unwrap_or(0)
    }

    pub fn last_ns(&self) -> u64 {
        let drops = self.drops.iter().map(|d| d.last_ns);
        drops
            .chain(self.cookies.map(|c| c.last_ns))
            .max()
            .unwrap_or(0)
    }

    /// SYN retransmits back off exponentially from about 1 s, so the next one is due about as
    /// long after the last as the last was after the first; the attempt is over when it is
    /// overdue.
    pub fn ended(&self, now_ns: u64) -> bool {
        let (first, last) = (self.first_ns(), self.last_ns());
        now_ns >= last + (last - first) + 1_000_000_000 + ATTEMPT_QUIET_NS
    }

    /// Whether the other end showed it exists: this host sent one of the dropped segments (its
    /// own client's), one that arrived carried an ACK (a handshake's final ACK, a SYN-ACK),
    /// or the listener answered its cookie's ACK with a RST. A SYN from a spoofed source
    /// shows none of these.
    pub fn answered(&self) -> bool {
        self.cookies.is_some_and(|c| c.rejected)
            || self
                .drops
                .iter()
                .any(|d| d.direction == Direction::Out || d.tcp_flags.has(tcp::flags::ACK))
    }

    /// Counts a cookie SYN-ACK sent at `ts_ns`.
    pub fn cookie_sent(&mut self, ts_ns: u64) {
        let c = self.cookies.get_or_insert(Cookies {
            sent: 0,
            first_ns: ts_ns,
            last_ns: ts_ns,
            rejected: false,
        });
        c.sent += 1;
        c.last_ns = ts_ns;
    }
}
