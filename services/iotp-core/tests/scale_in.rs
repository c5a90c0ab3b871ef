//! Scaling a stage in, against real Kafka (IOTP_TEST_KAFKA, Tansu locally): three replicas of
//! the runtime share a group on a 12-partition topic while records flow; two stop gracefully;
//! the survivor must own every partition within seconds, and nothing is lost or left
//! uncommitted.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iotp_core::consume::{self, StageIo};
use iotp_core::dead_letter::DeadLetterConfig;
use iotp_core::kafka::{consumer_lag, KafkaConfig};
use iotp_core::metrics::metrics;
use iotp_core::service::Context;
use iotp_core::stage::{Input, Output, Stage, StageError, Verdict};
use iotp_core::testkit::*;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

const PARTITIONS: i32 = 12;
/// How long the survivor may take to own every partition after the others stopped. Measured on
/// Tansu 0.6.0: 7-10 s, up to one heartbeat interval (3 s) before the survivor hears of the
/// rebalance, then Tansu holds a static member's JoinGroup 3 s and its SyncGroup 3 s. Without
/// the leave: 38 s (the session timeout, 30 s, then that rebalance).
const TAKEOVER_WITHIN: Duration = Duration::from_secs(25);

/// (replica, partition, sequence number) of every record a replica processed.
type Seen = Arc<Mutex<Vec<(usize, i32, u64)>>>;

/// Passes records through and notes which replica processed them.
struct Tagging {
    replica: usize,
    seen: Seen,
}

impl Stage for Tagging {
    const NAME: &'static str = "tagging";

    async fn process(&mut self, batch: &[Input<'_>]) -> Result<Vec<Verdict>, StageError> {
        let mut seen = self.seen.lock().unwrap();
        Ok(batch
            .iter()
            .map(|i| {
                seen.push((self.replica, i.partition, seq_of(i.payload)));
                Verdict::Emit(vec![Output::new(
                    i.key.unwrap_or_default(),
                    i.payload.to_vec(),
                )])
            })
            .collect())
    }
}

fn seq_of(payload: &[u8]) -> u64 {
    let text = std::str::from_utf8(payload).unwrap();
    text.split_once('/').unwrap().1.parse().unwrap()
}

fn context(replica: &str, shutdown: &CancellationToken) -> Context {
    test_context(replica, shutdown, Duration::from_secs(5))
}

/// One record per partition every 50 ms, payload `{partition}/{seq}`, until `stop`. `sent`
/// is the number of rounds Kafka confirmed.
async fn flow(topic: String, stop: CancellationToken, sent: Arc<AtomicU64>) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .create()
        .unwrap();
    let mut seq = 0u64;
    while !stop.is_cancelled() {
        let deliveries: Vec<_> = (0..PARTITIONS)
            .map(|p| {
                let payload = format!("{p}/{seq}");
                producer
                    .send_result(
                        FutureRecord::to(&topic)
                            .partition(p)
                            .key("k")
                            .payload(&payload),
                    )
                    .map_err(|(e, _)| e)
                    .unwrap()
            })
            .collect();
        for d in deliveries {
            d.await.unwrap().map_err(|(e, _)| e).unwrap();
        }
        seq += 1;
        sent.store(seq, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for(what: &str, within: Duration, done: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scaled_in_replica_hands_its_partitions_to_the_survivor_at_once() {
    // Quiet unless RUST_LOG asks (e.g. RUST_LOG=iotp_core=info shows each leave and its time).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let input = unique("test.scale.in.");
    let output = unique("test.scale.out.");
    create_topic(&input, PARTITIONS).await;
    create_topic(&output, 1).await;
    let io = StageIo {
        input_topics: vec![input.clone()],
        output_topic: output.clone(),
        group: unique("test-scale-"),
        batch_max: 100,
        dead_letter: DeadLetterConfig {
            amqp_uri: amqp_uri(),
            exchange: "unused".into(),
            ..Default::default()
        },
        ..StageIo::default()
    };
    let kafka = KafkaConfig {
        brokers: kafka_brokers(),
        ..KafkaConfig::default()
    };
    let seen: Seen = Arc::default();
    // Replica 0 joins first, so it is the group's leader (the first member to join is), and it
    // leaves with replica 1: Tansu 0.6.0 wedges a group whose leader leaves while it re-forms,
    // so the leader waits until the group has formed again before it leaves (`leave.rs`).
    let mut replicas = Vec::new();
    for r in 0..3 {
        let shutdown = CancellationToken::new();
        let stage = Tagging {
            replica: r,
            seen: seen.clone(),
        };
        let ctx = context(&format!("tagging-{r}"), &shutdown);
        let task = tokio::spawn(consume::run(ctx, kafka.clone(), io.clone(), stage));
        replicas.push((shutdown, task));
        if r == 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let (stop_flow, sent) = (CancellationToken::new(), Arc::new(AtomicU64::new(0)));
    let flowing = tokio::spawn(flow(input.clone(), stop_flow.clone(), sent.clone()));

    // All three own partitions: each has processed records.
    let owners = || -> BTreeSet<usize> { seen.lock().unwrap().iter().map(|s| s.0).collect() };
    let joined = wait_for("three replicas consuming", Duration::from_secs(30), || {
        owners().len() == 3
    })
    .await;

    // Scale in: two replicas stop gracefully, together (a StatefulSet with the Parallel pod
    // policy stops them at once).
    let stopping = Instant::now();
    let (survivor, survivor_task) = replicas.pop().unwrap();
    let leaving = replicas;
    for (shutdown, _) in &leaving {
        shutdown.cancel();
    }
    for (_, task) in leaving {
        task.await.unwrap().unwrap();
    }
    let stopped = stopping.elapsed();
    let left = metrics()
        .consumer_group_leaves_total
        .with_label_values(&["tagging", "left"])
        .get();
    assert_eq!(left, 2, "both leaves confirmed by the coordinator");
    let first_after = sent.load(Ordering::SeqCst) + 1;

    // Every partition's records produced after the stop reach the survivor.
    let took_over = wait_for(
        "the survivor consuming every partition",
        TAKEOVER_WITHIN,
        || {
            let partitions: BTreeSet<i32> = seen
                .lock()
                .unwrap()
                .iter()
                .filter(|&&(r, _, seq)| r == 2 && seq >= first_after)
                .map(|s| s.1)
                .collect();
            partitions.len() == PARTITIONS as usize
        },
    )
    .await;
    stop_flow.cancel();
    flowing.await.unwrap();
    let rounds = sent.load(Ordering::SeqCst);

    // Nothing lost: every record was processed and its output confirmed.
    let expected: BTreeSet<(i32, u64)> = (0..PARTITIONS)
        .flat_map(|p| (0..rounds).map(move |s| (p, s)))
        .collect();
    let out = read_topic(&output, Duration::from_secs(30), |r| {
        r.len() >= expected.len()
    })
    .await;
    let delivered: BTreeSet<(i32, u64)> = out
        .iter()
        .map(|m| {
            let text = std::str::from_utf8(m.payload().unwrap()).unwrap();
            let (p, s) = text.split_once('/').unwrap();
            (p.parse().unwrap(), s.parse().unwrap())
        })
        .collect();
    assert_eq!(
        expected.difference(&delivered).count(),
        0,
        "records lost: {:?}",
        expected.difference(&delivered).take(10).collect::<Vec<_>>()
    );

    // Nothing left uncommitted once the survivor stops too.
    survivor.cancel();
    survivor_task.await.unwrap().unwrap();
    assert_eq!(consumer_lag(&kafka, &io.group, &input).await.unwrap(), 0);

    let mut per_replica: BTreeMap<usize, usize> = BTreeMap::new();
    for s in seen.lock().unwrap().iter() {
        *per_replica.entry(s.0).or_default() += 1;
    }
    eprintln!(
        "scale-in 3 -> 1: all consuming after {joined:?}; two stopped in {stopped:?}; the survivor \
         consumed every partition {took_over:?} later; {} records, {} processed (per replica {per_replica:?})",
        expected.len(),
        seen.lock().unwrap().len()
    );
}
