//! Listener overflows seen lately (`listen_overflow` per listener, from the namespaces'
//! counters). A SYN a full accept queue refuses is no drop: no drop reason names it, and its
//! client sees only silence. When that client runs in another namespace of this host, its
//! `syn_timeout` is explained by the listener it reached.

use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
};

use crate::engine::verdict::detail::PeerListenQueue;

/// How long an overflow is kept: past a client's SYN retries (about 127 s by default).
const KEEP_NS: u64 = 180 * 1_000_000_000;
/// Overflows kept at most (one per full listener and poll).
const MAX_KEPT: usize = 4096;

/// One poll's overflows at one listener.
#[derive(Debug, Clone, Copy)]
struct Seen {
    ts_ns: u64,
    netns: u32,
    listener: SocketAddr,
    accept_queue: u32,
    backlog: u32,
    overflows: u64,
}

/// The overflows of the last [`KEEP_NS`], oldest first.
#[derive(Debug, Default)]
pub struct Overflows {
    seen: VecDeque<Seen>,
}

impl Overflows {
    /// Remembers `overflows` counted at `listener` in `netns` at `ts_ns`, with its queue
    /// (accept queue, backlog) then. One of an unknown namespace is not kept: it could not be
    /// told from the client's.
    pub fn record(
        &mut self,
        ts_ns: u64,
        netns: Option<u32>,
        listener: SocketAddr,
        (accept_queue, backlog): (u32, u32),
        overflows: u64,
    ) {
        let Some(netns) = netns else { return };
        while self
            .seen
            .front()
            .is_some_and(|s| s.ts_ns.saturating_add(KEEP_NS) < ts_ns)
            || self.seen.len() >= MAX_KEPT
        {
            self.seen.pop_front();
        }
        self.seen.push_back(Seen {
            ts_ns,
            netns,
            listener,
            accept_queue,
            backlog,
            overflows,
        });
    }

    /// The listener a client in namespace `netns` reached at `server`, when it is in another
    /// namespace of this host, could have had the client's SYNs (`owns`, asked with its
    /// namespace and bound address) and overflowed between `from_ns` and `to_ns`: one bound
    /// to `server`'s address, else one bound to every address, on its port. `None` when none did, or when
    /// listeners of several namespaces did (the address alone cannot tell which one the SYNs
    /// reached).
    pub fn reached(
        &self,
        netns: Option<u32>,
        server: SocketAddr,
        (from_ns, to_ns): (u64, u64),
        mut owns: impl FnMut(u32, IpAddr) -> bool,
    ) -> Option<PeerListenQueue> {
        let during = |s: &&Seen| {
            Some(s.netns) != netns
                && s.listener.port() == server.port()
                && (from_ns..=to_ns).contains(&s.ts_ns)
        };
        // Asked once per listener.
        let mut asked: Vec<((u32, IpAddr), bool)> = Vec::new();
        let mut owner = |s: &Seen| {
            let key = (s.netns, s.listener.ip());
            if let Some((_, yes)) = asked.iter().find(|(k, _)| *k == key) {
                return *yes;
            }
            let yes = owns(s.netns, s.listener.ip());
            asked.push((key, yes));
            yes
        };
        let exact: Vec<&Seen> = self
            .seen
            .iter()
            .filter(during)
            .filter(|s| s.listener.ip() == server.ip() && owner(s))
            .collect();
        let seen = if exact.is_empty() {
            self.seen
                .iter()
                .filter(during)
                .filter(|s| s.listener.ip().is_unspecified() && owner(s))
                .collect()
        } else {
            exact
        };
        let (first, last) = (seen.first()?, seen.last()?);
        if seen
            .iter()
            .any(|s| s.netns != first.netns || s.listener != first.listener)
        {
            return None;
        }
        Some(PeerListenQueue {
            netns: first.netns,
            listener: first.listener,
            overflows: seen.iter().map(|s| s.overflows).sum(),
            accept_queue: last.accept_queue,
            backlog: last.backlog,
            somaxconn: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    /// Every namespace owns every address.
    fn any(_: u32, _: IpAddr) -> bool {
        true
    }

    #[test]
    fn the_listener_a_client_reached_is_found_by_address_then_wildcard_and_time() {
        let mut o = Overflows::default();
        o.record(10 * SEC, Some(2), addr("10.0.0.2:3306"), (2, 1), 3);
        o.record(11 * SEC, Some(2), addr("10.0.0.2:3306"), (2, 1), 2);
        o.record(11 * SEC, Some(3), addr("0.0.0.0:5432"), (5, 4), 1);
        let q = o
            .reached(Some(1), addr("10.0.0.2:3306"), (9 * SEC, 12 * SEC), any)
            .expect("found");
        assert_eq!(
            (q.netns, q.listener, q.overflows, q.accept_queue, q.backlog),
            (2, addr("10.0.0.2:3306"), 5, 2, 1)
        );
        // Only what happened while the client waited.
        let q = o.reached(
            Some(1),
            addr("10.0.0.2:3306"),
            (10 * SEC + 1, 12 * SEC),
            any,
        );
        assert_eq!(q.map(|q| q.overflows), Some(2));
        assert!(
            o.reached(Some(1), addr("10.0.0.2:3306"), (12 * SEC, 20 * SEC), any)
                .is_none()
        );
        // A wildcard listener serves every address; not the client's own namespace's.
        let q = o.reached(Some(1), addr("10.0.0.9:5432"), (0, 20 * SEC), any);
        assert_eq!(q.map(|q| q.netns), Some(3));
        assert!(
            o.reached(Some(3), addr("10.0.0.9:5432"), (0, 20 * SEC), any)
                .is_none()
        );
        assert!(
            o.reached(Some(1), addr("10.0.0.2:3307"), (0, 20 * SEC), any)
                .is_none()
        );
    }

    #[test]
    fn wildcard_listeners_of_two_namespaces_name_neither() {
        let mut o = Overflows::default();
        o.record(10 * SEC, Some(2), addr("0.0.0.0:3306"), (2, 1), 1);
        o.record(10 * SEC, Some(3), addr("0.0.0.0:3306"), (2, 1), 1);
        let server = addr("10.0.0.2:3306");
        assert!(o.reached(Some(1), server, (0, 20 * SEC), any).is_none());
        // Where the destination address is one namespace's, that one's.
        let q = o.reached(Some(1), server, (0, 20 * SEC), |ns, _| ns == 3);
        assert_eq!(q.map(|q| q.netns), Some(3));
        // An exact address is still told apart.
        o.record(10 * SEC, Some(4), server, (2, 1), 1);
        let q = o.reached(Some(1), server, (0, 20 * SEC), any);
        assert_eq!(q.map(|q| q.netns), Some(4));
    }

    #[test]
    fn a_listener_whose_namespace_does_not_own_the_address_is_not_the_one_reached() {
        let mut o = Overflows::default();
        o.record(10 * SEC, Some(3), addr("0.0.0.0:7005"), (2, 1), 4);
        // 10.0.0.3 is another namespace's (or nobody's): its SYNs never reached this one.
        let q = o.reached(Some(1), addr("10.0.0.3:7005"), (0, 20 * SEC), |_, _| false);
        assert!(q.is_none());
    }

    #[test]
    fn old_overflows_are_let_go() {
        let mut o = Overflows::default();
        o.record(SEC, Some(2), addr("10.0.0.2:3306"), (2, 1), 1);
        o.record(SEC + KEEP_NS + 1, Some(2), addr("10.0.0.2:3307"), (2, 1), 1);
        assert_eq!(o.seen.len(), 1);
    }
}
