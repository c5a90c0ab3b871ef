//! The pure folds every backend shares, so the rules are the same whatever stores the result:
//! an observation into a device's twin ([`fold`]) and a reading into a roll-up bucket
//! ([`fold_reading`]). No I/O here.

use std::collections::BTreeMap;

use crate::{Bucket, LastValue, Observation, Twin};

/// Fold `obs` into `twin` (or a new twin). Pure: the backends share it.
pub(crate) fn fold(twin: Option<Twin>, obs: &Observation) -> Twin {
    let mut t = twin.unwrap_or_else(|| new_twin(&obs.tenant, &obs.device_id));
    fold_into(&mut t, obs);
    t
}

/// A device's twin before its first observation.
pub(crate) fn new_twin(tenant: &str, device_id: &str) -> Twin {
    Twin {
        tenant: tenant.to_string(),
        device_id: device_id.to_string(),
        last_seq_no: -1,
        last_seen_at: i64::MIN,
        last_values: BTreeMap::new(),
        firmware: None,
        config_version: None,
        heartbeat_secs: None,
        online: false,
        alarms: Vec::new(),
        seq_gaps: 0,
    }
}

/// Fold `obs` into `t` in place; whether `t` changed (an observation already folded in, or
/// an older one that sets nothing, leaves it as it was: nothing to write).
pub(crate) fn fold_into(t: &mut Twin, obs: &Observation) -> bool {
    let mut changed = false;
    for (metric, value, unit) in &obs.readings {
        let newer = t
            .last_values
            .get(metric)
            .is_none_or(|v| obs.seq_no > v.seq_no);
        if newer {
            t.last_values.insert(
                metric.clone(),
                LastValue {
                    value: *value,
                    unit: unit.clone(),
                    at: obs.produced_at,
                    seq_no: obs.seq_no,
                },
            );
            changed = true;
        }
    }
    // Device state: the newest observation that carries a field sets it, and an older one
    // fills it while it is unknown. Arrival order is not send order (an MQTT broker with more
    // than one message in flight may reorder: Mosquitto delivered a device's seqNo 0, the only
    // telemetry carrying its firmware, after later ones in the standard load test).
    let newest = obs.seq_no > t.last_seq_no;
    if newest {
        t.last_seq_no = obs.seq_no;
        changed = true;
    }
    if obs.firmware.is_some() && (newest || t.firmware.is_none()) && t.firmware != obs.firmware {
        t.firmware = obs.firmware.clone();
        changed = true;
    }
    if obs.config_version.is_some()
        && (newest || t.config_version.is_none())
        && t.config_version != obs.config_version
    {
        t.config_version = obs.config_version.clone();
        changed = true;
    }
    if obs.heartbeat_secs.is_some()
        && (newest || t.heartbeat_secs.is_none())
        && t.heartbeat_secs != obs.heartbeat_secs
    {
        t.heartbeat_secs = obs.heartbeat_secs;
        changed = true;
    }
    if obs.produced_at > t.last_seen_at {
        t.last_seen_at = obs.produced_at;
        t.online = true;
        t.alarms.retain(|a| a != "offline");
        changed = true;
    }
    changed
}

/// Whether reading `a` (event time, value) comes before `b`: by time, then by value.
pub fn reading_before(a: (i64, f64), b: (i64, f64)) -> bool {
    a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).is_lt()
}

/// Fold one reading into a bucket (or start one).
pub(crate) fn fold_reading(
    bucket: Option<Bucket>,
    key: (&str, &str, &str, &str, i64),
    value: f64,
    at: i64,
    unit: &Option<String>,
    cumulative: bool,
) -> Bucket {
    match bucket {
        None => Bucket {
            tenant: key.0.to_string(),
            device_id: key.1.to_string(),
            metric: key.2.to_string(),
            granularity: key.3.to_string(),
            bucket_start: key.4,
            count: 1,
            sum: value,
            min: value,
            max: value,
            first: value,
            first_at: at,
            last: value,
            last_at: at,
            unit: unit.clone(),
            cumulative,
            revision: 1,
        },
        Some(mut b) => {
            b.count += 1;
            b.sum += value;
            b.min = b.min.min(value);
            b.max = b.max.max(value);
            // First and last by event time; readings at the same millisecond by value, so a
            // bucket does not depend on the order its readings arrived in (they may arrive
            // out of order: several bridge replicas, unkeyed raw records).
            if reading_before((at, value), (b.first_at, b.first)) {
                b.first = value;
                b.first_at = at;
            }
            if reading_before((b.last_at, b.last), (at, value)) {
                b.last = value;
                b.last_at = at;
            }
            b.revision += 1;
            b
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(
        seq_no: i64,
        produced_at: i64,
        firmware: Option<&str>,
        metric: &str,
    ) -> Observation {
        Observation {
            tenant: "t".into(),
            device_id: "d".into(),
            seq_no,
            produced_at,
            readings: vec![(metric.into(), seq_no as f64, Some("Cel".into()))],
            firmware: firmware.map(Into::into),
            config_version: Some("c1".into()),
            heartbeat_secs: Some(60),
        }
    }

    #[test]
    fn folding_in_place_says_whether_the_twin_changed() {
        // New, newer, the same again, older with a new metric, older with nothing new, a
        // firmware filled in late, and the offline alarm cleared by a newer message.
        let steps = [
            observed(5, 5000, None, "temp"),
            observed(6, 6000, None, "temp"),
            observed(6, 6000, None, "temp"),
            observed(2, 2000, None, "hum"),
            observed(1, 1000, None, "temp"),
            observed(0, 0, Some("1.2"), "temp"),
            observed(0, 0, Some("1.2"), "temp"),
            observed(7, 7000, Some("1.2"), "temp"),
        ];
        let mut twin = fold(None, &steps[0]);
        twin.online = false;
        twin.alarms = vec!["offline".into()];
        let expected = [true, false, true, false, true, false, true];
        for (step, expected) in steps[1..].iter().zip(expected) {
            let before = twin.clone();
            let changed = fold_into(&mut twin, step);
            assert_eq!(changed, before != twin, "seqNo {}", step.seq_no);
            assert_eq!(changed, expected, "seqNo {}", step.seq_no);
        }
        assert_eq!((twin.last_seq_no, twin.online), (7, true));
        assert!(twin.alarms.is_empty());
        assert_eq!(twin.firmware.as_deref(), Some("1.2"));
        assert_eq!(twin.last_values.len(), 2);
    }

    #[test]
    fn a_bucket_does_not_depend_on_the_order_its_readings_arrive_in() {
        // Two readings in the same millisecond at each end, and a late one.
        let readings = [
            (1000, 5.0),
            (1000, 2.0),
            (1500, 7.0),
            (1999, 1.0),
            (1999, 9.0),
        ];
        let fold_all = |order: &[usize]| {
            order.iter().fold(None, |b, &i| {
                let (at, value) = readings[i];
                Some(fold_reading(
                    b,
                    ("t", "d", "m", "hour", 0),
                    value,
                    at,
                    &None,
                    false,
                ))
            })
        };
        let a = fold_all(&[0, 1, 2, 3, 4]).expect("bucket");
        for order in [[4, 3, 2, 1, 0], [2, 1, 4, 0, 3], [3, 0, 4, 2, 1]] {
            let b = fold_all(&order).expect("bucket");
            assert_eq!(
                (b.first_at, b.first, b.last_at, b.last, b.min, b.max, b.count),
                (a.first_at, a.first, a.last_at, a.last, a.min, a.max, a.count),
                "{order:?}"
            );
        }
        assert_eq!((a.first_at, a.first), (1000, 2.0));
        assert_eq!((a.last_at, a.last), (1999, 9.0));
    }

    fn obs(seq_no: i64, at: i64, value: f64) -> Observation {
        Observation {
            tenant: "t".into(),
            device_id: "d".into(),
            seq_no,
            produced_at: at,
            readings: vec![("temp".into(), value, Some("Cel".into()))],
            firmware: Some(format!("fw-{seq_no}")),
            config_version: None,
            heartbeat_secs: Some(60),
        }
    }

    #[test]
    fn any_order_and_replays_end_at_the_newest_state() {
        let all = [obs(1, 1000, 10.0), obs(2, 2000, 20.0), obs(3, 3000, 30.0)];
        let orders: [[usize; 5]; 3] = [[0, 1, 2, 2, 0], [2, 1, 0, 1, 2], [1, 2, 0, 0, 1]];
        let mut results = Vec::new();
        for order in orders {
            let mut twin = None;
            for i in order {
                twin = Some(fold(twin, &all[i]));
            }
            results.push(twin.expect("twin"));
        }
        for t in &results {
            assert_eq!(t.last_seq_no, 3);
            assert_eq!(t.last_seen_at, 3000);
            assert_eq!(t.last_values["temp"].value, 30.0);
            assert_eq!(t.firmware.as_deref(), Some("fw-3"));
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn state_only_an_older_message_carried_is_kept_when_it_arrives_late() {
        let first = Observation {
            firmware: Some("fw-0".into()),
            config_version: Some("cfg-0".into()),
            ..obs(0, 1000, 1.0)
        };
        let later = Observation {
            firmware: None,
            heartbeat_secs: None,
            ..obs(5, 5000, 5.0)
        };
        let t = fold(Some(fold(None, &later)), &first);
        assert_eq!(t.last_seq_no, 5);
        assert_eq!(t.last_values["temp"].value, 5.0);
        assert_eq!(
            (
                t.firmware.as_deref(),
                t.config_version.as_deref(),
                t.heartbeat_secs
            ),
            (Some("fw-0"), Some("cfg-0"), Some(60))
        );
        let newer = Observation {
            firmware: Some("fw-6".into()),
            ..obs(6, 6000, 6.0)
        };
        let t = fold(Some(t), &newer);
        assert_eq!(t.firmware.as_deref(), Some("fw-6"), "the newest still wins");
    }
}
