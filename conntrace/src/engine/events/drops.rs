//! Dropped packets and SYN cookies applied to the engine's facts. A drop joins the connection
//! it belongs to (its handshake, or, once established, its later life); a drop of a forwarded
//! packet joins the connection's path; a handshake packet's drop with no connection here is
//! gathered per attempt; the rest become `drop` records, except drops that are a normal part
//! of TCP, which are only counted.

use std::net::IpAddr;

use conntrace_common::tcp::flags as tcp_flags;

use super::super::{
    Engine,
    facts::{DropReason, DroppedPacket, FourTuple, Meta, TcpState},
    lookup::RuleQuery,
    rules::{self, drops::Explains},
    state::{
        Attempt, ConnId, HandshakeDrop, Opening, attempt, attempt::DropContext, table::AttemptKey,
    },
    verdict::{Direction, Verdict, detail::PathDrop, detail::RpFilterFacts},
};

impl Engine {
    pub(in crate::engine) fn on_drop(&mut self, mut f: DroppedPacket, out: &mut Vec<Verdict>) {
        *self
            .summary
            .drops_by_reason
            .entry(f.reason.clone())
            .or_default() += 1;
        if f.sk != 0 && f.rx_sk == 0 && self.arrived_with_sender_socket(&f) {
            // Received here, before any socket of this namespace had it.
            (f.sk, f.sk_port, f.sk_state) = (0, None, None);
        }
        // The packet is outgoing when a local socket sent it: its source is that socket's own
        // end. Incoming packets can carry a socket too (early demux).
        let owner = self
            .table
            .by_sk(f.sk)
            .map(|c| (c.tuple.sport, c.proc.clone()));
        // Without a tracked connection (quiet mode: closed healthy), the socket's own port.
        let own_port = owner.as_ref().map(|(sport, _)| *sport).or(f.sk_port);
        let outgoing = (f.sk != 0
            && f.rx_sk == 0
            && own_port.is_none_or(|sport| sport == f.packet.sport || sport == 0))
            || self.sent_without_socket(&f);
        // An ICMP error quotes a segment this host sent: its tuple is already this host's.
        let local = if outgoing || f.icmp.is_some() {
            f.packet
        } else {
            f.packet.reversed()
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
            ifindex: f.ifindex,
            context: None,
        };
        let netns = f.meta.netns;
        let id = (if outgoing {
            self.table.id_of(f.sk)
        } else {
            None
        })
        .or_else(|| self.table.id_by_tuple(&local))
        .filter(|&id| {
            self.table
                .get(id)
                .is_some_and(|c| c.netns == netns || c.netns.is_none() || netns.is_none())
        });
        let id = id.or_else(|| self.adopt_for_drop(&f, local, out));
        if let Some(id) = id {
            if self.join_drop(id, &f, local, hs) {
                self.drop_record(&f, outgoing, owner.and_then(|(_, p)| p));
            }
            return;
        }
        if outgoing && owner.is_none() && f.tcp_flags.has(tcp_flags::RST) {
            // A RST this host's stack sent for no connection followed here (a refusal's, or
            // the answer to a stray segment), dropped on its way out (its destination does not
            // answer ARP: a spoofed source): never a handshake attempt. Part of a refusal just
            // reported, else a record.
            if !self.table.was_refused(&(netns, local)) {
                self.drop_record(&f, outgoing, None);
            }
            return;
        }
        if !outgoing
            && f.reason == DropReason::NO_SOCKET
            && !rules::listener::is_cookie_check(&f.location)
        {
            // The SYN of a refusal just reported: the drop is the refusal itself.
            if f.tcp_flags.has(tcp_flags::SYN) && self.table.was_refused(&(netns, local)) {
                return;
            }
            // Before 6.10 the socket-less reset is not traced: the SYN's NO_SOCKET drop is the
            // only sign of the refusal (the kernel answers it with a RST right before freeing
            // it).
            if !self.cfg.socketless_resets_traced
                && let Some(v) = rules::handshake::refused_without_socket(
                    &f.meta,
                    local,
                    Some(f.reason.to_string()),
                    Some(f.tcp_flags),
                )
            {
                self.table.remember_refusal((netns, local), f.meta.ts_ns);
                self.emit_refusal(out, v);
                return;
            }
        }
        if !outgoing && self.forwarded(netns, f.packet) {
            self.path_drop(&f);
            return;
        }
        // Retransmissions are sent from timers: name the owning connection's process, not
        // whatever task was current.
        let proc = if outgoing {
            owner.and_then(|(_, p)| p)
        } else {
            None
        };
        if f.icmp.is_some() {
            // An ICMP error about a segment of a connection not followed here (quiet mode
            // keeps a handshake in the kernel until it retransmits): this host's own segment,
            // never a handshake of a local listener's. A record, not an attempt.
            if self.worth_a_record(&f) {
                self.drop_record(&f, outgoing, proc);
            }
            return;
        }
        let key = (netns, local);
        // A socket decided moments ago (its SYNs purged after it timed out) is no new attempt.
        let decided = outgoing && self.table.recently_decided(f.sk).is_some();
        let explains = rules::drops::explains(&hs, self.table.attempt(&key).is_some(), f.sk_state);
        if explains == Explains::Attempt && self.unfollowed(&f, outgoing, &key) {
            // A packet of an established connection not followed here: kept for it and for
            // its other end (`Table::peer_drops`), and printed.
            let mut hs = hs;
            if needs_context(
                self.table.unfollowed_drops(netns, &local).unwrap_or(&[]),
                &hs,
            ) {
                hs.context = self.drop_context(netns, &hs, local).map(Box::new);
            }
            self.table.keep_unfollowed_drop(netns, local, hs);
            self.drop_record(&f, outgoing, proc);
            return;
        }
        if explains == Explains::Attempt
            && !f.tcp_flags.has(tcp_flags::SYN)
            && self.table.was_decided_attempt(&key)
        {
            // A late packet of an attempt decided already (a cookie's client still sending on
            // the connection it believes established, its FIN): printed, no second verdict.
            self.drop_record(&f, outgoing, proc);
            return;
        }
        if !decided && explains == Explains::Attempt && self.table.has_room_for_attempt(&key) {
            let mut hs = hs;
            if needs_context(self.table.attempt(&key).map_or(&[], |a| &a.drops), &hs) {
                hs.context = self.drop_context(netns, &hs, local).map(Box::new);
            }
            if let Some(a) = self
                .table
                .attempt_entry(key, || Attempt::new(&f.meta, local, proc.clone()))
            {
                attempt::record(&mut a.drops, hs);
            }
            return;
        }
        if explains == Explains::Nothing && !self.cfg.show_normal_drops {
            // A normal part of TCP: counted (drops_by_reason), not printed.
            return;
        }
        self.drop_record(&f, outgoing, proc);
    }

    /// A drop of connection `id`'s packet: part of its handshake, or of its later life (then
    /// also worth a record: the connection may live on for long). Returns whether to print
    /// a `drop` record too.
    fn join_drop(
        &mut self,
        id: ConnId,
        f: &DroppedPacket,
        local: FourTuple,
        hs: HandshakeDrop,
    ) -> bool {
        let netns = f.meta.netns;
        let Some(c) = self.table.get(id) else {
            return false;
        };
        let established = c.established_ns().is_some();
        let mut hs = hs;
        let drops = if established { &c.late_drops } else { &c.drops };
        if needs_context(drops, &hs) {
            hs.context = self.drop_context(netns, &hs, local).map(Box::new);
        }
        let normal = rules::drops::explains(&hs, true, None) == Explains::Nothing;
        let ipv6 = f.packet.daddr.is_ipv6();
        let Some(c) = self.table.get_mut(id) else {
            return false;
        };
        c.last_ns = f.meta.ts_ns;
        if let Some(icmp) = f.icmp {
            if icmp.is_too_big(ipv6) && !normal {
                // This host dropped the path's "fragmentation needed": keep where.
                c.too_big = Some((icmp, Some(hs)));
            } else if !established && !normal {
                // An answer to its handshake (a REJECT's, a router's) that TCP never saw.
                let (last, drops) = c.answers_dropped.get_or_insert_with(|| (icmp, Vec::new()));
                *last = icmp;
                attempt::record(drops, hs);
            }
            return !normal || self.cfg.show_normal_drops;
        }
        if established {
            attempt::record(&mut c.late_drops, hs);
            return !normal || self.cfg.show_normal_drops;
        }
        attempt::record(&mut c.drops, hs);
        false
    }

    /// The connection of a dropped packet whose socket is established or closing but not
    /// followed here (opened before conntrace started: a pool's): followed from now on, so
    /// that the drop joins its later life instead of opening a handshake attempt.
    fn adopt_for_drop(
        &mut self,
        f: &DroppedPacket,
        local: FourTuple,
        out: &mut Vec<Verdict>,
    ) -> Option<ConnId> {
        let state = f.sk_state.filter(|s| s.connected())?;
        let sk = if f.sk != 0 { f.sk } else { f.rx_sk };
        if f.icmp.is_some() {
            return None;
        }
        if self.table.by_sk(sk).is_none() {
            self.adopt_mid_life(&f.meta, sk, local, state, out);
        }
        self.table.id_of(sk)
    }

    /// Whether a drop that would open a handshake attempt is one of an established connection
    /// not followed here (quiet mode keeps healthy ones in the kernel; a pool's opened before
    /// conntrace): an incoming packet that reached no socket (dropped before early demux, in
    /// the raw table's PREROUTING for one), not a SYN, of a tuple no attempt has, that a
    /// connected socket holds now (sock_diag). A SYN cookie's final ACK finds no socket and
    /// still opens its attempt.
    fn unfollowed(&mut self, f: &DroppedPacket, outgoing: bool, key: &AttemptKey) -> bool {
        if outgoing
            || f.sk != 0
            || f.rx_sk != 0
            || f.sk_state.is_some()
            || f.icmp.is_some()
            || f.tcp_flags.has(tcp_flags::SYN)
            || self.table.attempt(key).is_some()
        {
            return false;
        }
        let (netns, tuple) = *key;
        self.table.unfollowed_drops(netns, &tuple).is_some()
            || (self.table.has_room_for_attempt(key)
                && self
                    .lookups
                    .listeners
                    .as_mut()
                    .and_then(|l| l.socket_state(netns, tuple))
                    .is_some_and(TcpState::connected))
    }

    /// Whether `addr` is one of namespace `netns`'s own addresses (`None` when no namespace
    /// can be read).
    fn is_local(&mut self, netns: Option<u32>, addr: IpAddr) -> Option<bool> {
        self.lookups.namespaces.as_mut()?.is_local(netns, addr)
    }

    /// Whether `addr` is known not to be one of namespace `netns`'s own addresses (false when
    /// no namespace can be read).
    fn not_local(&mut self, netns: Option<u32>, addr: IpAddr) -> bool {
        self.is_local(netns, addr) == Some(false)
    }

    /// Whether a drop of `f`'s kind is printed as a record: unless it is a normal part of TCP
    /// (`--show-normal-drops` prints those too).
    fn worth_a_record(&self, f: &DroppedPacket) -> bool {
        !rules::drops::is_normal(&f.reason, &f.location, f.tcp_flags) || self.cfg.show_normal_drops
    }

    /// Whether a packet no connection's socket sent was sent by this namespace's own stack
    /// (a RST to a closed port, which carries the namespace's TCP control socket, whose
    /// "port" is the protocol number; a SYN cookie's SYN-ACK, which carries none), dropped on
    /// its way out (at the neighbour layer: a destination that does not answer ARP): its
    /// source is one of the dropping namespace's addresses and its destination is not.
    /// Loopback's packets (both local) stay incoming, as a received one's drop.
    fn sent_without_socket(&mut self, f: &DroppedPacket) -> bool {
        if f.rx_sk != 0 || f.icmp.is_some() {
            return false;
        }
        let netns = f.meta.netns;
        self.is_local(netns, f.packet.saddr) == Some(true) && self.not_local(netns, f.packet.daddr)
    }

    /// A packet that crossed a veth into another namespace of this host keeps its sender's
    /// socket until IP takes it in (`ip_rcv_core` orphans it after its first checks): dropped
    /// there before that (`OTHERHOST`, a bad header), it is the receiving namespace's, not
    /// an outgoing one. Its source is then not one of the dropping namespace's addresses.
    fn arrived_with_sender_socket(&mut self, f: &DroppedPacket) -> bool {
        self.not_local(f.meta.netns, f.packet.saddr)
    }

    /// Whether `packet` (as it travelled) neither came from nor went to namespace `netns`: it
    /// was being forwarded there.
    fn forwarded(&mut self, netns: Option<u32>, packet: FourTuple) -> bool {
        self.not_local(netns, packet.daddr) && self.not_local(netns, packet.saddr)
    }

    /// A forwarded packet's drop: it joins the connection's path, and is printed as a
    /// forwarding `drop` record unless normal.
    fn path_drop(&mut self, f: &DroppedPacket) {
        let arrived_on = f.ifindex.and_then(|i| {
            self.lookups
                .namespaces
                .as_mut()
                .and_then(|ns| ns.interface(f.meta.netns, i))
        });
        let drop = PathDrop {
            netns: f.meta.netns,
            kernel_reason: f.reason.clone(),
            location: f.location.clone(),
            tcp_flags: f.tcp_flags,
            count: 1,
            arrived_on,
        };
        self.summary.forwarded_drops += 1;
        self.table.add_path_drop(f.packet, f.meta.ts_ns, drop);
        if self.worth_a_record(f) {
            let record = rules::drops::forwarded_record(&f.meta, f.packet, f);
            self.push_drop_record(record, &f.meta, &f.reason);
        }
    }

    /// A `drop` record of `f`, oriented to this host, within the per-second cap.
    fn drop_record(
        &mut self,
        f: &DroppedPacket,
        outgoing: bool,
        proc: Option<super::super::facts::Proc>,
    ) {
        let what = (f.reason.clone(), f.location.clone(), f.tcp_flags);
        // `record` puts this host's end first by reversing a received packet's tuple; an ICMP
        // error's is the segment it quotes, which this host sent: its end is first already.
        let packet = if f.icmp.is_some() && !outgoing {
            f.packet.reversed()
        } else {
            f.packet
        };
        let record = rules::drops::record(&f.meta, packet, outgoing, proc, what);
        self.push_drop_record(record, &f.meta, &f.reason);
    }

    fn push_drop_record(
        &mut self,
        record: super::super::verdict::DropRecord,
        meta: &Meta,
        reason: &DropReason,
    ) {
        // A flood must not become a flood of lines: at most RECORDS_PER_SECOND records per
        // namespace and reason each second; the rest are counted.
        if !self.within_rate((meta.netns, reason.to_string()), meta.ts_ns) {
            self.summary.drop_records_suppressed += 1;
            return;
        }
        self.drops.push(record);
    }

    /// What the host tells about the first drop of a kind: the rule behind a netfilter drop
    /// (or the full conntrack table outside any rule), the interfaces of a reverse-path drop.
    fn drop_context(
        &mut self,
        netns: Option<u32>,
        hs: &HandshakeDrop,
        local: FourTuple,
    ) -> Option<DropContext> {
        match hs.reason.as_str() {
            DropReason::NETFILTER_DROP => {
                if rules::drops::outside_rules(&hs.location)
                    && let Some(ct) = self
                        .lookups
                        .namespaces
                        .as_mut()
                        .and_then(|ns| ns.conntrack(netns))
                    && ct.count >= ct.max
                {
                    return Some(DropContext::ConntrackFull(ct));
                }
                let query = RuleQuery {
                    netns,
                    hook: hs.hook,
                    ipv6: local.daddr.is_ipv6(),
                    dropped: hs.count,
                    first_drop_ns: Some(hs.first_ns),
                    last_drop_ns: Some(hs.last_ns),
                    location: Some(hs.location.clone()),
                };
                Some(DropContext::Rule(self.lookups.rules.as_mut()?.find(&query)))
            }
            DropReason::IP_RPFILTER => {
                let ns = self.lookups.namespaces.as_mut()?;
                Some(DropContext::RpFilter(RpFilterFacts {
                    arrived_on: hs.ifindex.and_then(|i| ns.interface(netns, i)),
                    route_back_via: ns.route_to(netns, local.daddr).and_then(|r| r.dev),
                    counter: ns.tcp_ext(netns, "IPReversePathFilter"),
                }))
            }
            _ => None,
        }
    }

    /// A connection just appeared on this host: drops of its attempt that came before (a SYN
    /// dropped before one got through) become its own, and its cookie validated.
    pub(in crate::engine) fn adopt_attempt(&mut self, sk: u64) {
        let Some(c) = self.table.by_sk(sk) else {
            return;
        };
        // Not yet whole: a child's peer (filled in after its SYN_RECV event on older kernels).
        if c.tuple.sport == 0 || c.tuple.dport == 0 {
            return;
        }
        let key = (c.netns, c.tuple);
        let Some(a) = self.table.take_attempt(&key) else {
            return;
        };
        if a.cookies.is_some() {
            self.summary.listener(&a.tuple).cookies_validated += 1;
        }
        if let Some(c) = self.table.by_sk_mut(sk) {
            if a.cookies.is_some() {
                c.opening = Opening::SynCookie;
            }
            for d in a.drops {
                attempt::record(&mut c.drops, d);
            }
        }
    }

    /// A listener answered a SYN with a cookie: no request socket exists for the attempt, so
    /// it is followed here until a connection takes it over or it ends without one.
    pub(in crate::engine) fn on_cookie(&mut self, meta: &Meta, tuple: FourTuple) {
        self.summary.listener(&tuple).cookies_sent += 1;
        if let Some(netns) = meta.netns {
            *self.summary.cookies_by_netns.entry(netns).or_default() += 1;
        }
        if let Some(a) = self
            .table
            .attempt_entry((meta.netns, tuple), || Attempt::new(meta, tuple, None))
        {
            a.cookie_sent(meta.ts_ns);
        }
    }
}

/// A drop of a kind not yet in `drops` that needs the host's context: looked up now.
fn needs_context(drops: &[HandshakeDrop], new: &HandshakeDrop) -> bool {
    matches!(
        new.reason.as_str(),
        DropReason::NETFILTER_DROP | DropReason::IP_RPFILTER
    ) && !drops.iter().any(|d| d.same_kind(new))
}
