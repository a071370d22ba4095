//! Connections first seen mid-life: established before conntrace started (a pooled
//! connection), so their first event is a close or a shutdown.

use super::*;

fn ports(ports: &[u16]) -> EngineConfig {
    config(|c| c.ports = ports.to_vec())
}

#[test]
fn a_reset_of_a_connection_opened_before_the_trace_is_reset_by_peer() {
    // The kernel's order: the RST, the close (sk_err set), then the error report.
    let a = Sock::client(SK_A, SPORT);
    let (e, out) = run(
        ports(&[DPORT]),
        vec![
            a.rst(10 * SEC),
            a.closed(10 * SEC, S::Established, Some(104)),
            a.err(10 * SEC, 104),
        ],
    );
    let v = one(out);
    check(&v, "client failed reset_by_peer ECONNRESET");
    assert_eq!(who(&v), "-/- 10.77.0.1:40000>10.77.0.2:8080");
    assert_eq!(detail(&v, "closed_from"), "TCP_ESTABLISHED");
    assert_eq!(
        detail(&v, "rst_received_in"),
        "TCP_ESTABLISHED",
        "the RST before its close"
    );
    assert_eq!(detail(&v, "started_before_trace"), true);
    assert_eq!(
        detail(&v, "established_ms"),
        Value::Null,
        "its start is unknown"
    );
    assert_eq!(
        totals(&e).2,
        0,
        "the error report joined it: {:?}",
        totals(&e)
    );
}

#[test]
fn an_error_report_just_before_the_close_joins_it() {
    // Where the error report comes first, it waits as an orphan; the close then claims it.
    let a = Sock::client(SK_A, SPORT);
    let (e, out) = run(
        ports(&[DPORT]),
        vec![
            a.err(10 * SEC, 110),
            a.closed(10 * SEC + MS, S::Established, None),
        ],
    );
    check(&one(out), "client failed timeout ETIMEDOUT");
    assert_eq!(totals(&e).2, 0);
}

#[test]
fn the_side_of_a_connection_seen_mid_life_comes_from_the_traced_port() {
    let server = Sock::server(SK_B);
    let v = one(run(
        ports(&[3306]),
        vec![server.closed(SEC, S::CloseWait, Some(104))],
    )
    .1);
    check(&v, "server failed reset_by_peer ECONNRESET");
    // Without a port filter, the end on the lower port is the service's.
    let v = one(run(
        ports(&[]),
        vec![server.closed(SEC, S::Established, Some(104))],
    )
    .1);
    check(&v, "server failed reset_by_peer ECONNRESET");
    let client = Sock::client(SK_A, SPORT);
    let v = one(run(
        ports(&[]),
        vec![client.closed(SEC, S::Established, Some(104))],
    )
    .1);
    check(&v, "client failed reset_by_peer ECONNRESET");
}

#[test]
fn an_orderly_end_or_an_idle_pooled_connection_gives_nothing() {
    let a = Sock::client(SK_A, SPORT);
    // An orderly close (FIN both ways), and one that stays open past every stall timeout:
    // neither its greeting nor its accept() could be seen, so neither is a stall.
    let (e, out) = run(
        ports(&[DPORT]),
        vec![
            a.st(SEC, S::Established, S::FinWait1),
            a.closed(2 * SEC, S::FinWait2, None),
            Sock::client(SK_C, SPORT + 1).st(SEC, S::Established, S::FinWait1),
        ],
    );
    assert!(out.is_empty(), "{out:#?}");
    assert_eq!(totals(&e).1, 0, "nothing expired unresolved");
}

#[test]
fn with_all_no_established_verdict_is_made_up_for_it() {
    let a = Sock::client(SK_A, SPORT);
    let cfg = config(|c| {
        c.report_established = true;
        c.ports = vec![DPORT];
    });
    let (_, out) = run(cfg, vec![a.closed(SEC, S::Established, None)]);
    assert!(
        out.is_empty(),
        "an application's abort of a pooled connection: {out:#?}"
    );
}

#[test]
fn data_retransmissions_of_a_connection_opened_before_the_trace_are_in_its_timeout() {
    let a = Sock::client(SK_A, SPORT);
    let rtx = |ts: u64| a.data_rtx(ts, 5, 0);
    let (e, out) = run(
        ports(&[DPORT]),
        vec![
            rtx(SEC),
            rtx(2 * SEC),
            rtx(4 * SEC),
            a.closed(8 * SEC, S::Established, Some(110)),
        ],
    );
    let v = one(out);
    check(&v, "client failed timeout ETIMEDOUT");
    assert_eq!(detail(&v, "retransmits")["count"], 3, "{v:#?}");
    assert_eq!(detail(&v, "started_before_trace"), true);
    assert_eq!(totals(&e).3, 0, "decided and gone");
}

#[test]
fn an_error_report_that_found_the_error_already_read_is_not_unmatched() {
    // The process woke on the RST and read the error (SO_ERROR or recv) before the report
    // fired: the report carries 0.
    let a = Sock::client(SK_A, SPORT);
    let (e, out) = run(
        ports(&[DPORT]),
        vec![
            a.rst(SEC),
            a.closed(SEC, S::Established, Some(104)),
            a.err(SEC, 0),
        ],
    );
    check(&one(out), "client failed reset_by_peer ECONNRESET");
    assert_eq!(totals(&e).2, 0, "{:?}", totals(&e));
}

#[test]
fn a_socket_destroyed_on_this_host_is_named_and_its_peer_is_reset() {
    // `ss -K` on the client's host: tcp_abort() closes it with ECONNABORTED and sends a RST,
    // which the server receives. Fresh and pooled alike.
    let a = Sock::client(SK_A, SPORT);
    let fresh = vec![
        a.connect(MS, 100, "client"),
        a.st(2 * MS, S::SynSent, S::Established),
        a.closed(SEC, S::Established, Some(103)),
    ];
    let v = one(run(ports(&[DPORT]), fresh).1);
    check(&v, "client failed socket_destroyed ECONNABORTED");
    assert_eq!(detail(&v, "established_ms"), 998.0);
    let v = one(run(
        ports(&[DPORT]),
        vec![a.closed(SEC, S::Established, Some(103))],
    )
    .1);
    check(&v, "client failed socket_destroyed ECONNABORTED");
    assert_eq!(detail(&v, "started_before_trace"), true);
    let server = Sock::server(SK_B);
    let v = one(run(
        ports(&[3306]),
        vec![
            server.rst(SEC),
            server.closed(SEC, S::Established, Some(104)),
        ],
    )
    .1);
    check(&v, "server failed reset_by_peer ECONNRESET");
}

/// The peer's ACK of `s` (as it travelled: peer -> `s`) dropped by a netfilter rule, with the
/// socket early demux found for it and that socket's state.
fn ack_dropped(s: Sock, ts: u64, state: Option<TcpState>) -> KernelEvent {
    KernelEvent::Dropped(crate::engine::facts::DroppedPacket {
        meta: softirq(ts),
        sk: s.sk,
        rx_sk: 0,
        sk_port: Some(s.t.sport),
        sk_state: state,
        packet: s.t.reversed(),
        reason: DropReason::new(DropReason::NETFILTER_DROP),
        location: "nft_do_chain+0x3e8".into(),
        tcp_flags: crate::engine::facts::TcpFlags(0x10),
        hook: Some(crate::engine::facts::NfHook::Input),
        ifindex: None,
        icmp: None,
    })
}

#[test]
fn drops_on_a_pooled_connection_are_its_own_never_a_failed_handshake() {
    // A DROP rule added under a pool: the peer's ACKs of an established connection conntrace
    // never saw open. The connection is followed from its first drop; the drops explain its
    // timeout, and while it lives they are drop records only.
    let server = Sock::server(SK_B);
    let drops: Vec<_> = [SEC, 2 * SEC, 4 * SEC]
        .into_iter()
        .map(|ts| ack_dropped(server, ts, Some(S::Established)))
        .collect();
    let (mut e, out) = run(ports(&[3306]), drops.clone());
    assert!(out.is_empty(), "open, so no verdict yet: {out:#?}");
    assert_eq!(e.take_drops().len(), 3, "each drop is a record");
    let mut events = drops;
    events.push(server.closed(8 * SEC, S::Established, Some(110)));
    let v = one(run(ports(&[3306]), events).1);
    check(&v, "server failed netfilter_drop ETIMEDOUT");
    assert_eq!(detail(&v, "started_before_trace"), true);
    assert_eq!(
        detail(&v, "dropped"),
        3,
        "{}",
        serde_json::to_string(&v.detail).unwrap()
    );
}

#[test]
fn a_time_wait_sockets_dropped_packet_opens_no_attempt() {
    // The last ACK of a closed connection, dropped: a record, no handshake verdict.
    let server = Sock::server(SK_B);
    let (mut e, out) = run(
        ports(&[3306]),
        vec![ack_dropped(server, SEC, Some(S::TimeWait))],
    );
    assert!(out.is_empty(), "{out:#?}");
    assert_eq!(e.take_drops().len(), 1);
    // Without the socket's state (no early demux), an ACK dropped by a firewall still counts
    // as a handshake's last one.
    let (_, out) = run(ports(&[3306]), vec![ack_dropped(server, SEC, None)]);
    check(&one(out), "server failed netfilter_drop -");
}

#[test]
fn the_reset_a_server_aborting_with_linger_0_reports_on_itself_is_not_unmatched() {
    // close() with SO_LINGER 0: the socket closes (no error yet), then tcp_disconnect() sets
    // ECONNRESET and reports it with the peer's port already cleared.
    let server = Sock::server(SK_B);
    let mut own = server;
    own.t.dport = 0;
    let (e, out) = run(
        ports(&[3306]),
        vec![
            server.closed(SEC, S::Established, None),
            own.err(SEC + 1_000, 104),
        ],
    );
    assert!(out.is_empty(), "its own abort: {out:#?}");
    assert_eq!(totals(&e).2, 0, "{:?}", totals(&e));
}

/// The host's sockets: none now (closed before the verdict); at start-up, `a`'s held by
/// pid 7 `pool`.
struct HeldAtStart(FourTuple);

impl ListenerLookup for HeldAtStart {
    fn listening_on(&mut self, _netns: Option<u32>, _port: u16) -> Vec<Listener> {
        Vec::new()
    }

    fn owner_at_start(&mut self, _netns: Option<u32>, tuple: FourTuple) -> Option<Proc> {
        (tuple == self.0).then(|| Proc {
            pid: 7,
            comm: "pool".into(),
        })
    }
}

/// The one verdict about `a` from `events`, where the start-up listing says pid 7 `pool`
/// held `a`.
fn with_start_owner(a: Sock, events: Vec<KernelEvent>) -> Verdict {
    let mut e = Engine::new(ports(&[DPORT])).with_listener_lookup(Box::new(HeldAtStart(a.t)));
    let mut out = feed(&mut e, events);
    out.extend(e.tick(LATER));
    let v = one(out);
    check(&v, "client failed reset_by_peer ECONNRESET");
    v
}

#[test]
fn a_connection_opened_before_the_trace_is_named_by_the_process_that_held_it_then() {
    let a = Sock::client(SK_A, SPORT);
    let v = with_start_owner(
        a,
        vec![
            a.rst(10 * SEC),
            a.closed(10 * SEC, S::Established, Some(104)),
        ],
    );
    assert_eq!(who(&v), "7/pool 10.77.0.1:40000>10.77.0.2:8080");
}

#[test]
fn a_connection_seen_from_its_start_is_never_named_from_the_start_up_listing() {
    // The same tuple, its connect() seen without a process (softirq): the start-up listing
    // is another connection's.
    let a = Sock::client(SK_A, SPORT);
    let v = with_start_owner(
        a,
        vec![
            a.st(SEC, S::Close, S::SynSent),
            a.st(2 * SEC, S::SynSent, S::Established),
            a.rst(10 * SEC),
            a.closed(10 * SEC, S::Established, Some(104)),
        ],
    );
    assert_eq!(detail(&v, "started_before_trace"), Value::Null);
    assert_ne!(v.comm.as_deref(), Some("pool"), "{v:#?}");
}
