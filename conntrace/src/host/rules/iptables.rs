//! Names iptables-nft rules the way iptables does. iptables-nft stores its rules in nftables
//! (`ip`/`ip6` tables `filter`, `nat`, `mangle`, `raw`, `security`), where `nft` lists them
//! with handles and counters but without their `-m comment --comment` (an xt match nft cannot
//! print). `iptables-nft-save -c` prints the comments but no handles. Both list each chain's
//! rules in the kernel's order, so an nft rule is the iptables-save rule at the same position
//! of the same table and chain (seen on iptables 1.8.9 / nftables 1.0.6 after 300 random
//! `-I`/`-A`/`-D`/`-R` in four chains, user chains included, and in the listings kept as test
//! data). The match is only trusted for a chain whose rule count, verdicts and jump targets
//! agree at every position, and whose iptables-save counters are not below nft's (read just
//! before); otherwise that chain's rules keep no comment.

use std::collections::HashMap;

use super::{
    nft::{Action, Chain, Table},
    save::{SaveChain, SaveRule, SaveTable},
};

/// The tables iptables-nft manages (in families `ip` and `ip6`).
const IPTABLES_TABLES: [&str; 5] = ["filter", "nat", "mangle", "raw", "security"];

/// Whether nftables table `family`/`table` is one iptables-nft manages.
pub fn is_iptables_table(family: &str, table: &str) -> bool {
    matches!(family, "ip" | "ip6") && IPTABLES_TABLES.contains(&table)
}

/// What iptables-nft-save says about one nft rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveText {
    /// `-m comment --comment` value(s), unquoted.
    pub comment: Option<String>,
    /// The line without its counter: `-A KUBE-SERVICES ... -j REJECT --reject-with ...`.
    pub line: String,
}

/// Per nft rule (table, chain, handle) of one family.
pub type Annotations = HashMap<(String, String, u64), SaveText>;

/// Matches the `family` (`ip` or `ip6`) iptables-nft tables of an `nft -a list ruleset`
/// listing to `iptables-nft-save -c` output of the same family, read after it. Returns the
/// matched rules, and one line per chain left unmatched saying why.
pub fn annotate(nft: &[Table], family: &str, save: &[SaveTable]) -> (Annotations, Vec<String>) {
    let mut matched = Annotations::new();
    let mut refused = Vec::new();
    for table in nft.iter().filter(|t| t.family == family) {
        if !is_iptables_table(family, &table.name) {
            continue;
        }
        let Some(saved) = save.iter().find(|s| s.name == table.name) else {
            refused.push(format!("{family} {}: not in iptables-nft-save", table.name));
            continue;
        };
        for chain in &table.chains {
            let Some(saved_chain) = saved.chain(&chain.name) else {
                refused.push(format!(
                    "{family} {} {}: not in iptables-nft-save",
                    table.name, chain.name
                ));
                continue;
            };
            if let Err(why) = agree(chain, saved_chain, saved) {
                refused.push(format!("{family} {} {}: {why}", table.name, chain.name));
                continue;
            }
            for (rule, saved_rule) in chain.rules.iter().zip(&saved_chain.rules) {
                let key = (table.name.clone(), chain.name.clone(), rule.handle);
                let text = SaveText {
                    comment: saved_rule.comment.clone(),
                    line: saved_rule.text.clone(),
                };
                matched.insert(key, text);
            }
        }
    }
    (matched, refused)
}

/// What a rule does at its end, as far as both listings can tell.
#[derive(Debug, PartialEq, Eq)]
enum Verdict<'a> {
    Drop,
    Reject,
    Jump(&'a str),
    Other,
}

/// Why the nft chain and the iptables-save chain cannot be matched position by position.
fn agree(chain: &Chain, saved: &SaveChain, table: &SaveTable) -> Result<(), String> {
    if chain.rules.len() != saved.rules.len() {
        return Err(format!(
            "{} rules in nft, {} in iptables-nft-save",
            chain.rules.len(),
            saved.rules.len()
        ));
    }
    for (position, (rule, saved_rule)) in chain.rules.iter().zip(&saved.rules).enumerate() {
        let nft = match (&rule.action, rule.targets.as_slice()) {
            (Some(Action::Drop), _) => Verdict::Drop,
            (Some(Action::Reject { .. }), _) => Verdict::Reject,
            (None, [target]) => Verdict::Jump(target),
            _ => Verdict::Other,
        };
        let iptables = saved_verdict(saved_rule, table);
        if nft != iptables {
            return Err(format!(
                "rule {} (handle {}) is {nft:?} in nft, {iptables:?} in iptables-nft-save",
                position + 1,
                rule.handle
            ));
        }
        if let (Some(before), Some(after)) = (rule.packets, saved_rule.packets)
            && after < before
        {
            return Err(format!(
                "rule {} (handle {}) counted {before} packets in nft, then {after} in \
                 iptables-nft-save",
                position + 1,
                rule.handle
            ));
        }
    }
    Ok(())
}

fn saved_verdict<'a>(rule: &'a SaveRule, table: &SaveTable) -> Verdict<'a> {
    match rule.target.as_deref() {
        Some("DROP") => Verdict::Drop,
        Some("REJECT") => Verdict::Reject,
        Some(chain) if table.chain(chain).is_some_and(|c| c.policy.is_none()) => {
            Verdict::Jump(chain)
        }
        _ => Verdict::Other,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::host::rules::{
        nft::parse_ruleset,
        save::{parse_save, tests::KUBE},
    };

    /// `nft -a list ruleset` of the same namespace as `save::tests::KUBE`, read just before it
    /// (chains in creation order, tables in another order than iptables-save's).
    pub(in crate::host::rules) const KUBE_NFT: &str = r#"table ip filter { # handle 1
	chain KUBE-SERVICES { # handle 1
		tcp dport 3307  counter packets 4 bytes 240 drop # handle 16
		ip daddr 127.0.0.1 tcp dport 3306  counter packets 2 bytes 120 reject # handle 6
		tcp dport 3308 counter packets 0 bytes 0 jump KUBE-FW # handle 8
	}

	chain KUBE-FW { # handle 2
		 counter packets 0 bytes 0 reject # handle 9
	}

	chain OUTPUT { # handle 3
		type filter hook output priority filter; policy accept;
		counter packets 10 bytes 656 jump A-FIRST # handle 15
		counter packets 10 bytes 656 jump KUBE-SERVICES # handle 4
		tcp dport 9 counter packets 2 bytes 120 drop # handle 5
	}

	chain INPUT { # handle 10
		type filter hook input priority filter; policy accept;
		tcp dport 1 counter packets 0 bytes 0 accept # handle 11
		tcp dport 2 counter packets 0 bytes 0 drop # handle 12
	}

	chain A-FIRST { # handle 13
		counter packets 10 bytes 656 return # handle 14
	}
}
table ip nat { # handle 2
	chain OUTPUT { # handle 1
		type nat hook output priority -100; policy accept;
		tcp dport 4  counter packets 0 bytes 0 dnat to 127.0.0.2 # handle 2
	}
}
table ip raw { # handle 3
	chain PREROUTING { # handle 1
		type filter hook prerouting priority raw; policy accept;
		tcp dport 5  counter packets 0 bytes 0 drop # handle 2
	}
}
table ip6 filter { # handle 4
	chain INPUT { # handle 1
		type filter hook input priority filter; policy accept;
		tcp dport 6  counter packets 0 bytes 0 reject with tcp reset # handle 2
	}
}
table inet mine { # handle 5
	chain c { # handle 1
		type filter hook input priority filter; policy accept;
		tcp dport 7 counter packets 0 bytes 0 drop comment "nft's own" # handle 2
	}
}
"#;

    fn render(a: &Annotations) -> Vec<String> {
        let mut lines: Vec<String> = a
            .iter()
            .map(|((table, chain, handle), t)| {
                let comment = t.comment.as_deref().unwrap_or("-");
                format!("{table} {chain} #{handle} [{comment}] {}", t.line)
            })
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn same_chain_same_position() {
        let (matched, refused) = annotate(&parse_ruleset(KUBE_NFT), "ip", &parse_save(KUBE));
        assert_eq!(refused, Vec::<String>::new());
        assert_eq!(
            render(&matched),
            [
                "filter A-FIRST #14 [-] -A A-FIRST -j RETURN",
                "filter INPUT #11 [-] -A INPUT -p tcp -m tcp --dport 1 -j ACCEPT",
                "filter INPUT #12 [-] -A INPUT -p tcp -m tcp --dport 2 -j DROP",
                "filter KUBE-FW #9 [fw] -A KUBE-FW -m comment --comment fw -j REJECT --reject-with icmp-port-unreachable",
                "filter KUBE-SERVICES #16 [a \"quoted\" one] -A KUBE-SERVICES -p tcp -m tcp --dport 3307 -m comment --comment \"a \\\"quoted\\\" one\" -j DROP",
                "filter KUBE-SERVICES #6 [default/mysql has no endpoints] -A KUBE-SERVICES -d 127.0.0.1/32 -p tcp -m tcp --dport 3306 -m comment --comment \"default/mysql has no endpoints\" -j REJECT --reject-with icmp-port-unreachable",
                "filter KUBE-SERVICES #8 [-] -A KUBE-SERVICES -p tcp -m tcp --dport 3308 -j KUBE-FW",
                "filter OUTPUT #15 [-] -A OUTPUT -j A-FIRST",
                "filter OUTPUT #4 [-] -A OUTPUT -j KUBE-SERVICES",
                "filter OUTPUT #5 [-] -A OUTPUT -p tcp -m tcp --dport 9 -j DROP",
                "nat OUTPUT #2 [nat c] -A OUTPUT -p tcp -m tcp --dport 4 -m comment --comment \"nat c\" -j DNAT --to-destination 127.0.0.2",
                "raw PREROUTING #2 [raw c] -A PREROUTING -p tcp -m tcp --dport 5 -m comment --comment \"raw c\" -j DROP",
            ]
        );
        // ip6 tables are matched against ip6tables-nft-save only; inet tables never.
        let v6 = "*filter\n:INPUT ACCEPT [0:0]\n[0:0] -A INPUT -p tcp -m tcp --dport 6 -m comment --comment \"v6 c\" -j REJECT --reject-with tcp-reset\nCOMMIT\n";
        let (matched, refused) = annotate(&parse_ruleset(KUBE_NFT), "ip6", &parse_save(v6));
        assert!(refused.is_empty());
        assert_eq!(
            render(&matched),
            [
                "filter INPUT #2 [v6 c] -A INPUT -p tcp -m tcp --dport 6 -m comment --comment \"v6 c\" -j REJECT --reject-with tcp-reset"
            ]
        );
    }

    #[test]
    fn chains_that_disagree_keep_no_comment() {
        let nft = parse_ruleset(KUBE_NFT);
        // A rule inserted between the two listings: counts differ.
        let inserted = KUBE.replace(
            "[0:0] -A KUBE-SERVICES -p tcp -m tcp --dport 3308",
            "[0:0] -A KUBE-SERVICES -j DROP\n[0:0] -A KUBE-SERVICES -p tcp -m tcp --dport 3308",
        );
        let (matched, refused) = annotate(&nft, "ip", &parse_save(&inserted));
        assert_eq!(
            refused,
            ["ip filter KUBE-SERVICES: 3 rules in nft, 4 in iptables-nft-save"]
        );
        assert!(!matched.keys().any(|(_, chain, _)| chain == "KUBE-SERVICES"));
        assert!(matched.contains_key(&("filter".into(), "KUBE-FW".into(), 9)));
        // Swapped between the listings: the verdicts disagree.
        let swapped = KUBE.replace("--dport 2 -j DROP", "--dport 2 -j ACCEPT");
        let (_, refused) = annotate(&nft, "ip", &parse_save(&swapped));
        assert_eq!(
            refused,
            ["ip filter INPUT: rule 2 (handle 12) is Drop in nft, Other in iptables-nft-save"]
        );
        // Counters went back (the table was re-created): not the same rules.
        let reset = KUBE.replace("[4:240] -A KUBE-SERVICES", "[0:0] -A KUBE-SERVICES");
        let (_, refused) = annotate(&nft, "ip", &parse_save(&reset));
        assert_eq!(
            refused,
            [
                "ip filter KUBE-SERVICES: rule 1 (handle 16) counted 4 packets in nft, then 0 in iptables-nft-save"
            ]
        );
        // iptables-nft-save refused the table (a rule it cannot parse): nothing matched.
        let (matched, refused) = annotate(&nft, "ip", &[]);
        assert!(matched.is_empty());
        assert_eq!(refused.len(), 3, "{refused:?}");
    }
}
