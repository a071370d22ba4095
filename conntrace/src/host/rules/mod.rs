//! Which netfilter rule dropped a packet, found without changing the firewall.
//!
//! Method: [`RuleCounters::new`] reads the rule counters of every network namespace it can see
//! (`/run/netns/*` and `/proc/*/ns/net`) as a baseline: `nft -a list ruleset` (nftables, and the
//! iptables-nft rules stored there) and `iptables-legacy-save -c` / `ip6tables-legacy-save -c`
//! (x_tables rules, which `nft` cannot see), each run inside the namespace (`setns` in the
//! child before exec, [`tool`]). [`RuleCounters::find_attempt`] reads the namespace again and
//! subtracts: the DROP/REJECT rules (and iptables-legacy DROP policies, which have counters)
//! whose counters moved, at the drop's hook and in tables of the packet's family, are the
//! candidates, ranked by how well their movement fits the packets the attempt lost
//! ([`rank`]), with a [`rank::Confidence`]. Chains at the hook are its base chains and the chains they
//! reach by jump/goto (iptables user chains); for nftables a regular chain no rule names counts
//! too, as a named verdict map may reach it. A namespace first seen at look-up time has no
//! baseline: it probably appeared after start-up, so all its counts are recent. Readings are
//! reused for 250 ms, as drops come in bursts.
//!
//! The rule is named as its backend lists it: nftables rules (iptables-nft ones included) by
//! family, table, chain, handle and `nft`'s text; iptables-legacy rules by family (`ip`/`ip6`),
//! table, chain, their 1-based position in the chain as handle (0 for a policy) and the line
//! `iptables-legacy-save` prints (`-A INPUT -p tcp -m tcp --dport 3306 -j DROP`). The comment
//! (`-m comment --comment`) of an iptables-nft rule, which `nft` does not print, comes from
//! `iptables-nft-save -c` run in the same namespace and matched to the nft rule by table, chain
//! and position ([`iptables`]); that rule's iptables-save line is kept beside nft's text
//! ([`Candidate::iptables`]), since an iptables user knows the rule by it. `text` stays nft's:
//! it is what the handle refers to (`nft delete rule ... handle N`).
//!
//! Where it can fail:
//! - A rule without a `counter` has no count: it is never named (iptables rules always have
//!   one; hand-written nft rules often do not). The same holds for named counters.
//! - Several rules counted: all are candidates; the ranking only says which fits the count.
//!   A rule that dropped other traffic too counts as much as one that dropped only this.
//! - The ruleset changed between readings: a re-created nft rule gets a new handle and its
//!   whole count is new; a re-created table can reuse handles with reset counters and hide a
//!   drop. A legacy rule is keyed by its text: an edited rule is a new one.
//! - nftables policy drops have no counter: a base chain with `policy drop` is named when no
//!   rule counted, even if a rule without a counter dropped the packet; when several base
//!   chains at the hook have `policy drop`, the first listed is named.
//! - A missing tool is a reason in `rule_not_found`, never an error: without `nft` only legacy
//!   rules are seen, without the iptables tools no legacy rule and no comment.
//! - `find` blocks while the tools run (milliseconds each; each killed after 2 s).

mod decide;
mod history;
mod iptables;
mod legacy;
mod nft;
pub mod rank;
mod save;
mod tool;

use std::{
    collections::HashMap,
    fs::File,
    io,
    path::PathBuf,
    time::{Duration, Instant},
};

use tracing::{debug, warn};

pub use self::{decide::Finding, history::Backend, rank::Candidate};
use self::{
    decide::{Drop, Listings, decide, nft_counts},
    history::{Before, Counts, Reading, Readings, Since},
    iptables::{Annotations, annotate, is_iptables_table},
    nft::{Table, parse_ruleset},
    save::{SaveTable, parse_save},
    tool::{Tool, ToolError},
};
use crate::{
    engine::lookup::{FirewallRule, RuleFinding, RuleLookup},
    output::Clock,
};

/// A reading younger than this is reused: drops come in bursts.
const REUSE_FOR: Duration = Duration::from_millis(250);
/// Namespaces are re-enumerated at most this often when an unknown one is asked for.
const RESCAN_EVERY: Duration = Duration::from_millis(250);

/// Why no rule could be looked for in a namespace.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("the kernel did not report the drop's network namespace")]
    NoNetns,
    #[error("network namespace {netns} not found")]
    UnknownNetns { netns: u32 },
    #[error("open network namespace {path}: {source}", path = path.display())]
    OpenNetns { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Tool(#[from] ToolError),
}

pub use crate::engine::lookup::RuleQuery;

/// Where counters are read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    Nft,
    Legacy { ipv6: bool },
}

impl Source {
    fn tool(self) -> Tool {
        match self {
            Self::Nft => tool::NFT,
            Self::Legacy { ipv6: false } => tool::IPTABLES_LEGACY_SAVE,
            Self::Legacy { ipv6: true } => tool::IP6TABLES_LEGACY_SAVE,
        }
    }

    const ALL: [Self; 3] = [
        Self::Nft,
        Self::Legacy { ipv6: false },
        Self::Legacy { ipv6: true },
    ];
}

#[derive(Debug)]
enum Listing {
    Nft(Vec<Table>),
    Legacy(Vec<SaveTable>),
}

impl Listing {
    fn counts(&self, source: Source) -> Counts {
        match (self, source) {
            (Self::Nft(tables), _) => nft_counts(tables),
            (Self::Legacy(tables), Source::Legacy { ipv6 }) => legacy::counts(tables, ipv6),
            (Self::Legacy(_), Source::Nft) => Counts::new(),
        }
    }
}

/// The latest reading of one source in one namespace.
#[derive(Debug)]
struct Snapshot {
    taken: Instant,
    /// CLOCK_MONOTONIC ns before the tool started: drops before it are counted.
    started_ns: u64,
    /// The listing, or why there is none.
    listing: Result<Listing, String>,
    /// For an nft listing: iptables-nft-save matched to it, per family (`true`: ip6), once
    /// asked for.
    annotations: HashMap<bool, Annotations>,
}

/// Finds the rule behind a netfilter drop by diffing rule counters against a baseline.
pub struct RuleCounters {
    /// A file that opens each known namespace, by namespace inode.
    paths: HashMap<u32, PathBuf>,
    scanned_at: Instant,
    /// Counts at start-up and the last few readings since, per namespace and source.
    readings: HashMap<(u32, Source), Readings>,
    latest: HashMap<(u32, Source), Snapshot>,
}

impl RuleCounters {
    /// Takes a baseline of every network namespace visible now: `nft`, `iptables-legacy-save`
    /// and `ip6tables-legacy-save` once each (milliseconds; the legacy ones skipped where
    /// `/proc/PID/net/ip*_tables_names` shows no legacy table), giving up on a tool that is
    /// missing or hangs. Reading rulesets needs CAP_SYS_ADMIN (setns) and CAP_NET_ADMIN;
    /// without them, `find` says why it cannot.
    pub fn new() -> Self {
        Self::with_namespaces(crate::host::netns::paths())
    }

    /// A baseline of the namespaces in `paths` (inode → a file that opens it) only.
    fn with_namespaces(paths: HashMap<u32, PathBuf>) -> Self {
        let mut readings = HashMap::new();
        let mut hopeless = Vec::new();
        for (&netns, path) in &paths {
            let opened = tool::open_netns(netns, path);
            let Ok(Some(ns)) = opened else {
                // A process that exited since the scan took its namespace (if unnamed) along.
                debug!(
                    netns,
                    ?opened,
                    "no rule counter baseline for this namespace"
                );
                continue;
            };
            for source in Source::ALL {
                if hopeless.contains(&source) {
                    continue;
                }
                match read(netns, path, &ns, source) {
                    Ok((listing, at_ns)) => {
                        let counts = listing.counts(source);
                        let baseline = Readings::with_baseline(Reading { at_ns, counts });
                        readings.insert((netns, source), baseline);
                    }
                    Err(error) if error.is_hopeless() => {
                        warn!(%error, "rule counter baselines not taken with this tool");
                        hopeless.push(source);
                    }
                    Err(error) => warn!(netns, %error, "no rule counter baseline"),
                }
            }
        }
        debug!(
            namespaces = paths.len(),
            baselines = readings.len(),
            "rule counter baselines taken"
        );
        Self {
            paths,
            scanned_at: Instant::now(),
            readings,
            latest: HashMap::new(),
        }
    }

    /// The rules that may have dropped the packet `query` describes, ranked, or the policy,
    /// or why none can be named. Blocks while the tools run.
    pub fn find_attempt(&mut self, query: &RuleQuery) -> Finding {
        self.try_find(query).unwrap_or_else(|error| {
            debug!(?query.netns, %error, "firewall rule look-up failed");
            Finding::NotFound {
                why: error.to_string(),
            }
        })
    }

    fn try_find(&mut self, q: &RuleQuery) -> Result<Finding, RulesError> {
        let netns = q.netns.ok_or(RulesError::NoNetns)?;
        let by_nft = q
            .location
            .as_deref()
            .is_some_and(|l| l.starts_with("nft_do_chain"));
        let legacy = Source::Legacy { ipv6: q.ipv6 };
        self.refresh(netns, Source::Nft, q.last_drop_ns)?;
        if !by_nft {
            self.refresh(netns, legacy, q.last_drop_ns)?;
        }
        let since = |source| {
            let readings = self.readings.get(&(netns, source));
            let baseline = readings
                .and_then(|r| r.baseline.as_ref())
                .map(|r| &r.counts);
            let window = match q.first_drop_ns {
                None => baseline,
                Some(t) => readings.and_then(|r| r.before(Some(t))),
            };
            Since { baseline, window }
        };
        let before = Before {
            nft: since(Source::Nft),
            legacy: since(legacy),
        };
        let listing = |source| match self.latest.get(&(netns, source)).map(|s| &s.listing) {
            Some(Ok(listing)) => Ok(listing),
            Some(Err(why)) => Err(why.as_str()),
            None => Err("not read"),
        };
        let listings = Listings {
            nft: listing(Source::Nft).map(|l| match l {
                Listing::Nft(tables) => tables.as_slice(),
                Listing::Legacy(_) => &[],
            }),
            legacy: (!by_nft).then(|| {
                listing(legacy).map(|l| match l {
                    Listing::Legacy(tables) => tables.as_slice(),
                    Listing::Nft(_) => &[],
                })
            }),
        };
        let drop = Drop {
            hook: q.hook,
            ipv6: q.ipv6,
            dropped: q.dropped,
            windowed: q.first_drop_ns.is_some(),
        };
        let mut finding = decide(listings, before, drop);
        if let Finding::Ranked(ranked) = &mut finding {
            self.name_iptables_rules(netns, &mut ranked.candidates);
        }
        Ok(finding)
    }

    /// Reads `source` in `netns` again unless the last reading is younger than [`REUSE_FOR`]
    /// and started after `last_drop_ns`. A tool's failure is kept as the listing's reason.
    fn refresh(
        &mut self,
        netns: u32,
        source: Source,
        last_drop_ns: Option<u64>,
    ) -> Result<(), RulesError> {
        if let Some(s) = self.latest.get(&(netns, source))
            && s.taken.elapsed() < REUSE_FOR
            && last_drop_ns.is_none_or(|t| s.started_ns > t)
        {
            return Ok(());
        }
        let (path, ns) = self.open(netns)?;
        let started_ns = Clock::mono_now_ns();
        let listing = match read(netns, &path, &ns, source) {
            Ok((listing, at_ns)) => {
                let counts = listing.counts(source);
                let readings = self.readings.entry((netns, source)).or_default();
                readings.push(Reading { at_ns, counts });
                Ok(listing)
            }
            Err(error) => Err(error.to_string()),
        };
        let snapshot = Snapshot {
            taken: Instant::now(),
            started_ns,
            listing,
            annotations: HashMap::new(),
        };
        self.latest.insert((netns, source), snapshot);
        Ok(())
    }

    /// Gives the iptables-nft rules among `candidates` their comment and iptables-save line,
    /// from `iptables-nft-save -c` (`ip6tables-nft-save -c`) run in `netns` once per nft
    /// reading. A failure costs only the comments (logged).
    fn name_iptables_rules(&mut self, netns: u32, candidates: &mut [Candidate]) {
        for ipv6 in [false, true] {
            let family = legacy::family(ipv6);
            if !candidates.iter().any(|c| is_iptables_rule(c, family)) {
                continue;
            }
            if let Err(error) = self.annotate(netns, ipv6) {
                debug!(netns, %error, "iptables-nft rules keep no comment");
            }
            let Some(annotations) = self
                .latest
                .get(&(netns, Source::Nft))
                .and_then(|s| s.annotations.get(&ipv6))
            else {
                continue;
            };
            name_from(candidates, family, annotations);
        }
    }

    /// Matches the current nft reading of `netns` to `iptables-nft-save` of the family, once.
    fn annotate(&mut self, netns: u32, ipv6: bool) -> Result<(), RulesError> {
        let done = |s: &Snapshot| s.annotations.contains_key(&ipv6);
        if self.latest.get(&(netns, Source::Nft)).is_none_or(done) {
            return Ok(());
        }
        let (path, ns) = self.open(netns)?;
        let save_tool = if ipv6 {
            tool::IP6TABLES_NFT_SAVE
        } else {
            tool::IPTABLES_NFT_SAVE
        };
        // Read after the nft listing: its counters may only be higher.
        let saved = tool::run_in(netns, &path, &ns, save_tool).map(|text| parse_save(&text));
        let Some(snapshot) = self.latest.get_mut(&(netns, Source::Nft)) else {
            return Ok(());
        };
        let Ok(Listing::Nft(tables)) = &snapshot.listing else {
            return Ok(());
        };
        let (annotations, refused) = match &saved {
            Ok(save) => annotate(tables, legacy::family(ipv6), save),
            Err(_) => Default::default(),
        };
        for why in refused {
            debug!(netns, why, "iptables-nft chain not matched to nft's");
        }
        snapshot.annotations.insert(ipv6, annotations);
        saved.map(|_| ()).map_err(RulesError::from)
    }

    /// Opens namespace `netns`, re-enumerating namespaces if its known path is gone or stale.
    fn open(&mut self, netns: u32) -> Result<(PathBuf, File), RulesError> {
        if let Some(path) = self.paths.get(&netns)
            && let Ok(Some(ns)) = tool::open_netns(netns, path)
        {
            return Ok((path.clone(), ns));
        }
        if self.scanned_at.elapsed() >= RESCAN_EVERY {
            self.paths = crate::host::netns::paths();
            self.scanned_at = Instant::now();
            // Namespaces gone since: their readings go too.
            let paths = &self.paths;
            self.readings.retain(|(ns, _), _| paths.contains_key(ns));
            self.latest.retain(|(ns, _), _| paths.contains_key(ns));
        }
        let path = self
            .paths
            .get(&netns)
            .ok_or(RulesError::UnknownNetns { netns })?;
        match tool::open_netns(netns, path) {
            Ok(Some(ns)) => Ok((path.clone(), ns)),
            Ok(None) => Err(RulesError::UnknownNetns { netns }),
            Err(source) => Err(RulesError::OpenNetns {
                path: path.clone(),
                source,
            }),
        }
    }
}

/// Whether `c` is an iptables-nft rule of `family` (`ip` or `ip6`).
fn is_iptables_rule(c: &Candidate, family: &str) -> bool {
    c.backend == Backend::Nftables
        && c.rule.family == family
        && is_iptables_table(&c.rule.family, &c.rule.table)
}

/// Gives the iptables-nft rules of `family` among `candidates` the comment and line their
/// match in `annotations` has.
fn name_from(candidates: &mut [Candidate], family: &str, annotations: &Annotations) {
    for c in candidates
        .iter_mut()
        .filter(|c| is_iptables_rule(c, family))
    {
        let key = (c.rule.table.clone(), c.rule.chain.clone(), c.rule.handle);
        if let Some(text) = annotations.get(&key) {
            c.rule.comment.clone_from(&text.comment);
            c.iptables = Some(text.line.clone());
        }
    }
}

/// Reads `source` in the namespace: its listing, and CLOCK_MONOTONIC ns when the tool had
/// exited. iptables-legacy is not run where /proc shows the namespace has no legacy table.
fn read(
    netns: u32,
    path: &std::path::Path,
    ns: &File,
    source: Source,
) -> Result<(Listing, u64), ToolError> {
    let listing = match source {
        Source::Nft => Listing::Nft(parse_ruleset(&tool::run_in(
            netns,
            path,
            ns,
            source.tool(),
        )?)),
        Source::Legacy { ipv6 } if tool::no_legacy_tables(path, ipv6) => {
            Listing::Legacy(Vec::new())
        }
        Source::Legacy { .. } => {
            Listing::Legacy(parse_save(&tool::run_in(netns, path, ns, source.tool())?))
        }
    };
    Ok((listing, Clock::mono_now_ns()))
}

/// Today's shape of a finding: one candidate is the rule (an iptables-legacy policy alone is
/// the policy, as nftables' are), several are candidates in rank order; the confidence and
/// the movements are left out.
impl From<Finding> for RuleFinding {
    fn from(finding: Finding) -> Self {
        match finding {
            Finding::Ranked(mut r) if r.candidates.len() == 1 => {
                let c = r.candidates.remove(0);
                if c.key.id == history::RuleId::Policy {
                    let FirewallRule {
                        family,
                        table,
                        chain,
                        ..
                    } = c.rule;
                    return Self::Policy {
                        family,
                        table,
                        chain,
                    };
                }
                Self::Rule {
                    rule: c.into_rule(),
                    confidence: r.confidence,
                }
            }
            Finding::Ranked(r) => Self::Candidates {
                rules: r.candidates.into_iter().map(Candidate::into_rule).collect(),
                confidence: r.confidence,
            },
            Finding::Policy {
                family,
                table,
                chain,
            } => Self::Policy {
                family,
                table,
                chain,
            },
            Finding::NotFound { why } => Self::NotFound { why },
        }
    }
}

impl RuleLookup for RuleCounters {
    fn find(&mut self, query: &RuleQuery) -> RuleFinding {
        self.find_attempt(query).into()
    }
}

#[cfg(test)]
mod live;
#[cfg(test)]
mod tests;
