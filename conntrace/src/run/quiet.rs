//! Quiet mode's side of the event loop: the connections the kernel keeps (the stall check,
//! which brings the stuck ones in and watches them), and the handshakes it is asked to stream.

use tracing::{debug, warn};

use super::identity::Identity;
use crate::{
    engine::{Engine, facts::KernelEvent, verdict::Verdict},
    host::{stalls::StallCheck, windows::WindowWatch},
    kernel::{Tracer, quiet::QuietMaps},
};

/// Quiet mode's check of the connections the kernel keeps (every tick): those stuck past the
/// stall timeout reach the engine and are watched; namespaces with established ones are where
/// `windows` looks.
pub(super) fn check_stalls(
    tracer: &mut Tracer,
    stalls: &mut StallCheck,
    windows: &mut WindowWatch,
    engine: &mut Engine,
    ident: &mut Identity,
    now_ns: u64,
) -> Vec<Verdict> {
    let Some(q) = tracer.quiet.as_mut() else {
        return Vec::new();
    };
    if !stalls.due(now_ns) {
        return Vec::new();
    }
    if let Err(error) = q.snapshot(&mut stalls.snapshot) {
        warn!(%error, "stall check");
        return Vec::new();
    }
    let checked = stalls.check(now_ns, |sk, started_ns| watch(q, sk, started_ns));
    for netns in checked.namespaces {
        windows.traced_in(Some(netns));
    }
    for (sk, started_ns) in checked.unseen_closes {
        match q.forget(sk, started_ns) {
            Ok(true) => {
                debug!(
                    sk,
                    "a connection whose close the kernel skipped: its entry dropped"
                );
            }
            Ok(false) => {}
            Err(error) => debug!(%error, "drop the entry of a connection gone (CONNS map)"),
        }
    }
    checked
        .events
        .into_iter()
        .filter_map(|ev| ident.admit(ev))
        .flat_map(|ev| engine.handle(ev))
        .collect()
}

/// Asks the kernel to report connection `sk` from now on. `WATCH` (8,192 sockets) full is
/// said once, then only counted (`kernel_kept.watch_full`).
fn watch(q: &mut QuietMaps, sk: u64, started_ns: u64) {
    let failures = q.watch_failures();
    if let Err(error) = q.watch(sk, started_ns) {
        if failures == 0 && q.watch_failures() > 0 {
            warn!(
                %error,
                "the kernel's table of watched connections (WATCH, 8,192) is full: a stalled connection's close may go unseen; counted in the summary (kernel_kept.watch_full)"
            );
        } else if q.watch_failures() == failures {
            warn!(%error, "watch a connection (WATCHING map)");
        }
    }
}

/// Quiet mode: the kernel streams a listener's child whose tuple is an open attempt's (its
/// SYN or final ACK dropped before any socket had it), so that the attempt sees its handshake
/// complete. An IPv4 tuple is watched in both forms a server socket may have (a dual-stack
/// listener's child keeps IPv4-mapped IPv6 addresses).
pub(super) fn watch_attempts(tracer: &mut Tracer, engine: &mut Engine) {
    let Some(q) = tracer.quiet.as_mut() else {
        return;
    };
    let failures = q.tuple_watch_failures();
    for (_, tuple, open) in engine.take_attempt_log() {
        for wire in crate::kernel::decode::wire_tuples(tuple) {
            if let Err(error) = q.watch_tuple(wire, open) {
                warn!(%error, "follow a handshake attempt (WATCHING map)");
            }
        }
    }
    if failures == 0 && q.tuple_watch_failures() > 0 {
        // Said once; the summary counts them (`kernel_kept.attempt_table_full`).
        warn!(
            "the kernel's table of followed handshake attempts is full (a flood of attempts): every listener's child streams its events until there is room"
        );
    }
}

/// Quiet mode, each tick: attempts that found the kernel's tuple table full are put in it as
/// room is made, and the "stream every child" fallback ends when none is left outside.
pub(super) fn settle_attempt_tuples(tracer: &mut Tracer) {
    if let Some(q) = tracer.quiet.as_mut()
        && let Err(error) = q.settle_tuples()
    {
        warn!(%error, "follow handshake attempts (WATCHING map)");
    }
}

/// Before a window report about a connection the engine has not seen (quiet mode keeps healthy
/// ones in the kernel): its history, and a watch on it from now on.
pub(super) fn bring_in(
    tracer: &mut Tracer,
    stalls: &StallCheck,
    engine: &mut Engine,
    ev: &KernelEvent,
) -> Vec<Verdict> {
    let (Some(q), KernelEvent::Window { meta, tuple, .. }) = (tracer.quiet.as_mut(), ev) else {
        return Vec::new();
    };
    if engine.knows(meta.netns, tuple) {
        return Vec::new();
    }
    let Some((sk, h)) = stalls.history_of(meta.netns, tuple) else {
        return Vec::new();
    };
    watch(q, sk, h.started_ns);
    let history = crate::kernel::decode::conn_history(sk, &h, meta.ts_ns);
    engine.handle(KernelEvent::History(history))
}
