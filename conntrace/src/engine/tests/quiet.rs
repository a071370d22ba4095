//! Quiet mode: connections the engine first hears of through their history, and stalls known
//! only from userspace's checks. Each test gives the verdicts streaming gives for the same
//! connection.

use super::*;
use crate::engine::facts::{Accepted, Closing, ConnHistory, DroppedPacket, NfHook, Progress};

const STALL: u64 = 3 * SEC;

fn quiet() -> EngineConfig {
    config(|c| c.quiet = true)
}

/// What the kernel kept about `s` (a client unless `server`): started at 1 ms, established at
/// 2 ms, written at `ts`.
fn history(s: Sock, ts: u64, server: bool) -> KernelEvent {
    KernelEvent::History(ConnHistory {
        meta: if server {
            meta(ts, 0, "")
        } else {
            meta(ts, 100, "client")
        },
        sk: s.sk,
        server,
        tuple: s.t,
        started_ns: MS,
        established_ns: Some(2 * MS),
        accepted: None,
        orderly: false,
    })
}

fn progress(s: Sock, ts: u64, received: bool, accepted: bool) -> KernelEvent {
    KernelEvent::Progress {
        meta: softirq(ts),
        sk: s.sk,
        progress: Progress {
            received,
            sent: false,
            accepted,
        },
    }
}

#[test]
fn a_stuck_client_found_by_the_check_is_stalled_then_resolved() {
    let c = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(quiet());
    none(feed(&mut e, [history(c, 3 * SEC + 50 * MS, false)]));
    // Past the timeout, but no check said it is stuck yet: nothing.
    none(e.tick(3 * SEC + 60 * MS));
    none(e.handle(progress(c, 3 * SEC + 80 * MS, false, false)));
    let v = one(e.tick(3 * SEC + 100 * MS));
    check(&v, "client stalled stalled_no_greeting -");
    assert_eq!(who(&v), "100/client 10.77.0.1:40000>10.77.0.2:8080");
    let v = one(e.handle(progress(c, 5 * SEC + 2 * MS, true, false)));
    check(&v, "client resolved stalled_no_greeting -");
    assert_eq!(detail(&v, "stuck_ms"), 5000.0);
    // The kernel counts handshakes in quiet mode: the engine does not.
    assert_eq!(e.summary().established, (0, 0));
}

#[test]
fn a_stuck_client_that_closes_gets_its_failed_follow_up() {
    let c = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(quiet());
    feed(
        &mut e,
        [history(c, STALL, false), progress(c, STALL, false, false)],
    );
    one(e.tick(STALL + 100 * MS));
    // The watched connection's close streams: its history again (merged), then the close.
    let mut again = history(c, 6 * SEC, false);
    if let KernelEvent::History(h) = &mut again {
        h.orderly = true;
    }
    none(feed(&mut e, [again, c.st(6 * SEC, S::FinWait1, S::Close)]));
    let v = one(e.tick(LATER));
    check(&v, "client failed stalled_no_greeting -");
    assert_eq!(detail(&v, "ended_by"), "orderly close");
}

/// `s`'s state change with what the kernel read as it started or ended closing.
fn closing(s: Sock, ts: u64, (old, new): (S, S), received: bool, owned: bool) -> KernelEvent {
    let mut ev = s.st(ts, old, new);
    if let KernelEvent::State { closing, .. } = &mut ev {
        *closing = Some(Closing { received, owned });
    }
    ev
}

#[test]
fn a_stalled_client_that_got_its_greeting_and_closed_before_a_check_is_resolved() {
    let c = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(quiet());
    feed(
        &mut e,
        [history(c, STALL, false), progress(c, STALL, false, false)],
    );
    check(
        &one(e.tick(STALL + 100 * MS)),
        "client stalled stalled_no_greeting -",
    );
    // The greeting came at 5 s and the client closed at once, before the next check: the
    // close says it received data.
    let v = one(e.handle(closing(
        c,
        5 * SEC,
        (S::Established, S::FinWait1),
        true,
        true,
    )));
    check(&v, "client resolved stalled_no_greeting -");
    assert_eq!(detail(&v, "stuck_ms"), 4998.0);
    none(e.handle(c.st(5 * SEC + MS, S::FinWait1, S::FinWait2)));
    none(e.handle(c.st(5 * SEC + 2 * MS, S::FinWait2, S::Close)));
    none(e.tick(LATER));
}

#[test]
fn a_stalled_client_that_closes_without_data_still_fails() {
    let c = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(quiet());
    feed(
        &mut e,
        [history(c, STALL, false), progress(c, STALL, false, false)],
    );
    one(e.tick(STALL + 100 * MS));
    none(e.handle(closing(
        c,
        6 * SEC,
        (S::Established, S::FinWait1),
        false,
        true,
    )));
    none(e.handle(closing(
        c,
        6 * SEC + MS,
        (S::FinWait1, S::Close),
        false,
        true,
    )));
    let v = one(e.tick(LATER));
    check(&v, "client failed stalled_no_greeting -");
}

#[test]
fn a_not_accepted_server_connection_accepted_and_closed_before_a_check_is_resolved() {
    let s = Sock::server(SK_B);
    let mut e = Engine::new(quiet());
    feed(
        &mut e,
        [history(s, STALL, true), progress(s, STALL, false, false)],
    );
    check(
        &one(e.tick(STALL + 100 * MS)),
        "server stalled not_accepted -",
    );
    let v = one(e.handle(closing(
        s,
        4 * SEC,
        (S::Established, S::FinWait1),
        false,
        true,
    )));
    check(&v, "server resolved not_accepted -");
    assert_eq!(detail(&v, "stuck_ms"), 3998.0);
}

#[test]
fn a_server_nobody_accepts_is_not_accepted_until_the_check_sees_a_process() {
    let s = Sock::server(SK_B);
    let mut e = Engine::new(quiet());
    feed(
        &mut e,
        [history(s, STALL, true), progress(s, STALL, false, false)],
    );
    let v = one(e.tick(STALL + 100 * MS));
    check(&v, "server stalled not_accepted -");
    let v = one(e.handle(progress(s, 4 * SEC + 2 * MS, false, true)));
    check(&v, "server resolved not_accepted -");
    assert_eq!(detail(&v, "stuck_ms"), 4000.0);
}

#[test]
fn a_reset_after_the_history_is_reset_by_peer_as_when_streaming() {
    let c = Sock::client(SK_A, SPORT);
    let mut e = Engine::new(quiet());
    let out = feed(
        &mut e,
        [
            history(c, SEC, false),
            c.rst(SEC),
            c.err(SEC, 104),
            c.st(SEC, S::Established, S::Close),
        ],
    );
    let mut out = out;
    out.extend(e.tick(LATER));
    let v = one(out);
    check(&v, "client failed reset_by_peer ECONNRESET");
    assert_eq!(who(&v), "100/client 10.77.0.1:40000>10.77.0.2:8080");
    assert_eq!(v.duration_ms, 999.0);
}

#[test]
fn a_server_history_says_whether_it_was_accepted() {
    let s = Sock::server(SK_B);
    let mut e = Engine::new(quiet());
    let mut h = history(s, SEC, true);
    if let KernelEvent::History(h) = &mut h {
        h.accepted = Some(Accepted::Seen);
    }
    let zero = KernelEvent::Window {
        meta: softirq(SEC),
        tuple: s.t,
        window: crate::engine::facts::Window::LocalFull { queued: 4096 },
    };
    none(feed(&mut e, [h, zero]));
    let v = one(e.tick(SEC + STALL));
    check(&v, "server stalled zero_window -");
    // Accepted, at a time no hook recorded: the delay is absent, never 0.
    assert_eq!(detail(&v, "accepted"), true);
    assert_eq!(detail(&v, "accept_delay_ms"), Value::Null);
}

#[test]
fn a_drop_after_a_quiet_close_is_oriented_by_its_sockets_own_port() {
    // The server's FIN purged from a client socket's receive queue after the client closed
    // healthy (the engine never knew the connection): incoming, as the socket's port says;
    // the record shows it local end first.
    let mut e = Engine::new(config(|c| c.show_normal_drops = true));
    let fin = DroppedPacket {
        meta: softirq(SEC),
        sk: SK_A,
        rx_sk: 0,
        sk_port: Some(SPORT),
        sk_state: None,
        packet: tuple(SPORT, DPORT).reversed(),
        reason: crate::engine::facts::DropReason::new("QUEUE_PURGE"),
        location: "sk_stream_kill_queues+0x57".into(),
        tcp_flags: crate::engine::facts::TcpFlags(0x11),
        hook: None,
        ifindex: None,
        icmp: None,
    };
    none(e.handle(KernelEvent::Dropped(fin.clone())));
    let d = e.take_drops();
    assert_eq!(d.len(), 1);
    let d = serde_json::to_value(&d[0]).unwrap();
    assert_eq!(
        (d["direction"].as_str(), d["sport"].as_u64()),
        (Some("in"), Some(40000)),
        "{d}"
    );
    // The client's own FIN: outgoing.
    let own = DroppedPacket {
        packet: tuple(SPORT, DPORT),
        ..fin
    };
    none(e.handle(KernelEvent::Dropped(own)));
    let d = serde_json::to_value(&e.take_drops()[0]).unwrap();
    assert_eq!(d["direction"], "out", "{d}");
}

#[test]
fn a_handshake_whose_dropped_syn_got_through_again_is_no_failure_and_its_attempt_is_logged() {
    // The server's INPUT dropped the first SYN; the retransmission got through. The attempt's
    // tuple is logged open (quiet mode asks the kernel to stream a child with it) and closed
    // when the child's history takes it over, so no failed handshake is made up.
    let s = Sock::server(SK_B);
    let mut e = Engine::new(quiet());
    e.log_attempts();
    let syn = KernelEvent::Dropped(DroppedPacket {
        meta: softirq(MS),
        sk: 0,
        rx_sk: 0,
        sk_port: None,
        sk_state: None,
        packet: s.t.reversed(),
        reason: DropReason::new(DropReason::NETFILTER_DROP),
        location: "nft_do_chain+0x3e8".into(),
        tcp_flags: TcpFlags(0x02),
        hook: Some(NfHook::Input),
        ifindex: None,
        icmp: None,
    });
    none(e.handle(syn));
    assert_eq!(e.take_attempt_log(), vec![(Some(NETNS), s.t, true)]);
    let mut child = history(s, SEC + 2 * MS, true);
    if let KernelEvent::History(h) = &mut child {
        h.started_ns = SEC + MS;
        h.established_ns = None;
    }
    none(e.handle(child));
    assert_eq!(e.take_attempt_log(), vec![(Some(NETNS), s.t, false)]);
    none(e.handle(s.st(SEC + 2 * MS, S::SynRecv, S::Established)));
    none(e.tick(LATER));
    none(e.finish(LATER));
}
