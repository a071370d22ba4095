//! Network namespaces as /proc shows them: one process in each, by namespace inode (the
//! `netns` of events and verdicts). Rule counters and TcpExt counters are read through it.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

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
