//! What every device will send, decided up front from the scenario and its seed, so the audit
//! knows each message's expected outcome.

use std::collections::BTreeSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::device::{Device, PayloadFault, Profile};
use crate::scenario::Scenario;

/// A fault injected on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// The same message sent twice.
    DuplicateSend,
    /// Part of a window sent in reverse order.
    OutOfOrder,
    /// Device clock an hour ahead.
    ClockSkew,
    /// Truncated JSON.
    Malformed,
    /// Past the size limit.
    Oversized,
    /// From a device the registry does not know.
    UnknownDevice,
    /// Measured while offline, sent in a burst on reconnect.
    OfflineBurst,
}

/// What the pipeline must do with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Expected {
    /// Stored exactly once.
    Stored,
    /// Dead-lettered, with this reason, and parked in the archive.
    DeadLetter(&'static str),
}

impl Fault {
    /// Every fault.
    pub const ALL: [Fault; 7] = [
        Fault::DuplicateSend,
        Fault::OutOfOrder,
        Fault::ClockSkew,
        Fault::Malformed,
        Fault::Oversized,
        Fault::UnknownDevice,
        Fault::OfflineBurst,
    ];

    /// The outcome the pipeline owes.
    pub fn expected(self) -> Expected {
        match self {
            Fault::DuplicateSend | Fault::OutOfOrder | Fault::OfflineBurst => Expected::Stored,
            Fault::ClockSkew => Expected::DeadLetter("produced_in_future"),
            Fault::Malformed => Expected::DeadLetter("malformed_payload"),
            Fault::Oversized => Expected::DeadLetter("payload_too_large"),
            Fault::UnknownDevice => Expected::DeadLetter("unknown_device"),
        }
    }

    /// The payload it needs.
    pub fn payload(self) -> PayloadFault {
        match self {
            Fault::ClockSkew => PayloadFault::ClockSkew(3_600_000),
            Fault::Malformed => PayloadFault::Malformed,
            Fault::Oversized => PayloadFault::Oversized,
            _ => PayloadFault::None,
        }
    }
}

/// One thing a device does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send telemetry message `seq` (with a fault, perhaps).
    Telemetry {
        /// Its seqNo.
        seq: u64,
        /// Injected fault.
        fault: Option<Fault>,
    },
    /// Send the previous telemetry message again, byte for byte.
    Resend,
    /// Send a heartbeat.
    Heartbeat,
    /// Disconnect, measure `count` messages (seqNos from `first`) over the offline time, then
    /// reconnect and send them.
    Offline {
        /// First seqNo measured offline.
        first: u64,
        /// How many.
        count: u64,
    },
}

/// One device's plan.
#[derive(Debug, Clone)]
pub struct DevicePlan {
    /// Device number (its id derives from it).
    pub index: usize,
    /// Device id.
    pub id: String,
    /// In the registry.
    pub registered: bool,
    /// Profile.
    pub profile: Profile,
    /// What it does, in order.
    pub steps: Vec<Step>,
    /// Telemetry seqNos it uses: `0..seq_count` (offset by the run's seq start).
    pub seq_count: u64,
}

impl DevicePlan {
    /// Fault of each seqNo (index = seqNo).
    pub fn faults(&self) -> Vec<Option<Fault>> {
        let mut out = vec![None; self.seq_count as usize];
        let mut last = None;
        for step in &self.steps {
            match *step {
                Step::Telemetry { seq, fault } => {
                    out[seq as usize] = fault;
                    last = Some(seq);
                }
                Step::Resend => {
                    if let Some(seq) = last {
                        out[seq as usize] = Some(Fault::DuplicateSend);
                    }
                }
                Step::Offline { first, count } => {
                    for seq in first..first + count {
                        out[seq as usize] = Some(Fault::OfflineBurst);
                    }
                }
                Step::Heartbeat => {}
            }
        }
        out
    }
}

/// Plan the whole fleet.
pub fn plan(s: &Scenario) -> Vec<DevicePlan> {
    let mut rng = StdRng::seed_from_u64(s.seed ^ 0x5eed_fa17);
    let f = &s.faults;
    let m = s.messages_per_device;
    // Whole-device faults on distinct devices.
    let mut order: Vec<usize> = (0..s.devices).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.gen_range(0..=i));
    }
    let out_of_order: BTreeSet<usize> = order
        .iter()
        .take(f.out_of_order as usize)
        .copied()
        .collect();
    let offline: BTreeSet<usize> = order
        .iter()
        .skip(f.out_of_order as usize)
        .take(f.offline_bursts as usize)
        .copied()
        .collect();
    // Per-message faults on distinct (device, seq) of the other devices... or any device when
    // all are taken.
    let mut message_faults: std::collections::BTreeMap<(usize, u64), Fault> = Default::default();
    let eligible: Vec<usize> = (0..s.devices)
        .filter(|d| !out_of_order.contains(d) && !offline.contains(d))
        .collect();
    let eligible = if eligible.is_empty() {
        (0..s.devices).collect()
    } else {
        eligible
    };
    for (fault, n) in [
        (Fault::DuplicateSend, f.duplicate_sends),
        (Fault::ClockSkew, f.clock_skew),
        (Fault::Malformed, f.malformed),
        (Fault::Oversized, f.oversized),
    ] {
        let mut placed = 0;
        while placed < n && m > 0 {
            let device = eligible[rng.gen_range(0..eligible.len())];
            let seq = rng.gen_range(0..m);
            if let std::collections::btree_map::Entry::Vacant(e) =
                message_faults.entry((device, seq))
            {
                e.insert(fault);
                placed += 1;
            }
        }
    }
    let mut plans = Vec::with_capacity(s.devices + f.unknown_devices as usize);
    for index in 0..s.devices {
        let device = Device::new(index);
        let mut seqs: Vec<u64> = (0..m).collect();
        let mut window = None;
        if out_of_order.contains(&index) {
            let start = rng.gen_range(0..=(m - 10)) as usize;
            seqs[start..start + 10].reverse();
            window = Some(start..start + 10);
        }
        let mut steps = Vec::with_capacity(m as usize + 8);
        let mut sent = 0u64;
        let mut seq_count = m;
        // Offline devices number on: what they measure offline takes the next seqNos.
        let mut shift = 0;
        for (pos, planned) in seqs.into_iter().enumerate() {
            if offline.contains(&index) && pos as u64 == m / 2 {
                steps.push(Step::Offline {
                    first: planned,
                    count: f.offline_messages,
                });
                seq_count += f.offline_messages;
                shift = f.offline_messages;
            }
            let fault = message_faults.get(&(index, planned)).copied();
            let seq = planned + shift;
            let in_window = window.as_ref().is_some_and(|w| w.contains(&pos));
            steps.push(Step::Telemetry {
                seq,
                fault: match fault {
                    Some(Fault::DuplicateSend) | None if in_window => Some(Fault::OutOfOrder),
                    Some(Fault::DuplicateSend) | None => None,
                    other => other,
                },
            });
            if fault == Some(Fault::DuplicateSend) {
                steps.push(Step::Resend);
            }
            sent += 1;
            if s.heartbeat_every > 0 && sent.is_multiple_of(s.heartbeat_every) {
                steps.push(Step::Heartbeat);
            }
        }
        plans.push(DevicePlan {
            index,
            id: device.id,
            registered: true,
            profile: device.profile,
            steps,
            seq_count,
        });
    }
    for u in 0..f.unknown_devices as usize {
        let device = Device::new(s.devices + u);
        plans.push(DevicePlan {
            index: s.devices + u,
            id: device.id,
            registered: false,
            profile: device.profile,
            steps: (0..f.unknown_device_messages)
                .map(|seq| Step::Telemetry {
                    seq,
                    fault: Some(Fault::UnknownDevice),
                })
                .collect(),
            seq_count: f.unknown_device_messages,
        });
    }
    plans
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Faults;

    fn faults_scenario() -> Scenario {
        Scenario {
            devices: 20,
            messages_per_device: 50,
            heartbeat_every: 10,
            faults: Faults {
                duplicate_sends: 7,
                out_of_order: 2,
                clock_skew: 3,
                malformed: 4,
                oversized: 2,
                unknown_devices: 2,
                unknown_device_messages: 5,
                offline_bursts: 2,
                offline_for: std::time::Duration::from_secs(1),
                offline_messages: 6,
            },
            ..Scenario::default()
        }
    }

    #[test]
    fn every_fault_is_placed_as_often_as_asked_and_deterministically() {
        let s = faults_scenario();
        let plans = plan(&s);
        assert_eq!(plans.len(), 22);
        let mut counts = std::collections::BTreeMap::new();
        for p in &plans {
            for fault in p.faults().into_iter().flatten() {
                *counts.entry(fault).or_insert(0u64) += 1;
            }
        }
        assert_eq!(counts[&Fault::DuplicateSend], 7);
        assert_eq!(counts[&Fault::OutOfOrder], 2 * 10);
        assert_eq!(counts[&Fault::ClockSkew], 3);
        assert_eq!(counts[&Fault::Malformed], 4);
        assert_eq!(counts[&Fault::Oversized], 2);
        assert_eq!(counts[&Fault::UnknownDevice], 2 * 5);
        assert_eq!(counts[&Fault::OfflineBurst], 2 * 6);
        let again = plan(&s);
        assert!(plans.iter().zip(&again).all(|(a, b)| a.steps == b.steps));
    }

    #[test]
    fn every_seq_no_is_sent_once_plus_resends_and_heartbeats_follow_the_count() {
        let s = faults_scenario();
        for p in plan(&s).iter().filter(|p| p.registered) {
            let mut seen = vec![0u32; p.seq_count as usize];
            let mut heartbeats = 0;
            for step in &p.steps {
                match *step {
                    Step::Telemetry { seq, .. } => seen[seq as usize] += 1,
                    Step::Offline { first, count } => {
                        (first..first + count).for_each(|q| seen[q as usize] += 1)
                    }
                    Step::Heartbeat => heartbeats += 1,
                    Step::Resend => {}
                }
            }
            assert!(seen.iter().all(|n| *n == 1), "{}: {seen:?}", p.id);
            assert_eq!(heartbeats, 5, "one per 10 telemetry messages");
        }
    }
}
