//! The aggregator: hourly and daily roll-ups per (device, metric) by event time — count, sum,
//! min, max, avg, first/last, and for cumulative counters the delta over the bucket.
//!
//! Each message is folded once: the fold records (tenant, deviceId, seqNo) in the same store
//! transaction as the bucket updates, so redeliveries, restarts and replays never double-count,
//! and open windows survive restarts (they live in the store). A bucket is published to
//! Kafka once its end plus the allowed lateness is behind the watermark (newest event time
//! seen); data later than that corrects the bucket (new revision, published again) or, with
//! `late_policy = "reject"`, is dead-lettered as `too_late` — never silently lost.

use std::path::PathBuf;
use std::time::Duration;

use iotp_contract::devices::Registry;
use iotp_contract::{Aggregate, Codec, EnrichedTelemetry};
use iotp_core::config::{Common, ServiceConfig};
use iotp_core::consume::{self, StageIo};
use iotp_core::kafka::KafkaConfig;
use iotp_core::metrics::metrics;
use iotp_core::service::Context;
use iotp_core::stage::{Input, Output, Rejection, Stage, StageError, Verdict};
use iotp_store::{Bucket, MessageRecord, RollupStore, StoreConfig, GRANULARITIES};
use serde::{Deserialize, Serialize};

/// What to do with data later than the allowed lateness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LatePolicy {
    /// Fold it into its bucket and publish the corrected bucket again.
    Correct,
    /// Dead-letter the message with reason `too_late`.
    Reject,
}

/// Aggregator configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorConfig {
    /// Settings every service has.
    pub common: Common,
    /// Kafka cluster.
    pub kafka: KafkaConfig,
    /// Topics, group, batching, dead letters; `io.tick_interval` is how often closed buckets
    /// are published.
    pub io: StageIo,
    /// The store of the roll-ups (the pipeline's shared store; on MongoDB a replica set or
    /// sharded cluster: each fold is a transaction). Hourly and daily roll-ups expire after
    /// `store.retention.hourly` and `.daily`.
    pub store: StoreConfig,
    /// Device registry, for which metrics are cumulative counters (optional).
    pub registry_file: Option<PathBuf>,
    /// Cumulative metrics in addition to those the registry names.
    pub cumulative_metrics: Vec<String>,
    /// How long after its end a bucket waits for late data before it is published.
    #[serde(with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// Data later than that: `correct` or `reject`.
    pub late_policy: LatePolicy,
    /// Most buckets published per tick.
    pub publish_batch: usize,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        Self {
            common: Common::default(),
            kafka: KafkaConfig::default(),
            // A batch folds each (device, metric, bucket) it touches once: one read and one
            // write of the bucket, plus one dedup row per message. Batches of a whole second
            // fold a device's several readings together; with the stages' 20 ms they held
            // about one message per device, and at 4,000 msgs/s the aggregator cost 54–57 µs
            // per message against 17 with 1 s (docs/performance.md). Roll-ups are hourly, and
            // no one waits on this hop (device → store ends at the upserter). At most 4,000:
            // a batch's records and their buckets are the aggregator's memory, and 10,000 held
            // it at 84 MiB in the unthrottled standard run against 69 with 4,000, at the same
            // CPU per message (docs/performance.md, session 18).
            io: StageIo {
                batch_linger: Duration::from_secs(1),
                batch_max: 4_000,
                ..StageIo::for_service("aggregator")
            },
            store: StoreConfig::default(),
            registry_file: None,
            cumulative_metrics: Vec::new(),
            allowed_lateness: Duration::from_secs(3600),
            late_policy: LatePolicy::Correct,
            publish_batch: 5000,
        }
    }
}

impl ServiceConfig for AggregatorConfig {
    fn common(&self) -> &Common {
        &self.common
    }

    fn validate(&self) -> Vec<String> {
        let mut out = self.kafka.problems();
        out.extend(self.io.problems());
        out.extend(self.store.problems());
        if self.io.output_topic.is_empty() {
            out.push("io.output_topic must not be empty".into());
        }
        if self.publish_batch == 0 {
            out.push("publish_batch must be at least 1".into());
        }
        out
    }
}

/// Run the aggregator.
pub async fn run(ctx: Context, config: AggregatorConfig) -> anyhow::Result<()> {
    let store = config.store.open().await?;
    let mut cumulative = config.cumulative_metrics.clone();
    if let Some(path) = &config.registry_file {
        cumulative.extend(Registry::load(path)?.cumulative_metrics());
    }
    let stage = Aggregator::new(store, cumulative, &config)?;
    consume::run(ctx, config.kafka, config.io, stage).await
}

/// The aggregator stage over a roll-up store.
pub struct Aggregator<S: RollupStore> {
    store: S,
    cumulative: Vec<String>,
    lateness_ms: i64,
    policy: LatePolicy,
    publish_batch: usize,
    input: Codec<EnrichedTelemetry>,
    output: Codec<Aggregate>,
    emitted: Vec<Bucket>,
}

impl<S: RollupStore> Aggregator<S> {
    /// An aggregator.
    pub fn new(
        store: S,
        cumulative: Vec<String>,
        config: &AggregatorConfig,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            store,
            cumulative,
            lateness_ms: config.allowed_lateness.as_millis() as i64,
            policy: config.late_policy,
            publish_batch: config.publish_batch,
            input: Codec::latest()?,
            output: Codec::latest()?,
            emitted: Vec::new(),
        })
    }
}

impl<S: RollupStore> Stage for Aggregator<S> {
    const NAME: &'static str = "aggregator";

    async fn process(&mut self, batch: &[Input<'_>]) -> Result<Vec<Verdict>, StageError> {
        let watermark = self.store.watermark().await?;
        let hour = GRANULARITIES[0].1;
        let mut verdicts = Vec::with_capacity(batch.len());
        let mut messages = Vec::with_capacity(batch.len());
        let mut newest = i64::MIN;
        for input in batch {
            let record = match self.input.decode(input.payload) {
                Ok(r) => r,
                Err(e) => {
                    verdicts.push(Verdict::Reject(Rejection::permanent(
                        e.reason_code(),
                        e.to_string(),
                    )));
                    continue;
                }
            };
            let closes_at =
                record.header.produced_at.div_euclid(hour) * hour + hour + self.lateness_ms;
            if closes_at <= watermark {
                if self.policy == LatePolicy::Reject {
                    metrics()
                        .late_messages_total
                        .with_label_values(&["rejected"])
                        .inc();
                    let mut r = Rejection::permanent(
                        "too_late",
                        "reading is later than its hour window's allowed lateness",
                    );
                    r.tenant = Some(record.header.tenant.clone());
                    r.device_id = Some(record.header.device_id.clone());
                    verdicts.push(Verdict::Reject(r));
                    continue;
                }
                metrics()
                    .late_messages_total
                    .with_label_values(&["corrected"])
                    .inc();
            }
            newest = newest.max(record.header.produced_at);
            messages.push(MessageRecord::from(record));
            verdicts.push(Verdict::Emit(Vec::new()));
        }
        self.store.fold(messages, &self.cumulative, newest).await?;
        Ok(verdicts)
    }

    async fn tick(&mut self) -> Result<Vec<Output>, StageError> {
        let due = self
            .store
            .closed_unpublished(self.lateness_ms, self.publish_batch)
            .await?;
        let mut outputs = Vec::with_capacity(due.len());
        for b in &due {
            outputs.push(Output::new(
                format!("{}/{}/{}", b.tenant, b.device_id, b.metric),
                self.output.encode(&Aggregate::from(b))?,
            ));
        }
        self.emitted = due;
        Ok(outputs)
    }

    async fn delivered(&mut self) -> Result<(), StageError> {
        if !self.emitted.is_empty() {
            self.store.mark_published(&self.emitted).await?;
            metrics()
                .rollups_published_total
                .inc_by(self.emitted.len() as u64);
            tracing::debug!(buckets = self.emitted.len(), "roll-ups published");
            self.emitted.clear();
        }
        Ok(())
    }
}
