//! The idempotent upserter: enriched records into the raw tier of the store, each
//! (tenant, deviceId, seqNo) exactly once. The store write for a batch is one transaction
//! (embedded backend) that skips keys already present; offsets are stored only after it
//! committed. Crash windows: killed before the commit → nothing of the batch is stored and it
//! is consumed again; killed after the commit, before the offsets are stored → the batch is
//! consumed again and every message is a counted duplicate. Either way: stored once.

use iotp_contract::devices::{FastMap, FastSet};
use iotp_contract::{Codec, EnrichedTelemetry};
use iotp_core::config::{Common, ServiceConfig};
use iotp_core::consume::{self, StageIo};
use iotp_core::kafka::KafkaConfig;
use iotp_core::metrics::metrics;
use iotp_core::service::Context;
use iotp_core::stage::{Input, Output, Rejection, Stage, StageError, Verdict};
use iotp_store::{MessageRecord, PruneReport, Pruning, ReadingStore, Retention, StoreConfig};
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
    /// The store of the raw tier (the pipeline's shared store). Its retention tiers are
    /// pruned by this service every `io.tick_interval` on the embedded store; MongoDB expires
    /// them itself (TTL indexes).
    pub store: StoreConfig,
}

impl Default for UpserterConfig {
    fn default() -> Self {
        Self {
            common: Common::default(),
            kafka: KafkaConfig::default(),
            io: StageIo::for_service("upserter"),
            store: StoreConfig::default(),
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
        out.extend(self.store.problems());
        out
    }
}

/// Run the upserter on the configured store.
pub async fn run(ctx: Context, config: UpserterConfig) -> anyhow::Result<()> {
    let store = config.store.open().await?;
    let stage = Upserter::new(store, config.store.retention)?;
    consume::run(ctx, config.kafka, config.io, stage).await
}

/// The upserter stage over a reading store.
pub struct Upserter<S: ReadingStore + Pruning> {
    store: S,
    codec: Codec<EnrichedTelemetry>,
    retention: Retention,
    /// Devices written since the last tick, per tenant: their twins' seqNo gaps are
    /// recounted on the tick, in one transaction for all of them, not after every batch
    /// (a second write transaction, and its fsync, per batch). A crash loses only the
    /// recount, not data: the counts it reads are kept with the messages, and the next
    /// message of the device brings it back.
    touched: FastMap<String, FastSet<String>>,
}

impl<S: ReadingStore + Pruning> Upserter<S> {
    /// An upserter over `store`, pruning it to `retention`.
    pub fn new(store: S, retention: Retention) -> Result<Self, iotp_contract::CodecError> {
        Ok(Self {
            store,
            codec: Codec::latest()?,
            retention,
            touched: FastMap::default(),
        })
    }
}

impl<S: ReadingStore + Pruning> Stage for Upserter<S> {
    const NAME: &'static str = "upserter";

    async fn process(&mut self, batch: &[Input<'_>]) -> Result<Vec<Verdict>, StageError> {
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
        // Noted before the write, which takes the batch: a device noted for a write that then
        // fails is recounted for nothing on the tick, and its batch comes again.
        let produced_at: Vec<i64> = messages.iter().map(|m| m.produced_at).collect();
        for m in &messages {
            let devices = match self.touched.get_mut(&m.tenant) {
                Some(d) => d,
                None => self.touched.entry(m.tenant.clone()).or_default(),
            };
            if !devices.contains(&m.device_id) {
                devices.insert(m.device_id.clone());
            }
        }
        let report = self.store.write_messages(messages).await?;
        // Committed: how long each message took from its device (device clock; one running
        // ahead within the parser's allowed skew counts as 0).
        let committed = iotp_contract::now_millis();
        let latency = metrics().device_to_store_seconds.local();
        for at in produced_at {
            latency.observe((committed - at).max(0) as f64 / 1000.0);
        }
        latency.flush();
        metrics().messages_stored_total.inc_by(report.stored);
        metrics().duplicates_removed_total.inc_by(report.duplicates);
        Ok(verdicts)
    }

    async fn tick(&mut self) -> Result<Vec<Output>, StageError> {
        if !self.touched.is_empty() {
            let devices: Vec<(String, String)> = self
                .touched
                .iter()
                .flat_map(|(t, ds)| ds.iter().map(move |d| (t.clone(), d.clone())))
                .collect();
            let gaps = self.store.update_seq_gaps(&devices).await?;
            metrics().batch_device_seq_gaps.set(gaps as i64);
            self.touched.clear();
        }
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
