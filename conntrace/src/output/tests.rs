//! The printers' exact output, record kind by record kind, in JSON and in the human format
//! (compact and wide), from fixed records and a fixed clock.

use std::collections::BTreeMap;

use super::{Clock, Final, KernelFeatures, Lost, Ready, Record, human::Human, json};
use crate::{
    engine::{
        facts::{DropReason, Errno, NfHook, TcpFlags, TcpState},
        lookup::{FirewallRule, RuleAction},
        verdict::{
            Detail, Direction, DropRecord, Outcome, Reason, Side, Summary, Verdict,
            detail::{
                AttemptDetail, ClosedDetail, DroppedKind, EstablishedDetail, RuleRef, StallDetail,
                SynTimeoutCause,
            },
        },
    },
    kernel::{ActiveProgram, attach::Capability},
};

/// 2026-11-30T00:00:00Z at monotonic 0.
const EPOCH_2026_11_30: i128 = 1_795_996_800_000_000_000;
const SEC: u64 = 1_000_000_000;

pub(crate) fn clock() -> Clock {
    Clock::fixed(EPOCH_2026_11_30)
}

fn json_line(record: &Record<'_>) -> String {
    json_line_on(record, None)
}

/// The JSON line of `record` written by conntrace on `node` (`--node`).
fn json_line_on(record: &Record<'_>, node: Option<&str>) -> String {
    let mut out = Vec::new();
    json::write(&mut out, record, &clock(), node).expect("write");
    String::from_utf8(out).expect("utf-8")
}

fn ready() -> Ready {
    Ready {
        ts_ns: SEC,
        version: "0.1.0",
        ports: vec![3306],
        follow: crate::kernel::attach::Follow::Quiet,
        programs: vec![ActiveProgram {
            capability: Capability::Lifecycle,
            name: "inet_sock_set_state",
            attach: "tracepoint:sock:inet_sock_set_state".into(),
            verified_insns: Some(4_096),
        }],
        unavailable: Vec::new(),
        kernel: "6.18.44".into(),
        attach_paths: BTreeMap::from([("lifecycle".into(), "tracepoint".into())]),
        kernel_features: KernelFeatures { btf: true },
        ring_buffer_bytes: 4_194_304,
        degraded: Vec::new(),
    }
}

pub(crate) fn verdict(side: Side, reason: Reason, detail: Detail) -> Verdict {
    let (client, server) = ("10.77.0.1".parse().unwrap(), "10.77.0.2".parse().unwrap());
    let (saddr, sport, daddr, dport) = match side {
        Side::Client => (client, 40_000, server, 3306),
        Side::Server => (server, 3306, client, 40_000),
    };
    Verdict {
        ts_ns: 2 * SEC + 123_456_000,
        sk: None,
        side,
        outcome: Outcome::Failed,
        reason,
        kernel_reason: None,
        errno: None,
        saddr: Some(saddr),
        sport: Some(sport),
        daddr,
        dport,
        netns: Some(4_026_532_246),
        pid: None,
        comm: None,
        container: None,
        duration_ms: 2040.5,
        syn_retransmits: 2,
        detail,
    }
}

/// The server's verdict for SYNs an INPUT rule dropped.
pub(super) fn netfilter_drop() -> Verdict {
    let mut d = AttemptDetail::default();
    d.drops.drops = vec![DroppedKind {
        kernel_reason: DropReason::new("NETFILTER_DROP"),
        direction: Direction::In,
        tcp_flags: TcpFlags(0x02),
        count: 3,
        location: "nft_do_chain+0x3e8".into(),
        hook: Some(NfHook::Input),
    }];
    d.drops.hook = Some(NfHook::Input);
    d.drops.rule = Some(RuleRef::Rule(FirewallRule {
        comment: None,
        backend: Default::default(),
        iptables: None,
        family: "ip".into(),
        table: "filter".into(),
        chain: "INPUT".into(),
        handle: 2,
        text: "tcp dport 3306 drop".into(),
        action: RuleAction::Drop,
        packets: 3,
    }));
    d.drops.dropped = Some(3);
    let mut v = verdict(
        Side::Server,
        Reason::NetfilterDrop,
        Detail::Attempt(Box::new(d)),
    );
    v.kernel_reason = Some("NETFILTER_DROP".into());
    v
}

/// The client's verdict for the same SYNs.
pub(crate) fn syn_timeout() -> Verdict {
    let mut d = ClosedDetail::new(TcpState::SynSent);
    d.cause = Some(SynTimeoutCause::KernelGaveUp);
    d.after_ms = Some(3064.0);
    let mut v = verdict(
        Side::Client,
        Reason::SynTimeout,
        Detail::Closed(Box::new(d)),
    );
    v.kernel_reason = Some("ETIMEDOUT".into());
    v.errno = Some(Errno::ETIMEDOUT);
    (v.pid, v.comm, v.netns) = (Some(7211), Some("ct-client".into()), None);
    v.duration_ms = 3064.0;
    v
}

/// The full listener a client's `syn_timeout` reached on this host (`peer_listen_queue`).
pub(crate) fn peer_listen_queue() -> crate::engine::verdict::detail::PeerListenQueue {
    crate::engine::verdict::detail::PeerListenQueue {
        netns: 4026532249,
        listener: "10.0.0.2:3306".parse().expect("address"),
        overflows: 4,
        accept_queue: 2,
        backlog: 1,
        somaxconn: Some(64),
    }
}

/// A client whose greeting has not come.
pub(crate) fn stalled() -> Verdict {
    let d = StallDetail {
        connection: EstablishedDetail::default(),
        waited_ms: Some(2030.5),
        ..StallDetail::default()
    };
    let mut v = verdict(
        Side::Client,
        Reason::StalledNoGreeting,
        Detail::Stall(Box::new(d)),
    );
    v.outcome = Outcome::Stalled;
    v.kernel_reason = Some("established, nothing received".into());
    (v.pid, v.comm, v.syn_retransmits) = (Some(7221), Some("ct-client".into()), 0);
    v.duration_ms = 0.074;
    v
}

/// A server verdict in a Podman container's namespace, and a drop in a Kubernetes pod's.
fn in_containers() -> (Verdict, DropRecord) {
    use crate::identity::{Container, Image, K8s, Runtime, Via};
    let mut v = netfilter_drop();
    v.container = Some(Container {
        runtime: Runtime::Podman,
        id: "3f0404f3800cb9ffbb56184f5c1f9afb05adca37d56b64d52078fb728fa03072".into(),
        name: Some("mysqld".into()),
        image: Some(Image {
            name: "localhost/debian:bookworm-min".into(),
        }),
        k8s: None,
        via: Via::Netns,
    });
    let mut d = drop_record();
    d.container = Some(Container {
        runtime: Runtime::Containerd,
        id: "ct-db-0".into(),
        name: Some("mysql".into()),
        image: None,
        k8s: Some(K8s {
            namespace: "shop".into(),
            pod: "db-0".into(),
            container: Some("mysql".into()),
        }),
        via: Via::Netns,
    });
    (v, d)
}

fn drop_record() -> DropRecord {
    DropRecord {
        ts_ns: 3 * SEC,
        direction: Direction::In,
        kernel_reason: DropReason::new("TCP_ABORT_ON_DATA"),
        location: "tcp_v4_do_rcv+0x7c".into(),
        tcp_flags: TcpFlags(0x18),
        saddr: "10.77.0.1".parse().unwrap(),
        sport: 40_000,
        daddr: "10.77.0.2".parse().unwrap(),
        dport: 3306,
        netns: Some(4_026_532_177),
        pid: None,
        comm: None,
        container: None,
    }
}

/// A summary record of `s` at 0 s after `duration_ms`, with nothing else to say; tests set
/// the fields they check.
fn final_of(s: &Summary, duration_ms: f64) -> Final<'_> {
    Final {
        ts_ns: 0,
        summary: s,
        lost_events: 0,
        decode_errors: 0,
        duration_ms,
        tracked_at_exit: 0,
        tcp_counters: BTreeMap::new(),
        read_failures: BTreeMap::new(),
        program_misses: BTreeMap::new(),
        all_ports: false,
        programs: None,
    }
}

#[test]
fn json_ready() {
    let r = ready();
    assert_eq!(
        json_line(&Record::Ready(&r)),
        r#"{"event":"ready","ts":"2026-11-30T00:00:01.000000Z","version":"0.1.0","ports":[3306],"follow":"quiet","programs":[{"capability":"lifecycle","name":"inet_sock_set_state","attach":"tracepoint:sock:inet_sock_set_state","verified_insns":4096}],"unavailable":[],"kernel":"6.18.44","attach_paths":{"lifecycle":"tracepoint"},"kernel_features":{"btf":true},"ring_buffer_bytes":4194304,"degraded":[]}
"#
    );
}

#[test]
fn json_verdicts() {
    assert_eq!(
        json_line(&Record::Verdict(&netfilter_drop())),
        r#"{"event":"verdict","ts":"2026-11-30T00:00:02.123456Z","side":"server","outcome":"failed","reason":"netfilter_drop","kernel_reason":"NETFILTER_DROP","errno":null,"saddr":"10.77.0.2","sport":3306,"daddr":"10.77.0.1","dport":40000,"netns":4026532246,"pid":null,"comm":null,"container":null,"duration_ms":2040.5,"syn_retransmits":2,"detail":{"drops":[{"kernel_reason":"NETFILTER_DROP","direction":"in","tcp_flags":"SYN","count":3,"location":"nft_do_chain+0x3e8","hook":"INPUT"}],"hook":"INPUT","rule":{"family":"ip","table":"filter","chain":"INPUT","handle":2,"text":"tcp dport 3306 drop","backend":"nftables","packets":3},"dropped":3}}
"#
    );
    // A fact the kernel could not read (here the namespace) is null, never 0.
    assert_eq!(
        json_line(&Record::Verdict(&syn_timeout())),
        r#"{"event":"verdict","ts":"2026-11-30T00:00:02.123456Z","side":"client","outcome":"failed","reason":"syn_timeout","kernel_reason":"ETIMEDOUT","errno":"ETIMEDOUT","saddr":"10.77.0.1","sport":40000,"daddr":"10.77.0.2","dport":3306,"netns":null,"pid":7211,"comm":"ct-client","container":null,"duration_ms":3064.0,"syn_retransmits":2,"detail":{"closed_from":"TCP_SYN_SENT","cause":"kernel_gave_up","after_ms":3064.0}}
"#
    );
    assert_eq!(
        json_line(&Record::Verdict(&stalled())),
        r#"{"event":"verdict","ts":"2026-11-30T00:00:02.123456Z","side":"client","outcome":"stalled","reason":"stalled_no_greeting","kernel_reason":"established, nothing received","errno":null,"saddr":"10.77.0.1","sport":40000,"daddr":"10.77.0.2","dport":3306,"netns":4026532246,"pid":7221,"comm":"ct-client","container":null,"duration_ms":0.074,"syn_retransmits":0,"detail":{"waited_ms":2030.5}}
"#
    );
}

#[test]
fn the_node_follows_the_time_on_every_record() {
    let node_line = |record: &Record<'_>| json_line_on(record, Some("worker-3"));
    let lost = Lost {
        count: 9,
        new: 4,
        ts_ns: 4 * SEC,
    };
    assert_eq!(
        node_line(&Record::Lost(lost)),
        r#"{"event":"lost","ts":"2026-11-30T00:00:04.000000Z","node":"worker-3","count":9,"new":4}
"#
    );
    let v = netfilter_drop();
    let r = ready();
    let d = drop_record();
    for record in [Record::Ready(&r), Record::Verdict(&v), Record::Drop(&d)] {
        let line = node_line(&record);
        let plain = json_line(&record);
        let ts_end = plain.find(r#"Z","#).expect("ts") + 3;
        assert_eq!(
            line,
            format!(
                "{}\"node\":\"worker-3\",{}",
                &plain[..ts_end],
                &plain[ts_end..]
            ),
            "{line}"
        );
    }
}

#[test]
fn json_drop_lost_and_summary() {
    assert_eq!(
        json_line(&Record::Drop(&drop_record())),
        r#"{"event":"drop","ts":"2026-11-30T00:00:03.000000Z","direction":"in","kernel_reason":"TCP_ABORT_ON_DATA","location":"tcp_v4_do_rcv+0x7c","tcp_flags":"ACK|PSH","saddr":"10.77.0.1","sport":40000,"daddr":"10.77.0.2","dport":3306,"netns":4026532177,"pid":null,"comm":null,"container":null}
"#
    );
    let lost = Lost {
        count: 9,
        new: 4,
        ts_ns: 4 * SEC,
    };
    assert_eq!(
        json_line(&Record::Lost(lost)),
        r#"{"event":"lost","ts":"2026-11-30T00:00:04.000000Z","count":9,"new":4}
"#
    );
    let mut s = Summary::default();
    s.count(&netfilter_drop());
    s.count(&syn_timeout());
    s.events = 33;
    s.established = (1, 0);
    s.connect_latency(74_000);
    s.drops_by_reason
        .insert(DropReason::new("NETFILTER_DROP"), 3);
    let f = Final {
        ts_ns: 5 * SEC,
        summary: &s,
        lost_events: 0,
        decode_errors: 0,
        duration_ms: 22_700.0,
        tracked_at_exit: 0,
        tcp_counters: BTreeMap::from([(4_026_532_246, BTreeMap::from([("SyncookiesSent", 1)]))]),
        read_failures: BTreeMap::from([("kfree_skb", 2)]),
        program_misses: BTreeMap::from([("tp_btf_inet_sock_set_state", 3)]),
        all_ports: false,
        programs: None,
    };
    assert_eq!(
        json_line(&Record::Summary(f)),
        r#"{"event":"summary","ts":"2026-11-30T00:00:05.000000Z","duration_ms":22700.0,"verdicts":2,"by_outcome":{"failed":2},"by_reason":{"syn_timeout":1,"netfilter_drop":1},"expired_unresolved":0,"open_at_exit":0,"lost_events":0,"kernel_events":33,"established":{"client":1,"server":0},"decode_errors":0,"unmatched_errors":0,"stray_resets":0,"drops_by_reason":{"NETFILTER_DROP":3},"drop_records_suppressed":0,"attempt_verdicts_suppressed":0,"listeners":{},"top_failing_peers":[{"addr":"10.77.0.1","count":1},{"addr":"10.77.0.2","count":1}],"top_failing_ports":[{"port":3306,"count":2}],"connect_latency_ms":{"count":1,"p50":0.079,"p90":0.079,"p99":0.079,"max":0.079},"tcp_counters":{"4026532246":{"SyncookiesSent":1}},"read_failures":{"kfree_skb":2},"program_misses":{"tp_btf_inet_sock_set_state":3},"forwarded_drops":0,"cookie_mismatches":[]}
"#
    );
}

#[test]
fn every_json_line_validates_against_the_generated_schema() {
    let schema = serde_json::to_value(super::record::schema()).expect("schema");
    let validator = jsonschema::validator_for(&schema).expect("compile the schema");
    let s = Summary::default();
    let f = final_of(&s, 0.0);
    let (r, v1, v2, v3, d) = (
        ready(),
        netfilter_drop(),
        syn_timeout(),
        stalled(),
        drop_record(),
    );
    let (v4, d2) = in_containers();
    let lost = Lost {
        count: 1,
        new: 1,
        ts_ns: 0,
    };
    for record in [
        Record::Ready(&r),
        Record::Verdict(&v1),
        Record::Verdict(&v2),
        Record::Verdict(&v3),
        Record::Drop(&d),
        Record::Verdict(&v4),
        Record::Drop(&d2),
        Record::Lost(lost),
        Record::Summary(f),
    ] {
        let line: serde_json::Value = serde_json::from_str(&json_line(&record)).expect("JSON");
        let errors: Vec<String> = validator
            .iter_errors(&line)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{line}: {errors:?}");
    }
}

#[test]
fn containers_in_json_and_in_human_lines() {
    let (v, d) = in_containers();
    let line = json_line(&Record::Verdict(&v));
    assert!(
        line.contains(r#""comm":null,"container":{"runtime":"podman","id":"3f0404f3800cb9ffbb56184f5c1f9afb05adca37d56b64d52078fb728fa03072","name":"mysqld","image":{"name":"localhost/debian:bookworm-min"},"k8s":null,"via":"netns"},"duration_ms""#),
        "{line}"
    );
    let line = json_line(&Record::Drop(&d));
    assert!(
        line.ends_with(r#""container":{"runtime":"containerd","id":"ct-db-0","name":"mysql","image":null,"k8s":{"namespace":"shop","pod":"db-0","container":"mysql"},"via":"netns"}}
"#),
        "{line}"
    );
    let c = clock();
    let compact = Human::new(false, false, true).text(&Record::Verdict(&v), &c);
    assert!(
        compact.starts_with("00:00:02.123 server netfilter_drop      10.77.0.1:40000 -> 10.77.0.2:3306 podman:mysqld INPUT"),
        "{compact}"
    );
    let drop = Human::new(false, false, true).text(&Record::Drop(&d), &c);
    assert!(drop.contains(" k8s:shop/db-0/mysql "), "{drop}");
    let wide = Human::new(true, false, true).text(&Record::Verdict(&v), &c);
    assert!(wide.contains(" netns:4026532246 podman:mysqld ("), "{wide}");
}

#[test]
fn human_compact_verdicts_fit_120_columns_with_the_advice_once() {
    let mut h = Human::new(false, false, true);
    let c = clock();
    let first = h.text(&Record::Verdict(&netfilter_drop()), &c);
    assert_eq!(
        first,
        "00:00:02.123 server netfilter_drop      10.77.0.1:40000 -> 10.77.0.2:3306 netns:4026532246 INPUT `tcp dport 3306 drop`\n  what to do: INPUT rule `tcp dport 3306 drop` drops it; to accept this peer: `iptables -I INPUT -p tcp -s 10.77.0.1\n              --dport 3306 -j ACCEPT`"
    );
    // The same reason again: one line, no advice.
    let again = h.text(&Record::Verdict(&netfilter_drop()), &c);
    assert_eq!(again, first.lines().next().unwrap());
    assert_eq!(
        h.text(&Record::Verdict(&syn_timeout()), &c)
            .lines()
            .next()
            .unwrap(),
        "00:00:02.123 client syn_timeout         10.77.0.1:40000 -> 10.77.0.2:3306 ct-client[7211] ETIMEDOUT in 3064 ms, 3 SYNs"
    );
    assert_eq!(
        h.text(&Record::Verdict(&stalled()), &c)
            .lines()
            .next()
            .unwrap(),
        "00:00:02.123 client stalled_no_greeting 10.77.0.1:40000 -> 10.77.0.2:3306 ct-client[7221] stuck 2030 ms"
    );
    for v in [netfilter_drop(), syn_timeout(), stalled()] {
        for line in Human::new(false, false, true)
            .text(&Record::Verdict(&v), &c)
            .lines()
        {
            assert!(line.chars().count() <= 120, "{line}");
        }
    }
}

#[test]
fn compact_lines_are_cut_on_a_terminal_and_whole_in_a_pipe_or_a_file() {
    let c = clock();
    let mut v = netfilter_drop();
    v.saddr = Some("2001:db8:aaaa:bbbb:cccc:dddd:eeee:1".parse().unwrap());
    v.daddr = "2001:db8:aaaa:bbbb:cccc:dddd:eeee:2".parse().unwrap();
    let line = |cut: bool| {
        let text = Human::new(false, false, cut).text(&Record::Verdict(&v), &c);
        text.lines().next().unwrap().to_owned()
    };
    let (terminal, pipe) = (line(true), line(false));
    assert_eq!(terminal.chars().count(), 120, "{terminal}");
    assert!(terminal.ends_with('…'), "{terminal}");
    assert!(pipe.chars().count() > 120, "{pipe}");
    assert!(
        pipe.ends_with("netns:4026532246 INPUT `tcp dport 3306 drop`"),
        "{pipe}"
    );
}

#[test]
fn human_wide_verdict_drop_and_lost() {
    let c = clock();
    let mut h = Human::new(true, false, true);
    assert_eq!(
        h.text(&Record::Verdict(&netfilter_drop()), &c),
        "2026-11-30T00:00:02.123456Z server netfilter_drop 10.77.0.1:40000 -> 10.77.0.2:3306 - netns:4026532246 (NETFILTER_DROP, 2040.5 ms, 2 SYN retransmits) [hook INPUT, rule ip filter INPUT: tcp dport 3306 drop] — INPUT rule `tcp dport 3306 drop` drops it; to accept this peer: `iptables -I INPUT -p tcp -s 10.77.0.1 --dport 3306 -j ACCEPT`"
    );
    assert_eq!(
        Human::new(false, false, true).text(&Record::Drop(&drop_record()), &c),
        "00:00:03.000 drop   TCP_ABORT_ON_DATA   10.77.0.1:40000 <- 10.77.0.2:3306 netns:4026532177 ACK|PSH at tcp_v4_do_rcv+0x7c"
    );
    let lost = Lost {
        count: 9,
        new: 4,
        ts_ns: 4 * SEC,
    };
    assert_eq!(
        h.text(&Record::Lost(lost), &c),
        "2026-11-30T00:00:04.000000Z LOST 4 kernel events (total 9): verdicts may be missing; raise --ring-buffer-bytes"
    );
    assert_eq!(
        Human::new(false, false, true).text(&Record::Ready(&ready()), &c),
        "conntrace ready: tracing TCP 3306 on kernel 6.18.44 (1 program); times are UTC"
    );
}

#[test]
fn human_summary_table() {
    let mut s = Summary::default();
    s.count(&netfilter_drop());
    s.count(&syn_timeout());
    s.events = 33;
    let mut f = final_of(&s, 22_700.0);
    f.read_failures = BTreeMap::from([("kfree_skb", 2)]);
    f.program_misses = BTreeMap::from([("tp_btf_inet_sock_set_state", 3)]);
    assert_eq!(
        Human::new(false, false, true).text(&Record::Summary(f), &clock()),
        "summary: 2 verdicts, 33 kernel events, 0 lost, 0 expired unresolved, in 22.7 s
  reason                    count  what to do
  syn_timeout                   1  SYNs to 10.77.0.2:3306 went unanswered: run conntrace on that host; a firewall drop there shows as netfilter_drop with its rule
  netfilter_drop                1  INPUT rule `tcp dport 3306 drop` drops it; to accept this peer: `iptables -I INPUT -p tcp -s 10.77.0.1 --dport 3306 -j ACCEPT`
  top failing peers: 10.77.0.1 (1), 10.77.0.2 (1)
  top failing ports: 3306 (2)
  kernel reads that failed (facts left absent): kfree_skb (2)
  runs the kernel skipped (the program already ran on that CPU; their events missed): tp_btf_inet_sock_set_state (3)"
    );
}

#[test]
fn each_peer_or_rule_gets_its_own_advice_once_and_the_summary_lists_them() {
    let c = clock();
    let (a, mut b) = (netfilter_drop(), netfilter_drop());
    b.daddr = "10.77.0.9".parse().unwrap();
    let mut h = Human::new(false, false, true);
    let advice_of = |h: &mut Human, v: &Verdict| {
        let text = h.text(&Record::Verdict(v), &c);
        text.split_once("\n  what to do: ")
            .map(|(_, a)| a.replace("\n              ", " "))
    };
    let first = advice_of(&mut h, &a).expect("the first verdict's advice");
    assert!(first.contains("-s 10.77.0.1 "), "{first}");
    assert_eq!(advice_of(&mut h, &a), None, "the same advice once");
    let other = advice_of(&mut h, &b).expect("another peer's own advice");
    assert!(other.contains("-s 10.77.0.9 "), "{other}");
    let mut s = Summary::default();
    for v in [&a, &a, &b] {
        s.count(v);
    }
    let f = final_of(&s, 1_000.0);
    let table = h.text(&Record::Summary(f), &c);
    let rows: Vec<&str> = table.lines().skip(2).take(2).collect();
    assert_eq!(
        rows,
        [
            "  netfilter_drop                3  INPUT rule `tcp dport 3306 drop` drops it; to accept this peer: `iptables -I INPUT -p tcp -s 10.77.0.1 --dport 3306 -j ACCEPT`",
            "                                   INPUT rule `tcp dport 3306 drop` drops it; to accept this peer: `iptables -I INPUT -p tcp -s 10.77.0.9 --dport 3306 -j ACCEPT`",
        ],
        "{table}"
    );
}

#[test]
fn cookies_that_disagree_with_the_namespace_counter_are_flagged() {
    let mut s = Summary::default();
    s.cookies_by_netns.insert(7, 20);
    s.cookies_by_netns.insert(8, 3);
    let mut f = final_of(&s, 0.0);
    // netns 7 counted none (a forwarding host's SYN-ACKs taken for cookies); netns 8 counted
    // more than traced (untraced ports): fine with --port, not without.
    f.tcp_counters = BTreeMap::from([(8, BTreeMap::from([("SyncookiesSent", 5)]))]);
    let nets: Vec<(u32, u64, u64)> = f
        .cookie_mismatches()
        .iter()
        .map(|m| (m.netns, m.traced, m.counter))
        .collect();
    assert_eq!(nets, [(7, 20, 0)]);
    f.all_ports = true;
    assert_eq!(f.cookie_mismatches().len(), 2);
}

/// The summary with `--bpf-stats`: the programs' runs and run time, in JSON and as a table.
#[test]
fn summary_with_bpf_stats_lists_the_programs_costs() {
    use crate::kernel::stats::ProgramCost;
    let s = Summary::default();
    let mut f = Final {
        ts_ns: 5 * SEC,
        summary: &s,
        lost_events: 0,
        decode_errors: 0,
        duration_ms: 1_000.0,
        tracked_at_exit: 0,
        tcp_counters: BTreeMap::new(),
        read_failures: BTreeMap::new(),
        program_misses: BTreeMap::new(),
        all_ports: false,
        programs: Some(vec![
            ProgramCost {
                program: "inet_sock_set_state",
                runs: 800_000,
                run_ns: 196_000_000,
            },
            ProgramCost {
                program: "kfree_skb",
                runs: 0,
                run_ns: 0,
            },
        ]),
    };
    let line = json_line(&Record::Summary(f.clone()));
    assert_eq!(
        line,
        r#"{"event":"summary","ts":"2026-11-30T00:00:05.000000Z","duration_ms":1000.0,"verdicts":0,"by_outcome":{},"by_reason":{},"expired_unresolved":0,"open_at_exit":0,"lost_events":0,"kernel_events":0,"established":{"client":0,"server":0},"decode_errors":0,"unmatched_errors":0,"stray_resets":0,"drops_by_reason":{},"drop_records_suppressed":0,"attempt_verdicts_suppressed":0,"listeners":{},"top_failing_peers":[],"top_failing_ports":[],"connect_latency_ms":null,"tcp_counters":{},"read_failures":{},"program_misses":{},"forwarded_drops":0,"cookie_mismatches":[],"programs":[{"program":"inet_sock_set_state","runs":800000,"run_ns":196000000},{"program":"kfree_skb","runs":0,"run_ns":0}]}
"#
    );
    let schema = serde_json::to_value(super::record::schema()).expect("schema");
    let value: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    assert!(jsonschema::is_valid(&schema, &value), "{line}");
    assert_eq!(
        Human::new(false, false, true).text(&Record::Summary(f.clone()), &clock()),
        "summary: 0 verdicts, 0 kernel events, 0 lost, 0 expired unresolved, in 1.0 s
  eBPF program (--bpf-stats)            runs   ns/run  run time ms
  inet_sock_set_state                  800000      245      196.000
  kfree_skb                                 0        0        0.000"
    );
    // Without --bpf-stats the member is absent, not null.
    f.programs = None;
    assert!(!json_line(&Record::Summary(f)).contains("\"programs\""));
}
