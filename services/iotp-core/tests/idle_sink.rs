//! An idle producer costs nothing: the thread that polls the sink's producer for delivery
//! reports sleeps while there are none. rdkafka 0.39 truncated its poll timeouts to whole
//! milliseconds, so that thread spun through the last millisecond of every 100 ms pass, about
//! 1% of a core per service with or without traffic (the patch in `vendor/rdkafka`). A test
//! binary of its own: no other test's producer runs in this process while it measures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use iotp_core::kafka::{KafkaConfig, KafkaSink};
use iotp_core::retry::Backoff;
use iotp_core::stage::Output;
use iotp_core::testkit::{create_topic, kafka_brokers, unique};
use tokio_util::sync::CancellationToken;

/// CPU time, ns, of this process's threads named `name` (as the kernel keeps it, 15 bytes),
/// from `/proc/self/task/*/schedstat`: the scheduler's own count, not 10 ms ticks.
fn cpu_ns_of_threads(name: &str) -> (u64, usize) {
    let mut total = 0;
    let mut threads = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if comm.trim_end() != name {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(dir.join("schedstat")) else {
            continue;
        };
        total += stat
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .unwrap_or(0);
        threads += 1;
    }
    (total, threads)
}

#[tokio::test]
async fn an_idle_sink_does_not_spin_its_polling_thread() {
    let topic = unique("idle-sink-");
    create_topic(&topic, 1).await;
    let kafka = KafkaConfig {
        brokers: kafka_brokers(),
        ..KafkaConfig::default()
    };
    let backoff = Backoff {
        min: Duration::from_millis(200),
        max: Duration::from_millis(500),
        give_up_after: Duration::from_secs(60),
    };
    let sink = KafkaSink::new(&kafka, "idle-sink-test", &topic, backoff).unwrap();
    // Connected, the topic's leader known: what a stage's producer is between batches.
    let out = Output::new(b"k".to_vec(), b"v".to_vec());
    let refused = sink
        .send_all(&[&out], &CancellationToken::new())
        .await
        .unwrap();
    assert!(refused.is_empty());

    let name = "producer pollin";
    let (before, threads) = cpu_ns_of_threads(name);
    assert_eq!(threads, 1, "one polling thread, named {name:?}");
    let idle = Duration::from_secs(4);
    tokio::time::sleep(idle).await;
    let (after, _) = cpu_ns_of_threads(name);
    let used = Duration::from_nanos(after - before);
    eprintln!("idle polling thread: {used:?} of CPU in {idle:?}");
    // Sleeping, the thread wakes ten times a second: 2.0–2.5 ms in 4 s here (a debug
    // build). Spinning through the last millisecond of each pass, it used 36 ms.
    assert!(
        used < Duration::from_millis(10),
        "the idle polling thread used {used:?} of CPU in {idle:?}"
    );
}
