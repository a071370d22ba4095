//! Whether a connection's window is zero, from what inet_diag reports about its socket: the
//! queues of `struct inet_diag_msg`, its timer, and the raw bytes of the `INET_DIAG_INFO`
//! (`struct tcp_info`, include/uapi/linux/tcp.h) and `INET_DIAG_SKMEMINFO` (`u32[SK_MEMINFO_*]`,
//! include/uapi/linux/sock_diag.h) attributes.
//!
//! The kernel puts its own `sizeof(struct tcp_info)` into the attribute (inet_diag.c:
//! `nla_reserve_64bit(skb, INET_DIAG_INFO, handler->idiag_info_size, ...)`), so the payload's
//! length tells which fields this kernel has: a field is present when the payload covers it.
//! netlink-packet-sock-diag 0.5 hands this attribute over as bytes (without its `rich_nlas`
//! feature; with it, it rejects structs shorter than 5.4's and still lacks `tcpi_rcv_wnd`), so
//! the fields are read here at their offsets. All fields are in host byte order.
//!
//! | offset | field | type | since | meaning |
//! |---|---|---|---|---|
//! | 3 | `tcpi_probes` | u8 | 2.6 | zero-window (or keepalive) probes sent, unanswered (`icsk_probes_out`) |
//! | 20 | `tcpi_rcv_mss` | u32 | 2.6 | the peer's segment size as seen here, bytes |
//! | 228 | `tcpi_snd_wnd` | u32 | 5.4 | the window the peer advertises, scaled, bytes |
//! | 232 | `tcpi_rcv_wnd` | u32 | 6.2 | the window this socket last advertised, scaled, bytes |
//!
//! Sizes: 232 bytes on 5.4 to 6.1 (the struct ends with `tcpi_snd_wnd`), 280 on 6.18 (BTF of
//! this project's test host). Sources for the versions: Linux 5.4 added `tcpi_snd_wnd`
//! (esnet/iperf#1148), 6.2 added `tcpi_rcv_wnd` and `tcpi_rehash` (iproute2 "ss: add support for
//! rcv_wnd and rehash", 2023); the offsets were checked against this host's BTF.

use crate::engine::facts::Window;

/// Offsets into `struct tcp_info` (see the table above).
pub const PROBES: usize = 3;
pub const RCV_MSS: usize = 20;
pub const SND_WND: usize = 228;
pub const RCV_WND: usize = 232;
/// `tcpi_bytes_received` (u64, 4.1+), `tcpi_data_segs_out` (u32, 4.6+) and `tcpi_bytes_sent`
/// (u64, 4.19+).
pub const BYTES_RECEIVED: usize = 128;
pub const DATA_SEGS_OUT: usize = 156;
pub const BYTES_SENT: usize = 200;

/// Indexes into the `INET_DIAG_SKMEMINFO` array of u32.
pub const SK_MEMINFO_RMEM_ALLOC: usize = 0;
pub const SK_MEMINFO_RCVBUF: usize = 1;
pub const SK_MEMINFO_BACKLOG: usize = 7;

/// `idiag_timer` of `struct inet_diag_msg` when the zero-window probe (persist) timer is armed
/// (`ICSK_TIME_PROBE0`; what `ss` shows as `timer:(persist,...)`).
pub const TIMER_PERSIST: u8 = 4;

/// The `tcp_info` fields the window test reads; `None` where this kernel's struct ends before
/// the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpInfo {
    pub probes: u8,
    /// Bytes.
    pub rcv_mss: u32,
    /// Bytes, scaled (5.4+).
    pub snd_wnd: Option<u32>,
    /// Bytes, scaled (6.2+).
    pub rcv_wnd: Option<u32>,
    /// Payload bytes received so far (4.1+).
    pub bytes_received: Option<u64>,
    /// Whether it has sent data: `tcpi_bytes_sent > 0` (4.19+), else `tcpi_data_segs_out > 0`
    /// (4.6+).
    pub sent_data: Option<bool>,
}

fn u64_at(bytes: &[u8], offset: usize) -> Option<u64> {
    let b = bytes.get(offset..offset + 8)?;
    Some(u64::from_ne_bytes([
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
    ]))
}

fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    let b = bytes.get(offset..offset + 4)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

impl TcpInfo {
    /// Reads the payload of an `INET_DIAG_INFO` attribute. `None` when it is too short to hold
    /// `tcpi_rcv_mss` (every kernel's struct does: 104 bytes or more).
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        Some(Self {
            probes: *bytes.get(PROBES)?,
            rcv_mss: u32_at(bytes, RCV_MSS)?,
            snd_wnd: u32_at(bytes, SND_WND),
            rcv_wnd: u32_at(bytes, RCV_WND),
            bytes_received: u64_at(bytes, BYTES_RECEIVED),
            sent_data: u64_at(bytes, BYTES_SENT)
                .map(|n| n > 0)
                .or_else(|| u32_at(bytes, DATA_SEGS_OUT).map(|n| n > 0)),
        })
    }
}

/// The receive-side socket memory (`INET_DIAG_SKMEMINFO`), bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkMem {
    /// `sk_rmem_alloc`: memory the receive queue holds (data and skb overhead).
    pub rmem_alloc: u32,
    /// `sk_rcvbuf`: its limit.
    pub rcvbuf: u32,
    /// `sk_backlog.len`: received while the socket was locked, not yet queued; 0 when absent.
    pub backlog: u32,
}

impl SkMem {
    /// Reads the payload of an `INET_DIAG_SKMEMINFO` attribute; `None` when it lacks the first
    /// two entries.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        Some(Self {
            rmem_alloc: u32_at(bytes, SK_MEMINFO_RMEM_ALLOC * 4)?,
            rcvbuf: u32_at(bytes, SK_MEMINFO_RCVBUF * 4)?,
            backlog: u32_at(bytes, SK_MEMINFO_BACKLOG * 4).unwrap_or(0),
        })
    }

    /// Whether the kernel would advertise a zero window with this much room left, for kernels
    /// without `tcpi_rcv_wnd`. `__tcp_select_window` (net/ipv4/tcp_output.c) returns 0 when the
    /// free space is below 1/16 of the buffer or below one MSS, both in window units
    /// (`tcp_win_from_space`: before 6.7, `space - space >> tcp_adv_win_scale`, half the bytes at
    /// the default scale 1). In bytes of buffer: free < max(rcvbuf / 16, 2 × rcv_mss).
    pub fn window_closed(&self, rcv_mss: u32) -> bool {
        let free = self
            .rcvbuf
            .saturating_sub(self.rmem_alloc)
            .saturating_sub(self.backlog);
        free < (self.rcvbuf / 16).max(rcv_mss.saturating_mul(2))
    }
}

/// What one socket's inet_diag record says about its windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// `idiag_rqueue`: bytes received, not yet read (`rcv_nxt - copied_seq`).
    pub rqueue: u32,
    /// `idiag_wqueue`: bytes written, not yet acknowledged (`write_seq - snd_una`).
    pub wqueue: u32,
    /// `idiag_state`: the kernel's `TCP_*` state number.
    pub state: u8,
    /// `idiag_timer`.
    pub timer: u8,
    pub info: TcpInfo,
    /// Asked for only while the kernel's `tcp_info` lacks `tcpi_rcv_wnd`.
    pub skmem: Option<SkMem>,
    /// `idiag_inode`: the socket's inode, 0 while no process holds it (not yet accepted).
    pub inode: u32,
}

impl Sample {
    /// The peer's window is zero and data waits: `tcpi_snd_wnd == 0` (5.4+); before 5.4 the
    /// sender's own judgement, the persist timer armed or probes unanswered.
    pub fn peer_zero(&self) -> bool {
        self.wqueue > 0
            && match self.info.snd_wnd {
                Some(w) => w == 0,
                None => self.timer == TIMER_PERSIST || self.info.probes > 0,
            }
    }

    /// This socket advertises a zero window with data unread: `tcpi_rcv_wnd == 0` (6.2+);
    /// before 6.2 the receive buffer's room ([`SkMem::window_closed`]); `false` when neither is
    /// known.
    pub fn local_full(&self) -> bool {
        self.rqueue > 0
            && match (self.info.rcv_wnd, self.skmem) {
                (Some(w), _) => w == 0,
                (None, Some(m)) => m.window_closed(self.info.rcv_mss),
                (None, None) => false,
            }
    }

    /// The zero window this socket shows, if any: `PeerZero` with the send queue or
    /// `LocalFull` with the receive queue, bytes. `PeerZero` wins when both are (each end then
    /// waits for the other; the send queue is what holds this host's data back).
    pub fn closed(&self) -> Option<Window> {
        if self.peer_zero() {
            Some(Window::PeerZero {
                queued: u64::from(self.wqueue),
            })
        } else if self.local_full() {
            Some(Window::LocalFull {
                queued: u64::from(self.rqueue),
            })
        } else {
            None
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A `struct tcp_info` of `len` bytes (232: 5.4–6.1; 280: 6.18; 104: 2.6–4.1) with the
    /// given fields; fields past `len` are left out, as an older kernel would.
    pub(crate) fn tcp_info_bytes(len: usize, probes: u8, snd_wnd: u32, rcv_wnd: u32) -> Vec<u8> {
        let mut b = vec![0u8; len.max(RCV_WND + 4)];
        b[0] = 1; // tcpi_state: ESTABLISHED
        b[PROBES] = probes;
        b[RCV_MSS..RCV_MSS + 4].copy_from_slice(&1448u32.to_ne_bytes());
        b[SND_WND..SND_WND + 4].copy_from_slice(&snd_wnd.to_ne_bytes());
        b[RCV_WND..RCV_WND + 4].copy_from_slice(&rcv_wnd.to_ne_bytes());
        b.truncate(len);
        b
    }

    #[test]
    fn fields_present_by_the_struct_size() {
        let full = TcpInfo::parse(&tcp_info_bytes(280, 2, 0, 65536)).unwrap();
        assert_eq!(
            full,
            TcpInfo {
                probes: 2,
                rcv_mss: 1448,
                snd_wnd: Some(0),
                rcv_wnd: Some(65536),
                bytes_received: Some(0),
                sent_data: Some(false),
            }
        );
        let v5_4 = TcpInfo::parse(&tcp_info_bytes(232, 0, 64512, 7)).unwrap();
        assert_eq!((v5_4.snd_wnd, v5_4.rcv_wnd), (Some(64512), None));
        let old = TcpInfo::parse(&tcp_info_bytes(104, 1, 9, 9)).unwrap();
        assert_eq!((old.probes, old.snd_wnd, old.rcv_wnd), (1, None, None));
        // One byte short of a field: the field is absent, not read from beyond the payload.
        let cut = TcpInfo::parse(&tcp_info_bytes(SND_WND + 3, 0, 0, 0)).unwrap();
        assert_eq!(cut.snd_wnd, None);
        assert_eq!(TcpInfo::parse(&[0; RCV_MSS + 3]), None);
    }

    fn sample(rqueue: u32, wqueue: u32, info: &[u8]) -> Sample {
        Sample {
            rqueue,
            wqueue,
            state: 1,
            timer: 0,
            info: TcpInfo::parse(info).unwrap(),
            skmem: None,
            inode: 0,
        }
    }

    #[test]
    fn sender_side_zero_window_needs_data_queued() {
        let zero = tcp_info_bytes(280, 0, 0, 65536);
        let open = tcp_info_bytes(280, 0, 64512, 65536);
        let closed = |s: Sample| s.closed();
        assert_eq!(
            closed(sample(0, 462_344, &zero)),
            Some(Window::PeerZero { queued: 462_344 })
        );
        assert_eq!(closed(sample(0, 0, &zero)), None, "nothing to send");
        assert_eq!(closed(sample(0, 462_344, &open)), None);
        // 5.4-6.1: snd_wnd decides, the timer does not.
        let mut s = sample(0, 10, &tcp_info_bytes(232, 0, 64512, 0));
        s.timer = TIMER_PERSIST;
        assert_eq!(s.closed(), None);
    }

    #[test]
    fn before_5_4_the_persist_timer_or_probes_tell() {
        let info = tcp_info_bytes(224, 0, 0, 0);
        let mut s = sample(0, 100, &info);
        assert_eq!(s.closed(), None, "no timer, no probes");
        s.timer = TIMER_PERSIST;
        assert_eq!(s.closed(), Some(Window::PeerZero { queued: 100 }));
        let mut s = sample(0, 100, &tcp_info_bytes(224, 3, 0, 0));
        assert_eq!(s.closed(), Some(Window::PeerZero { queued: 100 }));
        s.wqueue = 0;
        assert_eq!(s.closed(), None);
    }

    #[test]
    fn receiver_side_zero_window() {
        let zero = tcp_info_bytes(280, 0, 64512, 0);
        assert_eq!(
            sample(127_480, 0, &zero).closed(),
            Some(Window::LocalFull { queued: 127_480 })
        );
        assert_eq!(sample(0, 0, &zero).closed(), None, "nothing unread");
        let open = tcp_info_bytes(280, 0, 64512, 1024);
        assert_eq!(sample(127_480, 0, &open).closed(), None);
        // Both: the peer's zero window is named.
        let both = tcp_info_bytes(280, 0, 0, 0);
        assert_eq!(
            sample(5, 7, &both).closed(),
            Some(Window::PeerZero { queued: 7 })
        );
    }

    #[test]
    fn before_6_2_the_receive_buffer_tells() {
        let info = tcp_info_bytes(232, 0, 64512, 0);
        let mut s = sample(127_480, 0, &info);
        assert_eq!(s.closed(), None, "no skmem: unknown, not zero");
        // Measured on a stalled server (notes, section 7): r129144 rb131072 bl0.
        let full = SkMem::parse(
            &[129_144u32, 131_072, 0, 69_120, 1928, 0, 0, 0, 5]
                .map(u32::to_ne_bytes)
                .concat(),
        )
        .unwrap();
        assert_eq!(full.backlog, 0);
        s.skmem = Some(full);
        assert_eq!(s.closed(), Some(Window::LocalFull { queued: 127_480 }));
        // Half the buffer free: open. An 8-entry array (no SK_MEMINFO_DROPS) parses too.
        let half = [65_536u32, 131_072, 0, 0, 0, 0, 0, 0]
            .map(u32::to_ne_bytes)
            .concat();
        s.skmem = SkMem::parse(&half);
        assert_eq!(s.closed(), None);
        // Room for less than two segments of 1448 bytes in a small buffer: closed.
        let small = SkMem {
            rmem_alloc: 30_000,
            rcvbuf: 32_768,
            backlog: 0,
        };
        assert!(small.window_closed(1448));
        assert!(!small.window_closed(1000));
        assert_eq!(SkMem::parse(&[0; 7]), None);
    }
}
