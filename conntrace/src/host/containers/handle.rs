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
    fn entry<'a>(&self, shared: &'a mut Shared, key: Key, now: Instant) -> Option<&'a Entry> {
        let stale = shared.entries.get(&key).is_none_or(|e| !e.fresh(now));
        if stale && shared.asked.insert(key) {
            // The worker is gone only when conntrace is stopping.
            let _ = self.requests.send(key);
        }
        shared.entries.get(&key)
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
                    return Lookup::Ready(e.container.clone());
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
            Some(e) if e.complete && !waiting => Lookup::Ready(e.container.clone()),
            Some(e) if final_ => Lookup::Ready(e.container.clone()),
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

#[cfg(test)]
impl Identities {
    /// A handle without a worker (its requests go nowhere), for tests that publish answers
    /// with [`Identities::answer_netns`].
    pub fn detached(host_netns: u32, selecting: bool) -> Self {
        let (requests, _) = mpsc::channel();
        Self {
            requests,
            shared: Arc::new(Mutex::new(Shared::default())),
            changed: Arc::new(Notify::new()),
            host_netns: Some(host_netns),
            selecting,
        }
    }

    /// Publishes a complete answer for `netns`, as the worker would.
    pub fn answer_netns(&self, netns: u32, container: Option<Container>, selected: bool) {
        let key = Key::Netns(netns);
        let mut shared = self.lock();
        shared.asked.remove(&key);
        shared.entries.insert(
            key,
            Entry {
                at: Instant::now(),
                complete: true,
                container,
                selected,
            },
        );
        drop(shared);
        self.changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Runtime, Via};

    const HOST: u32 = 4_026_531_840;

    fn handle(selecting: bool) -> (Identities, mpsc::Receiver<Key>) {
        let (requests, rx) = mpsc::channel();
        let ids = Identities {
            requests,
            shared: Arc::new(Mutex::new(Shared::default())),
            changed: Arc::new(Notify::new()),
            host_netns: Some(HOST),
            selecting,
        };
        (ids, rx)
    }

    fn named(name: &str, via: Via) -> Container {
        let mut c = super::super::container(Runtime::Podman, name, None, via);
        c.name = Some(name.into());
        c
    }

    fn publish(ids: &Identities, key: Key, complete: bool, c: Option<Container>, selected: bool) {
        let mut shared = ids.lock();
        shared.asked.remove(&key);
        shared.entries.insert(
            key,
            Entry {
                at: Instant::now(),
                complete,
                container: c,
                selected,
            },
        );
    }

    #[test]
    fn the_host_namespace_has_no_container_and_is_never_asked_about() {
        let (ids, rx) = handle(false);
        assert_eq!(ids.lookup(Some(HOST), None, false), Lookup::Ready(None));
        assert_eq!(ids.lookup(None, None, false), Lookup::Ready(None));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn an_unknown_namespace_is_asked_about_once_then_answered() {
        let (ids, rx) = handle(false);
        assert_eq!(ids.lookup(Some(7), None, false), Lookup::Waiting);
        assert_eq!(ids.lookup(Some(7), None, false), Lookup::Waiting);
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![Key::Netns(7)]);
        // Waited long enough: what is known (nothing yet).
        assert_eq!(ids.lookup(Some(7), None, true), Lookup::Ready(None));
        // The runtime and id first, the name when the API answered.
        let partial = super::super::container(Runtime::Podman, "3f04", None, Via::Netns);
        publish(&ids, Key::Netns(7), false, Some(partial.clone()), false);
        assert_eq!(ids.lookup(Some(7), None, false), Lookup::Waiting);
        assert_eq!(
            ids.lookup(Some(7), None, true),
            Lookup::Ready(Some(partial))
        );
        let full = named("mysqld", Via::Netns);
        publish(&ids, Key::Netns(7), true, Some(full.clone()), false);
        assert_eq!(ids.lookup(Some(7), None, false), Lookup::Ready(Some(full)));
    }

    #[test]
    fn the_process_container_comes_before_the_namespace_one() {
        let (ids, _rx) = handle(false);
        let (app, ns) = (named("app", Via::Process), named("pod", Via::Netns));
        publish(&ids, Key::Netns(7), true, Some(ns.clone()), false);
        assert_eq!(ids.lookup(Some(7), Some(42), false), Lookup::Waiting);
        publish(&ids, Key::Pid(42), true, Some(app.clone()), false);
        assert_eq!(
            ids.lookup(Some(7), Some(42), false),
            Lookup::Ready(Some(app.clone()))
        );
        // A host-network container's process, in the host's namespace.
        assert_eq!(
            ids.lookup(Some(HOST), Some(42), false),
            Lookup::Ready(Some(app))
        );
        // A process in no container: the namespace's.
        publish(&ids, Key::Pid(43), true, None, false);
        assert_eq!(
            ids.lookup(Some(7), Some(43), false),
            Lookup::Ready(Some(ns))
        );
        assert_eq!(ids.lookup(Some(HOST), Some(43), false), Lookup::Ready(None));
    }

    #[test]
    fn selection_admits_only_selected_namespaces() {
        let (all, _rx) = handle(false);
        assert_eq!(all.admit(Some(7)), Admit::Yes);
        assert_eq!(all.admit(None), Admit::Yes);
        let (ids, rx) = handle(true);
        assert_eq!(ids.admit(Some(HOST)), Admit::No);
        assert_eq!(ids.admit(None), Admit::No);
        assert_eq!(ids.admit(Some(7)), Admit::Unknown);
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![Key::Netns(7)]);
        publish(
            &ids,
            Key::Netns(7),
            true,
            Some(named("db", Via::Netns)),
            true,
        );
        publish(&ids, Key::Netns(8), true, None, false);
        assert_eq!(
            (ids.admit(Some(7)), ids.admit(Some(8))),
            (Admit::Yes, Admit::No)
        );
        assert_eq!(ids.selected_netns(), vec![7]);
    }
}
