//! Rule counters as they were: the start-up baseline of each namespace and the last few
//! readings after it, so that a drop can be measured against the last reading taken before it.

use std::collections::{HashMap, VecDeque};

/// Which netfilter implementation holds a rule.
pub use crate::engine::lookup::RuleBackend as Backend;

/// A rule's identity across readings, within its chain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleId {
    /// An nftables rule handle (stable until the rule is deleted).
    Handle(u64),
    /// An iptables-legacy rule, which has no handle: its text, and how many identical rules
    /// precede it in the chain (so that inserting other rules does not shift it).
    Line { text: String, nth: u32 },
    /// An iptables-legacy built-in chain's policy, which has a counter of its own.
    Policy,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleKey {
    pub backend: Backend,
    /// `ip`, `ip6`, `inet`, ...
    pub family: String,
    pub table: String,
    pub chain: String,
    pub id: RuleId,
}

/// Packets each counted rule matched, at one reading.
pub type Counts = HashMap<RuleKey, u64>;

/// What one run of a tool read, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// CLOCK_MONOTONIC nanoseconds when the tool had exited: every count was read before it.
    pub at_ns: u64,
    pub counts: Counts,
}

/// Later readings kept per namespace and source, besides the baseline.
pub const KEPT: usize = 4;
/// Readings older than this are dropped: no attempt lasts that long (SYN retries end in ~2
/// minutes with the default `tcp_syn_retries`).
pub const KEEP_NS: u64 = 180 * 1_000_000_000;

/// The counts one backend's rules are measured from.
#[derive(Debug, Clone, Copy, Default)]
pub struct Since<'a> {
    /// At start-up; `None` for a namespace first seen later: count from zero.
    pub baseline: Option<&'a Counts>,
    /// The last reading before the attempt's first drop (the baseline when no time was
    /// given); `None`: count from zero.
    pub window: Option<&'a Counts>,
}

/// The counts rules are measured from, per backend (the keys tell which).
#[derive(Debug, Clone, Copy, Default)]
pub struct Before<'a> {
    pub nft: Since<'a>,
    pub legacy: Since<'a>,
}

impl Before<'_> {
    /// (packets since the baseline, packets since the window's reading) of rule `key`, which
    /// has counted `now`. A rule missing from a reading counts from zero: it was added since.
    pub fn since(&self, key: &RuleKey, now: u64) -> (u64, u64) {
        let side = match key.backend {
            Backend::Nftables => self.nft,
            Backend::IptablesLegacy => self.legacy,
        };
        let from = |counts: Option<&Counts>| {
            now.saturating_sub(counts.and_then(|c| c.get(key)).copied().unwrap_or(0))
        };
        (from(side.baseline), from(side.window))
    }

    /// Whether any backend has a start-up baseline.
    pub fn has_baseline(&self) -> bool {
        self.nft.baseline.is_some() || self.legacy.baseline.is_some()
    }
}

/// One namespace's readings of one source (nft, or iptables-legacy of one family).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readings {
    /// At start-up; `None` for a namespace first seen later (all its counts are then recent).
    pub baseline: Option<Reading>,
    /// The last [`KEPT`] readings after it, oldest first, none older than [`KEEP_NS`].
    recent: VecDeque<Reading>,
}

impl Readings {
    pub fn with_baseline(baseline: Reading) -> Self {
        Self {
            baseline: Some(baseline),
            recent: VecDeque::new(),
        }
    }

    /// Keeps `reading` (already taken: it only serves later drops).
    pub fn push(&mut self, reading: Reading) {
        let at_ns = reading.at_ns;
        self.recent
            .retain(|r| at_ns.saturating_sub(r.at_ns) < KEEP_NS);
        if self.recent.len() == KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back(reading);
    }

    /// The counts an attempt whose first drop came at `first_drop_ns` (CLOCK_MONOTONIC) is
    /// measured from: the latest reading finished before it, else the baseline when it was;
    /// `None` when no reading precedes the drop (count from zero). Without a time, the
    /// baseline.
    pub fn before(&self, first_drop_ns: Option<u64>) -> Option<&Counts> {
        let Some(t) = first_drop_ns else {
            return self.baseline.as_ref().map(|r| &r.counts);
        };
        self.recent
            .iter()
            .rev()
            .chain(self.baseline.as_ref())
            .find(|r| r.at_ns < t)
            .map(|r| &r.counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(at_ns: u64, packets: u64) -> Reading {
        let key = RuleKey {
            backend: Backend::Nftables,
            family: "ip".into(),
            table: "filter".into(),
            chain: "INPUT".into(),
            id: RuleId::Handle(2),
        };
        Reading {
            at_ns,
            counts: Counts::from([(key, packets)]),
        }
    }

    fn packets(counts: Option<&Counts>) -> Option<u64> {
        counts.map(|c| c.values().sum())
    }

    #[test]
    fn the_last_reading_before_the_first_drop() {
        let mut r = Readings::with_baseline(reading(100, 1));
        for (at, p) in [(200, 2), (300, 3), (400, 4)] {
            r.push(reading(at, p));
        }
        assert_eq!(packets(r.before(None)), Some(1));
        assert_eq!(packets(r.before(Some(350))), Some(3));
        // A reading finished at the drop's very time may already hold it.
        assert_eq!(packets(r.before(Some(300))), Some(2));
        assert_eq!(packets(r.before(Some(150))), Some(1));
        assert_eq!(packets(r.before(Some(50))), None);
        assert_eq!(packets(Readings::default().before(None)), None);
    }

    #[test]
    fn only_a_few_recent_readings_are_kept() {
        let mut r = Readings::with_baseline(reading(0, 0));
        for i in 1..=10 {
            r.push(reading(i * 10, i));
        }
        assert_eq!(r.recent.len(), KEPT);
        assert_eq!(packets(r.before(Some(65))), Some(0), "60 was pushed out");
        r.push(reading(KEEP_NS + 100, 11));
        assert_eq!(r.recent.len(), 1, "old readings expire");
        assert_eq!(packets(r.before(Some(KEEP_NS + 101))), Some(11));
    }
}
