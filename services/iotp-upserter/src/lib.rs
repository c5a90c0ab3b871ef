//! The idempotent upserter: enriched records into the raw tier of the store, each
//! (tenant, deviceId, seqNo) exactly once. The store write for a batch is one transaction
//! (embedded backend) that skips keys already present; offsets are stored only after it
//! committed. Crash windows: killed before the commit → nothing of the batch is stored and it
//! is consumed again; killed after the commit, before the offsets are stored → the batch is
//! consumed again and every message is a counted duplicate. Either way: stored once.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use iotp_contract::{Codec, EnrichedTelemetry};
use iotp_core::config::{Common, ServiceConfig};
use iotp_core::consume::{self, StageIo};
use iotp_core::kafka::KafkaConfig;
use iotp_core::metrics::metrics;
use iotp_core::service::Context;
use iotp_core::stage::{Input, Output, Rejection, Stage, Verdict};
use iotp_core::store::{
    with_retries, MessageRecord, PruneReport, Pruning, ReadingStore, Retention, StoreConfig,
};
use serde::{Deserialize, Serialize};

/// Upserter configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpserterConfig {
    /// Settings every service has.
    pub common: Common,
    /// Kafka cluster.
    pub kafka: KafkaConfig,
    /// Topics, group, batching, dead letters.
    pub io: StageIo,
    /// Embedded store (SQLite) file, used unless `mongodb_uri` is set.
    pub store_path: PathBuf,
    /// MongoDB connection string: use MongoDB instead (see [`StoreConfig`]). Never logged.
    pub mongodb_uri: Option<String>,
    /// MongoDB database.
    pub mongodb_database: String,
    /// Store retries before the service gives up on a batch (it is then consumed again).
    pub store_attempts: u32,
    /// First store retry delay (doubles).
    #[serde(with = "humantime_serde")]
    pub store_retry: Duration,
    /// Retention tiers (raw readings, hourly and daily roll-ups): on the embedded store pruned
    /// every `io.tick_interval`; on MongoDB the TTLs set at start-up (every service opening
    /// the store sets them: give them all the same values).
    pub retention: Retention,
}

impl Default for UpserterConfig {
    fn default() -> Self {
        Self {
            common: Common::default(),
            kafka: KafkaConfig::default(),
            io: StageIo::for_service("upserter"),
            store_path: StoreConfig::default().path,
            mongodb_uri: None,
            mongodb_database: StoreConfig::default().mongodb_database,
            store_attempts: 5,
            store_retry: Duration::from_millis(100),
            retention: Retention::default(),
        }
    }
}

impl UpserterConfig {
    /// The store these settings select.
    pub fn store(&self) -> StoreConfig {
        StoreConfig {
            path: self.store_path.clone(),
            mongodb_uri: self.mongodb_uri.clone(),
            mongodb_database: self.mongodb_database.clone(),
        }
    }
}

impl ServiceConfig for UpserterConfig {
    fn common(&self) -> &Common {
        &self.common
    }

    fn validate(&self) -> Vec<String> {
        let mut out = self.kafka.problems();
        out.extend(self.io.problems());
        out.extend(self.retention.problems());
        out.extend(self.store().problems());
        if self.store_attempts == 0 {
            out.push("store_attempts must be at least 1".into());
        }
        out
    }
}

/// Run the upserter on the configured store.
pub async fn run(ctx: Context, config: UpserterConfig) -> anyhow::Result<()> {
    let store = config.store().open(config.retention).await?;
    let stage = Upserter {
        store,
        codec: Codec::latest()?,
        attempts: config.store_attempts,
        retry: config.store_retry,
        retention: config.retention,
    };
    consume::run(ctx, config.kafka, config.io, stage).await
}

/// The upserter stage over a reading store.
pub struct Upserter<S: ReadingStore + Pruning> {
    store: S,
    codec: Codec<EnrichedTelemetry>,
    attempts: u32,
    retry: Duration,
    retention: Retention,
}

impl<S: ReadingStore + Pruning> Stage for Upserter<S> {
    const NAME: &'static str = "upserter";

    async fn process(&mut self, batch: &[Input<'_>]) -> anyhow::Result<Vec<Verdict>> {
        let mut verdicts = Vec::with_capacity(batch.len());
        let mut messages = Vec::with_capacity(batch.len());
        for input in batch {
            match self.codec.decode(input.payload) {
                Ok(r) => {
                    messages.push(MessageRecord::from(r));
                    verdicts.push(Verdict::Emit(Vec::new()));
                }
                Err(e) => verdicts.push(Verdict::Reject(Rejection::permanent(
                    e.reason_code(),
                    e.to_string(),
                ))),
            }
        }
        let report = with_retries(self.attempts, self.retry, || {
            self.store.write_messages(&messages)
        })
        .await?;
        metrics().messages_stored_total.inc_by(report.stored);
        metrics().duplicates_removed_total.inc_by(report.duplicates);
        let devices: BTreeSet<(String, String)> = messages
            .iter()
            .map(|m| (m.tenant.clone(), m.device_id.clone()))
            .collect();
        let devices: Vec<_> = devices.into_iter().collect();
        let gaps = with_retries(self.attempts, self.retry, || {
            self.store.update_seq_gaps(&devices)
        })
        .await?;
        metrics().batch_device_seq_gaps.set(gaps as i64);
        Ok(verdicts)
    }

    async fn tick(&mut self) -> anyhow::Result<Vec<Output>> {
        let pruned = self
            .store
            .prune(iotp_contract::now_millis(), &self.retention)
            .await?;
        if pruned != PruneReport::default() {
            tracing::info!(
                raw = pruned.raw,
                hourly = pruned.hourly,
                daily = pruned.daily,
                "expired data pruned"
            );
        }
        Ok(Vec::new())
    }
}
