//! The one producer path. Every record a service produces — a stage's outputs, the bridge's
//! raw envelopes, the DLQ handler's replays — goes through [`KafkaSink`]: it owns the
//! idempotent producer, waits while librdkafka's queue is full, collects the delivery reports,
//! and produces refused records again with the runtime's backoff until Kafka takes them.
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

    /// Wait for `pending`'s report; produce `out` again with the backoff until Kafka takes it.
    pub async fn confirm(
        &self,
        out: &Output,
        mut pending: Pending,
        shutdown: &CancellationToken,
    ) -> Result<(), Halt> {
        let mut retrying = self.backoff.start();
        loop {
            match report(pending).await {
                Ok(()) => {
                    self.count_produced(std::slice::from_ref(&out));
                    return Ok(());
                }
                Err(e) => {
                    count_refused(&e, 1);
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

    /// Produce every record and wait until Kafka confirmed all of them, producing refused
    /// ones again with the backoff.
    pub async fn send_all(
        &self,
        outputs: &[&Output],
        shutdown: &CancellationToken,
    ) -> Result<(), Halt> {
        let mut todo: Vec<&Output> = outputs.to_vec();
        let mut retrying = self.backoff.start();
        loop {
            let mut pending = Vec::with_capacity(todo.len());
            for out in &todo {
                pending.push(self.enqueue(out).await);
            }
            let mut confirmed = Vec::with_capacity(todo.len());
            let mut refused = Vec::new();
            let mut last_error = None;
            // In order, one after the other: all were handed over already, so after the first
            // most reports are in; a `join_all` cost more than the waiting (FuturesUnordered in
            // the parser's profile).
            for (out, pending) in todo.into_iter().zip(pending) {
                match report(pending).await {
                    Ok(()) => confirmed.push(out),
                    Err(e) => {
                        refused.push(out);
                        last_error = Some(e);
                    }
                }
            }
            self.count_produced(&confirmed);
            let Some(error) = last_error else {
                return Ok(());
            };
            count_refused(&error, refused.len());
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
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => "too_large",
        Some(_) => "broker",
        None if matches!(e, KafkaError::Canceled) => "canceled",
        None => "client",
    }
}
