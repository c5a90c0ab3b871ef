//! Reconcile what the devices were acknowledged for against what the store and the dead-letter
//! archive hold: lost, duplicated, unexpected, every dead letter matched to the fault that
//! caused it, every device's twin checked, the roll-ups recomputed from the stored raw tier
//! ([`rollups`]), and device→store latency.

use std::collections::{BTreeMap, HashMap};

use iotp_store::{Archived, StoredMessage, Twin};
use serde::Serialize;

use crate::device::FIRMWARE;
use crate::fleet::FleetRun;
use crate::plan::{Expected, Fault};

pub mod rollups;

/// Examples kept per finding.
const SAMPLES: usize = 20;

/// A count with examples.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Finding {
    /// How many.
    pub count: u64,
    /// Up to 20 examples (`device/seqNo: detail`).
    pub examples: Vec<String>,
}

impl Finding {
    fn add(&mut self, example: impl FnOnce() -> String) {
        self.count += 1;
        if self.examples.len() < SAMPLES {
            self.examples.push(example());
        }
    }
}

/// One fault kind's accounting.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FaultLine {
    /// The fault.
    pub fault: Fault,
    /// The outcome owed.
    pub expected: String,
    /// Messages carrying it that the broker acknowledged.
    pub injected: u64,
    /// Of those, with the expected outcome.
    pub accounted: u64,
}

/// Percentiles, ms.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 95th.
    pub p95: f64,
    /// 99th.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// Of these samples (sorted in place).
    pub fn of(samples: &mut [i64]) -> Self {
        samples.sort_unstable();
        let at = |q: f64| -> f64 {
            if samples.is_empty() {
                return 0.0;
            }
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i] as f64
        };
        Self {
            count: samples.len() as u64,
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: samples.last().map(|v| *v as f64).unwrap_or(0.0),
        }
    }
}

/// One second of the run (by store time).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Second {
    /// Seconds since the first publish.
    pub at: i64,
    /// Messages the store took in that second.
    pub stored: u64,
    /// Their device→store latency, ms.
    pub latency: Percentiles,
}

/// The audit's result.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Audit {
    /// Distinct telemetry messages (device, seqNo) the broker acknowledged.
    pub acked_messages: u64,
    /// Of those, owed to the store.
    pub expected_stored: u64,
    /// Of those, owed to the dead-letter archive.
    pub expected_dead_letters: u64,
    /// Messages of the run's tenant in the store.
    pub stored: u64,
    /// Dead letters of the run's tenant in the archive.
    pub dead_letters: u64,
    /// Acknowledged, owed to the store, not there (nor, wrongly, dead-lettered).
    pub lost: Finding,
    /// Stored more than once (more readings than the device sent).
    pub duplicated: Finding,
    /// Stored with fewer readings than the device sent.
    pub incomplete: Finding,
    /// Stored but never sent, or sent to be rejected.
    pub unexpected: Finding,
    /// Dead letters no injected fault explains.
    pub unexplained_dead_letters: Finding,
    /// Faults owed a dead letter that has none.
    pub missing_dead_letters: Finding,
    /// Published but never acknowledged (the device would send again); stored or not, not
    /// counted as lost.
    pub unacknowledged: u64,
    /// Of those, stored anyway (the PUBACK was what got lost).
    pub unacknowledged_but_stored: u64,
    /// Per fault kind.
    pub faults: Vec<FaultLine>,
    /// Twins checked (registered devices).
    pub twins_checked: u64,
    /// Twins missing, behind the store, or without the device's firmware or last heartbeat.
    pub twins_wrong: Finding,
    /// Roll-up buckets compared with a recomputation from the stored raw tier.
    pub rollups_checked: u64,
    /// Buckets that differ from the recomputation (or exist on one side only).
    pub rollups_wrong: Finding,
    /// When some were wrong: how many still differed once the services had stopped (the
    /// aggregator drained), which tells a fold the audit read too early from a wrong one.
    pub rollups_wrong_after_stop: Option<u64>,
    /// Device→store latency (producedAt to the store's commit) of messages without faults.
    pub latency_ms: Percentiles,
    /// Per second.
    pub timeline: Vec<Second>,
    /// First and last store time, epoch ms.
    pub first_stored_at: i64,
    /// Last.
    pub last_stored_at: i64,
}

impl Audit {
    /// Nothing lost, duplicated or unexpected, every fault accounted for, every twin right.
    pub fn passed(&self) -> bool {
        self.lost.count == 0
            && self.duplicated.count == 0
            && self.incomplete.count == 0
            && self.unexpected.count == 0
            && self.unexplained_dead_letters.count == 0
            && self.missing_dead_letters.count == 0
            && self.twins_wrong.count == 0
            && self.rollups_wrong.count == 0
            && self.faults.iter().all(|f| f.accounted == f.injected)
    }

    /// Messages per second between the first and the last store commit.
    pub fn stored_rate(&self) -> f64 {
        let span = (self.last_stored_at - self.first_stored_at).max(1) as f64 / 1000.0;
        self.expected_stored as f64 / span
    }
}

/// Reconcile.
pub fn audit(
    run: &FleetRun,
    stored: &[StoredMessage],
    letters: &[Archived],
    twins: &HashMap<String, Twin>,
) -> Audit {
    let mut a = Audit {
        stored: stored.len() as u64,
        dead_letters: letters.len() as u64,
        ..Audit::default()
    };
    let start = run.seq_start as i64;
    let mut by_device: HashMap<&str, Vec<&StoredMessage>> = HashMap::new();
    for m in stored {
        by_device.entry(m.device_id.as_str()).or_default().push(m);
    }
    let mut letters_by: HashMap<(String, String), u64> = HashMap::new();
    for l in letters {
        let device = l.letter.device_id.clone().unwrap_or_default();
        *letters_by
            .entry((device, l.letter.reason_code.clone()))
            .or_default() += 1;
    }
    let mut owed_letters: HashMap<(String, String), Vec<Fault>> = HashMap::new();
    let mut lines: BTreeMap<Fault, (u64, u64)> = Fault::ALL.iter().map(|f| (*f, (0, 0))).collect();
    let mut latencies = Vec::with_capacity(stored.len());
    let mut per_second: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    let ledgers: HashMap<&str, _> = run.devices.iter().map(|d| (d.id.as_str(), d)).collect();

    for d in &run.devices {
        let mut found: HashMap<i64, &StoredMessage> = HashMap::new();
        for m in by_device.get(d.id.as_str()).into_iter().flatten() {
            // A store whose rows are not keyed by (deviceId, seqNo) would list a duplicate
            // as a row of its own.
            if found.insert(m.seq_no - start, m).is_some() {
                a.duplicated
                    .add(|| format!("{}/{}: stored twice", d.id, m.seq_no));
            }
        }
        for i in 0..d.acks.len() {
            let acked = d.acks[i] > 0;
            let published = d.publishes[i] > 0;
            let fault = d.faults[i];
            let expected = fault.map(Fault::expected).unwrap_or(Expected::Stored);
            let here = found.remove(&(i as i64));
            if published && !acked {
                a.unacknowledged += 1;
                if here.is_some() {
                    a.unacknowledged_but_stored += 1;
                }
            }
            if acked {
                a.acked_messages += 1;
                if let Some(f) = fault {
                    lines.entry(f).or_default().0 += 1;
                }
            }
            let key = || format!("{}/{}", d.id, start + i as i64);
            match (expected, here) {
                (Expected::Stored, Some(m)) => {
                    if !published {
                        a.unexpected
                            .add(|| format!("{}: stored, never sent", key()));
                        continue;
                    }
                    if acked {
                        a.expected_stored += 1;
                    }
                    if m.readings > d.readings {
                        a.duplicated.add(|| {
                            format!("{}: {} readings of {}", key(), m.readings, d.readings)
                        });
                    } else if m.readings < d.readings {
                        a.incomplete.add(|| {
                            format!("{}: {} readings of {}", key(), m.readings, d.readings)
                        });
                    } else if acked {
                        if let Some(f) = fault {
                            lines.entry(f).or_default().1 += 1;
                        }
                    }
                    if fault.is_none() {
                        let latency = m.stored_at - m.produced_at;
                        latencies.push(latency);
                        per_second
                            .entry((m.stored_at - run.started_at).div_euclid(1000))
                            .or_default()
                            .push(latency);
                    }
                    a.first_stored_at = if a.first_stored_at == 0 {
                        m.stored_at
                    } else {
                        a.first_stored_at.min(m.stored_at)
                    };
                    a.last_stored_at = a.last_stored_at.max(m.stored_at);
                }
                (Expected::Stored, None) => {
                    if acked {
                        a.expected_stored += 1;
                        a.lost
                            .add(|| format!("{}: acknowledged, not stored", key()));
                    }
                }
                (Expected::DeadLetter(reason), Some(_)) => {
                    a.unexpected
                        .add(|| format!("{}: stored, should be dead-lettered {reason}", key()));
                }
                (Expected::DeadLetter(reason), None) => {
                    if acked {
                        a.expected_dead_letters += 1;
                        if let Some(f) = fault {
                            owed_letters
                                .entry((d.id.clone(), reason.to_string()))
                                .or_default()
                                .push(f);
                        }
                    }
                }
            }
        }
        for (i, _) in found {
            a.unexpected
                .add(|| format!("{}/{}: stored, seqNo never sent", d.id, start + i));
        }
    }
    for m in stored {
        if !ledgers.contains_key(m.device_id.as_str()) {
            a.unexpected.add(|| {
                format!(
                    "{}/{}: stored, device not in the fleet",
                    m.device_id, m.seq_no
                )
            });
        }
    }
    // Dead letters: matched per (device, reason) to the faults that owe them.
    for (key, owed) in &owed_letters {
        let have = letters_by.remove(key).unwrap_or(0);
        let matched = have.min(owed.len() as u64);
        for f in owed.iter().take(matched as usize) {
            lines.entry(*f).or_default().1 += 1;
        }
        for _ in matched..owed.len() as u64 {
            a.missing_dead_letters
                .add(|| format!("{}: no {} dead letter", key.0, key.1));
        }
        for _ in owed.len() as u64..have {
            a.unexplained_dead_letters
                .add(|| format!("{}: extra {} dead letter", key.0, key.1));
        }
    }
    for ((device, reason), n) in letters_by {
        for _ in 0..n {
            a.unexplained_dead_letters
                .add(|| format!("{device}: {reason} dead letter, no fault injected"));
        }
    }
    a.faults = lines
        .into_iter()
        .filter(|(_, (injected, _))| *injected > 0)
        .map(|(fault, (injected, accounted))| FaultLine {
            fault,
            expected: match fault.expected() {
                Expected::Stored => "stored once".to_string(),
                Expected::DeadLetter(r) => format!("dead letter {r}"),
            },
            injected,
            accounted,
        })
        .collect();
    // Twins: at or past the newest stored message, with the firmware and the last heartbeat.
    for d in run.devices.iter().filter(|d| d.registered) {
        let Some(newest) = by_device
            .get(d.id.as_str())
            .and_then(|ms| ms.iter().max_by_key(|m| m.seq_no))
        else {
            continue;
        };
        a.twins_checked += 1;
        let newest_at = by_device[d.id.as_str()]
            .iter()
            .map(|m| m.produced_at)
            .max()
            .unwrap_or(0);
        match twins.get(&d.id) {
            None => a.twins_wrong.add(|| format!("{}: no twin", d.id)),
            Some(t) if t.last_seq_no < newest.seq_no => a.twins_wrong.add(|| {
                format!(
                    "{}: twin at seqNo {}, store has {}",
                    d.id, t.last_seq_no, newest.seq_no
                )
            }),
            Some(t) if t.last_seen_at < newest_at.max(d.last_heartbeat_at) => {
                a.twins_wrong.add(|| {
                    format!(
                        "{}: twin last seen {}, device sent at {}",
                        d.id,
                        t.last_seen_at,
                        newest_at.max(d.last_heartbeat_at)
                    )
                })
            }
            // Firmware comes with seqNo 0 (and with heartbeats, which never move the twin's
            // seqNo): owed only when seqNo 0 reached the store.
            Some(t)
                if d.faults.first().copied().flatten().is_none()
                    && t.firmware.as_deref() != Some(FIRMWARE) =>
            {
                a.twins_wrong
                    .add(|| format!("{}: firmware {:?}", d.id, t.firmware))
            }
            Some(_) => {}
        }
    }
    a.latency_ms = Percentiles::of(&mut latencies);
    a.timeline = per_second
        .into_iter()
        .map(|(at, mut l)| Second {
            at,
            stored: l.len() as u64,
            latency: Percentiles::of(&mut l),
        })
        .collect();
    a
}

#[cfg(test)]
mod tests;
