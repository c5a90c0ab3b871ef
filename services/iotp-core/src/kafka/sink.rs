//! The one producer path. Every record a service produces — a stage's outputs, the bridge's
//! raw envelopes, the DLQ handler's replays — goes through [`KafkaSink`]: it owns the
//! idempotent producer, waits while librdkafka's queue is full, collects the delivery reports,
//! and produces refused records again with the runtime's backoff until Kafka takes them —
//! unless Kafka refused a record for good ([`refusal`]): that record is handed back to the
//! caller as [`Unproducible`], to be dead-lettered, and never produced again.
//! Callers acknowledge upstream only after it returned `Ok`.
//!
//! Records are handed over and confirmed a batch at a time ([`Batch`]): librdkafka's delivery
//! callback counts a batch's reports down and keeps only the refusals, and the batch's owner
//! is woken once, when the last report is in — not once per record, as a future per record
//! (rdkafka's `FutureProducer`: a oneshot channel and a wake-up each) would.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntCounter;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::bundling::{self, Partitions, Planned};
use super::KafkaConfig;
use crate::metrics::metrics;
use crate::retry::{Backoff, Halt};
use crate::stage::Output;

/// A Kafka producer with confirmations and retries.
#[derive(Clone)]
pub struct KafkaSink {
    producer: Arc<ThreadedProducer<SinkContext>>,
    topic: String,
    backoff: Backoff,
    /// The produced counter of the default topic, looked up once (not per record); none for
    /// a sink whose records all name their topic (the DLQ replay).
    produced: Option<IntCounter>,
    /// With bundles on (`kafka.bundle_max_bytes` > 0): their size limit, and the partition
    /// counts of the topics written.
    bundles: Option<(usize, Arc<Partitions>)>,
}

/// Records handed to librdkafka together; their delivery reports are still to come.
#[must_use = "a batch's records are confirmed only once its reports are in"]
pub struct Batch {
    reports: Arc<Reports>,
    /// With bundles: the outputs each record carries, by record index (a refused bundle
    /// refuses each of them). `None`: a record per output.
    members: Option<Vec<Vec<usize>>>,
}

/// The delivery reports of one [`Batch`], filled in by librdkafka's polling thread.
struct Reports {
    /// Records handed over whose report is not in yet, plus one while the batch is still
    /// being handed over (so the count cannot reach zero before the last record is).
    outstanding: AtomicUsize,
    /// The refused records, by their index in the batch, with Kafka's error.
    refused: Mutex<Vec<(usize, KafkaError)>>,
    /// Woken once the count reaches zero.
    done: Notify,
}

impl Reports {
    fn settle(&self, n: usize) {
        if self.outstanding.fetch_sub(n, Ordering::AcqRel) == n {
            self.done.notify_one();
        }
    }

    fn refuse(&self, index: usize, e: KafkaError) {
        if let Ok(mut refused) = self.refused.lock() {
            refused.push((index, e));
        }
    }
}

/// What one Kafka record of a batch carries.
enum Carried<'a> {
    Output(&'a Output),
    /// Topic, partition and the encoded bundle.
    Bundle(&'a str, i32, Vec<u8>),
}

/// What librdkafka carries with each record to its delivery report.
pub struct Ticket {
    reports: Arc<Reports>,
    index: usize,
}

/// The producer's callbacks: delivery reports go to their [`Batch`].
pub struct SinkContext;

impl ClientContext for SinkContext {}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = Box<Ticket>;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: Box<Ticket>) {
        if let Err((e, _)) = result {
            ticket.reports.refuse(ticket.index, e.clone());
        }
        ticket.reports.settle(1);
    }
}

impl Batch {
    /// Wait until every record's report is in; the refused ones, by index, in index order.
    pub async fn reports(self) -> Vec<(usize, KafkaError)> {
        // `notify_one` leaves a permit when nobody waits yet, so a report that lands between
        // the check and the wait is not missed.
        while self.reports.outstanding.load(Ordering::Acquire) > 0 {
            self.reports.done.notified().await;
        }
        let mut refused = self
            .reports
            .refused
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default();
        if let Some(members) = &self.members {
            refused = refused
                .into_iter()
                .flat_map(|(record, e)| members[record].iter().map(move |&i| (i, e.clone())))
                .collect();
        }
        refused.sort_unstable_by_key(|(i, _)| *i);
        refused
    }
}

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
        let producer = kafka
            .producer_config(client_id)?
            .create_with_context(SinkContext)?;
        Ok(Self {
            producer: Arc::new(producer),
            produced: (!topic.is_empty()).then(|| {
                metrics()
                    .kafka_produced_messages_total
                    .with_label_values(&[&topic])
            }),
            topic,
            backoff,
            bundles: (kafka.bundle_max_bytes > 0).then(|| {
                (
                    kafka.bundle_max_bytes,
                    Arc::new(Partitions::new(kafka.linger * 2)),
                )
            }),
        })
    }

    fn record<'a>(
        &'a self,
        out: &'a Output,
        ticket: Box<Ticket>,
    ) -> BaseRecord<'a, [u8], [u8], Box<Ticket>> {
        let topic = out.topic.as_deref().unwrap_or(&self.topic);
        let record = BaseRecord::with_opaque_to(topic, ticket)
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

    /// Hand every record to librdkafka, in order, waiting while its queue is full. A record
    /// librdkafka refuses at once (too large) is reported as refused like any other. With
    /// bundles on, the outputs bound for one partition go as one bundle (`bundling.rs`).
    pub async fn enqueue_all(&self, outputs: &[&Output]) -> Batch {
        let planned = match &self.bundles {
            Some((max_bytes, partitions)) => Some(self.plan(outputs, *max_bytes, partitions).await),
            None => None,
        };
        let records = planned.as_ref().map_or(outputs.len(), Vec::len);
        let reports = Arc::new(Reports {
            outstanding: AtomicUsize::new(records + 1),
            refused: Mutex::new(Vec::new()),
            done: Notify::new(),
        });
        for index in 0..records {
            let mut ticket = Box::new(Ticket {
                reports: reports.clone(),
                index,
            });
            let carried = match planned.as_ref().map(|p| &p[index]) {
                None => Carried::Output(outputs[index]),
                Some(Planned::Single(i)) => Carried::Output(outputs[*i]),
                Some(Planned::Bundle {
                    topic,
                    partition,
                    members,
                }) => Carried::Bundle(topic, *partition, bundling::encode(outputs, members)),
            };
            loop {
                let record = match &carried {
                    Carried::Output(out) => self.record(out, ticket),
                    Carried::Bundle(topic, partition, bytes) => {
                        BaseRecord::with_opaque_to(topic, ticket)
                            .payload(bytes.as_slice())
                            .partition(*partition)
                    }
                };
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), record)) => {
                        ticket = record.delivery_opaque;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        reports.refuse(index, e);
                        reports.settle(1);
                        break;
                    }
                }
            }
        }
        reports.settle(1);
        Batch {
            reports,
            members: planned.map(|p| p.into_iter().map(Planned::into_members).collect()),
        }
    }

    /// Which outputs travel together, and where.
    async fn plan<'o>(
        &'o self,
        outputs: &[&'o Output],
        max_bytes: usize,
        partitions: &Partitions,
    ) -> Vec<Planned<'o>> {
        let mut counts: Vec<(&str, Option<i32>)> = Vec::new();
        // Only for records that can be bundled: one too large goes alone whatever the count
        // (and is refused at once, without waiting for an unreachable cluster's metadata).
        for out in outputs.iter().filter(|o| bundling::fits(o, max_bytes)) {
            let topic = out.topic.as_deref().unwrap_or(&self.topic);
            if !counts.iter().any(|(t, _)| *t == topic) {
                counts.push((topic, partitions.of(&self.producer, topic).await));
            }
        }
        let turn = partitions.turn();
        bundling::plan(
            outputs,
            &self.topic,
            max_bytes,
            |topic| {
                counts
                    .iter()
                    .find(|(t, _)| *t == topic)
                    .and_then(|(_, n)| *n)
            },
            |count| (turn % count.max(1) as u32) as i32,
        )
    }

    /// Wait for `batch`'s reports (`batch` holds `outputs`, in order); produce the refused
    /// records again with the backoff until Kafka takes them or refuses them for good.
    /// Returns the records refused for good, by their index in `outputs` (every other one was
    /// confirmed): dead-letter what they were made from.
    pub async fn confirm_all(
        &self,
        outputs: &[&Output],
        batch: Batch,
        shutdown: &CancellationToken,
    ) -> Result<Vec<(usize, Unproducible)>, Halt> {
        let mut unproducible = Vec::new();
        let mut retrying = self.backoff.start();
        // The indices in `outputs` of the records in `batch`; `None`: all of them.
        let mut todo: Option<Vec<usize>> = None;
        let mut batch = batch;
        loop {
            let refused = batch.reports().await;
            let Some((again, error)) =
                self.settle(outputs, todo.as_deref(), refused, &mut unproducible)
            else {
                unproducible.sort_unstable_by_key(|(i, _)| *i);
                return Ok(unproducible);
            };
            tracing::warn!(error = %error, refused = again.len(), "kafka refused records; producing them again");
            retrying.wait(shutdown, &error).await?;
            let records: Vec<&Output> = again.iter().map(|&i| outputs[i]).collect();
            batch = self.enqueue_all(&records).await;
            todo = Some(again);
        }
    }

    /// Count a batch's reports: the confirmed records, and the refused ones, which go to
    /// `unproducible` (for good) or are returned to be produced again, with the last error.
    /// `todo` maps the batch's indices to `outputs`' (`None`: the same).
    fn settle(
        &self,
        outputs: &[&Output],
        todo: Option<&[usize]>,
        refused: Vec<(usize, KafkaError)>,
        unproducible: &mut Vec<(usize, Unproducible)>,
    ) -> Option<(Vec<usize>, KafkaError)> {
        if refused.is_empty() && todo.is_none() {
            self.count_produced(outputs);
            return None;
        }
        let index = |i: usize| todo.map_or(i, |t| t[i]);
        let in_batch = todo.map_or(outputs.len(), <[usize]>::len);
        let mut next_refused = refused.iter().map(|(i, _)| *i).peekable();
        let mut confirmed = Vec::with_capacity(in_batch - refused.len());
        for i in 0..in_batch {
            if next_refused.peek() == Some(&i) {
                next_refused.next();
            } else {
                confirmed.push(outputs[index(i)]);
            }
        }
        self.count_produced(&confirmed);
        let mut again = Vec::new();
        let mut last_error = None;
        for (i, e) in refused {
            let i = index(i);
            count_refused(&e, 1);
            match refusal(&e) {
                Refusal::Permanent(reason) => {
                    let why = Unproducible::new(reason, outputs[i], &e);
                    tracing::warn!(reason, error = %why.error, "kafka refused a record for good; it is dead-lettered");
                    unproducible.push((i, why));
                }
                Refusal::Retry => {
                    again.push(i);
                    last_error = Some(e);
                }
            }
        }
        last_error.map(|e| (again, e))
    }

    /// Produce every record and wait until Kafka confirmed each of them or refused it for
    /// good, producing the others again with the backoff. Returns the records refused for
    /// good, by their index in `outputs` (every other one was confirmed).
    pub async fn send_all(
        &self,
        outputs: &[&Output],
        shutdown: &CancellationToken,
    ) -> Result<Vec<(usize, Unproducible)>, Halt> {
        let batch = self.enqueue_all(outputs).await;
        self.confirm_all(outputs, batch, shutdown).await
    }

    /// Produce one record and wait for Kafka's answer, without retrying (the caller's own
    /// retry decides, e.g. the DLQ handler's replays).
    pub async fn send(&self, out: &Output) -> Result<(), KafkaError> {
        match self.enqueue_all(&[out]).await.reports().await.pop() {
            None => {
                self.count_produced(&[out]);
                Ok(())
            }
            Some((_, e)) => {
                count_refused(&e, 1);
                Err(e)
            }
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
        let mut default = 0;
        for out in outputs {
            match out.topic.as_deref() {
                None => default += 1,
                Some(topic) => metrics()
                    .kafka_produced_messages_total
                    .with_label_values(&[topic])
                    .inc(),
            }
        }
        if let (Some(produced), true) = (&self.produced, default > 0) {
            produced.inc_by(default);
        }
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

    /// A batch of records produced again (`todo` maps its indices to the caller's list):
    /// refusals come back under the caller's indices, retried ones with the last error.
    #[test]
    fn refusals_keep_the_callers_indices_across_retries() {
        let sink = KafkaSink::new(
            &KafkaConfig {
                brokers: "127.0.0.1:1".into(),
                ..KafkaConfig::default()
            },
            "settle-test",
            "t",
            Backoff::default(),
        )
        .expect("producer");
        let outputs: Vec<Output> = (0..6u8).map(|i| Output::new(vec![i], vec![i])).collect();
        let refs: Vec<&Output> = outputs.iter().collect();
        let mut unproducible = Vec::new();
        // The second attempt held outputs 1, 3 and 5; its records 0 and 2 were refused.
        let refused = vec![
            (0, production(RDKafkaErrorCode::MessageTimedOut)),
            (2, production(RDKafkaErrorCode::MessageSizeTooLarge)),
        ];
        let (again, error) = sink
            .settle(&refs, Some(&[1, 3, 5]), refused, &mut unproducible)
            .expect("one to retry");
        assert_eq!(again, vec![1]);
        assert_eq!(refusal(&error), Refusal::Retry);
        assert_eq!(unproducible.len(), 1);
        assert_eq!(
            (unproducible[0].0, unproducible[0].1.reason),
            (5, OUTPUT_TOO_LARGE)
        );
        // Nothing refused: nothing to produce again.
        assert!(sink
            .settle(&refs, Some(&[1]), Vec::new(), &mut unproducible)
            .is_none());
        assert!(sink
            .settle(&refs, None, Vec::new(), &mut unproducible)
            .is_none());
        // Only permanent refusals: nothing to produce again either.
        let refused = vec![(4, production(RDKafkaErrorCode::InvalidRecord))];
        assert!(sink
            .settle(&refs, None, refused, &mut unproducible)
            .is_none());
        assert_eq!(
            unproducible.last().map(|(i, w)| (*i, w.reason)),
            Some((4, OUTPUT_REJECTED))
        );
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
        let err = sink.send(&big).await.expect_err("too large");
        assert_eq!(refusal(&err), Refusal::Permanent(OUTPUT_TOO_LARGE));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "refused at once, not retried: {:?}",
            started.elapsed()
        );
    }
}
