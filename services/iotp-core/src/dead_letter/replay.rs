//! The replay protocol, in one place. The DLQ handler puts a dead letter's original record
//! back on its Kafka topic with three headers; the stage runtime reads them back, so a new
//! failure of that record updates the same dead letter (its attempts grow) instead of starting
//! a new one. The record bytes are untouched: the idempotency key inside (tenant, deviceId,
//! seqNo) is kept, so a replay never duplicates downstream.

use iotp_contract::DeadLetter;

use crate::stage::{Output, Replayed};

/// Kafka header: the dead letter the record was replayed from.
pub const HEADER_DEAD_LETTER_ID: &str = "iotp-dead-letter-id";
/// Kafka header: attempts made so far.
pub const HEADER_ATTEMPTS: &str = "iotp-attempts";
/// Kafka header: first failure time, epoch ms.
pub const HEADER_FIRST_FAILURE_AT: &str = "iotp-first-failure-at";

/// The record that replays `letter` onto its source topic; `None` if the letter does not
/// say where it came from.
pub fn replay_output(letter: &DeadLetter) -> Option<Output> {
    let topic = letter.source_topic.clone()?;
    Some(Output {
        topic: Some(topic),
        key: letter.key.clone().unwrap_or_default(),
        value: letter.payload.clone(),
        headers: vec![
            (HEADER_DEAD_LETTER_ID, letter.id.clone().into_bytes()),
            (HEADER_ATTEMPTS, letter.attempts.to_string().into_bytes()),
            (
                HEADER_FIRST_FAILURE_AT,
                letter.first_failure_at.to_string().into_bytes(),
            ),
        ],
    })
}

/// Read the replay headers of a consumed record (`get` looks a header up by name).
pub fn replayed<'a>(get: impl Fn(&str) -> Option<&'a [u8]>) -> Option<Replayed<'a>> {
    let text = |name: &str| get(name).and_then(|v| std::str::from_utf8(v).ok());
    Some(Replayed {
        dead_letter_id: text(HEADER_DEAD_LETTER_ID)?,
        attempts: text(HEADER_ATTEMPTS)
            .and_then(|v| v.parse().ok())
            .unwrap_or(1),
        first_failure_at: text(HEADER_FIRST_FAILURE_AT)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_written_for_a_replay_read_back_as_its_origin() {
        let letter = DeadLetter {
            id: "enricher/iotp.validated/3/17".into(),
            stage: "enricher".into(),
            reason_code: "store_unavailable".into(),
            error: "down".into(),
            source_topic: Some("iotp.validated".into()),
            source_partition: Some(3),
            source_offset: Some(17),
            key: Some(b"t/d".to_vec()),
            payload: vec![1, 2, 3],
            tenant: None,
            device_id: None,
            attempts: 2,
            first_failure_at: 1000,
            last_failure_at: 2000,
        };
        let out = replay_output(&letter).expect("has a source");
        assert_eq!(out.topic.as_deref(), Some("iotp.validated"));
        assert_eq!(
            (out.key.as_slice(), out.value.as_slice()),
            (&b"t/d"[..], &[1u8, 2, 3][..])
        );
        let get = |name: &str| {
            out.headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_slice())
        };
        let origin = replayed(get).expect("replay headers");
        assert_eq!(
            origin,
            Replayed {
                dead_letter_id: "enricher/iotp.validated/3/17",
                attempts: 2,
                first_failure_at: 1000
            }
        );
        assert_eq!(replayed(|_| None), None, "a plain record has no origin");
        let nowhere = DeadLetter {
            source_topic: None,
            ..letter
        };
        assert!(replay_output(&nowhere).is_none());
    }
}
