//! `conntrace merge FILE... [--max-skew D] [--json]`: joins the verdicts that `conntrace --json`
//! wrote on different hosts (the client's, the server's) about the same connections, and tells
//! each connection's story from both ends.
//!
//! Only `verdict` records are used; the other records are checked (every line must be a JSON
//! object with an `event` string; blank lines are skipped) and otherwise ignored. A verdict's
//! connection is (client ip:port, server ip:port): `saddr`/`sport` are the reporting host's end.
//! Verdicts of one connection are grouped by that key and by time: a 4-tuple cannot be reused
//! within TIME_WAIT (60 s) of a connection's end, so a verdict joins the group of the previous
//! one (sorted by `ts`) when it is within 60 s + `--max-skew` of it (for the follow-up of a
//! stall, counted from when it got stuck: `ts` - `detail.stuck_ms`). Verdicts without a full
//! key (a client with no local port yet, a listener-level `listen_overflow`) stay alone.
//!
//! Without `--json`, one line per connection, by time: `TS CLIENT -> SERVER client REASONS +
//! server REASONS: STORY`, or `TS CLIENT -> SERVER STORY` for a one-sided one (`TS` to the
//! second, `?` for an end that is not known).
//!
//! ## `merged`
//!
//! Written by `conntrace merge --json`, one record per connection, sorted by `ts`.
//!
//! ```json
//! {"event":"merged","ts":"2026-11-21T20:26:12.365624Z","client":{"addr":"10.99.0.1:38248"},"server":{"addr":"10.99.0.2:3306"},"reasons":{"client":["stalled_no_greeting"],"server":["syncookie_ack_lost"]},"story":"the server never created this connection: it answered with a SYN cookie and the client's final ACK was dropped by INPUT rule `tcp dport 3306 drop` (ip filter INPUT); the client waited 6.1 s","one_sided":null,"verdicts":[{"event":"verdict","ts":"2026-11-21T20:26:12.365624Z","side":"server","file":"server.jsonl"},{"event":"verdict","ts":"2026-11-21T20:26:15.415122Z","side":"client","file":"client.jsonl"}]}
//! ```
//!
//! (The verdicts are shortened here; they are copied whole.)
//!
//! * **event** (string) - `"merged"`.
//! * **ts** (string) - the earliest `ts` of the connection's verdicts, as written (each host
//!   stamps its verdicts with its own clock).
//! * **client**, **server** (object) - the connection's two ends:
//!   * **addr** (string or null) - `ip:port` (`[ip]:port` for IPv6); `null` when not known (a
//!     client whose `connect()` failed before a port was chosen, a listener-level
//!     `listen_overflow`).
//! * **reasons** (object) - **client**, **server** (arrays of strings): the distinct `reason`
//!   codes of that side's verdicts, in the order they were first reported; empty for a side
//!   that reported nothing.
//! * **story** (string) - one sentence: why, from both ends (e.g. `nothing listens on
//!   10.0.0.2:3306`); when no rule knows the pair, `client: REASON (KERNEL_REASON); server:
//!   ...`, plus which host reported first when they are more than `--max-skew` apart. For a
//!   one-sided connection: `client only: REASON (KERNEL_REASON), ...`. A side's `established`
//!   verdict is left out of the story when that side also reported a failure.
//! * **one_sided** (string or null) - `null` when both sides reported the connection,
//!   `"client"` or `"server"` when only that side did.
//! * **verdicts** (array of objects) - the `verdict` records, unchanged, sorted by `ts`, each
//!   with one member added: **file** (string), the input file it was read from, as given on
//!   the command line.

// Paths spelled out: the fuzz target includes this file from another crate.
#[path = "merge/story.rs"]
mod story;
#[cfg(test)]
#[path = "merge/tests.rs"]
mod tests;

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, de::Error as _};
use serde_json::{Map, Value};

/// How long a 4-tuple cannot be reused after its connection ended (TCP_TIMEWAIT_LEN).
const TIME_WAIT: Duration = Duration::from_secs(60);

/// Errors name the file (and line) as given on the command line; the cause is the source.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("cannot open {0}")]
    Open(String, #[source] io::Error),
    #[error("{0}: cannot read")]
    Read(String, #[source] io::Error),
    #[error("{0}: not a JSON object")]
    NotObject(String, #[source] serde_json::Error),
    #[error("{0}: no `event` string")]
    NoEvent(String),
    #[error("{0}: not a valid verdict")]
    BadVerdict(String, #[source] serde_json::Error),
    #[error("write the merged output")]
    Write(#[source] io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Client,
    Server,
}

/// The members of a `verdict` record that merging uses.
#[derive(Debug, Deserialize)]
struct Verdict {
    #[serde(deserialize_with = "rfc3339")]
    ts: SystemTime,
    side: Side,
    reason: String,
    kernel_reason: Option<String>,
    saddr: Option<IpAddr>,
    sport: Option<u16>,
    daddr: Option<IpAddr>,
    dport: Option<u16>,
    comm: Option<String>,
    #[serde(default)]
    detail: story::Facts,
    /// The whole record as read, with `file` added.
    #[serde(skip)]
    raw: Map<String, Value>,
}

fn rfc3339<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_rfc3339(&s).map_err(|e| D::Error::custom(format!("`ts` {s:?}: {e}")))
}

/// One end of a merged connection.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct End {
    /// `ip:port` (`[ip]:port` for IPv6); null when not known.
    pub addr: Option<String>,
}

/// Each side's distinct reason codes, in the order first reported.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Reasons<'a> {
    pub client: Vec<&'a str>,
    pub server: Vec<&'a str>,
}

/// The `merged` record (`conntrace merge --json`): one connection from both ends.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Merged<'a> {
    /// The earliest `ts` of the connection's verdicts, as written (each host stamps its
    /// verdicts with its own clock).
    pub ts: &'a str,
    pub client: End,
    pub server: End,
    pub reasons: Reasons<'a>,
    /// One sentence: why, from both ends.
    pub story: String,
    /// Null when both sides reported the connection, else the side that did.
    pub one_sided: Option<Side>,
    /// The `verdict` records, unchanged, sorted by `ts`, each with `file` added: the input file
    /// it was read from.
    pub verdicts: Vec<&'a Map<String, Value>>,
}

/// A line of `merge --json`.
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum MergedLine<'a> {
    Merged(Merged<'a>),
}

/// `ip:port`, when both are known and specified.
fn end(ip: Option<IpAddr>, port: Option<u16>) -> Option<SocketAddr> {
    match (ip, port) {
        (Some(ip), Some(port)) if port != 0 && !ip.is_unspecified() => {
            Some(SocketAddr::new(ip, port))
        }
        _ => None,
    }
}

impl Verdict {
    /// (client end, server end).
    fn ends(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        let (own, peer) = (end(self.saddr, self.sport), end(self.daddr, self.dport));
        match self.side {
            Side::Client => (own, peer),
            Side::Server => (peer, own),
        }
    }

    fn key(&self) -> Option<(SocketAddr, SocketAddr)> {
        match self.ends() {
            (Some(client), Some(server)) => Some((client, server)),
            _ => None,
        }
    }

    /// Since when the connection held its 4-tuple, as far as this verdict tells.
    fn since(&self) -> SystemTime {
        story::duration(self.detail.stuck_ms)
            .and_then(|stuck| self.ts.checked_sub(stuck))
            .unwrap_or(self.ts)
    }
}

pub fn run(
    files: &[PathBuf],
    max_skew: Duration,
    json: bool,
    out: &mut impl Write,
) -> Result<(), MergeError> {
    let mut verdicts = Vec::new();
    for path in files {
        read(path, &mut verdicts)?;
    }
    for connection in group(verdicts, max_skew) {
        let line = render(&connection, max_skew, json);
        writeln!(out, "{line}").map_err(MergeError::Write)?;
    }
    Ok(())
}

/// Appends the verdicts of one file.
fn read(path: &Path, verdicts: &mut Vec<Verdict>) -> Result<(), MergeError> {
    let name = path.display().to_string();
    let file = File::open(path).map_err(|e| MergeError::Open(name.clone(), e))?;
    read_from(&name, BufReader::new(file), verdicts)
}

/// The whole of `merge` on one input, in memory: what the fuzz target and the corpus replay
/// drive. Any input gives lines or an error, never a panic.
#[cfg(any(test, fuzzing))]
pub fn merge_one(
    name: &str,
    input: &[u8],
    max_skew: Duration,
    json: bool,
) -> Result<Vec<String>, MergeError> {
    let mut verdicts = Vec::new();
    read_from(name, input, &mut verdicts)?;
    Ok(group(verdicts, max_skew)
        .iter()
        .map(|c| render(c, max_skew, json))
        .collect())
}

/// Appends the verdicts of the JSON Lines in `input`; `name` names it in errors.
fn read_from(
    name: &str,
    input: impl BufRead,
    verdicts: &mut Vec<Verdict>,
) -> Result<(), MergeError> {
    let name = name.to_owned();
    for (n, text) in input.lines().enumerate() {
        let at = format!("{name}:{}", n + 1);
        let text = text.map_err(|e| MergeError::Read(at.clone(), e))?;
        if text.trim().is_empty() {
            continue;
        }
        let mut raw: Map<String, Value> =
            serde_json::from_str(&text).map_err(|e| MergeError::NotObject(at.clone(), e))?;
        match raw.get("event").and_then(Value::as_str) {
            None => return Err(MergeError::NoEvent(at)),
            Some("verdict") => {}
            Some(_) => continue,
        }
        let mut verdict: Verdict =
            serde_json::from_str(&text).map_err(|e| MergeError::BadVerdict(at, e))?;
        raw.insert("file".into(), name.clone().into());
        verdict.raw = raw;
        verdicts.push(verdict);
    }
    Ok(())
}

/// Groups verdicts into connections, each sorted by `ts`; the connections sorted by their first.
fn group(verdicts: Vec<Verdict>, max_skew: Duration) -> Vec<Vec<Verdict>> {
    let window = TIME_WAIT + max_skew;
    let mut connections = Vec::new();
    let mut by_key: BTreeMap<_, Vec<Verdict>> = BTreeMap::new();
    for verdict in verdicts {
        match verdict.key() {
            Some(key) => by_key.entry(key).or_default().push(verdict),
            None => connections.push(vec![verdict]),
        }
    }
    for (_, mut same_key) in by_key {
        same_key.sort_by_key(|v| v.ts);
        let mut current: Vec<Verdict> = Vec::new();
        for verdict in same_key {
            let apart = current.last().is_some_and(|last| {
                let gap = verdict.since().duration_since(last.ts);
                gap.is_ok_and(|gap| gap > window)
            });
            if apart {
                connections.push(std::mem::take(&mut current));
            }
            current.push(verdict);
        }
        connections.push(current);
    }
    connections.sort_by_key(|c| c.first().map(|v| v.ts));
    connections
}

/// One output line for one connection.
fn render(connection: &[Verdict], max_skew: Duration, json: bool) -> String {
    let side = |side| -> Vec<&Verdict> { connection.iter().filter(|v| v.side == side).collect() };
    let (client, server) = (side(Side::Client), side(Side::Server));
    let ends = connection.iter().map(Verdict::ends);
    let client_addr = ends.clone().find_map(|(c, _)| c);
    let server_addr = ends.clone().find_map(|(_, s)| s);
    let one_sided = match (client.is_empty(), server.is_empty()) {
        (false, false) => None,
        (false, true) => Some(Side::Client),
        _ => Some(Side::Server),
    };
    let story = story::tell(&client, &server, server_addr, max_skew);
    let addr = |a: Option<SocketAddr>| a.map(|a| a.to_string());
    if json {
        use story::distinct_reasons as reasons;
        let record = MergedLine::Merged(Merged {
            ts: connection
                .first()
                .and_then(|v| v.raw.get("ts")?.as_str())
                .unwrap_or_default(),
            client: End {
                addr: addr(client_addr),
            },
            server: End {
                addr: addr(server_addr),
            },
            reasons: Reasons {
                client: reasons(&client),
                server: reasons(&server),
            },
            story,
            one_sided,
            verdicts: connection.iter().map(|v| &v.raw).collect(),
        });
        // Serializing borrowed strings and JSON values cannot fail.
        return serde_json::to_string(&record).unwrap_or_default();
    }
    let ts = connection.first().map_or_else(
        || "?".to_owned(),
        |v| humantime::format_rfc3339_seconds(v.ts).to_string(),
    );
    let addr = |a| addr(a).unwrap_or_else(|| "?".to_owned());
    let (c, s) = (addr(client_addr), addr(server_addr));
    match one_sided {
        Some(_) => format!("{ts} {c} -> {s} {story}"),
        None => format!(
            "{ts} {c} -> {s} client {} + server {}: {story}",
            story::distinct_reasons(&client).join(","),
            story::distinct_reasons(&server).join(","),
        ),
    }
}
