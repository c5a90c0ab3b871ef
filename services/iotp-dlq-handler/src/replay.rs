//! Putting a dead letter's original record back on its Kafka topic, with the headers that let
//! the stage's next failure update the same dead letter. The record bytes are untouched, so
//! the idempotency key inside (tenant, deviceId, seqNo) is kept and a replay never duplicates
//! downstream.

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use iotp_core::contract::DeadLetter;
use iotp_core::dead_letter::{HEADER_ATTEMPTS, HEADER_DEAD_LETTER_ID, HEADER_FIRST_FAILURE_AT};

/// Produce the original record and wait for Kafka's confirmation.
pub async fn replay(producer: &FutureProducer, letter: &DeadLetter) -> anyhow::Result<()> {
    let Some(topic) = letter.source_topic.as_deref() else {
        anyhow::bail!("dead letter {} has no source topic to replay to", letter.id);
    };
    let attempts = letter.attempts.to_string();
    let first = letter.first_failure_at.to_string();
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: HEADER_DEAD_LETTER_ID,
            value: Some(letter.id.as_bytes()),
        })
        .insert(Header {
            key: HEADER_ATTEMPTS,
            value: Some(attempts.as_bytes()),
        })
        .insert(Header {
            key: HEADER_FIRST_FAILURE_AT,
            value: Some(first.as_bytes()),
        });
    let mut record = FutureRecord::to(topic)
        .payload(letter.payload.as_slice())
        .headers(headers);
    if let Some(key) = &letter.key {
        record = record.key(key.as_slice());
    }
    producer
        .send(record, Timeout::Never)
        .await
        .map_err(|(e, _)| anyhow::anyhow!("replay of {} to {topic} failed: {e}", letter.id))?;
    Ok(())
}
