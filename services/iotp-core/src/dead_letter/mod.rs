//! The dead-letter path. A record a stage rejects travels to RabbitMQ as a `DeadLetter` with
//! its original bytes and reason ([`publisher`]); the DLQ handler retries transient ones by
//! replaying them onto Kafka ([`replay`]) and parks the rest.

mod publisher;
pub mod replay;

use serde::{Deserialize, Serialize};

use iotp_contract::topology::topology;
use iotp_contract::DeadLetter;

use crate::stage::{Input, Rejection};

pub use publisher::{DeadLetterPublisher, PublishError};

/// AMQP header: the stage judged the failure transient (worth retrying).
pub const AMQP_TRANSIENT: &str = "x-transient";

/// Where dead letters go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// RabbitMQ URI. Never logged (it may hold a password).
    pub amqp_uri: String,
    /// Exchange stages publish to; the routing key is `{stage}.{reasonCode}`.
    pub exchange: String,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        Self {
            amqp_uri: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            exchange: topology().rabbitmq.dead_letter_exchange.clone(),
        }
    }
}

/// The dead letter for `input`, rejected by `stage`. A replayed record's new failure keeps
/// the id, first failure time and attempt count of the letter it was replayed from.
pub fn letter(stage: &str, input: &Input<'_>, r: &Rejection) -> DeadLetter {
    let now = iotp_contract::now_millis();
    let (id, attempts, first_failure_at) = match input.replayed {
        Some(origin) => (
            origin.dead_letter_id.to_string(),
            origin.attempts + 1,
            origin.first_failure_at,
        ),
        None => (
            format!(
                "{stage}/{}/{}/{}",
                input.topic, input.partition, input.offset
            ),
            1,
            now,
        ),
    };
    DeadLetter {
        id,
        stage: stage.to_string(),
        reason_code: r.reason.to_string(),
        error: r.error.clone(),
        source_topic: Some(input.topic.to_string()),
        source_partition: Some(input.partition),
        source_offset: Some(input.offset),
        key: input.key.map(<[u8]>::to_vec),
        payload: input.payload.to_vec(),
        tenant: r.tenant.clone(),
        device_id: r.device_id.clone(),
        attempts,
        first_failure_at,
        last_failure_at: now,
    }
}
