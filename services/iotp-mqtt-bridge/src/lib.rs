//! The MQTT bridge: each PUBLISH on `iot/{tenant}/{deviceId}/{kind}` becomes a raw envelope on
//! the raw Kafka topic, partitioned as [`RawPartitioning`] says (by default a partition per
//! batching window, not per device). The bridge does not parse payloads; a topic
//! that does not fit the layout is forwarded with empty identity for the parser to reject.
//! A PUBLISH whose envelope Kafka refuses for good (over `message.max.bytes`) becomes a dead
//! letter of stage `mqtt-bridge` on RabbitMQ (`dead_letter`) and is then acknowledged.
//! With `mqtt.identity = "acl"` the envelope's `clientIdentity` is `tenant/deviceId` from the
//! topic, which the broker's ACL let only that device publish on
//! (`iotp_core::mqtt::Identity::Acl`); the parser refuses a record that disagrees with it.

use std::collections::HashMap;

use iotp_contract::topology::topic_name;
use iotp_contract::{Codec, RawEnvelope};
use iotp_core::config::{Common, ServiceConfig};
use iotp_core::dead_letter::DeadLetterConfig;
use iotp_core::ingress::{self, IngressStage};
use iotp_core::kafka::KafkaConfig;
use iotp_core::mqtt::{Identity, MqttConfig};
use iotp_core::service::Context;
use iotp_core::stage::{Output, StageError};
use rumqttc::v5::mqttbytes::v5::Publish;
use serde::{Deserialize, Serialize};

/// Bridge configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeConfig {
    /// Settings every service has.
    pub common: Common,
    /// MQTT broker and session.
    pub mqtt: MqttConfig,
    /// Kafka cluster.
    pub kafka: KafkaConfig,
    /// Topic the raw envelopes go to.
    pub raw_topic: String,
    /// How the raw envelopes are spread over the raw topic's partitions.
    pub raw_partitioning: RawPartitioning,
    /// Where a PUBLISH goes whose envelope Kafka refuses for good (too large): RabbitMQ's
    /// dead-letter exchange, as for the stages.
    pub dead_letter: DeadLetterConfig,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            common: Common::default(),
            mqtt: MqttConfig::default(),
            kafka: KafkaConfig::default(),
            raw_topic: topic_name("raw-envelope"),
            raw_partitioning: RawPartitioning::default(),
            dead_letter: DeadLetterConfig::default(),
        }
    }
}

impl ServiceConfig for BridgeConfig {
    fn common(&self) -> &Common {
        &self.common
    }

    fn validate(&self) -> Vec<String> {
        let mut out = self.mqtt.problems();
        out.extend(self.kafka.problems());
        if self.raw_topic.is_empty() {
            out.push("raw_topic must not be empty".into());
        }
        out
    }
}

/// How the bridge spreads raw envelopes over the raw topic's partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawPartitioning {
    /// No key: librdkafka's sticky partitioner puts the records of each window
    /// (`sticky.partitioning.linger.ms`, twice `kafka.linger` unless set) on one partition.
    /// librdkafka sends a produce request per partition, so a window costs one request
    /// instead of one per partition the devices hash to: at 5,000 msgs/s the bridge used 30%
    /// less CPU and the broker (Tansu) 36% less (docs/performance.md). A device's messages
    /// may land on different partitions and reach the parser out of order; the parser keys
    /// its outputs by device again, and nothing downstream depends on arrival order (the
    /// store dedups by (deviceId, seqNo), a twin keeps the highest seqNo, roll-ups fold by
    /// event time).
    #[default]
    Window,
    /// Keyed `tenant/deviceId` (the MQTT topic when it names no device): a device's messages
    /// stay on one partition, in the order the bridge received them, for other consumers of
    /// the raw topic that need it.
    Device,
}

/// Run the bridge.
pub async fn run(ctx: Context, config: BridgeConfig) -> anyhow::Result<()> {
    let replica = ctx.replica.clone();
    let identity = config.mqtt.identity;
    let partitioning = config.raw_partitioning;
    ingress::run(
        ctx,
        config.mqtt,
        config.kafka,
        config.raw_topic,
        config.dead_letter,
        move || Bridge::new(replica.clone(), identity).map(|b| b.partitioned(partitioning)),
    )
    .await
}

/// Device identity and message kind, from the topic.
#[derive(Debug, PartialEq, Eq)]
pub struct TopicIdentity<'a> {
    /// Tenant.
    pub tenant: &'a str,
    /// Device id.
    pub device_id: &'a str,
    /// telemetry, heartbeat, …
    pub kind: &'a str,
}

/// Split `iot/{tenant}/{deviceId}/{kind}`; `None` if the topic has another shape.
pub fn parse_topic(topic: &str) -> Option<TopicIdentity<'_>> {
    // Byte by byte: `str::split` cost 700 instructions a message here (callgrind). '/' is
    // ASCII, so every cut falls on a character boundary.
    let rest = topic.strip_prefix("iot/")?;
    let bytes = rest.as_bytes();
    let first = bytes.iter().position(|&b| b == b'/')?;
    let second = first + 1 + bytes[first + 1..].iter().position(|&b| b == b'/')?;
    let (tenant, device_id, kind) = (
        &rest[..first],
        &rest[first + 1..second],
        &rest[second + 1..],
    );
    if tenant.is_empty() || device_id.is_empty() || kind.is_empty() || kind.contains('/') {
        return None;
    }
    Some(TopicIdentity {
        tenant,
        device_id,
        kind,
    })
}

/// The bridge stage: PUBLISH → raw envelope.
pub struct Bridge {
    bridge_id: String,
    identity: Identity,
    partitioning: RawPartitioning,
    codec: Codec<RawEnvelope>,
}

impl Bridge {
    /// A stage that signs envelopes with `bridge_id` and fills `clientIdentity` as `identity`
    /// says.
    pub fn new(bridge_id: String, identity: Identity) -> anyhow::Result<Self> {
        Ok(Self {
            bridge_id,
            identity,
            partitioning: RawPartitioning::default(),
            codec: Codec::latest()?,
        })
    }

    /// The same stage, partitioning its records as `partitioning` says.
    pub fn partitioned(self, partitioning: RawPartitioning) -> Self {
        Self {
            partitioning,
            ..self
        }
    }

    /// The envelope for one PUBLISH.
    pub fn envelope(&self, publish: &Publish, received_at: i64) -> RawEnvelope {
        // MQTT requires UTF-8 topics; a broker that let another through still gets a record.
        let topic = match std::str::from_utf8(&publish.topic) {
            Ok(topic) => topic.to_owned(),
            Err(_) => String::from_utf8_lossy(&publish.topic).into_owned(),
        };
        let (tenant, device_id, kind) = match parse_topic(&topic) {
            Some(id) => (
                id.tenant.to_owned(),
                id.device_id.to_owned(),
                id.kind.to_owned(),
            ),
            None => (String::new(), String::new(), String::new()),
        };
        let properties = publish.properties.as_ref();
        // Under `acl` the broker let only this device publish on its topic; an odd topic
        // (no device) vouches for nobody.
        let client_identity = match self.identity {
            Identity::Acl if !device_id.is_empty() => Some(format!("{tenant}/{device_id}")),
            _ => None,
        };
        let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
        RawEnvelope {
            envelope_id: uuid::Uuid::now_v7()
                .hyphenated()
                .encode_lower(&mut id)
                .to_owned(),
            tenant,
            device_id,
            kind,
            content_type: properties.and_then(|p| p.content_type.clone()),
            payload: publish.payload.to_vec(),
            received_at,
            client_identity,
            bridge_id: self.bridge_id.clone(),
            redelivered: publish.dup,
            user_properties: properties
                .map(|p| p.user_properties.iter().cloned().collect::<HashMap<_, _>>())
                .unwrap_or_default(),
            mqtt_topic: topic,
        }
    }
}

impl IngressStage for Bridge {
    fn map(&mut self, publish: &Publish, received_at: i64) -> Result<Output, StageError> {
        let envelope = self.envelope(publish, received_at);
        let key = match self.partitioning {
            RawPartitioning::Window => Vec::new(),
            RawPartitioning::Device if envelope.device_id.is_empty() => {
                envelope.mqtt_topic.clone().into_bytes()
            }
            RawPartitioning::Device => {
                iotp_contract::device_key(&envelope.tenant, &envelope.device_id)
            }
        };
        // The `traceparent` header (the device's, or a new trace) is the runtime's
        // (`iotp_core::trace::for_publish`); the envelope keeps every user property as sent.
        Ok(Output::new(key, self.codec.encode(&envelope)?))
    }

    fn identity(publish: &Publish) -> Option<(String, String)> {
        let topic = std::str::from_utf8(&publish.topic).ok()?;
        parse_topic(topic).map(|id| (id.tenant.to_owned(), id.device_id.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS;

    #[test]
    fn topic_layout() {
        assert_eq!(
            parse_topic("iot/acme/meter-1/telemetry"),
            Some(TopicIdentity {
                tenant: "acme",
                device_id: "meter-1",
                kind: "telemetry"
            })
        );
        assert_eq!(parse_topic("iot/acme/meter-1"), None);
        assert_eq!(parse_topic("iot/acme/meter-1/telemetry/extra"), None);
        assert_eq!(parse_topic("iot//meter-1/telemetry"), None);
        assert_eq!(parse_topic("other/acme/meter-1/telemetry"), None);
        assert_eq!(parse_topic("iot/acme//telemetry"), None);
        assert_eq!(parse_topic("iot/acme/meter-1/"), None);
        assert_eq!(parse_topic("iot/acme/meter-1//"), None);
        assert_eq!(parse_topic("iot/"), None);
        assert_eq!(parse_topic("iot"), None);
        assert_eq!(
            parse_topic("iot/ünï/dév-1/telemetry"),
            Some(TopicIdentity {
                tenant: "ünï",
                device_id: "dév-1",
                kind: "telemetry"
            })
        );
    }

    #[test]
    fn envelope_keeps_payload_and_properties_and_is_keyed_by_device_when_asked() {
        let mut bridge = Bridge::new("bridge-0".into(), Identity::None)
            .expect("stage")
            .partitioned(RawPartitioning::Device);
        let mut publish = Publish::new(
            "iot/acme/m-1/heartbeat",
            QoS::AtLeastOnce,
            vec![1u8, 2, 3],
            None,
        );
        publish.dup = true;
        publish.properties = Some(PublishProperties {
            content_type: Some("application/cbor".into()),
            user_properties: vec![("traceparent".into(), "00-aa-bb-01".into())],
            ..Default::default()
        });
        let record = bridge.map(&publish, 42).expect("map");
        assert_eq!(record.key, b"acme/m-1");
        assert!(record.headers.is_empty(), "trace context is the runtime's");
        let env = Codec::<RawEnvelope>::latest()
            .expect("codec")
            .decode(&record.value)
            .expect("decode");
        assert_eq!(env.payload, vec![1, 2, 3]);
        assert_eq!(
            (
                env.tenant.as_str(),
                env.device_id.as_str(),
                env.kind.as_str()
            ),
            ("acme", "m-1", "heartbeat")
        );
        assert_eq!(env.content_type.as_deref(), Some("application/cbor"));
        assert_eq!(
            env.user_properties.get("traceparent").map(String::as_str),
            Some("00-aa-bb-01")
        );
        assert!(env.redelivered);
        assert_eq!(env.received_at, 42);
        assert_eq!(env.bridge_id, "bridge-0");
        assert_eq!(
            env.client_identity, None,
            "identity = none vouches for nobody"
        );
    }

    #[test]
    fn acl_identity_is_the_topics_tenant_and_device() {
        let mut bridge = Bridge::new("b".into(), Identity::Acl).expect("stage");
        let codec = Codec::<RawEnvelope>::latest().expect("codec");
        let mut identity = |topic: &str| {
            let publish = Publish::new(topic, QoS::AtLeastOnce, vec![1u8], None);
            let record = bridge.map(&publish, 1).expect("map");
            codec.decode(&record.value).expect("decode").client_identity
        };
        assert_eq!(
            identity("iot/acme/m-1/telemetry").as_deref(),
            Some("acme/m-1")
        );
        assert_eq!(
            identity("iot/beta/m-1/heartbeat").as_deref(),
            Some("beta/m-1")
        );
        assert_eq!(identity("iot/acme"), None, "an odd topic names no device");
    }

    #[test]
    fn by_default_records_have_no_key_so_a_window_shares_one_partition() {
        let c: BridgeConfig = toml::from_str("").expect("defaults");
        assert_eq!(c.raw_partitioning, RawPartitioning::Window);
        let c: BridgeConfig = toml::from_str("raw_partitioning = \"device\"").expect("device");
        assert_eq!(c.raw_partitioning, RawPartitioning::Device);
        assert!(toml::from_str::<BridgeConfig>("raw_partitioning = \"random\"").is_err());
        let mut bridge = Bridge::new("b".into(), Identity::None).expect("stage");
        for topic in ["iot/acme/m-1/telemetry", "iot/acme"] {
            let publish = Publish::new(topic, QoS::AtLeastOnce, vec![1u8], None);
            let record = bridge.map(&publish, 1).expect("map");
            assert!(record.key.is_empty(), "{topic}: {:?}", record.key);
        }
    }

    #[test]
    fn identity_setting_reads_acl_and_refuses_others() {
        let c: BridgeConfig = toml::from_str("[mqtt]\nidentity = \"acl\"\n").expect("acl");
        assert_eq!(c.mqtt.identity, Identity::Acl);
        assert_eq!(BridgeConfig::default().mqtt.identity, Identity::None);
        assert!(toml::from_str::<BridgeConfig>("[mqtt]\nidentity = \"cert\"\n").is_err());
    }

    #[test]
    fn identity_for_dead_letters_comes_from_the_topic() {
        let publish = Publish::new("iot/acme/m-1/telemetry", QoS::AtLeastOnce, vec![1u8], None);
        assert_eq!(
            Bridge::identity(&publish),
            Some(("acme".to_string(), "m-1".to_string()))
        );
        let odd = Publish::new("iot/acme", QoS::AtLeastOnce, vec![1u8], None);
        assert_eq!(Bridge::identity(&odd), None);
    }

    #[test]
    fn odd_topic_is_forwarded_not_dropped() {
        let mut bridge = Bridge::new("b".into(), Identity::None)
            .expect("stage")
            .partitioned(RawPartitioning::Device);
        let publish = Publish::new("iot/acme", QoS::AtLeastOnce, vec![9u8], None);
        let record = bridge.map(&publish, 1).expect("map");
        assert_eq!(record.key, b"iot/acme");
        let env = Codec::<RawEnvelope>::latest()
            .expect("codec")
            .decode(&record.value)
            .expect("decode");
        assert_eq!(env.device_id, "");
        assert_eq!(env.payload, vec![9]);
    }
}
