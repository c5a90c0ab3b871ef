//! Topic administration and the read-only probes of a topic: how many records it holds and
//! how far a consumer group lags behind (what KEDA's Kafka scaler reads).

use std::time::Duration;

use iotp_contract::topology::TopicSpec;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::KafkaConfig;

/// Create `topics` if missing. Existing topics are left as they are.
pub async fn ensure_topics(
    admin: &AdminClient<DefaultClientContext>,
    topics: &[TopicSpec],
    replication: i32,
) -> Result<Vec<String>, KafkaError> {
    let retention: Vec<String> = topics
        .iter()
        .map(|t| (u64::from(t.retention_hours) * 3_600_000).to_string())
        .collect();
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .zip(&retention)
        .map(|(t, ms)| {
            NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(replication))
                .set("retention.ms", ms)
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let mut created = Vec::new();
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(KafkaError::AdminOp(code)).map_err(|e| {
                    tracing::error!(topic = name, error = %e, "cannot create topic");
                    e
                })
            }
        }
    }
    Ok(created)
}

/// Records ever written to `topic`: the sum of its partitions' high watermarks.
pub async fn count_records(kafka: &KafkaConfig, topic: &str) -> Result<i64, KafkaError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let config = kafka.base("iotp-count")?;
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create()?;
        let timeout = Duration::from_secs(10);
        let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
        let mut total = 0;
        for t in metadata.topics() {
            for p in t.partitions() {
                let (_, high) = consumer.fetch_watermarks(&topic, p.id(), timeout)?;
                total += high;
            }
        }
        Ok(total)
    })
    .await
    .unwrap_or(Err(KafkaError::Canceled))
}

/// A consumer group's lag on `topic`: records past its committed offsets, summed over the
/// partitions (what KEDA's Kafka scaler reads).
pub async fn consumer_lag(
    kafka: &KafkaConfig,
    group: &str,
    topic: &str,
) -> Result<i64, KafkaError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let mut config = kafka.base("iotp-lag")?;
    config.set("group.id", group);
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create()?;
        let timeout = Duration::from_secs(10);
        let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
        let mut partitions = TopicPartitionList::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                partitions.add_partition(&topic, p.id());
            }
        }
        let committed = consumer.committed_offsets(partitions, timeout)?;
        let mut lag = 0;
        for e in committed.elements() {
            let (low, high) = consumer.fetch_watermarks(&topic, e.partition(), timeout)?;
            let at = match e.offset() {
                Offset::Offset(o) => o,
                _ => low,
            };
            lag += (high - at).max(0);
        }
        Ok(lag)
    })
    .await
    .unwrap_or(Err(KafkaError::Canceled))
}
