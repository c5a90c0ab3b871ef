//! The Kafka stage runtime: consume a batch, let the stage judge it, produce its outputs and
//! dead-letter its rejections, wait until Kafka and RabbitMQ confirmed every one, and only then
//! store the batch's offsets (auto-commit commits stored offsets only). A crash anywhere before
//! that replays the batch: at-least-once, made exactly-once by idempotent writes downstream.
//! Memory is bounded by one batch.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedHeaders, BorrowedMessage, Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::contract::DeadLetter;
use crate::dead_letter::{
    DeadLetterConfig, DeadLetterPublisher, HEADER_ATTEMPTS, HEADER_DEAD_LETTER_ID,
    HEADER_FIRST_FAILURE_AT,
};
use crate::kafka::KafkaConfig;
use crate::metrics::metrics;
use crate::service::Context;
use crate::stage::{Input, Output, Rejection, Retry, Stage, Verdict};

/// Where a stage reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StageIo {
    /// Topics consumed.
    pub input_topics: Vec<String>,
    /// Default output topic.
    pub output_topic: String,
    /// Consumer group.
    pub group: String,
    /// Most records per batch.
    pub batch_max: usize,
    /// How long to wait to fill a batch once it has a record.
    #[serde(with = "humantime_serde")]
    pub batch_linger: Duration,
    /// First retry delay when Kafka or RabbitMQ refuse a batch's outputs (doubles to 10 s).
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    /// How often the stage's `tick` runs.
    #[serde(with = "humantime_serde")]
    pub tick_interval: Duration,
    /// Dead-letter destination.
    pub dead_letter: DeadLetterConfig,
}

impl Default for StageIo {
    fn default() -> Self {
        Self {
            input_topics: Vec::new(),
            output_topic: String::new(),
            group: String::new(),
            batch_max: 1000,
            batch_linger: Duration::from_millis(20),
            retry_min: Duration::from_millis(200),
            tick_interval: Duration::from_secs(10),
            dead_letter: DeadLetterConfig::default(),
        }
    }
}

impl StageIo {
    /// Topics and group of `service` as `schemas/topology.toml` names them; defaults otherwise.
    pub fn for_service(service: &str) -> Self {
        let spec = crate::topology::topology().consumer(service);
        Self {
            input_topics: spec.map(|s| s.topics.clone()).unwrap_or_default(),
            output_topic: spec.map(|s| s.output.clone()).unwrap_or_default(),
            group: spec.map(|s| s.group.clone()).unwrap_or_default(),
            ..Self::default()
        }
    }

    /// Rules for `validate()`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.input_topics.is_empty() {
            out.push("io.input_topics must not be empty".into());
        }
        if self.group.is_empty() {
            out.push("io.group must not be empty".into());
        }
        if self.tick_interval.is_zero() {
            out.push("io.tick_interval must be > 0".into());
        }
        if self.batch_max == 0 {
            out.push("io.batch_max must be at least 1".into());
        }
        out
    }
}

/// Run `stage` until shutdown; then finish the batch in hand, commit, and return.
pub async fn run<S: Stage>(
    ctx: Context,
    kafka: KafkaConfig,
    io: StageIo,
    mut stage: S,
) -> anyhow::Result<()> {
    let consumer: StreamConsumer = kafka.consumer_config(&io.group, &ctx.replica).create()?;
    let topics: Vec<&str> = io.input_topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let producer = kafka.producer(&ctx.replica)?;
    let mut dead_letters = DeadLetterPublisher::new(io.dead_letter.clone())?;
    ctx.health.set_ready(true);
    tracing::info!(stage = S::NAME, topics = ?io.input_topics, group = %io.group, "consuming");
    let inflight = metrics().inflight_messages.with_label_values(&[S::NAME]);

    let mut continuity = Continuity::new(S::NAME);
    let mut tick = tokio::time::interval(io.tick_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Only the wait for a batch's first record races shutdown and the tick: `recv` is
        // cancel-safe, a half-gathered batch is not (its records have left the consumer's
        // queue: dropping them lost records while later offsets were committed).
        let first = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = tick.tick() => {
                let outputs = stage.tick().await?;
                if !deliver(&ctx, &producer, &mut dead_letters, &io, S::NAME, outputs.iter().collect(), Vec::new()).await {
                    break;
                }
                stage.delivered().await?;
                continue;
            }
            first = consumer.recv() => first?,
        };
        let batch = next_batch(
            &consumer,
            first,
            io.batch_max,
            io.batch_linger,
            &mut continuity,
        )
        .await?;
        if batch.is_empty() {
            continue;
        }
        inflight.set(batch.len() as i64);
        let inputs: Vec<Input<'_>> = batch.iter().map(as_input).collect();
        let started = Instant::now();
        let verdicts = stage.process(&inputs).await?;
        metrics()
            .stage_batch_seconds
            .observe(started.elapsed().as_secs_f64());
        anyhow::ensure!(
            verdicts.len() == inputs.len(),
            "stage {} returned {} verdicts for {} inputs",
            S::NAME,
            verdicts.len(),
            inputs.len()
        );
        let mut outputs: Vec<&Output> = Vec::new();
        let mut rejects: Vec<(&Input<'_>, &Rejection)> = Vec::new();
        for (input, verdict) in inputs.iter().zip(&verdicts) {
            match verdict {
                Verdict::Emit(out) => outputs.extend(out),
                Verdict::Reject(r) => rejects.push((input, r)),
            }
        }
        if !deliver(
            &ctx,
            &producer,
            &mut dead_letters,
            &io,
            S::NAME,
            outputs,
            rejects,
        )
        .await
        {
            // Shutdown while outputs were still refused: leave the batch uncommitted.
            break;
        }
        consumer.store_offsets(&next_offsets(&inputs))?;
        stage.delivered().await?;
        metrics()
            .delivery_seconds
            .with_label_values(&[S::NAME])
            .observe(started.elapsed().as_secs_f64());
        inflight.set(0);
    }
    tracing::info!(stage = S::NAME, "draining: committing stored offsets");
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => {
            tracing::warn!(error = %e, "final commit failed; the last batch will be consumed again")
        }
    }
    dead_letters.close().await;
    drop(consumer);
    Ok(())
}

/// A batch starting with `first`: more records until `max` or `linger` has passed. Not
/// cancel-safe: run it to completion.
async fn next_batch<'c>(
    consumer: &'c StreamConsumer,
    first: BorrowedMessage<'c>,
    max: usize,
    linger: Duration,
    continuity: &mut Continuity,
) -> anyhow::Result<Vec<BorrowedMessage<'c>>> {
    let mut batch = Vec::new();
    if continuity.accept(consumer, &first) {
        batch.push(first);
    }
    let until = tokio::time::Instant::now() + linger;
    while batch.len() < max {
        match tokio::time::timeout_at(until, consumer.recv()).await {
            Ok(msg) => {
                let msg = msg?;
                if continuity.accept(consumer, &msg) {
                    batch.push(msg);
                }
            }
            Err(_) => break,
        }
    }
    Ok(batch)
}

/// Guards against skipped records. A record whose offset jumps past the next expected one of
/// its partition is not taken: the partition is sought back to the expected offset and read
/// again. If the re-read jumps to the same offset, the gap is real (transaction markers,
/// compaction) and is accepted. Accepted gaps are counted in `iotp_consumer_offset_gaps_total`,
/// re-reads in `iotp_consumer_rereads_total`. (A count-only first version of this check is
/// what showed records skipped under load: the runtime itself dropped half-gathered batches.)
struct Continuity {
    stage: &'static str,
    next: HashMap<(String, i32), i64>,
    /// Partitions sought back: the offset expected next, and the offset of the jump.
    reread: HashMap<(String, i32), (i64, i64)>,
}

impl Continuity {
    fn new(stage: &'static str) -> Self {
        Self {
            stage,
            next: HashMap::new(),
            reread: HashMap::new(),
        }
    }

    fn gap(&self, size: i64) {
        metrics()
            .consumer_offset_gaps_total
            .with_label_values(&[self.stage])
            .inc_by(size as u64);
    }

    /// Take this record (true), or drop it because its partition is being read again.
    fn accept(&mut self, consumer: &StreamConsumer, m: &BorrowedMessage<'_>) -> bool {
        let key = (m.topic().to_string(), m.partition());
        let offset = m.offset();
        if let Some(&(expected, jumped_to)) = self.reread.get(&key) {
            if offset > expected && offset != jumped_to {
                // Fetched before the seek took effect: it comes again.
                return false;
            }
            self.reread.remove(&key);
            if offset > expected {
                self.gap(offset - expected);
                tracing::warn!(
                    topic = m.topic(),
                    partition = m.partition(),
                    expected,
                    next = offset,
                    "offsets missing twice: accepted as a real gap"
                );
            }
        } else if let Some(&expected) = self.next.get(&key) {
            if offset > expected {
                tracing::warn!(
                    topic = m.topic(),
                    partition = m.partition(),
                    expected,
                    next = offset,
                    "broker skipped offsets: reading the partition again"
                );
                metrics()
                    .consumer_rereads_total
                    .with_label_values(&[self.stage])
                    .inc();
                match consumer.seek(
                    m.topic(),
                    m.partition(),
                    Offset::Offset(expected),
                    Duration::from_secs(10),
                ) {
                    Ok(()) => {
                        self.reread.insert(key, (expected, offset));
                        return false;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "seek failed: accepting the gap");
                        self.gap(offset - expected);
                    }
                }
            }
        }
        self.next.insert(key, offset + 1);
        true
    }
}

fn as_input<'a>(m: &'a BorrowedMessage<'a>) -> Input<'a> {
    Input {
        topic: m.topic(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key(),
        payload: m.payload().unwrap_or_default(),
        retry: m.headers().and_then(retry_headers),
    }
}

fn retry_headers<'a>(headers: &'a BorrowedHeaders) -> Option<Retry<'a>> {
    let get = |name: &str| {
        headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
    };
    Some(Retry {
        dead_letter_id: get(HEADER_DEAD_LETTER_ID)?,
        attempts: get(HEADER_ATTEMPTS)
            .and_then(|v| v.parse().ok())
            .unwrap_or(1),
        first_failure_at: get(HEADER_FIRST_FAILURE_AT)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    })
}

/// Offsets to store: one past the last record of each partition in the batch.
fn next_offsets(inputs: &[Input<'_>]) -> TopicPartitionList {
    let mut last: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for i in inputs {
        let e = last.entry((i.topic, i.partition)).or_insert(i.offset);
        *e = (*e).max(i.offset);
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in last {
        // Adding to a fresh list cannot fail.
        let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(offset + 1));
    }
    tpl
}

/// Produce and dead-letter everything, retrying refused items with backoff, until all are
/// confirmed (true) or shutdown interrupts the retries (false).
async fn deliver<'a>(
    ctx: &Context,
    producer: &FutureProducer,
    dead_letters: &mut DeadLetterPublisher,
    io: &StageIo,
    stage: &'static str,
    mut outputs: Vec<&'a Output>,
    mut rejects: Vec<(&'a Input<'a>, &'a Rejection)>,
) -> bool {
    let mut backoff = io.retry_min;
    loop {
        let refused = produce_all(producer, &io.output_topic, &outputs).await;
        let produced = outputs.len() - refused.len();
        metrics()
            .kafka_produced_messages_total
            .with_label_values(&[&io.output_topic])
            .inc_by(produced as u64);
        outputs = refused;
        let mut still = Vec::new();
        for (input, rejection) in rejects {
            let letter = dead_letter(stage, input, rejection);
            match dead_letters.publish(&letter, rejection.transient).await {
                Ok(()) => metrics()
                    .dead_letters_total
                    .with_label_values(&[stage, rejection.reason])
                    .inc(),
                Err(e) => {
                    tracing::warn!(error = %e, reason = rejection.reason, "dead letter not confirmed; retrying");
                    still.push((input, rejection));
                }
            }
        }
        rejects = still;
        if outputs.is_empty() && rejects.is_empty() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = ctx.shutdown.cancelled() => return false,
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Produce all, await all delivery reports; return what Kafka refused.
async fn produce_all<'o>(
    producer: &FutureProducer,
    default_topic: &str,
    outputs: &[&'o Output],
) -> Vec<&'o Output> {
    let mut pending = Vec::with_capacity(outputs.len());
    for out in outputs {
        let topic = out.topic.as_deref().unwrap_or(default_topic);
        loop {
            let record = FutureRecord::to(topic)
                .key(out.key.as_slice())
                .payload(out.value.as_slice());
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push((*out, Some(delivery)));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    tracing::warn!(error = %e, topic, "cannot enqueue record");
                    pending.push((*out, None));
                    break;
                }
            }
        }
    }
    let (outs, deliveries): (Vec<&Output>, Vec<_>) = pending.into_iter().unzip();
    let results = join_all(deliveries.into_iter().map(|d| async move {
        match d {
            Some(d) => matches!(d.await, Ok(Ok(_))),
            None => false,
        }
    }))
    .await;
    let refused: Vec<&Output> = outs
        .into_iter()
        .zip(results)
        .filter(|(_, ok)| !ok)
        .map(|(o, _)| o)
        .collect();
    if !refused.is_empty() {
        metrics()
            .kafka_produce_errors_total
            .with_label_values(&["refused"])
            .inc_by(refused.len() as u64);
    }
    refused
}

fn dead_letter(stage: &str, input: &Input<'_>, r: &Rejection) -> DeadLetter {
    let now = crate::now_millis();
    let (id, attempts, first_failure_at) = match input.retry {
        Some(retry) => (
            retry.dead_letter_id.to_string(),
            retry.attempts + 1,
            retry.first_failure_at,
        ),
        None => (
            format!(
                "{stage}/{}/{}/{}",
                input.topic, input.partition, input.offset
            ),
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
