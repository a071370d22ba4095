//! The decision, pure: from the current listings (nftables, and iptables-legacy of the
//! packet's family) and the counts before, which rules may have dropped the packet, ranked; else
//! the policy or why nothing can be named.

use std::collections::HashSet;

use super::{
    history::{Backend, Before, Counts, RuleId, RuleKey},
    legacy,
    nft::{Chain, Rule, Table},
    rank::{Candidate, Ranked, rank},
    save::SaveTable,
};
use crate::engine::{facts::NfHook, lookup::FirewallRule};

/// What the look-up concludes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Dropping rules whose counters moved in the attempt's window, ranked (never empty).
    Ranked(Ranked),
    /// No rule counted, and an nftables base chain at the hook has policy drop (nftables
    /// policies have no counter; iptables-legacy ones do and come as candidates).
    Policy {
        family: String,
        table: String,
        chain: String,
    },
    /// Nothing can be named; `why` says what each source lacked.
    NotFound { why: String },
}

/// The drop being explained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drop {
    pub hook: Option<NfHook>,
    pub ipv6: bool,
    /// Packets this attempt lost at the hook; 0 when unknown.
    pub dropped: u32,
    /// Whether counts are measured from the last reading before the attempt's first drop
    /// (else from the baseline): only changes the wording of `why`.
    pub windowed: bool,
}

/// The listings the decision reads; an `Err` says why that source gave none.
#[derive(Debug, Clone, Copy)]
pub struct Listings<'a> {
    pub nft: Result<&'a [Table], &'a str>,
    /// The packet family's iptables-legacy tables; `None` when not consulted (the drop was
    /// made in `nft_do_chain`, so by nftables).
    pub legacy: Option<Result<&'a [SaveTable], &'a str>>,
}

/// An nftables rule's identity in the readings.
pub fn nft_key(table: &Table, chain: &Chain, rule: &Rule) -> RuleKey {
    RuleKey {
        backend: Backend::Nftables,
        family: table.family.clone(),
        table: table.name.clone(),
        chain: chain.name.clone(),
        id: RuleId::Handle(rule.handle),
    }
}

/// Every counted nftables rule's packets.
pub fn nft_counts(tables: &[Table]) -> Counts {
    let mut counts = Counts::new();
    for table in tables {
        for chain in &table.chains {
            for rule in &chain.rules {
                if let Some(packets) = rule.packets {
                    counts.insert(nft_key(table, chain, rule), packets);
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

/// What the nftables tables of the packet's family hold at the hook.
#[derive(Debug, Default)]
struct NftSeen {
    tables: usize,
    dropping: usize,
    uncounted: usize,
}

/// The counted dropping or rejecting nftables rules at the hook, in tables of the packet's
/// family (`ip`/`inet` or `ip6`/`inet`).
fn nft_candidates(tables: &[&Table], drop: Drop, before: Before<'_>) -> (Vec<Candidate>, NftSeen) {
    let mut out = Vec::new();
    let mut seen = NftSeen {
        tables: tables.len(),
        ..NftSeen::default()
    };
    for table in tables {
        let chains = chains_at(table, drop.hook);
        for chain in table
            .chains
            .iter()
            .filter(|c| chains.contains(c.name.as_str()))
        {
            for rule in &chain.rules {
                let Some(action) = &rule.action else { continue };
                seen.dropping += 1;
                let Some(now) = rule.packets else {
                    seen.uncounted += 1;
                    continue;
                };
                let key = nft_key(table, chain, rule);
                let (packets, moved) = before.since(&key, now);
                out.push(Candidate {
                    rule: FirewallRule {
                        backend: Backend::Nftables,
                        iptables: None,
                        family: key.family.clone(),
                        table: key.table.clone(),
                        chain: key.chain.clone(),
                        handle: rule.handle,
                        text: rule.text.clone(),
                        comment: None,
                        action: action.for_packet(drop.ipv6),
                        packets,
                    },
                    backend: Backend::Nftables,
                    moved,
                    iptables: None,
                    key,
                });
            }
        }
    }
    (out, seen)
}

/// The first nftables base chain at the hook with policy drop.
fn nft_policy(tables: &[&Table], hook: Option<NfHook>) -> Option<Finding> {
    tables.iter().find_map(|t| {
        let chain = t.chains.iter().find(|c| {
            c.policy.as_deref() == Some("drop")
                && c.hook.is_some()
                && hook.is_none_or(|h| c.hook.as_deref() == Some(h.nft_name()))
        })?;
        Some(Finding::Policy {
            family: t.family.clone(),
            table: t.name.clone(),
            chain: chain.name.clone(),
        })
    })
}

/// The finding for `drop`, from the listings and the counts before.
pub fn decide(listings: Listings<'_>, before: Before<'_>, drop: Drop) -> Finding {
    let families = if drop.ipv6 {
        ["ip6", "inet"]
    } else {
        ["ip", "inet"]
    };
    let nft_tables: Vec<&Table> = listings
        .nft
        .unwrap_or_default()
        .iter()
        .filter(|t| families.contains(&t.family.as_str()))
        .collect();
    let (mut candidates, nft_seen) = nft_candidates(&nft_tables, drop, before);
    let legacy_seen = listings.legacy.map(|l| {
        l.map(|tables| {
            let (found, seen) = legacy::candidates(tables, drop.ipv6, drop.hook, before);
            candidates.extend(found);
            (tables.len(), seen)
        })
    });
    if let Some(ranked) = rank(candidates, drop.dropped) {
        return Finding::Ranked(ranked);
    }
    if let Some(policy) = nft_policy(&nft_tables, drop.hook) {
        return policy;
    }
    let at_hook = drop
        .hook
        .map_or(String::new(), |h| format!(" at the {} hook", h.nft_name()));
    let since = match (drop.windowed, before.has_baseline()) {
        (true, _) => "since the attempt's first drop",
        (false, true) => "since start-up",
        (false, false) => "since they were added",
    };
    let families = families.join("/");
    let nft = match listings.nft {
        Err(why) => why.to_owned(),
        Ok(_) if nft_seen.tables == 0 => format!("no {families} nftables table"),
        Ok(_) if nft_seen.dropping == 0 => {
            format!("no {families} nftables rule or policy drops{at_hook}")
        }
        Ok(_) => {
            let counted = format!("no nftables rule{at_hook} counted packets {since}");
            match nft_seen.uncounted {
                0 => counted,
                1 => format!(
                    "{counted}; 1 dropping rule there has no `counter` and cannot be identified"
                ),
                n => format!(
                    "{counted}; {n} dropping rules there have no `counter` and cannot be identified"
                ),
            }
        }
    };
    let tool = if drop.ipv6 {
        "ip6tables-legacy"
    } else {
        "iptables-legacy"
    };
    let legacy = legacy_seen.map(|seen| match seen {
        Err(why) => why.to_owned(),
        Ok((0, _)) => format!("no {tool} table"),
        Ok((_, seen)) if seen.dropping == 0 => {
            format!("no {tool} rule or policy drops{at_hook}")
        }
        Ok(_) => format!("no {tool} rule{at_hook} counted packets {since}"),
    });
    let why = std::iter::once(nft)
        .chain(legacy)
        .collect::<Vec<_>>()
        .join("; ");
    Finding::NotFound { why }
}
