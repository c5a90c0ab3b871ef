//! Putting a dead letter's original record back on its Kafka topic, through the one Kafka
//! sink, with the replay headers ([`iotp_core::dead_letter::replay`]) that let the stage's
//! next failure update the same dead letter.

use iotp_contract::DeadLetter;
use iotp_core::dead_letter::replay::replay_output;
use iotp_core::kafka::KafkaSink;
use rdkafka::error::KafkaError;

/// Why a replay did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The letter does not say where it came from (e.g. wrapped undecodable bytes).
    #[error("dead letter {0} has no source topic to replay to")]
    NoSource(String),
    /// Kafka did not take the record.
    #[error("replay to kafka failed: {0}")]
    Kafka(#[from] KafkaError),
}

/// Produce the original record, with its `traceparent` if it has one, and wait for Kafka's
/// confirmation (one attempt).
pub async fn replay(
    sink: &KafkaSink,
    letter: &DeadLetter,
    traceparent: Option<&[u8]>,
) -> Result<(), ReplayError> {
    let mut out = replay_output(letter).ok_or_else(|| ReplayError::NoSource(letter.id.clone()))?;
    if let Some(traceparent) = traceparent.filter(|t| iotp_core::trace::parse(t).is_some()) {
        iotp_core::trace::carry(traceparent, &mut out);
    }
    sink.send(&out).await?;
    Ok(())
}
