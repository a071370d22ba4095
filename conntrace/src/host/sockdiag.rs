//! LISTEN TCP sockets of a network namespace with their accept queue and backlog limit, asked
//! from the kernel over netlink `NETLINK_SOCK_DIAG` (`inet_diag`, what `ss -ltn` uses).
//!
//! /proc/net/tcp shows a listener's accept queue but not its backlog limit, so it cannot tell
//! a full accept queue (SYNs dropped, `ListenOverflows`) from a busy one. For a listener,
//! inet_diag reports `idiag_rqueue` = `sk_ack_backlog` (connections waiting for accept()) and
//! `idiag_wqueue` = `sk_max_ack_backlog` (the listen() backlog).
//!
//! A netlink socket belongs to the network namespace of the thread that creates it, so the
//! query runs in a short-lived thread that first enters the target namespace; the caller's
//! namespace never changes.

use std::{
    io,
    net::{IpAddr, SocketAddr, SocketAddrV6},
    path::Path,
};

use netlink_packet_core::{
    DecodeError, ErrorMessage, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, TCP_LISTEN},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

use super::netns::{self, EnterError};

/// Receive buffer: the kernel fills dump datagrams up to about 32 KiB, so this never truncates.
const RECV_BUF: usize = 64 * 1024;

/// A listening TCP socket as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSocket {
    /// Local address; IPv6 sockets as they are (`[::]:3306`), link-local ones with their scope.
    pub addr: SocketAddr,
    /// Connections completed by the kernel and waiting for accept() (`sk_ack_backlog`).
    pub accept_queue: u32,
    /// The listen() backlog, capped by net.core.somaxconn (`sk_max_ack_backlog`).
    pub backlog: u32,
    pub inode: u64,
    /// An IPv6 socket's `IPV6_V6ONLY` (`INET_DIAG_SKV6ONLY`): set, a wildcard `[::]` listener
    /// takes no IPv4 connection. `None` for IPv4 sockets, or when the kernel sent none.
    pub v6only: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    #[error(transparent)]
    Enter(#[from] EnterError),
    #[error("netlink socket(NETLINK_SOCK_DIAG): {0}")]
    Socket(io::Error),
    #[error("connect netlink socket to the kernel: {0}")]
    Connect(io::Error),
    #[error("send inet_diag request: {0}")]
    Send(io::Error),
    #[error("receive inet_diag reply: {0}")]
    Receive(io::Error),
    #[error("receive inet_diag reply: datagram of {0} bytes truncated to {RECV_BUF}")]
    Truncated(usize),
    #[error("decode inet_diag reply: {0}")]
    Decode(DecodeError),
    #[error("decode inet_diag reply: {0}")]
    Unexpected(&'static str),
    #[error("inet_diag {family} dump failed: {}", io::Error::from_raw_os_error(*.errno))]
    Kernel { family: &'static str, errno: i32 },
}

/// LISTEN sockets on `port` (all ports when `None`), IPv4 and IPv6, in the network namespace
/// that `ns_path` opens (e.g. `/proc/1234/ns/net` or `/run/netns/foo`). Blocking; needs
/// CAP_SYS_ADMIN for setns().
pub fn listeners(ns_path: &Path, port: Option<u16>) -> Result<Vec<ListenSocket>, DiagError> {
    let ns = netns::open(ns_path, None)?;
    netns::run_in(&ns, ns_path, "sockdiag", || dump_listeners(port))?
}

/// Both families' LISTEN sockets in the current thread's network namespace.
fn dump_listeners(port: Option<u16>) -> Result<Vec<ListenSocket>, DiagError> {
    let socket = open()?;
    let mut found = Vec::new();
    for (seq, family) in [(1, AF_INET), (2, AF_INET6)] {
        dump_tcp(&socket, seq, family, StateFlags::LISTEN, &mut |r| {
            found.extend(listen_socket(r, port));
        })?;
    }
    Ok(found)
}

/// A `NETLINK_SOCK_DIAG` socket in the current thread's network namespace, connected to the
/// kernel.
pub(crate) fn open() -> Result<Socket, DiagError> {
    let socket = Socket::new(NETLINK_SOCK_DIAG).map_err(DiagError::Socket)?;
    // Connecting autobinds and makes the socket accept datagrams from the kernel only.
    socket
        .connect(&NetlinkAddr::new(0, 0))
        .map_err(DiagError::Connect)?;
    Ok(socket)
}

/// Dumps the TCP sockets of `family` (`AF_INET` or `AF_INET6`) whose state is in `states`
/// from the namespace `socket` was opened in, handing each reply to `each`.
/// `seq` numbers the request. Blocking; the kernel answers at once.
pub(crate) fn dump_tcp(
    socket: &Socket,
    seq: u32,
    family: u8,
    states: StateFlags,
    each: &mut dyn FnMut(&InetResponse),
) -> Result<(), DiagError> {
    let name = if family == AF_INET6 {
        "AF_INET6"
    } else {
        "AF_INET"
    };
    socket
        .send(
            &dump_request(seq, family, states, ExtensionFlags::empty(), &[]),
            0,
        )
        .map_err(DiagError::Send)?;
    let mut buf = Vec::with_capacity(RECV_BUF);
    loop {
        buf.clear();
        // MSG_TRUNC: the return value is the datagram's real length, so truncation shows.
        let len = match socket.recv(&mut buf, libc::MSG_TRUNC) {
            Ok(len) => len,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DiagError::Receive(e)),
        };
        if len > buf.len() {
            return Err(DiagError::Truncated(len));
        }
        if parse_datagram(&buf, name, each)? {
            return Ok(());
        }
    }
}

/// A serialized `SOCK_DIAG_BY_FAMILY` dump request for TCP sockets in `states`, asking for
/// `ext` and filtered by `bytecode` (an `INET_DIAG_REQ_BYTECODE` program; none when empty).
pub(crate) fn dump_request(
    seq: u32,
    family: u8,
    states: StateFlags,
    ext: ExtensionFlags,
    bytecode: &[u8],
) -> Vec<u8> {
    /// `INET_DIAG_REQ_BYTECODE`: the request attribute holding a filter program.
    const REQ_BYTECODE: u16 = 1;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let socket_id = if family == AF_INET6 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    };
    let mut msg = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ext,
            states,
            socket_id,
        })
        .into(),
    );
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    if !bytecode.is_empty() {
        // struct nlattr { u16 nla_len; u16 nla_type; } then the program (a multiple of 4).
        let attr_len = u16::try_from(4 + bytecode.len()).unwrap_or(u16::MAX);
        buf.extend_from_slice(&attr_len.to_ne_bytes());
        buf.extend_from_slice(&REQ_BYTECODE.to_ne_bytes());
        buf.extend_from_slice(bytecode);
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        buf[..4].copy_from_slice(&len.to_ne_bytes());
    }
    buf
}

/// Decodes one datagram of a dump reply, handing each socket's header to `each`. True once
/// NLMSG_DONE was seen.
fn parse_datagram(
    mut bytes: &[u8],
    family: &'static str,
    each: &mut dyn FnMut(&InetResponse),
) -> Result<bool, DiagError> {
    let kernel = |code: i32| DiagError::Kernel {
        family,
        errno: code.saturating_abs(),
    };
    while !bytes.is_empty() {
        // Checks that the length field covers at least a header and fits in `bytes`.
        let msg =
            NetlinkMessage::<SockDiagMessage>::deserialize(bytes).map_err(DiagError::Decode)?;
        match msg.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(resp)) => {
                each(&resp);
            }
            // Both carry a negative errno; an NLMSG_ERROR with code 0 is an ACK.
            NetlinkPayload::Done(done) if done.code >= 0 => return Ok(true),
            NetlinkPayload::Done(done) => return Err(kernel(done.code)),
            NetlinkPayload::Error(ErrorMessage {
                code: Some(code), ..
            }) => {
                return Err(kernel(code.get()));
            }
            NetlinkPayload::Error(_) | NetlinkPayload::Noop => {}
            NetlinkPayload::Overrun(_) => return Err(DiagError::Unexpected("netlink overrun")),
            _ => return Err(DiagError::Unexpected("not an inet_diag message")),
        }
        // Messages in a datagram start on 4-byte boundaries (NLMSG_ALIGN).
        let next = (msg.header.length as usize).next_multiple_of(4);
        bytes = bytes.get(next..).unwrap_or_default();
    }
    Ok(false)
}

/// The listener a reply describes, if it is one and matches `port`.
fn listen_socket(r: &InetResponse, port: Option<u16>) -> Option<ListenSocket> {
    let h = &r.header;
    let id = &h.socket_id;
    if h.state != TCP_LISTEN || port.is_some_and(|p| p != id.source_port) {
        return None;
    }
    let addr = match id.source_address {
        IpAddr::V6(ip) if ip.is_unicast_link_local() => {
            SocketAddr::V6(SocketAddrV6::new(ip, id.source_port, 0, id.interface_id))
        }
        ip => SocketAddr::new(ip, id.source_port),
    };
    Some(ListenSocket {
        addr,
        accept_queue: h.recv_queue,
        backlog: h.send_queue,
        inode: u64::from(h.inode),
        v6only: r.nlas.iter().find_map(|n| match n {
            Nla::SkV6Only(set) => Some(*set),
            _ => None,
        }),
    })
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroI32;

    use netlink_packet_core::DoneMessage;
    use netlink_packet_sock_diag::{constants::TCP_ESTABLISHED, inet::InetResponseHeader};

    use super::*;

    fn encode(payload: NetlinkPayload<SockDiagMessage>) -> Vec<u8> {
        let mut msg = NetlinkMessage::new(NetlinkHeader::default(), payload);
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    /// An inet_diag reply for a socket on `addr`:`port` with 2 queued of a backlog of 1.
    fn response(addr: &str, port: u16, state: u8) -> Vec<u8> {
        response_with(addr, port, state, Vec::new())
    }

    /// [`response`] with attributes `nlas`.
    fn response_with(addr: &str, port: u16, state: u8, nlas: Vec<Nla>) -> Vec<u8> {
        let addr: IpAddr = addr.parse().unwrap();
        let (family, mut socket_id) = match addr {
            IpAddr::V4(_) => (AF_INET, SocketId::new_v4()),
            IpAddr::V6(_) => (AF_INET6, SocketId::new_v6()),
        };
        (socket_id.source_address, socket_id.source_port) = (addr, port);
        socket_id.interface_id = 3;
        let (recv_queue, send_queue, uid, inode, timer) = (2, 1, 0, 4242, None);
        let header = InetResponseHeader {
            family,
            state,
            timer,
            socket_id,
            recv_queue,
            send_queue,
            uid,
            inode,
        };
        let resp = InetResponse {
            header,
            nlas: nlas.into_iter().collect(),
        };
        encode(SockDiagMessage::InetResponse(Box::new(resp)).into())
    }

    fn done(code: i32) -> Vec<u8> {
        let mut done = DoneMessage::default();
        done.code = code;
        encode(NetlinkPayload::Done(done))
    }

    #[test]
    fn request_asks_for_tcp_listen_sockets_only() {
        let req = dump_request(
            7,
            AF_INET6,
            StateFlags::LISTEN,
            ExtensionFlags::empty(),
            &[],
        );
        let u32_at = |i: usize| u32::from_ne_bytes([req[i], req[i + 1], req[i + 2], req[i + 3]]);
        // nlmsghdr (16) + inet_diag_req_v2 (56), type SOCK_DIAG_BY_FAMILY (20), REQUEST|DUMP.
        assert_eq!(
            (req.len(), u32_at(0), u32_at(4), u32_at(8)),
            (72, 72, 0x0301_0014, 7)
        );
        assert_eq!(&req[16..20], &[AF_INET6, IPPROTO_TCP, 0, 0]);
        assert_eq!(u32_at(20), 1 << 10, "states: LISTEN only");
    }

    #[test]
    fn decodes_listeners_filters_by_port_and_stops_at_done() {
        let mut datagram = response("127.0.0.1", 3306, TCP_LISTEN);
        datagram.extend(response("0.0.0.0", 22, TCP_LISTEN));
        datagram.extend(response("10.0.0.1", 3306, TCP_ESTABLISHED));
        let mut out = Vec::new();
        let mut each = |r: &InetResponse| out.extend(listen_socket(r, Some(3306)));
        assert!(!parse_datagram(&datagram, "AF_INET", &mut each).unwrap());
        assert!(parse_datagram(&done(0), "AF_INET", &mut each).unwrap());
        let addr = "127.0.0.1:3306".parse().unwrap();
        let want = ListenSocket {
            addr,
            accept_queue: 2,
            backlog: 1,
            inode: 4242,
            v6only: None,
        };
        assert_eq!(out, [want]);
    }

    #[test]
    fn ipv6_addresses_as_they_are_link_local_with_scope_and_v6only_read() {
        let mut datagram = response_with("::", 80, TCP_LISTEN, vec![Nla::SkV6Only(true)]);
        datagram.extend(response_with(
            "fe80::1",
            80,
            TCP_LISTEN,
            vec![Nla::SkV6Only(false)],
        ));
        datagram.extend(done(0));
        let mut out = Vec::new();
        let mut each = |r: &InetResponse| out.extend(listen_socket(r, None));
        assert!(parse_datagram(&datagram, "AF_INET6", &mut each).unwrap());
        let addrs: Vec<(String, Option<bool>)> =
            out.iter().map(|s| (s.addr.to_string(), s.v6only)).collect();
        assert_eq!(
            addrs,
            [
                ("[::]:80".to_owned(), Some(true)),
                ("[fe80::1%3]:80".to_owned(), Some(false))
            ]
        );
    }

    #[test]
    fn kernel_errors_carry_the_errno() {
        let mut nack = ErrorMessage::default();
        nack.code = NonZeroI32::new(-libc::EPERM);
        let cases = [
            (encode(NetlinkPayload::Error(nack)), libc::EPERM),
            (done(-libc::ENOBUFS), libc::ENOBUFS),
        ];
        for (datagram, want) in cases {
            let err = parse_datagram(&datagram, "AF_INET6", &mut |_| {}).unwrap_err();
            assert!(
                matches!(err, DiagError::Kernel { family: "AF_INET6", errno } if errno == want),
                "{err:?}"
            );
            assert!(
                err.to_string()
                    .starts_with("inet_diag AF_INET6 dump failed: "),
                "{err}"
            );
        }
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let mut truncated = response("127.0.0.1", 1, TCP_LISTEN);
        truncated.truncate(40);
        for datagram in [&[1, 2, 3][..], &truncated] {
            let res = parse_datagram(datagram, "AF_INET", &mut |_| {});
            assert!(matches!(res, Err(DiagError::Decode(_))), "{res:?}");
        }
    }

    #[test]
    fn missing_namespace_is_an_open_error() {
        let err = listeners(Path::new("/nonexistent/ns/net"), None).unwrap_err();
        assert!(
            matches!(err, DiagError::Enter(EnterError::Open { .. })),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with("open /nonexistent/ns/net: "),
            "{err}"
        );
    }
}
