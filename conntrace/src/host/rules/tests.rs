//! Rule choice on real rulesets, namespace enumeration and look-up errors.
use super::{
    nft::tests::{MIXED, SETS_AND_MAPS},
    *,
};
use crate::engine::lookup::RuleAction;

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

fn find(now: &str, baseline: Option<&str>, hook: Option<NfHook>, ipv6: bool) -> String {
    let baseline = baseline.map(|b| counts(&parse_ruleset(b)));
    let one = |r: &FirewallRule| {
        let action = match &r.action {
            RuleAction::Drop => "drop",
            RuleAction::Reject { with } => with,
        };
        let (family, table, chain) = (&r.family, &r.table, &r.chain);
        format!(
            "{family} {table} {chain} #{} {}x {action}: {}",
            r.handle, r.packets, r.text
        )
    };
    match decide(&parse_ruleset(now), baseline.as_ref(), hook, ipv6) {
        RuleFinding::Rule(r) => format!("rule {}", one(&r)),
        RuleFinding::Candidates(rs) => {
            let rs: Vec<String> = rs.iter().map(one).collect();
            format!("candidates {}", rs.join(" | "))
        }
        RuleFinding::Policy {
            family,
            table,
            chain,
        } => format!("policy {family} {table} {chain}"),
        RuleFinding::NotFound { why } => format!("not found: {why}"),
    }
}

const IN: Option<NfHook> = Some(NfHook::Input);

#[test]
fn the_one_rule_that_counted() {
    // 3307's rule had already counted its 2 packets at start-up.
    let baseline = HIT.replace("packets 3 bytes 180", "packets 0 bytes 0");
    assert_eq!(
        find(HIT, Some(&baseline), IN, false),
        "rule ip filter MYCHAIN #6 3x drop: tcp dport 5 drop"
    );
    assert_eq!(
        find(HIT, Some(&zeroed(HIT)), IN, true),
        "rule ip6 filter INPUT #2 2x icmp6-port-unreachable: tcp dport 3309 reject"
    );
}

#[test]
fn several_rules_counted() {
    let both = "candidates ip filter MYCHAIN #6 3x drop: tcp dport 5 drop \
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
        "not found: no dropping rule at the input hook counted packets since start-up"
    );
    // Counters reset (a re-created table reusing handles): nothing is taken as counted.
    assert_eq!(
        find(&zeroed(HIT), Some(HIT), IN, false),
        "not found: no dropping rule at the input hook counted packets since start-up"
    );
    assert_eq!(
        find(&zeroed(HIT), None, IN, false),
        "not found: no dropping rule at the input hook counted packets since they were added"
    );
    assert_eq!(
        find(HIT, Some(HIT), Some(NfHook::Output), false),
        "not found: no ip/inet table has a dropping rule or policy drop at the output hook \
         (iptables-legacy rules are not visible to `nft`)"
    );
    assert_eq!(
        find("", None, IN, true),
        "not found: no ip6/inet nftables table: the drop was not made by an nftables rule \
         (iptables-legacy rules are not visible to `nft`)"
    );
}

#[test]
fn user_chains_count_at_the_hooks_that_reach_them() {
    // DOCKER-USER is jumped to from FORWARD only.
    let forwarded = MIXED.replace(
        "10.1.0.0/16 counter packets 0",
        "10.1.0.0/16 counter packets 4",
    );
    let rule = "rule ip filter DOCKER-USER #13 4x drop: ip saddr 10.1.0.0/16 drop";
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
        "rule inet fw ssh #8 1x icmp6-addr-unreachable: reject with icmpx host-unreachable"
    );
    assert_eq!(
        find(SETS_AND_MAPS, Some(SETS_AND_MAPS), IN, false),
        "not found: no dropping rule at the input hook counted packets since start-up; \
         1 dropping rule there has no `counter` and cannot be identified"
    );
}

#[test]
fn namespaces() {
    let own = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino());
    let found = scan_namespaces();
    assert!(own.is_ok_and(|ino| found.keys().any(|k| u64::from(*k) == ino)));
    let mut lookup = RuleCounters {
        paths: HashMap::new(),
        scanned_at: Instant::now(),
        baselines: HashMap::new(),
        latest: HashMap::new(),
    };
    let why = |f| match f {
        RuleFinding::NotFound { why } => why,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        why(lookup.find(None, IN, false)),
        "the kernel did not report the drop's network namespace"
    );
    assert_eq!(
        why(lookup.find(Some(1), IN, false)),
        "network namespace 1 not found"
    );
}
