//! Roll-ups against a recomputation from the stored raw tier: every hour and day bucket of
//! every metric of every device folded again from the readings the store holds, compared with
//! what the aggregator folded from the stream. Equal only if the aggregator folded each stored
//! message exactly once, whatever was redelivered, replayed or killed in between.

use std::collections::BTreeMap;

use iotp_store::{Bucket, GRANULARITIES};

use super::Finding;

/// One stored reading: device, metric, value, event time (epoch ms).
pub type Reading = (String, String, f64, i64);

/// A bucket folded again: count, sum, min, max, (first_at, first), (last_at, last).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Fold {
    count: i64,
    sum: f64,
    min: f64,
    max: f64,
    first: (i64, f64),
    last: (i64, f64),
}

type Key = (String, String, String, i64);

/// Fold `readings` into hour and day buckets.
fn recompute(readings: &[Reading]) -> BTreeMap<Key, Fold> {
    let mut out: BTreeMap<Key, Fold> = BTreeMap::new();
    for (device, metric, value, at) in readings {
        for (granularity, len) in GRANULARITIES {
            let key = (
                device.clone(),
                metric.clone(),
                granularity.to_string(),
                at.div_euclid(len) * len,
            );
            let v = *value;
            out.entry(key)
                .and_modify(|f| {
                    f.count += 1;
                    f.sum += v;
                    f.min = f.min.min(v);
                    f.max = f.max.max(v);
                    // The aggregator's order: by time, then by value.
                    if iotp_store::reading_before((*at, v), f.first) {
                        f.first = (*at, v);
                    }
                    if iotp_store::reading_before(f.last, (*at, v)) {
                        f.last = (*at, v);
                    }
                })
                .or_insert(Fold {
                    count: 1,
                    sum: v,
                    min: v,
                    max: v,
                    first: (*at, v),
                    last: (*at, v),
                });
        }
    }
    out
}

/// Whether two sums of the same values (added in another order) are equal.
fn same_sum(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// Compare the aggregator's `buckets` with the recomputation from `readings`: buckets
/// checked, and the ones that differ (missing either side, or another count, sum, min, max,
/// first or last).
pub fn check(readings: &[Reading], buckets: &[Bucket]) -> (u64, Finding) {
    let mut expected = recompute(readings);
    let mut wrong = Finding::default();
    let checked = expected.len().max(buckets.len()) as u64;
    for b in buckets {
        let key = (
            b.device_id.clone(),
            b.metric.clone(),
            b.granularity.clone(),
            b.bucket_start,
        );
        let name = || format!("{}/{} {} {}", key.0, key.1, key.2, key.3);
        match expected.remove(&key) {
            None => {
                wrong.add(|| format!("{}: roll-up of {} readings, none stored", name(), b.count))
            }
            Some(f) => {
                let same = f.count == b.count
                    && same_sum(f.sum, b.sum)
                    && f.min == b.min
                    && f.max == b.max
                    && f.first == (b.first_at, b.first)
                    && f.last == (b.last_at, b.last);
                if !same {
                    wrong.add(|| {
                        format!(
                            "{}: count {} sum {} from the raw tier, roll-up count {} sum {}",
                            name(),
                            f.count,
                            f.sum,
                            b.count,
                            b.sum
                        )
                    });
                }
            }
        }
    }
    for ((device, metric, granularity, start), f) in expected {
        wrong.add(|| {
            format!(
                "{device}/{metric} {granularity} {start}: {} readings stored, no roll-up",
                f.count
            )
        });
    }
    (checked, wrong)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(granularity: &str, start: i64, values: &[(i64, f64)]) -> Bucket {
        let sum = values.iter().map(|v| v.1).sum();
        Bucket {
            tenant: "t".into(),
            device_id: "d".into(),
            metric: "power".into(),
            granularity: granularity.into(),
            bucket_start: start,
            count: values.len() as i64,
            sum,
            min: values.iter().map(|v| v.1).fold(f64::INFINITY, f64::min),
            max: values.iter().map(|v| v.1).fold(f64::NEG_INFINITY, f64::max),
            first: values[0].1,
            first_at: values[0].0,
            last: values[values.len() - 1].1,
            last_at: values[values.len() - 1].0,
            unit: None,
            cumulative: false,
            revision: 1,
        }
    }

    fn reading(at: i64, value: f64) -> Reading {
        ("d".into(), "power".into(), value, at)
    }

    #[test]
    fn roll_ups_folded_once_from_the_stored_readings_agree_in_any_order() {
        let hour = 3_600_000;
        let readings = [reading(hour + 5, 2.0), reading(10, 1.0), reading(20, 3.0)];
        let buckets = [
            bucket("hour", 0, &[(10, 1.0), (20, 3.0)]),
            bucket("hour", hour, &[(hour + 5, 2.0)]),
            bucket("day", 0, &[(10, 1.0), (20, 3.0), (hour + 5, 2.0)]),
        ];
        let (checked, wrong) = check(&readings, &buckets);
        assert_eq!((checked, wrong.count), (3, 0), "{wrong:?}");
    }

    #[test]
    fn a_reading_folded_twice_or_never_and_a_bucket_without_readings_are_found() {
        let readings = [reading(10, 1.0), reading(20, 3.0)];
        // Folded twice: (20, 3.0) counted again.
        let twice = [
            bucket("hour", 0, &[(10, 1.0), (20, 3.0), (20, 3.0)]),
            bucket("day", 0, &[(10, 1.0), (20, 3.0)]),
        ];
        assert_eq!(check(&readings, &twice).1.count, 1);
        // The day bucket never folded, and an hour bucket nothing stored explains.
        let missing = [
            bucket("hour", 0, &[(10, 1.0), (20, 3.0)]),
            bucket("hour", 7_200_000, &[(7_200_001, 1.0)]),
        ];
        let (_, wrong) = check(&readings, &missing);
        assert_eq!(wrong.count, 2, "{wrong:?}");
        assert!(wrong.examples.iter().any(|e| e.contains("no roll-up")));
        assert!(wrong.examples.iter().any(|e| e.contains("none stored")));
    }
}
