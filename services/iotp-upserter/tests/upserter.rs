//! The upserter binary against real Kafka with the embedded store: SIGKILL at several points of
//! a 100,000-message run, then full replays: every message stored exactly once.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iotp_contract::{Codec, EnrichedTelemetry, Header, Reading};
use iotp_core::testkit::*;
use iotp_store::sqlite::SqliteStore;
use iotp_store::{ReadingStore, TwinStore};

const DEVICES: i64 = 100;
const PER_DEVICE: i64 = 1_000;

fn record(device: i64, seq_no: i64) -> (Vec<u8>, Vec<u8>) {
    let r = EnrichedTelemetry {
        header: Header {
            msg_id: format!("d{device}-{seq_no}"),
            tenant: "acme".into(),
            device_id: format!("d{device}"),
            seq_no,
            produced_at: 1_700_000_000_000 + seq_no * 1000,
            received_at: 1_700_000_000_000 + seq_no * 1000 + 3,
            schema_version: 1,
        },
        kind: "telemetry".into(),
        readings: vec![Reading {
            metric: "energy".into(),
            value: seq_no as f64,
            unit: Some("Wh".into()),
        }],
        site: Some("plant-1".into()),
        asset: None,
        profile: "meter".into(),
        firmware_version: None,
        tags: HashMap::new(),
    };
    (
        format!("acme/d{device}").into_bytes(),
        Codec::<EnrichedTelemetry>::latest()
            .unwrap()
            .encode(&r)
            .unwrap(),
    )
}

fn spawn(topic: &str, group: &str, store: &Path, exchange: &str) -> Child {
    spawn_on(topic, group, store, exchange, 0)
}

fn spawn_on(topic: &str, group: &str, store: &Path, exchange: &str, admin_port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_iotp-upserter"))
        .env("IOTP__COMMON__REPLICA", "upserter-0")
        .env(
            "IOTP__COMMON__ADMIN_LISTEN",
            format!("127.0.0.1:{admin_port}"),
        )
        .env("IOTP__COMMON__LOG_FORMAT", "text")
        .env("IOTP__KAFKA__BROKERS", kafka_brokers())
        .env("IOTP__IO__INPUT_TOPICS", format!("[\"{topic}\"]"))
        .env("IOTP__IO__GROUP", group)
        .env("IOTP__IO__DEAD_LETTER__EXCHANGE", exchange)
        .env("IOTP__IO__DEAD_LETTER__AMQP_URI", amqp_uri())
        .env("IOTP__STORE__PATH", store)
        // The test data is dated 2023: keep it past the default 180-day raw tier.
        .env("IOTP__STORE__RETENTION__RAW", "36500days")
        .env("IOTP__STORE__RETENTION__HOURLY", "36500days")
        .env("IOTP__STORE__RETENTION__DAILY", "36500days")
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

async fn wait_for(store: &SqliteStore, at_least: u64, timeout: Duration) -> u64 {
    let until = Instant::now() + timeout;
    loop {
        let n = store.message_count(Some("acme")).await.unwrap();
        if n >= at_least || Instant::now() > until {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_then_full_replays_store_each_message_once() {
    let total = (DEVICES * PER_DEVICE) as u64;
    let topic = unique("test.enriched.");
    create_topic(&topic, 4).await;
    let sink = dead_letter_sink().await;
    let exchange = sink.exchange.clone();
    let dir = std::env::temp_dir().join(unique("upserter-"));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("store.sqlite");
    let store = SqliteStore::create(&db).unwrap();
    // Every 10th message is sent twice (a device retry); seq 500 of every device never is (a gap).
    let mut records = Vec::new();
    for seq in 0..PER_DEVICE {
        for d in 0..DEVICES {
            if seq == 500 {
                continue;
            }
            records.push(record(d, seq));
            if seq % 10 == 0 {
                records.push(record(d, seq));
            }
        }
    }
    let unique_messages = total - DEVICES as u64;
    for chunk in records.chunks(20_000) {
        produce(&topic, chunk).await;
    }

    let group = unique("test-upserter-");
    let mut kills = Vec::new();
    // Kill at pseudo-random fill levels; each restart reclaims the partitions (static membership).
    for fraction in [0.13, 0.41, 0.77] {
        let mut child = spawn(&topic, &group, &db, &exchange);
        let reached = wait_for(
            &store,
            (unique_messages as f64 * fraction) as u64,
            Duration::from_secs(180),
        )
        .await;
        child.kill().unwrap();
        child.wait().unwrap();
        kills.push(reached);
    }
    let mut child = spawn(&topic, &group, &db, &exchange);
    let stored = wait_for(&store, unique_messages, Duration::from_secs(240)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sigterm(&mut child), Some(0));
    eprintln!("upserter: killed at {kills:?} stored messages; final {stored}");
    assert_eq!(
        store.message_count(Some("acme")).await.unwrap(),
        unique_messages,
        "stored = sent, after SIGKILLs"
    );
    assert_eq!(
        store.reading_count(Some("acme")).await.unwrap(),
        unique_messages,
        "one reading per message, no duplicates"
    );

    // Replay the whole topic from the earliest offset, twice: counts unchanged.
    for _ in 0..2 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = spawn_on(&topic, &unique("test-replay-"), &db, &exchange, port);
        // The replay has read the whole topic when every record was a duplicate.
        let mut duplicates = 0.0;
        for _ in 0..480 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            duplicates = metric(port, "iotp_duplicates_removed_total");
            if duplicates >= records.len() as f64 {
                break;
            }
        }
        assert_eq!(
            duplicates,
            records.len() as f64,
            "the replay read every record and stored none"
        );
        sigterm(&mut child);
        assert_eq!(
            store.message_count(Some("acme")).await.unwrap(),
            unique_messages,
            "replay changed the count"
        );
        assert_eq!(
            store.reading_count(Some("acme")).await.unwrap(),
            unique_messages
        );
    }

    // The gap at seq 500 reaches the twins (when the enricher has made one).
    store
        .apply(vec![iotp_store::Observation {
            tenant: "acme".into(),
            device_id: "d7".into(),
            seq_no: PER_DEVICE - 1,
            produced_at: 0,
            readings: vec![],
            firmware: None,
            config_version: None,
            heartbeat_secs: None,
        }])
        .await
        .unwrap();
    assert_eq!(
        store
            .update_seq_gaps(&[("acme".into(), "d7".into())])
            .await
            .unwrap(),
        1
    );
}

/// A metric of the upserter on `port` (0 while it does not answer).
fn metric(port: u16, name: &str) -> f64 {
    iotp_core::probe::blocking::get(port, "/metrics")
        .map_or(0.0, |r| iotp_core::probe::sample_sum(&r.body, name, &[]))
}
