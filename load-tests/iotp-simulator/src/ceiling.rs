//! The ceiling the infrastructure allows: the run's own raw records carried through as many
//! Kafka hops as the pipeline has (consume raw → produce; consume → produce; consume), by the
//! same runtime with the same client settings (batching, idempotent producer, acks=all,
//! offsets stored after delivery) and a stage that does no work; and the MQTT leg alone, the
//! same fleet publishing to topics no one bridges. The pipeline's rate over the lower of the
//! two is its efficiency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use iotp_contract::topology::{topic_name, topology, TopicSpec};
use iotp_core::admin::Health;
use iotp_core::consume::{self, StageIo};
use iotp_core::kafka::{count_records, ensure_topics, KafkaConfig};
use iotp_core::retry::Backoff;
use iotp_core::service::Context;
use iotp_core::stage::{Input, Output, Stage, StageError, Verdict};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::fleet::{self, Target};
use crate::plan;
use crate::scenario::Scenario;
use crate::stack::machine_busy_seconds;

/// What the ceiling run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    /// Records on the raw topic (a bundle's items counted one by one).
    pub records: u64,
    /// Records the last hop counted (less than `records` if the broker lost some or the
    /// time ran out).
    pub carried: u64,
    /// Consuming hops.
    pub hops: usize,
    /// Seconds from the first hop's first record until the last hop had them all (group
    /// joins excluded).
    pub seconds: f64,
    /// Records per second.
    pub rate: f64,
    /// The MQTT leg alone: the same fleet publishing the same messages (QoS 1) to topics no
    /// one subscribes, PUBACKs per second.
    pub mqtt_rate: Option<f64>,
    /// What the Kafka leg cost the whole machine (group joins included).
    pub machine: LegCost,
    /// What the MQTT leg cost the whole machine.
    pub mqtt_machine: Option<LegCost>,
}

/// The whole machine's CPU over one leg of the ceiling (every process, all CPUs: on a machine
/// shared by the fleet, the brokers and the services, what a leg costs is what the pipeline
/// cannot spend on its own work while it does the same).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LegCost {
    /// Busy CPU seconds, all CPUs together.
    pub busy_seconds: f64,
    /// Wall seconds the reading spans.
    pub wall_seconds: f64,
    /// Busy CPU per record (message) carried, µs.
    pub us_per_record: f64,
    /// CPUs busy on average.
    pub cores: f64,
}

/// Reads the machine's busy CPU from [`begin`](Self::begin) to [`end`](Self::end).
struct Meter(f64, Instant);

impl Meter {
    fn begin() -> Self {
        Self(machine_busy_seconds(), Instant::now())
    }

    fn end(self, records: u64) -> LegCost {
        let busy_seconds = (machine_busy_seconds() - self.0).max(0.0);
        let wall_seconds = self.1.elapsed().as_secs_f64();
        LegCost {
            busy_seconds,
            wall_seconds,
            us_per_record: busy_seconds * 1e6 / records.max(1) as f64,
            cores: busy_seconds / wall_seconds.max(f64::EPSILON),
        }
    }
}

/// Forwards every record unchanged; the first hop notes when the first record arrived.
struct Forward(Option<(Arc<OnceLock<Instant>>, Arc<Taken>)>);

/// What the first hop took of the raw topic: Kafka records, and the records they carry (a
/// bundle carries several, `kafka.bundle_max_bytes`).
#[derive(Default)]
struct Taken {
    kafka_records: AtomicU64,
    carried: AtomicU64,
}

impl Stage for Forward {
    const NAME: &'static str = "ceiling-forward";

    async fn process(&mut self, batch: &[Input<'_>]) -> Result<Vec<Verdict>, StageError> {
        if let Some((first, taken)) = &self.0 {
            first.get_or_init(Instant::now);
            let records = batch.iter().filter(|i| i.item.unwrap_or(0) == 0).count();
            taken
                .kafka_records
                .fetch_add(records as u64, Ordering::Relaxed);
            taken
                .carried
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        Ok(batch
            .iter()
            .map(|i| {
                Verdict::Emit(vec![Output::new(
                    i.key.unwrap_or_default(),
                    i.payload.to_vec(),
                )])
            })
            .collect())
    }
}

/// Counts, forwards nothing.
struct Count(Arc<AtomicU64>);

impl Stage for Count {
    const NAME: &'static str = "ceiling-count";

    async fn process(&mut self, batch: &[Input<'_>]) -> Result<Vec<Verdict>, StageError> {
        self.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(batch.iter().map(|_| Verdict::Emit(Vec::new())).collect())
    }
}

/// Carry the raw topic through `hops` consuming hops, each topic with as many partitions as
/// the raw topic was created with (`partitions`, or the topology's); `timeout` bounds the wait.
pub async fn measure(
    kafka: &KafkaConfig,
    hops: usize,
    partitions: Option<i32>,
    timeout: Duration,
) -> anyhow::Result<Ceiling> {
    let raw = topic_name("raw-envelope");
    let partitions = partitions.unwrap_or_else(|| {
        topology()
            .kafka
            .topics
            .iter()
            .find(|t| t.name == raw)
            .map_or(1, |t| t.partitions)
    });
    let records = count_records(kafka, &raw).await? as u64;
    let run = uuid::Uuid::now_v7().simple().to_string();
    let names: Vec<String> = (1..hops).map(|h| format!("ceiling.{run}.h{h}")).collect();
    let specs: Vec<TopicSpec> = names
        .iter()
        .map(|name| TopicSpec {
            name: name.clone(),
            partitions,
            schema: "raw-envelope".into(),
            retention_hours: 1,
            about: "ceiling measurement".into(),
        })
        .collect();
    ensure_topics(&kafka.admin("ceiling")?, &specs, 1).await?;
    let shutdown = CancellationToken::new();
    let counted = Arc::new(AtomicU64::new(0));
    let meter = Meter::begin();
    let started = Instant::now();
    let first = Arc::new(OnceLock::new());
    let taken = Arc::new(Taken::default());
    let mut tasks = Vec::new();
    for hop in 0..hops {
        let input = if hop == 0 {
            raw.clone()
        } else {
            names[hop - 1].clone()
        };
        let io = StageIo {
            input_topics: vec![input],
            output_topic: names.get(hop).cloned().unwrap_or_default(),
            group: format!("ceiling-{run}-{hop}"),
            ..StageIo::default()
        };
        let ctx = Context {
            service: "ceiling",
            replica: format!("ceiling-{run}-{hop}"),
            shutdown: shutdown.clone(),
            health: Health::default(),
            backoff: Backoff::default(),
        };
        let kafka = kafka.clone();
        let counted = counted.clone();
        let first = (hop == 0).then(|| (first.clone(), taken.clone()));
        tasks.push(tokio::spawn(async move {
            if hop + 1 == hops {
                consume::run(ctx, kafka, io, Count(counted)).await
            } else {
                consume::run(ctx, kafka, io, Forward(first)).await
            }
        }));
    }
    let deadline = started + timeout;
    // Done once the first hop took every raw Kafka record and the last counted all they carry.
    let all_in = || {
        taken.kafka_records.load(Ordering::Relaxed) >= records
            && counted.load(Ordering::Relaxed) >= taken.carried.load(Ordering::Relaxed).max(records)
    };
    while !all_in() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Records carried, not Kafka records: the same unit as the pipeline's rate.
    let records = taken.carried.load(Ordering::Relaxed).max(records);
    let seconds = first
        .get()
        .copied()
        .unwrap_or(started)
        .elapsed()
        .as_secs_f64();
    let machine = meter.end(records);
    shutdown.cancel();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }
    let carried = counted.load(Ordering::Relaxed);
    if carried < records {
        eprintln!(
            "iotp-load: the ceiling run carried {carried} of {records} records within {timeout:?}"
        );
    }
    Ok(Ceiling {
        records,
        carried,
        hops,
        seconds,
        rate: carried as f64 / seconds,
        mqtt_rate: None,
        machine,
        mqtt_machine: None,
    })
}

/// The MQTT leg: the scenario's fleet and messages without faults or heartbeats, to `target`
/// (topics no one bridges), as fast as the broker acknowledges (a paced scenario's rate is not
/// a ceiling); PUBACKs per second, and what the leg cost the machine.
pub async fn mqtt_rate(target: Target, scenario: &Scenario) -> anyhow::Result<(f64, LegCost)> {
    let plain = Scenario {
        faults: Default::default(),
        heartbeat_every: 0,
        rate: 0,
        rate_per_device: 0.0,
        duration: None,
        ..scenario.clone()
    };
    let meter = Meter::begin();
    let run = fleet::run(target, &plain, plan::plan(&plain), Arc::default()).await?;
    Ok((run.ack_rate(), meter.end(run.acked())))
}
