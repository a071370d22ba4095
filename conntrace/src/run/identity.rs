//! Container identity in the event loop, which never waits for it: records wait (at most
//! [`WAIT`], in order) for their `container` before they are written, and with `--container` or
//! `--pod` kernel events are admitted by network namespace before the engine sees them.
//!
//! The namespace filter is in userspace: the eBPF programs still send every event of the
//! traced ports and this drops the others. It works on a set of admitted namespace inodes
//! ([`Identities::selected_netns`]), the set a kernel-side filter (a map of admitted inodes the
//! programs consult) would load instead.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use tracing::debug;

use crate::{
    engine::{
        Engine,
        facts::KernelEvent,
        verdict::{DropRecord, Verdict},
    },
    host::containers::{Admit, Identities, Lookup},
    identity::Container,
    output::{Output, OutputError, Record},
};

/// How long a record waits for its container: then it is written with what is known (the
/// runtime and the id without the name when the runtime's API is slow; null when nothing).
pub const WAIT: Duration = Duration::from_millis(250);
/// How long events of a namespace not yet known to be selected or not are held.
const HOLD: Duration = Duration::from_secs(2);
/// Events held per unknown namespace, at most.
const HOLD_MAX: usize = 4096;

/// A record waiting for its container.
enum Pending {
    Verdict(Box<Verdict>),
    Drop(Box<DropRecord>),
}

impl Pending {
    fn who(&self) -> (Option<u32>, Option<u32>) {
        match self {
            Self::Verdict(v) => (v.netns, v.pid),
            Self::Drop(d) => (d.netns, d.pid),
        }
    }

    fn set(&mut self, container: Option<Container>) {
        match self {
            Self::Verdict(v) => v.container = container,
            Self::Drop(d) => d.container = container,
        }
    }

    fn record(&self) -> Record<'_> {
        match self {
            Self::Verdict(v) => Record::Verdict(v),
            Self::Drop(d) => Record::Drop(d),
        }
    }
}

/// The kernel event's network namespace.
fn netns_of(ev: &KernelEvent) -> Option<u32> {
    let meta = match ev {
        KernelEvent::State { meta, .. }
        | KernelEvent::SocketError { meta, .. }
        | KernelEvent::ResetReceived { meta, .. }
        | KernelEvent::ResetSent { meta, .. }
        | KernelEvent::SynRetransmit { meta, .. }
        | KernelEvent::Retransmit { meta, .. }
        | KernelEvent::Window { meta, .. }
        | KernelEvent::Accepted { meta, .. }
        | KernelEvent::FirstData { meta, .. }
        | KernelEvent::CookieSent { meta, .. }
        | KernelEvent::ListenOverflow { meta, .. }
        | KernelEvent::ConnectFailed { meta, .. }
        | KernelEvent::Progress { meta, .. }
        | KernelEvent::RouteLookupFailed { meta, .. } => meta,
        KernelEvent::Dropped(d) => &d.meta,
        KernelEvent::History(h) => &h.meta,
    };
    meta.netns
}

/// Records on their way out, and events held for the namespace filter. Without
/// [`Identities`] (`--no-containers`) records pass at once with a null container.
pub struct Identity {
    ids: Option<Identities>,
    queue: VecDeque<(Instant, Pending)>,
    held: HashMap<u32, (Instant, Vec<KernelEvent>)>,
    /// Events left out by the namespace filter.
    pub filtered: u64,
}

impl Identity {
    pub fn new(ids: Option<Identities>) -> Self {
        Self {
            ids,
            queue: VecDeque::new(),
            held: HashMap::new(),
            filtered: 0,
        }
    }

    pub fn identities(&self) -> Option<&Identities> {
        self.ids.as_ref()
    }

    /// Resolves when the worker published an answer something here waits for.
    pub async fn changed(&self) {
        match &self.ids {
            Some(ids) if !self.queue.is_empty() || !self.held.is_empty() => ids.changed().await,
            _ => std::future::pending().await,
        }
    }

    /// `ev` if its namespace is traced; held while that is not known yet, dropped if not.
    pub fn admit(&mut self, ev: KernelEvent) -> Option<KernelEvent> {
        let Some(ids) = &self.ids else {
            return Some(ev);
        };
        let netns = netns_of(&ev);
        // Behind its namespace's held events, to keep their order.
        if let Some((_, events)) = self.held.get_mut(&netns.unwrap_or_default()) {
            if events.len() < HOLD_MAX {
                events.push(ev);
            } else {
                self.filtered += 1;
            }
            return None;
        }
        match ids.admit(netns) {
            Admit::Yes => Some(ev),
            Admit::No => {
                self.filtered += 1;
                None
            }
            Admit::Unknown => {
                let held = self
                    .held
                    .entry(netns.unwrap_or_default())
                    .or_insert_with(|| (Instant::now(), Vec::new()));
                if held.1.len() < HOLD_MAX {
                    held.1.push(ev);
                } else {
                    self.filtered += 1;
                }
                None
            }
        }
    }

    /// Held events whose namespace is now known to be traced, in order; those of namespaces
    /// not traced, or unknown for longer than [`HOLD`], are dropped.
    pub fn release(&mut self) -> Vec<KernelEvent> {
        let Some(ids) = &self.ids else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut filtered = 0;
        self.held
            .retain(|netns, (since, events)| match ids.admit(Some(*netns)) {
                Admit::Yes => {
                    out.append(events);
                    false
                }
                Admit::No => {
                    filtered += events.len() as u64;
                    false
                }
                Admit::Unknown if since.elapsed() > HOLD => {
                    debug!(
                        netns,
                        events = events.len(),
                        "namespace still unknown: events dropped"
                    );
                    filtered += events.len() as u64;
                    false
                }
                Admit::Unknown => true,
            });
        self.filtered += filtered;
        out
    }

    /// Queues the engine's drop records, then `verdicts` (drops come first in time), and
    /// writes every record whose container is known.
    pub fn write(
        &mut self,
        out: &mut Output,
        engine: &mut Engine,
        verdicts: Vec<Verdict>,
    ) -> Result<(), OutputError> {
        let now = Instant::now();
        let drops = engine
            .take_drops()
            .into_iter()
            .map(|d| Pending::Drop(Box::new(d)));
        let records = drops.chain(verdicts.into_iter().map(|v| Pending::Verdict(Box::new(v))));
        self.queue.extend(records.map(|r| (now, r)));
        self.flush(out, false)
    }

    /// Writes queued records in order while the first one's container is known or it has
    /// waited [`WAIT`] (`now`: every record, with what is known).
    pub fn flush(&mut self, out: &mut Output, now: bool) -> Result<(), OutputError> {
        while let Some((since, record)) = self.queue.front_mut() {
            let container = match &self.ids {
                None => None,
                Some(ids) => {
                    let (netns, pid) = record.who();
                    let final_ = now || since.elapsed() >= WAIT;
                    match ids.lookup(netns, pid, final_) {
                        Lookup::Ready(c) => c,
                        Lookup::Waiting => break,
                    }
                }
            };
            record.set(container);
            out.write(&record.record())?;
            self.queue.pop_front();
        }
        Ok(())
    }

    /// At the end of the run: waits (at most [`WAIT`]) for the queued records' containers,
    /// then writes them all.
    pub async fn finish(&mut self, out: &mut Output) -> Result<(), OutputError> {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.queue.is_empty() {
            self.flush(out, false)?;
            if self.queue.is_empty()
                || tokio::time::timeout_at(deadline, self.changed())
                    .await
                    .is_err()
            {
                break;
            }
        }
        self.flush(out, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        engine::{
            EngineConfig,
            facts::{Meta, Proc},
        },
        identity::{Runtime, Via},
        output::{Clock, Format},
    };

    const HOST: u32 = 4_026_531_840;

    fn output(dir: &std::path::Path) -> (Output, std::path::PathBuf) {
        let path = dir.join("out.jsonl");
        let out = Output::open(Some(&path), Format::Json, Clock::now()).expect("open");
        (out, path)
    }

    fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .expect("read")
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON"))
            .collect()
    }

    fn verdict_in(netns: u32) -> Verdict {
        let mut v = crate::output::tests::syn_timeout();
        (v.netns, v.pid) = (Some(netns), None);
        v
    }

    #[test]
    fn records_wait_in_order_for_their_container() {
        let dir = std::env::temp_dir().join(format!("ct-ident-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (mut out, path) = output(&dir);
        let mut engine = Engine::new(EngineConfig::default());
        let mut ident = Identity::new(Some(Identities::detached(HOST, false)));
        // The first record's namespace is not known yet: the host's record waits behind it.
        let records = vec![verdict_in(7), verdict_in(HOST)];
        ident.write(&mut out, &mut engine, records).expect("write");
        assert!(lines(&path).is_empty());
        let mut mysqld =
            crate::host::containers::container(Runtime::Podman, "3f04", None, Via::Netns);
        mysqld.name = Some("mysqld".into());
        let ids = ident.identities().expect("identities");
        ids.answer_netns(7, Some(mysqld), false);
        ident.flush(&mut out, false).expect("flush");
        let written = lines(&path);
        assert_eq!(written.len(), 2);
        assert_eq!(written[0]["container"]["name"], "mysqld");
        assert_eq!(written[1]["container"], serde_json::Value::Null);
        // Never answered: written after the wait with what is known (nothing).
        ident
            .write(&mut out, &mut engine, vec![verdict_in(8)])
            .expect("write");
        assert_eq!(lines(&path).len(), 2);
        ident.flush(&mut out, true).expect("flush");
        assert_eq!(lines(&path)[2]["container"], serde_json::Value::Null);
        std::fs::remove_dir_all(&dir).ok();
    }

    fn accepted(netns: u32, sk: u64) -> KernelEvent {
        let proc = Proc {
            pid: 1,
            comm: "ct-server".into(),
        };
        let meta = Meta {
            ts_ns: sk,
            netns: Some(netns),
            proc,
        };
        KernelEvent::Accepted { meta, sk }
    }

    #[test]
    fn events_of_unknown_namespaces_are_held_in_order_then_admitted_or_dropped() {
        let mut ident = Identity::new(Some(Identities::detached(HOST, true)));
        assert!(
            ident.admit(accepted(HOST, 1)).is_none(),
            "the host's own: never selected"
        );
        assert!(ident.admit(accepted(7, 2)).is_none(), "held");
        assert!(ident.admit(accepted(9, 3)).is_none(), "held");
        let ids = ident.identities().expect("identities");
        ids.answer_netns(7, None, true);
        // Admitted now, but behind its held events.
        assert!(ident.admit(accepted(7, 4)).is_none());
        let released: Vec<u64> = ident
            .release()
            .into_iter()
            .map(|ev| match ev {
                KernelEvent::Accepted { sk, .. } => sk,
                _ => 0,
            })
            .collect();
        assert_eq!(released, vec![2, 4]);
        assert_eq!(ident.filtered, 1);
        assert!(ident.admit(accepted(7, 5)).is_some());
        let ids = ident.identities().expect("identities");
        ids.answer_netns(9, None, false);
        assert!(ident.release().is_empty());
        assert_eq!(ident.filtered, 2);
    }
}
