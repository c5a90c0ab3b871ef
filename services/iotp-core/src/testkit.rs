//! Helpers for tests that talk to the real brokers (feature `testkit`). Addresses come from
//! `IOTP_TEST_KAFKA` and `IOTP_TEST_AMQP`, with localhost defaults; names are random so tests
//! run in parallel. [`OtlpReceiver`] stands in for an OpenTelemetry collector.
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
/// `timeout` passes; returns whether it did. A bundle's items are handed over one by one.
pub async fn read_topic_until(
    topic: &str,
    timeout: Duration,
    mut seen: impl FnMut(&OwnedMessage) -> bool,
) -> bool {
    read_kafka_records(topic, timeout, |m| {
        unbundle(m.clone()).iter().any(&mut seen)
    })
    .await
}

/// Read `topic` from the beginning as Kafka records (bundles as such) until `done(records)`
/// holds or `timeout` passes.
pub async fn read_topic_raw(
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[OwnedMessage]) -> bool,
) -> Vec<OwnedMessage> {
    let mut out = Vec::new();
    read_kafka_records(topic, timeout, |m| {
        out.push(m.clone());
        done(&out)
    })
    .await;
    out
}

async fn read_kafka_records(
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

/// The records a Kafka record carries: itself, or each item of a bundle
/// (`iotp_contract::bundle`) as a message of its own, with the bundle's topic, partition,
/// offset and timestamp.
pub fn unbundle(m: OwnedMessage) -> Vec<OwnedMessage> {
    use rdkafka::message::{Header, Message, OwnedHeaders};
    let Some(Ok(items)) = m.payload().map(iotp_contract::bundle::items) else {
        return vec![m];
    };
    items
        .into_iter()
        .map(|item| {
            let headers = (!item.headers.is_empty()).then(|| {
                item.headers
                    .iter()
                    .fold(OwnedHeaders::new(), |h, (name, value)| {
                        h.insert(Header {
                            key: name,
                            value: Some(*value),
                        })
                    })
            });
            OwnedMessage::new(
                Some(item.value.to_vec()),
                (!item.key.is_empty()).then(|| item.key.to_vec()),
                m.topic().to_string(),
                m.timestamp(),
                m.partition(),
                m.offset(),
                headers,
            )
        })
        .collect()
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

/// One span as an OpenTelemetry collector received it ([`OtlpReceiver`]); ids in hex.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// `service.name` of the resource that sent it (`iotp-parser`).
    pub service: String,
    /// Span name.
    pub name: String,
    /// Its trace.
    pub trace_id: String,
    /// Its id.
    pub span_id: String,
    /// Its parent's id; empty for a root span.
    pub parent_span_id: String,
    /// The trace and span ids it links to.
    pub links: Vec<(String, String)>,
    /// Attributes, their values as text.
    pub attributes: std::collections::BTreeMap<String, String>,
    /// Its status is an error.
    pub failed: bool,
}

impl ReceivedSpan {
    /// Whether it links to trace `trace_id`.
    pub fn links_to(&self, trace_id: &str) -> bool {
        self.links.iter().any(|(t, _)| t == trace_id)
    }

    /// An attribute's value as text.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// A stand-in for an OpenTelemetry collector: an OTLP/HTTP receiver on a free local port that
/// decodes every protobuf export sent to `/v1/traces` and keeps its spans. Services point
/// their real exporter at [`OtlpReceiver::endpoint`].
pub struct OtlpReceiver {
    /// Base URL (`http://127.0.0.1:PORT`) for `common.tracing.otlp_endpoint`.
    pub endpoint: String,
    spans: std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _stop: tokio_util::sync::DropGuard,
}

impl OtlpReceiver {
    /// Listen on 127.0.0.1 (a free port) on the current runtime until dropped.
    pub async fn start() -> Self {
        use axum::body::Bytes;
        use axum::http::{header, StatusCode};
        use opentelemetry_proto::tonic::collector::trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
        };
        use prost::Message as _;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Arc, Mutex};

        let spans: Arc<Mutex<Vec<ReceivedSpan>>> = Arc::default();
        let requests = Arc::new(AtomicUsize::new(0));
        let (kept, counted) = (spans.clone(), requests.clone());
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: Bytes| {
                let (kept, counted) = (kept.clone(), counted.clone());
                async move {
                    counted.fetch_add(1, Ordering::Relaxed);
                    let protobuf = headers
                        .get(header::CONTENT_TYPE)
                        .is_some_and(|v| v.as_bytes() == b"application/x-protobuf");
                    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                        return (StatusCode::BAD_REQUEST, Vec::new());
                    };
                    if !protobuf {
                        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, Vec::new());
                    }
                    kept.lock().unwrap().extend(received_spans(request));
                    (
                        StatusCode::OK,
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
        });
        Self {
            endpoint,
            spans,
            requests,
            _stop: stop.drop_guard(),
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// Export requests received so far.
    pub fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Wait until `done(spans)` holds (true) or `timeout` passes (false).
    pub async fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> bool {
        let until = Instant::now() + timeout;
        loop {
            if done(&self.spans()) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn received_spans(
    request: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
) -> Vec<ReceivedSpan> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::common::v1::KeyValue;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let text = |kv: &KeyValue| {
        let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
            Some(Value::StringValue(s)) => s.clone(),
            Some(Value::IntValue(i)) => i.to_string(),
            Some(Value::BoolValue(b)) => b.to_string(),
            Some(Value::DoubleValue(d)) => d.to_string(),
            Some(other) => format!("{other:?}"),
            None => String::new(),
        };
        (kv.key.clone(), value)
    };
    let mut out = Vec::new();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter())
            .find(|kv| kv.key == "service.name")
            .map(|kv| text(kv).1)
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                out.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    links: span
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                    attributes: span.attributes.iter().map(text).collect(),
                    // STATUS_CODE_ERROR
                    failed: span.status.is_some_and(|s| s.code == 2),
                });
            }
        }
    }
    out
}
