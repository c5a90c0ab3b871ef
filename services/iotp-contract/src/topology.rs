//! The pipeline's topics, exchanges and queues, from `schemas/topology.toml` (embedded).

use std::sync::LazyLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The embedded topology file.
pub const TOPOLOGY_TOML: &str = include_str!("../../../schemas/topology.toml");

/// The whole topology.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// MQTT ingress.
    pub mqtt: MqttTopology,
    /// Kafka topics.
    pub kafka: KafkaTopology,
    /// RabbitMQ dead-letter topology.
    pub rabbitmq: RabbitTopology,
}

/// MQTT ingress topics.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttTopology {
    /// Documentation of the device topic layout.
    pub topic_pattern: String,
    /// Shared subscription group of the bridges.
    pub shared_group: String,
    /// Topic filter of the bridges.
    pub filter: String,
}

impl MqttTopology {
    /// `$share/{group}/{filter}`.
    pub fn shared_subscription(&self) -> String {
        format!("$share/{}/{}", self.shared_group, self.filter)
    }
}

/// Kafka topics.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaTopology {
    /// Topics.
    pub topics: Vec<TopicSpec>,
    /// Consumer groups.
    pub consumers: Vec<ConsumerSpec>,
}

/// A consuming service.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSpec {
    /// Service name.
    pub service: String,
    /// Consumer group.
    pub group: String,
    /// Topics consumed.
    pub topics: Vec<String>,
    /// Topic written ("" if it writes to the store only).
    pub output: String,
}

/// One Kafka topic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    /// Name.
    pub name: String,
    /// Partition count: the most consumer replicas that can share it.
    pub partitions: i32,
    /// Schema family of its values.
    pub schema: String,
    /// Retention.
    pub retention_hours: u32,
    /// What it carries.
    pub about: String,
}

/// RabbitMQ dead-letter topology. Also a config section of the DLQ handler (defaults: this
/// file's), so a deployment or a test can rename its queues. No serde `default` here: it
/// would build the default from this file while this file is being read.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitTopology {
    /// Exchange stages publish dead letters to.
    pub dead_letter_exchange: String,
    /// Queue the DLQ handler consumes.
    pub incoming_queue: String,
    /// Exchange routing to retry delay queues.
    pub retry_exchange: String,
    /// Delay of each retry attempt.
    pub retry_delays: Vec<humantime_serde::Serde<Duration>>,
    /// Queue for messages that failed for good.
    pub parking_queue: String,
}

impl Default for RabbitTopology {
    fn default() -> Self {
        topology().rabbitmq.clone()
    }
}

impl RabbitTopology {
    /// Delay of each retry attempt, first attempt first.
    pub fn retry_delays(&self) -> Vec<Duration> {
        self.retry_delays.iter().map(|d| **d).collect()
    }

    /// Name of the delay queue of retry attempt `n` (1-based).
    pub fn retry_queue(&self, attempt: usize) -> String {
        format!("{}.{attempt}", self.retry_exchange)
    }
}

impl Topology {
    /// The consumer spec of a service.
    pub fn consumer(&self, service: &str) -> Option<&ConsumerSpec> {
        self.kafka.consumers.iter().find(|c| c.service == service)
    }

    /// A Kafka topic by its schema family.
    pub fn topic_for(&self, schema: &str) -> Option<&TopicSpec> {
        self.kafka.topics.iter().find(|t| t.schema == schema)
    }
}

static TOPOLOGY: LazyLock<Topology> = LazyLock::new(|| match toml::from_str(TOPOLOGY_TOML) {
    Ok(t) => t,
    // Compiled in and parsed by this crate's tests: a bad file is a build defect.
    #[allow(clippy::panic)]
    Err(e) => panic!("schemas/topology.toml is invalid: {e}"),
});

/// The pipeline topology.
pub fn topology() -> &'static Topology {
    &TOPOLOGY
}

/// Default name of the topic carrying `schema`.
pub fn topic_name(schema: &str) -> String {
    topology()
        .topic_for(schema)
        .map(|t| t.name.clone())
        .unwrap_or_else(|| format!("iotp.{schema}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_parses_and_every_topic_schema_exists() {
        let t = topology();
        assert!(!t.kafka.topics.is_empty());
        for topic in &t.kafka.topics {
            assert!(topic.partitions > 0);
            assert!(
                crate::schema_registry().latest(&topic.schema).is_some(),
                "topic {} names unknown schema {}",
                topic.name,
                topic.schema
            );
        }
        for c in &t.kafka.consumers {
            for topic in c
                .topics
                .iter()
                .chain(Some(&c.output).filter(|o| !o.is_empty()))
            {
                assert!(
                    t.kafka.topics.iter().any(|s| &s.name == topic),
                    "{} uses unknown topic {topic}",
                    c.service
                );
            }
        }
        assert_eq!(t.mqtt.shared_subscription(), "$share/iotp-bridge/iot/+/+/+");
        assert_eq!(t.rabbitmq.retry_queue(2), "iotp.dlq.retry.2");
    }
}
