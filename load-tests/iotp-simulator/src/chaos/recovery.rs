//! What a fault cost, from what the run measured afterwards.
//!
//! **Time to recover**: from the fault until the store takes at least [`SHARE`] of its
//! pre-fault rate again, for [`HOLD`] seconds in a row. The pre-fault rate is the median
//! messages stored per second over the [`BASELINE`] seconds before the fault (by store time,
//! the audit's timeline). A fault the store never noticed recovers in 0 s; a fault after which
//! the rate never came back before the stream ended has no recovery time.
//!
//! **Redeliveries**: how much a counter that only redeliveries move (the upserter's
//! duplicates removed, MQTT messages the bridge received beyond the fleet's PUBACKs) grew
//! between the fault and the next one. With faults close together the windows are where the
//! counters moved, not proof of which fault moved them.

use std::collections::BTreeMap;

use serde::Serialize;

/// Recovered at this share of the pre-fault rate.
pub const SHARE: f64 = 0.8;

/// Seconds before the fault whose median is the pre-fault rate.
pub const BASELINE: i64 = 10;

/// Seconds in a row the rate must hold to count as recovered.
pub const HOLD: i64 = 3;

/// How the stored rate went through one fault.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Recovery {
    /// Median msgs/s stored over the [`BASELINE`] seconds before the fault (0: the stream had
    /// not started).
    pub baseline: f64,
    /// Lowest msgs/s stored from the fault until it recovered.
    pub lowest: f64,
    /// Seconds from the fault until the rate was back; `None`: not before the stream ended.
    pub seconds: Option<f64>,
}

/// One fault in the report.
#[derive(Debug, Clone, Serialize)]
pub struct FaultCost {
    /// The action (`kill parser`).
    pub action: String,
    /// Seconds since the first publish.
    pub at: f64,
    /// Seconds until the replicas it started were ready, or the broker listened again.
    pub ready_after: f64,
    /// What happened.
    pub detail: String,
    /// Whether the action failed.
    pub failed: bool,
    /// The stored rate through it.
    pub recovery: Recovery,
    /// Messages the store removed as duplicates from this fault until the next.
    pub store_duplicates: f64,
    /// MQTT messages the bridges received beyond the fleet's PUBACKs, from this fault until
    /// the next: redeliveries from the broker.
    pub mqtt_redeliveries: f64,
}

/// The recovery from a fault at `at` (seconds since the first publish) on a timeline of
/// messages stored per second (second since the first publish → count; missing seconds
/// stored nothing).
pub fn recovery(stored: &BTreeMap<i64, u64>, at: f64) -> Recovery {
    let (Some(first), Some(last)) = (
        stored.keys().next().copied(),
        stored.keys().next_back().copied(),
    ) else {
        return Recovery {
            baseline: 0.0,
            lowest: 0.0,
            seconds: None,
        };
    };
    let rate = |s: i64| stored.get(&s).copied().unwrap_or(0) as f64;
    let t = at.floor() as i64;
    let mut before: Vec<f64> = (t - BASELINE..t)
        .filter(|s| *s >= first)
        .map(rate)
        .collect();
    before.sort_by(f64::total_cmp);
    let baseline = before.get(before.len() / 2).copied().unwrap_or(0.0);
    let bar = SHARE * baseline;
    let mut lowest = f64::INFINITY;
    for s in t.max(first)..=last - HOLD + 1 {
        if (s..s + HOLD).all(|x| rate(x) >= bar) {
            return Recovery {
                baseline,
                lowest: if lowest.is_finite() { lowest } else { rate(s) },
                seconds: Some((s as f64 - at).max(0.0)),
            };
        }
        lowest = lowest.min(rate(s));
    }
    Recovery {
        baseline,
        lowest: if lowest.is_finite() { lowest } else { 0.0 },
        seconds: None,
    }
}

/// How much a sampled counter (epoch ms, value; in time order) grew from `from` to `to`
/// (epoch ms): its last sample at or before `to` minus its last sample at or before `from`.
pub fn growth(series: &[(i64, f64)], from: i64, to: i64) -> f64 {
    let at = |t: i64| {
        series
            .iter()
            .take_while(|(when, _)| *when <= t)
            .last()
            .map(|(_, v)| *v)
            .unwrap_or(0.0)
    };
    (at(to) - at(from)).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeline(rates: &[u64]) -> BTreeMap<i64, u64> {
        rates
            .iter()
            .enumerate()
            .map(|(s, n)| (s as i64, *n))
            .collect()
    }

    #[test]
    fn a_dip_recovers_when_the_rate_holds_at_four_fifths_of_the_median_before() {
        // 10 s at ~100/s, the fault at 10.4 s, 3 s near nothing, then back at 85.
        let mut rates = vec![100, 90, 110, 100, 100, 100, 95, 105, 100, 100];
        rates.extend([40, 0, 5, 85, 85, 85, 85]);
        let r = recovery(&timeline(&rates), 10.4);
        assert_eq!(r.baseline, 100.0);
        assert_eq!(r.lowest, 0.0);
        let seconds = r.seconds.expect("recovered");
        assert!((seconds - 2.6).abs() < 1e-9, "{seconds}");
    }

    #[test]
    fn one_good_second_is_not_recovery_and_a_fault_nobody_noticed_costs_nothing() {
        let mut rates = vec![100; 10];
        rates.extend([0, 100, 0, 100, 100, 100]);
        assert_eq!(recovery(&timeline(&rates), 10.0).seconds, Some(3.0));
        let steady = timeline(&[100; 20]);
        let r = recovery(&steady, 12.5);
        assert_eq!((r.seconds, r.lowest), (Some(0.0), 100.0));
    }

    #[test]
    fn a_rate_that_never_came_back_has_no_recovery_time_and_an_early_fault_no_baseline() {
        let mut rates = vec![100; 10];
        rates.extend([10, 10, 10, 10]);
        let r = recovery(&timeline(&rates), 10.0);
        assert_eq!((r.seconds, r.lowest), (None, 10.0));
        // Before the first store: no baseline, anything counts as back.
        let r = recovery(&timeline(&[0, 50, 50, 50]), 0.0);
        assert_eq!((r.baseline, r.seconds), (0.0, Some(0.0)));
        assert_eq!(recovery(&BTreeMap::new(), 3.0).seconds, None);
    }

    #[test]
    fn growth_is_the_difference_of_the_last_samples_at_each_end() {
        let series = [(1000, 5.0), (2000, 7.0), (3000, 12.0), (4000, 12.0)];
        assert_eq!(growth(&series, 1500, 3500), 7.0);
        assert_eq!(growth(&series, 0, 1000), 5.0);
        assert_eq!(growth(&series, 4000, 9000), 0.0);
    }
}
