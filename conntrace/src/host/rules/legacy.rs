//! Rules loaded with iptables-legacy: x_tables, outside nftables, so `nft` never shows them.
//! Their counters come from `iptables-legacy-save -c` / `ip6tables-legacy-save -c` (parsed by
//! [`super::save`]). A legacy rule has no handle: it is keyed by its text and how many
//! identical rules precede it in its chain, and named by its 1-based position in the chain (the
//! number `iptables-legacy -L --line-numbers` shows and `iptables-legacy -D CHAIN N` takes).
//! A built-in chain's policy has a counter of its own: a DROP policy that counted is a
//! candidate too, named with handle 0 and the text `-P CHAIN DROP`.

use std::collections::{HashMap, HashSet};

use super::{
    history::{Backend, Before, Counts, RuleId, RuleKey},
    rank::Candidate,
    save::{SaveChain, SaveTable},
};
use crate::engine::{
    facts::NfHook,
    lookup::{FirewallRule, RuleAction},
};

/// The nftables-style family name of a legacy listing: `ip` (iptables) or `ip6` (ip6tables).
pub fn family(ipv6: bool) -> &'static str {
    if ipv6 { "ip6" } else { "ip" }
}

/// Each counted rule and policy of one family's legacy tables, keyed as in the readings.
pub fn counts(tables: &[SaveTable], ipv6: bool) -> Counts {
    let mut counts = Counts::new();
    for table in tables {
        for chain in &table.chains {
            if let Some(packets) = chain.policy_packets {
                counts.insert(key(ipv6, table, chain, RuleId::Policy), packets);
            }
            for (id, rule) in ids(chain) {
                if let Some(packets) = rule.packets {
                    counts.insert(key(ipv6, table, chain, id), packets);
                }
            }
        }
    }
    counts
}

fn key(ipv6: bool, table: &SaveTable, chain: &SaveChain, id: RuleId) -> RuleKey {
    RuleKey {
        backend: Backend::IptablesLegacy,
        family: family(ipv6).to_owned(),
        table: table.name.clone(),
        chain: chain.name.clone(),
        id,
    }
}

/// The chain's rules with their identities, in order.
fn ids(chain: &SaveChain) -> impl Iterator<Item = (RuleId, &super::save::SaveRule)> {
    let mut seen: HashMap<&str, u32> = HashMap::new();
    chain.rules.iter().map(move |rule| {
        let nth = seen.entry(rule.text.as_str()).or_default();
        let id = RuleId::Line {
            text: rule.text.clone(),
            nth: *nth,
        };
        *nth += 1;
        (id, rule)
    })
}

/// Chains of `table` a packet at `hook` traverses: the built-in chain named after the hook
/// (`INPUT`) and the user chains reachable from it by `-j`/`-g`. All chains when `hook` is
/// `None`.
fn chains_at(table: &SaveTable, hook: Option<NfHook>) -> HashSet<&str> {
    let Some(hook) = hook else {
        return table.chains.iter().map(|c| c.name.as_str()).collect();
    };
    let mut reached = HashSet::new();
    let mut todo = vec![hook.chain_name()];
    while let Some(name) = todo.pop() {
        let Some(chain) = table.chain(name) else {
            continue;
        };
        let user = chain.policy.is_none();
        if (user || name == hook.chain_name()) && reached.insert(chain.name.as_str()) {
            todo.extend(chain.rules.iter().filter_map(|r| r.target.as_deref()));
        }
    }
    reached
}

/// What the legacy tables hold at the hook, for the reasons given when nothing counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    /// DROP/REJECT rules and DROP policies at the hook.
    pub dropping: usize,
}

/// The legacy DROP/REJECT rules and DROP policies at `hook` whose counters moved since
/// `before`'s baseline or window, with both movements. Policies are built-in chains' only.
pub fn candidates(
    tables: &[SaveTable],
    ipv6: bool,
    hook: Option<NfHook>,
    before: Before<'_>,
) -> (Vec<Candidate>, Seen) {
    let mut out = Vec::new();
    let mut seen = Seen::default();
    for table in tables {
        let chains = chains_at(table, hook);
        for chain in table
            .chains
            .iter()
            .filter(|c| chains.contains(c.name.as_str()))
        {
            let policy = (chain.policy.as_deref() == Some("DROP"))
                .then_some(chain.policy_packets)
                .flatten()
                .map(|p| {
                    (
                        RuleId::Policy,
                        0,
                        format!("-P {} DROP", chain.name),
                        None,
                        RuleAction::Drop,
                        p,
                    )
                });
            let rules = ids(chain).zip(1u64..).filter_map(|((id, rule), position)| {
                let action = rule.action(ipv6)?;
                let packets = rule.packets?;
                Some((
                    id,
                    position,
                    rule.text.clone(),
                    rule.comment.clone(),
                    action,
                    packets,
                ))
            });
            seen.dropping += chain
                .rules
                .iter()
                .filter(|r| r.action(ipv6).is_some())
                .count()
                + usize::from(chain.policy.as_deref() == Some("DROP"));
            for (id, handle, text, comment, action, now) in policy.into_iter().chain(rules) {
                let key = key(ipv6, table, chain, id);
                let (packets, moved) = before.since(&key, now);
                if packets == 0 && moved == 0 {
                    continue;
                }
                out.push(Candidate {
                    rule: FirewallRule {
                        backend: Backend::IptablesLegacy,
                        iptables: None,
                        family: key.family.clone(),
                        table: key.table.clone(),
                        chain: key.chain.clone(),
                        handle,
                        text,
                        comment,
                        action,
                        packets,
                    },
                    backend: Backend::IptablesLegacy,
                    moved,
                    iptables: None,
                    key,
                });
            }
        }
    }
    (out, seen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::rules::history::Since;
    use crate::host::rules::save::{
        parse_save,
        tests::{LEGACY, LEGACY6},
    };

    fn at<'a>(baseline: &'a Counts, window: &'a Counts) -> Before<'a> {
        let legacy = Since {
            baseline: Some(baseline),
            window: Some(window),
        };
        Before {
            legacy,
            ..Before::default()
        }
    }

    fn names(c: &[Candidate]) -> Vec<String> {
        c.iter()
            .map(|c| {
                let r = &c.rule;
                let comment = r.comment.as_deref().unwrap_or("-");
                format!(
                    "{} {} {} #{} {}/{} [{comment}] {}",
                    r.family, r.table, r.chain, r.handle, c.moved, r.packets, r.text
                )
            })
            .collect()
    }

    #[test]
    fn counted_rules_and_policies_at_the_hook() {
        let now = parse_save(LEGACY);
        // At start-up nothing had counted.
        let zero = parse_save(
            &LEGACY
                .replace("[2:120]", "[0:0]")
                .replace("[4:296]", "[0:0]"),
        );
        let baseline = counts(&zero, false);
        let (found, seen) = candidates(&now, false, Some(NfHook::Input), at(&baseline, &baseline));
        assert_eq!(
            names(&found),
            [
                "ip filter LCHAIN #1 2/2 [-] -A LCHAIN -p tcp -m tcp --dport 3310 -j REJECT --reject-with icmp-port-unreachable"
            ]
        );
        assert_eq!(seen.dropping, 2, "the commented DROP and LCHAIN's REJECT");
        // LCHAIN is reached from INPUT only.
        let (found, seen) = candidates(&now, false, Some(NfHook::Output), at(&baseline, &baseline));
        assert!(found.is_empty());
        assert_eq!(seen.dropping, 0);
        // FORWARD's policy DROP counted.
        let dropped = LEGACY.replace(":FORWARD DROP [0:0]", ":FORWARD DROP [5:300]");
        let (found, seen) = candidates(
            &parse_save(&dropped),
            false,
            Some(NfHook::Forward),
            at(&baseline, &baseline),
        );
        assert_eq!(
            names(&found),
            ["ip filter FORWARD #0 5/5 [-] -P FORWARD DROP"]
        );
        assert_eq!(seen.dropping, 1);
    }

    #[test]
    fn keyed_by_text_not_position() {
        // A rule inserted at the head after start-up shifts the commented DROP to position 2;
        // its 3 packets since then are its own, not the new rule's.
        let baseline = counts(&parse_save(LEGACY), false);
        let now = LEGACY.replace(
            "[0:0] -A INPUT -p tcp -m tcp --dport 3309",
            "[7:420] -A INPUT -p tcp -m tcp --dport 1 -j ACCEPT\n[3:180] -A INPUT -p tcp -m tcp --dport 3309",
        );
        let (found, _) = candidates(
            &parse_save(&now),
            false,
            Some(NfHook::Input),
            at(&baseline, &baseline),
        );
        assert_eq!(
            names(&found),
            [
                "ip filter INPUT #2 3/3 [legacy c] -A INPUT -p tcp -m tcp --dport 3309 -m comment --comment \"legacy c\" -j DROP"
            ]
        );
        // Measured from a later reading: moved 1 of its 3.
        let later = counts(&parse_save(&now.replace("[3:180]", "[2:120]")), false);
        let (found, _) = candidates(
            &parse_save(&now),
            false,
            Some(NfHook::Input),
            at(&baseline, &later),
        );
        assert_eq!(found[0].moved, 1);
        assert_eq!(found[0].rule.packets, 3);
    }

    #[test]
    fn ip6tables_and_no_baseline() {
        let (found, seen) = candidates(&parse_save(LEGACY6), true, None, Before::default());
        assert_eq!(
            names(&found),
            ["ip6 filter INPUT #1 1/1 [-] -A INPUT -p tcp -m tcp --dport 3311 -j DROP"]
        );
        assert_eq!(seen.dropping, 2);
        assert_eq!(found[0].backend, Backend::IptablesLegacy);
    }
}
