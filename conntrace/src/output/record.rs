//! The records conntrace writes, as typed structs: what the JSON Lines format is (serialized
//! straight to the writer by serde) and where its JSON Schema comes from (`conntrace schema`,
//! docs/events.schema.json). docs/events.md has the prose.

use std::{collections::BTreeMap, net::IpAddr};

use schemars::JsonSchema;
use serde::Serialize;

use super::Clock;
use crate::{
    engine::{
        facts::DropReason,
        verdict::{
            DropRecord, ListenerCounts, Outcome, Reason, Summary, Verdict, summary::KernelKept,
        },
    },
    kernel::{ActiveProgram, Unavailable, attach::Follow, stats::ProgramCost},
};

/// An RFC 3339 time, UTC, exactly six fractional digits (microseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Timestamp(pub String);

impl JsonSchema for Timestamp {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Timestamp".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "RFC 3339 timestamp, UTC, exactly six fractional digits (microseconds).",
            "type": "string",
            "pattern": "^\\d{4}-\\d{2}-\\d{2}T\\d{2}:\\d{2}:\\d{2}\\.\\d{6}Z$"
        })
    }
}

/// What the running kernel offers beyond the programs attached.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct KernelFeatures {
    /// The kernel describes its types in BTF (`/sys/kernel/btf/vmlinux`).
    pub btf: bool,
}

/// Printed once every program is attached.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Ready {
    /// When the tracer became ready (CLOCK_MONOTONIC).
    #[serde(skip)]
    pub ts_ns: u64,
    pub version: &'static str,
    /// Traced ports; empty: every port.
    pub ports: Vec<u16>,
    /// How healthy connections are followed (`--follow`): `quiet` keeps them in the kernel,
    /// `streaming` sends every connection's events to userspace.
    pub follow: Follow,
    pub programs: Vec<ActiveProgram>,
    /// Attach rules that were tried and did not attach, or were left out, with the reason.
    pub unavailable: Vec<Unavailable>,
    /// The kernel release.
    pub kernel: String,
    /// Capability → attach path in use (`tracepoint`, `tp_btf`, `fentry`, `fexit`, `cgroup`);
    /// a capability another one's program serves has that program's (`connect_denied`:
    /// `fexit` where `fexit:inet_stream_connect` reads `connect()`'s result).
    pub attach_paths: BTreeMap<String, String>,
    pub kernel_features: KernelFeatures,
    pub ring_buffer_bytes: u32,
    /// Kernel structures BTF did not describe (facts that are therefore missing).
    pub degraded: Vec<&'static str>,
}

/// Kernel events the ring buffer had no room for, since the start.
#[derive(Debug, Clone, Copy, Serialize, JsonSchema)]
pub struct Lost {
    /// Lost since the start.
    pub count: u64,
    /// Lost since the previous `lost` record.
    pub new: u64,
    #[serde(skip)]
    pub ts_ns: u64,
}

/// Totals printed at exit, from the engine's summary and the run's own counts.
#[derive(Debug, Clone)]
pub struct Final<'a> {
    /// The end of the run (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub summary: &'a Summary,
    pub lost_events: u64,
    pub decode_errors: u64,
    pub duration_ms: f64,
    pub tracked_at_exit: usize,
    /// Growth over the run of the namespaces' TcpExt counters (cookies, overflows), by netns.
    pub tcp_counters: BTreeMap<u32, BTreeMap<&'static str, u64>>,
    /// Kernel reads that failed, by eBPF program (the facts they left absent).
    pub read_failures: BTreeMap<&'static str, u64>,
    /// Runs the kernel skipped, by eBPF program (the program already ran on that CPU).
    pub program_misses: BTreeMap<&'static str, u64>,
    /// Every port is traced (no `--port`): a namespace's cookie counter counts only traced
    /// cookies.
    pub all_ports: bool,
    /// What each program cost the kernel, with `--bpf-stats` only.
    pub programs: Option<Vec<ProgramCost>>,
}

/// A namespace whose SYN cookies seen on traced listeners disagree with its own
/// TcpExtSyncookiesSent growth.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct CookieMismatch {
    pub netns: u32,
    /// Cookies conntrace saw sent by listeners on traced ports.
    pub traced: u64,
    /// The namespace's SyncookiesSent growth over the run.
    pub counter: u64,
}

impl Final<'_> {
    /// Namespaces whose cookies disagree with their counter: more traced than counted (never
    /// right), or, with every port traced, any difference.
    pub fn cookie_mismatches(&self) -> Vec<CookieMismatch> {
        let counted = |netns: &u32| {
            self.tcp_counters
                .get(netns)
                .and_then(|c| c.get("SyncookiesSent"))
                .copied()
                .unwrap_or(0)
        };
        let mut netns: Vec<u32> = self.summary.cookies_by_netns.keys().copied().collect();
        if self.all_ports {
            netns.extend(self.tcp_counters.keys().filter(|n| counted(n) > 0));
        }
        netns.sort_unstable();
        netns.dedup();
        netns
            .into_iter()
            .filter_map(|n| {
                let traced = self.summary.cookies_by_netns.get(&n).copied().unwrap_or(0);
                let counter = counted(&n);
                let wrong = traced > counter || (self.all_ports && traced != counter);
                wrong.then_some(CookieMismatch {
                    netns: n,
                    traced,
                    counter,
                })
            })
            .collect()
    }
}

/// One record, before it is written.
#[derive(Debug, Clone)]
pub enum Record<'a> {
    Ready(&'a Ready),
    Verdict(&'a Verdict),
    Drop(&'a DropRecord),
    Lost(Lost),
    Summary(Final<'a>),
}

/// Handshakes completed on traced ports, per side.
#[derive(Debug, Clone, Copy, Serialize, JsonSchema)]
pub struct EstablishedCounts {
    pub client: u64,
    pub server: u64,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct PeerCount {
    #[schemars(schema_with = "crate::engine::verdict::ip_schema")]
    pub addr: IpAddr,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct PortCount {
    pub port: u16,
    pub count: u64,
}

/// Percentiles of the client handshake times, in milliseconds: each the upper bound of its
/// histogram bucket (8 buckets per power of two: at most 12.5 % above the true time).
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Latency {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// The `summary` record: totals over the run.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Totals<'a> {
    pub duration_ms: f64,
    /// Verdicts printed.
    pub verdicts: u64,
    pub by_outcome: &'a BTreeMap<Outcome, u64>,
    pub by_reason: &'a BTreeMap<Reason, u64>,
    /// Connections forgotten before any verdict (table full, or idle for an hour).
    pub expired_unresolved: u64,
    /// Connections still open when the run ended.
    pub open_at_exit: usize,
    pub lost_events: u64,
    pub kernel_events: u64,
    pub established: EstablishedCounts,
    /// Ring-buffer records that were not a known event.
    pub decode_errors: u64,
    /// Error reports that matched no connection.
    pub unmatched_errors: u64,
    /// RSTs sent without a socket to segments other than a SYN: only counted.
    pub stray_resets: u64,
    /// Dropped packets on traced ports, by kernel drop reason.
    pub drops_by_reason: &'a BTreeMap<DropReason, u64>,
    /// `drop` records not written (more than 50 a second of one reason in one namespace).
    pub drop_records_suppressed: u64,
    /// Failed SYN-cookie attempts not written as verdicts (more than 50 a second at one
    /// listener).
    pub attempt_verdicts_suppressed: u64,
    /// Per listener (`ip:port`): SYN cookies and queue overflows.
    pub listeners: &'a BTreeMap<String, ListenerCounts>,
    pub top_failing_peers: Vec<PeerCount>,
    pub top_failing_ports: Vec<PortCount>,
    /// Client handshake times; null when none completed.
    pub connect_latency_ms: Option<Latency>,
    /// Growth of the namespaces' TcpExt counters, by netns inode, then counter name.
    pub tcp_counters: &'a BTreeMap<u32, BTreeMap<&'static str, u64>>,
    /// Kernel reads that failed, by eBPF program; their facts are absent (null) in the
    /// records. Programs not listed had none.
    pub read_failures: &'a BTreeMap<&'static str, u64>,
    /// Runs the kernel skipped, by eBPF program: it fired while the same program ran on that
    /// CPU (a softirq's state change on top of a process's), and the kernel does not nest a
    /// program (its `recursion_misses`). Each is an event conntrace never saw. Programs not
    /// listed had none.
    pub program_misses: &'a BTreeMap<&'static str, u64>,
    /// Drops of forwarded packets (neither end local to the dropping namespace): they join
    /// their connection's `path_drops` where conntrace sees an end, and make no verdict.
    pub forwarded_drops: u64,
    /// Namespaces whose SYN cookies seen on traced listeners disagree with their
    /// TcpExtSyncookiesSent growth (empty when they agree).
    pub cookie_mismatches: Vec<CookieMismatch>,
    /// Quiet mode (`--follow quiet`, the default): connections the kernel followed without
    /// sending their events; absent when connections streamed. `kernel_events` then counts
    /// only what reached userspace, `established` and `connect_latency_ms` the kernel's counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_kept: Option<KernelKept>,
    /// With `--bpf-stats` only (absent otherwise): each active program's runs and run time in
    /// nanoseconds over the run, from the kernel's BPF run-time statistics.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Vec<ProgramCost>")]
    pub programs: Option<&'a [ProgramCost]>,
}

impl<'a> Totals<'a> {
    pub fn new(f: &'a Final<'a>) -> Self {
        let s = f.summary;
        Self {
            duration_ms: f.duration_ms,
            verdicts: s.by_outcome.values().sum(),
            by_outcome: &s.by_outcome,
            by_reason: &s.by_reason,
            expired_unresolved: s.expired_unresolved,
            open_at_exit: f.tracked_at_exit,
            lost_events: f.lost_events,
            kernel_events: s.events,
            established: EstablishedCounts {
                client: s.established.0,
                server: s.established.1,
            },
            decode_errors: f.decode_errors,
            unmatched_errors: s.unmatched_errors,
            stray_resets: s.stray_resets,
            drops_by_reason: &s.drops_by_reason,
            drop_records_suppressed: s.drop_records_suppressed,
            attempt_verdicts_suppressed: s.attempt_verdicts_suppressed,
            listeners: &s.listeners,
            top_failing_peers: Summary::top(&s.failing_peers, 10)
                .into_iter()
                .map(|(addr, count)| PeerCount { addr, count })
                .collect(),
            top_failing_ports: Summary::top(&s.failing_ports, 10)
                .into_iter()
                .map(|(port, count)| PortCount { port, count })
                .collect(),
            connect_latency_ms: s.latency_percentiles().map(|(count, p50, p90, p99, max)| {
                Latency {
                    count,
                    p50,
                    p90,
                    p99,
                    max,
                }
            }),
            tcp_counters: &f.tcp_counters,
            read_failures: &f.read_failures,
            program_misses: &f.program_misses,
            forwarded_drops: s.forwarded_drops,
            cookie_mismatches: f.cookie_mismatches(),
            kernel_kept: s.kernel_kept,
            programs: f.programs.as_deref(),
        }
    }
}

/// A record with its time.
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[schemars(rename = "{T}Line")]
pub struct Stamped<'a, T> {
    pub ts: Timestamp,
    /// The node (host) conntrace runs on, from `--node` or the `NODE_NAME` environment
    /// variable (a DaemonSet's downward API); absent when neither is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<&'a str>,
    #[serde(flatten)]
    pub record: T,
}

/// One line of `conntrace --json`: `event` says which record it is.
// Built for one write and serialized at once: the summary's size costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JsonRecord<'a> {
    /// Printed once every program is attached.
    Ready(Stamped<'a, &'a Ready>),
    /// One connection's verdict.
    Verdict(Stamped<'a, &'a Verdict>),
    /// A dropped packet of a traced port that explains no verdict.
    Drop(Stamped<'a, &'a DropRecord>),
    /// Kernel events lost.
    Lost(Stamped<'a, Lost>),
    /// Totals, the last line.
    Summary(Stamped<'a, Totals<'a>>),
    /// One connection from both ends (`conntrace merge --json`). In the schema only: `merge`
    /// writes it itself, as it is also built into the fuzz target without this module.
    #[allow(dead_code)]
    Merged(crate::merge::Merged<'a>),
}

impl<'a> JsonRecord<'a> {
    /// The JSON form of `record`, its times from `clock`. The summary borrows from `record`.
    pub fn new(record: &'a Record<'a>, clock: &Clock, node: Option<&'a str>) -> Self {
        let stamp = |ts_ns| Timestamp(clock.rfc3339(ts_ns));
        match record {
            Record::Ready(r) => Self::Ready(Stamped {
                ts: stamp(r.ts_ns),
                node,
                record: r,
            }),
            Record::Verdict(v) => Self::Verdict(Stamped {
                ts: stamp(v.ts_ns),
                node,
                record: v,
            }),
            Record::Drop(d) => Self::Drop(Stamped {
                ts: stamp(d.ts_ns),
                node,
                record: d,
            }),
            Record::Lost(l) => Self::Lost(Stamped {
                ts: stamp(l.ts_ns),
                node,
                record: *l,
            }),
            Record::Summary(f) => Self::Summary(Stamped {
                ts: stamp(f.ts_ns),
                node,
                record: Totals::new(f),
            }),
        }
    }
}

/// The JSON Schema of every line conntrace writes with `--json` (`conntrace schema`).
pub fn schema() -> schemars::Schema {
    let mut schema = schemars::generate::SchemaSettings::draft2020_12()
        .for_serialize()
        .into_generator()
        .into_root_schema_for::<JsonRecord<'static>>();
    schema.insert("title".into(), "conntrace JSON Lines record".into());
    schema.insert(
        "description".into(),
        "One line of `conntrace --json` (or `conntrace merge --json`) output: a JSON object whose `event` member says which record it is. Generated from conntrace's record types by `conntrace schema`; docs/events.md has the prose."
            .into(),
    );
    schema
}

#[cfg(test)]
mod tests {
    #[test]
    fn docs_schema_is_the_generated_one() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/events.schema.json");
        let committed = std::fs::read_to_string(&path).expect("read docs/events.schema.json");
        let generated = serde_json::to_string_pretty(&super::schema()).expect("schema") + "\n";
        assert!(
            committed == generated,
            "docs/events.schema.json differs from `conntrace schema`: regenerate it with `cargo run -p conntrace -- schema > docs/events.schema.json`"
        );
    }
}
