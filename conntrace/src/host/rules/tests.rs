//! Rule choice on real rulesets, namespace enumeration and look-up errors.
use super::{
    nft::tests::{MIXED, SETS_AND_MAPS},
    save::tests::{LEGACY, LEGACY6},
    *,
};
use std::os::unix::fs::MetadataExt as _;

use crate::engine::{
    facts::NfHook,
    lookup::{FirewallRule, RuleAction},
};

/// `nft -a list ruleset` in a namespace after SYNs to 127.0.0.1:5 (dropped in MYCHAIN),
/// 127.0.0.1:3307 (rejected) and [::1]:3309 (rejected); the rules had been added with
/// iptables-nft and ip6tables-nft right before, so their start-up counters were all 0.
const HIT: &str = r#"table ip filter { # handle 1
	chain INPUT { # handle 1
		type filter hook input priority filter; policy accept;
		tcp dport 3306 counter packets 0 bytes 0 drop # handle 2
		tcp dport 3307 counter packets 2 bytes 120 reject with icmp type host-prohibited # handle 3
		counter packets 5 bytes 356 jump MYCHAIN # handle 5
	}

	chain MYCHAIN { # handle 4
		tcp dport 5 counter packets 3 bytes 180 drop # handle 6
	}

	chain DOCKER-USER { # handle 7
		ip saddr 10.1.0.0/16 counter packets 0 bytes 0 drop # handle 10
	}

	chain FORWARD { # handle 8
		type filter hook forward priority filter; policy drop;
		counter packets 0 bytes 0 jump DOCKER-USER # handle 9
	}
}
table ip6 filter { # handle 2
	chain INPUT { # handle 1
		type filter hook input priority filter; policy accept;
		tcp dport 3309 counter packets 2 bytes 160 reject # handle 2
	}
}
"#;

/// `text` with every counter back at 0, as listed when its rules were added.
fn zeroed(text: &str) -> String {
    let mut words: Vec<&str> = text.split(' ').collect();
    for i in 0..words.len().saturating_sub(3) {
        if words[i] == "packets" && words[i + 2] == "bytes" {
            (words[i + 1], words[i + 3]) = ("0", "0");
        }
    }
    words.join(" ")
}

/// One candidate as a line: family, table, chain, handle, packets, action, comment, text.
fn one(r: &FirewallRule) -> String {
    let action = match &r.action {
        RuleAction::Drop => "drop",
        RuleAction::Reject { with } => with,
    };
    let (family, table, chain) = (&r.family, &r.table, &r.chain);
    let comment = r
        .comment
        .as_ref()
        .map_or(String::new(), |c| format!(" [{c}]"));
    format!(
        "{family} {table} {chain} #{} {}x {action}{comment}: {}",
        r.handle, r.packets, r.text
    )
}

/// The finding as one line; with a ranking, its confidence first.
fn show(finding: Finding) -> String {
    let confidence = match &finding {
        Finding::Ranked(r) => format!("{:?} ", r.confidence),
        _ => String::new(),
    };
    match RuleFinding::from(finding) {
        RuleFinding::Rule { rule, .. } => format!("{confidence}rule {}", one(&rule)),
        RuleFinding::Candidates { rules, .. } => {
            let rs: Vec<String> = rules.iter().map(one).collect();
            format!("{confidence}candidates {}", rs.join(" | "))
        }
        RuleFinding::Policy {
            family,
            table,
            chain,
        } => format!("{confidence}policy {family} {table} {chain}"),
        RuleFinding::NotFound { why } => format!("not found: {why}"),
    }
}

/// The finding for a drop at `hook` from nft listing `now` against `baseline` (none: a
/// namespace first seen now), iptables-legacy not consulted.
fn find(now: &str, baseline: Option<&str>, hook: Option<NfHook>, ipv6: bool) -> String {
    let baseline = baseline.map(|b| nft_counts(&parse_ruleset(b)));
    let tables = parse_ruleset(now);
    let listings = Listings {
        nft: Ok(&tables),
        legacy: None,
    };
    let nft = Since {
        baseline: baseline.as_ref(),
        window: baseline.as_ref(),
    };
    let before = Before {
        nft,
        ..Before::default()
    };
    let drop = Drop {
        hook,
        ipv6,
        dropped: 0,
        windowed: false,
    };
    show(decide(listings, before, drop))
}

const IN: Option<NfHook> = Some(NfHook::Input);

#[test]
fn the_one_rule_that_counted() {
    // 3307's rule had already counted its 2 packets at start-up.
    let baseline = HIT.replace("packets 3 bytes 180", "packets 0 bytes 0");
    assert_eq!(
        find(HIT, Some(&baseline), IN, false),
        "OnlyOne rule ip filter MYCHAIN #6 3x drop: tcp dport 5 drop"
    );
    assert_eq!(
        find(HIT, Some(&zeroed(HIT)), IN, true),
        "OnlyOne rule ip6 filter INPUT #2 2x icmp6-port-unreachable: tcp dport 3309 reject"
    );
}

#[test]
fn several_rules_counted() {
    let both = "Ambiguous candidates ip filter MYCHAIN #6 3x drop: tcp dport 5 drop \
        | ip filter INPUT #3 2x icmp-host-prohibited: tcp dport 3307 reject with icmp type host-prohibited";
    assert_eq!(find(HIT, Some(&zeroed(HIT)), IN, false), both);
    // A namespace first seen after start-up: everything counted since its rules were added.
    assert_eq!(find(HIT, None, IN, false), both);
    assert_eq!(find(HIT, None, None, false), both);
}

#[test]
fn nothing_counted() {
    assert_eq!(
        find(HIT, Some(&zeroed(HIT)), Some(NfHook::Forward), false),
        "policy ip filter FORWARD"
    );
    assert_eq!(
        find(HIT, Some(HIT), IN, false),
        "not found: no nftables rule at the input hook counted packets since start-up"
    );
    // Counters reset (a re-created table reusing handles): nothing is taken as counted.
    assert_eq!(
        find(&zeroed(HIT), Some(HIT), IN, false),
        "not found: no nftables rule at the input hook counted packets since start-up"
    );
    assert_eq!(
        find(&zeroed(HIT), None, IN, false),
        "not found: no nftables rule at the input hook counted packets since they were added"
    );
    assert_eq!(
        find(HIT, Some(HIT), Some(NfHook::Output), false),
        "not found: no ip/inet nftables rule or policy drops at the output hook"
    );
    assert_eq!(
        find("", None, IN, true),
        "not found: no ip6/inet nftables table"
    );
}

#[test]
fn user_chains_count_at_the_hooks_that_reach_them() {
    // DOCKER-USER is jumped to from FORWARD only.
    let forwarded = MIXED.replace(
        "10.1.0.0/16 counter packets 0",
        "10.1.0.0/16 counter packets 4",
    );
    let rule = "OnlyOne rule ip filter DOCKER-USER #13 4x drop: ip saddr 10.1.0.0/16 drop";
    assert_eq!(
        find(&forwarded, Some(MIXED), Some(NfHook::Forward), false),
        rule
    );
    assert_eq!(find(&forwarded, Some(MIXED), None, false), rule);
    assert_eq!(find(&forwarded, Some(MIXED), IN, false), "policy inet t c");
    // `ssh` is reached through a named verdict map only.
    let ssh = SETS_AND_MAPS.replace(
        "packets 0 bytes 0 reject with icmpx",
        "packets 1 bytes 60 reject with icmpx",
    );
    assert_eq!(
        find(&ssh, Some(SETS_AND_MAPS), IN, true),
        "OnlyOne rule inet fw ssh #8 1x icmp6-addr-unreachable: reject with icmpx host-unreachable"
    );
    assert_eq!(
        find(SETS_AND_MAPS, Some(SETS_AND_MAPS), IN, false),
        "not found: no nftables rule at the input hook counted packets since start-up; \
         1 dropping rule there has no `counter` and cannot be identified"
    );
}

/// The finding from nft listing `nft` and legacy listing `legacy` (none: not consulted),
/// both against their versions with every counter at 0, for an attempt that lost `dropped`.
fn find_both(
    nft: &str,
    legacy: Option<&str>,
    hook: Option<NfHook>,
    ipv6: bool,
    dropped: u32,
) -> String {
    let (nft_tables, nft_base) = (parse_ruleset(nft), nft_counts(&parse_ruleset(&zeroed(nft))));
    let legacy_tables = legacy.map(parse_save);
    let zero_legacy = legacy.map(|l| {
        let zero = regex_free_zero(l);
        legacy::counts(&parse_save(&zero), ipv6)
    });
    let listings = Listings {
        nft: Ok(&nft_tables),
        legacy: legacy_tables.as_deref().map(Ok),
    };
    let before = Before {
        nft: Since {
            baseline: Some(&nft_base),
            window: Some(&nft_base),
        },
        legacy: Since {
            baseline: zero_legacy.as_ref(),
            window: zero_legacy.as_ref(),
        },
    };
    let drop = Drop {
        hook,
        ipv6,
        dropped,
        windowed: false,
    };
    show(decide(listings, before, drop))
}

/// `iptables-save -c` text with every `[p:b]` back at `[0:0]`.
fn regex_free_zero(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find(']') else {
            break;
        };
        let inner = &rest[open + 1..open + close];
        out.push_str(&rest[..open]);
        if inner
            .split_once(':')
            .is_some_and(|(p, b)| p.parse::<u64>().is_ok() && b.parse::<u64>().is_ok())
        {
            out.push_str("[0:0]");
        } else {
            out.push_str(&rest[open..=open + close]);
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    out
}

#[test]
fn legacy_rules_beside_nft_ones() {
    // The legacy REJECT in LCHAIN (2 packets) and the nft rules of HIT (3 and 2) all moved at
    // the input hook; the attempt lost 3: MYCHAIN's rule fits exactly.
    assert_eq!(
        find_both(HIT, Some(LEGACY), IN, false, 3),
        "Exact candidates ip filter MYCHAIN #6 3x drop: tcp dport 5 drop \
         | ip filter INPUT #3 2x icmp-host-prohibited: tcp dport 3307 reject with icmp type host-prohibited \
         | ip filter LCHAIN #1 2x icmp-port-unreachable: -A LCHAIN -p tcp -m tcp --dport 3310 -j REJECT --reject-with icmp-port-unreachable"
    );
    // Lost 2: two rules fit exactly; the legacy one is named by position, with the text
    // iptables-legacy-save prints.
    assert_eq!(
        find_both(HIT, Some(LEGACY), IN, false, 2),
        "Ambiguous candidates ip filter INPUT #3 2x icmp-host-prohibited: tcp dport 3307 reject with icmp type host-prohibited \
         | ip filter LCHAIN #1 2x icmp-port-unreachable: -A LCHAIN -p tcp -m tcp --dport 3310 -j REJECT --reject-with icmp-port-unreachable \
         | ip filter MYCHAIN #6 3x drop: tcp dport 5 drop"
    );
    // Only legacy rules moved (nft's counters as at start-up), with a comment.
    let commented = LEGACY.replace(
        "[0:0] -A INPUT -p tcp -m tcp --dport 3309",
        "[1:60] -A INPUT -p tcp -m tcp --dport 3309",
    );
    assert_eq!(
        find_both(&zeroed(HIT), Some(&commented), IN, false, 1),
        "Exact candidates ip filter INPUT #1 1x drop [legacy c]: -A INPUT -p tcp -m tcp --dport 3309 -m comment --comment \"legacy c\" -j DROP \
         | ip filter LCHAIN #1 2x icmp-port-unreachable: -A LCHAIN -p tcp -m tcp --dport 3310 -j REJECT --reject-with icmp-port-unreachable"
    );
    // ip6: ip6tables-legacy's DROP, not the ip tables.
    assert_eq!(
        find_both(&zeroed(HIT), Some(LEGACY6), IN, true, 1),
        "Exact rule ip6 filter INPUT #1 1x drop: -A INPUT -p tcp -m tcp --dport 3311 -j DROP"
    );
}

#[test]
fn legacy_policies_and_reasons() {
    // FORWARD's legacy policy DROP counted: a candidate, counted unlike nft's policy.
    let policy = LEGACY.replace(":FORWARD DROP [0:0]", ":FORWARD DROP [4:240]");
    assert_eq!(
        find_both(&zeroed(HIT), Some(&policy), Some(NfHook::Forward), false, 4),
        "Exact policy ip filter FORWARD"
    );
    // Beside a rule that moved too, the policy is a candidate named `-P CHAIN DROP`.
    let both = policy
        .replace(
            ":OUTPUT ACCEPT [4:296]\n",
            ":OUTPUT ACCEPT [4:296]\n:FWD - [0:0]\n",
        )
        .replace(
            "COMMIT",
            "[9:540] -A FORWARD -j FWD\n[1:60] -A FWD -j DROP\nCOMMIT",
        );
    assert_eq!(
        find_both(&zeroed(HIT), Some(&both), Some(NfHook::Forward), false, 4),
        "Exact candidates ip filter FORWARD #0 4x drop: -P FORWARD DROP \
         | ip filter FWD #1 1x drop: -A FWD -j DROP"
    );
    // Nothing moved anywhere: nft's policy drop at the hook is named.
    assert_eq!(
        find_both(&zeroed(HIT), Some(LEGACY), Some(NfHook::Forward), false, 1),
        "policy ip filter FORWARD"
    );
    assert_eq!(
        find_both(&zeroed(HIT), Some(&regex_free_zero(LEGACY)), IN, false, 1),
        "not found: no nftables rule at the input hook counted packets since start-up; \
         no iptables-legacy rule at the input hook counted packets since start-up"
    );
    assert_eq!(
        find_both(&zeroed(HIT), Some(""), IN, true, 1),
        "not found: no nftables rule at the input hook counted packets since start-up; \
         no ip6tables-legacy table"
    );
    assert_eq!(
        find_both(&zeroed(HIT), Some(LEGACY), Some(NfHook::Output), false, 1),
        "not found: no ip/inet nftables rule or policy drops at the output hook; \
         no iptables-legacy rule or policy drops at the output hook"
    );
    // The tools' own errors are the reasons.
    let drop = Drop {
        hook: IN,
        ipv6: false,
        dropped: 1,
        windowed: true,
    };
    let listings = Listings {
        nft: Err("`nft` not found: install nftables"),
        legacy: Some(Err("`iptables-legacy-save` not found: install iptables")),
    };
    assert_eq!(
        show(decide(listings, Before::default(), drop)),
        "not found: `nft` not found: install nftables; \
         `iptables-legacy-save` not found: install iptables"
    );
    let listings = Listings {
        nft: Ok(&[]),
        legacy: Some(Ok(&[])),
    };
    assert_eq!(
        show(decide(listings, Before::default(), drop)),
        "not found: no ip/inet nftables table; no iptables-legacy table"
    );
}

#[test]
fn measured_from_the_last_reading_before_the_attempt() {
    // Since start-up MYCHAIN's rule counted 3 and 3307's 2; since the reading just before
    // this attempt's first drop, only 3307's moved, by 1: it alone is a candidate.
    let tables = parse_ruleset(HIT);
    let baseline = nft_counts(&parse_ruleset(&zeroed(HIT)));
    let window = nft_counts(&parse_ruleset(
        &HIT.replace("packets 2 bytes 120", "packets 1 bytes 60"),
    ));
    let listings = Listings {
        nft: Ok(&tables),
        legacy: None,
    };
    let before = Before {
        nft: Since {
            baseline: Some(&baseline),
            window: Some(&window),
        },
        ..Before::default()
    };
    let drop = Drop {
        hook: IN,
        ipv6: false,
        dropped: 1,
        windowed: true,
    };
    assert_eq!(
        show(decide(listings, before, drop)),
        "Exact rule ip filter INPUT #3 2x icmp-host-prohibited: tcp dport 3307 reject with icmp type host-prohibited"
    );
    let before = Before {
        nft: Since {
            baseline: Some(&baseline),
            window: Some(&nft_counts(&tables)),
        },
        ..Before::default()
    };
    assert_eq!(
        show(decide(listings, before, drop)),
        "not found: no nftables rule at the input hook counted packets since the attempt's first drop"
    );
}

#[test]
fn iptables_nft_rules_named_with_their_comment() {
    use super::iptables::tests::KUBE_NFT;
    use super::save::tests::KUBE;
    // The kube-proxy REJECT in KUBE-SERVICES, jumped to from OUTPUT, lost the attempt's 2 SYNs.
    let tables = parse_ruleset(KUBE_NFT);
    let baseline = nft_counts(&parse_ruleset(&zeroed(KUBE_NFT)));
    let listings = Listings {
        nft: Ok(&tables),
        legacy: None,
    };
    let before = Before {
        nft: Since {
            baseline: Some(&baseline),
            window: Some(&baseline),
        },
        ..Before::default()
    };
    let drop = Drop {
        hook: Some(NfHook::Output),
        ipv6: false,
        dropped: 2,
        windowed: false,
    };
    let Finding::Ranked(mut ranked) = decide(listings, before, drop) else {
        panic!("no candidates");
    };
    let (annotations, refused) = iptables::annotate(&tables, "ip", &parse_save(KUBE));
    assert!(refused.is_empty());
    name_from(&mut ranked.candidates, "ip", &annotations);
    let first = &ranked.candidates[0];
    assert_eq!(
        first.iptables.as_deref(),
        Some(
            "-A KUBE-SERVICES -d 127.0.0.1/32 -p tcp -m tcp --dport 3306 -m comment --comment \"default/mysql has no endpoints\" -j REJECT --reject-with icmp-port-unreachable"
        )
    );
    assert_eq!(
        show(Finding::Ranked(ranked)),
        "Ambiguous candidates ip filter KUBE-SERVICES #6 2x icmp-port-unreachable [default/mysql has no endpoints]: ip daddr 127.0.0.1 tcp dport 3306 reject \
         | ip filter OUTPUT #5 2x drop: tcp dport 9 drop \
         | ip filter KUBE-SERVICES #16 4x drop [a \"quoted\" one]: tcp dport 3307 drop"
    );
}

#[test]
fn namespaces() {
    let own = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino());
    let found = crate::host::netns::paths();
    assert!(own.is_ok_and(|ino| found.keys().any(|k| u64::from(*k) == ino)));
    let mut lookup = RuleCounters::with_namespaces(HashMap::new());
    let why = |f| match f {
        RuleFinding::NotFound { why } => why,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        why(lookup.find(&RuleQuery {
            hook: IN,
            ..RuleQuery::default()
        })),
        "the kernel did not report the drop's network namespace"
    );
    assert_eq!(
        why(lookup.find(&RuleQuery {
            netns: Some(1),
            hook: IN,
            ..RuleQuery::default()
        })),
        "network namespace 1 not found"
    );
}
