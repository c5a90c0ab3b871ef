//! The audit against hand-made ledgers, store contents and dead letters.

use super::*;
use crate::fleet::DeviceLedger;
use iotp_contract::DeadLetter;

/// A registered device with two readings per message that sent each seqNo once, acknowledged.
fn ledger(id: &str, faults: Vec<Option<Fault>>) -> DeviceLedger {
    let n = faults.len();
    DeviceLedger {
        publishes: vec![1; n],
        acks: vec![1; n],
        ..DeviceLedger::new(id.into(), true, 2, faults)
    }
}

fn stored(device: &str, seq_no: i64, readings: i64) -> StoredMessage {
    StoredMessage {
        device_id: device.into(),
        seq_no,
        msg_id: format!("{device}-{seq_no}"),
        produced_at: 1_000 + seq_no,
        stored_at: 1_050 + seq_no,
        readings,
    }
}

fn letter(device: &str, reason: &str) -> Archived {
    Archived {
        letter: DeadLetter {
            id: format!("{device}-{reason}"),
            stage: "parser".into(),
            reason_code: reason.into(),
            error: String::new(),
            source_topic: None,
            source_partition: None,
            source_offset: None,
            key: None,
            payload: Vec::new(),
            tenant: Some("t".into()),
            device_id: Some(device.into()),
            attempts: 1,
            first_failure_at: 0,
            last_failure_at: 0,
        },
        parked_at: 0,
        expires_at: 0,
        replayed_at: None,
        replays: 0,
    }
}

fn twin(device: &str, last_seq_no: i64) -> (String, Twin) {
    (
        device.to_string(),
        Twin {
            tenant: "t".into(),
            device_id: device.into(),
            last_seq_no,
            last_seen_at: 1_000 + last_seq_no,
            last_values: Default::default(),
            firmware: Some(FIRMWARE.into()),
            config_version: None,
            heartbeat_secs: None,
            online: true,
            alarms: Vec::new(),
            seq_gaps: 0,
        },
    )
}

fn run(devices: Vec<DeviceLedger>) -> FleetRun {
    FleetRun {
        devices,
        seq_start: 0,
        started_at: 1_000,
        finished_at: 2_000,
    }
}

#[test]
fn a_clean_run_passes_and_faults_are_accounted() {
    let mut d = ledger(
        "a",
        vec![
            None,
            Some(Fault::DuplicateSend),
            Some(Fault::Malformed),
            None,
        ],
    );
    d.acks[1] = 2;
    let r = run(vec![d]);
    let store = [stored("a", 0, 2), stored("a", 1, 2), stored("a", 3, 2)];
    let a = audit(
        &r,
        &store,
        &[letter("a", "malformed_payload")],
        &[twin("a", 3)].into(),
    );
    assert!(a.passed(), "{a:#?}");
    assert_eq!(
        (a.acked_messages, a.expected_stored, a.expected_dead_letters),
        (4, 3, 1)
    );
    assert_eq!(a.faults.len(), 2);
    assert!(a.faults.iter().all(|f| f.injected == 1 && f.accounted == 1));
    assert_eq!(
        a.latency_ms.count, 2,
        "faulted messages are left out of latency"
    );
    assert_eq!(a.latency_ms.p50, 50.0);
}

#[test]
fn lost_duplicated_unexpected_and_unexplained_are_each_found() {
    let r = run(vec![ledger(
        "a",
        vec![None, None, Some(Fault::ClockSkew), None],
    )]);
    let store = [
        stored("a", 0, 4),  // duplicated readings
        stored("a", 2, 2),  // should have been dead-lettered
        stored("a", 2, 2),  // and is stored twice
        stored("a", 9, 2),  // never sent
        stored("zz", 0, 2), // not in the fleet
    ];
    let letters = [letter("a", "unknown_device")];
    let a = audit(&r, &store, &letters, &[twin("a", 1)].into());
    assert!(!a.passed());
    assert_eq!(a.lost.count, 2, "seq 1 and 3: {:?}", a.lost.examples);
    assert_eq!(a.duplicated.count, 2, "{:?}", a.duplicated.examples);
    assert_eq!(a.unexpected.count, 3, "{:?}", a.unexpected.examples);
    assert_eq!(a.unexplained_dead_letters.count, 1);
    assert_eq!(a.twins_wrong.count, 1, "twin behind the store (9)");
    assert_eq!(
        a.faults[0].accounted, 0,
        "clock skew stored, not dead-lettered"
    );
}

#[test]
fn a_missing_dead_letter_and_an_unacknowledged_message_are_told_apart() {
    let mut d = ledger("a", vec![None, Some(Fault::Oversized), None]);
    d.acks[2] = 0;
    let a = audit(
        &run(vec![d]),
        &[stored("a", 0, 2), stored("a", 2, 2)],
        &[],
        &[twin("a", 2)].into(),
    );
    assert_eq!(a.missing_dead_letters.count, 1);
    assert_eq!(a.lost.count, 0, "seq 2 was never acknowledged: not owed");
    assert_eq!((a.unacknowledged, a.unacknowledged_but_stored), (1, 1));
}

#[test]
fn percentiles_are_nearest_rank() {
    let mut v: Vec<i64> = (1..=100).rev().collect();
    let p = Percentiles::of(&mut v);
    assert_eq!((p.p50, p.p95, p.p99, p.max), (50.0, 95.0, 99.0, 100.0));
    assert_eq!(Percentiles::of(&mut []).count, 0);
}
