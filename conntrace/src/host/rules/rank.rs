//! Ranks the dropping rules whose counters moved by how well their movement fits the packets
//! one attempt lost, and says how sure that makes the naming. On a busy node many counters move
//! at once; the rule that moved by exactly the attempt's count is the likeliest.

use super::history::{Backend, RuleKey};
use crate::engine::lookup::FirewallRule;

/// A dropping rule whose counter moved, as the look-up names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The rule; its `packets` are those counted since the namespace's baseline.
    pub rule: FirewallRule,
    pub backend: Backend,
    /// Packets counted since the last reading taken before the attempt's first drop (the
    /// baseline when no time was given): the movement ranked against the attempt's count.
    pub moved: u64,
    /// For iptables-nft rules: the line `iptables-nft-save` prints for it
    /// (`-A KUBE-SERVICES -d 10.0.0.2/32 ... -j REJECT --reject-with icmp-port-unreachable`),
    /// when it could be matched to the nft rule. Legacy rules' `text` already is that line.
    pub iptables: Option<String>,
    /// The rule's identity in the readings.
    pub key: RuleKey,
}

pub use crate::engine::lookup::Confidence;

impl Candidate {
    /// The rule as the engine names it: with its backend and its iptables-save line.
    pub fn into_rule(self) -> FirewallRule {
        FirewallRule {
            backend: self.backend,
            iptables: self.iptables,
            ..self.rule
        }
    }
}

/// Candidates in order of likelihood, and how sure the first is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranked {
    /// Never empty.
    pub candidates: Vec<Candidate>,
    pub confidence: Confidence,
}

/// Ranks `candidates` (rules with `moved > 0`; others are dropped) against `dropped`, the
/// packets this attempt lost at the hook (0: unknown). Order: moved by exactly `dropped`; then
/// moved by more (this attempt's packets and others'), least excess first; then moved by less
/// (they cannot hold all of them), most first. Without a count: most moved first. Ties: most
/// packets since the baseline, then family, table, chain and rule. `None` when no candidate
/// moved.
pub fn rank(mut candidates: Vec<Candidate>, dropped: u32) -> Option<Ranked> {
    candidates.retain(|c| c.moved > 0);
    let dropped = u64::from(dropped);
    // (class, distance): lower sorts first.
    let fit = |c: &Candidate| match c.moved.cmp(&dropped) {
        _ if dropped == 0 => (1, u64::MAX - c.moved),
        std::cmp::Ordering::Equal => (0, 0),
        std::cmp::Ordering::Greater => (1, c.moved - dropped),
        std::cmp::Ordering::Less => (2, dropped - c.moved),
    };
    candidates.sort_by(|a, b| {
        fit(a)
            .cmp(&fit(b))
            .then(b.rule.packets.cmp(&a.rule.packets))
            .then_with(|| a.key.cmp(&b.key))
    });
    let exact = candidates
        .iter()
        .filter(|c| dropped > 0 && c.moved == dropped)
        .count();
    let confidence = match (candidates.len(), exact) {
        (0, _) => return None,
        (_, 1) => Confidence::Exact,
        (1, _) => Confidence::OnlyOne,
        _ => Confidence::Ambiguous,
    };
    Some(Ranked {
        candidates,
        confidence,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::lookup::RuleAction;
    use crate::host::rules::history::RuleId;

    /// A candidate on rule `handle` of ip filter INPUT.
    fn c(handle: u64, moved: u64, packets: u64) -> Candidate {
        Candidate {
            rule: FirewallRule {
                backend: Default::default(),
                iptables: None,
                family: "ip".into(),
                table: "filter".into(),
                chain: "INPUT".into(),
                handle,
                text: format!("rule {handle}"),
                comment: None,
                action: RuleAction::Drop,
                packets,
            },
            backend: Backend::Nftables,
            moved,
            iptables: None,
            key: RuleKey {
                backend: Backend::Nftables,
                family: "ip".into(),
                table: "filter".into(),
                chain: "INPUT".into(),
                id: RuleId::Handle(handle),
            },
        }
    }

    /// The handles in rank order and the confidence.
    fn order(candidates: Vec<Candidate>, dropped: u32) -> String {
        match rank(candidates, dropped) {
            None => "none".into(),
            Some(r) => {
                let handles: Vec<String> = r
                    .candidates
                    .iter()
                    .map(|c| c.rule.handle.to_string())
                    .collect();
                format!("{} {:?}", handles.join(","), r.confidence)
            }
        }
    }

    #[test]
    fn exactly_the_attempts_count_comes_first() {
        // A busy node: three rules moved; only #7 by the attempt's 3 SYNs.
        let busy = vec![c(5, 120, 9000), c(7, 3, 3), c(9, 40, 41)];
        assert_eq!(order(busy.clone(), 3), "7,9,5 Exact");
        // Without the count: most moved first, nothing singled out.
        assert_eq!(order(busy, 0), "5,9,7 Ambiguous");
    }

    #[test]
    fn more_before_less_and_ties() {
        // Nothing moved by exactly 3: 4 (3 of ours + 1) before 10, both before 2 (short).
        let v = vec![c(1, 2, 2), c(2, 10, 10), c(3, 4, 4)];
        assert_eq!(order(v, 3), "3,2,1 Ambiguous");
        // Two exact fits: ambiguous, the one with more history first, then by rule.
        let v = vec![c(4, 1, 1), c(3, 1, 50), c(2, 1, 1)];
        assert_eq!(order(v, 1), "3,2,4 Ambiguous");
    }

    #[test]
    fn one_mover() {
        assert_eq!(order(vec![c(1, 3, 3)], 3), "1 Exact");
        assert_eq!(order(vec![c(1, 8, 8)], 3), "1 OnlyOne");
        assert_eq!(order(vec![c(1, 8, 8)], 0), "1 OnlyOne");
        // Rules that moved only before the attempt's window are no candidates.
        assert_eq!(order(vec![c(1, 0, 8), c(2, 2, 2)], 1), "2 OnlyOne");
        assert_eq!(order(vec![c(1, 0, 8)], 1), "none");
        assert_eq!(order(Vec::new(), 1), "none");
    }
}
