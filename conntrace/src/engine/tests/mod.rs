//! Unit tests of the reason engine, on synthetic event sequences modelled on what Linux emits.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use serde_json::Value;

use super::*;
use crate::engine::{
    facts::{DropReason, Errno, FourTuple, Meta, Proc, TcpFlags, TcpState, TcpState as S},
    verdict::{Outcome, Reason},
};

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000 * MS;
const NETNS: u32 = 4_026_531_840;
const SK_A: u64 = 0xffff_8880_0000_1000;
const SK_B: u64 = 0xffff_8880_0000_2000;
const SK_C: u64 = 0xffff_8880_0000_3000;
const SPORT: u16 = 40_000;
const DPORT: u16 = 8080;
/// After every event of every scenario, plus grace and stall timeouts; before idle expiry.
const LATER: u64 = 120 * SEC;

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 77, 0, last))
}

fn meta(ts_ns: u64, pid: u32, comm: &str) -> Meta {
    let (netns, comm) = (Some(NETNS), comm.into());
    let proc = Proc { pid, comm };
    Meta { ts_ns, netns, proc }
}

/// Softirq context: whatever task was interrupted.
fn softirq(ts_ns: u64) -> Meta {
    meta(ts_ns, 0, "swapper/1")
}

/// 10.77.0.1:sport -> 10.77.0.2:dport.
fn tuple(sport: u16, dport: u16) -> FourTuple {
    FourTuple {
        saddr: ip(1),
        sport,
        daddr: ip(2),
        dport,
    }
}

/// Builds the events of one socket (`sk`) whose 4-tuple is `t` once the local port is chosen.
#[derive(Clone, Copy)]
struct Sock {
    sk: u64,
    t: FourTuple,
}

impl Sock {
    fn client(sk: u64, sport: u16) -> Self {
        let t = tuple(sport, DPORT);
        Self { sk, t }
    }

    fn server(sk: u64) -> Self {
        let t = tuple(3306, 51_000);
        Self { sk, t }
    }

    /// CLOSE -> SYN_SENT in connect(): process context, the local port is not chosen yet.
    fn connect(mut self, ts: u64, pid: u32, comm: &str) -> KernelEvent {
        self.t.sport = 0;
        self.st_by(meta(ts, pid, comm), S::Close, S::SynSent)
    }

    /// A state change in softirq context.
    fn st(self, ts: u64, old: TcpState, new: TcpState) -> KernelEvent {
        self.st_by(softirq(ts), old, new)
    }

    fn st_by(self, meta: Meta, old: TcpState, new: TcpState) -> KernelEvent {
        KernelEvent::state(meta, self.sk, self.t, old, new)
    }

    /// The close from `old` (softirq context) with the socket's error `errno`, if any.
    fn closed(self, ts: u64, old: TcpState, errno: Option<i32>) -> KernelEvent {
        let mut ev = self.st(ts, old, S::Close);
        if let KernelEvent::State { sk_err, .. } = &mut ev {
            *sk_err = errno.map(Errno);
        }
        ev
    }

    /// `inet_sk_error_report` with `errno` (0: a soft error).
    fn err(self, ts: u64, errno: i32) -> KernelEvent {
        let (meta, tuple) = (softirq(ts), self.t);
        let errno = (errno != 0).then_some(Errno(errno));
        KernelEvent::SocketError { meta, tuple, errno }
    }

    fn rst(self, ts: u64) -> KernelEvent {
        let (meta, sk, tuple) = (softirq(ts), self.sk, self.t);
        KernelEvent::ResetReceived { meta, sk, tuple }
    }

    fn rtx(self, ts: u64) -> KernelEvent {
        let (meta, sk, tuple) = (softirq(ts), self.sk, self.t);
        KernelEvent::SynRetransmit { meta, sk, tuple }
    }

    /// A data retransmission past the handshake (softirq context): `bytes` of payload at MSS
    /// 1448, while the peer had SACKed `sacked_out` later segments.
    fn data_rtx(self, ts: u64, bytes: u32, sacked_out: u32) -> KernelEvent {
        KernelEvent::Retransmit {
            meta: softirq(ts),
            sk: self.sk,
            tuple: self.t,
            bytes: Some(bytes),
            mss: Some(1448),
            sacked_out: Some(sacked_out),
        }
    }

    /// The first data this socket received (`outgoing == false`) or sent.
    fn data(self, ts: u64, outgoing: bool) -> KernelEvent {
        let (meta, sk) = (softirq(ts), self.sk);
        KernelEvent::FirstData { meta, sk, outgoing }
    }
    fn accepted(self, ts: u64, pid: u32, comm: &str) -> KernelEvent {
        let (meta, sk) = (meta(ts, pid, comm), self.sk);
        KernelEvent::Accepted { meta, sk }
    }

    /// connect() returned `-errno`; the local end is unspecified.
    fn connect_failed(self, ts: u64, pid: u32, comm: &str, errno: i32) -> KernelEvent {
        let mut tuple = self.t;
        (tuple.saddr, tuple.sport) = (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
        KernelEvent::ConnectFailed {
            meta: meta(ts, pid, comm),
            sk: self.sk,
            tuple,
            errno: Errno(errno),
            cgroup_refusal: false,
        }
    }

    /// A cgroup program refused connect() with `-errno`, as the root cgroup's programs report
    /// it.
    fn cgroup_refused(self, ts: u64, pid: u32, comm: &str, errno: i32) -> KernelEvent {
        let mut e = self.connect_failed(ts, pid, comm, errno);
        if let KernelEvent::ConnectFailed { cgroup_refusal, .. } = &mut e {
            *cgroup_refusal = true;
        }
        e
    }
}

fn rst_sent_no_socket(ts: u64) -> KernelEvent {
    let (tuple, reason) = (tuple(3306, 51_000), Some("NO_SOCKET".into()));
    KernelEvent::ResetSent {
        meta: softirq(ts),
        sk: 0,
        tuple,
        reason,
        answered_flags: Some(TcpFlags(0x02)),
    }
}

/// The default configuration, edited.
fn config(edit: impl FnOnce(&mut EngineConfig)) -> EngineConfig {
    let mut cfg = EngineConfig::default();
    edit(&mut cfg);
    cfg
}

fn feed(e: &mut Engine, events: impl IntoIterator<Item = KernelEvent>) -> Vec<Verdict> {
    events.into_iter().flat_map(|ev| e.handle(ev)).collect()
}

/// Feeds the events, then ticks at `LATER`, when every timer of these scenarios has run out.
fn run(cfg: EngineConfig, events: Vec<KernelEvent>) -> (Engine, Vec<Verdict>) {
    let mut e = Engine::new(cfg);
    let mut out = feed(&mut e, events);
    out.extend(e.tick(LATER));
    (e, out)
}

fn run_default(events: Vec<KernelEvent>) -> Verdict {
    one(run(EngineConfig::default(), events).1)
}

fn one(verdicts: Vec<Verdict>) -> Verdict {
    assert_eq!(verdicts.len(), 1, "want one verdict: {verdicts:#?}");
    verdicts.into_iter().next().unwrap()
}

fn none(verdicts: Vec<Verdict>) {
    assert!(verdicts.is_empty(), "want no verdict: {verdicts:#?}");
}

/// Asserts "side outcome reason errno" (`-` when no errno), e.g. "client failed timeout ETIMEDOUT".
fn check(v: &Verdict, spec: &str) {
    let name = |x: Value| x.as_str().unwrap().to_owned();
    let side = name(serde_json::to_value(v.side).unwrap());
    let outcome = name(serde_json::to_value(v.outcome).unwrap());
    let errno = v.errno.map_or_else(|| "-".to_owned(), |e| e.to_string());
    let got = format!("{side} {outcome} {} {errno}", v.reason.code());
    assert_eq!(got, spec, "{v:#?}");
}

/// "pid/comm saddr:sport>daddr:dport", `-` for what is unknown.
fn who(v: &Verdict) -> String {
    let opt = |x: Option<String>| x.unwrap_or_else(|| "-".into());
    let (pid, comm) = (opt(v.pid.map(|p| p.to_string())), opt(v.comm.clone()));
    let saddr = opt(v.saddr.map(|a| a.to_string()));
    let sport = opt(v.sport.map(|p| p.to_string()));
    format!("{pid}/{comm} {saddr}:{sport}>{}:{}", v.daddr, v.dport)
}

/// A detail value as serialized, `Null` when absent.
fn detail(v: &Verdict, key: &str) -> Value {
    serde_json::to_value(&v.detail).unwrap()[key].clone()
}

/// (events, expired_unresolved, unmatched_errors, tracked).
fn totals(e: &Engine) -> (u64, u64, u64, usize) {
    let (s, tracked) = (e.summary(), e.tracked());
    (s.events, s.expired_unresolved, s.unmatched_errors, tracked)
}

fn count<K: Ord>(map: &BTreeMap<K, u64>, key: K) -> u64 {
    map.get(&key).copied().unwrap_or(0)
}

/// A client connection that completes its handshake and then closes in order (active close).
fn healthy_client(a: Sock) -> Vec<KernelEvent> {
    vec![
        a.connect(MS, 100, "client"),
        a.st(2 * MS, S::SynSent, S::Established),
        a.st_by(meta(50 * MS, 100, "client"), S::Established, S::FinWait1),
        a.st(51 * MS, S::FinWait1, S::FinWait2),
        a.st(52 * MS, S::FinWait2, S::Close),
    ]
}

/// The child socket of a passive open: created in softirq on the final ACK, then established.
fn server_handshake(s: Sock, ts: u64) -> Vec<KernelEvent> {
    let established = s.st(ts + MS, S::SynRecv, S::Established);
    vec![s.st(ts, S::Listen, S::SynRecv), established]
}

/// A passive close: the peer's FIN, then the application's close().
fn passive_close(s: Sock, ts: u64) -> Vec<KernelEvent> {
    vec![
        s.st(ts, S::Established, S::CloseWait),
        s.st_by(meta(ts + MS, 200, "server"), S::CloseWait, S::LastAck),
        s.st(ts + 2 * MS, S::LastAck, S::Close),
    ]
}

/// connect() answered by a RST, in the order tcp_reset() emits it.
fn refused_client(a: Sock, ts: u64, pid: u32) -> Vec<KernelEvent> {
    let at = ts + MS;
    let (rst, close) = (a.rst(at), a.st(at, S::SynSent, S::Close));
    vec![a.connect(ts, pid, "client"), rst, close, a.err(at, 111)]
}

#[test]
fn healthy_client_reports_established_only_with_all() {
    let client = healthy_client(Sock::client(SK_A, SPORT));
    let (e, out) = run(EngineConfig::default(), client.clone());
    none(out);
    assert!(e.summary().by_reason.is_empty());
    assert_eq!(totals(&e), (5, 0, 0, 0));
    assert_eq!(e.summary().established, (1, 0), "counted without --all");

    let mut e = Engine::new(config(|c| c.report_established = true));
    let mut events = client.into_iter();
    none(feed(&mut e, events.by_ref().take(1)));
    // The verdict goes out on the ESTABLISHED transition itself.
    let v = one(feed(&mut e, events.by_ref().take(1)));
    none(feed(&mut e, events));
    none(e.tick(LATER));
    check(&v, "client established established -");
    assert_eq!(who(&v), "100/client 10.77.0.1:40000>10.77.0.2:8080");
    assert_eq!(v.kernel_reason.as_deref(), Some("TCP_ESTABLISHED"));
    assert_eq!((v.netns, v.duration_ms), (Some(NETNS), 1.0));
    assert_eq!(detail(&v, "accepted"), Value::Null, "no accept()");
    assert_eq!(e.tracked(), 0);
}

#[test]
fn healthy_server_reports_accepting_process() {
    let s = Sock::server(SK_A);
    let mut e = Engine::new(config(|c| c.report_established = true));
    // In softirq context: no process to name until accept().
    none(feed(&mut e, server_handshake(s, MS)));
    let v = one(e.handle(s.accepted(6 * MS, 200, "server")));
    none(feed(&mut e, passive_close(s, 90 * MS)));
    none(e.tick(LATER));
    check(&v, "server established established -");
    assert_eq!(who(&v), "200/server 10.77.0.1:3306>10.77.0.2:51000");
    assert_eq!(detail(&v, "accepted"), true);
    assert_eq!(detail(&v, "accept_delay_ms"), 4.0);

    let mut events = server_handshake(s, MS);
    events.push(s.accepted(6 * MS, 200, "server"));
    events.extend(passive_close(s, 90 * MS));
    let (e, out) = run(EngineConfig::default(), events);
    none(out);
    assert_eq!(e.summary().established, (0, 1), "counted without --all");
}

#[test]
fn refused_client_in_kernel_order() {
    let mut e = Engine::new(EngineConfig::default());
    // Decided on the error report, without waiting for the grace period.
    let a = Sock::client(SK_A, SPORT);
    let v = one(feed(&mut e, refused_client(a, MS, 100)));
    check(&v, "client failed refused_no_listener ECONNREFUSED");
    assert_eq!(v.kernel_reason.as_deref(), Some("ECONNREFUSED"));
    assert_eq!(who(&v), "100/client 10.77.0.1:40000>10.77.0.2:8080");
    assert_eq!(detail(&v, "rst_received"), true);
    assert_eq!(detail(&v, "closed_from"), "TCP_SYN_SENT");
    assert_eq!(v.syn_retransmits, 0);
    // The failed connect() returns after the verdict: not a second failure.
    none(e.handle(a.connect_failed(3 * MS, 100, "client", 111)));
    none(e.tick(LATER));
    assert_eq!(totals(&e), (5, 0, 0, 0));
    assert_eq!(count(&e.summary().by_outcome, Outcome::Failed), 1);
}

#[test]
fn refused_client_error_before_close_and_before_port_known() {
    let a = Sock::client(SK_A, SPORT);
    // The error report is the first event that carries the local port.
    let events = vec![
        a.connect(MS, 100, "client"),
        a.err(2 * MS, 111),
        a.rst(2 * MS),
        a.st(2 * MS, S::SynSent, S::Close),
    ];
    let (e, out) = run(EngineConfig::default(), events);
    let v = one(out);
    check(&v, "client failed refused_no_listener ECONNREFUSED");
    assert_eq!(who(&v), "100/client 10.77.0.1:40000>10.77.0.2:8080");
    assert_eq!(totals(&e), (4, 0, 0, 0));
}

#[test]
fn refused_server_no_socket() {
    let (e, out) = run(EngineConfig::default(), vec![rst_sent_no_socket(MS)]);
    let v = one(out);
    check(&v, "server failed refused_no_listener -");
    assert_eq!(v.kernel_reason.as_deref(), Some("NO_SOCKET"));
    assert_eq!(who(&v), "-/- 10.77.0.1:3306>10.77.0.2:51000");
    assert_eq!(detail(&v, "rst_sent"), true);
    assert_eq!(detail(&v, "answered"), "SYN");
    assert_eq!(e.tracked(), 0);
}

#[test]
fn socketless_reset_to_a_late_segment_is_not_a_refusal() {
    // The kernel answers an ACK/FIN/data segment of a connection already gone with a RST:
    // counted, no verdict. A SYN+ACK answered that way is no refusal either.
    for flags in [0x10, 0x11, 0x18, 0x12] {
        let KernelEvent::ResetSent {
            meta,
            sk,
            tuple,
            reason,
            ..
        } = rst_sent_no_socket(MS)
        else {
            unreachable!("rst_sent_no_socket builds a ResetSent")
        };
        let ev = KernelEvent::ResetSent {
            meta,
            sk,
            tuple,
            reason,
            answered_flags: Some(TcpFlags(flags)),
        };
        let (e, out) = run(EngineConfig::default(), vec![ev]);
        assert!(out.is_empty(), "flags {flags:#x}: {out:?}");
        assert_eq!(e.summary().stray_resets, 1);
    }
}

#[test]
fn syn_timeout_kernel_gave_up() {
    let a = Sock::client(SK_A, SPORT);
    let close = a.st(7 * SEC + MS, S::SynSent, S::Close);
    let err = a.err(7 * SEC + MS, 110);
    // Error report before the close, and after it (as tcp_done_with_error() does).
    for last_two in [[err.clone(), close.clone()], [close, err]] {
        let mut events = vec![a.connect(MS, 100, "client")];
        events.extend([a.rtx(SEC + MS), a.rtx(3 * SEC + MS)]);
        events.extend(last_two);
        let mut e = Engine::new(EngineConfig::default());
        // A silent failure waits out the grace period: a drop that explains it may follow.
        none(feed(&mut e, events));
        let v = one(e.tick(7 * SEC + MS + e.cfg.grace_ns));
        check(&v, "client failed syn_timeout ETIMEDOUT");
        assert_eq!(who(&v), "100/client 10.77.0.1:40000>10.77.0.2:8080");
        assert_eq!(v.syn_retransmits, 2);
        assert_eq!(detail(&v, "cause"), "kernel_gave_up");
        assert_eq!(detail(&v, "after_ms"), 7000.0);
        none(e.tick(LATER));
    }
}

#[test]
fn syn_timeout_application_closed_waits_for_grace() {
    let a = Sock::client(SK_A, SPORT);
    let cfg = EngineConfig::default();
    let closed_at = 2 * SEC;
    let grace_end = closed_at + cfg.grace_ns;
    let close = a.st_by(meta(closed_at, 100, "client"), S::SynSent, S::Close);
    let mut e = Engine::new(cfg);
    let events = [a.connect(MS, 100, "client"), a.rtx(SEC + MS), close];
    none(feed(&mut e, events));
    // Not before the grace period ran out: an error report may still come.
    none(e.tick(grace_end - 1));
    let v = one(e.tick(grace_end));
    check(&v, "client failed syn_timeout -");
    assert_eq!(detail(&v, "cause"), "application_closed");
    assert_eq!(v.kernel_reason.as_deref(), Some("closed in TCP_SYN_SENT"));
    assert_eq!(who(&v), "100/client 10.77.0.1:40000>10.77.0.2:8080");
    assert_eq!(v.syn_retransmits, 1);
    none(e.tick(LATER));
    assert_eq!(e.tracked(), 0);
}

#[test]
fn no_route_from_connect() {
    // A socket the kernel side resolved but never saw change state, and one it could not.
    for sk in [SK_C, 0] {
        let ev = Sock::client(sk, SPORT).connect_failed(5 * MS, 300, "curl", 101);
        let (e, out) = run(EngineConfig::default(), vec![ev]);
        let v = one(out);
        check(&v, "client failed no_route ENETUNREACH");
        assert_eq!(who(&v), "300/curl -:->10.77.0.2:8080");
        assert_eq!(detail(&v, "packets_sent"), 0);
        assert_eq!(e.tracked(), 0);
    }
}

/// connect(), then an ICMP error: tcp_v4_err() reports the error, then closes the socket.
fn icmp_error(errno: i32) -> Vec<KernelEvent> {
    let a = Sock::client(SK_A, SPORT);
    let close = a.st(3 * MS, S::SynSent, S::Close);
    vec![a.connect(MS, 100, "client"), a.err(3 * MS, errno), close]
}

#[test]
fn icmp_unreachable() {
    let v = run_default(icmp_error(113));
    check(&v, "client failed icmp_unreachable EHOSTUNREACH");
    let icmp = detail(&v, "icmp").as_str().unwrap_or_default().to_owned();
    assert!(icmp.contains("host-unreachable"), "{v:#?}");
    assert_eq!(who(&v), "100/client 10.77.0.1:40000>10.77.0.2:8080");
    // ECONNREFUSED without a RST received: an ICMP port unreachable.
    let v = run_default(icmp_error(111));
    check(&v, "client failed icmp_unreachable ECONNREFUSED");
    assert_eq!(detail(&v, "icmp"), "port-unreachable");
    // Without the reset tracepoints, a missing RST proves nothing.
    let blind = config(|c| c.resets_observed = false);
    let v = one(run(blind, icmp_error(111)).1);
    check(&v, "client failed refused_no_listener ECONNREFUSED");
    assert_eq!(detail(&v, "icmp"), Value::Null);
    assert_eq!(detail(&v, "events_lost"), Value::Null);
}

#[test]
fn econnrefused_without_a_rst_while_events_were_lost_is_no_icmp_answer() {
    // The ring buffer was full while the connection lived: its RST may be among the lost
    // events, so a missing one proves nothing.
    let mut e = Engine::new(EngineConfig::default());
    e.events_lost(2 * MS);
    let mut out = feed(&mut e, icmp_error(111));
    out.extend(e.tick(LATER));
    let v = one(out);
    check(&v, "client failed refused_no_listener ECONNREFUSED");
    assert_eq!(detail(&v, "icmp"), Value::Null);
    assert_eq!(detail(&v, "events_lost"), true);
    // A mark read later with an earlier time (another CPU's event, after the counter's
    // look) does not move the loss back before the connection.
    let mut e = Engine::new(EngineConfig::default());
    e.events_lost(4 * MS);
    e.events_lost(MS / 2);
    let mut out = feed(&mut e, icmp_error(111));
    out.extend(e.tick(LATER));
    assert_eq!(detail(&one(out), "events_lost"), true);
    // First seen at its close (its connect() and RST among the lost, the mark on an earlier
    // event of that CPU): when it started is unknown, so any loss counts.
    let mut e = Engine::new(EngineConfig::default());
    e.events_lost(MS / 2);
    let mut out = feed(&mut e, icmp_error(111).split_off(1));
    out.extend(e.tick(LATER));
    let v = one(out);
    check(&v, "client failed refused_no_listener ECONNREFUSED");
    assert_eq!(detail(&v, "events_lost"), true);
    // A loss that ended before the connection started does not count.
    let mut e = Engine::new(EngineConfig::default());
    e.events_lost(MS / 2);
    let mut out = feed(&mut e, icmp_error(111));
    out.extend(e.tick(LATER));
    check(&one(out), "client failed icmp_unreachable ECONNREFUSED");
}

#[test]
fn a_refusal_without_a_rst_waits_for_a_loss_noticed_after_its_close() {
    // Userspace reads the loss counter before it reads the waiting events: a RST lost while
    // they were read is noticed only before the next read, after the close was handled. The
    // verdict waits out the grace period, and the loss reaches it.
    let mut e = Engine::new(EngineConfig::default());
    let out = feed(&mut e, icmp_error(111));
    assert!(
        out.is_empty(),
        "decided before a loss could be noticed: {out:#?}"
    );
    e.events_lost(5 * MS);
    let mut out = e.tick(5 * MS);
    out.extend(e.tick(LATER));
    let v = one(out);
    check(&v, "client failed refused_no_listener ECONNREFUSED");
    assert_eq!(detail(&v, "events_lost"), true);
    // A refusal by RST is decided at its close.
    let a = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(EngineConfig::default());
    let out = feed(
        &mut e,
        [
            a.connect(MS, 100, "client"),
            a.rst(2 * MS),
            a.err(3 * MS, 111),
            a.st(3 * MS, S::SynSent, S::Close),
        ],
    );
    check(&one(out), "client failed refused_no_listener ECONNREFUSED");
}

/// connect(), a SYN retransmit 1 s later, and its ICMP answer, the socket's soft error at its
/// close being `soft` (errno, or 0 for none).
fn icmp_after_retransmit(soft: i32) -> Vec<KernelEvent> {
    let a = Sock::client(SK_A, SPORT);
    let mut close = a.st(SEC + 3 * MS, S::SynSent, S::Close);
    if let KernelEvent::State {
        sk_err,
        sk_err_soft,
        ..
    } = &mut close
    {
        (*sk_err, *sk_err_soft) = (Some(Errno(113)), (soft != 0).then_some(Errno(soft)));
    }
    let rtx = a.rtx(SEC + 2 * MS);
    vec![
        a.connect(MS, 100, "client"),
        rtx,
        a.err(SEC + 3 * MS, 113),
        close,
    ]
}

#[test]
fn an_icmp_answer_to_a_retransmitted_syn_counts_the_unanswered_ones() {
    let v = run_default(icmp_after_retransmit(0));
    check(&v, "client failed icmp_unreachable EHOSTUNREACH");
    assert_eq!(detail(&v, "unanswered_syns"), 1);
    assert_eq!(detail(&v, "first_answer_while_busy"), Value::Null);
}

#[test]
fn a_first_answer_that_came_while_connect_held_the_socket_is_not_an_unanswered_syn() {
    // The ICMP for the first SYN came back before connect() released the socket: the kernel
    // kept it in sk_err_soft, retransmitted, and the second ICMP closed the socket.
    let v = run_default(icmp_after_retransmit(113));
    check(&v, "client failed icmp_unreachable EHOSTUNREACH");
    assert_eq!(detail(&v, "unanswered_syns"), Value::Null, "{v:#?}");
    assert_eq!(detail(&v, "first_answer_while_busy"), true);
}

#[test]
fn reset_by_peer_after_established() {
    let a = Sock::client(SK_A, SPORT);
    let events = vec![
        a.connect(MS, 100, "client"),
        a.st(2 * MS, S::SynSent, S::Established),
        a.rst(10 * SEC),
        a.st(10 * SEC, S::Established, S::Close),
        a.err(10 * SEC, 104),
    ];
    let v = run_default(events.clone());
    check(&v, "client failed reset_by_peer ECONNRESET");
    assert_eq!(who(&v), "100/client 10.77.0.1:40000>10.77.0.2:8080");
    assert_eq!(detail(&v, "rst_received_in"), "TCP_ESTABLISHED");
    assert_eq!(detail(&v, "established_ms"), 9998.0);
    // With --all the handshake is reported too, before the failure.
    let out = run(config(|c| c.report_established = true), events).1;
    let reasons: Vec<Reason> = out.iter().map(|v| v.reason).collect();
    assert_eq!(reasons, [Reason::Established, Reason::ResetByPeer]);
}

#[test]
fn timeout_after_established() {
    let a = Sock::client(SK_A, SPORT);
    let v = run_default(vec![
        a.connect(MS, 100, "client"),
        a.st(2 * MS, S::SynSent, S::Established),
        a.err(20 * SEC, 110),
        a.st(20 * SEC, S::Established, S::Close),
    ]);
    check(&v, "client failed timeout ETIMEDOUT");
    assert_eq!(who(&v), "100/client 10.77.0.1:40000>10.77.0.2:8080");
    assert_eq!(detail(&v, "established_ms"), 19998.0);
    assert_eq!(v.syn_retransmits, 0);
}

#[test]
fn unknown_errno_in_syn_sent() {
    let a = Sock::client(SK_A, SPORT);
    let close = a.st(3 * MS, S::SynSent, S::Close);
    let v = run_default(vec![a.connect(MS, 100, "client"), close, a.err(3 * MS, 22)]);
    check(&v, "client failed unknown EINVAL");
    assert_eq!(v.kernel_reason.as_deref(), Some("EINVAL"));
    assert_eq!(who(&v), "100/client 10.77.0.1:40000>10.77.0.2:8080");
}

#[test]
fn retransmit_of_unseen_socket_starts_a_client_connection() {
    let b = Sock::client(SK_B, SPORT);
    let mut e = Engine::new(EngineConfig::default());
    none(e.handle(b.rtx(SEC)));
    assert_eq!(e.tracked(), 1);
    let close = b.st(3 * SEC, S::SynSent, S::Close);
    none(feed(&mut e, [close, b.err(3 * SEC, 110)]));
    let v = one(e.tick(3 * SEC + e.cfg.grace_ns));
    check(&v, "client failed syn_timeout ETIMEDOUT");
    assert_eq!(who(&v), "-/- 10.77.0.1:40000>10.77.0.2:8080");
    assert_eq!(v.syn_retransmits, 1);
    assert_eq!(e.tracked(), 0);
}

#[test]
fn events_of_unknown_sockets_are_ignored() {
    let a = Sock::client(SK_A, SPORT);
    let b = Sock::client(SK_B, SPORT);
    let c = Sock::client(SK_C, SPORT);
    let events = vec![
        c.st(MS, S::Established, S::FinWait1),
        c.st(2 * MS, S::FinWait2, S::Close),
        b.st(3 * MS, S::Established, S::Close),
        a.rst(4 * MS),
        a.accepted(5 * MS, 200, "server"),
    ];
    let (e, out) = run(config(|c| c.report_established = true), events);
    none(out);
    assert_eq!(totals(&e), (5, 0, 0, 0));
}

#[test]
fn connection_table_is_bounded() {
    let mut e = Engine::new(config(|c| c.max_connections = 10));
    for i in 0..25u16 {
        let a = Sock::client(SK_A + u64::from(i) * 0x100, SPORT + i);
        none(e.handle(a.connect(MS * u64::from(i + 1), 1000 + u32::from(i), "client")));
        assert!(e.tracked() <= 10);
    }
    assert_eq!(totals(&e), (25, 15, 0, 10));
    none(e.finish(SEC));
    assert_eq!(totals(&e), (25, 25, 0, 0));
    assert!(e.summary().by_outcome.is_empty());
}

#[test]
fn summary_counts_match_verdicts() {
    let c = Sock::client(SK_C, SPORT + 2);
    let mut events = healthy_client(Sock::client(SK_A, SPORT));
    events.extend(refused_client(Sock::client(SK_B, SPORT + 1), MS, 101));
    events.extend([c.connect(MS, 102, "client"), c.rtx(SEC)]);
    events.extend([c.st(3 * SEC, S::SynSent, S::Close), c.err(3 * SEC, 110)]);
    events.push(rst_sent_no_socket(4 * SEC));
    let n = events.len() as u64;
    let (e, out) = run(config(|c| c.report_established = true), events);
    let s = e.summary();
    assert_eq!(out.len(), 4, "{out:#?}");
    let (mut by_outcome, mut by_reason) = (BTreeMap::new(), BTreeMap::new());
    for v in &out {
        *by_outcome.entry(v.outcome).or_insert(0) += 1;
        *by_reason.entry(v.reason).or_insert(0) += 1;
    }
    assert_eq!((&s.by_outcome, &s.by_reason), (&by_outcome, &by_reason));
    assert_eq!(count(&s.by_outcome, Outcome::Failed), 3);
    assert_eq!(count(&s.by_reason, Reason::RefusedNoListener), 2);
    assert_eq!(count(&s.by_reason, Reason::SynTimeout), 1);
    assert_eq!(count(&s.by_reason, Reason::Established), 1);
    assert_eq!(totals(&e), (n, 0, 0, 0));
}

/// Dropped packets.
mod drops;
mod field;
/// Who accepted the connection (`--expect-comm`).
mod listeners;
mod mid_life;
mod namespaces;
/// Socket-address reuse and cross-CPU event order: what the kernel does under load.
mod ordering;
/// Routes that went away under connections.
mod path;
mod peer;
mod quiet;
/// connect() errors seen through failed route lookups, and inferred EADDRNOTAVAIL.
mod route;
mod route_lost;
mod spoofed;
mod stalls;
