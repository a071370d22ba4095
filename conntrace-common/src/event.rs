//! Events written by the eBPF programs into the `EVENTS` ring buffer.
//!
//! Every event starts with an [`EventHeader`]; its `kind` says which struct follows and its
//! `size` how many bytes the whole event has. Kind numbers are part of the wire format between
//! the kernel and userspace: they are fixed and never reused.

use core::mem::size_of;

use crate::user_pod;

pub const COMM_LEN: usize = 16;

/// What an event is. The numbers are fixed forever; retired kinds keep their number unused.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// `sock:inet_sock_set_state` for a TCP socket.
    StateChange = 1,
    /// `sock:inet_sk_error_report` for a TCP socket.
    ErrorReport = 2,
    /// `tcp:tcp_receive_reset`.
    ReceiveReset = 3,
    /// `tcp:tcp_send_reset`.
    SendReset = 4,
    /// `tcp:tcp_retransmit_skb` while the socket is in SYN_SENT.
    SynRetransmit = 5,
    /// `accept()`/`accept4()` returned a TCP socket on a traced port.
    Accept = 6,
    /// `connect()` on a TCP socket to a traced port returned an error other than EINPROGRESS.
    ConnectError = 7,
    /// `skb:kfree_skb`: the kernel dropped a TCP packet of a traced port.
    Drop = 8,
    /// The first data a TCP socket on a traced port received (`sock:sk_data_ready`) or sent
    /// (`sock:sock_send_length`): once per direction per socket.
    FirstData = 9,
    /// A SYN-ACK left a listener on a traced port without an owning request socket: a SYN
    /// cookie (`net:net_dev_queue`).
    CookieSynAck = 10,
    /// `tcp:tcp_retransmit_skb` past the handshake: a data segment retransmitted.
    Retransmit = 11,
    /// Quiet mode: what the kernel kept about a connection until it needed userspace
    /// ([`HistoryEvent`]); the event that needed it follows.
    History = 12,
    /// `fib:fib_table_lookup` / `fib6:fib6_table_lookup`: a route lookup of `connect()` on a
    /// traced port failed in one routing table (quiet mode, where the syscall is not traced).
    RouteError = 13,
}

impl EventKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::StateChange,
            2 => Self::ErrorReport,
            3 => Self::ReceiveReset,
            4 => Self::SendReset,
            5 => Self::SynRetransmit,
            6 => Self::Accept,
            7 => Self::ConnectError,
            8 => Self::Drop,
            9 => Self::FirstData,
            10 => Self::CookieSynAck,
            11 => Self::Retransmit,
            12 => Self::History,
            13 => Self::RouteError,
            _ => return None,
        })
    }
}

/// First bytes of every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`] as `u32`.
    pub kind: u32,
    /// Size of the whole event in bytes, header included.
    pub size: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Thread-group id of the current task (meaningful only in process context).
    pub pid: u32,
    /// [`unread`] bits: facts of this event the program could not read (left 0).
    pub unread: u32,
    /// Inode number of the network namespace the socket or packet belongs to; 0 if unknown.
    pub netns: u32,
    /// [`header_flags`] bits.
    pub flags: u32,
    /// `comm` of the current task, NUL padded.
    pub comm: [u8; COMM_LEN],
}

/// `EventHeader::flags` bits.
pub mod header_flags {
    /// Events of this CPU were lost (the ring buffer was full) since its previous event that
    /// reached the ring buffer: an event this one follows may be missing.
    pub const LOST_BEFORE: u32 = 1 << 0;
    /// A `ConnectError` from the root cgroup's `connect4`/`connect6` programs: a cgroup
    /// program refused `connect()`, whatever errno it chose.
    pub const CGROUP_REFUSAL: u32 = 1 << 1;
}

/// `EventHeader::unread` bits: facts an event's program could not read. The field stays 0 in
/// the record and userspace carries it as absent.
pub mod unread {
    /// The network namespace (`EventHeader::netns`).
    pub const NETNS: u32 = 1 << 0;
    /// The socket's error at close (`StateChange::sk_err`).
    pub const SK_ERR: u32 = 1 << 1;
    /// The socket's soft error at close (`StateChange::sk_err_soft`).
    pub const SK_ERR_SOFT: u32 = 1 << 7;
    /// The answered packet's TCP flags (`Reset::tcp_flags`).
    pub const TCP_FLAGS: u32 = 1 << 2;
    /// The retransmitted segment's length (`Retransmit::bytes`).
    pub const LENGTH: u32 = 1 << 3;
    /// The connection's MSS (`Retransmit::mss`).
    pub const MSS: u32 = 1 << 4;
    /// The connection's selectively acknowledged segments (`Retransmit::sacked_out`).
    pub const SACKED_OUT: u32 = 1 << 9;
    /// The interface a dropped packet arrived on (`PacketDrop::ifindex`).
    pub const IFINDEX: u32 = 1 << 5;
    /// The local port of the dropped packet's socket (`PacketDrop::sk_port`).
    pub const SK_PORT: u32 = 1 << 6;
    /// The state of the dropped packet's socket (`PacketDrop::sk_state`).
    pub const SK_STATE: u32 = 1 << 8;
}

/// Addresses and ports as the kernel reported them, from the reporting socket's point of view:
/// `s` is the local end. Ports are in host byte order. IPv4 addresses use the first 4 bytes.
/// Aligned to 8 (every event already places it at a multiple of 8): the eBPF side writes and
/// copies it a word at a time, where 2-byte alignment meant twenty 2-byte moves per copy.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Tuple {
    /// `AF_INET` (2) or `AF_INET6` (10); 0 if unknown.
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub _pad: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// `EventKind::StateChange`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateChange {
    pub header: EventHeader,
    pub skaddr: u64,
    pub tuple: Tuple,
    pub oldstate: i32,
    pub newstate: i32,
    /// `sk->sk_err` when the new state is CLOSE: the error the connection failed with, read
    /// before the waiting process can clear it (`inet_sk_error_report` fires later and may see
    /// 0 when the process was faster). 0 otherwise.
    pub sk_err: i32,
    /// `sk->sk_err_soft` when the new state is CLOSE: an ICMP error that came while a process
    /// held the socket (the kernel keeps it aside and goes on retransmitting), else 0.
    pub sk_err_soft: i32,
    /// When the new state is CLOSE: whether the socket still had a route
    /// (`sk->sk_dst_cache` set) and whether its last route lookup gave it one
    /// (`sk->sk_route_caps` nonzero), in [`route_cache`] bits. A retransmission whose route
    /// lookup failed leaves no route and zeroes the capabilities: the route went away, where
    /// an ICMP error leaves both. 0 otherwise.
    pub route_cache: u32,
    /// Quiet mode, a connection userspace follows that starts or ends closing
    /// (`FIN_WAIT1`, `CLOSE_WAIT`, `CLOSE`): what it had done by then ([`progress`] bits),
    /// since no first-data or accept event was sent for it. 0 otherwise.
    pub progress: u32,
}

/// `StateChange::route_cache` bits.
pub mod route_cache {
    /// The route cache was read (the bit below is absent when this one is clear).
    pub const READ: u32 = 1;
    /// The socket had a route (`sk_dst_cache` set).
    pub const SET: u32 = 2;
    /// The route capabilities were read (the bit below is absent when this one is clear).
    pub const CAPS_READ: u32 = 4;
    /// The socket's last route lookup gave it a route (`sk_route_caps` nonzero: set by
    /// `sk_setup_caps`, zeroed by `inet_sk_rebuild_header` and `inet6_sk_rebuild_header` when
    /// a retransmission's lookup fails). IPv6 drops a timed-out socket's cached route whatever
    /// the cause, so this is what tells a lost IPv6 route.
    pub const CAPS_SET: u32 = 8;
}

/// `StateChange::progress` bits.
pub mod progress {
    /// The facts below were read (absent when this bit is clear).
    pub const READ: u32 = 1 << 0;
    /// The socket had received data (`tcp_sock.bytes_received > 0`).
    pub const RECEIVED: u32 = 1 << 1;
    /// A process held the socket (`sock.sk_socket` set): a server connection was accepted.
    pub const OWNED: u32 = 1 << 2;
}

/// `EventKind::ErrorReport`. The tracepoint carries no socket address: it is joined by tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorReport {
    pub header: EventHeader,
    pub tuple: Tuple,
    /// Positive errno.
    pub error: i32,
    pub _pad: u32,
}

/// `RESET_REASON_NONE`: the kernel gave no reset reason (older kernels).
pub const RESET_REASON_NONE: u32 = u32::MAX;

/// `EventKind::ReceiveReset` and `EventKind::SendReset`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reset {
    pub header: EventHeader,
    /// 0 when the kernel sent a reset without a socket (nothing matched the packet).
    pub skaddr: u64,
    pub tuple: Tuple,
    /// `enum sk_rst_reason` value (send side, 6.10+), or [`RESET_REASON_NONE`].
    pub reason: u32,
    /// Send side without a socket: TCP flags of the packet being answered, or
    /// [`TCP_FLAGS_UNKNOWN`].
    pub tcp_flags: u32,
}

/// `Reset::tcp_flags` when the packet could not be read.
pub const TCP_FLAGS_UNKNOWN: u32 = u32::MAX;

/// `EventKind::Retransmit`: a segment of a connection past its handshake retransmitted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retransmit {
    pub header: EventHeader,
    pub skaddr: u64,
    pub tuple: Tuple,
    /// TCP payload bytes of the segment (`skb->len` where TCP retransmits it).
    pub bytes: u32,
    /// The connection's MSS then (`tcp_sock.mss_cache`).
    pub mss: u32,
    /// Segments the peer had acknowledged selectively (SACK) above the first unacknowledged
    /// one then (`tcp_sock.sacked_out`): later data got through.
    pub sacked_out: u32,
    pub _pad: u32,
}

/// `EventKind::SynRetransmit`: a SYN retransmitted in SYN_SENT.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynRetransmit {
    pub header: EventHeader,
    pub skaddr: u64,
    pub tuple: Tuple,
}

/// `EventKind::Accept`: the current task accepted `skaddr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accept {
    pub header: EventHeader,
    pub skaddr: u64,
}

/// `EventKind::ConnectError`: `connect()` returned `ret` (negative errno). `tuple` has the
/// destination from the syscall's `sockaddr`; the local end is unknown (zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectError {
    pub header: EventHeader,
    /// 0 if the socket could not be resolved from the file descriptor.
    pub skaddr: u64,
    pub tuple: Tuple,
    pub ret: i32,
    pub _pad: u32,
}

/// `EventKind::RouteError`: one routing table's answer to a route lookup that `connect()` made
/// on a TCP socket to a traced port, when it was an error. `connect()` runs in process
/// context: the header's pid, comm and namespace (the task's `nsproxy->net_ns`) are the
/// connecting process's.
///
/// `tuple` is the lookup's flow: `saddr` the source it asked for (unspecified until the
/// kernel chose one), `sport` the local port (0 until one is chosen), `daddr`/`dport` the
/// destination; `family` says which tracepoint (`AF_INET`: `fib_table_lookup`, `AF_INET6`:
/// `fib6_table_lookup`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteError {
    pub header: EventHeader,
    pub tuple: Tuple,
    /// The tracepoint's `err`: a negative errno. IPv4: `-EAGAIN` no match in this table (the
    /// rule walk goes on), `-EHOSTUNREACH`/`-EACCES`/`-EINVAL` an unreachable, prohibit or
    /// blackhole route. IPv6 derives it from the route's type, and its "no route" entry is
    /// itself an unreachable route: `-EHOSTUNREACH` also for no match.
    pub err: i32,
    /// The routing table looked up (`tb_id`: 254 main, 255 local, 253 default, ...).
    pub table: u32,
}

/// `EventKind::Drop`. `tuple` is the packet's own: `s` = its source, `d` = its destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketDrop {
    pub header: EventHeader,
    /// `skb->sk`: the socket owning the packet (a local sender, or a receiver after lookup).
    pub sk: u64,
    /// The tracepoint's `rx_sk` (6.12+): the socket the packet was received on; 0 if none.
    pub rx_sk: u64,
    /// Address of the dropping code (`location`), named from /proc/kallsyms by userspace.
    pub location: u64,
    pub tuple: Tuple,
    /// `enum skb_drop_reason` value, named from the kernel's BTF by userspace.
    pub reason: u32,
    /// TCP flags byte of the dropped segment.
    pub tcp_flags: u32,
    /// The interface the packet arrived on (`skb->skb_iif`); 0 for a locally generated one.
    pub ifindex: u32,
    /// For an ICMP error quoting a TCP segment (then `tuple` is the quoted segment's):
    /// `type | code << 8`; [`NOT_ICMP`] otherwise.
    pub icmp: u32,
    /// The MTU an ICMP "fragmentation needed" / ICMPv6 "packet too big" announces; 0 if none.
    pub mtu: u32,
    /// The local port of `sk` (`skc_num`, else `inet_sport` once closing released it): the
    /// packet is outgoing when its source port is this one. 0 without `sk`; unread:
    /// [`unread::SK_PORT`].
    pub sk_port: u32,
    /// `skc_state` (`TCP_ESTABLISHED` = 1, ... `TCP_NEW_SYN_RECV` = 12) of the packet's
    /// socket: `sk`, else `rx_sk`; 0 without either. A received packet has one once early
    /// demux found its connection (an established socket, or a handshake's request socket).
    /// Unread: [`unread::SK_STATE`].
    pub sk_state: u32,
    pub _pad: u32,
    /// Return addresses of the kernel stack at the drop, innermost first, 0-padded; filled only
    /// for the reason in `Config::stack_drop_reason` (netfilter drops: the hook's caller).
    pub stack: [u64; DROP_STACK_DEPTH],
}

/// `PacketDrop::icmp` of a packet that is not an ICMP error.
pub const NOT_ICMP: u32 = u32::MAX;

/// Kernel stack frames kept with a netfilter drop: enough to pass the tracing frames,
/// `kfree_skb_reason` and `nf_hook_slow` up to the hook's caller (`ip_local_deliver`, ...).
pub const DROP_STACK_DEPTH: usize = 16;

/// `FirstData::direction`: received.
pub const DATA_IN: u32 = 0;
/// `FirstData::direction`: sent.
pub const DATA_OUT: u32 = 1;

/// `EventKind::FirstData`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FirstData {
    pub header: EventHeader,
    pub skaddr: u64,
    /// [`DATA_IN`] or [`DATA_OUT`].
    pub direction: u32,
    /// Bytes sent by the first `sendmsg` (out); 0 for received data.
    pub bytes: i32,
}

/// `EventKind::CookieSynAck`. The tuple is the SYN-ACK's own: s = the listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CookieSynAck {
    pub header: EventHeader,
    pub tuple: Tuple,
}

/// `EventKind::History`: a quiet connection's [`History`](crate::quiet::History), written
/// right before the first event of it that userspace sees. The header's time is when it was
/// written; the history's own times say when things happened.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryEvent {
    pub header: EventHeader,
    pub skaddr: u64,
    pub history: crate::quiet::History,
}

user_pod!(
    HistoryEvent,
    EventHeader,
    Tuple,
    StateChange,
    ErrorReport,
    Reset,
    SynRetransmit,
    Accept,
    ConnectError,
    PacketDrop,
    FirstData,
    CookieSynAck,
    Retransmit,
    RouteError
);

/// Ties each event struct to its kind(s), so encoding and decoding cannot disagree.
pub trait Event: Copy {
    fn header(&self) -> &EventHeader;
}

macro_rules! impl_event {
    ($($t:ty),*) => {
        $(impl Event for $t {
            fn header(&self) -> &EventHeader {
                &self.header
            }
        })*
    };
}
impl_event!(
    StateChange,
    ErrorReport,
    Reset,
    SynRetransmit,
    Accept,
    ConnectError,
    PacketDrop,
    FirstData,
    CookieSynAck,
    Retransmit,
    HistoryEvent,
    RouteError
);

/// An event read back from the ring buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    StateChange(StateChange),
    ErrorReport(ErrorReport),
    ReceiveReset(Reset),
    SendReset(Reset),
    SynRetransmit(SynRetransmit),
    Accept(Accept),
    ConnectError(ConnectError),
    Drop(PacketDrop),
    FirstData(FirstData),
    CookieSynAck(CookieSynAck),
    Retransmit(Retransmit),
    History(HistoryEvent),
    RouteError(RouteError),
}

/// Why bytes from the ring buffer are not an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than an event header.
    Truncated { len: usize },
    /// The header names a kind this build does not know.
    UnknownKind { kind: u32 },
    /// The header's size, the record's length and the kind's struct size disagree.
    SizeMismatch {
        kind: u32,
        header_size: u32,
        len: usize,
        expected: usize,
    },
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Truncated { len } => write!(f, "event of {len} bytes is shorter than its header"),
            Self::UnknownKind { kind } => write!(f, "unknown event kind {kind}"),
            Self::SizeMismatch {
                kind,
                header_size,
                len,
                expected,
            } => write!(
                f,
                "event kind {kind}: header says {header_size} bytes, record has {len}, expected {expected}"
            ),
        }
    }
}

fn read<T: Event>(bytes: &[u8], kind: u32, header_size: u32) -> Result<T, DecodeError> {
    let expected = size_of::<T>();
    if bytes.len() < expected || header_size as usize != expected {
        return Err(DecodeError::SizeMismatch {
            kind,
            header_size,
            len: bytes.len(),
            expected,
        });
    }
    // SAFETY: length checked above; every `Event` type is plain old data valid for any bytes.
    Ok(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// The header of one ring-buffer record. Errors: a record shorter than a header.
pub fn header(bytes: &[u8]) -> Result<EventHeader, DecodeError> {
    if bytes.len() < size_of::<EventHeader>() {
        return Err(DecodeError::Truncated { len: bytes.len() });
    }
    // SAFETY: length checked; `EventHeader` is plain old data.
    Ok(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<EventHeader>()) })
}

/// Decodes one ring-buffer record. The record may be longer than the event (ring-buffer records
/// are padded to 8 bytes), never shorter.
pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let header = header(bytes)?;
    let (kind, size) = (header.kind, header.size);
    Ok(
        match EventKind::from_u32(kind).ok_or(DecodeError::UnknownKind { kind })? {
            EventKind::StateChange => Decoded::StateChange(read(bytes, kind, size)?),
            EventKind::ErrorReport => Decoded::ErrorReport(read(bytes, kind, size)?),
            EventKind::ReceiveReset => Decoded::ReceiveReset(read(bytes, kind, size)?),
            EventKind::SendReset => Decoded::SendReset(read(bytes, kind, size)?),
            EventKind::SynRetransmit => Decoded::SynRetransmit(read(bytes, kind, size)?),
            EventKind::Accept => Decoded::Accept(read(bytes, kind, size)?),
            EventKind::ConnectError => Decoded::ConnectError(read(bytes, kind, size)?),
            EventKind::Drop => Decoded::Drop(read(bytes, kind, size)?),
            EventKind::FirstData => Decoded::FirstData(read(bytes, kind, size)?),
            EventKind::CookieSynAck => Decoded::CookieSynAck(read(bytes, kind, size)?),
            EventKind::Retransmit => Decoded::Retransmit(read(bytes, kind, size)?),
            EventKind::History => Decoded::History(read(bytes, kind, size)?),
            EventKind::RouteError => Decoded::RouteError(read(bytes, kind, size)?),
        },
    )
}

/// The bytes of an event exactly as the kernel side writes them (used by tests and fuzzing).
pub fn as_bytes<T: Event>(event: &T) -> &[u8] {
    // SAFETY: `T` is `#[repr(C)]` plain old data without implicit padding.
    unsafe { core::slice::from_raw_parts((event as *const T).cast::<u8>(), size_of::<T>()) }
}

/// A header for an event of type `T` and kind `kind`, other fields zero.
pub const fn header_for<T>(kind: EventKind) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        size: size_of::<T>() as u32,
        ts_ns: 0,
        pid: 0,
        unread: 0,
        netns: 0,
        flags: 0,
        comm: [0; COMM_LEN],
    }
}

#[cfg(test)]
mod tests;

/// The fuzz corpus (`fuzz/corpus/decode`, grown by `cargo fuzz run decode`) replayed on every
/// test run: each input decodes or is refused, never panics.
#[cfg(test)]
mod corpus {
    extern crate std;

    #[test]
    fn decode_corpus_replays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/decode");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/decode") {
            let bytes = std::fs::read(entry.expect("entry").path()).expect("read input");
            std::hint::black_box(super::decode(&bytes)).ok();
            n += 1;
        }
        assert!(n > 10, "the corpus is committed: {n} inputs");
    }
}
