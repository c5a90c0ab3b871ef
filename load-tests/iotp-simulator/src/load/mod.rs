//! A load test, phase by phase: what `iotp-load` runs.
//!
//! 1. [`prepare`]: the scenario, the report directory and the device registry; start the
//!    broker and the six services; one warm-up message end to end.
//! 2. [`drive`]: the fleet publishes the scenario over MQTT while CPU, memory and progress
//!    are watched.
//! 3. [`settle`]: wait until the store and the archive hold what the fleet was acknowledged
//!    for and every consumer group is at lag 0; the CPU window closes there.
//! 4. [`collect`]: the services' latency histograms and per-hop counters, the audit of the
//!    ledgers against the store and the archive, the services' exit codes.
//! 5. [`report`]: `report.md`, `report.json` and the plots, then the ceiling.
//!
//! Each phase is a function taking the [`Run`] and what the phase before it produced.

use std::path::PathBuf;

use clap::Parser;
use iotp_core::kafka::KafkaConfig;
use iotp_store::sqlite::SqliteStore;
use iotp_store::{Archived, DeadLetterArchive, LetterFilter};

use crate::fleet::Target;
use crate::scenario::Scenario;
use crate::stack::Stack;

mod chaos;
mod collect;
mod counters;
mod drive;
mod leftovers;
mod monitor;
mod prepare;
mod report;
mod settle;

pub use collect::collect;
pub use drive::{drive, Driven};
pub use prepare::prepare;
pub use report::report;
pub use settle::{settle, Settled};

/// `iotp-load`'s command line.
#[derive(Debug, Clone, Parser)]
#[command(
    about = "Run a load-test scenario through the whole pipeline, audit it, report",
    long_about = None
)]
pub struct Options {
    /// Scenario file.
    #[arg(long, default_value = "load-tests/scenarios/standard.toml")]
    pub scenario: PathBuf,
    /// Report directory (default: load-tests/reports/<scenario>-<time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where the service binaries are.
    #[arg(long, default_value = "target/release")]
    pub bin_dir: PathBuf,
    /// Mosquitto port.
    #[arg(long, default_value_t = 1884)]
    pub mqtt_port: u16,
    /// Kafka bootstrap for the run's own broker (or an external one).
    #[arg(long, default_value = "127.0.0.1:9094")]
    pub kafka: String,
    /// RabbitMQ (the run declares, and deletes after, its own dead-letter exchange and queues).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp: String,
    /// Tansu binary (default: ~/.cache/iotp/tansu-0.6.0/bin/tansu).
    #[arg(long)]
    pub tansu: Option<PathBuf>,
    /// Storage engine of the run's own Tansu: `memory` (throughput runs: closer to Kafka's
    /// speed) or `sqlite`. See docs/performance.md for what each did under load here.
    /// Default: the scenario's `kafka_engine`, else `memory`.
    #[arg(long, value_parser = ["sqlite", "memory"])]
    pub kafka_engine: Option<String>,
    /// Use the broker already running at --kafka instead of starting one.
    #[arg(long)]
    pub external_kafka: bool,
    /// First admin port of the services.
    #[arg(long, default_value_t = 9301)]
    pub admin_port: u16,
    /// Override the scenario's fleet-wide rate, msgs/s (e.g. half the measured maximum, for
    /// latency at a sustainable load).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Skip the ceiling measurement.
    #[arg(long)]
    pub no_ceiling: bool,
    /// Create the Kafka topics with this many partitions each instead of the topology's (a
    /// small deployment's choice; the ceiling's hops get as many as the raw topic has).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub partitions: Option<i32>,
    /// No progress bar (CI logs).
    #[arg(long)]
    pub quiet: bool,
    /// Extra setting for one service, `SERVICE:IOTP__KEY=value` (`*:` for every service), e.g.
    /// `upserter:IOTP__IO__BATCH_MAX=5000`: tuning compared without a rebuild. Repeatable;
    /// the report's command line shows it.
    #[arg(long = "service-env", value_parser = parse_service_env)]
    pub service_env: Vec<ServiceEnv>,
    /// Run the scenario this many times, one after the other (each into `<out>/run-<n>`, each
    /// with a fresh broker and tenant), and write their spread to `<out>/spread.md`.
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
}

/// One `--service-env`: for `service` (`None`: every service), `key=value`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceEnv {
    /// The service's short name (`upserter`), or `None` for all.
    pub service: Option<String>,
    /// Environment variable.
    pub key: String,
    /// Its value.
    pub value: String,
}

fn parse_service_env(s: &str) -> Result<ServiceEnv, String> {
    let (service, setting) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}`: expected SERVICE:KEY=value"))?;
    let (key, value) = setting
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected SERVICE:KEY=value"))?;
    let service = match service {
        "*" => None,
        name if crate::stack::SERVICES.contains(&name) => Some(name.to_string()),
        other => {
            return Err(format!(
                "`{other}` is not a service: one of {} or `*`",
                crate::stack::SERVICES.join(", ")
            ))
        }
    };
    if !key.starts_with("IOTP__") {
        return Err(format!("`{key}`: service settings start with IOTP__"));
    }
    Ok(ServiceEnv {
        service,
        key: key.into(),
        value: value.into(),
    })
}

impl Options {
    /// The Kafka-protocol broker of the run, said for people.
    pub fn broker(&self) -> String {
        if self.external_kafka {
            format!("external broker at {}", self.kafka)
        } else {
            format!(
                "Tansu 0.6.0, {} engine, at {}",
                self.kafka_engine.as_deref().unwrap_or("memory"),
                self.kafka
            )
        }
    }
}

/// What every phase works with: set up by [`prepare`], torn down by [`report`].
pub struct Run {
    /// The command line.
    pub opts: Options,
    /// The scenario as run (`--rate` applied).
    pub scenario: Scenario,
    /// The tenant the fleet publishes as: the scenario's, or `load-<name>-<unix seconds>`.
    pub tenant: String,
    /// Wall-clock start, RFC 3339 UTC to the second.
    pub started: String,
    /// The report directory (canonical): the report, the registry, the services' logs.
    pub out: PathBuf,
    /// The broker and the services, running.
    pub stack: Stack,
    /// The store the services write, opened for reading.
    pub store: SqliteStore,
    /// The run's Kafka-protocol broker.
    pub kafka: KafkaConfig,
}

impl Run {
    /// Devices of the run's tenant on the run's Mosquitto, on topics under `topic_prefix`.
    pub fn target(&self, topic_prefix: &str) -> Target {
        Target::local(self.stack.mqtt_port(), &self.tenant, topic_prefix)
            .with_tls(self.stack.tls_ca_dir())
    }

    /// Every dead letter of the run's tenant in the archive, replayed ones included.
    pub async fn letters(&self) -> anyhow::Result<Vec<Archived>> {
        let filter = LetterFilter {
            tenant: Some(self.tenant.clone()),
            include_replayed: true,
            limit: 10_000_000,
            ..LetterFilter::default()
        };
        Ok(self.store.letters(&filter).await?)
    }
}

/// Run a load test through every phase (`--repeat` times); whether every run passed (the
/// audit, and every service stopped cleanly). An error means a run could not be run to the end.
pub async fn run(opts: Options) -> anyhow::Result<bool> {
    if opts.repeat <= 1 {
        return Ok(run_once(opts).await?.passed);
    }
    let base = opts.out.clone().unwrap_or_else(|| {
        let name = opts
            .scenario
            .file_stem()
            .map_or("scenario".into(), |s| s.to_string_lossy().into_owned());
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        PathBuf::from(format!(
            "load-tests/reports/{name}-x{}-{}",
            opts.repeat,
            now.replace(':', "")
        ))
    });
    let mut reports = Vec::new();
    for i in 1..=opts.repeat {
        println!("iotp-load: run {i} of {}", opts.repeat);
        let once = Options {
            out: Some(base.join(format!("run-{i}"))),
            repeat: 1,
            ..opts.clone()
        };
        reports.push(run_once(once).await?);
    }
    let md = crate::report::spread::markdown(&reports);
    std::fs::write(base.join("spread.md"), &md)?;
    println!(
        "\n{md}\niotp-load: spread in {}",
        base.join("spread.md").display()
    );
    Ok(reports.iter().all(|r| r.passed))
}

/// One run through every phase: its report.
async fn run_once(opts: Options) -> anyhow::Result<crate::report::Report> {
    let mut run = prepare(opts).await?;
    let driven = drive(&run).await?;
    let settled = settle(&run, driven).await?;
    let outcome = collect(&mut run, settled).await?;
    report(run, outcome).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_env_names_one_service_or_all_and_refuses_the_rest() {
        assert_eq!(
            parse_service_env("upserter:IOTP__IO__BATCH_MAX=5000=x"),
            Ok(ServiceEnv {
                service: Some("upserter".into()),
                key: "IOTP__IO__BATCH_MAX".into(),
                value: "5000=x".into(),
            })
        );
        assert_eq!(
            parse_service_env("*:IOTP__COMMON__WORKER_THREADS=2").map(|e| e.service),
            Ok(None)
        );
        assert!(parse_service_env("upsertr:IOTP__IO__BATCH_MAX=1")
            .expect_err("a misspelt service is refused")
            .contains("not a service"));
        assert!(parse_service_env("upserter:BATCH_MAX=1").is_err());
        assert!(parse_service_env("IOTP__IO__BATCH_MAX=1").is_err());
    }
}
