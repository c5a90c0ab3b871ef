//! iotp-load: run a scenario through the whole pipeline and prove what happened.
//!
//! Starts a Kafka-protocol broker of its own (Tansu, in-memory engine) and the six services
//! (as child processes, for their CPU and memory), drives the scenario's fleet over MQTT,
//! waits until the store and the dead-letter archive have settled, audits the result against
//! the PUBACK ledger, measures the forward-only ceiling on the same broker, and writes
//! `report.md`, `report.json` and plots. Exit 0 only if the audit passed and every service
//! stopped cleanly.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use iotp_core::kafka::{consumer_lag, count_records, KafkaConfig};
use iotp_core::probe::{histogram_quantile, label_values, sample_sum};
use iotp_core::store::sqlite::SqliteStore;
use iotp_core::store::{DeadLetterArchive, LetterFilter, ReadingStore, TwinStore};
use iotp_core::topology::topology;
use iotp_simulator::audit::{audit, Audit};
use iotp_simulator::fleet::{self, now_millis, FleetRun, Progress, Target};
use iotp_simulator::plan::{self, Expected, Fault};
use iotp_simulator::report::{self, Cpu, FleetSummary, Machine, Memory, Report, StageLatency};
use iotp_simulator::scenario::Scenario;
use iotp_simulator::stack::{self, Stack, StackConfig};
use iotp_simulator::{ceiling, device};

/// One reading per process: (name, value).
type PerProcess<T> = Vec<(String, T)>;

#[derive(Debug, Parser)]
#[command(about = "Run a load-test scenario through the whole pipeline, audit it, report")]
struct Args {
    /// Scenario file.
    #[arg(long, default_value = "load-tests/scenarios/standard.toml")]
    scenario: PathBuf,
    /// Report directory (default: load-tests/reports/<scenario>-<time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where the service binaries are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Mosquitto port.
    #[arg(long, default_value_t = 1884)]
    mqtt_port: u16,
    /// Kafka bootstrap for the run's own broker (or an external one).
    #[arg(long, default_value = "127.0.0.1:9094")]
    kafka: String,
    /// RabbitMQ (the run declares, and deletes after, its own dead-letter exchange and queues).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
    /// Tansu binary (default: ~/.cache/iotp/tansu-0.6.0/bin/tansu).
    #[arg(long)]
    tansu: Option<PathBuf>,
    /// Storage engine of the run's own Tansu: `memory` (throughput runs: closer to Kafka's
    /// speed) or `sqlite`. See docs/performance.md for what each did under load here.
    #[arg(long, default_value = "memory", value_parser = ["sqlite", "memory"])]
    kafka_engine: String,
    /// Use the broker already running at --kafka instead of starting one.
    #[arg(long)]
    external_kafka: bool,
    /// First admin port of the services.
    #[arg(long, default_value_t = 9301)]
    admin_port: u16,
    /// Override the scenario's fleet-wide rate, msgs/s (e.g. half the measured maximum, for
    /// latency at a sustainable load).
    #[arg(long)]
    rate: Option<u64>,
    /// Skip the ceiling measurement.
    #[arg(long)]
    no_ceiling: bool,
    /// No progress bar (CI logs).
    #[arg(long)]
    quiet: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("iotp-load: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let mut scenario = Scenario::load(&args.scenario)?;
    if let Some(rate) = args.rate {
        scenario.rate = rate;
        scenario.rate_per_device = 0.0;
        scenario.resolve();
    }
    let started_wall = std::time::SystemTime::now();
    let unix = started_wall
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let tenant = if scenario.tenant.is_empty() {
        format!("load-{}-{unix}", scenario.name)
    } else {
        scenario.tenant.clone()
    };
    let warmup_tenant = format!("{tenant}-warmup");
    let stamp = humantime::format_rfc3339_seconds(started_wall).to_string();
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "load-tests/reports/{}-{}",
            scenario.name,
            stamp.replace(':', "")
        ))
    });
    std::fs::create_dir_all(&out)?;
    let out = out.canonicalize()?;
    let plans = plan::plan(&scenario);
    let registry = out.join("registry.toml");
    std::fs::write(
        &registry,
        device::registry_toml(&tenant, scenario.devices, scenario.devices)
            + &format!("\n[[devices]]\ntenant = \"{warmup_tenant}\"\nid = \"dev-000000\"\nprofile = \"energy-meter-v1\"\n"),
    )?;
    let tansu = (!args.external_kafka).then(|| {
        args.tansu.clone().unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/iotp/tansu-0.6.0/bin/tansu")
        })
    });
    let cfg = StackConfig {
        bin_dir: args
            .bin_dir
            .canonicalize()
            .with_context(|| format!("binaries: {}", args.bin_dir.display()))?,
        run_dir: out.clone(),
        mqtt_port: args.mqtt_port,
        kafka: args.kafka.clone(),
        tansu: tansu.clone(),
        engine: args.kafka_engine.clone(),
        admin_port: args.admin_port,
        api_port: args.admin_port + 100,
        env: Vec::new(),
        tenants: vec![tenant.clone(), warmup_tenant.clone()],
        amqp_uri: args.amqp.clone(),
    };
    println!(
        "iotp-load: scenario {} ({} devices × {} messages), tenant {tenant}, report in {}",
        scenario.name,
        scenario.devices,
        scenario.messages_per_device,
        out.display()
    );
    let mut stack = Stack::start(&cfg, &registry).await?;
    println!(
        "iotp-load: pipeline ready (services' logs in {})",
        out.join("logs").display()
    );
    let store = SqliteStore::open(&stack.store_path)?;
    warm_up(&store, &warmup_tenant, args.mqtt_port).await?;

    // Memory sampled every second while the run lasts.
    let samples: Arc<Mutex<Vec<PerProcess<u64>>>> = Arc::default();
    let pids = stack.processes();
    let sampler = {
        let samples = samples.clone();
        tokio::spawn(async move {
            loop {
                let row = stack::per_process(&pids, stack::rss_bytes);
                if let Ok(mut s) = samples.lock() {
                    s.push(row);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    let progress = Arc::new(Progress::default());
    let total_publishes: u64 = plans
        .iter()
        .map(|p| {
            p.steps
                .iter()
                .map(|s| match s {
                    plan::Step::Offline { count, .. } => *count,
                    _ => 1,
                })
                .sum::<u64>()
        })
        .sum();
    let bar = (!args.quiet).then(|| {
        let bar = indicatif::ProgressBar::new(total_publishes);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} acked {per_sec} · {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    });
    let ticker = {
        let progress = progress.clone();
        let bar = bar.clone();
        let upserter = stack.service("upserter").map(|s| s.admin_port);
        tokio::spawn(async move {
            let mut last_print = Instant::now();
            loop {
                let acked = progress.acked.load(Ordering::Relaxed);
                let stored = match upserter {
                    Some(port) => stack::scrape(port)
                        .await
                        .map(|m| sample_sum(&m, "iotp_messages_stored_total", &[]))
                        .unwrap_or(0.0),
                    None => 0.0,
                };
                let msg = format!(
                    "stored {stored:.0} · reconnects {}",
                    progress.connection_errors.load(Ordering::Relaxed)
                );
                match &bar {
                    Some(bar) => {
                        bar.set_position(acked);
                        bar.set_message(msg);
                    }
                    None if last_print.elapsed() > Duration::from_secs(10) => {
                        println!("iotp-load: acked {acked} · {msg}");
                        last_print = Instant::now();
                    }
                    None => {}
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    let cpu_before = stack.cpu();
    let target = Target {
        host: "127.0.0.1".into(),
        port: args.mqtt_port,
        tenant: tenant.clone(),
        seq_start: 0,
        topic_prefix: "iot".into(),
    };
    let fleet = fleet::run(target, &scenario, plans, progress.clone()).await?;
    if let Some(bar) = &bar {
        bar.set_position(progress.acked.load(Ordering::Relaxed));
    }
    let (owed_store, owed_letters) = owed(&fleet);
    let settled = settle(
        &store,
        &tenant,
        owed_store,
        owed_letters,
        scenario.stall_timeout,
    )
    .await?;
    let kafka = KafkaConfig {
        brokers: args.kafka.clone(),
        ..KafkaConfig::default()
    };
    let lag = drain_groups(&kafka, scenario.stall_timeout).await?;
    let drained_at = now_millis();
    ticker.abort();
    if let Some(bar) = bar {
        bar.finish_with_message(format!("stored {}", settled.0));
    }
    let cpu_after = stack.cpu();
    sampler.abort();

    // Per-stage latency from the services' own histograms.
    let mut stages = Vec::new();
    for s in &stack.services {
        let Some(text) = stack::scrape(s.admin_port).await else {
            continue;
        };
        for stage in label_values(&text, "iotp_delivery_seconds_bucket", "stage") {
            let label = format!("stage=\"{stage}\"");
            let q = |q| {
                histogram_quantile(&text, "iotp_delivery_seconds", &[label.as_str()], q)
                    .unwrap_or(0.0)
                    * 1000.0
            };
            stages.push(StageLatency {
                stage,
                p50: q(0.5),
                p95: q(0.95),
                p99: q(0.99),
            });
        }
    }

    // What each hop counted: duplicates between hops show here (they are removed at the store).
    let mut hops = Vec::new();
    for (service, metric) in [
        ("mqtt-bridge", "iotp_mqtt_received_messages_total"),
        ("mqtt-bridge", "iotp_mqtt_acked_messages_total"),
        ("mqtt-bridge", "iotp_kafka_produced_messages_total"),
        ("parser", "iotp_kafka_produced_messages_total"),
        ("enricher", "iotp_kafka_produced_messages_total"),
        ("parser", "iotp_consumer_offset_gaps_total"),
        ("enricher", "iotp_consumer_offset_gaps_total"),
        ("upserter", "iotp_consumer_offset_gaps_total"),
        ("parser", "iotp_consumer_rereads_total"),
        ("enricher", "iotp_consumer_rereads_total"),
        ("upserter", "iotp_consumer_rereads_total"),
        ("upserter", "iotp_messages_stored_total"),
        ("upserter", "iotp_duplicates_removed_total"),
    ] {
        if let Some(s) = stack.service(service) {
            let text = stack::scrape(s.admin_port).await.unwrap_or_default();
            hops.push((
                format!("{service}: {metric}"),
                sample_sum(&text, metric, &[]) as i64,
            ));
        }
    }
    for schema in ["raw-envelope", "telemetry", "enriched"] {
        let topic = iotp_core::topology::topic_name(schema);
        hops.push((
            format!("records on {topic}"),
            count_records(&kafka, &topic).await.unwrap_or(-1),
        ));
    }

    println!("iotp-load: auditing");
    let stored = all_stored(&store, &tenant).await?;
    let letters = store
        .letters(&LetterFilter {
            tenant: Some(tenant.clone()),
            include_replayed: true,
            limit: 10_000_000,
            ..LetterFilter::default()
        })
        .await?;
    let mut twins = HashMap::new();
    for d in fleet.devices.iter().filter(|d| d.registered) {
        if let Some(t) = store.twin(&tenant, &d.id).await? {
            twins.insert(d.id.clone(), t);
        }
    }
    let audit = audit(&fleet, &stored, &letters, &twins);
    let exit_codes = stack.stop_services().await;

    // The audit's report first: the ceiling runs after, on the same broker, and may fail.
    let mut report = build_report(
        &scenario,
        tenant.clone(),
        stamp,
        &args,
        &fleet,
        &progress,
        audit,
        (drained_at, lag),
        hops,
        (&cpu_before, &cpu_after),
        &samples.lock().map(|s| s.clone()).unwrap_or_default(),
        stages,
        exit_codes,
    );
    report.write(&out)?;
    if scenario.ceiling && !args.no_ceiling {
        println!("iotp-load: measuring the forward-only ceiling on the same brokers");
        let mut c = ceiling::measure(&kafka, 3, Duration::from_secs(300)).await?;
        // The MQTT leg: the same fleet and messages (no faults) to topics no one bridges, as
        // fast as the broker acknowledges (a paced scenario's rate is not a ceiling).
        let plain = Scenario {
            faults: Default::default(),
            heartbeat_every: 0,
            rate: 0,
            rate_per_device: 0.0,
            duration: None,
            ..scenario.clone()
        };
        let target = Target {
            host: "127.0.0.1".into(),
            port: args.mqtt_port,
            tenant: tenant.clone(),
            seq_start: 0,
            topic_prefix: "ceiling".into(),
        };
        let mqtt = fleet::run(target, &plain, plan::plan(&plain), Arc::default()).await?;
        c.mqtt_rate = Some(
            mqtt.acked() as f64 / ((mqtt.finished_at - mqtt.started_at).max(1) as f64 / 1000.0),
        );
        report.efficiency =
            Some(report.sustained_rate / c.rate.min(c.mqtt_rate.unwrap_or(f64::INFINITY)));
        report.ceiling = Some(c);
        report.write(&out)?;
    }
    stack.stop_broker().await;
    println!("\n{}", report.markdown());
    println!("iotp-load: report in {}", out.join("report.md").display());
    Ok(report.passed)
}

/// One message end to end before anything is measured: every consumer has joined its group
/// and every connection is open.
async fn warm_up(store: &SqliteStore, tenant: &str, mqtt_port: u16) -> anyhow::Result<()> {
    let started = Instant::now();
    let scenario = Scenario {
        name: "warm-up".into(),
        devices: 1,
        messages_per_device: 1,
        ramp_up: Duration::ZERO,
        ..Scenario::default()
    };
    let target = Target {
        host: "127.0.0.1".into(),
        port: mqtt_port,
        tenant: tenant.to_string(),
        seq_start: 0,
        topic_prefix: "iot".into(),
    };
    fleet::run(target, &scenario, plan::plan(&scenario), Arc::default()).await?;
    while store.message_count(Some(tenant)).await? < 1 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
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

/// Wait until every consumer group of the pipeline has consumed everything (lag 0), or
/// nothing moved for `stall`; the lag left per group.
async fn drain_groups(kafka: &KafkaConfig, stall: Duration) -> anyhow::Result<Vec<(String, i64)>> {
    let mut last = i64::MAX;
    let mut moved = Instant::now();
    loop {
        let mut lags = Vec::new();
        for c in &topology().kafka.consumers {
            let mut lag = 0;
            for topic in &c.topics {
                lag += consumer_lag(kafka, &c.group, topic).await?;
            }
            lags.push((c.group.clone(), lag));
        }
        let total: i64 = lags.iter().map(|(_, l)| l).sum();
        if total == 0 {
            return Ok(lags);
        }
        if total != last {
            last = total;
            moved = Instant::now();
        } else if moved.elapsed() > stall {
            eprintln!("iotp-load: consumer lag stuck for {stall:?}: {lags:?}");
            return Ok(lags);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Acknowledged messages owed to the store and to the archive.
fn owed(fleet: &FleetRun) -> (u64, u64) {
    let (mut store, mut letters) = (0, 0);
    for d in &fleet.devices {
        for (i, acks) in d.acks.iter().enumerate() {
            if *acks == 0 {
                continue;
            }
            match d.faults[i].map(Fault::expected).unwrap_or(Expected::Stored) {
                Expected::Stored => store += 1,
                Expected::DeadLetter(_) => letters += 1,
            }
        }
    }
    (store, letters)
}

/// Wait until the store and the archive hold what is owed, or nothing moved for `stall`.
async fn settle(
    store: &SqliteStore,
    tenant: &str,
    owed_store: u64,
    owed_letters: u64,
    stall: Duration,
) -> anyhow::Result<(u64, u64)> {
    let mut last = (u64::MAX, u64::MAX);
    let mut moved = Instant::now();
    loop {
        let stored = store.message_count(Some(tenant)).await?;
        let letters = store
            .letters(&LetterFilter {
                tenant: Some(tenant.into()),
                include_replayed: true,
                limit: 10_000_000,
                ..LetterFilter::default()
            })
            .await?
            .len() as u64;
        if stored >= owed_store && letters >= owed_letters {
            return Ok((stored, letters));
        }
        if (stored, letters) != last {
            last = (stored, letters);
            moved = Instant::now();
        } else if moved.elapsed() > stall {
            eprintln!("iotp-load: nothing moved for {stall:?}: {stored}/{owed_store} stored, {letters}/{owed_letters} dead letters");
            return Ok((stored, letters));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn all_stored(
    store: &SqliteStore,
    tenant: &str,
) -> anyhow::Result<Vec<iotp_core::store::StoredMessage>> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store.stored_messages(tenant, after.clone(), 20_000).await?;
        let Some(last) = page.last() else { break };
        after = Some((last.device_id.clone(), last.seq_no));
        out.extend(page);
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    scenario: &Scenario,
    tenant: String,
    started: String,
    args: &Args,
    fleet: &FleetRun,
    progress: &Progress,
    audit: Audit,
    drained: (i64, Vec<(String, i64)>),
    hops: PerProcess<i64>,
    cpu: (&PerProcess<f64>, &PerProcess<f64>),
    samples: &[PerProcess<u64>],
    stages: Vec<StageLatency>,
    exit_codes: Vec<(String, Option<i32>)>,
) -> Report {
    let stored = audit.expected_stored.max(1) as f64;
    let cpu: Vec<Cpu> = cpu
        .1
        .iter()
        .map(|(name, after)| {
            let before = cpu
                .0
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| *v)
                .unwrap_or(0.0);
            let seconds = after - before;
            Cpu {
                process: name.clone(),
                seconds,
                us_per_message: seconds * 1e6 / stored,
            }
        })
        .collect();
    let services_us_per_message = cpu
        .iter()
        .filter(|c| c.process != "tansu")
        .map(|c| c.us_per_message)
        .sum();
    let mib = |b: u64| b as f64 / 1024.0 / 1024.0;
    let memory: Vec<Memory> = samples
        .first()
        .map(|row| row.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|name| {
            let series: Vec<u64> = samples
                .iter()
                .filter_map(|row| row.iter().find(|(n, _)| *n == name).map(|(_, v)| *v))
                .collect();
            let mut second_half: Vec<u64> = series[series.len() / 2..].to_vec();
            second_half.sort_unstable();
            Memory {
                process: name,
                max_mib: mib(series.iter().copied().max().unwrap_or(0)),
                steady_mib: mib(second_half.get(second_half.len() / 2).copied().unwrap_or(0)),
            }
        })
        .collect();
    let seconds = (fleet.finished_at - fleet.started_at) as f64 / 1000.0;
    let sustained_rate = audit.expected_stored as f64
        / ((audit.last_stored_at - fleet.started_at).max(1) as f64 / 1000.0);
    let passed = audit.passed()
        && exit_codes.iter().all(|(_, c)| *c == Some(0))
        && drained.1.iter().all(|(_, lag)| *lag == 0);
    Report {
        scenario: scenario.clone(),
        tenant,
        started,
        machine: Machine::this(),
        kafka: if args.external_kafka {
            format!("external broker at {}", args.kafka)
        } else {
            format!(
                "Tansu 0.6.0, {} engine, at {}",
                args.kafka_engine, args.kafka
            )
        },
        acks_per_second: progress
            .acks_per_second
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default(),
        fleet: FleetSummary {
            devices: fleet.devices.len(),
            published: fleet.published(),
            acked: fleet.acked(),
            seconds,
            ack_rate: fleet.acked() as f64 / seconds.max(0.001),
            connection_errors: progress.connection_errors.load(Ordering::Relaxed),
            refused: fleet.devices.iter().map(|d| d.refused).sum(),
            abandoned: fleet.devices.iter().map(|d| d.abandoned).sum(),
        },
        steady_rate: report::steady_rate(&audit),
        drain_seconds: ((audit.last_stored_at - fleet.finished_at) as f64 / 1000.0).max(0.0),
        groups_drained_seconds: (drained.0 - fleet.finished_at) as f64 / 1000.0,
        lag_left: drained.1,
        hops,
        sustained_rate,
        ceiling: None,
        efficiency: None,
        cpu,
        services_us_per_message,
        memory,
        stages,
        exit_codes,
        passed,
        audit,
    }
}
