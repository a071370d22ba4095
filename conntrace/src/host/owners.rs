//! The processes holding the traced connections already open when conntrace started (a
//! connection pool's), read once, in the background, at start-up.
//!
//! conntrace never saw those connections' connect() or accept(). When one of them fails, the
//! engine asks who holds its socket now ([`super::listeners::owner_of`]: sock_diag, then
//! /proc), but a reset or a timeout closes the socket before the verdict is made, and a closed
//! socket is in neither. So at start-up every network namespace's ESTABLISHED, CLOSE_WAIT and
//! FIN_WAIT1 sockets on the traced ports are listed (sock_diag, with their inodes) and the
//! processes holding them found (/proc, as `ss -p` does): one pass, at most [`MAX_OWNERS`]
//! connections. A verdict about a connection conntrace first saw established takes its process
//! from there when the socket is gone (`ListenerLookup::owner_at_start`).
//!
//! Where it can fail: a connection opened while the scan runs is not in it (its connect() or
//! accept() was traced, or it is not answered); a namespace with neither a process nor a name
//! in /run/netns is not read; a socket passed to another process after start-up is named by
//! the process that held it then.

use std::{
    collections::HashMap,
    sync::mpsc::{self, Receiver},
    time::Duration,
};

use procfs::process::all_processes;
use tracing::debug;

use crate::{
    engine::facts::{FourTuple, Proc},
    host::{
        listeners::{each_socket_fd, proc_of},
        netns,
        windows::{diag::NsDiag, filter::port_filter},
    },
};

/// At most this many connections are remembered (about 100 bytes each).
pub const MAX_OWNERS: usize = 65_536;
/// How long the first verdict that needs the scan waits for it (it runs once, as conntrace
/// starts; only a verdict about a connection open before then asks).
pub const WAIT: Duration = Duration::from_secs(2);

/// Who held each connection open at start-up, by (namespace, tuple with the local end first).
pub type Owners = HashMap<(u32, FourTuple), Proc>;

/// The start-up scan: running, then its answer.
pub struct StartOwners {
    scan: Option<Receiver<Owners>>,
    owners: Owners,
}

impl StartOwners {
    /// Starts the scan of the connections on `ports` (every port when empty) in a thread of
    /// its own.
    pub fn spawn(ports: Vec<u16>) -> Self {
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("start-owners".into())
            .spawn(move || {
                // The receiver may be gone (conntrace stopping): nothing to hand over then.
                let _ = tx.send(scan(&ports));
            });
        if let Err(error) = &spawned {
            debug!(%error, "start-up owners: no thread, not scanned");
        }
        Self {
            scan: spawned.is_ok().then_some(rx),
            owners: Owners::new(),
        }
    }

    /// The process that held connection `tuple` (local end first) of namespace `netns` at
    /// start-up; `None` when it was not open then, no process held it, or the scan did not
    /// finish. The first call waits for the scan, at most [`WAIT`].
    pub fn get(&mut self, netns: u32, tuple: FourTuple) -> Option<Proc> {
        if let Some(rx) = self.scan.take() {
            match rx.recv_timeout(WAIT) {
                Ok(owners) => self.owners = owners,
                Err(error) => debug!(%error, "start-up owners: no answer"),
            }
        }
        self.owners.get(&(netns, tuple)).cloned()
    }
}

/// The connections on `ports` in every namespace and the processes holding them.
fn scan(ports: &[u16]) -> Owners {
    let bytecode = port_filter(ports);
    let mut by_inode = HashMap::new();
    let (mut buf, mut found) = (Vec::new(), Vec::new());
    for (netns, path) in netns::paths() {
        let dumped = NsDiag::open(&path, netns)
            .and_then(|mut diag| diag.dump(&bytecode, ports, false, &mut buf, &mut found));
        if let Err(error) = dumped {
            debug!(%error, netns, "start-up owners: namespace not read");
        }
        for (tuple, sample) in found.drain(..) {
            if sample.inode != 0 && by_inode.len() < MAX_OWNERS {
                by_inode.insert(u64::from(sample.inode), (netns, tuple));
            }
        }
    }
    let mut owners = Owners::new();
    if by_inode.is_empty() {
        return owners;
    }
    let Ok(processes) = all_processes() else {
        return owners;
    };
    let processes: Vec<_> = processes.filter_map(Result::ok).collect();
    each_socket_fd(&processes, |p, inode| {
        if let Some(&key) = by_inode.get(&inode) {
            owners.entry(key).or_insert_with(|| proc_of(p));
        }
    });
    debug!(
        connections = by_inode.len(),
        held = owners.len(),
        "start-up owners"
    );
    owners
}
