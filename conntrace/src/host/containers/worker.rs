//! The worker thread: resolves namespaces and processes to containers and publishes the answers
//! into the shared table the event loop reads. It has its own single-threaded tokio runtime for
//! the runtimes' APIs, so a slow API delays only its own answers.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt as _,
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use tokio::sync::Notify;
use tracing::{debug, warn};

use super::{
    ApiError, Meta, Options, Selector,
    cgroup::{self, CgroupRef},
    container,
    containerd::ContainerdApi,
    docker::DockerApi,
    handle::{Entry, FRESH_WITH, FRESH_WITHOUT, Key, Shared},
};
use crate::identity::{Container, Runtime, Via};

/// With a selector, how often every namespace is looked at for new containers.
const SELECT_EVERY: Duration = Duration::from_secs(1);
/// Processes looked at per namespace (their cgroups name its containers).
const PIDS_PER_NETNS: usize = 256;
/// A /proc scan younger than this is reused for the next request.
const SCAN_FOR: Duration = Duration::from_millis(200);
/// At most one /proc scan per this long: a burst of records from namespaces without processes
/// (made with `ip netns add`) would otherwise rescan for each.
const SCAN_GAP: Duration = Duration::from_millis(50);
/// Answers nobody asked for again within this long are forgotten (a host with short-lived
/// processes would otherwise keep one per pid forever); the API answers a minute longer.
const FORGET_AFTER: Duration = Duration::from_secs(30);

/// The network namespace inode of process `pid` (`/proc/PID/ns/net`).
pub(super) fn netns_of(pid: u32) -> Option<u32> {
    let meta = std::fs::metadata(format!("/proc/{pid}/ns/net")).ok()?;
    u32::try_from(meta.ino()).ok()
}

/// When process `pid` started (clock ticks after boot, /proc/PID/stat field 22).
fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    // Field 3 (state) is the first after the comm: field 22 is the 20th from there.
    after_comm
        .split_whitespace()
        .nth(19)
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX)
}

/// The processes of every network namespace, by inode (at most [`PIDS_PER_NETNS`] each).
fn scan() -> HashMap<u32, Vec<u32>> {
    let mut by_netns: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return by_netns;
    };
    for entry in dir.filter_map(Result::ok) {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some(netns) = netns_of(pid) {
            let pids = by_netns.entry(netns).or_default();
            if pids.len() < PIDS_PER_NETNS {
                pids.push(pid);
            }
        }
    }
    by_netns
}

/// A container's runtime and what its API said (`None`: no answer); `None`: no container.
type Answer = Option<(Runtime, Option<Meta>)>;

/// The runtimes' APIs, and their answers by container (reused for a minute, failures for 10 s).
struct Apis {
    docker: DockerApi,
    containerd: Vec<ContainerdApi>,
    answers: HashMap<CgroupRef, (Instant, Answer)>,
    warned: HashSet<String>,
    warn_on_failure: bool,
}

impl Apis {
    fn new(o: &Options) -> Self {
        Self {
            docker: DockerApi::new(o.docker_sockets.clone(), o.api_timeout),
            containerd: o
                .containerd_sockets
                .iter()
                .map(|s| ContainerdApi::new(s.clone(), o.api_timeout))
                .collect(),
            answers: HashMap::new(),
            warned: HashSet::new(),
            warn_on_failure: o.warn_on_failure,
        }
    }

    /// Logs an API failure: with sockets given, the first of each kind as a warning; the rest,
    /// and every failure of the default sockets, at debug level.
    fn failed(&mut self, error: &ApiError) {
        let text = error.to_string();
        let kind: String = text.chars().take(48).collect();
        if self.warn_on_failure && self.warned.insert(kind) {
            warn!(%error, "container names unknown");
        } else {
            debug!(%error, "container API");
        }
    }

    async fn containerd(&mut self, r: &CgroupRef) -> Option<Meta> {
        for i in 0..self.containerd.len() {
            match self.containerd[i].inspect(r).await {
                Ok(Some(meta)) => return Some(meta),
                Ok(None) => {}
                Err(e) => self.failed(&e),
            }
        }
        None
    }

    async fn docker(&mut self, id: &str) -> Option<Meta> {
        match self.docker.inspect(id).await {
            Ok(meta) => meta,
            Err(e) => {
                self.failed(&e);
                None
            }
        }
    }

    /// The runtime of the container `r` names and what its API says (`None`: not asked or no
    /// answer); `None` when `r` turns out to be no container.
    async fn ask(&mut self, r: &CgroupRef) -> Answer {
        match r {
            CgroupRef::Known { runtime, id } => Some((
                *runtime,
                match runtime {
                    Runtime::Docker | Runtime::Podman => self.docker(id).await,
                    Runtime::Containerd => self.containerd(r).await,
                    Runtime::CriO => None,
                },
            )),
            CgroupRef::Kubepods { id } => match self.containerd(r).await {
                Some(m) => Some((Runtime::Containerd, Some(m))),
                None => Some(Runtime::Docker).zip(self.docker(id).await.map(Some)),
            },
            CgroupRef::ContainerdCandidate { .. } => {
                Some(Runtime::Containerd).zip(self.containerd(r).await.map(Some))
            }
        }
    }

    async fn answer(&mut self, r: &CgroupRef) -> Answer {
        if let Some((at, a)) = self.answers.get(r) {
            // Keyed by container id, which is never reused: kept for a minute.
            let ttl = if matches!(a, Some((_, Some(_)))) {
                Duration::from_secs(60)
            } else {
                Duration::from_secs(10)
            };
            if at.elapsed() < ttl {
                return a.clone();
            }
        }
        let a = self.ask(r).await;
        self.answers.insert(r.clone(), (Instant::now(), a.clone()));
        a
    }
}

/// One container seen in a namespace: when its oldest process there started, and who it is.
struct Seen {
    started: u64,
    container: Container,
    sandbox: bool,
}

/// The namespace's container: its only application container; else the pod's sandbox (which
/// owns the namespace); else the one whose process has run longest.
fn choose(mut seen: Vec<Seen>) -> Option<Container> {
    seen.sort_by_key(|s| s.started);
    let apps: Vec<&Seen> = seen.iter().filter(|s| !s.sandbox).collect();
    if let [only] = apps.as_slice() {
        return Some(only.container.clone());
    }
    seen.iter()
        .find(|s| s.sandbox)
        .or(seen.first())
        .map(|s| s.container.clone())
}

struct Worker {
    apis: Apis,
    select: Option<Selector>,
    host_netns: Option<u32>,
    shared: Arc<Mutex<Shared>>,
    changed: Arc<Notify>,
    scan: (Instant, HashMap<u32, Vec<u32>>),
}

impl Worker {
    fn publish(&self, key: Key, complete: bool, container: Option<Container>, selected: bool) {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if complete {
            shared.asked.remove(&key);
        }
        shared.entries.insert(
            key,
            Entry {
                at: Instant::now(),
                complete,
                container,
                selected,
            },
        );
        drop(shared);
        self.changed.notify_one();
    }

    /// The processes of `netns`, from a scan made now unless a recent one knows it.
    /// A scan made after `asked` knows every process the namespace had when it was asked
    /// about; an older one is reused while it is younger than [`SCAN_FOR`] and knows it.
    fn pids_in(&mut self, netns: u32, asked: Instant) -> Vec<u32> {
        let (at, by_netns) = &self.scan;
        let known = by_netns.contains_key(&netns) && at.elapsed() <= SCAN_FOR;
        if !known && *at < asked {
            std::thread::sleep(SCAN_GAP.saturating_sub(at.elapsed()));
            self.scan = (Instant::now(), scan());
        }
        self.scan.1.get(&netns).cloned().unwrap_or_default()
    }

    /// The containers of `netns`'s processes, asking their runtimes.
    async fn seen_in(&mut self, netns: u32, asked: Instant) -> Vec<Seen> {
        let mut refs: HashMap<CgroupRef, u64> = HashMap::new();
        for pid in self.pids_in(netns, asked) {
            if let Some(r) = cgroup::of_pid(pid) {
                let started = start_time(pid);
                let oldest = refs.entry(r).or_insert(started);
                *oldest = (*oldest).min(started);
            }
        }
        let mut seen = Vec::new();
        for (r, started) in refs {
            if let Some((runtime, meta)) = self.apis.answer(&r).await {
                seen.push(Seen {
                    started,
                    container: container(runtime, r.id(), meta.as_ref(), Via::Netns),
                    sandbox: meta.is_some_and(|m| m.sandbox),
                });
            }
        }
        seen
    }

    /// Publishes `netns`'s container, asked about at `asked`.
    async fn resolve_netns(&mut self, netns: u32, asked: Instant) {
        let seen = self.seen_in(netns, asked).await;
        let selected = self
            .select
            .as_ref()
            .is_some_and(|s| seen.iter().any(|c| s.matches(&c.container)));
        self.publish(Key::Netns(netns), true, choose(seen), selected);
    }

    async fn resolve_pid(&mut self, pid: u32) {
        let Some(r) = cgroup::of_pid(pid) else {
            self.publish(Key::Pid(pid), true, None, false);
            return;
        };
        if let CgroupRef::Known { runtime, id } = &r {
            // Runtime and id now; the name when the API answers.
            let partial = container(*runtime, id, None, Via::Process);
            self.publish(Key::Pid(pid), false, Some(partial), false);
        }
        let found = self.apis.answer(&r).await;
        let c =
            found.map(|(runtime, meta)| container(runtime, r.id(), meta.as_ref(), Via::Process));
        self.publish(Key::Pid(pid), true, c, false);
    }

    /// Forgets answers not asked for again lately, so the tables stay as small as what is in
    /// use.
    fn forget_old(&mut self) {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.entries.retain(|_, e| e.at.elapsed() < FORGET_AFTER);
        drop(shared);
        self.apis
            .answers
            .retain(|_, (at, _)| at.elapsed() < FORGET_AFTER * 3);
    }

    /// Resolves every namespace whose answer is missing or old.
    async fn full_pass(&mut self) {
        self.scan = (Instant::now(), scan());
        let now = Instant::now();
        let mut todo: Vec<u32> = {
            let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            self.scan
                .1
                .keys()
                .copied()
                .filter(|n| Some(*n) != self.host_netns)
                .filter(|n| {
                    shared.entries.get(&Key::Netns(*n)).is_none_or(|e| {
                        let ttl = if e.container.is_some() {
                            FRESH_WITH
                        } else {
                            FRESH_WITHOUT
                        };
                        now.duration_since(e.at) >= ttl
                    })
                })
                .collect()
        };
        todo.sort_unstable();
        for netns in todo {
            self.resolve_netns(netns, now).await;
        }
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).passes += 1;
        self.changed.notify_one();
    }
}

/// Starts the worker thread; it ends when `requests`' sender is dropped.
pub(super) fn spawn(
    options: Options,
    host_netns: Option<u32>,
    requests: mpsc::Receiver<Key>,
    shared: Arc<Mutex<Shared>>,
    changed: Arc<Notify>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("ct-containers".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(error) => {
                    warn!(%error, "start the container look-up runtime: containers unnamed");
                    return;
                }
            };
            let mut worker = Worker {
                apis: Apis::new(&options),
                select: options.select,
                host_netns,
                shared,
                changed,
                scan: (Instant::now(), HashMap::new()),
            };
            runtime.block_on(worker.full_pass());
            serve(&runtime, &mut worker, &requests);
        })
        .map(|_| ())
}

/// Answers requests as they come (in batches), and with a selector looks at every namespace
/// each [`SELECT_EVERY`].
fn serve(runtime: &tokio::runtime::Runtime, worker: &mut Worker, requests: &mpsc::Receiver<Key>) {
    let (mut last_pass, mut last_forget) = (Instant::now(), Instant::now());
    loop {
        let first = match requests.recv_timeout(SELECT_EVERY) {
            Ok(key) => Some(key),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let asked = Instant::now();
        let mut keys: Vec<Key> = first.into_iter().chain(requests.try_iter()).collect();
        keys.dedup();
        if last_forget.elapsed() >= FORGET_AFTER {
            worker.forget_old();
            last_forget = Instant::now();
        }
        runtime.block_on(async {
            if worker.select.is_some() && last_pass.elapsed() >= SELECT_EVERY {
                worker.full_pass().await;
                last_pass = Instant::now();
            }
            for key in keys {
                match key {
                    Key::Netns(n) => worker.resolve_netns(n, asked).await,
                    Key::Pid(p) => worker.resolve_pid(p).await,
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Runtime;

    fn seen(id: &str, started: u64, sandbox: bool) -> Seen {
        Seen {
            started,
            container: container(Runtime::Containerd, id, None, Via::Netns),
            sandbox,
        }
    }

    #[test]
    fn a_namespace_is_its_only_app_container_else_the_sandbox_else_the_oldest() {
        let id = |c: Option<Container>| c.map(|c| c.id);
        assert_eq!(
            id(choose(vec![seen("pause", 1, true), seen("app", 2, false)])).as_deref(),
            Some("app")
        );
        assert_eq!(
            id(choose(vec![
                seen("a", 3, false),
                seen("pause", 1, true),
                seen("b", 2, false)
            ]))
            .as_deref(),
            Some("pause")
        );
        assert_eq!(
            id(choose(vec![
                seen("late", 9, false),
                seen("early", 4, false)
            ]))
            .as_deref(),
            Some("early")
        );
        assert_eq!(choose(Vec::new()), None);
    }

    #[test]
    fn this_process_has_a_namespace_and_a_start_time() {
        let me = std::process::id();
        assert!(netns_of(me).is_some());
        assert!(start_time(me) < u64::MAX);
        assert!(scan().values().any(|pids| pids.contains(&me)));
    }
}
