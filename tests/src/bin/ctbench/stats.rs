//! The bench's estimators: medians of phases, and each mode's undisturbed rate.

/// The median of `v` (the upper one of an even count); 0 for none.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The `q` quantile (0..=1) of `v`, by rank; 0 for none.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v.get(i).copied().unwrap_or(0.0)
}

/// The quantile of a mode's pooled slices its "undisturbed" rate is.
pub const UNDISTURBED: f64 = 0.95;

/// A mode's undisturbed rate: the [`UNDISTURBED`] quantile of the slices of all its phases.
/// This machine's rate moves between states (about 26,000 and 43,000 connections a second
/// untraced, each lasting seconds, the same kernel functions taking the time in both): a
/// median of phases compares states more than modes. What slows a phase only ever lowers
/// its rate, while a tracer's cost is in every slice, so the fast end of each mode's slices
/// is compared.
pub fn undisturbed(phases: &[Vec<f64>]) -> f64 {
    let all: Vec<f64> = phases.iter().flatten().copied().collect();
    quantile(&all, UNDISTURBED)
}

/// The 95% interval of `undisturbed(mode) / undisturbed(base)` over 1,000 resamplings of
/// each one's phases (with replacement; a fixed seed, so a run's figures can be re-derived).
pub fn interval(mode: &[Vec<f64>], base: &[Vec<f64>]) -> (f64, f64) {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: usize| {
        // xorshift64*: enough to pick phases.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
    };
    let mut resample = |phases: &[Vec<f64>]| -> f64 {
        let picked: Vec<Vec<f64>> = (0..phases.len())
            .map(|_| phases[next(phases.len())].clone())
            .collect();
        undisturbed(&picked)
    };
    let ratios: Vec<f64> = (0..1000).map(|_| resample(mode) / resample(base)).collect();
    (quantile(&ratios, 0.025), quantile(&ratios, 0.975))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_taken_by_rank() {
        let v = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 0.5), 3.0);
        assert_eq!(quantile(&v, 1.0), 5.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
        assert_eq!(median(&[2.0, 1.0, 4.0, 3.0]), 3.0);
    }

    #[test]
    fn a_slow_phase_does_not_move_the_undisturbed_rate() {
        // Two phases at the machine's fast state and one at its slow state: the pooled slices'
        // fast end is the fast state's, where a median of the phases' means would move.
        let fast: Vec<f64> = (0..20).map(|i| 40_000.0 + f64::from(i)).collect();
        let slow: Vec<f64> = (0..20).map(|i| 26_000.0 + f64::from(i)).collect();
        let with_slow = undisturbed(&[fast.clone(), slow.clone(), fast.clone()]);
        let without = undisturbed(&[fast.clone(), fast.clone()]);
        assert!(
            (with_slow - without).abs() < 2.0,
            "{with_slow} vs {without}"
        );
        assert!(with_slow > 40_000.0);
    }

    #[test]
    fn the_interval_holds_the_ratio_and_repeats() {
        let base: Vec<Vec<f64>> = (0..6)
            .map(|p| (0..20).map(|i| 40_000.0 + f64::from(p * 20 + i)).collect())
            .collect();
        let traced: Vec<Vec<f64>> = base
            .iter()
            .map(|phase| phase.iter().map(|r| r * 0.95).collect())
            .collect();
        let ratio = undisturbed(&traced) / undisturbed(&base);
        let (lo, hi) = interval(&traced, &base);
        assert!(lo <= ratio && ratio <= hi, "{lo} {ratio} {hi}");
        assert!(hi - lo < 0.05, "{lo} {hi}");
        assert_eq!(interval(&traced, &base), (lo, hi), "a fixed seed");
    }
}
