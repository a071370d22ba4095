//! The look-up against real rulesets, in network namespaces made for the test (root only:
//! others print "SKIP: needs root"). Each test owns its namespace (`ip netns add`), which a
//! guard deletes, rules and all, even when the test panics; nothing is done in the machine's
//! own namespace. Traffic is one connection attempt on the namespace's loopback.

use std::{
    collections::HashMap,
    fs::File,
    io,
    net::{SocketAddr, TcpStream},
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use nix::sched::{CloneFlags, setns};

use super::{Backend, Finding, RuleCounters, RuleQuery, rank::Confidence};
use crate::engine::lookup::RuleLookup;
use crate::{
    engine::{
        facts::NfHook,
        lookup::{RuleAction, RuleFinding},
    },
    output::Clock,
};

/// A network namespace made for one test, deleted on drop.
struct TestNetns {
    name: String,
    inode: u32,
    path: PathBuf,
}

impl TestNetns {
    /// `ip netns add conntrace-rules-<test>-<pid>` with its loopback up; `None` (after
    /// printing why) when not root or a tool is missing.
    fn new(test: &str, tools: &[&str]) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIP: needs root");
            return None;
        }
        let missing = |t: &&&str| Command::new(t).arg("--version").output().is_err();
        if let Some(tool) = ["ip"].iter().chain(tools).find(missing) {
            println!("SKIP: `{tool}` not found");
            return None;
        }
        let name = format!("conntrace-rules-{test}-{}", std::process::id());
        run(&["ip", "netns", "add", &name]);
        let path = PathBuf::from(format!("/run/netns/{name}"));
        let inode = std::fs::metadata(&path).map(|m| m.ino()).unwrap_or(0);
        // From here on the guard deletes the namespace, whatever happens.
        let ns = Self {
            name,
            inode: u32::try_from(inode).expect("namespace inode fits u32"),
            path,
        };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        Some(ns)
    }

    /// Runs `args` inside the namespace (`ip netns exec`); panics when it fails.
    fn exec(&self, args: &[&str]) {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend(args);
        run(&all);
    }

    /// Connects to 127.0.0.1:`port` from inside the namespace, waiting at most `wait`:
    /// the error (refused, timed out), or `Ok` if it got through.
    fn connect(&self, port: u16, wait: Duration) -> io::Result<()> {
        let path = self.path.clone();
        std::thread::spawn(move || {
            let ns = File::open(&path)?;
            // Only this short-lived thread changes namespace.
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            TcpStream::connect_timeout(&addr, wait).map(drop)
        })
        .join()
        .expect("connect thread")
    }

    /// A look-up that knows this namespace only, its baseline taken now.
    fn lookup(&self) -> RuleCounters {
        RuleCounters::with_namespaces(HashMap::from([(self.inode, self.path.clone())]))
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let deleted = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !deleted.is_ok_and(|s| s.success()) {
            eprintln!("could not delete network namespace {}", self.name);
        }
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output();
    let out = out.unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn iptables_nft_reject_in_a_user_chain_named_with_its_comment() {
    let Some(ns) = TestNetns::new("nft", &["iptables-nft", "nft"]) else {
        return;
    };
    let ipt = |args: &[&str]| ns.exec(&[&["iptables-nft", "-w", "5"], args].concat());
    ipt(&["-N", "KUBE-SERVICES"]);
    ipt(&["-A", "OUTPUT", "-p", "tcp", "--dport", "1", "-j", "ACCEPT"]);
    ipt(&["-A", "OUTPUT", "-j", "KUBE-SERVICES"]);
    let comment = ["-m", "comment", "--comment"];
    let decoy = ["-A", "KUBE-SERVICES", "-p", "tcp", "--dport", "3307"];
    ipt(&[&decoy[..], &comment, &["other", "-j", "DROP"]].concat());
    let reject = [
        "-A",
        "KUBE-SERVICES",
        "-d",
        "127.0.0.1",
        "-p",
        "tcp",
        "--dport",
        "3306",
    ];
    let then = ["-j", "REJECT", "--reject-with", "icmp-port-unreachable"];
    ipt(&[
        &reject[..],
        &comment,
        &["default/mysql has no endpoints"],
        &then,
    ]
    .concat());
    let mut lookup = ns.lookup();
    let refused = ns.connect(3306, Duration::from_secs(2)).unwrap_err();
    assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);

    let query = RuleQuery {
        netns: Some(ns.inode),
        hook: Some(NfHook::Output),
        dropped: 1,
        location: Some("nft_do_chain+0x3e8".into()),
        ..RuleQuery::default()
    };
    let Finding::Ranked(ranked) = lookup.find_attempt(&query) else {
        panic!("no rule found");
    };
    assert_eq!(ranked.confidence, Confidence::Exact);
    assert_eq!(ranked.candidates.len(), 1, "{ranked:?}");
    let c = &ranked.candidates[0];
    assert_eq!(c.backend, Backend::Nftables);
    assert_eq!((c.moved, c.rule.packets), (1, 1));
    let r = &c.rule;
    assert_eq!(
        (r.family.as_str(), r.table.as_str(), r.chain.as_str()),
        ("ip", "filter", "KUBE-SERVICES")
    );
    assert_eq!(r.comment.as_deref(), Some("default/mysql has no endpoints"));
    assert_eq!(r.text, "ip daddr 127.0.0.1 tcp dport 3306 reject");
    let with = "icmp-port-unreachable".to_owned();
    assert_eq!(r.action, RuleAction::Reject { with });
    assert_eq!(
        c.iptables.as_deref(),
        Some(
            "-A KUBE-SERVICES -d 127.0.0.1/32 -p tcp -m tcp --dport 3306 -m comment \
             --comment \"default/mysql has no endpoints\" -j REJECT \
             --reject-with icmp-port-unreachable"
        )
    );
    // Today's trait: the one rule, with its comment.
    let query = RuleQuery {
        netns: Some(ns.inode),
        hook: Some(NfHook::Output),
        ..RuleQuery::default()
    };
    match RuleLookup::find(&mut lookup, &query) {
        RuleFinding::Rule { rule, .. } => assert_eq!(rule.text, r.text),
        other => panic!("{other:?}"),
    }
}

#[test]
fn iptables_legacy_drop_on_input_named() {
    let Some(ns) = TestNetns::new("legacy", &["iptables-legacy", "nft"]) else {
        return;
    };
    let legacy = |args: &[&str]| ns.exec(&[&["iptables-legacy", "-w", "5"], args].concat());
    legacy(&["-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"]);
    legacy(&["-A", "INPUT", "-p", "tcp", "--dport", "3307", "-j", "DROP"]);
    let mut lookup = ns.lookup();
    let first_drop_ns = Clock::mono_now_ns();
    let lost = ns.connect(3307, Duration::from_millis(300)).unwrap_err();
    assert_eq!(lost.kind(), io::ErrorKind::TimedOut);
    let query = RuleQuery {
        netns: Some(ns.inode),
        hook: Some(NfHook::Input),
        dropped: 1,
        first_drop_ns: Some(first_drop_ns),
        last_drop_ns: Some(Clock::mono_now_ns()),
        location: Some("nf_hook_slow+0x7d".into()),
        ..RuleQuery::default()
    };
    let Finding::Ranked(ranked) = lookup.find_attempt(&query) else {
        panic!("no rule found");
    };
    assert_eq!(ranked.confidence, Confidence::Exact, "{ranked:?}");
    let c = &ranked.candidates[0];
    assert_eq!(c.backend, Backend::IptablesLegacy);
    let r = &c.rule;
    assert_eq!(
        (
            r.family.as_str(),
            r.table.as_str(),
            r.chain.as_str(),
            r.handle
        ),
        ("ip", "filter", "INPUT", 2)
    );
    assert_eq!(r.text, "-A INPUT -p tcp -m tcp --dport 3307 -j DROP");
    assert_eq!(
        (r.action.clone(), r.comment.as_deref()),
        (RuleAction::Drop, None)
    );
    assert_eq!((c.moved, r.packets), (1, 1));
    // Today's trait (no count, no location): the same rule.
    let query = RuleQuery {
        netns: Some(ns.inode),
        hook: Some(NfHook::Input),
        ..RuleQuery::default()
    };
    match RuleLookup::find(&mut lookup, &query) {
        RuleFinding::Rule { rule, .. } => assert_eq!(rule.text, r.text),
        other => panic!("{other:?}"),
    }
    // A drop in nft_do_chain is nftables': the legacy rule is not offered for it.
    let by_nft = RuleQuery {
        location: Some("nft_do_chain+0x3e8".into()),
        ..query
    };
    match lookup.find_attempt(&by_nft) {
        Finding::NotFound { why } => assert_eq!(why, "no ip/inet nftables table"),
        other => panic!("{other:?}"),
    }
}
