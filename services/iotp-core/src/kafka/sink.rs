//! The one producer path. Every record a service produces — a stage's outputs, the bridge's
//! raw envelopes, the DLQ handler's replays — goes through [`KafkaSink`]: it owns the
//! idempotent producer, waits while librdkafka's queue is full, collects the delivery reports,
//! and produces refused records again with the runtime's backoff until Kafka takes them —
//! unless Kafka refused a record for good ([`refusal`]): that record is handed back to the
//! caller as [`Unproducible`], to be dead-lettered, and never produced again.
//! Callers acknowledge upstream only after it returned `Ok`.

use std::time::Duration;

use prometheus::IntCounter;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio_util::sync::CancellationToken;

use super::KafkaConfig;
use crate::metrics::metrics;
use crate::retry::{Backoff, Halt};
use crate::stage::Output;

/// A Kafka producer with confirmations and retries.
#[derive(Clone)]
pub struct KafkaSink {
    producer: FutureProducer,
    topic: String,
    backoff: Backoff,
    /// The produced counter of the default topic, looked up once (not per record); none for
    /// a sink whose records all name their topic (the DLQ replay).
    produced: Option<IntCounter>,
}

/// A record handed to librdkafka; its delivery report is still to come.
pub struct Pending(Result<DeliveryFuture, KafkaError>);

/// Dead-letter reason: the record is larger than Kafka takes (the producer's
/// `message.max.bytes`, or the topic's `max.message.bytes`).
pub const OUTPUT_TOO_LARGE: &str = "output_too_large";
/// Dead-letter reason: the broker's validation refused the record itself (`INVALID_RECORD`).
pub const OUTPUT_REJECTED: &str = "output_rejected";

/// Every reason code [`refusal`] gives: never worth retrying, whatever a letter's flags say.
pub const UNPRODUCIBLE_REASONS: [&str; 2] = [OUTPUT_TOO_LARGE, OUTPUT_REJECTED];

/// What a produce error means for the record it was reported for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Produce it again with the backoff (and stop the service after `give_up_after`): Kafka
    /// may take it later, or the fault is the configuration's and not this record's.
    Retry,
    /// This record can never be produced: dead-letter it with this reason code.
    Permanent(&'static str),
}

/// Classify a produce error, in one place for every producer.
///
/// Permanent, because the record itself is the cause and producing it again gets the same answer:
/// - `MessageSizeTooLarge`: from `send_result` when the record is over the producer's
///   `message.max.bytes` (librdkafka checks before sending; `KafkaConfig` leaves it at
///   librdkafka's 1,000,000 bytes), or from the broker when it is over the topic's
///   `max.message.bytes`. The broker judges a whole batch, but librdkafka never builds one
///   over `message.max.bytes`, so with the topic's limit at or above the producer's (Kafka's
///   defaults: 1,048,588 ≥ 1,000,000) only a record that is itself too large meets it;
/// - `MessageBatchTooLarge` (Kafka's `RECORD_LIST_TOO_LARGE`): the same, against the segment size;
/// - `InvalidRecord` (KIP-467): the broker's validation refused this record (a keyless record
///   on a compacted topic, a broker-side policy). The other records of its batch come back as
///   `InvalidDifferentRecord`, which is retried: they were not at fault.
///
/// Everything else is retried, in particular: `InvalidMessage` (Kafka's `CORRUPT_MESSAGE`, a
/// CRC failure in transit; librdkafka itself retries it), `InvalidMessageSize` (Kafka's
/// `INVALID_FETCH_SIZE`, a fetch error that a produce never gets), `InvalidTimestamp` (the
/// producer stamps the time, so it is this host's clock, not the record), unknown topic or
/// partition and authorisation failures (configuration: every record would fail alike, and
/// dead-lettering them all would empty the stream into the DLQ instead of stopping it), and
/// timeouts, transport and leader errors (Kafka down or moving).
pub fn refusal(e: &KafkaError) -> Refusal {
    use RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(C::MessageSizeTooLarge | C::MessageBatchTooLarge) => {
            Refusal::Permanent(OUTPUT_TOO_LARGE)
        }
        Some(C::InvalidRecord) => Refusal::Permanent(OUTPUT_REJECTED),
        _ => Refusal::Retry,
    }
}

/// A record Kafka refused for good: the caller dead-letters what it was made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unproducible {
    /// Dead-letter reason code ([`OUTPUT_TOO_LARGE`], [`OUTPUT_REJECTED`]).
    pub reason: &'static str,
    /// Kafka's error and the record's size; never its contents.
    pub error: String,
}

impl Unproducible {
    fn new(reason: &'static str, out: &Output, e: &KafkaError) -> Self {
        let bytes = out.key.len()
            + out.value.len()
            + out
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        Self {
            reason,
            error: format!(
                "kafka refused the record for good ({bytes} bytes of key, value and headers): {e}"
            ),
        }
    }
}

impl KafkaSink {
    /// A sink whose records go to `topic` unless they name their own.
    pub fn new(
        kafka: &KafkaConfig,
        client_id: &str,
        topic: impl Into<String>,
        backoff: Backoff,
    ) -> Result<Self, KafkaError> {
        let topic = topic.into();
        Ok(Self {
            producer: kafka.producer(client_id)?,
            produced: (!topic.is_empty()).then(|| {
                metrics()
                    .kafka_produced_messages_total
                    .with_label_values(&[&topic])
            }),
            topic,
            backoff,
        })
    }

    fn record<'a>(&'a self, out: &'a Output) -> FutureRecord<'a, [u8], [u8]> {
        let topic = out.topic.as_deref().unwrap_or(&self.topic);
        let record = FutureRecord::to(topic)
            .key(out.key.as_slice())
            .payload(out.value.as_slice());
        if out.headers.is_empty() {
            return record;
        }
        let mut headers = OwnedHeaders::new_with_capacity(out.headers.len());
        for (key, value) in &out.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_slice()),
            });
        }
        record.headers(headers)
    }

    /// Hand one record to librdkafka, waiting while its queue is full.
    pub async fn enqueue(&self, out: &Output) -> Pending {
        loop {
            match self.producer.send_result(self.record(out)) {
                Ok(delivery) => return Pending(Ok(delivery)),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Pending(Err(e)),
            }
        }
    }

    /// Wait for `pending`'s report; produce `out` again with the backoff until Kafka takes it
    /// (`None`) or refuses it for good (`Some`: dead-letter what it was made from).
    pub async fn confirm(
        &self,
        out: &Output,
        mut pending: Pending,
        shutdown: &CancellationToken,
    ) -> Result<Option<Unproducible>, Halt> {
        let mut retrying = self.backoff.start();
        loop {
            match report(pending).await {
                Ok(()) => {
                    self.count_produced(std::slice::from_ref(&out));
                    return Ok(None);
                }
                Err(e) => {
                    count_refused(&e, 1);
                    if let Refusal::Permanent(reason) = refusal(&e) {
                        let why = Unproducible::new(reason, out, &e);
                        tracing::warn!(reason, error = %why.error, "kafka refused a record for good; it is dead-lettered");
                        return Ok(Some(why));
                    }
                    retrying.wait(shutdown, &e).await?;
                }
            }
            pending = self.enqueue(out).await;
        }
    }

    /// Produce one record and wait for Kafka's answer, without retrying (the caller's own
    /// retry decides, e.g. the DLQ handler's replays).
    pub async fn send(&self, out: &Output) -> Result<(), KafkaError> {
        let result = report(self.enqueue(out).await).await;
        match &result {
            Ok(()) => self.count_produced(&[out]),
            Err(e) => count_refused(e, 1),
        }
        result
    }

    /// Produce every record and wait until Kafka confirmed each of them or refused it for
    /// good, producing the others again with the backoff. Returns the records refused for
    /// good, by their index in `outputs` (every other one was confirmed).
    pub async fn send_all(
        &self,
        outputs: &[&Output],
        shutdown: &CancellationToken,
    ) -> Result<Vec<(usize, Unproducible)>, Halt> {
        let mut todo: Vec<usize> = (0..outputs.len()).collect();
        let mut unproducible = Vec::new();
        let mut retrying = self.backoff.start();
        loop {
            let mut pending = Vec::with_capacity(todo.len());
            for &i in &todo {
                pending.push(self.enqueue(outputs[i]).await);
            }
            let mut confirmed = Vec::with_capacity(todo.len());
            let mut refused = Vec::new();
            let mut last_error = None;
            // In order, one after the other: all were handed over already, so after the first
            // most reports are in; a `join_all` cost more than the waiting (FuturesUnordered in
            // the parser's profile).
            for (i, pending) in todo.into_iter().zip(pending) {
                let out = outputs[i];
                match report(pending).await {
                    Ok(()) => confirmed.push(out),
                    Err(e) => {
                        count_refused(&e, 1);
                        match refusal(&e) {
                            Refusal::Permanent(reason) => {
                                let why = Unproducible::new(reason, out, &e);
                                tracing::warn!(reason, error = %why.error, "kafka refused a record for good; it is dead-lettered");
                                unproducible.push((i, why));
                            }
                            Refusal::Retry => {
                                refused.push(i);
                                last_error = Some(e);
                            }
                        }
                    }
                }
            }
            self.count_produced(&confirmed);
            let Some(error) = last_error else {
                return Ok(unproducible);
            };
            tracing::warn!(error = %error, refused = refused.len(), "kafka refused records; producing them again");
            retrying.wait(shutdown, &error).await?;
            todo = refused;
        }
    }

    /// Wait up to `timeout` for everything handed to librdkafka to be delivered.
    pub async fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .unwrap_or(Err(KafkaError::Canceled))
    }

    fn count_produced(&self, outputs: &[&Output]) {
        let default = outputs.iter().filter(|o| o.topic.is_none()).count();
        if let (Some(produced), true) = (&self.produced, default > 0) {
            produced.inc_by(default as u64);
        }
        for topic in outputs.iter().filter_map(|o| o.topic.as_deref()) {
            metrics()
                .kafka_produced_messages_total
                .with_label_values(&[topic])
                .inc();
        }
    }
}

async fn report(pending: Pending) -> Result<(), KafkaError> {
    match pending.0?.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
    }
}

fn count_refused(e: &KafkaError, n: usize) {
    metrics()
        .kafka_produce_errors_total
        .with_label_values(&[error_kind(e)])
        .inc_by(n as u64);
}

/// A bounded label for a produce error.
fn error_kind(e: &KafkaError) -> &'static str {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageTimedOut) => "timeout",
        Some(RDKafkaErrorCode::QueueFull) => "queue_full",
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge) => {
            "too_large"
        }
        Some(RDKafkaErrorCode::InvalidRecord) => "invalid_record",
        Some(_) => "broker",
        None if matches!(e, KafkaError::Canceled) => "canceled",
        None => "client",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn production(code: RDKafkaErrorCode) -> KafkaError {
        KafkaError::MessageProduction(code)
    }

    #[test]
    fn only_errors_of_the_record_itself_are_permanent() {
        use RDKafkaErrorCode as C;
        for (code, reason) in [
            (C::MessageSizeTooLarge, OUTPUT_TOO_LARGE),
            (C::MessageBatchTooLarge, OUTPUT_TOO_LARGE),
            (C::InvalidRecord, OUTPUT_REJECTED),
        ] {
            assert_eq!(
                refusal(&production(code)),
                Refusal::Permanent(reason),
                "{code:?}"
            );
        }
        for code in [
            C::MessageTimedOut,
            C::QueueFull,
            C::AllBrokersDown,
            C::BrokerTransportFailure,
            C::NotLeaderForPartition,
            C::NotEnoughReplicas,
            C::RequestTimedOut,
            C::InvalidMessage,
            C::InvalidMessageSize,
            C::InvalidDifferentRecord,
            C::InvalidTimestamp,
            C::UnknownTopicOrPartition,
            C::UnknownTopic,
            C::UnknownPartition,
            C::TopicAuthorizationFailed,
            C::ClusterAuthorizationFailed,
            C::Fatal,
        ] {
            assert_eq!(refusal(&production(code)), Refusal::Retry, "{code:?}");
        }
        assert_eq!(refusal(&KafkaError::Canceled), Refusal::Retry);
    }

    /// librdkafka refuses a record over `message.max.bytes` in `send_result`, before any broker
    /// is involved: the sink hands it back at once instead of retrying it until it gives up.
    #[tokio::test]
    async fn a_record_over_the_producers_limit_is_unproducible_at_once() {
        let kafka = KafkaConfig {
            // Nothing listens there: a record that reached the broker stage would time out.
            brokers: "127.0.0.1:1".into(),
            message_timeout: Duration::from_secs(60),
            ..KafkaConfig::default()
        };
        let sink = KafkaSink::new(
            &kafka,
            "sink-test",
            "t",
            Backoff {
                give_up_after: Duration::from_secs(60),
                ..Backoff::default()
            },
        )
        .expect("producer");
        let big = Output::new(b"k".to_vec(), vec![b'x'; 1_000_001]);
        let shutdown = CancellationToken::new();
        let started = std::time::Instant::now();
        let refused = sink.send_all(&[&big], &shutdown).await.expect("no halt");
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, 0);
        assert_eq!(refused[0].1.reason, OUTPUT_TOO_LARGE);
        assert!(
            refused[0].1.error.contains("1000002 bytes"),
            "{}",
            refused[0].1.error
        );
        assert!(
            !refused[0].1.error.contains("xxxx"),
            "no payload in the error"
        );
        let pending = sink.enqueue(&big).await;
        let why = sink
            .confirm(&big, pending, &shutdown)
            .await
            .expect("no halt");
        assert_eq!(why.map(|w| w.reason), Some(OUTPUT_TOO_LARGE));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "refused at once, not retried: {:?}",
            started.elapsed()
        );
    }
}
