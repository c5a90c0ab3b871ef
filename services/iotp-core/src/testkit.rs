//! Helpers for tests that talk to the real brokers (feature `testkit`). Addresses come from
//! `IOTP_TEST_KAFKA` and `IOTP_TEST_AMQP`, with localhost defaults; names are random so tests
//! run in parallel.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

/// Kafka bootstrap servers for tests.
pub fn kafka_brokers() -> String {
    std::env::var("IOTP_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// RabbitMQ URI for tests.
pub fn amqp_uri() -> String {
    std::env::var("IOTP_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// `prefix` plus 10 random hex digits.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// Create a topic (Tansu does not auto-create).
pub async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .unwrap();
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for r in admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

/// Produce `(key, value)` pairs and wait for every delivery report.
pub async fn produce(topic: &str, records: &[(Vec<u8>, Vec<u8>)]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let futures: Vec<_> = records
        .iter()
        .map(|(k, v)| {
            producer
                .send_result(FutureRecord::to(topic).key(k).payload(v))
                .map_err(|(e, _)| e)
                .unwrap()
        })
        .collect();
    for f in futures {
        f.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

/// Read `topic` from the beginning until `done(records)` holds or `timeout` passes.
pub async fn read_topic(
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[OwnedMessage]) -> bool,
) -> Vec<OwnedMessage> {
    let mut out = Vec::new();
    read_topic_until(topic, timeout, |m| {
        out.push(m.clone());
        done(&out)
    })
    .await;
    out
}

/// Read `topic` from the beginning, handing each record to `seen` until it returns true or
/// `timeout` passes; returns whether it did.
pub async fn read_topic_until(
    topic: &str,
    timeout: Duration,
    mut seen: impl FnMut(&OwnedMessage) -> bool,
) -> bool {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", unique("test-reader-"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if let Ok(msg) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await {
            if seen(&msg.unwrap().detach()) {
                return true;
            }
        }
    }
    false
}

/// Declare a topic exchange and a queue bound to it with `#`.
pub async fn declare_exchange_and_queue(channel: &Channel, exchange: &str, queue: &str) {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// Take every message now in `queue` (acknowledged).
pub async fn drain_queue(channel: &Channel, queue: &str) -> Vec<Vec<u8>> {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    let mut out = Vec::new();
    while let Some(msg) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .unwrap()
    {
        msg.delivery.ack(BasicAckOptions::default()).await.unwrap();
        out.push(msg.delivery.data.clone());
    }
    out
}

/// SIGTERM a child process and wait: its exit code (`None` if a signal ended it).
pub fn sigterm(child: &mut std::process::Child) -> Option<i32> {
    let sent = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(sent.success(), "kill -TERM failed");
    child.wait().unwrap().code()
}

/// A private dead-letter exchange with one queue bound to it, on the test RabbitMQ.
pub struct DeadLetterSink {
    /// Keep the connection open for the test's life.
    pub connection: lapin::Connection,
    /// A channel on it.
    pub channel: Channel,
    /// Exchange name.
    pub exchange: String,
    /// Queue name.
    pub queue: String,
}

/// Declare a [`DeadLetterSink`] with random names.
pub async fn dead_letter_sink() -> DeadLetterSink {
    let connection = crate::amqp::connect(&amqp_uri()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let (exchange, queue) = (unique("test.dlx."), unique("test.dlq."));
    declare_exchange_and_queue(&channel, &exchange, &queue).await;
    DeadLetterSink {
        connection,
        channel,
        exchange,
        queue,
    }
}

/// A service context for a replica run inside a test: a quick backoff that gives up after
/// `give_up_after`, and its own health.
pub fn test_context(
    replica: &str,
    shutdown: &tokio_util::sync::CancellationToken,
    give_up_after: Duration,
) -> crate::service::Context {
    crate::service::Context {
        service: "test",
        replica: replica.to_string(),
        shutdown: shutdown.clone(),
        health: crate::admin::Health::default(),
        backoff: crate::retry::Backoff {
            min: Duration::from_millis(50),
            max: Duration::from_millis(200),
            give_up_after,
        },
    }
}
