//! The enricher binary against real Kafka and RabbitMQ, with the embedded store.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use iotp_contract::{Codec, DeadLetter, EnrichedTelemetry, Header, Reading, Telemetry};
use iotp_core::testkit::*;
use iotp_store::sqlite::SqliteStore;
use iotp_store::TwinStore;
use rdkafka::Message;

const REGISTRY: &str = r#"
[[devices]]
tenant = "acme"
id = "k-0"
profile = "meter"

[[devices]]
tenant = "acme"
id = "k-1"
profile = "meter"

[[devices]]
tenant = "acme"
id = "k-2"
profile = "meter"

[[devices]]
tenant = "acme"
id = "k-3"
profile = "meter"

[profiles.meter]
heartbeat_secs = 60
metrics = { energy = { unit = "Wh", min = 0.0, max = 1e12, cumulative = true }, location = { unit = "deg", min = -180.0, max = 180.0 } }

[[devices]]
tenant = "acme"
id = "m-1"
profile = "meter"
site = "plant-1"
pii = ["location"]
"#;

fn telemetry(device: &str, seq_no: i64, kind: &str) -> (Vec<u8>, Vec<u8>) {
    let t = Telemetry {
        header: Header {
            msg_id: format!("{device}-{seq_no}"),
            tenant: "acme".into(),
            device_id: device.into(),
            seq_no,
            produced_at: 1_700_000_000_000 + seq_no * 1000,
            received_at: 1_700_000_000_000 + seq_no * 1000 + 5,
            schema_version: 1,
        },
        kind: kind.into(),
        readings: if kind == "heartbeat" {
            vec![]
        } else {
            vec![
                Reading {
                    metric: "energy".into(),
                    value: seq_no as f64,
                    unit: Some("kWh".into()),
                },
                Reading {
                    metric: "location".into(),
                    value: 48.1,
                    unit: None,
                },
            ]
        },
        firmware_version: Some(format!("fw-{seq_no}")),
    };
    (
        format!("acme/{device}").into_bytes(),
        Codec::<Telemetry>::latest().unwrap().encode(&t).unwrap(),
    )
}

fn spawn(
    dir: &std::path::Path,
    input: &str,
    output: &str,
    exchange: &str,
    group: &str,
) -> std::process::Child {
    spawn_ticking(dir, input, output, exchange, group, "1h")
}

/// `tick` is how often the liveness check runs (long by default: these records are dated 2023).
fn spawn_ticking(
    dir: &std::path::Path,
    input: &str,
    output: &str,
    exchange: &str,
    group: &str,
    tick: &str,
) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_iotp-enricher"))
        .env("IOTP__IO__TICK_INTERVAL", tick)
        .env("IOTP__COMMON__REPLICA", "enricher-0")
        .env("IOTP__COMMON__ADMIN_LISTEN", "127.0.0.1:0")
        .env("IOTP__COMMON__LOG_FORMAT", "text")
        .env("IOTP__KAFKA__BROKERS", kafka_brokers())
        .env("IOTP__IO__INPUT_TOPICS", format!("[\"{input}\"]"))
        .env("IOTP__IO__OUTPUT_TOPIC", output)
        .env("IOTP__IO__GROUP", group)
        .env("IOTP__IO__DEAD_LETTER__EXCHANGE", exchange)
        .env("IOTP__IO__DEAD_LETTER__AMQP_URI", amqp_uri())
        .env("IOTP__REGISTRY_FILE", dir.join("registry.toml"))
        .env("IOTP__STORE__PATH", dir.join("store.sqlite"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enriches_quarantines_unknown_devices_and_keeps_the_twin_at_the_newest_state() {
    let (input, output) = (unique("test.validated."), unique("test.enriched."));
    create_topic(&input, 1).await;
    create_topic(&output, 2).await;
    let conn = iotp_core::amqp::connect(&amqp_uri()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let (exchange, queue) = (unique("test.dlx."), unique("test.dlq."));
    declare_exchange_and_queue(&channel, &exchange, &queue).await;
    let dir = std::env::temp_dir().join(unique("enricher-"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("registry.toml"), REGISTRY).unwrap();

    // Out of order, with replays of old messages after the newest, a heartbeat, unknown devices.
    let mut records = Vec::new();
    for seq in (0..50).rev().chain(50..100).chain([99, 10, 3]) {
        records.push(telemetry("m-1", seq, "telemetry"));
    }
    records.push(telemetry("m-1", 100, "heartbeat"));
    for seq in 0..3 {
        records.push(telemetry("stranger", seq, "telemetry"));
    }
    produce(&input, &records).await;

    let mut child = spawn(&dir, &input, &output, &exchange, &unique("test-enricher-"));
    let codec = Codec::<EnrichedTelemetry>::latest().unwrap();
    let out = read_topic(&output, Duration::from_secs(60), |r| r.len() >= 103).await;
    let mut letters = Vec::new();
    for _ in 0..40 {
        letters.extend(drain_queue(&channel, &queue).await);
        if letters.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(sigterm(&mut child), Some(0), "SIGTERM drains and exits 0");

    assert_eq!(
        out.len(),
        103,
        "100 telemetry messages + 3 replays pass on; the heartbeat does not"
    );
    let records: Vec<EnrichedTelemetry> = out
        .iter()
        .map(|m| codec.decode(m.payload().unwrap()).unwrap())
        .collect();
    let seqs: HashSet<i64> = records.iter().map(|r| r.header.seq_no).collect();
    assert_eq!(seqs.len(), 100);
    for r in &records {
        assert_eq!(r.site.as_deref(), Some("plant-1"));
        assert_eq!(r.readings.len(), 1, "personal metric dropped");
        assert_eq!(r.readings[0].unit.as_deref(), Some("Wh"));
        assert_eq!(r.readings[0].value, r.header.seq_no as f64 * 1000.0);
    }

    let dl = Codec::<DeadLetter>::latest().unwrap();
    let letters: Vec<DeadLetter> = letters.iter().map(|b| dl.decode(b).unwrap()).collect();
    assert_eq!(letters.len(), 3);
    assert!(letters
        .iter()
        .all(|l| l.reason_code == "unknown_device" && l.device_id.as_deref() == Some("stranger")));

    let store = SqliteStore::open(&dir.join("store.sqlite")).unwrap();
    let twin = store.twin("acme", "m-1").await.unwrap().unwrap();
    assert_eq!(twin.last_seq_no, 100, "the heartbeat is the newest message");
    assert_eq!(
        twin.last_values["energy"].value, 99_000.0,
        "newest reading, despite replays"
    );
    assert_eq!(twin.firmware.as_deref(), Some("fw-100"));
    assert!(twin.online);
    assert!(!twin.last_values.contains_key("location"));
    assert!(
        store.twin("acme", "stranger").await.unwrap().is_none(),
        "quarantined devices get no twin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing_and_the_twins_end_at_the_newest_state() {
    const PER_DEVICE: i64 = 5_000;
    let (input, output) = (unique("test.validated."), unique("test.enriched."));
    create_topic(&input, 4).await;
    create_topic(&output, 4).await;
    let sink = dead_letter_sink().await;
    let exchange = sink.exchange.clone();
    let dir = std::env::temp_dir().join(unique("enricher-"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("registry.toml"), REGISTRY).unwrap();
    let records: Vec<_> = (0..PER_DEVICE)
        .flat_map(|seq| (0..4).map(move |d| telemetry(&format!("k-{d}"), seq, "telemetry")))
        .collect();
    produce(&input, &records).await;

    let group = unique("test-enricher-");
    let mut child = spawn(&dir, &input, &output, &exchange, &group);
    let partial = read_topic(&output, Duration::from_secs(60), |r| r.len() >= 3_000).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        partial.len() >= 3_000 && (partial.len() as i64) < 4 * PER_DEVICE,
        "killed mid-stream at {}",
        partial.len()
    );

    let mut child = spawn(&dir, &input, &output, &exchange, &group);
    let codec = Codec::<EnrichedTelemetry>::latest().unwrap();
    let mut seen = HashSet::new();
    let mut read = 0;
    read_topic_until(&output, Duration::from_secs(120), |m| {
        read += 1;
        let r = codec.decode(m.payload().unwrap()).unwrap();
        seen.insert((r.header.device_id, r.header.seq_no));
        seen.len() as i64 >= 4 * PER_DEVICE
    })
    .await;
    assert_eq!(sigterm(&mut child), Some(0));
    assert_eq!(
        seen.len() as i64,
        4 * PER_DEVICE,
        "every record enriched after SIGKILL and restart ({read} read)"
    );
    let store = SqliteStore::open(&dir.join("store.sqlite")).unwrap();
    for d in 0..4 {
        let twin = store
            .twin("acme", &format!("k-{d}"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(twin.last_seq_no, PER_DEVICE - 1);
    }
    eprintln!(
        "enricher sigkill: {read} records read until all {} were seen",
        4 * PER_DEVICE
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_misses_heartbeats_is_marked_offline() {
    let (input, output) = (unique("test.validated."), unique("test.enriched."));
    create_topic(&input, 1).await;
    create_topic(&output, 1).await;
    let sink = dead_letter_sink().await;
    let exchange = sink.exchange.clone();
    let dir = std::env::temp_dir().join(unique("enricher-"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("registry.toml"), REGISTRY).unwrap();
    // m-1's profile expects a heartbeat every 60 s; its last sign of life (2023) is long past.
    produce(&input, &[telemetry("m-1", 0, "heartbeat")]).await;
    let mut child = spawn_ticking(
        &dir,
        &input,
        &output,
        &exchange,
        &unique("test-enricher-"),
        "300ms",
    );
    let store = SqliteStore::open(&dir.join("store.sqlite")).unwrap();
    let mut twin = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        twin = store.twin("acme", "m-1").await.unwrap();
        if twin.as_ref().is_some_and(|t| !t.online) {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let twin = twin.expect("twin written");
    assert!(
        !twin.online,
        "marked offline by the periodic liveness check"
    );
    assert_eq!(twin.alarms, vec!["offline".to_string()]);
}
