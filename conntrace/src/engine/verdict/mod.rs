//! The reason engine's output: verdicts, drop records and the run's summary. Times are
//! CLOCK_MONOTONIC nanoseconds; the output layer turns them into UTC.

pub mod detail;
mod reason;
pub mod summary;

use std::net::IpAddr;

use schemars::JsonSchema;
use serde::Serialize;

pub use self::{
    detail::Detail,
    reason::{REASONS, Reason, ReasonDoc},
    summary::{ListenerCounts, Summary},
};
use super::facts::{DropReason, Errno, FourTuple, TcpFlags};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
/// Which end of the connection the reporting host is.
pub enum Side {
    Client,
    Server,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Established,
    Failed,
    /// Established but stuck: no data, or not accepted, within `--stall-timeout`.
    Stalled,
    /// A stalled connection got going (data came, accept() returned).
    Resolved,
}

/// One connection's verdict. `s` is the reporting host's end.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Verdict {
    #[serde(skip)]
    pub ts_ns: u64,
    /// The kernel socket it is about, when there is one (for look-ups; not printed).
    #[serde(skip)]
    pub sk: Option<u64>,
    pub side: Side,
    pub outcome: Outcome,
    pub reason: Reason,
    /// The kernel's own name for what happened: errno name, sk_rst_reason name, TCP state
    /// name, drop reason, or a short phrase.
    pub kernel_reason: Option<String>,
    /// The socket's error (or connect()'s), when it got one.
    pub errno: Option<Errno>,
    /// Local end; unknown when the kernel never assigned it (e.g. no route).
    #[schemars(schema_with = "nullable_ip_schema")]
    pub saddr: Option<IpAddr>,
    pub sport: Option<u16>,
    #[schemars(schema_with = "ip_schema")]
    pub daddr: IpAddr,
    pub dport: u16,
    /// Network namespace inode (`stat -L -c %i /proc/PID/ns/net`); null when the kernel side
    /// could not read it.
    pub netns: Option<u32>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// The container behind the verdict (its process's, else its namespace's); null in the
    /// host's own namespace or when unknown. Never set by the engine: filled in before the
    /// record is written.
    pub container: Option<crate::identity::Container>,
    /// Connect start (client) or child socket creation (server) to the verdict's event.
    pub duration_ms: f64,
    pub syn_retransmits: u32,
    pub detail: Detail,
}

impl Side {
    /// As serialized: `client`, `server`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
        }
    }
}

impl Outcome {
    /// As serialized: `established`, `failed`, `stalled`, `resolved`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Established => "established",
            Self::Failed => "failed",
            Self::Stalled => "stalled",
            Self::Resolved => "resolved",
        }
    }
}

impl Verdict {
    /// The connection's service port: the server's local port, the client's remote one; `None`
    /// for a server end without a local port.
    pub fn service_port(&self) -> Option<u16> {
        match self.side {
            Side::Server => self.sport,
            Side::Client => Some(self.dport),
        }
    }

    /// The connection's tuple, this host's end first; `None` while the local end is unknown.
    pub fn tuple(&self) -> Option<FourTuple> {
        Some(FourTuple {
            saddr: self.saddr?,
            sport: self.sport?,
            daddr: self.daddr,
            dport: self.dport,
        })
    }
}

/// Which way a dropped packet was going, from this host's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Received (or being received) by this host.
    In,
    /// Sent by a local socket.
    Out,
    /// Passing through the dropping namespace: neither end is one of its addresses (`s` is
    /// the packet's source). A router's drop, or a packet addressed elsewhere that a
    /// namespace which does not forward refused (`OTHERHOST`).
    Forward,
}

/// A packet the kernel dropped on a traced port that explains no verdict (`drop` record).
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct DropRecord {
    #[serde(skip)]
    pub ts_ns: u64,
    pub direction: Direction,
    /// The kernel's drop reason.
    pub kernel_reason: DropReason,
    /// Where the kernel dropped it (`symbol+offset`).
    pub location: String,
    pub tcp_flags: TcpFlags,
    /// `s` = this host's end, as in verdicts.
    #[schemars(schema_with = "ip_schema")]
    pub saddr: IpAddr,
    pub sport: u16,
    #[schemars(schema_with = "ip_schema")]
    pub daddr: IpAddr,
    pub dport: u16,
    pub netns: Option<u32>,
    /// The sending process, for outgoing packets dropped in its context.
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// The container behind the drop (its process's, else its namespace's); null in the host's
    /// own namespace or when unknown. Never set by the engine: filled in before the record is
    /// written.
    pub container: Option<crate::identity::Container>,
}

/// An IP address as serialized: IPv4 dotted quad or IPv6 text; IPv4-mapped IPv6 addresses are
/// reported as IPv4.
pub fn ip_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "IPv4 dotted quad, or IPv6 text form. IPv4-mapped IPv6 addresses are reported as IPv4.",
        "type": "string",
        "anyOf": [{ "format": "ipv4" }, { "format": "ipv6" }]
    })
}

fn nullable_ip_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "anyOf": [ip_schema(g), { "type": "null" }] })
}
