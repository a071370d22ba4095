//! One network namespace's TCP connections on traced ports, with the facts that tell a zero
//! window, dumped over netlink `NETLINK_SOCK_DIAG` (`inet_diag`, what `ss -tni` uses).
//!
//! The netlink socket is made once per namespace, by a short-lived thread that enters it (a
//! netlink socket answers for the namespace it was created in, from any thread afterwards), and
//! reused every poll. It keeps the namespace alive while it is open: the watcher drops it when
//! a rescan no longer finds the namespace (no process, no name).
//!
//! The kernel does the filtering: states ESTABLISHED, CLOSE_WAIT and FIN_WAIT1 only, and an
//! `INET_DIAG_REQ_BYTECODE` port filter ([`super::filter`]), so `tcp_info` is built only for
//! traced connections. The kernel still walks its whole established hash table (shared by all
//! namespaces unless `net.ipv4.tcp_child_ehash_entries` is set) for every dump.
//!
//! Replies are decoded here rather than with `NetlinkMessage::<SockDiagMessage>::deserialize`:
//! netlink-packet-sock-diag 0.5 rejects a whole message when an attribute is shorter than it
//! expects (`INET_DIAG_SKMEMINFO` without `SK_MEMINFO_DROPS`), and only two attributes matter.

use std::{io, net::IpAddr, os::fd::AsRawFd as _, path::Path};

use super::{
    super::netns,
    WindowError,
    tcp_info::{Sample, SkMem, TcpInfo},
};
use crate::engine::facts::FourTuple;
use netlink_packet_core::{
    NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NlasIterator, Parseable as _,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, INET_DIAG_INFO, INET_DIAG_SKMEMINFO, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

/// Receive buffer: the kernel fills dump datagrams up to about 32 KiB, so this never truncates.
pub const RECV_BUF: usize = 64 * 1024;
/// `SOCK_DIAG_BY_FAMILY`: the reply's message type.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `sizeof(struct inet_diag_msg)`: the header of each reply, before its attributes.
const DIAG_MSG_LEN: usize = 72;
/// How long one reply may take before the dump counts as failed, seconds.
const RECV_TIMEOUT_S: libc::time_t = 1;

/// A serialized `SOCK_DIAG_BY_FAMILY` dump request for TCP sockets in ESTABLISHED, CLOSE_WAIT
/// and FIN_WAIT1, asking for `ext` and filtered by `bytecode` (none when empty).
pub fn request(seq: u32, family: u8, ext: ExtensionFlags, bytecode: &[u8]) -> Vec<u8> {
    let states = StateFlags::ESTABLISHED | StateFlags::CLOSE_WAIT | StateFlags::FIN_WAIT1;
    crate::host::sockdiag::dump_request(seq, family, states, ext, bytecode)
}

/// A sock_diag netlink socket inside one network namespace.
pub struct NsDiag {
    socket: Socket,
    seq: u32,
}

impl NsDiag {
    /// Opens a sock_diag socket in the namespace `ns_path` opens (`/proc/PID/ns/net`,
    /// `/run/netns/NAME`), checking it is namespace `netns` (the process may have gone and its
    /// pid been reused). Blocking; needs CAP_SYS_ADMIN for setns().
    pub fn open(ns_path: &Path, netns: u32) -> Result<Self, WindowError> {
        let ns = netns::open(ns_path, Some(netns))?;
        // The socket stays in the namespace it was made in.
        let socket = netns::run_in(&ns, ns_path, "windows-diag", || {
            Socket::new(NETLINK_SOCK_DIAG).map_err(WindowError::Socket)
        })??;
        // Connecting autobinds and makes the socket accept datagrams from the kernel only.
        socket
            .connect(&NetlinkAddr::new(0, 0))
            .map_err(WindowError::Connect)?;
        let timeout = libc::timeval {
            tv_sec: RECV_TIMEOUT_S,
            tv_usec: 0,
        };
        // SAFETY: a valid socket and a `timeval` of the size given.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(WindowError::Timeout(io::Error::last_os_error()));
        }
        Ok(Self { socket, seq: 0 })
    }

    /// The record of the one socket `t` (local end first), or `None` when it is gone. `buf`
    /// is scratch space.
    pub fn socket(
        &mut self,
        t: &conntrace_common::Tuple,
        buf: &mut Vec<u8>,
    ) -> Result<Option<Sample>, WindowError> {
        self.seq = self.seq.wrapping_add(1);
        let name = if t.family == conntrace_common::AF_INET6 {
            "AF_INET6"
        } else {
            "AF_INET"
        };
        let req = exact_request(self.seq, t);
        self.socket
            .send(&req, 0)
            .map_err(|source| WindowError::Send {
                family: name,
                source,
            })?;
        let reply = Reply {
            family: name,
            seq: self.seq,
            ports: &[],
        };
        loop {
            buf.clear();
            buf.reserve(RECV_BUF);
            let len = match self.socket.recv(buf, libc::MSG_TRUNC) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(WindowError::Receive {
                        family: name,
                        source,
                    });
                }
            };
            if len > buf.len() {
                return Err(WindowError::Truncated(len));
            }
            // Bounded: each recv waits at most the socket's receive timeout.
            if let Some(answer) = reply.parse_exact(buf)? {
                return Ok(answer);
            }
        }
    }

    /// Appends both families' connections matching `bytecode` and `ports` (empty: all) to
    /// `out`, with `tcp_info` and, when `skmem`, `SK_MEMINFO`. `buf` is scratch space.
    pub fn dump(
        &mut self,
        bytecode: &[u8],
        ports: &[u16],
        skmem: bool,
        buf: &mut Vec<u8>,
        out: &mut Vec<(FourTuple, Sample)>,
    ) -> Result<(), WindowError> {
        let mut ext = ExtensionFlags::INFO;
        if skmem {
            ext |= ExtensionFlags::SKMEMINFO;
        }
        for (family, name) in [(AF_INET, "AF_INET"), (AF_INET6, "AF_INET6")] {
            self.seq = self.seq.wrapping_add(1);
            let req = request(self.seq, family, ext.clone(), bytecode);
            self.socket
                .send(&req, 0)
                .map_err(|source| WindowError::Send {
                    family: name,
                    source,
                })?;
            let reply = Reply {
                family: name,
                seq: self.seq,
                ports,
            };
            loop {
                buf.clear();
                buf.reserve(RECV_BUF);
                // MSG_TRUNC: the return value is the datagram's real length, so truncation shows.
                let len = match self.socket.recv(buf, libc::MSG_TRUNC) {
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(source) => {
                        return Err(WindowError::Receive {
                            family: name,
                            source,
                        });
                    }
                };
                if len > buf.len() {
                    return Err(WindowError::Truncated(len));
                }
                if reply.parse_datagram(buf, out)? {
                    break;
                }
            }
        }
        Ok(())
    }
}

/// A serialized `SOCK_DIAG_BY_FAMILY` request for the one TCP socket `t` (local end first, as
/// the kernel's own record has it), asking for `tcp_info`.
pub fn exact_request(seq: u32, t: &conntrace_common::Tuple) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = seq;
    let v6 = t.family == conntrace_common::AF_INET6;
    let addr = |b: &[u8; 16]| -> IpAddr {
        if v6 {
            IpAddr::V6(std::net::Ipv6Addr::from(*b))
        } else {
            IpAddr::V4(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        }
    };
    let socket_id = SocketId {
        source_port: t.sport,
        destination_port: t.dport,
        source_address: addr(&t.saddr),
        destination_address: addr(&t.daddr),
        interface_id: 0,
        // INET_DIAG_NOCOOKIE: any socket with this tuple.
        cookie: [0xff; 8],
    };
    let mut msg = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family: if v6 { AF_INET6 } else { AF_INET },
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::INFO,
            states: StateFlags::all(),
            socket_id,
        })
        .into(),
    );
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// What a reply datagram is checked against.
pub struct Reply<'a> {
    pub family: &'static str,
    /// The request's sequence number: messages with another (left from a failed dump) are
    /// skipped.
    pub seq: u32,
    pub ports: &'a [u16],
}

impl Reply<'_> {
    /// Decodes one datagram of a dump reply into `out`. True once NLMSG_DONE was seen.
    pub fn parse_datagram(
        &self,
        bytes: &[u8],
        out: &mut Vec<(FourTuple, Sample)>,
    ) -> Result<bool, WindowError> {
        let kernel = |code: i32| WindowError::Kernel {
            family: self.family,
            errno: code.saturating_abs(),
        };
        for msg in messages(bytes) {
            let msg = msg?;
            let payload = msg.payload();
            let code = || {
                payload
                    .get(..4)
                    .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            };
            if msg.sequence_number() == self.seq {
                match msg.message_type() {
                    SOCK_DIAG_BY_FAMILY => out.extend(self.sample(payload)?),
                    // Both carry a negative errno; an NLMSG_ERROR with code 0 is an ACK.
                    NLMSG_DONE if code() >= 0 => return Ok(true),
                    NLMSG_DONE => return Err(kernel(code())),
                    NLMSG_ERROR if code() != 0 => return Err(kernel(code())),
                    NLMSG_ERROR | NLMSG_NOOP => {}
                    _ => return Err(WindowError::Decode("not an inet_diag message".into())),
                }
            }
        }
        Ok(false)
    }

    /// The reply to an [`exact_request`] in one datagram: `Some` with the socket's record, or
    /// with `None` when the kernel has no such socket (ENOENT: it closed); `None` when the
    /// datagram holds no answer to this request (one left from an earlier request).
    pub fn parse_exact(&self, bytes: &[u8]) -> Result<Option<Option<Sample>>, WindowError> {
        let mut out = Vec::new();
        match self.parse_datagram(bytes, &mut out) {
            Err(WindowError::Kernel { errno, .. }) if errno == libc::ENOENT => Ok(Some(None)),
            Err(e) => Err(e),
            Ok(_) => match out.pop() {
                Some((_, s)) => Ok(Some(Some(s))),
                // A record without `tcp_info`: the tuple's socket is a TIME_WAIT (or request)
                // socket, its full socket closed. Waiting on for another datagram blocked the
                // check for the receive timeout, a second per such connection.
                None if self.answers(bytes) => Ok(Some(None)),
                None => Ok(None),
            },
        }
    }

    /// Whether `bytes` hold a socket record with this request's sequence number.
    fn answers(&self, bytes: &[u8]) -> bool {
        messages(bytes).map_while(Result::ok).any(|msg| {
            msg.sequence_number() == self.seq && msg.message_type() == SOCK_DIAG_BY_FAMILY
        })
    }

    /// One `struct inet_diag_msg` and its attributes: the connection (local end first) and its
    /// window facts; `None` when its ports are not traced or it carries no `tcp_info`.
    fn sample(&self, payload: &[u8]) -> Result<Option<(FourTuple, Sample)>, WindowError> {
        let decode = |what: &str| WindowError::Decode(format!("inet_diag_msg: {what}"));
        let head = payload.get(..DIAG_MSG_LEN).ok_or_else(|| decode("short"))?;
        let h = InetResponseHeader::parse(head).map_err(|e| decode(&e.to_string()))?;
        let id = &h.socket_id;
        let traced = |p: u16| self.ports.contains(&p);
        if !self.ports.is_empty() && !traced(id.source_port) && !traced(id.destination_port) {
            return Ok(None);
        }
        let (mut info, mut skmem) = (None, None);
        for nla in NlasIterator::new(&payload[DIAG_MSG_LEN..]) {
            let nla = nla.map_err(|e| decode(&e.to_string()))?;
            match nla.kind() {
                INET_DIAG_INFO => info = TcpInfo::parse(nla.value()),
                INET_DIAG_SKMEMINFO => skmem = SkMem::parse(nla.value()),
                _ => {}
            }
        }
        let Some(info) = info else {
            return Ok(None);
        };
        let tuple = FourTuple {
            saddr: canonical(id.source_address),
            sport: id.source_port,
            daddr: canonical(id.destination_address),
            dport: id.destination_port,
        };
        // `state` and `timer` as the kernel sent them (the crate turns them into enums).
        let (state, timer) = (payload[1], payload[2]);
        let sample = Sample {
            rqueue: h.recv_queue,
            wqueue: h.send_queue,
            state,
            timer,
            info,
            skmem,
            inode: h.inode,
        };
        Ok(Some((tuple, sample)))
    }
}

/// The netlink messages of one datagram, in order; an error (and the end) at the first whose
/// length field does not cover a header or overruns the datagram.
fn messages(mut bytes: &[u8]) -> impl Iterator<Item = Result<NetlinkBuffer<&[u8]>, WindowError>> {
    std::iter::from_fn(move || {
        if bytes.is_empty() {
            return None;
        }
        let msg = match NetlinkBuffer::new_checked(bytes) {
            Ok(msg) => msg,
            Err(e) => {
                bytes = &[];
                return Some(Err(WindowError::Decode(e.to_string())));
            }
        };
        // Messages in a datagram start on 4-byte boundaries (NLMSG_ALIGN).
        let next = (msg.length() as usize).next_multiple_of(4);
        bytes = bytes.get(next..).unwrap_or_default();
        Some(Ok(msg))
    })
}

/// Dual-stack sockets report IPv4 peers as `::ffff:a.b.c.d`; events carry them as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use netlink_packet_core::Emitable as _;
    use netlink_packet_sock_diag::inet::Timer;

    use super::*;
    use crate::host::windows::tcp_info::{TIMER_PERSIST, tests::tcp_info_bytes};

    #[test]
    fn request_asks_for_established_tcp_with_info_and_filter() {
        let bc = super::super::filter::port_filter(&[3306]);
        let ext = ExtensionFlags::INFO | ExtensionFlags::SKMEMINFO;
        let req = request(7, AF_INET, ext, &bc);
        let u32_at = |i: usize| u32::from_ne_bytes([req[i], req[i + 1], req[i + 2], req[i + 3]]);
        // nlmsghdr (16) + inet_diag_req_v2 (56) + nlattr (4) + program (36).
        assert_eq!(req.len(), 112);
        assert_eq!((u32_at(0), u32_at(4), u32_at(8)), (112, 0x0301_0014, 7));
        assert_eq!(&req[16..20], &[AF_INET, IPPROTO_TCP, 0x42, 0]);
        assert_eq!(
            u32_at(20),
            1 << 1 | 1 << 4 | 1 << 8,
            "ESTABLISHED, FIN_WAIT1, CLOSE_WAIT"
        );
        assert_eq!(
            &req[72..76],
            &[40, 0, 1, 0],
            "INET_DIAG_REQ_BYTECODE of 40 bytes"
        );
        assert_eq!(&req[76..], &bc[..]);
        assert_eq!(request(1, AF_INET6, ExtensionFlags::INFO, &[]).len(), 72);
    }

    fn nlmsg(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = (16 + payload.len()) as u32;
        let mut m = [len.to_ne_bytes(), [0; 4], seq.to_ne_bytes(), [0; 4]].concat();
        m[4..6].copy_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(m.len().next_multiple_of(4), 0);
        m
    }

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = [((4 + value.len()) as u16).to_ne_bytes(), kind.to_ne_bytes()].concat();
        a.extend_from_slice(value);
        a.resize(a.len().next_multiple_of(4), 0);
        a
    }

    /// A reply for `src` -> `dst` with 7 bytes unread and 462344 unsent, the persist timer
    /// armed, a congestion-control name, `tcp_info` (peer's window zero) if `info`, and
    /// `SK_MEMINFO`.
    fn reply(seq: u32, src: &str, dst: &str, info: bool) -> Vec<u8> {
        let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        let mut socket_id = if src.is_ipv6() {
            SocketId::new_v6()
        } else {
            SocketId::new_v4()
        };
        (socket_id.source_address, socket_id.source_port) = (src.ip(), src.port());
        (socket_id.destination_address, socket_id.destination_port) = (dst.ip(), dst.port());
        let header = InetResponseHeader {
            family: if src.is_ipv6() { AF_INET6 } else { AF_INET },
            state: 1,
            timer: Some(Timer::Probe(std::time::Duration::from_millis(1916))),
            socket_id,
            recv_queue: 7,
            send_queue: 462_344,
            uid: 0,
            inode: 1,
        };
        let mut payload = vec![0; header.buffer_len()];
        header.emit(&mut payload);
        payload.extend(nla(4, b"bbr\0"));
        if info {
            payload.extend(nla(INET_DIAG_INFO, &tcp_info_bytes(280, 0, 0, 65536)));
        }
        payload.extend(nla(
            INET_DIAG_SKMEMINFO,
            &[9u32; 9].map(u32::to_ne_bytes).concat(),
        ));
        nlmsg(SOCK_DIAG_BY_FAMILY, seq, &payload)
    }

    fn done(seq: u32, code: i32) -> Vec<u8> {
        nlmsg(NLMSG_DONE, seq, &code.to_ne_bytes())
    }

    fn pair(t: &FourTuple) -> (String, String) {
        let end = |ip, port| SocketAddr::new(ip, port).to_string();
        (end(t.saddr, t.sport), end(t.daddr, t.dport))
    }

    #[test]
    fn decodes_connections_with_their_window_facts() {
        let ports = [3306];
        let r = Reply {
            family: "AF_INET",
            seq: 5,
            ports: &ports,
        };
        let mut datagram = reply(5, "10.0.0.1:40000", "10.0.0.2:3306", true);
        datagram.extend(reply(5, "10.0.0.1:40001", "10.0.0.2:80", true)); // not traced
        datagram.extend(reply(5, "10.0.0.1:40002", "10.0.0.2:3306", false)); // no tcp_info
        datagram.extend(reply(4, "10.0.0.1:40003", "10.0.0.2:3306", true)); // stale
        let mut out = Vec::new();
        assert!(!r.parse_datagram(&datagram, &mut out).unwrap());
        assert_eq!(out.len(), 1, "{out:?}");
        let (tuple, s) = out[0];
        assert_eq!(
            pair(&tuple),
            ("10.0.0.1:40000".into(), "10.0.0.2:3306".into())
        );
        assert_eq!((s.rqueue, s.wqueue, s.timer), (7, 462_344, TIMER_PERSIST));
        assert_eq!((s.info.snd_wnd, s.info.rcv_wnd), (Some(0), Some(65536)));
        assert_eq!(
            s.skmem.map(|m| (m.rmem_alloc, m.rcvbuf, m.backlog)),
            Some((9, 9, 9))
        );
        assert!(
            !r.parse_datagram(&done(4, 0), &mut out).unwrap(),
            "another dump's end"
        );
        assert!(r.parse_datagram(&done(5, 0), &mut out).unwrap());
    }

    #[test]
    fn ipv4_mapped_peers_are_ipv4_and_no_ports_means_all() {
        let r = Reply {
            family: "AF_INET6",
            seq: 1,
            ports: &[],
        };
        let mut datagram = reply(1, "[::ffff:10.0.0.1]:1", "[::ffff:10.0.0.2]:2", true);
        datagram.extend(reply(1, "[fe80::1]:3", "[fe80::2]:4", true));
        datagram.extend(done(1, 0));
        let mut out = Vec::new();
        assert!(r.parse_datagram(&datagram, &mut out).unwrap());
        let tuples: Vec<_> = out.iter().map(|(t, _)| pair(t)).collect();
        assert_eq!(
            tuples,
            [
                ("10.0.0.1:1".into(), "10.0.0.2:2".into()),
                ("[fe80::1]:3".into(), "[fe80::2]:4".into())
            ]
        );
    }

    #[test]
    fn an_exact_answer_without_tcp_info_is_a_closed_connection_and_an_old_one_is_no_answer() {
        let r = Reply {
            family: "AF_INET",
            seq: 9,
            ports: &[],
        };
        let found = reply(9, "10.0.0.1:40000", "10.0.0.2:3306", true);
        assert!(matches!(r.parse_exact(&found), Ok(Some(Some(_)))));
        // TIME_WAIT: the record comes without tcp_info.
        let time_wait = reply(9, "10.0.0.1:40000", "10.0.0.2:3306", false);
        assert!(matches!(r.parse_exact(&time_wait), Ok(Some(None))));
        let gone = nlmsg(NLMSG_ERROR, 9, &(-libc::ENOENT).to_ne_bytes());
        assert!(matches!(r.parse_exact(&gone), Ok(Some(None))));
        // An earlier request's answer, whatever it holds, is not this one's.
        let earlier = reply(8, "10.0.0.1:40000", "10.0.0.2:3306", false);
        assert!(matches!(r.parse_exact(&earlier), Ok(None)));
    }

    #[test]
    fn kernel_errors_and_garbage() {
        let r = Reply {
            family: "AF_INET6",
            seq: 2,
            ports: &[],
        };
        let nack = nlmsg(NLMSG_ERROR, 2, &(-libc::EPERM).to_ne_bytes());
        for (datagram, want) in [
            (nack, libc::EPERM),
            (done(2, -libc::ENOBUFS), libc::ENOBUFS),
        ] {
            let err = r.parse_datagram(&datagram, &mut Vec::new()).unwrap_err();
            assert!(
                matches!(err, WindowError::Kernel { family: "AF_INET6", errno } if errno == want),
                "{err:?}"
            );
        }
        let ack = nlmsg(NLMSG_ERROR, 2, &0i32.to_ne_bytes());
        assert!(!r.parse_datagram(&ack, &mut Vec::new()).unwrap());
        let mut cut = reply(2, "10.0.0.1:1", "10.0.0.2:2", true);
        cut.truncate(40);
        let short = nlmsg(SOCK_DIAG_BY_FAMILY, 2, &[0; 20]);
        let other = nlmsg(16, 2, &[0; 4]);
        for datagram in [&[1, 2, 3][..], &cut, &short, &other] {
            let res = r.parse_datagram(datagram, &mut Vec::new());
            assert!(matches!(res, Err(WindowError::Decode(_))), "{res:?}");
        }
    }
}
