use serde_json::json;
use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::UNIX_EPOCH,
};

use super::*;

// A real run: the server's and the client's verdicts about one connection.
const COOKIE_SERVER: &str = r#"{"event":"verdict","ts":"2026-11-21T20:26:12.365624Z","side":"server","outcome":"failed","reason":"syncookie_ack_lost","kernel_reason":"SYN cookie sent, no socket created","errno":null,"saddr":"10.99.0.2","sport":3306,"daddr":"10.99.0.1","dport":38248,"netns":4026532246,"pid":null,"comm":null,"duration_ms":0.02,"syn_retransmits":0,"detail":{"drops":[{"kernel_reason":"NETFILTER_DROP","direction":"in","tcp_flags":"ACK","count":1,"location":"nft_do_chain+0x3e8","hook":"INPUT"}],"hook":"INPUT","dropped":1,"cookies_sent":1,"rule":{"family":"ip","table":"filter","chain":"INPUT","handle":2,"text":"tcp flags ack / fin,syn,rst,psh,ack,urg tcp dport 3306 drop","packets":1}}}"#;
const COOKIE_CLIENT: [&str; 2] = [
    r#"{"event":"verdict","ts":"2026-11-21T20:26:15.415122Z","side":"client","outcome":"stalled","reason":"stalled_no_greeting","kernel_reason":"established, nothing received","errno":null,"saddr":"10.99.0.1","sport":38248,"daddr":"10.99.0.2","dport":3306,"netns":4026532177,"pid":30324,"comm":"ct-client","duration_ms":0.089,"syn_retransmits":0,"detail":{"waited_ms":3049.506}}"#,
    r#"{"event":"verdict","ts":"2026-11-21T20:26:18.418286Z","side":"client","outcome":"failed","reason":"stalled_no_greeting","kernel_reason":"closed from TCP_FIN_WAIT2","errno":null,"saddr":"10.99.0.1","sport":38248,"daddr":"10.99.0.2","dport":3306,"netns":4026532177,"pid":30324,"comm":"ct-client","duration_ms":0.089,"syn_retransmits":0,"detail":{"stuck_ms":6052.669,"closed_from":"TCP_FIN_WAIT2","ended_by":"orderly close"}}"#,
];
const READY: &str = r#"{"event":"ready","ts":"2026-11-21T20:26:10.000001Z","version":"0.1.0","ports":[3306],"programs":[],"unavailable":[],"kernel":"6.18.44","attach_paths":{},"kernel_features":{"btf":true,"kprobes":false},"ring_buffer_bytes":4194304,"degraded":[]}"#;
const SUMMARY: &str = r#"{"event":"summary","ts":"2026-11-21T20:26:20.000001Z","duration_ms":10000.0,"verdicts":1,"by_outcome":{"failed":1},"by_reason":{"syncookie_ack_lost":1}}"#;
const C: &str = "10.0.0.1:40000";
const S: &str = "10.0.0.2:3306";

/// A verdict `secs` after 2026-11-21T20:00:00Z. `what` is "SIDE REASON KERNEL_REASON", `own`
/// the reporting host's end (`-`: not known), `peer` the other end.
fn v(what: &str, secs: f64, own: &str, peer: &str, detail: &str) -> String {
    let mut what = what.splitn(3, ' ');
    let [side, reason, kernel] = [(); 3].map(|()| what.next().unwrap_or_default());
    let at = UNIX_EPOCH + Duration::from_secs(1_795_291_200) + Duration::from_secs_f64(secs);
    let ts = humantime::format_rfc3339_micros(at);
    let end = |a: &str| match a.rsplit_once(':') {
        Some((ip, port)) => (
            format!("{:?}", ip.trim_matches(['[', ']'])),
            port.to_owned(),
        ),
        None => ("null".to_owned(), "null".to_owned()),
    };
    let ((saddr, sport), (daddr, dport)) = (end(own), end(peer));
    let outcome = if reason == "established" {
        reason
    } else {
        "failed"
    };
    format!(
        r#"{{"event":"verdict","ts":"{ts}","side":"{side}","outcome":"{outcome}","reason":"{reason}","kernel_reason":"{kernel}","errno":null,"saddr":{saddr},"sport":{sport},"daddr":{daddr},"dport":{dport},"netns":4026531833,"pid":null,"comm":null,"duration_ms":0.05,"syn_retransmits":0,"detail":{detail}}}"#
    )
}

/// A file in the temporary directory, removed when dropped.
struct Temp(PathBuf);

impl Drop for Temp {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            eprintln!("remove {}: {e}", self.0.display());
        }
    }
}

fn file(name: &str, lines: &[&str]) -> Temp {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let name = format!("conntrace-merge-{}-{n}-{name}", std::process::id());
    let path = std::env::temp_dir().join(name);
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).expect("write the temporary file");
    Temp(path)
}

fn merge(files: &[&Temp], skew_secs: u64, json: bool) -> Result<Vec<String>, MergeError> {
    let paths: Vec<PathBuf> = files.iter().map(|f| f.0.clone()).collect();
    let mut out = Vec::new();
    run(&paths, Duration::from_secs(skew_secs), json, &mut out)?;
    Ok(String::from_utf8(out)
        .expect("UTF-8")
        .lines()
        .map(str::to_owned)
        .collect())
}

fn message(result: Result<Vec<String>, MergeError>) -> String {
    format!("{:#}", anyhow::Error::from(result.expect_err("an error")))
}

#[test]
fn cookie_story_joins_two_files() {
    let server = file("server.jsonl", &[READY, COOKIE_SERVER, SUMMARY]);
    let client = file(
        "client.jsonl",
        &[READY, COOKIE_CLIENT[0], COOKIE_CLIENT[1], SUMMARY],
    );
    let lines = merge(&[&client, &server], 2, false).expect("merge");
    assert_eq!(
        lines,
        [
            "2026-11-21T20:26:12Z 10.99.0.1:38248 -> 10.99.0.2:3306 client stalled_no_greeting + server syncookie_ack_lost: the server never created this connection: it answered with a SYN cookie and the client's final ACK was dropped by INPUT rule `tcp flags ack / fin,syn,rst,psh,ack,urg tcp dport 3306 drop` (ip filter INPUT); the client waited 6.1 s"
        ]
    );
}

#[test]
fn one_sided_verdicts_pass_through() {
    let timeout = v("client syn_timeout ETIMEDOUT", 0.0, C, S, "{}");
    let no_route = v(
        "client no_route ENETUNREACH",
        1.0,
        "-",
        "10.0.0.3:3306",
        "{}",
    );
    let lines = merge(&[&file("client.jsonl", &[&timeout, &no_route])], 2, false).expect("merge");
    assert_eq!(
        lines,
        [
            "2026-11-21T20:00:00Z 10.0.0.1:40000 -> 10.0.0.2:3306 client only: syn_timeout (ETIMEDOUT)",
            "2026-11-21T20:00:01Z ? -> 10.0.0.3:3306 client only: no_route (ENETUNREACH)",
        ]
    );
}

#[test]
fn errors_name_file_and_line() {
    let bad = file("client.jsonl", &[READY, COOKIE_CLIENT[0], "oops", SUMMARY]);
    let err = message(merge(&[&bad], 2, false));
    let expected = "client.jsonl:3: not a JSON object: expected value at line 1 column 1";
    assert!(err.ends_with(expected), "{err}");
    let no_event = file("server.jsonl", &[r#"{"ts":"2026-11-21T20:00:00.000001Z"}"#]);
    let err = message(merge(&[&no_event], 2, false));
    assert!(err.ends_with("server.jsonl:1: no `event` string"), "{err}");
    let bad_ts = v("client syn_timeout ETIMEDOUT", 0.0, C, S, "{}").replace("20:00:00.", "20:0.");
    let err = message(merge(&[&file("c.jsonl", &[&bad_ts])], 2, false));
    assert!(err.contains("c.jsonl:1: not a valid verdict: `ts` \"2026-11-21T20:0.000000Z\""));

    let missing = std::env::temp_dir().join("conntrace-merge-no-such-file.jsonl");
    let err = run(
        std::slice::from_ref(&missing),
        Duration::from_secs(2),
        false,
        &mut Vec::new(),
    );
    let err = err.expect_err("no such file");
    assert!(matches!(&err, MergeError::Open(_, e) if e.kind() == io::ErrorKind::NotFound));
    let expected = format!("cannot open {}: No such file", missing.display());
    assert!(format!("{:#}", anyhow::Error::from(err)).starts_with(&expected));
}

#[test]
fn same_tuple_two_minutes_apart_stays_separate() {
    let drop = r#"{"hook":"INPUT","dropped":3,"rule":{"family":"ip","table":"filter","chain":"INPUT","handle":4,"text":"tcp dport 3306 drop","packets":3}}"#;
    let client = file(
        "client.jsonl",
        &[
            &v("client syn_timeout ETIMEDOUT", 7.0, C, S, "{}"),
            &v("client syn_timeout ETIMEDOUT", 127.0, C, S, "{}"),
        ],
    );
    let server = file(
        "server.jsonl",
        &[
            &v("server netfilter_drop NETFILTER_DROP", 6.0, S, C, drop),
            &v("server netfilter_drop NETFILTER_DROP", 126.0, S, C, drop),
        ],
    );
    let lines = merge(&[&client, &server], 2, false).expect("merge");
    let story = "client syn_timeout + server netfilter_drop: the server's firewall dropped the SYNs at INPUT: rule `tcp dport 3306 drop` (ip filter INPUT)";
    assert_eq!(
        lines,
        [
            format!("2026-11-21T20:00:06Z {C} -> {S} {story}"),
            format!("2026-11-21T20:02:06Z {C} -> {S} {story}"),
        ]
    );
}

#[test]
fn clock_skew_within_max_skew_joins_without_claiming_order() {
    let (c, s) = ("[fd00::1]:40000", "[fd00::2]:443");
    let client = file(
        "client.jsonl",
        &[&v("client reset_by_peer ECONNRESET", 10.0, c, s, "{}")],
    );
    // The server's clock is 1.5 s behind: its verdict comes "first", within the skew.
    let server = file(
        "server.jsonl",
        &[&v("server timeout ETIMEDOUT", 8.5, s, c, "{}")],
    );
    let lines = merge(&[&client, &server], 2, false).expect("merge");
    let expected = format!(
        "2026-11-21T20:00:08Z {c} -> {s} client reset_by_peer + server timeout: client: reset_by_peer (ECONNRESET); server: timeout (ETIMEDOUT)"
    );
    assert_eq!(lines, [expected]);
    let lines = merge(&[&client, &server], 1, false).expect("merge");
    assert!(
        lines[0].ends_with("; the server reported 1.5 s before the client"),
        "{lines:?}"
    );
    // 61 s apart: one connection when the clocks may be 2 s apart, two when they agree.
    let late = file(
        "server.jsonl",
        &[&v("server timeout ETIMEDOUT", 71.0, s, c, "{}")],
    );
    assert_eq!(merge(&[&client, &late], 2, false).expect("merge").len(), 1);
    assert_eq!(merge(&[&client, &late], 0, false).expect("merge").len(), 2);
}

#[test]
fn json_output_has_documented_keys() {
    let client = file("client.jsonl", &[COOKIE_CLIENT[0], COOKIE_CLIENT[1]]);
    let server = file("server.jsonl", &[COOKIE_SERVER]);
    let other = file(
        "other.jsonl",
        &[&v("client syn_timeout ETIMEDOUT", 1800.0, C, S, "{}")],
    );
    let lines = merge(&[&client, &other, &server], 2, true).expect("merge");
    let records: Vec<Map<String, Value>> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("a JSON object"))
        .collect();
    assert_eq!(records.len(), 2);
    let keys = [
        "event",
        "ts",
        "client",
        "server",
        "reasons",
        "story",
        "one_sided",
        "verdicts",
    ];
    let schema = serde_json::to_value(crate::output::record::schema()).expect("schema");
    let validator = jsonschema::validator_for(&schema).expect("compile the schema");
    for r in &records {
        assert_eq!(r.keys().map(String::as_str).collect::<Vec<_>>(), keys);
        assert_eq!(r["event"], "merged");
        let errors: Vec<String> = validator
            .iter_errors(&Value::Object(r.clone()))
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{r:?}: {errors:?}");
    }
    let joined = &records[0];
    assert_eq!(joined["ts"], "2026-11-21T20:26:12.365624Z");
    assert_eq!(joined["client"], json!({"addr": "10.99.0.1:38248"}));
    assert_eq!(joined["server"], json!({"addr": "10.99.0.2:3306"}));
    let reasons = json!({"client": ["stalled_no_greeting"], "server": ["syncookie_ack_lost"]});
    assert_eq!(joined["reasons"], reasons);
    assert_eq!(joined["one_sided"], Value::Null);
    assert!(
        joined["story"]
            .as_str()
            .is_some_and(|s| s.starts_with("the server never created"))
    );
    let verdicts = joined["verdicts"].as_array().expect("an array");
    let files: Vec<_> = verdicts
        .iter()
        .map(|v| (v["side"].clone(), v["file"].clone()))
        .collect();
    let (c, s) = (
        client.0.display().to_string(),
        server.0.display().to_string(),
    );
    assert_eq!(
        files,
        [("server", &s), ("client", &c), ("client", &c)].map(|(a, b)| (json!(a), json!(b)))
    );
    assert_eq!(verdicts[2]["detail"]["stuck_ms"], 6052.669);
    assert_eq!(records[1]["one_sided"], "client");
    assert_eq!(
        records[1]["reasons"],
        json!({"client": ["syn_timeout"], "server": []})
    );
}

#[test]
fn rules_tell_each_pair() {
    let bound =
        r#"{"rst_sent":true,"listeners":[{"address":"127.0.0.1:3306","pid":7,"comm":"mysqld"}]}"#;
    let reject = r#"{"hook":"INPUT","reject_with":"icmp-port-unreachable","rule":{"family":"inet","table":"fw","chain":"in","handle":9,"text":"tcp dport 3306 reject","packets":1}}"#;
    let queue = r#"{"accept_queue":17,"backlog":16,"listener":{"address":"0.0.0.0:3306","pid":7,"comm":"mysqld"}}"#;
    #[rustfmt::skip]
    let cases = [
        ("refused_no_listener", "refused_bound_elsewhere", bound, "nothing listens on 10.0.0.2:3306; the service listens on 127.0.0.1:3306"),
        ("refused_no_listener", "refused_no_listener", "{}", ": nothing listens on 10.0.0.2:3306"),
        ("icmp_unreachable", "netfilter_reject", reject, "the server's REJECT rule answered (icmp-port-unreachable): rule `tcp dport 3306 reject` (inet fw in)"),
        ("stalled_no_greeting", "listen_overflow", queue, "the server's accept queue was full (17/16) when the final ACK came: it has no socket for this connection"),
        ("stalled_no_response", "not_accepted", queue, ": the server's application did not accept() the connection (mysqld on the server)"),
        ("stalled_no_greeting", "syncookie_ack_lost", "{}", "it answered with a SYN cookie and the client's final ACK was lost"),
        ("established", "established", "{}", ": established"),
        ("syn_timeout", "conntrack_table_full", r#"{"conntrack":{"count":262144,"max":262144}}"#, "the server's conntrack table was full (262144 of 262144 entries): it dropped the SYNs before any rule"),
        ("syn_timeout", "rp_filter_drop", r#"{"rp_filter":{"arrived_on":"s0","route_back_via":"s1"}}"#, "the server's reverse-path filter dropped the SYNs: they came in on s0 while the route back to the client leaves by s1"),
        ("stalled_no_response", "pmtu_blackhole", r#"{"path_answer":{"mtu":1400,"dropped":{"hook":"INPUT"}}}"#, "a path-MTU black hole: the server's full-size segments never arrived; a hop announced MTU 1400, and the server dropped that answer at INPUT"),
        ("zero_window", "zero_window", r#"{"listener":{"comm":"mysqld"}}"#, "the server's application stopped reading (mysqld on the server): the client's data waits in its send queue"),
    ];
    for (client_reason, server_reason, detail, story) in cases {
        let client = file(
            "c.jsonl",
            &[&v(&format!("client {client_reason} x"), 0.0, C, S, "{}")],
        );
        let server = v(&format!("server {server_reason} y"), 0.0, S, C, detail);
        let lines = merge(&[&client, &file("s.jsonl", &[&server])], 2, false).expect("merge");
        assert!(lines.len() == 1 && lines[0].ends_with(story), "{lines:?}");
    }
}

#[test]
fn write_error_keeps_the_io_error() {
    struct Closed;
    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let server = file("server.jsonl", &[COOKIE_SERVER]);
    let files = std::slice::from_ref(&server.0);
    let err = run(files, Duration::from_secs(2), false, &mut Closed).expect_err("closed");
    let err = anyhow::Error::from(err);
    let io = err.chain().find_map(|e| e.downcast_ref::<io::Error>());
    assert_eq!(io.map(io::Error::kind), Some(io::ErrorKind::BrokenPipe));
}

/// The fuzz corpus (`fuzz/corpus/merge_reader`, grown by `cargo fuzz run merge_reader`)
/// replayed on every test run: each input merges or is an error, never a panic.
#[test]
fn merge_corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/merge_reader");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/merge_reader") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("read input");
        for json in [false, true] {
            std::hint::black_box(super::merge_one(
                "corpus",
                &bytes,
                Duration::from_secs(2),
                json,
            ))
            .ok();
        }
        n += 1;
    }
    assert!(n > 10, "the corpus is committed: {n} inputs");
    let tour = std::fs::read(dir.join("seed-tour.jsonl")).expect("seed");
    let lines = super::merge_one("tour", &tour, Duration::from_secs(2), true).expect("merges");
    assert!(!lines.is_empty());
}

#[test]
fn merged_verdicts_keep_their_containers() {
    let container = r#""container":{"runtime":"podman","id":"4c4d634e0f31a65bc5c6f2b3991ebd78df5cbd2cf0901b3667524fbaead6512b","name":"mysqld","image":{"name":"localhost/debian:bookworm-min"},"k8s":null,"via":"netns"}"#;
    let server = COOKIE_SERVER.replace(r#""comm":null"#, &format!(r#""comm":null,{container}"#));
    let client = COOKIE_CLIENT.map(|l| {
        l.replace(
            r#""comm":"ct-client""#,
            r#""comm":"ct-client","container":null"#,
        )
    });
    let lines = merge(
        &[
            &file("server.jsonl", &[&server]),
            &file("client.jsonl", &[&client[0], &client[1]]),
        ],
        2,
        true,
    )
    .expect("merge");
    let merged: Value = serde_json::from_str(&lines[0]).expect("JSON");
    let verdicts = merged["verdicts"].as_array().expect("verdicts");
    assert_eq!(verdicts[0]["side"], "server");
    assert_eq!(verdicts[0]["container"]["name"], "mysqld");
    assert_eq!(verdicts[1]["container"], Value::Null);
}
