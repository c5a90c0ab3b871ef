//! The Kafka stage runtime: consume a batch, let the stage judge it (the same batch again,
//! after the backoff, while the stage reports a transient failure), produce its outputs and
//! dead-letter its rejections (and the inputs whose outputs Kafka refused for good), wait until
//! Kafka and RabbitMQ confirmed every one, and only then store the batch's offsets
//! (auto-commit commits stored offsets only). A crash anywhere before that replays the batch:
//! at-least-once, made exactly-once by idempotent writes downstream.
//! Memory is bounded by one batch. Outputs carry their input's trace context; with export on,
//! each batch is a span linked to its messages' traces ([`crate::trace`]).

use std::time::{Duration, Instant};

use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
use rdkafka::message::BorrowedMessage;
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;

use crate::dead_letter::{DeadLetterConfig, DeadLetterPublisher};
use crate::kafka::source::{self, KafkaSource};
use crate::kafka::{KafkaConfig, KafkaSink};
use crate::metrics::metrics;
use crate::outbox::Outbox;
use crate::retry::Halt;
use crate::service::Context;
use crate::stage::{Input, Output, Rejection, Stage, StageError, Verdict};
use crate::trace::{self, BatchSpan, Links};

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
            tick_interval: Duration::from_secs(10),
            dead_letter: DeadLetterConfig::default(),
        }
    }
}

impl StageIo {
    /// Topics and group of `service` as `schemas/topology.toml` names them; defaults otherwise.
    pub fn for_service(service: &str) -> Self {
        let spec = iotp_contract::topology::topology().consumer(service);
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
        out.extend(
            self.dead_letter
                .amqp_tls
                .problems("io.dead_letter.amqp_tls", &self.dead_letter.amqp_uri),
        );
        out
    }
}

/// Run `stage` until shutdown; then finish the batch in hand, commit, leave the consumer
/// group, and return. A stage that stops on an error commits and leaves the same way.
pub async fn run<S: Stage>(
    ctx: Context,
    kafka: KafkaConfig,
    io: StageIo,
    mut stage: S,
) -> anyhow::Result<()> {
    let source =
        KafkaSource::subscribe(&kafka, &io.group, &ctx.replica, &io.input_topics, S::NAME)?;
    let sink = KafkaSink::new(&kafka, &ctx.replica, io.output_topic.clone(), ctx.backoff)?;
    let dead_letters = DeadLetterPublisher::new(io.dead_letter.clone())?;
    let mut outbox = Outbox::new(S::NAME, sink, dead_letters, ctx.backoff);
    ctx.health.set_ready(true);
    tracing::info!(stage = S::NAME, topics = ?io.input_topics, group = %io.group, "consuming");
    let result = consume(&ctx, &io, &source, &mut outbox, &mut stage).await;
    tracing::info!(stage = S::NAME, "draining: committing stored offsets");
    source.commit();
    // This replica is going away (scale-in, restart, a stopped stage): hand its partitions to
    // the other members now rather than after its session times out.
    source.leave().await;
    outbox.close().await;
    result
}

async fn consume<S: Stage>(
    ctx: &Context,
    io: &StageIo,
    source: &KafkaSource,
    outbox: &mut Outbox,
    stage: &mut S,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(io.tick_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Only the wait for a batch's first record races shutdown and the tick: `first` is
        // cancel-safe, a half-gathered batch is not (its records have left the consumer's
        // queue: dropping them lost records while later offsets were committed).
        let step = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => on_tick(ctx, stage, outbox).await,
            first = source.first() => match first {
                Ok(first) => {
                    let batch = source.fill(first, io.batch_max, io.batch_linger).await?;
                    on_batch(ctx, stage, outbox, source, &batch).await
                }
                // The broker is away (restart, network): librdkafka reconnects by itself and
                // nothing is in hand, so wait instead of stopping the service.
                Err(e) if source::broker_unavailable(&e) => {
                    tracing::warn!(stage = S::NAME, error = %e, "kafka unavailable; waiting for it");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    Ok(())
                }
                Err(e) => return Err(e.into()),
            },
        };
        match step {
            Ok(()) => {}
            // Outputs still unconfirmed at shutdown: the batch stays uncommitted.
            Err(Halt::Shutdown) => return Ok(()),
            Err(Halt::Failed(e)) => return Err(e),
        }
    }
}

async fn on_batch<S: Stage>(
    ctx: &Context,
    stage: &mut S,
    outbox: &mut Outbox,
    source: &KafkaSource,
    batch: &[BorrowedMessage<'_>],
) -> Result<(), Halt> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut inputs: Vec<Input<'_>> = Vec::with_capacity(batch.len());
    for m in batch {
        source::inputs(m, &mut inputs);
    }
    if !trace::enabled() {
        return handle_batch(ctx, stage, outbox, source, &inputs, None).await;
    }
    // One span per batch, linked to the trace of each message; the store's spans are its
    // children and the batch's log lines carry its trace id.
    let mut links = Links::default();
    for input in &inputs {
        links.add(input.traceparent);
    }
    let topics: Vec<&str> = topics_of(&inputs);
    let span = BatchSpan::start(
        format!("process {}", topics.join(",")),
        SpanKind::Consumer,
        None,
        vec![
            KeyValue::new("iotp.stage", S::NAME),
            KeyValue::new("messaging.system", "kafka"),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.destination.name", topics.join(",")),
        ],
        links,
    );
    let result = handle_batch(ctx, stage, outbox, source, &inputs, Some(&span))
        .with_context(span.context())
        .instrument(span.log())
        .await;
    span.end(match &result {
        Ok(()) => None,
        Err(Halt::Shutdown) => Some("shutdown before the outputs were confirmed".into()),
        Err(Halt::Failed(e)) => Some(format!("{e:#}")),
    });
    result
}

/// The topics of a batch's records, each once.
fn topics_of<'a>(inputs: &[Input<'a>]) -> Vec<&'a str> {
    let mut topics: Vec<&str> = Vec::new();
    for input in inputs {
        if !topics.contains(&input.topic) {
            topics.push(input.topic);
        }
    }
    topics
}

async fn handle_batch<S: Stage>(
    ctx: &Context,
    stage: &mut S,
    outbox: &mut Outbox,
    source: &KafkaSource,
    inputs: &[Input<'_>],
    span: Option<&BatchSpan>,
) -> Result<(), Halt> {
    let inflight = metrics().inflight_messages.with_label_values(&[S::NAME]);
    inflight.set(inputs.len() as i64);
    let started = Instant::now();
    let mut retrying = ctx.backoff.start();
    let mut verdicts = loop {
        let result = stage.process(inputs).await;
        if let Some(verdicts) = retrying.check(result, &ctx.shutdown, S::NAME).await? {
            break verdicts;
        }
    };
    metrics()
        .stage_batch_seconds
        .observe(started.elapsed().as_secs_f64());
    if verdicts.len() != inputs.len() {
        return Err(Halt::Failed(anyhow::anyhow!(
            "stage {} returned {} verdicts for {} inputs",
            S::NAME,
            verdicts.len(),
            inputs.len()
        )));
    }
    // Every output made from an input carries the input's trace context.
    for (input, verdict) in inputs.iter().zip(verdicts.iter_mut()) {
        if let (Some(traceparent), Verdict::Emit(outs)) = (input.traceparent, verdict) {
            for out in outs {
                trace::carry(traceparent, out);
            }
        }
    }
    let mut outputs: Vec<(Option<&Input<'_>>, &Output)> = Vec::new();
    let mut rejects: Vec<(&Input<'_>, &Rejection)> = Vec::new();
    for (input, verdict) in inputs.iter().zip(&verdicts) {
        match verdict {
            Verdict::Emit(out) => outputs.extend(out.iter().map(|o| (Some(input), o))),
            Verdict::Reject(r) => rejects.push((input, r)),
        }
    }
    if let Some(span) = span {
        span.set([
            KeyValue::new("iotp.outputs", outputs.len() as i64),
            KeyValue::new("iotp.rejected", rejects.len() as i64),
        ]);
    }
    outbox.deliver(&outputs, &rejects, &ctx.shutdown).await?;
    source
        .store_offsets(inputs)
        .map_err(|e| Halt::Failed(e.into()))?;
    delivered(ctx, stage).await?;
    metrics()
        .delivery_seconds
        .with_label_values(&[S::NAME])
        .observe(started.elapsed().as_secs_f64());
    inflight.set(0);
    Ok(())
}

/// The stage's periodic work. A transient failure waits for the next tick.
async fn on_tick<S: Stage>(ctx: &Context, stage: &mut S, outbox: &mut Outbox) -> Result<(), Halt> {
    let outputs = match stage.tick().await {
        Ok(outputs) => outputs,
        Err(StageError::Retry(e)) => {
            tracing::warn!(
                stage = S::NAME,
                error = format!("{e:#}"),
                "tick failed; the next one tries again"
            );
            return Ok(());
        }
        Err(StageError::Stop(e)) => return Err(Halt::Failed(e)),
    };
    let outputs: Vec<(Option<&Input<'_>>, &Output)> = outputs.iter().map(|o| (None, o)).collect();
    outbox.deliver(&outputs, &[], &ctx.shutdown).await?;
    delivered(ctx, stage).await
}

async fn delivered<S: Stage>(ctx: &Context, stage: &mut S) -> Result<(), Halt> {
    let mut retrying = ctx.backoff.start();
    loop {
        let result = stage.delivered().await;
        if retrying
            .check(result, &ctx.shutdown, S::NAME)
            .await?
            .is_some()
        {
            return Ok(());
        }
    }
}
