//! The aggregator binary against real Kafka with the embedded store: out-of-order, late and
//! duplicated data, a restart and a full replay; the roll-ups must equal a recomputation from
//! the raw messages, and the published ones their latest revision.
#![allow(clippy::unwrap_used, clippy::type_complexity)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iotp_contract::{Aggregate, Codec, EnrichedTelemetry, Header, Reading};
use iotp_core::testkit::*;
use iotp_store::sqlite::SqliteStore;
use iotp_store::RollupStore;
use rdkafka::Message;

const H: i64 = 3_600_000;
const T0: i64 = 1_700_002_800_000 - 1_700_002_800_000 % (24 * H); // a UTC midnight

/// (device, seq, time, energy counter, temperature): integers, so sums are exact.
fn data() -> Vec<(i64, i64, i64, f64, f64)> {
    let mut out = Vec::new();
    for d in 0..5 {
        for seq in 0..360 {
            let t = T0 + seq * 60_000; // one per minute, six hours
            out.push((
                d,
                seq,
                t,
                (1000 + seq * 7) as f64,
                ((seq * 13 + d) % 40) as f64,
            ));
        }
    }
    out
}

fn record(d: i64, seq: i64, t: i64, energy: f64, temp: f64) -> (Vec<u8>, Vec<u8>) {
    let r = EnrichedTelemetry {
        header: Header {
            msg_id: format!("{d}-{seq}"),
            tenant: "acme".into(),
            device_id: format!("d{d}"),
            seq_no: seq,
            produced_at: t,
            received_at: t,
            schema_version: 1,
        },
        kind: "telemetry".into(),
        readings: vec![
            Reading {
                metric: "energy".into(),
                value: energy,
                unit: Some("Wh".into()),
            },
            Reading {
                metric: "temperature".into(),
                value: temp,
                unit: Some("Cel".into()),
            },
        ],
        site: None,
        asset: None,
        profile: "meter".into(),
        firmware_version: None,
        tags: HashMap::new(),
    };
    (
        format!("acme/d{d}").into_bytes(),
        Codec::<EnrichedTelemetry>::latest()
            .unwrap()
            .encode(&r)
            .unwrap(),
    )
}

fn spawn(topic: &str, output: &str, group: &str, db: &Path, exchange: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_iotp-aggregator"))
        .env("IOTP__COMMON__REPLICA", "aggregator-0")
        .env("IOTP__COMMON__ADMIN_LISTEN", "127.0.0.1:0")
        .env("IOTP__COMMON__LOG_FORMAT", "text")
        .env("IOTP__KAFKA__BROKERS", kafka_brokers())
        .env("IOTP__IO__INPUT_TOPICS", format!("[\"{topic}\"]"))
        .env("IOTP__IO__OUTPUT_TOPIC", output)
        .env("IOTP__IO__GROUP", group)
        .env("IOTP__IO__TICK_INTERVAL", "300ms")
        .env("IOTP__IO__DEAD_LETTER__EXCHANGE", exchange)
        .env("IOTP__IO__DEAD_LETTER__AMQP_URI", amqp_uri())
        .env("IOTP__STORE__PATH", db)
        .env("IOTP__ALLOWED_LATENESS", "10m")
        .env("IOTP__CUMULATIVE_METRICS", "[\"energy\"]")
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn stop(mut child: Child) {
    assert_eq!(sigterm(&mut child), Some(0));
}

type Key = (String, String, String, i64);

/// Recompute every bucket from the raw messages.
fn recompute(rows: &[(i64, i64, i64, f64, f64)]) -> BTreeMap<Key, (i64, f64, f64, f64, f64, f64)> {
    let mut out: BTreeMap<Key, (i64, f64, f64, f64, (i64, f64), (i64, f64))> = BTreeMap::new();
    for &(d, _, t, energy, temp) in rows {
        for (metric, v) in [("energy", energy), ("temperature", temp)] {
            for (g, len) in [("hour", H), ("day", 24 * H)] {
                let key = (
                    format!("d{d}"),
                    metric.to_string(),
                    g.to_string(),
                    t.div_euclid(len) * len,
                );
                let e = out.entry(key).or_insert((
                    0,
                    0.0,
                    f64::MAX,
                    f64::MIN,
                    (i64::MAX, 0.0),
                    (i64::MIN, 0.0),
                ));
                e.0 += 1;
                e.1 += v;
                e.2 = e.2.min(v);
                e.3 = e.3.max(v);
                if t < e.4 .0 {
                    e.4 = (t, v);
                }
                if t >= e.5 .0 {
                    e.5 = (t, v);
                }
            }
        }
    }
    out.into_iter()
        .map(|(k, e)| (k, (e.0, e.1, e.2, e.3, e.4 .1, e.5 .1)))
        .collect()
}

async fn stored(store: &SqliteStore) -> BTreeMap<Key, (i64, f64, f64, f64, f64, f64)> {
    let mut out = BTreeMap::new();
    for d in 0..5 {
        for b in store.buckets("acme", &format!("d{d}")).await.unwrap() {
            out.insert(
                (b.device_id, b.metric, b.granularity, b.bucket_start),
                (b.count, b.sum, b.min, b.max, b.first, b.last),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_equal_a_recomputation_after_late_out_of_order_and_replayed_data() {
    let (topic, output) = (unique("test.enriched."), unique("test.aggregates."));
    create_topic(&topic, 2).await;
    create_topic(&output, 2).await;
    let sink = dead_letter_sink().await;
    let exchange = sink.exchange.clone();
    let dir = std::env::temp_dir().join(unique("aggregator-"));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("store.sqlite");
    let store = SqliteStore::create(&db).unwrap();

    let rows = data();
    // Hour 0 of every device is held back and sent last: late, after its window closed.
    // The rest goes out in reverse order within each hour, with every 5th message twice.
    type Row = (i64, i64, i64, f64, f64);
    let (late, on_time): (Vec<&Row>, Vec<&Row>) = rows.iter().partition(|r| r.2 < T0 + H);
    let mut first_wave = Vec::new();
    for hour in 1..6 {
        let mut in_hour: Vec<_> = on_time.iter().filter(|r| (r.2 - T0) / H == hour).collect();
        in_hour.reverse();
        for r in in_hour {
            first_wave.push(record(r.0, r.1, r.2, r.3, r.4));
            if r.1 % 5 == 0 {
                first_wave.push(record(r.0, r.1, r.2, r.3, r.4));
            }
        }
    }
    produce(&topic, &first_wave).await;
    let group = unique("test-aggregator-");
    let child = spawn(&topic, &output, &group, &db, &exchange);
    let expected_first = recompute(&on_time.iter().map(|r| **r).collect::<Vec<_>>());
    let until = Instant::now() + Duration::from_secs(90);
    while stored(&store).await != expected_first && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(stored(&store).await, expected_first, "first wave folded");
    stop(child); // a restart between the waves: open windows live in the store

    produce(
        &topic,
        &late
            .iter()
            .map(|r| record(r.0, r.1, r.2, r.3, r.4))
            .collect::<Vec<_>>(),
    )
    .await;
    let child = spawn(&topic, &output, &group, &db, &exchange);
    let expected = recompute(&rows);
    let until = Instant::now() + Duration::from_secs(90);
    while stored(&store).await != expected && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop(child);
    assert_eq!(
        stored(&store).await,
        expected,
        "late data corrected its buckets"
    );

    // Full replay from the earliest offset with a fresh group: nothing changes.
    let child = spawn(&topic, &output, &unique("test-replay-"), &db, &exchange);
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop(child);
    assert_eq!(
        stored(&store).await,
        expected,
        "a replay never double-counts"
    );

    // Published roll-ups: the newest revision of every closed bucket equals the store.
    let watermark = store.watermark().await.unwrap();
    let codec = Codec::<Aggregate>::latest().unwrap();
    let published = read_topic(&output, Duration::from_secs(5), |_| false).await;
    let mut newest: BTreeMap<Key, Aggregate> = BTreeMap::new();
    for m in &published {
        let a = codec.decode(m.payload().unwrap()).unwrap();
        let key = (
            a.device_id.clone(),
            a.metric.clone(),
            a.granularity.clone(),
            a.bucket_start,
        );
        if newest.get(&key).is_none_or(|b| b.revision < a.revision) {
            newest.insert(key, a);
        }
    }
    let closed: Vec<_> = expected
        .keys()
        .filter(|k| k.3 + if k.2 == "hour" { H } else { 24 * H } + 600_000 <= watermark)
        .collect();
    assert!(!closed.is_empty());
    for key in closed {
        let a = newest
            .get(key)
            .unwrap_or_else(|| panic!("closed bucket {key:?} was not published"));
        let e = expected[key];
        assert_eq!(
            (a.count, a.sum, a.min, a.max, a.first, a.last),
            e,
            "{key:?}"
        );
        assert_eq!(a.delta.is_some(), key.1 == "energy");
    }
    let hour0 = newest
        .get(&(
            "d0".to_string(),
            "energy".to_string(),
            "hour".to_string(),
            T0,
        ))
        .unwrap();
    assert_eq!(hour0.delta, Some(59.0 * 7.0), "energy delta over hour 0");
    assert!(published
        .iter()
        .any(|m| codec.decode(m.payload().unwrap()).unwrap().revision > 1));
}
