//! The per-kind record cap: at most [`RECORDS_PER_SECOND`] records of one window (a namespace
//! and a kind) in any second, a sliding one. Counted by fixed seconds instead, a burst that
//! straddled a second's boundary printed twice the cap in a few milliseconds.

use std::collections::VecDeque;

use super::HashMap;

/// Most records of one kind per second: `drop` records per namespace and drop reason, failed
/// attempts per local port (a SYN flood would otherwise print one line per SYN); the rest are
/// counted in the summary.
pub const RECORDS_PER_SECOND: u32 = 50;

const SECOND_NS: u64 = 1_000_000_000;

/// Records admitted lately, by window: their times (ns, the events' clock), oldest first, at
/// most [`RECORDS_PER_SECOND`] each.
#[derive(Default)]
pub struct RateWindows {
    admitted: HashMap<(Option<u32>, String), VecDeque<u64>>,
}

impl RateWindows {
    /// Counts a record at `ts_ns` against window `key`; false (not admitted, not counted)
    /// when the window admitted [`RECORDS_PER_SECOND`] in the second up to `ts_ns`.
    pub(crate) fn admit(&mut self, key: (Option<u32>, String), ts_ns: u64) -> bool {
        let times = self.admitted.entry(key).or_default();
        while times.front().is_some_and(|&t| t + SECOND_NS <= ts_ns) {
            times.pop_front();
        }
        if times.len() >= RECORDS_PER_SECOND as usize {
            return false;
        }
        times.push_back(ts_ns);
        true
    }

    /// Forgets windows with nothing admitted in the second up to `now_ns`.
    pub(crate) fn prune(&mut self, now_ns: u64) {
        self.admitted
            .retain(|_, times| times.back().is_some_and(|&t| t + SECOND_NS > now_ns));
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.admitted.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: &str) -> (Option<u32>, String) {
        (Some(7), kind.to_owned())
    }

    fn admitted(w: &mut RateWindows, kind: &str, times: impl Iterator<Item = u64>) -> usize {
        times.filter(|&t| w.admit(key(kind), t)).count()
    }

    #[test]
    fn a_burst_across_a_second_boundary_gets_one_second_s_worth() {
        let mut w = RateWindows::default();
        // 200 records in 20 ms straddling the boundary at 5 s.
        let burst = (0..200).map(|i| 4_990_000_000 + i * 100_000);
        assert_eq!(admitted(&mut w, "x", burst), 50);
    }

    #[test]
    fn the_cap_frees_as_the_oldest_admitted_record_leaves_the_second() {
        let mut w = RateWindows::default();
        assert_eq!(admitted(&mut w, "x", (0..60).map(|i| i * 1_000_000)), 50);
        // 1 s after the first admitted one (at 0): one place, not fifty.
        assert!(w.admit(key("x"), SECOND_NS));
        assert!(!w.admit(key("x"), SECOND_NS));
        // A second after the last admitted one (at 49 ms): all free again.
        assert_eq!(
            admitted(&mut w, "x", (0..60).map(|i| 1_049_000_000 + SECOND_NS + i)),
            50
        );
    }

    #[test]
    fn a_steady_rate_under_the_cap_is_never_capped() {
        let mut w = RateWindows::default();
        // 40 a second for 10 s.
        assert_eq!(admitted(&mut w, "x", (0..400).map(|i| i * 25_000_000)), 400);
    }

    #[test]
    fn windows_are_counted_apart() {
        let mut w = RateWindows::default();
        assert_eq!(admitted(&mut w, "x", (0..60).map(|i| i * 1_000)), 50);
        assert_eq!(admitted(&mut w, "y", (0..60).map(|i| i * 1_000)), 50);
        // The same kind in another namespace.
        assert!(w.admit((None, "x".to_owned()), 1));
    }

    #[test]
    fn prune_forgets_only_windows_quiet_for_a_second() {
        let mut w = RateWindows::default();
        w.admit(key("old"), 0);
        w.admit(key("new"), 900_000_000);
        w.prune(SECOND_NS);
        assert_eq!(w.len(), 1);
        assert!(w.admit(key("new"), SECOND_NS));
    }
}
