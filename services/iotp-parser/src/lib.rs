//! The parser/validator stage: raw envelopes from the bridge become canonical `Telemetry`
//! records keyed `tenant/deviceId`; anything that fails a rule becomes a dead letter with its
//! reason code and original bytes. Runs on the shared Kafka stage runtime.

pub mod payload;
mod validate;

use std::path::PathBuf;

use iotp_contract::devices::RegistryHandle;
use iotp_contract::{Codec, RawEnvelope, Telemetry};
use iotp_core::config::{Common, ServiceConfig};
use iotp_core::consume::{self, StageIo};
use iotp_core::kafka::KafkaConfig;
use iotp_core::service::Context;
use iotp_core::stage::{Input, Output, Rejection, Stage, StageError, Verdict};
use serde::{Deserialize, Serialize};

pub use validate::{validate, Rules};

/// Parser configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParserConfig {
    /// Settings every service has.
    pub common: Common,
    /// Kafka cluster.
    pub kafka: KafkaConfig,
    /// Topics, group, batching, dead letters.
    pub io: StageIo,
    /// Validation limits.
    pub rules: Rules,
    /// Device registry (TOML); when set, metric names and ranges are checked for known devices.
    pub registry_file: Option<PathBuf>,
}

impl Default for ParserConfig {
    fn default() -> Self {
        Self {
            common: Common::default(),
            kafka: KafkaConfig::default(),
            io: StageIo::for_service("parser"),
            rules: Rules::default(),
            registry_file: None,
        }
    }
}

impl ServiceConfig for ParserConfig {
    fn common(&self) -> &Common {
        &self.common
    }

    fn validate(&self) -> Vec<String> {
        let mut out = self.kafka.problems();
        out.extend(self.io.problems());
        if self.io.output_topic.is_empty() {
            out.push("io.output_topic must not be empty".into());
        }
        if let Some(path) = &self.registry_file {
            if !path.exists() {
                out.push(format!("registry_file {} does not exist", path.display()));
            }
        }
        out
    }
}

/// Run the parser.
pub async fn run(ctx: Context, config: ParserConfig) -> anyhow::Result<()> {
    let registry = config
        .registry_file
        .as_deref()
        .map(RegistryHandle::open)
        .transpose()?;
    let stage = Parser::new(config.rules, registry)?;
    consume::run(ctx, config.kafka, config.io, stage).await
}

/// The parser stage.
pub struct Parser {
    rules: Rules,
    registry: Option<RegistryHandle>,
    raw: Codec<RawEnvelope>,
    telemetry: Codec<Telemetry>,
}

impl Parser {
    /// A parser with these limits and, optionally, a device registry.
    pub fn new(rules: Rules, registry: Option<RegistryHandle>) -> anyhow::Result<Self> {
        Ok(Self {
            rules,
            registry,
            raw: Codec::latest()?,
            telemetry: Codec::latest()?,
        })
    }

    fn one(
        &self,
        input: &Input<'_>,
        registry: Option<&iotp_contract::devices::Registry>,
        now: i64,
    ) -> Verdict {
        let env = match self.raw.decode(input.payload) {
            Ok(env) => env,
            Err(e) => return Verdict::Reject(Rejection::permanent(e.reason_code(), e.to_string())),
        };
        match validate(&env, &self.rules, registry, now) {
            Ok(t) => match self.telemetry.encode(&t) {
                Ok(value) => Verdict::Emit(vec![Output::new(
                    iotp_contract::device_key(&t.header.tenant, &t.header.device_id),
                    value,
                )]),
                Err(e) => Verdict::Reject(Rejection::permanent(e.reason_code(), e.to_string())),
            },
            Err(rejection) => Verdict::Reject(rejection),
        }
    }
}

impl Stage for Parser {
    const NAME: &'static str = "parser";

    async fn process(&mut self, batch: &[Input<'_>]) -> Result<Vec<Verdict>, StageError> {
        if let Some(handle) = &self.registry {
            if let Err(e) = handle.reload_if_changed() {
                tracing::warn!(error = %e, "registry reload failed; keeping the previous one");
            }
        }
        let registry = self.registry.as_ref().map(RegistryHandle::current);
        let now = iotp_contract::now_millis();
        Ok(batch
            .iter()
            .map(|input| self.one(input, registry.as_deref(), now))
            .collect())
    }
}
