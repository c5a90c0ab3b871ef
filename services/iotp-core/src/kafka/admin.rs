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
    let config = kafka.base("iotp-count")?;
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let probe = probe(config, "iotp-count")?;
        let ends = high_watermarks(&probe, &topic, Duration::from_secs(10))?;
        Ok(ends.values().map(|(_, end)| end).sum())
    })
    .await
    .unwrap_or(Err(KafkaError::Canceled))
}

/// Records carried by `topic`, a bundle's items one by one (`iotp_contract::bundle`): the
/// topic read from its beginning to its end. What the producers' counters count; a run's
/// audit compares the two.
pub async fn count_carried(kafka: &KafkaConfig, topic: &str) -> Result<i64, KafkaError> {
    use rdkafka::{Message, Offset, TopicPartitionList};
    let config = kafka.base("iotp-count")?;
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let probe = probe(config, "iotp-count")?;
        let ends = high_watermarks(&probe, &topic, Duration::from_secs(10))?;
        let mut from = TopicPartitionList::new();
        for (p, (low, end)) in &ends {
            if end > low {
                from.add_partition_offset(&topic, *p, Offset::Offset(*low))?;
            }
        }
        let mut carried = 0i64;
        read_to_end(&probe, &from, Duration::from_secs(120), |m| {
            carried += m
                .payload()
                .and_then(iotp_contract::bundle::count)
                .unwrap_or(1) as i64;
        })?;
        Ok(carried)
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
    use rdkafka::consumer::Consumer;
    use rdkafka::{Offset, TopicPartitionList};
    let config = kafka.base("iotp-lag")?;
    let (group, topic) = (group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_secs(10);
        let probe = probe(config, &group)?;
        let ends = high_watermarks(&probe, &topic, timeout)?;
        let mut partitions = TopicPartitionList::new();
        for p in ends.keys() {
            partitions.add_partition(&topic, *p);
        }
        let committed = probe.committed_offsets(partitions, timeout)?;
        let mut lag = 0;
        for e in committed.elements() {
            let (low, end) = ends.get(&e.partition()).copied().unwrap_or((0, 0));
            let at = match e.offset() {
                Offset::Offset(o) => o,
                _ => low,
            };
            lag += (end - at).max(0);
        }
        Ok(lag)
    })
    .await
    .unwrap_or(Err(KafkaError::Canceled))
}

/// A consumer of `group` that only reads: assigned, never subscribed and never committing, so
/// no group is joined or changed; it reports each partition's end (`enable.partition.eof`).
fn probe(
    mut config: rdkafka::ClientConfig,
    group: &str,
) -> Result<rdkafka::consumer::BaseConsumer, KafkaError> {
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        // Tansu holds every fetch for its whole wait (docs/performance.md).
        .set("fetch.wait.max.ms", "10");
    config.create()
}

/// The low watermark and the end (high watermark) of each partition of `topic`, the end read
/// to the end with `probe`. The broker's ListOffsets answer alone is not enough: Tansu 0.6.0's
/// memory engine names its newest record *batch* and answers that batch's base offset + 1
/// (tansu-storage `dynostore.rs`, `list_offsets`), so a partition whose last batch holds n
/// records read n − 1 short — and a group still working through that batch read lag 0.
/// Reading from that answer − 1 to the partition's end gives the true end on any broker (on
/// Apache Kafka: one record).
fn high_watermarks(
    probe: &rdkafka::consumer::BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<std::collections::BTreeMap<i32, (i64, i64)>, KafkaError> {
    use rdkafka::consumer::Consumer;
    use rdkafka::{Message, Offset, TopicPartitionList};
    let metadata = probe.fetch_metadata(Some(topic), timeout)?;
    let mut ends = std::collections::BTreeMap::new();
    let mut from = TopicPartitionList::new();
    for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (low, listed) = probe.fetch_watermarks(topic, p.id(), timeout)?;
        ends.insert(p.id(), (low, listed));
        if listed > 0 {
            from.add_partition_offset(topic, p.id(), Offset::Offset(listed - 1))?;
        }
    }
    read_to_end(probe, &from, timeout, |m| {
        let (_, end) = ends.entry(m.partition()).or_insert((0, 0));
        *end = (*end).max(m.offset() + 1);
    })?;
    Ok(ends)
}

/// Read each partition of `from` from its offset to its end, handing every record to `each`.
fn read_to_end(
    probe: &rdkafka::consumer::BaseConsumer,
    from: &rdkafka::TopicPartitionList,
    timeout: Duration,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> Result<(), KafkaError> {
    use rdkafka::consumer::Consumer;
    if from.count() == 0 {
        return Ok(());
    }
    probe.assign(from)?;
    let mut open: std::collections::BTreeSet<i32> =
        from.elements().iter().map(|e| e.partition()).collect();
    let deadline = std::time::Instant::now() + timeout;
    while !open.is_empty() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(KafkaError::OffsetFetch(RDKafkaErrorCode::OperationTimedOut));
        }
        match probe.poll(left.min(Duration::from_millis(200))) {
            Some(Ok(m)) => each(&m),
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    Ok(())
}
