//! The human format's exact text of verdicts that are no connection's.

use super::{Record, human::Human, tests};
use crate::engine::verdict::{Detail, Reason, Side};

#[test]
fn a_per_listener_verdict_names_the_listener_not_a_connection() {
    // `listen_overflow` from the namespace's counter: the listener's own end, the other end
    // unspecified and port 0 (events.md).
    let mut v = tests::verdict(
        Side::Server,
        Reason::ListenOverflow,
        Detail::Attempt(Box::default()),
    );
    (v.saddr, v.sport, v.daddr, v.dport) = (None, Some(3308), "0.0.0.0".parse().unwrap(), 0);
    let c = tests::clock();
    let line = |v| Human::new(false, false, true).text(&Record::Verdict(v), &c);
    let compact = line(&v);
    assert!(
        compact.starts_with(
            "00:00:02.123 server listen_overflow     listener *:3308 netns:4026532246"
        ),
        "{compact}"
    );
    v.saddr = Some("10.77.0.2".parse().unwrap());
    let wide = Human::new(true, false, false).text(&Record::Verdict(&v), &c);
    assert!(wide.contains(" listener 10.77.0.2:3308 -"), "{wide}");
    assert!(!wide.contains("->"), "{wide}");
}

#[test]
fn a_wide_stall_line_gives_the_stall_times_and_its_follow_up_says_failed() {
    // The line's own duration is the handshake's; the stall's time is a fact of its own.
    let c = tests::clock();
    let mut v = tests::stalled();
    let wide = Human::new(true, false, false).text(&Record::Verdict(&v), &c);
    assert!(wide.contains("stalled_no_greeting (stalled)"), "{wide}");
    assert!(wide.contains("[waited 2030 ms]"), "{wide}");
    v.outcome = crate::engine::verdict::Outcome::Failed;
    let wide = Human::new(true, false, false).text(&Record::Verdict(&v), &c);
    assert!(wide.contains("stalled_no_greeting (failed)"), "{wide}");
}
