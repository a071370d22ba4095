use super::*;

fn tuple() -> Tuple {
    let mut t = Tuple {
        family: AF_INET,
        sport: 40000,
        dport: 3306,
        ..Tuple::default()
    };
    t.saddr[..4].copy_from_slice(&[10, 77, 0, 1]);
    t.daddr[..4].copy_from_slice(&[10, 77, 0, 2]);
    t
}

#[test]
fn round_trip_every_kind() {
    let mut h = header_for::<StateChange>(EventKind::StateChange);
    h.ts_ns = 123;
    h.pid = 7;
    h.comm[..4].copy_from_slice(b"curl");
    let sc = StateChange {
        header: h,
        skaddr: 0xffff_8880_1234_5678,
        tuple: tuple(),
        oldstate: 7,
        newstate: 2,
        sk_err: 111,
        sk_err_soft: 113,
        route_cache: route_cache::READ,
        progress: 0,
    };
    assert_eq!(decode(as_bytes(&sc)), Ok(Decoded::StateChange(sc)));

    let er = ErrorReport {
        header: header_for::<ErrorReport>(EventKind::ErrorReport),
        tuple: tuple(),
        error: 111,
        _pad: 0,
    };
    assert_eq!(decode(as_bytes(&er)), Ok(Decoded::ErrorReport(er)));

    let rr = Reset {
        header: header_for::<Reset>(EventKind::ReceiveReset),
        skaddr: 1,
        tuple: tuple(),
        reason: RESET_REASON_NONE,
        tcp_flags: TCP_FLAGS_UNKNOWN,
    };
    assert_eq!(decode(as_bytes(&rr)), Ok(Decoded::ReceiveReset(rr)));
    let sr = Reset {
        header: header_for::<Reset>(EventKind::SendReset),
        tcp_flags: 0x02,
        ..rr
    };
    assert_eq!(decode(as_bytes(&sr)), Ok(Decoded::SendReset(sr)));

    let rt = SynRetransmit {
        header: header_for::<SynRetransmit>(EventKind::SynRetransmit),
        skaddr: 1,
        tuple: tuple(),
    };
    assert_eq!(decode(as_bytes(&rt)), Ok(Decoded::SynRetransmit(rt)));

    let ac = Accept {
        header: header_for::<Accept>(EventKind::Accept),
        skaddr: 9,
    };
    assert_eq!(decode(as_bytes(&ac)), Ok(Decoded::Accept(ac)));

    let ce = ConnectError {
        header: header_for::<ConnectError>(EventKind::ConnectError),
        skaddr: 0,
        tuple: tuple(),
        ret: -101,
        _pad: 0,
    };
    assert_eq!(decode(as_bytes(&ce)), Ok(Decoded::ConnectError(ce)));

    let dr = PacketDrop {
        header: header_for::<PacketDrop>(EventKind::Drop),
        sk: 0,
        rx_sk: 0,
        location: 0xffff_ffff_8100_0000,
        tuple: tuple(),
        reason: 6,
        tcp_flags: 0x02,
        ifindex: 2,
        icmp: NOT_ICMP,
        mtu: 0,
        sk_port: 0,
        sk_state: 1,
        _pad: 0,
        stack: [0xffff_ffff_8100_0010; DROP_STACK_DEPTH],
    };
    assert_eq!(decode(as_bytes(&dr)), Ok(Decoded::Drop(dr)));

    let fd = FirstData {
        header: header_for::<FirstData>(EventKind::FirstData),
        skaddr: 0xffff_8880_0000_1000,
        direction: DATA_OUT,
        bytes: 42,
    };
    assert_eq!(decode(as_bytes(&fd)), Ok(Decoded::FirstData(fd)));

    let ck = CookieSynAck {
        header: header_for::<CookieSynAck>(EventKind::CookieSynAck),
        tuple: tuple(),
    };
    assert_eq!(decode(as_bytes(&ck)), Ok(Decoded::CookieSynAck(ck)));

    let re = Retransmit {
        header: header_for::<Retransmit>(EventKind::Retransmit),
        skaddr: 1,
        tuple: tuple(),
        bytes: 1448,
        mss: 1448,
        sacked_out: 2,
        _pad: 0,
    };
    assert_eq!(decode(as_bytes(&re)), Ok(Decoded::Retransmit(re)));
}

#[test]
fn route_error_round_trips_as_kind_13() {
    assert_eq!(EventKind::RouteError as u32, 13);
    assert_eq!(EventKind::from_u32(13), Some(EventKind::RouteError));
    let mut t = tuple();
    t.sport = 0;
    t.saddr = [0; 16];
    let re = RouteError {
        header: header_for::<RouteError>(EventKind::RouteError),
        tuple: t,
        err: -11,
        table: 254,
    };
    assert_eq!(decode(as_bytes(&re)), Ok(Decoded::RouteError(re)));
    assert_eq!(size_of::<RouteError>() % 8, 0);
}

#[test]
fn ring_buffer_padding_is_accepted() {
    let ac = Accept {
        header: header_for::<Accept>(EventKind::Accept),
        skaddr: 9,
    };
    let mut padded = [0u8; 128];
    padded[..size_of::<Accept>()].copy_from_slice(as_bytes(&ac));
    assert_eq!(
        decode(&padded[..size_of::<Accept>() + 8]),
        Ok(Decoded::Accept(ac))
    );
}

#[test]
fn malformed_records_are_errors() {
    assert_eq!(decode(&[0u8; 3]), Err(DecodeError::Truncated { len: 3 }));
    let mut h = header_for::<Accept>(EventKind::Accept);
    h.kind = 99;
    let ac = Accept {
        header: h,
        skaddr: 0,
    };
    assert_eq!(
        decode(as_bytes(&ac)),
        Err(DecodeError::UnknownKind { kind: 99 })
    );
    let ac = Accept {
        header: header_for::<Accept>(EventKind::Accept),
        skaddr: 0,
    };
    let bytes = as_bytes(&ac);
    assert!(matches!(
        decode(&bytes[..bytes.len() - 1]),
        Err(DecodeError::SizeMismatch { .. })
    ));
    // A header that claims another kind's size is rejected, not reinterpreted.
    let mut h = header_for::<StateChange>(EventKind::Accept);
    h.kind = EventKind::Accept as u32;
    let ac = Accept {
        header: h,
        skaddr: 0,
    };
    assert!(matches!(
        decode(as_bytes(&ac)),
        Err(DecodeError::SizeMismatch { .. })
    ));
}

#[test]
fn kind_ids_are_fixed() {
    for (id, kind) in [
        (1, EventKind::StateChange),
        (2, EventKind::ErrorReport),
        (3, EventKind::ReceiveReset),
        (4, EventKind::SendReset),
        (5, EventKind::SynRetransmit),
        (6, EventKind::Accept),
        (7, EventKind::ConnectError),
        (8, EventKind::Drop),
        (9, EventKind::FirstData),
        (10, EventKind::CookieSynAck),
        (11, EventKind::Retransmit),
        (12, EventKind::History),
        (13, EventKind::RouteError),
    ] {
        assert_eq!(kind as u32, id);
        assert_eq!(EventKind::from_u32(id), Some(kind));
    }
    assert_eq!(EventKind::from_u32(0), None);
    assert_eq!(EventKind::from_u32(14), None);
}
