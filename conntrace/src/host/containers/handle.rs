//! The event loop's side of container identity: answers the worker has published, read under a
//! short lock and never waited for; what is missing is asked for and arrives later.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use tokio::sync::Notify;

use super::{Options, worker};
use crate::identity::Container;

/// How long a namespace's or a process's answer is used before it is asked again (a namespace
/// inode or a pid can be reused once its container is gone; a container may yet join a
/// namespace made by hand): answers with a container, and answers without one. An old answer
/// is still used while the new one is looked up.
pub(super) const FRESH_WITH: Duration = Duration::from_secs(10);
pub(super) const FRESH_WITHOUT: Duration = Duration::from_secs(5);

/// What the worker knows of one namespace or process.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub at: Instant,
    /// `false` while the runtime's API has not answered yet (the container may lack its name).
    pub complete: bool,
    pub container: Option<Container>,
    /// With a selector: whether a selected container is in this namespace.
    pub selected: bool,
}

impl Entry {
    fn fresh(&self, now: Instant) -> bool {
        let ttl = if self.container.is_some() {
            FRESH_WITH
        } else {
            FRESH_WITHOUT
        };
        now.duration_since(self.at) < ttl
    }
}

/// A request to the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Key {
    Netns(u32),
    Pid(u32),
}

/// The worker's answers, shared with the event loop.
#[derive(Debug, Default)]
pub(super) struct Shared {
    pub entries: HashMap<Key, Entry>,
    /// Asked for and not answered yet: asked once.
    pub asked: HashSet<Key>,
    /// Full passes over every namespace done (the first one at start).
    pub passes: u64,
}

/// A record's container as far as it is known now.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    Ready(Option<Container>),
    /// Asked for; the answer comes later ([`Identities::changed`]).
    Waiting,
}

/// Whether events of a namespace are traced under `--container`/`--pod`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    No,
    /// Not known yet: asked for.
    Unknown,
}

/// The handle the event loop holds; the worker thread stops when it is dropped.
pub struct Identities {
    requests: mpsc::Sender<Key>,
    shared: Arc<Mutex<Shared>>,
    changed: Arc<Notify>,
    host_netns: Option<u32>,
    selecting: bool,
}

impl Identities {
    /// Starts the worker, which first resolves every namespace there is.
    pub fn start(options: Options) -> std::io::Result<Self> {
        let host_netns = worker::netns_of(1);
        let (requests, rx) = mpsc::channel();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let changed = Arc::new(Notify::new());
        let selecting = options.select.is_some();
        worker::spawn(
            options,
            host_netns,
            rx,
            Arc::clone(&shared),
            Arc::clone(&changed),
        )?;
        Ok(Self {
            requests,
            shared,
            changed,
            host_netns,
            selecting,
        })
    }

    /// Resolves when the worker has published something new.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Waits (at most `bound`) for the worker's first pass over every namespace.
    pub async fn first_pass(&self, bound: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            if self.lock().passes > 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, self.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry for `key` when there is one, asking for a new one when it is missing or old.
    fn entry(&self, shared: &mut Shared, key: Key, now: Instant) -> Option<Entry> {
        let entry = shared.entries.get(&key).cloned();
        let stale = entry.as_ref().is_none_or(|e| !e.fresh(now));
        if stale && shared.asked.insert(key) {
            // The worker is gone only when conntrace is stopping.
            let _ = self.requests.send(key);
        }
        entry
    }

    /// The container of a record in `netns` by `pid`: the process's own container when it
    /// has one, else the namespace's (none for the host's namespace). `final_` takes whatever
    /// is known now, a container without its name included, instead of waiting.
    pub fn lookup(&self, netns: Option<u32>, pid: Option<u32>, final_: bool) -> Lookup {
        let now = Instant::now();
        let mut shared = self.lock();
        let mut waiting = false;
        if let Some(pid) = pid.filter(|&p| p > 0) {
            match self.entry(&mut shared, Key::Pid(pid), now) {
                Some(e) if e.container.is_some() && (e.complete || final_) => {
                    return Lookup::Ready(e.container);
                }
                Some(e) if e.complete => {}
                _ => waiting = true,
            }
        }
        let Some(netns) = netns.filter(|n| Some(*n) != self.host_netns) else {
            return if waiting && !final_ {
                Lookup::Waiting
            } else {
                Lookup::Ready(None)
            };
        };
        match self.entry(&mut shared, Key::Netns(netns), now) {
            Some(e) if e.complete && !waiting => Lookup::Ready(e.container),
            Some(e) if final_ => Lookup::Ready(e.container),
            None if final_ => Lookup::Ready(None),
            _ => Lookup::Waiting,
        }
    }

    /// Whether events of `netns` are traced: always without a selector; with one, only
    /// namespaces of selected containers (never the host's own, nor an unknown one).
    pub fn admit(&self, netns: Option<u32>) -> Admit {
        if !self.selecting {
            return Admit::Yes;
        }
        let Some(netns) = netns.filter(|n| Some(*n) != self.host_netns) else {
            return Admit::No;
        };
        let mut shared = self.lock();
        match self.entry(&mut shared, Key::Netns(netns), Instant::now()) {
            Some(e) if e.complete => {
                if e.selected {
                    Admit::Yes
                } else {
                    Admit::No
                }
            }
            _ => Admit::Unknown,
        }
    }

    /// The namespaces of the selected containers now, for a warning when there are none (and
    /// for a kernel-side filter to load, later).
    pub fn selected_netns(&self) -> Vec<u32> {
        let shared = self.lock();
        let mut list: Vec<u32> = shared
            .entries
            .iter()
            .filter_map(|(k, e)| match k {
                Key::Netns(n) if e.selected => Some(*n),
                _ => None,
            })
            .collect();
        list.sort_unstable();
        list
    }
}
