//! Dropped packets. A drop during a connection's handshake joins that connection, so its
//! verdict names the drop. A drop with no connection but a cause worth a verdict (a firewall
//! rule, a full accept queue, a failed neighbour) is gathered per connection attempt: the
//! retransmits of one attempt make one verdict with a count. Every other drop is reported
//! alone as a `drop` record.

use serde_json::{Value, json};

use super::{
    Engine, decide,
    model::{DroppedPacket, FourTuple, Meta, NfHook, Proc, RuleFinding, Side},
    verdict::{Direction, Verdict},
};

/// Kernel drop reasons (`enum skb_drop_reason` names) that explain a failed handshake.
pub(crate) const NETFILTER_DROP: &str = "NETFILTER_DROP";
pub(crate) const LISTEN_OVERFLOW: &str = "TCP_LISTEN_OVERFLOW";
pub(crate) const NEIGH_FAILED: &str = "NEIGH_FAILED";
const ATTRIBUTED: [&str; 3] = [NETFILTER_DROP, LISTEN_OVERFLOW, NEIGH_FAILED];

/// Most `drop` records per namespace and kernel reason in one second (a SYN flood's drops would
/// otherwise print one line each); the rest are counted in `summary.drop_records_suppressed`.
pub(crate) const DROP_RECORDS_PER_SECOND: u32 = 50;

/// With no new drop for this long beyond the SYN backoff's next expected retransmit, an
/// attempt has ended (the peer gave up, or got through and a connection took over).
pub(crate) const ATTEMPT_QUIET_NS: u64 = 1_500_000_000;

/// Drops of one kind (same reason, direction and hook) during one handshake.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HandshakeDrop {
    pub reason: String,
    pub location: String,
    pub hook: Option<NfHook>,
    pub direction: Direction,
    /// Union of the dropped segments' TCP flags, as a flags byte.
    pub tcp_flags: u8,
    pub count: u32,
    pub first_ns: u64,
    pub last_ns: u64,
    /// For a netfilter drop: the rule, looked up at the first drop of this kind (the ruleset
    /// may change before the verdict).
    pub rule: Option<RuleFinding>,
}

impl HandshakeDrop {
    fn same_kind(&self, other: &Self) -> bool {
        self.reason == other.reason && self.direction == other.direction && self.hook == other.hook
    }
}

/// Drops of a connection attempt that has no connection on this host (a SYN dropped before any
/// socket existed), keyed by netns and tuple (s = this host).
#[derive(Debug, Clone)]
pub(crate) struct Attempt {
    pub meta: Meta,
    pub tuple: FourTuple,
    pub drops: Vec<HandshakeDrop>,
    pub proc: Option<Proc>,
    /// SYN cookies this host sent for the attempt, and when (first, last).
    pub cookies: u32,
    pub cookie_ns: (u64, u64),
    /// The listener answered the attempt's ACK with a RST: the cookie did not validate.
    pub cookie_rejected: bool,
}

impl Attempt {
    fn new(meta: &Meta, tuple: FourTuple, proc: Option<Proc>) -> Self {
        Self {
            meta: meta.clone(),
            tuple,
            drops: Vec::new(),
            proc,
            cookies: 0,
            cookie_ns: (0, 0),
            cookie_rejected: false,
        }
    }

    fn first_ns(&self) -> u64 {
        let drops = self.drops.iter().map(|d| d.first_ns);
        let cookie = (self.cookies > 0).then_some(self.cookie_ns.0);
        drops.chain(cookie).min().unwrap_or(0)
    }

    fn last_ns(&self) -> u64 {
        let drops = self.drops.iter().map(|d| d.last_ns);
        let cookie = (self.cookies > 0).then_some(self.cookie_ns.1);
        drops.chain(cookie).max().unwrap_or(0)
    }

    /// SYN retransmits back off exponentially from about 1 s, so the next one is due about as
    /// long after the last as the last was after the first; the attempt is over when it is
    /// overdue.
    fn ended(&self, now_ns: u64) -> bool {
        let (first, last) = (self.first_ns(), self.last_ns());
        now_ns >= last + (last - first) + 1_000_000_000 + ATTEMPT_QUIET_NS
    }
}

/// Adds one dropped packet to a list of drops, merging it with drops of the same kind.
pub(crate) fn record(drops: &mut Vec<HandshakeDrop>, new: HandshakeDrop) {
    match drops.iter_mut().find(|d| d.same_kind(&new)) {
        Some(d) => {
            d.count += new.count;
            d.tcp_flags |= new.tcp_flags;
            d.last_ns = d.last_ns.max(new.last_ns);
        }
        None => drops.push(new),
    }
}

/// `detail.drops` of a verdict.
pub(crate) fn drops_detail(drops: &[HandshakeDrop]) -> Value {
    Value::Array(
        drops
            .iter()
            .map(|d| {
                json!({
                    "kernel_reason": d.reason,
                    "direction": d.direction,
                    "tcp_flags": decide::tcp_flag_names(d.tcp_flags),
                    "count": d.count,
                    "location": d.location,
                    "hook": d.hook,
                })
            })
            .collect(),
    )
}

/// A netfilter drop of a kind not yet in `drops`: its rule is looked up now.
fn id_needs_rule(drops: Option<&[HandshakeDrop]>, new: &HandshakeDrop) -> bool {
    new.reason == NETFILTER_DROP && !drops.unwrap_or_default().iter().any(|d| d.same_kind(new))
}

fn reversed(t: FourTuple) -> FourTuple {
    FourTuple {
        saddr: t.daddr,
        sport: t.dport,
        daddr: t.saddr,
        dport: t.sport,
    }
}

impl Engine {
    pub(super) fn on_drop(&mut self, f: DroppedPacket, out: &mut Vec<Verdict>) {
        *self
            .summary
            .drops_by_reason
            .entry(f.reason.clone())
            .or_default() += 1;
        // The packet is outgoing when a local socket sent it: its source is that socket's own
        // end. Incoming packets can carry a socket too (early demux).
        let owner = self.conn_mut(f.sk).map(|c| (c.tuple.sport, c.proc.clone()));
        let outgoing = f.sk != 0
            && f.rx_sk == 0
            && owner
                .as_ref()
                .is_none_or(|(sport, _)| *sport == f.packet.sport || *sport == 0);
        let local = if outgoing {
            f.packet
        } else {
            reversed(f.packet)
        };
        let hs = HandshakeDrop {
            reason: f.reason.clone(),
            location: f.location.clone(),
            hook: f.hook,
            direction: if outgoing {
                Direction::Out
            } else {
                Direction::In
            },
            tcp_flags: f.tcp_flags,
            count: 1,
            first_ns: f.meta.ts_ns,
            last_ns: f.meta.ts_ns,
            rule: None,
        };
        let mut hs = hs;
        // A drop during a handshake belongs to that connection.
        let netns = f.meta.netns;
        let id = (if outgoing {
            self.by_sk.get(&f.sk)
        } else {
            None
        })
        .or_else(|| self.by_tuple.get(&local))
        .copied();
        let joins = id.and_then(|id| self.conns.get(&id)).is_some_and(|c| {
            c.established_ns.is_none() && (c.netns == netns || c.netns == 0 || netns == 0)
        });
        if joins
            && let Some(id) = id
            && id_needs_rule(self.conns.get(&id).map(|c| c.drops.as_slice()), &hs)
        {
            hs.rule = self.look_up_rule(netns, hs.hook, f.packet.daddr.is_ipv6());
        }
        if joins && let Some(c) = id.and_then(|id| self.conns.get_mut(&id)) {
            c.last_ns = f.meta.ts_ns;
            record(&mut c.drops, hs);
            return;
        }
        // The SYN of a refusal just reported: the drop is the refusal itself.
        if !outgoing
            && f.reason == "NO_SOCKET"
            && self.recent_refusals.contains_key(&(netns, local))
        {
            return;
        }
        // Before 6.10 the socket-less reset is not traced: the SYN's NO_SOCKET drop is the
        // only sign of the refusal (the kernel answers it with a RST right before freeing it).
        if !outgoing
            && f.reason == "NO_SOCKET"
            && !self.cfg.socketless_resets_traced
            && let Some(v) = decide::refused_without_socket(
                &f.meta,
                local,
                Some(f.reason.clone()),
                Some(f.tcp_flags),
            )
        {
            self.emit(out, v);
            return;
        }
        // Retransmissions are sent from timers: name the owning connection's process, not
        // whatever task was current.
        let proc = if outgoing {
            owner.and_then(|(_, p)| p)
        } else {
            None
        };
        let key = (netns, local);
        let room = self.attempts.len() < self.cfg.max_connections;
        // Only a packet of no known connection can be an attempt's; drops on established
        // connections are reported alone.
        // A socket decided moments ago (its SYNs purged after it timed out) is no new attempt.
        let decided = outgoing && self.recently_decided.contains_key(&f.sk);
        if id.is_none()
            && !decided
            && ATTRIBUTED.contains(&f.reason.as_str())
            && (room || self.attempts.contains_key(&key))
        {
            if id_needs_rule(self.attempts.get(&key).map(|a| a.drops.as_slice()), &hs) {
                hs.rule = self.look_up_rule(netns, hs.hook, f.packet.daddr.is_ipv6());
            }
            let a = self
                .attempts
                .entry(key)
                .or_insert_with(|| Attempt::new(&f.meta, local, proc.clone()));
            record(&mut a.drops, hs);
            return;
        }
        // A flood must not become a flood of lines: at most DROP_RECORDS_PER_SECOND records per
        // namespace and reason each second; the rest are counted.
        if !self.within_rate((netns, f.reason.clone()), f.meta.ts_ns) {
            self.summary.drop_records_suppressed += 1;
            return;
        }
        self.drops.push(decide::drop_record(
            &f.meta,
            f.packet,
            outgoing,
            proc,
            f.reason,
            f.location,
            f.tcp_flags,
        ));
    }

    /// The rule behind a netfilter drop, when a look-up is configured.
    fn look_up_rule(
        &mut self,
        netns: u32,
        hook: Option<NfHook>,
        ipv6: bool,
    ) -> Option<RuleFinding> {
        let rules = self.rules.as_mut()?;
        Some(rules.find(netns, hook, ipv6))
    }

    /// A connection just appeared on this host: drops of its attempt that came before (a SYN
    /// dropped before one got through) become its own.
    pub(super) fn adopt_attempt(&mut self, sk: u64) {
        let Some(c) = self.conn_mut(sk) else { return };
        let key = (c.netns, c.tuple);
        if c.tuple.sport == 0 {
            return;
        }
        if let Some(a) = self.attempts.remove(&key)
            && let Some(c) = self.conn_mut(sk)
        {
            c.syn_cookie = a.cookies > 0;
            for d in a.drops {
                record(&mut c.drops, d);
            }
            if a.cookies > 0 {
                self.summary.listener(&a.tuple).cookies_validated += 1;
            }
        }
    }

    /// A listener answered a SYN with a cookie: no request socket exists for the attempt, so
    /// it is followed here until a connection takes it over or it ends without one.
    pub(super) fn on_cookie(&mut self, meta: Meta, tuple: FourTuple) {
        self.summary.listener(&tuple).cookies_sent += 1;
        let key = (meta.netns, tuple);
        if !self.attempts.contains_key(&key) && self.attempts.len() >= self.cfg.max_connections {
            return;
        }
        let a = self
            .attempts
            .entry(key)
            .or_insert_with(|| Attempt::new(&meta, tuple, None));
        if a.cookies == 0 {
            a.cookie_ns.0 = meta.ts_ns;
        }
        a.cookies += 1;
        a.cookie_ns.1 = meta.ts_ns;
    }

    /// Verdicts of attempts that ended (all of them when `all`).
    pub(super) fn decide_attempts(&mut self, now_ns: u64, all: bool, out: &mut Vec<Verdict>) {
        let ended: Vec<(u32, FourTuple)> = self
            .attempts
            .iter()
            .filter(|(_, a)| all || a.ended(now_ns))
            .map(|(k, _)| *k)
            .collect();
        for key in ended {
            if let Some(a) = self.attempts.remove(&key) {
                if a.cookies > 0 {
                    self.summary.listener(&a.tuple).cookies_failed += 1;
                    // A SYN flood (spoofed sources) ends in one failed cookie attempt per SYN:
                    // at most DROP_RECORDS_PER_SECOND verdicts per listener each second, the
                    // rest counted (and in the listener's `cookies_failed`).
                    let window = (key.0, format!("cookie attempts {}", a.tuple.sport));
                    if !self.within_rate(window, a.last_ns()) {
                        self.summary.attempt_verdicts_suppressed += 1;
                        continue;
                    }
                }
                let v = attempt_verdict(&a);
                self.emit(out, v);
            }
        }
    }

    /// Counts one record against its window (a namespace and a kind, per second); false when
    /// the window already had DROP_RECORDS_PER_SECOND.
    fn within_rate(&mut self, key: (u32, String), ts_ns: u64) -> bool {
        let second = ts_ns / 1_000_000_000;
        let window = self.drop_windows.entry(key).or_insert((second, 0));
        if window.0 != second {
            *window = (second, 0);
        }
        window.1 += 1;
        window.1 <= DROP_RECORDS_PER_SECOND
    }
}

/// Which side of the connection this host is, from the dropped segments: a SYN coming in or a
/// SYN-ACK going out is a server's; the rest is a client's.
fn attempt_side(drops: &[HandshakeDrop]) -> Side {
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    let server = drops.iter().any(|d| match d.direction {
        Direction::In => d.tcp_flags & SYN == 0 || d.tcp_flags & ACK == 0,
        Direction::Out => d.tcp_flags & SYN != 0 && d.tcp_flags & ACK != 0,
    });
    if server { Side::Server } else { Side::Client }
}

fn attempt_verdict(a: &Attempt) -> Verdict {
    let mut v = decide::socketless(&a.meta, a.tuple, attempt_side(&a.drops));
    v.duration_ms = super::ms(a.first_ns(), a.last_ns());
    v.ts_ns = a.last_ns();
    if let Some(p) = &a.proc {
        v.pid = Some(p.pid);
        v.comm = Some(p.comm.to_string());
    }
    decide::apply_drops(&mut v, &a.drops);
    if a.cookies > 0 {
        // The SYN-ACK carried a cookie and no socket was ever created: the client's final ACK
        // never validated here (dropped on the way, see the drops, or lost).
        v.side = Side::Server;
        v.outcome = super::model::Outcome::Failed;
        v.reason = super::model::Reason::SyncookieAckLost;
        v.kernel_reason = Some("SYN cookie sent, no socket created".into());
        v.detail.insert("cookies_sent".into(), json!(a.cookies));
        if a.cookie_rejected {
            v.detail.insert("cookie_invalid".into(), json!(true));
        }
    }
    v
}
