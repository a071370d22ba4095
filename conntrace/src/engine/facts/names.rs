//! The kernel's own names for what it reports, each a small type defined once: TCP states and
//! flags (numbers from `conntrace_common::tcp`), errnos (names from libc through nix), drop
//! reasons (named from the running kernel's BTF, `enum skb_drop_reason`, never from a table
//! compiled in) and netfilter hooks. Each serializes as the kernel's spelling.

use std::fmt;

use compact_str::CompactString;
use conntrace_common::tcp::{flags, state};
use schemars::JsonSchema;
use serde::{Serialize, Serializer};

/// A TCP socket state, as the kernel numbers it; serialized as its kernel name
/// (`TCP_SYN_SENT`), or `TCP_STATE_<n>` for a number without a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    Other(i32),
}

impl TcpState {
    pub fn from_kernel(v: i32) -> Self {
        match v {
            state::ESTABLISHED => Self::Established,
            state::SYN_SENT => Self::SynSent,
            state::SYN_RECV => Self::SynRecv,
            state::FIN_WAIT1 => Self::FinWait1,
            state::FIN_WAIT2 => Self::FinWait2,
            state::TIME_WAIT => Self::TimeWait,
            state::CLOSE => Self::Close,
            state::CLOSE_WAIT => Self::CloseWait,
            state::LAST_ACK => Self::LastAck,
            state::LISTEN => Self::Listen,
            state::CLOSING => Self::Closing,
            state::NEW_SYN_RECV => Self::NewSynRecv,
            other => Self::Other(other),
        }
    }

    /// A connection's socket between its handshake and its close: established or closing.
    pub fn connected(self) -> bool {
        matches!(
            self,
            Self::Established
                | Self::FinWait1
                | Self::FinWait2
                | Self::CloseWait
                | Self::LastAck
                | Self::Closing
        )
    }

    /// Past its handshake: [`TcpState::connected`], or its TIME_WAIT remains.
    pub fn past_handshake(self) -> bool {
        self.connected() || self == Self::TimeWait
    }

    /// The kernel's name: `TCP_ESTABLISHED`.
    pub fn name(self) -> CompactString {
        let name = match self {
            Self::Established => "TCP_ESTABLISHED",
            Self::SynSent => "TCP_SYN_SENT",
            Self::SynRecv => "TCP_SYN_RECV",
            Self::FinWait1 => "TCP_FIN_WAIT1",
            Self::FinWait2 => "TCP_FIN_WAIT2",
            Self::TimeWait => "TCP_TIME_WAIT",
            Self::Close => "TCP_CLOSE",
            Self::CloseWait => "TCP_CLOSE_WAIT",
            Self::LastAck => "TCP_LAST_ACK",
            Self::Listen => "TCP_LISTEN",
            Self::Closing => "TCP_CLOSING",
            Self::NewSynRecv => "TCP_NEW_SYN_RECV",
            Self::Other(v) => return compact_str::format_compact!("TCP_STATE_{v}"),
        };
        CompactString::const_new(name)
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.name())
    }
}

impl Serialize for TcpState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl JsonSchema for TcpState {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "TcpState".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A kernel TCP state name: TCP_ESTABLISHED, TCP_SYN_SENT, ..., or TCP_STATE_<n> for a number without a name.",
            "type": "string",
            "pattern": "^TCP_[A-Z0-9_]+$"
        })
    }
}

/// The flags byte of a TCP header; serialized as names joined by `|` (`ACK|PSH`), `none`
/// for no flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    const NAMES: [(u8, &'static str); 8] = [
        (flags::SYN, "SYN"),
        (flags::ACK, "ACK"),
        (flags::FIN, "FIN"),
        (flags::RST, "RST"),
        (flags::PSH, "PSH"),
        (flags::URG, "URG"),
        (flags::ECE, "ECE"),
        (flags::CWR, "CWR"),
    ];

    pub fn has(self, bits: u8) -> bool {
        self.0 & bits == bits
    }

    /// A listener's answer to a SYN: SYN with ACK.
    pub fn is_syn_ack(self) -> bool {
        self.has(flags::SYN | flags::ACK)
    }
}

impl std::ops::BitOrAssign for TcpFlags {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (bit, name) in Self::NAMES {
            if self.0 & bit != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

impl Serialize for TcpFlags {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for TcpFlags {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "TcpFlags".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "TCP flags of a segment, joined by |: SYN, ACK|FIN, ...; `none` for no flag.",
            "type": "string",
            "pattern": "^(none|(SYN|ACK|FIN|RST|PSH|URG|ECE|CWR)(\\|(SYN|ACK|FIN|RST|PSH|URG|ECE|CWR))*)$"
        })
    }
}

/// A positive errno; serialized as its name (`ECONNREFUSED`), `errno N` without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Self = Self(libc::EPERM);
    pub const EINTR: Self = Self(libc::EINTR);
    pub const EAGAIN: Self = Self(libc::EAGAIN);
    pub const EACCES: Self = Self(libc::EACCES);
    pub const ECONNRESET: Self = Self(libc::ECONNRESET);
    pub const ECONNABORTED: Self = Self(libc::ECONNABORTED);
    pub const EISCONN: Self = Self(libc::EISCONN);
    pub const ETIMEDOUT: Self = Self(libc::ETIMEDOUT);
    pub const ECONNREFUSED: Self = Self(libc::ECONNREFUSED);
    pub const EHOSTUNREACH: Self = Self(libc::EHOSTUNREACH);
    pub const ENETUNREACH: Self = Self(libc::ENETUNREACH);
    pub const EALREADY: Self = Self(libc::EALREADY);
    pub const EINVAL: Self = Self(libc::EINVAL);
    pub const EADDRNOTAVAIL: Self = Self(libc::EADDRNOTAVAIL);

    /// `-ret` of a failed system call or kernel function, or a positive `sk_err`.
    pub fn from_raw(v: i32) -> Self {
        Self(v.saturating_abs())
    }

    pub fn name(self) -> CompactString {
        match nix::errno::Errno::from_raw(self.0) {
            nix::errno::Errno::UnknownErrno => compact_str::format_compact!("errno {}", self.0),
            e => compact_str::format_compact!("{e:?}"),
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.name())
    }
}

impl Serialize for Errno {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl JsonSchema for Errno {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Errno".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "An errno name such as ECONNREFUSED, or `errno N` for a number without a name.",
            "type": "string",
            "pattern": "^(E[A-Z0-9]+|errno -?[0-9]+)$"
        })
    }
}

/// The kernel's reason for dropping a packet: an `enum skb_drop_reason` name without its
/// `SKB_DROP_REASON_` prefix, as the running kernel's BTF names it (`NETFILTER_DROP`), or
/// `skb_drop_reason N` for a number BTF did not name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, JsonSchema)]
#[serde(transparent)]
pub struct DropReason(#[schemars(with = "String")] CompactString);

impl DropReason {
    /// A netfilter rule (or conntrack) dropped it.
    pub const NETFILTER_DROP: &'static str = "NETFILTER_DROP";
    /// The final ACK found the listener's accept queue full (recent kernels).
    pub const TCP_LISTEN_OVERFLOW: &'static str = "TCP_LISTEN_OVERFLOW";
    /// Neighbour resolution (ARP, NDP) failed.
    pub const NEIGH_FAILED: &'static str = "NEIGH_FAILED";
    /// The reverse-path filter refused the packet's source.
    pub const IP_RPFILTER: &'static str = "IP_RPFILTER";
    /// No route for a packet this host sent (`ip_queue_xmit`).
    pub const IP_OUTNOROUTES: &'static str = "IP_OUTNOROUTES";
    /// No socket matched the packet (a refused SYN is freed with it, after its RST).
    pub const NO_SOCKET: &'static str = "NO_SOCKET";
    /// Too big for the next hop's MTU, where the packet may not be fragmented (forwarding).
    pub const PKT_TOO_BIG: &'static str = "PKT_TOO_BIG";

    pub fn new(name: &str) -> Self {
        Self(CompactString::new(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl PartialEq<&str> for DropReason {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

/// A netfilter hook point (the chains iptables names after them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum NfHook {
    PreRouting,
    Input,
    Forward,
    Output,
    PostRouting,
}

impl NfHook {
    /// The nftables hook name: `input`.
    pub fn nft_name(self) -> &'static str {
        match self {
            Self::PreRouting => "prerouting",
            Self::Input => "input",
            Self::Forward => "forward",
            Self::Output => "output",
            Self::PostRouting => "postrouting",
        }
    }

    /// The iptables chain name: `INPUT`.
    pub fn chain_name(self) -> &'static str {
        match self {
            Self::PreRouting => "PREROUTING",
            Self::Input => "INPUT",
            Self::Forward => "FORWARD",
            Self::Output => "OUTPUT",
            Self::PostRouting => "POSTROUTING",
        }
    }
}

impl fmt::Display for NfHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.chain_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_named_in_a_fixed_order() {
        assert_eq!(TcpFlags(0x12).to_string(), "SYN|ACK");
        assert_eq!(TcpFlags(0x18).to_string(), "ACK|PSH");
        assert_eq!(TcpFlags(0).to_string(), "none");
        assert!(TcpFlags(0x12).is_syn_ack());
    }

    #[test]
    fn errnos_and_states_by_their_kernel_names() {
        assert_eq!(Errno::ECONNREFUSED.to_string(), "ECONNREFUSED");
        assert_eq!(Errno::from_raw(-110), Errno::ETIMEDOUT);
        assert_eq!(Errno(4095).to_string(), "errno 4095");
        assert_eq!(TcpState::from_kernel(2).to_string(), "TCP_SYN_SENT");
        assert_eq!(TcpState::from_kernel(99).to_string(), "TCP_STATE_99");
        assert_eq!(
            serde_json::to_string(&NfHook::PreRouting).unwrap(),
            "\"PREROUTING\""
        );
    }
}
