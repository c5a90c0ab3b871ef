//! The enricher stage: tags each validated record from the device registry, converts readings
//! to the profile's canonical units, drops metrics flagged as personal data, keeps each
//! device's digital twin, and marks devices offline after missed heartbeats. Unknown devices are
//! quarantined (dead letter `unknown_device`, parked until the registry knows them).

mod enrich;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use iotp_contract::devices::RegistryHandle;
use iotp_contract::{Codec, EnrichedTelemetry, Telemetry};
use iotp_core::config::{Common, ServiceConfig};
use iotp_core::consume::{self, StageIo};
use iotp_core::kafka::KafkaConfig;
use iotp_core::metrics::metrics;
use iotp_core::service::Context;
use iotp_core::stage::{Input, Output, Rejection, Stage, StageError, Verdict};
use iotp_store::{StoreConfig, TwinStore};
use serde::{Deserialize, Serialize};

pub use enrich::{enrich, Enriched};

/// Enricher configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnricherConfig {
    /// Settings every service has.
    pub common: Common,
    /// Kafka cluster.
    pub kafka: KafkaConfig,
    /// Topics, group, batching, dead letters.
    pub io: StageIo,
    /// Device registry (TOML), reloaded when it changes.
    pub registry_file: PathBuf,
    /// The store holding the twins (the pipeline's shared store).
    pub store: StoreConfig,
    /// Heartbeat intervals a device may miss before it is marked offline.
    pub missed_heartbeats: u32,
}

impl Default for EnricherConfig {
    fn default() -> Self {
        Self {
            common: Common::default(),
            kafka: KafkaConfig::default(),
            io: StageIo::for_service("enricher"),
            registry_file: PathBuf::from("registry.toml"),
            store: StoreConfig::default(),
            missed_heartbeats: 3,
        }
    }
}

impl ServiceConfig for EnricherConfig {
    fn common(&self) -> &Common {
        &self.common
    }

    fn validate(&self) -> Vec<String> {
        let mut out = self.kafka.problems();
        out.extend(self.io.problems());
        out.extend(self.store.problems());
        if !self.registry_file.exists() {
            out.push(format!(
                "registry_file {} does not exist",
                self.registry_file.display()
            ));
        }
        if self.missed_heartbeats == 0 {
            out.push("missed_heartbeats must be at least 1".into());
        }
        out
    }
}

/// Run the enricher.
pub async fn run(ctx: Context, config: EnricherConfig) -> anyhow::Result<()> {
    let store = config.store.open().await?;
    let registry = RegistryHandle::open(&config.registry_file)?;
    let stage = Enricher::new(registry, store, &config)?;
    consume::run(ctx, config.kafka, config.io, stage).await
}

/// The enricher stage over a twin store.
pub struct Enricher<S: TwinStore> {
    registry: RegistryHandle,
    registry_readable: bool,
    store: S,
    input: Codec<Telemetry>,
    output: Codec<EnrichedTelemetry>,
    missed_heartbeats: u32,
    /// When the twins were last counted by liveness (`iotp_devices`).
    counted_at: Option<Instant>,
}

/// How often a tick counts the twins by liveness for `iotp_devices`: a read of every twin
/// (MongoDB: two counts over the `online` field), so not every tick (`io.tick_interval`).
const COUNT_DEVICES_EVERY: Duration = Duration::from_secs(15);

impl<S: TwinStore> Enricher<S> {
    /// An enricher.
    pub fn new(
        registry: RegistryHandle,
        store: S,
        config: &EnricherConfig,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            registry,
            registry_readable: true,
            store,
            input: Codec::latest()?,
            output: Codec::latest()?,
            missed_heartbeats: config.missed_heartbeats,
            counted_at: None,
        })
    }
}

impl<S: TwinStore> Stage for Enricher<S> {
    const NAME: &'static str = "enricher";

    async fn process(&mut self, batch: &[Input<'_>]) -> Result<Vec<Verdict>, StageError> {
        match self.registry.reload_if_changed() {
            Ok(reloaded) => {
                if reloaded {
                    tracing::info!(
                        devices = self.registry.current().len(),
                        "device registry reloaded"
                    );
                }
                self.registry_readable = true;
            }
            Err(e) => {
                if self.registry_readable {
                    tracing::warn!(error = %e, "device registry unreadable; unknown devices are retried, not quarantined");
                }
                self.registry_readable = false;
            }
        }
        let registry = self.registry.current();
        let mut verdicts = Vec::with_capacity(batch.len());
        let mut observations = Vec::new();
        for input in batch {
            let telemetry = match self.input.decode(input.payload) {
                Ok(t) => t,
                Err(e) => {
                    verdicts.push(Verdict::Reject(Rejection::permanent(
                        e.reason_code(),
                        e.to_string(),
                    )));
                    continue;
                }
            };
            match enrich(telemetry, &registry, self.registry_readable) {
                Ok(Enriched {
                    record,
                    observation,
                }) => {
                    observations.push(observation);
                    let out = match record {
                        // Heartbeats end at the twin.
                        None => Vec::new(),
                        Some(r) => vec![Output::new(
                            iotp_contract::device_key(&r.header.tenant, &r.header.device_id),
                            self.output.encode(&r)?,
                        )],
                    };
                    verdicts.push(Verdict::Emit(out));
                }
                Err(rejection) => verdicts.push(Verdict::Reject(rejection)),
            }
        }
        self.store.apply(observations).await?;
        Ok(verdicts)
    }

    async fn tick(&mut self) -> Result<Vec<Output>, StageError> {
        let marked = self
            .store
            .mark_offline(iotp_contract::now_millis(), self.missed_heartbeats)
            .await?;
        if marked > 0 {
            tracing::info!(
                devices = marked,
                "devices marked offline after missed heartbeats"
            );
            metrics().devices_marked_offline_total.inc_by(marked);
        }
        let due = self
            .counted_at
            .is_none_or(|at| at.elapsed() >= COUNT_DEVICES_EVERY);
        if due || marked > 0 {
            let counts = self.store.liveness_counts().await?;
            let devices = &metrics().devices;
            devices
                .with_label_values(&["online"])
                .set(i64::try_from(counts.online).unwrap_or(i64::MAX));
            devices
                .with_label_values(&["offline"])
                .set(i64::try_from(counts.offline).unwrap_or(i64::MAX));
            self.counted_at = Some(Instant::now());
        }
        Ok(Vec::new())
    }
}
