//! Which netfilter rule dropped a packet, found without changing the firewall.
//!
//! Method: [`RuleCounters::new`] lists the ruleset of every network namespace it can see
//! (`/run/netns/*` and `/proc/*/ns/net`) with `nft -a list ruleset`, run inside the namespace
//! (`setns(CLONE_NEWNET)` before exec), and keeps each rule's packet counter as a baseline.
//! [`RuleLookup::find`] lists the namespace's ruleset again and subtracts: the dropping or
//! rejecting rules whose counters moved since the baseline, at the drop's hook and in tables of
//! the packet's family (`ip`/`inet` or `ip6`/`inet`), are the candidates. Chains at the hook are
//! its base chains and the regular chains they reach by `jump`/`goto` (iptables user chains); a
//! regular chain no rule names counts too, as a named verdict map may reach it. A namespace first
//! seen at `find` time has an empty baseline: it probably appeared after start-up, so all its
//! counts are recent. Snapshots are reused for 250 ms, as drops come in bursts.
//!
//! Where it can fail:
//! - A rule without a `counter` has no count: it is never named (iptables-nft rules always have
//!   one; hand-written nft rules often do not). The same holds for named counters.
//! - Several dropping rules counted since the baseline: all are returned as candidates, most
//!   packets first; the counters do not say which one dropped this connection's packets.
//! - A rule that dropped other traffic since the baseline counts as much as one that dropped
//!   this connection's: a single candidate is the only rule that dropped anything, not proof.
//! - The ruleset changed between snapshots: a re-created rule gets a new handle and its whole
//!   count is new; a re-created table can reuse handles with reset counters and hide a drop.
//! - Rules loaded with iptables-legacy live outside nftables: `nft` does not show them.
//! - Policy drops have no counter: a base chain with `policy drop` is named when no rule
//!   counted, even if a rule without a counter dropped the packet; when several base chains at
//!   the hook have `policy drop`, the first listed is named.
//! - `find` blocks while `nft` runs (milliseconds; killed after 2 s).

mod history;
mod iptables;
mod legacy;
mod nft;
mod rank;
mod save;

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::{self, Read},
    os::{
        fd::{AsRawFd as _, BorrowedFd},
        unix::{fs::MetadataExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};
use tracing::{debug, warn};

use self::nft::{Chain, Rule, Table, parse_ruleset};
use crate::engine::{
    facts::NfHook,
    lookup::{FirewallRule, RuleFinding, RuleLookup},
};

/// `nft` normally answers in milliseconds; a hung one is killed after this.
const NFT_TIMEOUT: Duration = Duration::from_secs(2);
/// A snapshot younger than this is reused: drops come in bursts.
const REUSE_FOR: Duration = Duration::from_millis(250);
/// Namespaces are re-enumerated at most this often when an unknown one is asked for.
const RESCAN_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("the kernel did not report the drop's network namespace")]
    NoNetns,
    #[error("network namespace {netns} not found")]
    UnknownNetns { netns: u32 },
    #[error("open network namespace {path}: {source}", path = path.display())]
    OpenNetns { path: PathBuf, source: io::Error },
    #[error("`nft` not found: install nftables")]
    NftNotFound,
    #[error("setns(CLONE_NEWNET) into {path}: {source}", path = path.display())]
    Setns { path: PathBuf, source: io::Error },
    #[error("run `nft -a list ruleset` in netns {netns}: {source}")]
    Spawn { netns: u32, source: io::Error },
    #[error("wait for `nft -a list ruleset` in netns {netns}: {source}")]
    Wait { netns: u32, source: io::Error },
    #[error("`nft -a list ruleset` in netns {netns} ran over {}s: killed", NFT_TIMEOUT.as_secs())]
    Timeout { netns: u32 },
    #[error("nft list ruleset in netns {netns} ({status}): {stderr}")]
    Failed {
        netns: u32,
        status: ExitStatus,
        stderr: String,
    },
}

/// A rule's identity across snapshots: family, table, chain, handle.
type RuleKey = (String, String, String, u64);
type Counts = HashMap<RuleKey, u64>;

/// Finds the rule behind a netfilter drop by diffing rule counters against a baseline.
pub struct RuleCounters {
    /// A file that opens each known namespace, by namespace inode.
    paths: HashMap<u32, PathBuf>,
    scanned_at: Instant,
    /// Counters at start-up; a namespace missing here has an empty baseline.
    baselines: HashMap<u32, Counts>,
    latest: HashMap<u32, (Instant, Vec<Table>)>,
}

impl RuleCounters {
    /// Takes a baseline snapshot of every network namespace visible now: one `nft` run each
    /// (milliseconds), stopping early if `nft` is missing or hangs. Reading rulesets needs
    /// CAP_SYS_ADMIN (setns) and CAP_NET_ADMIN; without them, `find` says why it cannot.
    pub fn new() -> Self {
        let paths = scan_namespaces();
        let mut baselines = HashMap::new();
        for (&netns, path) in &paths {
            match open_netns(netns, path).and_then(|ns| list_ruleset(netns, path, &ns)) {
                Ok(tables) => {
                    baselines.insert(netns, counts(&tables));
                }
                Err(error @ (RulesError::NftNotFound | RulesError::Timeout { .. })) => {
                    warn!(%error, "rule counter baselines not taken");
                    break;
                }
                // A process that exited since the scan took its namespace (if unnamed) along.
                Err(error @ (RulesError::OpenNetns { .. } | RulesError::UnknownNetns { .. })) => {
                    debug!(netns, %error, "no rule counter baseline for this namespace");
                }
                Err(error) => warn!(netns, %error, "no rule counter baseline for this namespace"),
            }
        }
        debug!(
            namespaces = paths.len(),
            baselines = baselines.len(),
            "rule counter baselines taken"
        );
        Self {
            paths,
            scanned_at: Instant::now(),
            baselines,
            latest: HashMap::new(),
        }
    }

    fn try_find(
        &mut self,
        netns: Option<u32>,
        hook: Option<NfHook>,
        ipv6: bool,
    ) -> Result<RuleFinding, RulesError> {
        let netns = netns.ok_or(RulesError::NoNetns)?;
        self.latest.retain(|_, (at, _)| at.elapsed() < REUSE_FOR);
        if !self.latest.contains_key(&netns) {
            let (path, ns) = self.open(netns)?;
            let tables = list_ruleset(netns, &path, &ns)?;
            self.latest.insert(netns, (Instant::now(), tables));
        }
        let tables = self.latest.get(&netns).map_or(&[][..], |(_, t)| t);
        Ok(decide(tables, self.baselines.get(&netns), hook, ipv6))
    }

    /// Opens namespace `netns`, re-enumerating namespaces if its known path is gone or stale.
    fn open(&mut self, netns: u32) -> Result<(PathBuf, File), RulesError> {
        if let Some(path) = self.paths.get(&netns)
            && let Ok(ns) = open_netns(netns, path)
        {
            return Ok((path.clone(), ns));
        }
        if self.scanned_at.elapsed() >= RESCAN_EVERY {
            self.paths = scan_namespaces();
            self.scanned_at = Instant::now();
        }
        let path = self
            .paths
            .get(&netns)
            .ok_or(RulesError::UnknownNetns { netns })?;
        Ok((path.clone(), open_netns(netns, path)?))
    }
}

impl RuleLookup for RuleCounters {
    fn find(&mut self, netns: Option<u32>, hook: Option<NfHook>, ipv6: bool) -> RuleFinding {
        match self.try_find(netns, hook, ipv6) {
            Ok(finding) => finding,
            Err(error) => {
                debug!(?netns, %error, "firewall rule look-up failed");
                RuleFinding::NotFound {
                    why: error.to_string(),
                }
            }
        }
    }
}

/// Every network namespace visible now: inode → a file that opens it. `/run/netns` names
/// (`ip netns add`) are preferred to `/proc/PID/ns/net`, which vanish with their process.
fn scan_namespaces() -> HashMap<u32, PathBuf> {
    let mut paths = HashMap::new();
    // Named namespaces first (`ip netns add`: they may have no process), then the others.
    let named = std::fs::read_dir("/run/netns").into_iter().flatten();
    for path in named.filter_map(Result::ok).map(|e| e.path()) {
        if let Ok(meta) = std::fs::metadata(&path)
            && let Ok(netns) = u32::try_from(meta.ino())
        {
            paths.entry(netns).or_insert(path);
        }
    }
    for (netns, pid) in crate::host::netns::processes() {
        paths
            .entry(netns)
            .or_insert_with(|| PathBuf::from(format!("/proc/{pid}/ns/net")));
    }
    debug!(namespaces = paths.len(), "network namespaces enumerated");
    paths
}

/// Opens `path` and checks that it still is namespace `netns` (a PID may have been reused).
fn open_netns(netns: u32, path: &Path) -> Result<File, RulesError> {
    let open_error = |source| RulesError::OpenNetns {
        path: path.to_owned(),
        source,
    };
    let ns = File::open(path).map_err(open_error)?;
    let ino = ns.metadata().map_err(open_error)?.ino();
    if ino != u64::from(netns) {
        return Err(RulesError::UnknownNetns { netns });
    }
    Ok(ns)
}

/// `nft` from PATH, else from the sbin directories a service's PATH may lack.
fn nft_program() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let sbin = ["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(sbin)
        .map(|dir| dir.join("nft"))
        .find(|nft| nft.is_file())
        .unwrap_or_else(|| PathBuf::from("nft"))
}

/// Runs `nft -a list ruleset` inside namespace `ns` and parses its output.
fn list_ruleset(netns: u32, path: &Path, ns: &File) -> Result<Vec<Table>, RulesError> {
    let spawn_error = |source| RulesError::Spawn { netns, source };
    // The child writes one byte here when setns fails, to tell that from a failed exec.
    let (mut marker, marker_tx) = io::pipe().map_err(spawn_error)?;
    let (ns_fd, marker_fd) = (ns.as_raw_fd(), marker_tx.as_raw_fd());
    let mut command = Command::new(nft_program());
    command
        .args(["-a", "list", "ruleset"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: runs in the forked child before exec and only makes async-signal-safe system
    // calls (setns, write) on descriptors the parent keeps open until spawn returns.
    unsafe {
        command.pre_exec(move || {
            setns(BorrowedFd::borrow_raw(ns_fd), CloneFlags::CLONE_NEWNET).map_err(|errno| {
                // If this write fails, the parent reports a failed spawn instead.
                libc::write(marker_fd, b"s".as_ptr().cast(), 1);
                io::Error::from(errno)
            })
        })
    };
    let spawned = command.spawn();
    drop(marker_tx);
    let mut child = match spawned {
        Ok(child) => child,
        Err(source) => {
            let mut byte = [0u8; 1];
            return Err(match marker.read(&mut byte) {
                Ok(1) => RulesError::Setns {
                    path: path.to_owned(),
                    source,
                },
                _ if source.kind() == io::ErrorKind::NotFound => RulesError::NftNotFound,
                _ => spawn_error(source),
            });
        }
    };
    // Read both pipes while waiting, so a large ruleset cannot fill a pipe and stall nft.
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            pipe.map_or(Ok(0), |mut p| p.read_to_end(&mut bytes))
                .map(|_| bytes)
        })
    };
    let out = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let err = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let wait_error = |source| RulesError::Wait { netns, source };
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(wait_error)? {
            break status;
        }
        if started.elapsed() > NFT_TIMEOUT {
            // The readers end by themselves when the pipes close.
            child.kill().map_err(wait_error)?;
            child.wait().map_err(wait_error)?;
            return Err(RulesError::Timeout { netns });
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let joined = |reader: std::thread::JoinHandle<io::Result<Vec<u8>>>| {
        let read = reader
            .join()
            .map_err(|_| io::Error::other("pipe reader panicked"));
        read.and_then(|r| r).map_err(wait_error)
    };
    let (out, err) = (joined(out)?, joined(err)?);
    if !status.success() {
        return Err(RulesError::Failed {
            netns,
            status,
            stderr: String::from_utf8_lossy(&err).trim().to_owned(),
        });
    }
    let tables = parse_ruleset(&String::from_utf8_lossy(&out));
    debug!(netns, tables = tables.len(), "ruleset listed");
    Ok(tables)
}

/// A rule's identity across snapshots.
fn key(table: &Table, chain: &Chain, rule: &Rule) -> RuleKey {
    let (family, name) = (table.family.clone(), table.name.clone());
    (family, name, chain.name.clone(), rule.handle)
}

/// Every counted rule's packets.
fn counts(tables: &[Table]) -> Counts {
    let mut counts = Counts::new();
    for table in tables {
        for chain in &table.chains {
            for rule in &chain.rules {
                if let Some(packets) = rule.packets {
                    counts.insert(key(table, chain, rule), packets);
                }
            }
        }
    }
    counts
}

/// Chains of `table` a packet at `hook` can traverse: base chains at the hook and the regular
/// chains reachable from them by `jump`/`goto`. A regular chain that no rule names (reached from
/// a named verdict map, or not at all) counts as reachable. All chains when `hook` is `None`.
fn chains_at(table: &Table, hook: Option<NfHook>) -> HashSet<&str> {
    let Some(hook) = hook else {
        return table.chains.iter().map(|c| c.name.as_str()).collect();
    };
    let at = |hook_name: &Option<String>| hook_name.as_deref() == Some(hook.nft_name());
    if !table.chains.iter().any(|c| at(&c.hook)) {
        return HashSet::new();
    }
    let rules = || table.chains.iter().flat_map(|c| &c.rules);
    let jumped: HashSet<&str> = rules()
        .flat_map(|r| &r.targets)
        .map(String::as_str)
        .collect();
    let mut todo: Vec<&str> = table
        .chains
        .iter()
        .filter(|c| {
            at(&c.hook)
                || (c.hook.is_none()
                    && (!jumped.contains(c.name.as_str()) || table.map_targets.contains(&c.name)))
        })
        .map(|c| c.name.as_str())
        .collect();
    let mut reached = HashSet::new();
    while let Some(name) = todo.pop() {
        let Some(chain) = table.chain(name) else {
            continue;
        };
        if (chain.hook.is_none() || at(&chain.hook)) && reached.insert(name) {
            todo.extend(
                chain
                    .rules
                    .iter()
                    .flat_map(|r| &r.targets)
                    .map(String::as_str),
            );
        }
    }
    reached
}

/// The finding for a drop at `hook`, from the current ruleset and the baseline counters.
fn decide(
    tables: &[Table],
    baseline: Option<&Counts>,
    hook: Option<NfHook>,
    ipv6: bool,
) -> RuleFinding {
    let families = if ipv6 {
        ["ip6", "inet"]
    } else {
        ["ip", "inet"]
    };
    let tables: Vec<&Table> = tables
        .iter()
        .filter(|t| families.contains(&t.family.as_str()))
        .collect();
    let families = families.join("/");
    let at_hook = hook.map_or(String::new(), |h| format!(" at the {} hook", h.nft_name()));
    if tables.is_empty() {
        return RuleFinding::NotFound {
            why: format!(
                "no {families} nftables table: the drop was not made by an nftables rule \
                 (iptables-legacy rules are not visible to `nft`)"
            ),
        };
    }
    let mut candidates = Vec::new();
    let (mut dropping, mut uncounted) = (0, 0);
    for table in &tables {
        let chains = chains_at(table, hook);
        for chain in table
            .chains
            .iter()
            .filter(|c| chains.contains(c.name.as_str()))
        {
            for rule in &chain.rules {
                let Some(action) = &rule.action else { continue };
                dropping += 1;
                let Some(now) = rule.packets else {
                    uncounted += 1;
                    continue;
                };
                let key = key(table, chain, rule);
                let before = baseline.and_then(|b| b.get(&key)).copied().unwrap_or(0);
                let (family, table, chain, handle) = key;
                candidates.push(FirewallRule {
                    family,
                    table,
                    chain,
                    handle,
                    text: rule.text.clone(),
                    comment: None,
                    action: action.for_packet(ipv6),
                    packets: now.saturating_sub(before),
                });
            }
        }
    }
    candidates.retain(|r| r.packets > 0);
    candidates.sort_by_key(|r| std::cmp::Reverse(r.packets));
    match candidates.len() {
        0 => {}
        1 => return RuleFinding::Rule(candidates.remove(0)),
        _ => return RuleFinding::Candidates(candidates),
    }
    let policy = tables.iter().find_map(|t| {
        t.chains
            .iter()
            .find(|c| {
                c.policy.as_deref() == Some("drop")
                    && c.hook.is_some()
                    && hook.is_none_or(|h| c.hook.as_deref() == Some(h.nft_name()))
            })
            .map(|c| (t, c))
    });
    if let Some((table, chain)) = policy {
        return RuleFinding::Policy {
            family: table.family.clone(),
            table: table.name.clone(),
            chain: chain.name.clone(),
        };
    }
    let since = if baseline.is_some() {
        "since start-up"
    } else {
        "since they were added"
    };
    let why = match (dropping, uncounted) {
        (0, _) => format!(
            "no {families} table has a dropping rule or policy drop{at_hook} \
             (iptables-legacy rules are not visible to `nft`)"
        ),
        (_, 0) => format!("no dropping rule{at_hook} counted packets {since}"),
        (_, 1) => format!(
            "no dropping rule{at_hook} counted packets {since}; 1 dropping rule there has no \
             `counter` and cannot be identified"
        ),
        (_, n) => format!(
            "no dropping rule{at_hook} counted packets {since}; {n} dropping rules there have no \
             `counter` and cannot be identified"
        ),
    };
    RuleFinding::NotFound { why }
}

#[cfg(test)]
mod tests;
