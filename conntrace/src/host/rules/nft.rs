//! A parser for the text `nft -a list ruleset` prints: tables, their chains (hook and policy for
//! base chains), and each rule's handle, packet counter, final verdict and jump targets. Pure: no
//! I/O. Anything it does not understand (sets, maps, flowtables, comment lines) is skipped.

use crate::engine::lookup::RuleAction;

/// One `table FAMILY NAME { ... }` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// `ip`, `ip6`, `inet`, `arp`, `bridge`, `netdev`.
    pub family: String,
    pub name: String,
    pub chains: Vec<Chain>,
    /// Chains named by `jump`/`goto` inside the table's other blocks (named verdict maps).
    pub map_targets: Vec<String>,
}

impl Table {
    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.name == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    /// For base chains: the hook (`input`, `forward`, ...); `None` for regular chains.
    pub hook: Option<String>,
    /// For base chains: `accept` or `drop`.
    pub policy: Option<String>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub handle: u64,
    /// The packets its inline `counter` counted; `None` when the rule has no counter.
    pub packets: Option<u64>,
    /// Set when the rule's final statement drops or rejects.
    pub action: Option<Action>,
    /// The rule without its counter values and handle, whitespace-normalised.
    pub text: String,
    /// Chains it may `jump`/`goto`.
    pub targets: Vec<String>,
}

/// What a dropping rule does with a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Drop,
    /// The ICMP type (or `tcp-reset`) answered, in iptables' spelling, for an IPv4 and for an
    /// IPv6 packet: they differ for `reject` and `reject with icmpx ...` in `inet` tables.
    Reject {
        v4: String,
        v6: String,
    },
}

impl Action {
    pub fn for_packet(&self, ipv6: bool) -> RuleAction {
        match self {
            Self::Drop => RuleAction::Drop,
            Self::Reject { v4, v6 } => RuleAction::Reject {
                with: if ipv6 { v6 } else { v4 }.clone(),
            },
        }
    }
}

enum State {
    Top,
    Table,
    /// Inside a table's non-chain block (set, map, counter, ...), at this brace depth.
    Skip(i64),
    Chain,
}

/// Parses `nft -a list ruleset` output. Never fails: unknown lines are skipped.
pub fn parse_ruleset(text: &str) -> Vec<Table> {
    let mut tables: Vec<Table> = Vec::new();
    let mut state = State::Top;
    // A chain statement whose braces are still open (a set spanning lines).
    let mut pending = String::new();
    for line in text.lines() {
        let (code, comment) = split_comment(line);
        let code = code.trim();
        let words = tokens(code);
        match state {
            State::Top => {
                if let ["table", family, name, "{"] = words.as_slice() {
                    tables.push(Table {
                        family: (*family).to_owned(),
                        name: unquote(name),
                        chains: Vec::new(),
                        map_targets: Vec::new(),
                    });
                    state = State::Table;
                }
            }
            State::Table => {
                let Some(table) = tables.last_mut() else {
                    break;
                };
                if code == "}" {
                    state = State::Top;
                } else if let ["chain", name, "{"] = words.as_slice() {
                    table.chains.push(Chain {
                        name: unquote(name),
                        hook: None,
                        policy: None,
                        rules: Vec::new(),
                    });
                    state = State::Chain;
                } else if braces(code) > 0 {
                    table.map_targets.extend(targets(&words));
                    state = State::Skip(braces(code));
                }
            }
            State::Skip(depth) => {
                let Some(table) = tables.last_mut() else {
                    break;
                };
                table.map_targets.extend(targets(&words));
                let depth = depth + braces(code);
                state = if depth > 0 {
                    State::Skip(depth)
                } else {
                    State::Table
                };
            }
            State::Chain => {
                let Some(table) = tables.last_mut() else {
                    break;
                };
                let Some(chain) = table.chains.last_mut() else {
                    break;
                };
                if pending.is_empty() && code == "}" {
                    state = State::Table;
                    continue;
                }
                if !pending.is_empty() {
                    pending.push(' ');
                }
                pending.push_str(code);
                if braces(&pending) > 0 {
                    continue;
                }
                let statement = std::mem::take(&mut pending);
                let handle = comment
                    .and_then(|c| c.trim().strip_prefix("handle "))
                    .and_then(|h| h.trim().parse().ok());
                match handle {
                    Some(handle) => chain
                        .rules
                        .push(parse_rule(&statement, handle, &table.family)),
                    None => chain_header(&tokens(&statement), chain),
                }
            }
        }
    }
    tables
}

/// `type filter hook input priority filter; policy drop;` (and `comment "..."`, skipped).
fn chain_header(words: &[&str], chain: &mut Chain) {
    for pair in words.windows(2) {
        match pair[0] {
            "hook" => chain.hook = Some(pair[1].trim_end_matches(';').to_owned()),
            "policy" => chain.policy = Some(pair[1].trim_end_matches(';').to_owned()),
            _ => {}
        }
    }
}

fn parse_rule(statement: &str, handle: u64, family: &str) -> Rule {
    let mut words = tokens(statement);
    let mut packets = None;
    if let Some(i) = words.windows(5).position(|w| {
        w[0] == "counter" && w[1] == "packets" && w[3] == "bytes" && w[2].parse::<u64>().is_ok()
    }) {
        packets = words[i + 2].parse().ok();
        words.drain(i..i + 5);
    }
    Rule {
        handle,
        packets,
        action: action(family, &words),
        text: words.join(" "),
        targets: targets(&words).collect(),
    }
}

/// The rule's final verdict, if it drops or rejects (`family` picks `reject`'s default type).
fn action(family: &str, words: &[&str]) -> Option<Action> {
    let mut words = words;
    if let [rest @ .., "comment", _] = words {
        words = rest;
    }
    if words.last() == Some(&"drop") {
        return Some(Action::Drop);
    }
    let at = words.iter().rposition(|w| *w == "reject")?;
    let (v4, v6) = match &words[at + 1..] {
        [] => match family {
            "ip6" => ("icmp6-port-unreachable", "icmp6-port-unreachable"),
            "ip" => ("icmp-port-unreachable", "icmp-port-unreachable"),
            _ => ("icmp-port-unreachable", "icmp6-port-unreachable"),
        },
        ["with", "tcp", "reset"] => ("tcp-reset", "tcp-reset"),
        ["with", kind, "type", code] | ["with", kind, code] => {
            let (v4, v6) = match *kind {
                "icmp" => (icmp(code), icmp(code)),
                "icmpv6" => (icmp6(code), icmp6(code)),
                "icmpx" => match *code {
                    "no-route" => (icmp("net-unreachable"), icmp6(code)),
                    "host-unreachable" => (icmp(code), icmp6("addr-unreachable")),
                    _ => (icmp(code), icmp6(code)),
                },
                _ => return None,
            };
            return Some(Action::Reject { v4, v6 });
        }
        _ => return None,
    };
    Some(Action::Reject {
        v4: v4.to_owned(),
        v6: v6.to_owned(),
    })
}

/// An nft ICMP code in iptables' spelling: `host-prohibited` → `icmp-host-prohibited`.
fn icmp(code: &str) -> String {
    match code {
        "prot-unreachable" => "icmp-proto-unreachable".to_owned(),
        other => format!("icmp-{other}"),
    }
}

/// An nft ICMPv6 code in iptables' spelling: `admin-prohibited` → `icmp6-adm-prohibited`.
fn icmp6(code: &str) -> String {
    match code {
        "admin-prohibited" => "icmp6-adm-prohibited".to_owned(),
        other => format!("icmp6-{other}"),
    }
}

/// Chain names after `jump` or `goto`.
fn targets<'a>(words: &'a [&'a str]) -> impl Iterator<Item = String> + 'a {
    words
        .windows(2)
        .filter(|w| matches!(w[0], "jump" | "goto"))
        .map(|w| unquote(w[1].trim_end_matches([',', '}', ';'])))
}

fn unquote(word: &str) -> String {
    word.trim_matches('"').to_owned()
}

/// Splits a line at its first `#` outside quotes: (code, comment).
fn split_comment(line: &str) -> (&str, Option<&str>) {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '#' if !quoted => return (&line[..i], Some(&line[i + 1..])),
            _ => {}
        }
    }
    (line, None)
}

/// Opened minus closed braces outside quotes.
fn braces(code: &str) -> i64 {
    let mut quoted = false;
    let mut depth = 0;
    for c in code.chars() {
        match c {
            '"' => quoted = !quoted,
            '{' if !quoted => depth += 1,
            '}' if !quoted => depth -= 1,
            _ => {}
        }
    }
    depth
}

/// Whitespace-separated words; a quoted string (with its quotes) stays one word.
fn tokens(code: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let mut start = None;
    let mut quoted = false;
    for (i, c) in code.char_indices() {
        match c {
            '"' => {
                quoted = !quoted;
                start.get_or_insert(i);
            }
            c if c.is_whitespace() && !quoted => {
                if let Some(s) = start.take() {
                    words.push(&code[s..i]);
                }
            }
            _ => {
                start.get_or_insert(i);
            }
        }
    }
    if let Some(s) = start {
        words.push(&code[s..]);
    }
    words
}

#[cfg(test)]
pub(super) mod tests {
    use std::fmt::Write as _;

    use super::*;

    /// `nft -a list ruleset` (nftables 1.0.6) after iptables-nft, ip6tables-nft and `nft add`
    /// commands in a fresh namespace (stdout: the "managed by iptables-nft" warnings went to
    /// stderr).
    pub(in crate::host::rules) const MIXED: &str = r#"table ip filter { # handle 1
	chain INPUT { # handle 1
		type filter hook input priority filter; policy accept;
		tcp dport 3306 counter packets 0 bytes 0 drop # handle 2
		tcp dport 3307 counter packets 0 bytes 0 reject with icmp type host-prohibited # handle 3
		tcp dport 3308 counter packets 0 bytes 0 reject with tcp reset # handle 4
		tcp dport 3309 counter packets 0 bytes 0 reject # handle 5
		counter packets 0 bytes 0 jump MYCHAIN # handle 7
	}

	chain MYCHAIN { # handle 6
		tcp dport 5 counter packets 0 bytes 0 drop # handle 8
		tcp dport 6  counter packets 0 bytes 0 drop # handle 9
	}

	chain DOCKER-USER { # handle 10
		ip saddr 10.1.0.0/16 counter packets 0 bytes 0 drop # handle 13
	}

	chain FORWARD { # handle 11
		type filter hook forward priority filter; policy drop;
		counter packets 0 bytes 0 jump DOCKER-USER # handle 12
	}

	chain OUTPUT { # handle 14
		type filter hook output priority filter; policy accept;
		tcp dport 7 counter packets 0 bytes 0 drop # handle 15
	}
}
table ip6 filter { # handle 2
	chain INPUT { # handle 1
		type filter hook input priority filter; policy accept;
		tcp dport 3306 counter packets 0 bytes 0 drop # handle 2
		tcp dport 3307 counter packets 0 bytes 0 reject with icmpv6 type admin-prohibited # handle 3
		tcp dport 3309 counter packets 0 bytes 0 reject # handle 4
		tcp dport 3310 counter packets 0 bytes 0 reject with icmpv6 type no-route # handle 5
	}
}
table inet t { # handle 3
	chain c { # handle 1
		type filter hook input priority filter; policy drop;
		tcp dport { 1, 2 } counter packets 0 bytes 0 drop # handle 4
		tcp dport 8 drop # handle 5
		tcp dport 9 counter packets 0 bytes 0 reject with tcp reset # handle 6
		tcp dport 10 counter packets 0 bytes 0 reject # handle 7
		tcp dport 11 counter packets 0 bytes 0 reject with icmpx admin-prohibited comment "x y" # handle 8
		ip saddr 10.0.0.1 counter packets 0 bytes 0 reject with icmp host-unreachable # handle 9
		ip6 saddr ::1 counter packets 0 bytes 0 reject with icmpv6 admin-prohibited # handle 10
		tcp dport 12 counter packets 0 bytes 0 jump u # handle 11
		ct state established,related counter packets 0 bytes 0 accept # handle 13
		counter packets 0 bytes 0 # handle 14
	}

	chain u { # handle 2
		counter packets 0 bytes 0 drop # handle 12
	}
}
"#;

    /// Loaded with `nft -f`: named set, verdict map and counter, vmaps, comments.
    pub(in crate::host::rules) const SETS_AND_MAPS: &str = r#"table inet fw { # handle 1
	counter cnt { # handle 5
		packets 0 bytes 0
	}

	set blocked { # handle 6
		type ipv4_addr
		flags interval
		elements = { 10.0.0.0/8, 192.168.1.1,
			     192.168.2.1, 192.168.3.1,
			     192.168.4.1, 192.168.5.1 }
	}

	map ports { # handle 7
		type inet_service : verdict
		elements = { 22 : jump ssh, 80 : accept }
	}

	chain ssh { # handle 1
		counter packets 0 bytes 0 reject with icmpx host-unreachable # handle 8
	}

	chain web { # handle 2
		meta nfproto ipv6 tcp flags syn counter packets 0 bytes 0 reject with icmpv6 no-route # handle 9
	}

	chain in { # handle 3
		comment "main input"
		type filter hook input priority filter; policy accept;
		ip saddr @blocked counter packets 0 bytes 0 drop comment "blocked hosts {x} # no handle" # handle 10
		tcp dport vmap @ports # handle 11
		tcp dport vmap { 443 : jump web, 8443 : goto web } # handle 13
		tcp dport 23 counter name "cnt" drop # handle 14
		meta l4proto udp log prefix "udp drop: " counter packets 0 bytes 0 drop # handle 15
	}

	chain out { # handle 4
		type filter hook output priority filter; policy accept;
	}
}
"#;

    /// One line per chain, then per rule: handle, packets, action for IPv4 and IPv6, text,
    /// jump targets.
    fn render(tables: &[Table]) -> String {
        let mut out = String::new();
        for t in tables {
            for c in &t.chains {
                let (hook, policy) = (c.hook.as_deref(), c.policy.as_deref());
                let (hook, policy) = (hook.unwrap_or("-"), policy.unwrap_or("-"));
                writeln!(out, "{} {} {} {hook} {policy}", t.family, t.name, c.name).unwrap();
                for r in &c.rules {
                    let action = |v6| match r.action.as_ref().map(|a| a.for_packet(v6)) {
                        None => "-".to_owned(),
                        Some(RuleAction::Drop) => "drop".to_owned(),
                        Some(RuleAction::Reject { with }) => with,
                    };
                    let packets = r.packets.map_or("-".to_owned(), |p| p.to_string());
                    let (handle, v4, v6) = (r.handle, action(false), action(true));
                    write!(out, "  #{handle} {packets} {v4} {v6} | {}", r.text).unwrap();
                    if !r.targets.is_empty() {
                        write!(out, " -> {}", r.targets.join(",")).unwrap();
                    }
                    out.truncate(out.trim_end().len());
                    out.push('\n');
                }
            }
        }
        out
    }

    #[test]
    fn iptables_nft_listing_with_trailing_warning() {
        let text = "table ip filter { # handle 1
	chain INPUT { # handle 1
		type filter hook input priority filter; policy accept;
		tcp dport 3306 counter packets 0 bytes 0 drop # handle 2
		tcp dport 3307 counter packets 0 bytes 0 reject with icmp type host-prohibited # handle 3
	}
}
# Warning: table ip filter is managed by iptables-nft, do not touch!
";
        assert_eq!(
            render(&parse_ruleset(text)),
            "ip filter INPUT input accept
  #2 0 drop drop | tcp dport 3306 drop
  #3 0 icmp-host-prohibited icmp-host-prohibited | tcp dport 3307 reject with icmp type host-prohibited
"
        );
    }

    #[test]
    fn iptables_and_nft_rules() {
        assert_eq!(
            render(&parse_ruleset(MIXED)),
            "ip filter INPUT input accept
  #2 0 drop drop | tcp dport 3306 drop
  #3 0 icmp-host-prohibited icmp-host-prohibited | tcp dport 3307 reject with icmp type host-prohibited
  #4 0 tcp-reset tcp-reset | tcp dport 3308 reject with tcp reset
  #5 0 icmp-port-unreachable icmp-port-unreachable | tcp dport 3309 reject
  #7 0 - - | jump MYCHAIN -> MYCHAIN
ip filter MYCHAIN - -
  #8 0 drop drop | tcp dport 5 drop
  #9 0 drop drop | tcp dport 6 drop
ip filter DOCKER-USER - -
  #13 0 drop drop | ip saddr 10.1.0.0/16 drop
ip filter FORWARD forward drop
  #12 0 - - | jump DOCKER-USER -> DOCKER-USER
ip filter OUTPUT output accept
  #15 0 drop drop | tcp dport 7 drop
ip6 filter INPUT input accept
  #2 0 drop drop | tcp dport 3306 drop
  #3 0 icmp6-adm-prohibited icmp6-adm-prohibited | tcp dport 3307 reject with icmpv6 type admin-prohibited
  #4 0 icmp6-port-unreachable icmp6-port-unreachable | tcp dport 3309 reject
  #5 0 icmp6-no-route icmp6-no-route | tcp dport 3310 reject with icmpv6 type no-route
inet t c input drop
  #4 0 drop drop | tcp dport { 1, 2 } drop
  #5 - drop drop | tcp dport 8 drop
  #6 0 tcp-reset tcp-reset | tcp dport 9 reject with tcp reset
  #7 0 icmp-port-unreachable icmp6-port-unreachable | tcp dport 10 reject
  #8 0 icmp-admin-prohibited icmp6-adm-prohibited | tcp dport 11 reject with icmpx admin-prohibited comment \"x y\"
  #9 0 icmp-host-unreachable icmp-host-unreachable | ip saddr 10.0.0.1 reject with icmp host-unreachable
  #10 0 icmp6-adm-prohibited icmp6-adm-prohibited | ip6 saddr ::1 reject with icmpv6 admin-prohibited
  #11 0 - - | tcp dport 12 jump u -> u
  #13 0 - - | ct state established,related accept
  #14 0 - - |
inet t u - -
  #12 0 drop drop | drop
"
        );
    }

    #[test]
    fn sets_maps_and_comments() {
        let tables = parse_ruleset(SETS_AND_MAPS);
        assert_eq!(tables[0].map_targets, ["ssh"]);
        assert_eq!(
            render(&tables),
            "inet fw ssh - -
  #8 0 icmp-host-unreachable icmp6-addr-unreachable | reject with icmpx host-unreachable
inet fw web - -
  #9 0 icmp6-no-route icmp6-no-route | meta nfproto ipv6 tcp flags syn reject with icmpv6 no-route
inet fw in input accept
  #10 0 drop drop | ip saddr @blocked drop comment \"blocked hosts {x} # no handle\"
  #11 - - - | tcp dport vmap @ports
  #13 - - - | tcp dport vmap { 443 : jump web, 8443 : goto web } -> web,web
  #14 - drop drop | tcp dport 23 counter name \"cnt\" drop
  #15 0 drop drop | meta l4proto udp log prefix \"udp drop: \" drop
inet fw out output accept
"
        );
    }

    #[test]
    fn statement_spanning_lines_and_counts() {
        let text =
            "table inet x {\n\tchain c {\n\t\ttype filter hook forward priority 0; policy drop;
\t\tip daddr { 10.0.0.1,\n\t\t\t10.0.0.2 } counter packets 12 bytes 720 drop # handle 3\n\t}\n}\n";
        assert_eq!(
            render(&parse_ruleset(text)),
            "inet x c forward drop\n  #3 12 drop drop | ip daddr { 10.0.0.1, 10.0.0.2 } drop\n"
        );
        assert!(parse_ruleset("").is_empty());
    }
}
