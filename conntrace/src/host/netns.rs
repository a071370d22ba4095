//! Network namespaces as /proc shows them: one process in each, by namespace inode (the
//! `netns` of events and verdicts). Rule counters and TcpExt counters are read through it.

use std::{collections::HashMap, os::unix::fs::MetadataExt as _};

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
