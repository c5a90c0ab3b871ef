//! The dead-letter path. A record a stage rejects, or whose output Kafka refuses for good,
//! travels to RabbitMQ as a `DeadLetter` with its original bytes and reason ([`publisher`]);
//! the DLQ handler retries transient ones by replaying them onto Kafka ([`replay`]) and parks
//! the rest.

mod publisher;
pub mod replay;

use serde::{Deserialize, Serialize};

use iotp_contract::topology::topology;
use iotp_contract::DeadLetter;

use crate::kafka::sink::Unproducible;
use crate::stage::{Input, Output, Rejection};

pub use publisher::{set_traceparent, DeadLetterPublisher, PublishError};

/// AMQP header: the stage judged the failure transient (worth retrying).
pub const AMQP_TRANSIENT: &str = "x-transient";

/// Where dead letters go. Its `Debug` (in `config.rs`) hides the URI's password.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// RabbitMQ URI. Never logged (it may hold a password).
    pub amqp_uri: String,
    /// Exchange stages publish to; the routing key is `{stage}.{reasonCode}`.
    pub exchange: String,
    /// TLS for an `amqps://` URI: custom CA, client certificate.
    pub amqp_tls: crate::amqp::AmqpTls,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        Self {
            amqp_uri: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            exchange: topology().rabbitmq.dead_letter_exchange.clone(),
            amqp_tls: crate::amqp::AmqpTls::default(),
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
            match input.item {
                None => format!(
                    "{stage}/{}/{}/{}",
                    input.topic, input.partition, input.offset
                ),
                Some(item) => format!(
                    "{stage}/{}/{}/{}#{item}",
                    input.topic, input.partition, input.offset
                ),
            },
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

/// The dead letter for a message that came from outside Kafka (an MQTT PUBLISH) and whose
/// record Kafka refused for good: no Kafka source (nothing to replay it to), the MQTT topic as
/// its key, the message payload as its original bytes. The id is derived from topic and
/// payload, so the same message delivered again (the bridge stopped before its PUBACK) updates
/// the same dead letter in the archive instead of adding one.
pub fn message_letter(
    stage: &str,
    topic: &[u8],
    payload: &[u8],
    identity: Option<(String, String)>,
    why: &Unproducible,
) -> DeadLetter {
    sourceless(
        format!("{stage}/{:016x}", content_hash(&[topic, payload])),
        stage,
        why,
        (topic.to_vec(), payload.to_vec()),
        identity.unzip(),
    )
}

/// The dead letter for an output made without an input (a stage's `tick`, e.g. a window
/// flush) that Kafka refused for good: the output itself is the original, with no Kafka
/// source; the id is derived from its topic, key and value.
pub fn output_letter(stage: &str, out: &Output, why: &Unproducible) -> DeadLetter {
    let topic = out.topic.as_deref().unwrap_or("").as_bytes();
    sourceless(
        format!(
            "{stage}/output/{:016x}",
            content_hash(&[topic, &out.key, &out.value])
        ),
        stage,
        why,
        (out.key.clone(), out.value.clone()),
        (None, None),
    )
}

/// A first-failure dead letter with no Kafka source: its key and payload are the original.
fn sourceless(
    id: String,
    stage: &str,
    why: &Unproducible,
    (key, payload): (Vec<u8>, Vec<u8>),
    (tenant, device_id): (Option<String>, Option<String>),
) -> DeadLetter {
    let now = iotp_contract::now_millis();
    DeadLetter {
        id,
        stage: stage.to_string(),
        reason_code: why.reason.to_string(),
        error: why.error.clone(),
        source_topic: None,
        source_partition: None,
        source_offset: None,
        key: Some(key),
        payload,
        tenant,
        device_id,
        attempts: 1,
        first_failure_at: now,
        last_failure_at: now,
    }
}

/// CRC-64-AVRO over the parts, each followed by its length (so part boundaries count).
fn content_hash(parts: &[&[u8]]) -> u64 {
    let mut bytes = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
    for part in parts {
        bytes.extend_from_slice(part);
        bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
    }
    iotp_contract::crc64_avro(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn why() -> Unproducible {
        Unproducible {
            reason: "output_too_large",
            error: "too large".into(),
        }
    }

    #[test]
    fn a_message_letter_has_no_kafka_source_and_a_stable_id() {
        let identity = Some(("acme".to_string(), "m-1".to_string()));
        let a = message_letter(
            "mqtt-bridge",
            b"iot/acme/m-1/telemetry",
            b"{}",
            identity.clone(),
            &why(),
        );
        let again = message_letter(
            "mqtt-bridge",
            b"iot/acme/m-1/telemetry",
            b"{}",
            identity,
            &why(),
        );
        assert_eq!(a.id, again.id, "the same message, the same dead letter");
        assert!(a.id.starts_with("mqtt-bridge/"), "{}", a.id);
        let other = message_letter(
            "mqtt-bridge",
            b"iot/acme/m-1/telemetry",
            b"{ }",
            None,
            &why(),
        );
        assert_ne!(a.id, other.id);
        let moved = message_letter(
            "mqtt-bridge",
            b"iot/acme/m-1/telemetry{",
            b"}",
            None,
            &why(),
        );
        assert_ne!(a.id, moved.id, "where topic ends and payload begins counts");
        assert_eq!(
            (a.source_topic, a.source_partition, a.source_offset),
            (None, None, None)
        );
        assert_eq!(a.key.as_deref(), Some(&b"iot/acme/m-1/telemetry"[..]));
        assert_eq!(a.payload, b"{}");
        assert_eq!(
            (a.tenant.as_deref(), a.device_id.as_deref()),
            (Some("acme"), Some("m-1"))
        );
        assert_eq!(
            (a.reason_code.as_str(), a.attempts),
            ("output_too_large", 1)
        );
        assert!(
            replay::replay_output(&other).is_none(),
            "nothing to replay it to"
        );
    }

    #[test]
    fn an_output_letter_keeps_the_output() {
        let out = Output::new(b"t/d/m".to_vec(), vec![7; 3]);
        let l = output_letter("aggregator", &out, &why());
        assert!(l.id.starts_with("aggregator/output/"), "{}", l.id);
        assert_eq!((l.key, l.payload), (Some(b"t/d/m".to_vec()), vec![7; 3]));
        assert_eq!(l.source_topic, None);
    }
}
