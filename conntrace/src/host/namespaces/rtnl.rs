//! rtnetlink (`NETLINK_ROUTE`) queries in the current thread's network namespace: the address
//! and link dumps (`ip addr`, `ip link`) and one route lookup (`ip route get`). Messages are
//! built and decoded with `netlink-packet-route`; the caller enters the namespace first.

use std::{collections::HashMap, io, net::IpAddr};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkFlags, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteType, RouteVia},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_ROUTE};

use super::NsError;
use crate::engine::lookup::RouteKind;

/// Receive buffer. Dump datagrams are about 32 KiB, but one link message can be larger (many
/// SR-IOV VFs): truncation is detected (MSG_TRUNC) and reported, never silently cut.
const RECV_BUF: usize = 256 * 1024;

/// One of the namespace's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub ip: IpAddr,
    pub prefix_len: u8,
    pub ifindex: u32,
}

/// A namespace's addresses and interfaces, from one address dump and one link dump.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub addrs: Vec<Address>,
    /// Interface names by ifindex.
    pub links: HashMap<u32, String>,
    /// Loopback interfaces (IFF_LOOPBACK): the kernel makes the whole prefix of their IPv4
    /// addresses local (`127.0.0.1/8` on `lo` answers all of 127/8; IPv6 has no such rule).
    pub loopback: Vec<u32>,
    /// Messages `netlink-packet-route` could not decode and that were left out.
    pub skipped: usize,
}

impl Snapshot {
    /// Whether `ip` is the namespace's own: one of its addresses, or inside the prefix of an
    /// IPv4 address on a loopback interface (the kernel's local routes; addresses added with
    /// `noprefixroute` are taken as if they had one). IPv4-mapped IPv6 addresses count as IPv4.
    pub fn is_local(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.addrs.iter().any(|a| {
            a.ip == ip
                || (a.ip.is_ipv4()
                    && self.loopback.contains(&a.ifindex)
                    && same_prefix(a.ip, ip, a.prefix_len))
        })
    }
}

/// Whether `a` and `b` agree in their first `len` bits (false across families).
fn same_prefix(a: IpAddr, b: IpAddr, len: u8) -> bool {
    let (a, b, bits) = match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(a.to_bits()), u128::from(b.to_bits()), 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (a.to_bits(), b.to_bits(), 128),
        _ => return false,
    };
    let len = u32::from(len).min(bits);
    len == 0 || (a ^ b) >> (bits - len) == 0
}

/// What the kernel answered to a route lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteAnswer {
    pub kind: RouteKind,
    /// The output interface's index, for a route that has one.
    pub oif: Option<u32>,
    pub gateway: Option<IpAddr>,
}

/// A `NETLINK_ROUTE` socket in the current thread's namespace, connected to the kernel.
pub fn open() -> Result<Socket, NsError> {
    let socket = Socket::new(NETLINK_ROUTE).map_err(NsError::Socket)?;
    socket
        .connect(&NetlinkAddr::new(0, 0))
        .map_err(NsError::Connect)?;
    Ok(socket)
}

/// The namespace's addresses (RTM_GETADDR dump, both families) and interfaces (RTM_GETLINK
/// dump).
pub fn snapshot(socket: &Socket) -> Result<Snapshot, NsError> {
    let mut snap = Snapshot::default();
    let get_addr = RouteNetlinkMessage::GetAddress(AddressMessage::default());
    send(
        socket,
        1,
        get_addr,
        NLM_F_REQUEST | NLM_F_DUMP,
        "RTM_GETADDR",
    )?;
    snap.skipped += receive(socket, "RTM_GETADDR", true, &mut |msg| {
        if let RouteNetlinkMessage::NewAddress(a) = msg {
            snap.addrs.extend(address(a));
        }
    })?;
    let get_link = RouteNetlinkMessage::GetLink(LinkMessage::default());
    send(
        socket,
        2,
        get_link,
        NLM_F_REQUEST | NLM_F_DUMP,
        "RTM_GETLINK",
    )?;
    snap.skipped += receive(socket, "RTM_GETLINK", true, &mut |msg| {
        let RouteNetlinkMessage::NewLink(link) = msg else {
            return;
        };
        let index = link.header.index;
        if link.header.flags.contains(LinkFlags::Loopback) {
            snap.loopback.push(index);
        }
        for attr in link.attributes {
            if let LinkAttribute::IfName(name) = attr {
                snap.links.insert(index, name);
            }
        }
    })?;
    Ok(snap)
}

/// The local address an address message carries: IFA_LOCAL where present (on a
/// point-to-point link IFA_ADDRESS is the peer's), else IFA_ADDRESS.
fn address(msg: AddressMessage) -> Option<Address> {
    let (mut local, mut addr) = (None, None);
    for attr in msg.attributes {
        match attr {
            AddressAttribute::Local(ip) => local = Some(ip),
            AddressAttribute::Address(ip) => addr = Some(ip),
            _ => {}
        }
    }
    Some(Address {
        ip: local.or(addr)?,
        prefix_len: msg.header.prefix_len,
        ifindex: msg.header.index,
    })
}

/// The route to `dst` as `ip route get` asks for it: RTM_GETROUTE with RTM_F_LOOKUP_TABLE,
/// answered by the kernel's output route lookup. An `unreachable`, `prohibit` or `blackhole`
/// route and no route at all come back as errors (EHOSTUNREACH, EACCES, EINVAL, ENETUNREACH),
/// which are kinds here, not errors.
pub fn route_get(socket: &Socket, dst: IpAddr) -> Result<RouteAnswer, NsError> {
    send(socket, 3, route_request(dst), NLM_F_REQUEST, "RTM_GETROUTE")?;
    let mut answer = None;
    let result = receive(socket, "RTM_GETROUTE", false, &mut |msg| {
        if let RouteNetlinkMessage::NewRoute(r) = msg {
            answer = Some(route_answer(r));
        }
    });
    let errno = match result {
        Ok(_) => {
            return answer.ok_or(NsError::Unexpected {
                step: "RTM_GETROUTE",
                what: "no route message in the reply",
            });
        }
        Err(NsError::Kernel { errno, .. }) => errno,
        Err(e) => return Err(e),
    };
    let kind = error_kind(errno).ok_or_else(|| kernel("RTM_GETROUTE", errno))?;
    Ok(RouteAnswer {
        kind,
        oif: None,
        gateway: None,
    })
}

/// The RTM_GETROUTE request for `dst` (an IPv4-mapped IPv6 address is asked as IPv4).
fn route_request(dst: IpAddr) -> RouteNetlinkMessage {
    let dst = dst.to_canonical();
    let mut msg = RouteMessage::default();
    (
        msg.header.address_family,
        msg.header.destination_prefix_length,
    ) = match dst {
        IpAddr::V4(_) => (AddressFamily::Inet, 32),
        IpAddr::V6(_) => (AddressFamily::Inet6, 128),
    };
    msg.header.flags = RouteFlags::LookupTable;
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(dst)));
    RouteNetlinkMessage::GetRoute(msg)
}

/// The route kind an errno of the lookup means (`fib_props` in the kernel); `None` for an
/// errno that is a real failure.
fn error_kind(errno: i32) -> Option<RouteKind> {
    match errno {
        libc::EHOSTUNREACH => Some(RouteKind::Unreachable),
        libc::EACCES => Some(RouteKind::Prohibit),
        libc::EINVAL => Some(RouteKind::Blackhole),
        libc::ENETUNREACH => Some(RouteKind::None),
        _ => None,
    }
}

fn route_answer(msg: RouteMessage) -> RouteAnswer {
    let kind = match msg.header.kind {
        RouteType::Unicast => RouteKind::Unicast,
        RouteType::Local => RouteKind::Local,
        RouteType::Unreachable => RouteKind::Unreachable,
        RouteType::Prohibit => RouteKind::Prohibit,
        RouteType::BlackHole => RouteKind::Blackhole,
        _ => RouteKind::Other,
    };
    let (mut oif, mut gateway) = (None, None);
    for attr in msg.attributes {
        match attr {
            RouteAttribute::Oif(i) => oif = Some(i),
            RouteAttribute::Gateway(a) => gateway = route_ip(a),
            // An IPv4 route with an IPv6 next hop (RFC 5549).
            RouteAttribute::Via(RouteVia::Inet6(ip)) => gateway = Some(IpAddr::V6(ip)),
            RouteAttribute::Via(RouteVia::Inet(ip)) => gateway = Some(IpAddr::V4(ip)),
            _ => {}
        }
    }
    RouteAnswer { kind, oif, gateway }
}

fn route_ip(a: RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

fn send(
    socket: &Socket,
    seq: u32,
    msg: RouteNetlinkMessage,
    flags: u16,
    step: &'static str,
) -> Result<(), NsError> {
    let bytes = encode(seq, msg, flags);
    socket
        .send(&bytes, 0)
        .map(drop)
        .map_err(|source| NsError::Send { step, source })
}

/// A serialized request.
fn encode(seq: u32, msg: RouteNetlinkMessage, flags: u16) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// Reads the reply to one request, handing each message to `each`: a dump until NLMSG_DONE,
/// a single request until its one datagram. Returns how many messages could not be decoded.
fn receive(
    socket: &Socket,
    step: &'static str,
    dump: bool,
    each: &mut dyn FnMut(RouteNetlinkMessage),
) -> Result<usize, NsError> {
    let mut buf = Vec::with_capacity(RECV_BUF);
    let mut skipped = 0;
    loop {
        buf.clear();
        // MSG_TRUNC: the return value is the datagram's real length, so truncation shows.
        let len = match socket.recv(&mut buf, libc::MSG_TRUNC) {
            Ok(len) => len,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(NsError::Receive { step, source }),
        };
        if len > buf.len() {
            return Err(NsError::Truncated { step, len });
        }
        let done = parse_datagram(&buf, step, each, &mut skipped)?;
        if done || !dump {
            return Ok(skipped);
        }
    }
}

/// Decodes one datagram into `each`; true once NLMSG_DONE or an ACK was seen. A message the
/// crate cannot decode (an attribute it does not know how to parse) is counted in `skipped`
/// and passed over: one odd interface must not hide the others.
fn parse_datagram(
    mut bytes: &[u8],
    step: &'static str,
    each: &mut dyn FnMut(RouteNetlinkMessage),
    skipped: &mut usize,
) -> Result<bool, NsError> {
    while !bytes.is_empty() {
        // The length field is checked to cover a header and to fit in `bytes`.
        let len = NetlinkBuffer::new_checked(bytes)
            .map_err(|source| NsError::Decode { step, source })?
            .length() as usize;
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[..len]) {
            Ok(msg) => match msg.payload {
                NetlinkPayload::InnerMessage(m) => each(m),
                NetlinkPayload::Done(d) if d.code >= 0 => return Ok(true),
                NetlinkPayload::Done(d) => return Err(kernel(step, d.code)),
                NetlinkPayload::Error(e) => match e.code {
                    Some(code) => return Err(kernel(step, code.get())),
                    None => return Ok(true),
                },
                NetlinkPayload::Noop => {}
                NetlinkPayload::Overrun(_) => {
                    let what = "netlink overrun";
                    return Err(NsError::Unexpected { step, what });
                }
                _ => {
                    let what = "not an rtnetlink message";
                    return Err(NsError::Unexpected { step, what });
                }
            },
            Err(_) => *skipped += 1,
        }
        // Messages in a datagram start on 4-byte boundaries (NLMSG_ALIGN).
        bytes = bytes.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    Ok(false)
}

fn kernel(step: &'static str, code: i32) -> NsError {
    NsError::Kernel {
        step,
        errno: code.saturating_abs(),
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroI32;

    use netlink_packet_core::{DoneMessage, ErrorMessage};
    use netlink_packet_route::{link::LinkHeader, route::RouteHeader};

    use super::*;

    fn v4(a: [u8; 4]) -> IpAddr {
        IpAddr::from(a)
    }

    fn v6(s: &str) -> IpAddr {
        s.parse().expect("IPv6 literal")
    }

    fn reply(payload: NetlinkPayload<RouteNetlinkMessage>) -> Vec<u8> {
        let mut msg = NetlinkMessage::new(NetlinkHeader::default(), payload);
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    fn parse(bytes: &[u8]) -> (Result<bool, NsError>, Vec<RouteNetlinkMessage>, usize) {
        let (mut out, mut skipped) = (Vec::new(), 0);
        let res = parse_datagram(bytes, "TEST", &mut |m| out.push(m), &mut skipped);
        (res, out, skipped)
    }

    #[test]
    fn route_request_is_ip_route_get() {
        let bytes = encode(5, route_request(v4([10, 0, 0, 9])), NLM_F_REQUEST);
        let u32_at = |i: usize| u32::from_ne_bytes(bytes[i..i + 4].try_into().unwrap());
        // nlmsghdr (16) + rtmsg (12) + RTA_DST (4 + 4); type RTM_GETROUTE (26), REQUEST.
        assert_eq!(
            (bytes.len(), u32_at(0), u32_at(4), u32_at(8)),
            (36, 36, 26 | 1 << 16, 5)
        );
        // rtm_family AF_INET, dst_len 32, rtm_flags RTM_F_LOOKUP_TABLE.
        assert_eq!((bytes[16], bytes[17], u32_at(24)), (2, 32, 0x1000));
        // RTA_DST (1) holding the address.
        assert_eq!(&bytes[28..36], &[8, 0, 1, 0, 10, 0, 0, 9]);
        let mapped = encode(5, route_request(v6("::ffff:10.0.0.9")), NLM_F_REQUEST);
        assert_eq!(mapped, bytes, "a mapped address is asked as IPv4");
        let v6 = encode(5, route_request(v6("fd00::1")), NLM_F_REQUEST);
        assert_eq!((v6.len(), v6[16], v6[17]), (48, 10, 128));
    }

    #[test]
    fn route_answers_name_kind_interface_and_gateway() {
        let mut msg = RouteMessage::default();
        // The family tells how RTA_GATEWAY decodes.
        msg.header.address_family = AddressFamily::Inet;
        msg.header.kind = RouteType::Unicast;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.attributes = vec![
            RouteAttribute::Destination(RouteAddress::from(v4([10, 1, 0, 1]))),
            RouteAttribute::Gateway(RouteAddress::from(v4([10, 0, 0, 1]))),
            RouteAttribute::Oif(3),
        ];
        let bytes = reply(NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(
            msg,
        )));
        let (res, out, skipped) = parse(&bytes);
        assert!(!res.unwrap(), "a single reply has no NLMSG_DONE");
        assert_eq!(skipped, 0);
        let [RouteNetlinkMessage::NewRoute(r)] = &out[..] else {
            panic!("{out:?}");
        };
        let want = RouteAnswer {
            kind: RouteKind::Unicast,
            oif: Some(3),
            gateway: Some(v4([10, 0, 0, 1])),
        };
        assert_eq!(route_answer(r.clone()), want);
        let mut local = RouteMessage::default();
        local.header.kind = RouteType::Local;
        assert_eq!(route_answer(local).kind, RouteKind::Local);
        let mut brd = RouteMessage::default();
        brd.header.kind = RouteType::Broadcast;
        assert_eq!(route_answer(brd).kind, RouteKind::Other);
    }

    #[test]
    fn route_errors_are_kinds_or_failures() {
        let kinds = [
            (libc::EHOSTUNREACH, Some(RouteKind::Unreachable)),
            (libc::EACCES, Some(RouteKind::Prohibit)),
            (libc::EINVAL, Some(RouteKind::Blackhole)),
            (libc::ENETUNREACH, Some(RouteKind::None)),
            (libc::EPERM, None),
        ];
        for (errno, kind) in kinds {
            assert_eq!(error_kind(errno), kind, "errno {errno}");
        }
        let mut nack = ErrorMessage::default();
        nack.code = NonZeroI32::new(-libc::EACCES);
        let (res, _, _) = parse(&reply(NetlinkPayload::Error(nack)));
        assert!(
            matches!(
                res,
                Err(NsError::Kernel {
                    step: "TEST",
                    errno: libc::EACCES
                })
            ),
            "{res:?}"
        );
    }

    #[test]
    fn dumps_stop_at_done_and_skip_what_does_not_decode() {
        let mut link = LinkMessage::default();
        link.header = LinkHeader {
            index: 1,
            flags: LinkFlags::Loopback | LinkFlags::Up,
            ..LinkHeader::default()
        };
        link.attributes.push(LinkAttribute::IfName("lo".into()));
        let mut bytes = reply(NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(
            link,
        )));
        // An RTM_NEWADDR (20) too short for its ifaddrmsg: skipped, not fatal.
        bytes.extend([20, 0, 0, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0]);
        let (res, out, skipped) = parse(&bytes);
        assert_eq!((res.unwrap(), out.len(), skipped), (false, 1, 1));
        let (res, _, _) = parse(&reply(NetlinkPayload::Done(DoneMessage::default())));
        assert!(res.unwrap());
        let (res, _, _) = parse(&[1, 2, 3]);
        assert!(matches!(res, Err(NsError::Decode { .. })), "{res:?}");
    }

    #[test]
    fn addresses_prefer_ifa_local() {
        let mut msg = AddressMessage::default();
        msg.header.prefix_len = 32;
        msg.header.index = 4;
        msg.attributes = vec![
            AddressAttribute::Address(v4([10, 0, 0, 2])),
            AddressAttribute::Local(v4([10, 0, 0, 1])),
        ];
        let a = address(msg).unwrap();
        assert_eq!((a.ip, a.prefix_len, a.ifindex), (v4([10, 0, 0, 1]), 32, 4));
        assert_eq!(address(AddressMessage::default()), None);
    }

    #[test]
    fn local_means_own_address_or_loopback_prefix() {
        let addr = |ip, prefix_len, ifindex| Address {
            ip,
            prefix_len,
            ifindex,
        };
        let snap = Snapshot {
            addrs: vec![
                addr(v4([127, 0, 0, 1]), 8, 1),
                addr(v6("::1"), 128, 1),
                addr(v4([10, 0, 0, 1]), 24, 2),
                addr(v6("fd00::1"), 64, 1),
            ],
            loopback: vec![1],
            ..Snapshot::default()
        };
        assert!(snap.is_local(v4([127, 9, 9, 9])), "all of 127/8 on lo");
        assert!(snap.is_local(v4([10, 0, 0, 1])));
        assert!(snap.is_local(v6("::ffff:10.0.0.1")));
        assert!(!snap.is_local(v4([10, 0, 0, 2])), "a neighbour, not us");
        assert!(!snap.is_local(v6("::2")));
        assert!(
            !snap.is_local(v6("fd00::2")),
            "an IPv6 prefix on lo is not local"
        );
        assert!(same_prefix(v4([1, 2, 3, 4]), v4([9, 9, 9, 9]), 0));
        assert!(!same_prefix(v4([1, 2, 3, 4]), v6("::1"), 0));
    }
}
