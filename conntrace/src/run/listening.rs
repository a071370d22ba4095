//! Whether a listener of a traced port exists, for the per-packet SYN-cookie program
//! (`kernel::packet_gate`): attached while one does, detached while none does.
//!
//! The lifecycle programs report every traced port's socket entering or leaving `TCP_LISTEN`,
//! in both follow modes. A listener that appears attaches the program at once (it is attached
//! about a millisecond after `listen()`; a cookie sent before that is not seen). A listener
//! that goes, and start-up, make a scan of every network namespace's listeners (sock_diag)
//! one [`SETTLE`] later; the program is detached only when that scan finds none and no
//! listener seen entering `TCP_LISTEN` since start-up is still listening (one in a namespace
//! the scan cannot open counts). Events are handled between scans, never during one, so a
//! listener that appears while a scan runs is either in its answer or attaches the program
//! after it. Events lost (a full ring buffer) or undecodable may have been a listener's: the
//! program is then attached, and a scan scheduled. An attach that fails is tried again by a
//! scan one [`SETTLE`] later.

use std::{
    collections::HashSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use tracing::{debug, warn};

use crate::{
    engine::facts::{KernelEvent, TcpState},
    host::{netns, sockdiag},
    kernel::Tracer,
};

/// How long after a listener goes the scan runs: a server restarting listens again within it,
/// and a burst of closes makes one scan.
pub const SETTLE: Duration = Duration::from_secs(1);

/// What the listeners seen so far ask of the cookie program.
#[derive(Debug)]
pub struct ListenerWatch {
    ports: Vec<u16>,
    /// A listener appeared (or may have) since the program was last set.
    appeared: bool,
    /// When to scan for listeners (`None`: no scan pending).
    scan_at: Option<Instant>,
    /// Listeners seen entering `TCP_LISTEN` and not yet leaving it: (namespace, socket).
    listening: HashSet<(Option<u32>, u64)>,
}

impl ListenerWatch {
    /// A watch for the traced `ports`, with a scan due now when the program is gated.
    pub fn new(tracer: &Tracer, ports: &[u16]) -> Self {
        let gated = tracer.cookie_program_attached().is_some();
        Self {
            ports: ports.to_vec(),
            appeared: false,
            scan_at: gated.then(Instant::now),
            listening: HashSet::new(),
        }
    }

    /// Events were lost or could not be decoded: one may have been a listener's.
    pub fn events_missed(&mut self, now: Instant) {
        self.appeared = true;
        self.scan_at.get_or_insert(now + SETTLE);
    }

    /// Notes a traced socket entering (`appeared`) or leaving `TCP_LISTEN`.
    pub fn observe(&mut self, ev: &KernelEvent, now: Instant) {
        let KernelEvent::State {
            meta, sk, old, new, ..
        } = ev
        else {
            return;
        };
        if *new == TcpState::Listen {
            self.appeared = true;
            self.listening.insert((meta.netns, *sk));
        } else if *old == TcpState::Listen {
            self.listening.remove(&(meta.netns, *sk));
            self.scan_at.get_or_insert(now + SETTLE);
        }
    }

    /// Applies what was seen: attaches the program for a listener that appeared, and runs a
    /// scan that is due (blocking: one sock_diag dump per namespace), detaching the program
    /// when no namespace has a listener of a traced port.
    pub fn apply(&mut self, tracer: &mut Tracer, now: Instant) {
        if tracer.cookie_program_attached().is_none() {
            return;
        }
        if std::mem::take(&mut self.appeared)
            && let Err(error) = tracer.set_cookie_program(true)
        {
            warn!(%error, "attach the per-packet SYN-cookie program for a new listener; trying again");
            self.scan_at.get_or_insert(now + SETTLE);
        }
        if self.scan_at.is_none_or(|at| now < at) {
            return;
        }
        self.scan_at = None;
        let paths: Vec<PathBuf> = netns::paths().into_values().collect();
        let listening = !self.listening.is_empty() || any_listener(&paths, &self.ports);
        if let Err(error) = tracer.set_cookie_program(listening) {
            warn!(%error, listening, "set the per-packet SYN-cookie program; trying again");
            self.scan_at = Some(now + SETTLE);
        }
    }
}

/// Whether a namespace opened by one of `paths` has a listener on one of `ports`. A
/// namespace that cannot be read counts as having one: the program then stays attached.
fn any_listener(paths: &[PathBuf], ports: &[u16]) -> bool {
    paths.iter().any(|path| match sockdiag::listeners(path, None) {
        Ok(found) => found.iter().any(|l| ports.contains(&l.addr.port())),
        Err(error) => {
            debug!(path = %path.display(), %error, "list listeners; keeping the cookie program");
            true
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    use crate::engine::facts::{FourTuple, Meta, Proc};

    fn state(old: TcpState, new: TcpState) -> KernelEvent {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let meta = Meta {
            ts_ns: 1,
            netns: Some(4026531840),
            proc: Proc {
                pid: 0,
                comm: "swapper/0".into(),
            },
        };
        let tuple = FourTuple {
            saddr: any,
            sport: 3306,
            daddr: any,
            dport: 0,
        };
        KernelEvent::state(meta, 1, tuple, old, new)
    }

    fn watch() -> ListenerWatch {
        ListenerWatch {
            ports: vec![3306],
            appeared: false,
            scan_at: None,
            listening: HashSet::new(),
        }
    }

    #[test]
    fn a_new_listener_asks_for_the_program_and_a_closed_one_for_a_scan_later() {
        let now = Instant::now();
        let mut w = watch();
        w.observe(&state(TcpState::Close, TcpState::Listen), now);
        assert!(w.appeared);
        assert_eq!(w.scan_at, None);
        assert_eq!(w.listening.len(), 1);
        w.observe(&state(TcpState::Listen, TcpState::Close), now);
        assert_eq!(w.scan_at, Some(now + SETTLE));
        assert!(w.listening.is_empty());
        // A second close in the same second keeps the first's scan.
        w.observe(&state(TcpState::Listen, TcpState::Close), now + SETTLE / 2);
        assert_eq!(w.scan_at, Some(now + SETTLE));
    }

    #[test]
    fn lost_events_ask_for_the_program_and_a_scan() {
        let now = Instant::now();
        let mut w = watch();
        w.events_missed(now);
        assert!(w.appeared);
        assert_eq!(w.scan_at, Some(now + SETTLE));
    }

    #[test]
    fn connections_ask_for_nothing() {
        let mut w = watch();
        w.observe(
            &state(TcpState::SynSent, TcpState::Established),
            Instant::now(),
        );
        w.observe(
            &state(TcpState::Established, TcpState::Close),
            Instant::now(),
        );
        assert!(!w.appeared);
        assert_eq!(w.scan_at, None);
    }

    #[test]
    fn an_unreadable_namespace_keeps_the_program() {
        let missing = PathBuf::from("/nonexistent/ns/net");
        assert!(any_listener(&[missing], &[3306]));
        assert!(!any_listener(&[], &[3306]));
    }
}
