//! Network namespaces as /proc shows them: one process in each, by namespace inode (the
//! `netns` of events and verdicts). Rule counters and TcpExt counters are read through it.
//! Queries inside a namespace run in a short-lived thread that enters it ([`run_in`],
//! [`spawn_in`]): only that thread moves, and it exits when done, taking the namespace along.

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
};

use nix::sched::{CloneFlags, setns};

/// Why a thread could not run inside a network namespace, by step.
#[derive(Debug, thiserror::Error)]
pub enum EnterError {
    #[error("open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is namespace {found} now, not {netns}")]
    Changed {
        path: PathBuf,
        netns: u32,
        found: u64,
    },
    #[error("spawn a thread to enter {path}: {source}")]
    Spawn { path: PathBuf, source: io::Error },
    #[error("setns(CLONE_NEWNET) into {path}: {source}")]
    Setns { path: PathBuf, source: nix::Error },
    #[error("the thread that entered {path} panicked")]
    Panicked { path: PathBuf },
}

/// Opens the namespace file at `path` (`/proc/PID/ns/net`, `/run/netns/NAME`), checking it is
/// namespace `netns` when given (a process may have gone and its pid been reused).
pub fn open(path: &Path, netns: Option<u32>) -> Result<File, EnterError> {
    let file = File::open(path).map_err(|source| EnterError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(netns) = netns {
        let found = file.metadata().map(|m| m.ino()).unwrap_or(0);
        if found != u64::from(netns) {
            let path = path.to_path_buf();
            return Err(EnterError::Changed { path, netns, found });
        }
    }
    Ok(file)
}

/// Whether `path` still opens namespace `netns` (one stat(2)): a name removed (`ip netns del`)
/// or a process gone no longer does. A file or socket kept open in a namespace keeps the
/// namespace, and its devices, alive: holders check this before each use and let go when it
/// fails, so a deleted namespace is released within one poll.
pub fn still_opens(path: &Path, netns: u32) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.ino() == u64::from(netns))
}

/// Moves the calling thread into namespace `ns` (opened from `path`) for good.
fn enter(ns: &File, path: &Path) -> Result<(), EnterError> {
    setns(ns, CloneFlags::CLONE_NEWNET).map_err(|source| EnterError::Setns {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs `f` in a thread named `name` inside namespace `ns` (opened from `path`) and waits for
/// it. `f` may borrow from the caller. Needs CAP_SYS_ADMIN (setns).
pub fn run_in<T: Send>(
    ns: &File,
    path: &Path,
    name: &str,
    f: impl FnOnce() -> T + Send,
) -> Result<T, EnterError> {
    thread::scope(|scope| {
        let worker = thread::Builder::new()
            .name(name.to_owned())
            .spawn_scoped(scope, || enter(ns, path).map(|()| f()))
            .map_err(|source| EnterError::Spawn {
                path: path.to_path_buf(),
                source,
            })?;
        worker.join().map_err(|_| EnterError::Panicked {
            path: path.to_path_buf(),
        })?
    })
}

/// Starts `f` in a thread named `name` inside namespace `ns` (opened from `path`) without
/// waiting: its result comes through the receiver, which a caller may stop waiting on
/// (a query that hangs). The receiver is disconnected without a result if the thread panics.
pub fn spawn_in<T: Send + 'static>(
    ns: File,
    path: &Path,
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<mpsc::Receiver<Result<T, EnterError>>, EnterError> {
    let (tx, rx) = mpsc::sync_channel(1);
    let thread_path = path.to_path_buf();
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let res = enter(&ns, &thread_path).map(|()| f());
            // The caller may have given up waiting: nothing to do then.
            let _ = tx.send(res);
        })
        .map_err(|source| EnterError::Spawn {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(rx)
}

/// A process in every network namespace that has one (the first found), by inode.
pub fn processes() -> HashMap<u32, i32> {
    let mut pids = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in dir.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(meta) = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            && let Ok(netns) = u32::try_from(meta.ino())
        {
            pids.entry(netns).or_insert(pid);
        }
    }
    pids
}

/// A path that opens network namespace `netns`: a name under /run/netns (`ip netns`), else
/// the namespace of a process in it. `None` when neither exists.
pub fn path(netns: u32) -> Option<PathBuf> {
    let inode_is = |path: &Path| std::fs::metadata(path).is_ok_and(|m| m.ino() == u64::from(netns));
    let named = std::fs::read_dir("/run/netns").into_iter().flatten();
    if let Some(path) = named
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| inode_is(p))
    {
        return Some(path);
    }
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .map(|e| e.path().join("ns/net"))
        .find(|p| inode_is(p))
}

/// The namespaces named under /run/netns (`ip netns add`), by inode: the first name of each.
pub fn named() -> HashMap<u32, PathBuf> {
    let mut paths = HashMap::new();
    let named = std::fs::read_dir("/run/netns").into_iter().flatten();
    for path in named.filter_map(Result::ok).map(|e| e.path()) {
        if let Ok(meta) = std::fs::metadata(&path)
            && let Ok(netns) = u32::try_from(meta.ino())
        {
            paths.entry(netns).or_insert(path);
        }
    }
    paths
}

/// Every network namespace visible now: inode → a file that opens it. `/run/netns` names
/// (`ip netns add`: they may have no process) are preferred to `/proc/PID/ns/net`, which
/// vanish with their process.
pub fn paths() -> HashMap<u32, PathBuf> {
    let mut paths = named();
    for (netns, pid) in processes() {
        paths
            .entry(netns)
            .or_insert_with(|| PathBuf::from(format!("/proc/{pid}/ns/net")));
    }
    tracing::debug!(namespaces = paths.len(), "network namespaces enumerated");
    paths
}
