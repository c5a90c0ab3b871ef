//! Phase 1: the scenario, the tenant, the report directory and the device registry; then the
//! broker and the six services, and one message end to end before anything is measured.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use iotp_core::kafka::KafkaConfig;
use iotp_store::sqlite::SqliteStore;
use iotp_store::ReadingStore;

use super::{Options, Run};
use crate::fleet::{self, Target};
use crate::scenario::Scenario;
use crate::stack::{Stack, StackConfig};
use crate::{device, plan};

/// How long the warm-up message may take to reach the store.
const WARM_UP_WITHIN: Duration = Duration::from_secs(120);

/// Set the run up and start the pipeline; ready to drive once it returns.
pub async fn prepare(mut opts: Options) -> anyhow::Result<Run> {
    let mut scenario = Scenario::load(&opts.scenario)?;
    if opts.kafka_engine.is_none() && !scenario.kafka_engine.is_empty() {
        opts.kafka_engine = Some(scenario.kafka_engine.clone());
    }
    if let Some(rate) = opts.rate {
        scenario.rate = rate;
        scenario.rate_per_device = 0.0;
        scenario.resolve();
    }
    let started_wall = SystemTime::now();
    let unix = started_wall.duration_since(UNIX_EPOCH)?.as_secs();
    let tenant = if scenario.tenant.is_empty() {
        format!("load-{}-{unix}", scenario.name)
    } else {
        scenario.tenant.clone()
    };
    let warmup_tenant = format!("{tenant}-warmup");
    let started = humantime::format_rfc3339_seconds(started_wall).to_string();
    let out = opts.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "load-tests/reports/{}-{}",
            scenario.name,
            started.replace(':', "")
        ))
    });
    std::fs::create_dir_all(&out)?;
    let out = out.canonicalize()?;
    let registry = out.join("registry.toml");
    std::fs::write(
        &registry,
        device::registry_toml(&tenant, scenario.devices, scenario.devices)
            + &format!("\n[[devices]]\ntenant = \"{warmup_tenant}\"\nid = \"dev-000000\"\nprofile = \"energy-meter-v1\"\n"),
    )?;
    let cfg = stack_config(
        &opts,
        &scenario,
        &out,
        vec![tenant.clone(), warmup_tenant.clone()],
    )?;
    println!(
        "iotp-load: scenario {} ({} devices × {} messages), tenant {tenant}, report in {}",
        scenario.name,
        scenario.devices,
        scenario.messages_per_device,
        out.display()
    );
    let stack = Stack::start(&cfg, &registry, scenario.seed).await?;
    println!(
        "iotp-load: pipeline ready (services' logs in {})",
        out.join("logs").display()
    );
    let store = SqliteStore::open(&stack.store_path)?;
    let warmup_target =
        Target::local(stack.mqtt_port(), &warmup_tenant, "iot").with_tls(stack.tls_ca_dir());
    warm_up(&store, warmup_target).await?;
    let kafka = KafkaConfig {
        brokers: opts.kafka.clone(),
        ..KafkaConfig::default()
    };
    Ok(Run {
        opts,
        scenario,
        tenant,
        started,
        out,
        stack,
        store,
        kafka,
    })
}

/// How to start the pipeline for a run reporting into `out`, its bridge subscribed to
/// `tenants`.
fn stack_config(
    opts: &Options,
    scenario: &Scenario,
    out: &std::path::Path,
    tenants: Vec<String>,
) -> anyhow::Result<StackConfig> {
    let tansu = (!opts.external_kafka).then(|| {
        opts.tansu.clone().unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/iotp/tansu-0.6.0/bin/tansu")
        })
    });
    Ok(StackConfig {
        bin_dir: opts
            .bin_dir
            .canonicalize()
            .with_context(|| format!("binaries: {}", opts.bin_dir.display()))?,
        run_dir: out.to_path_buf(),
        mqtt_port: opts.mqtt_port,
        own_mosquitto: false,
        kafka: opts.kafka.clone(),
        tansu,
        engine: opts.kafka_engine.clone().unwrap_or_else(|| "memory".into()),
        admin_port: opts.admin_port,
        api_port: opts.admin_port + 100,
        env: opts.service_env.clone(),
        tenants,
        amqp_uri: opts.amqp.clone(),
        chaos: scenario.chaos.clone(),
        repo: repo_of(&opts.scenario)?,
        tls: scenario
            .tls
            .then(|| scenario.ca_dir.clone().unwrap_or_else(|| out.join("pki"))),
        partitions: opts.partitions,
    })
}

/// The repository a scenario file (`load-tests/scenarios/x.toml`) is in; else the working
/// directory.
fn repo_of(scenario: &std::path::Path) -> anyhow::Result<PathBuf> {
    let file = scenario.canonicalize()?;
    Ok(match file.ancestors().nth(3) {
        Some(repo) if repo.join("dev/mosquitto.conf").exists() => repo.to_path_buf(),
        _ => std::env::current_dir()?,
    })
}

/// One message end to end before anything is measured: every consumer has joined its group
/// and every connection is open.
async fn warm_up(store: &SqliteStore, target: Target) -> anyhow::Result<()> {
    let tenant = target.tenant.clone();
    let tenant = tenant.as_str();
    let started = Instant::now();
    let scenario = Scenario {
        name: "warm-up".into(),
        devices: 1,
        messages_per_device: 1,
        ramp_up: Duration::ZERO,
        ..Scenario::default()
    };
    fleet::run(target, &scenario, plan::plan(&scenario), Arc::default()).await?;
    while store.message_count(Some(tenant)).await? < 1 {
        anyhow::ensure!(
            started.elapsed() < WARM_UP_WITHIN,
            "warm-up message not stored within 120 s: see the services' logs"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "iotp-load: warm-up message stored after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
