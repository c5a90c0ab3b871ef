//! The parser binary against real Kafka and RabbitMQ: every bad-input kind is dead-lettered
//! with its reason and original bytes while valid messages flow; SIGKILL loses nothing.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use iotp_contract::{Codec, DeadLetter, RawEnvelope, Telemetry};
use iotp_core::testkit::*;
use rdkafka::Message;
use serde_json::json;

const REGISTRY: &str = r#"
[profiles.meter]
metrics = { energy = { unit = "Wh", min = 0.0, max = 1e12 }, power = { unit = "W", min = 0.0, max = 100000.0 } }

[[devices]]
tenant = "acme"
id = "m-1"
profile = "meter"
"#;

struct Env {
    raw: String,
    validated: String,
    exchange: String,
    queue: String,
    group: String,
    registry: std::path::PathBuf,
}

async fn env() -> (Env, lapin::Channel, lapin::Connection) {
    let e = Env {
        raw: unique("test.raw."),
        validated: unique("test.validated."),
        exchange: unique("test.dlx."),
        queue: unique("test.dlq."),
        group: unique("test-parser-"),
        registry: std::env::temp_dir().join(format!("{}.toml", unique("registry-"))),
    };
    std::fs::write(&e.registry, REGISTRY).unwrap();
    create_topic(&e.raw, 4).await;
    create_topic(&e.validated, 4).await;
    let conn = iotp_core::amqp::connect(&amqp_uri()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    declare_exchange_and_queue(&channel, &e.exchange, &e.queue).await;
    (e, channel, conn)
}

fn spawn(e: &Env, replica: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_iotp-parser"))
        .env("IOTP__COMMON__REPLICA", replica)
        .env("IOTP__COMMON__ADMIN_LISTEN", "127.0.0.1:0")
        .env("IOTP__COMMON__LOG_FORMAT", "text")
        .env("IOTP__KAFKA__BROKERS", kafka_brokers())
        .env("IOTP__IO__INPUT_TOPICS", format!("[\"{}\"]", e.raw))
        .env("IOTP__IO__OUTPUT_TOPIC", &e.validated)
        .env("IOTP__IO__GROUP", &e.group)
        .env("IOTP__IO__DEAD_LETTER__EXCHANGE", &e.exchange)
        .env("IOTP__IO__DEAD_LETTER__AMQP_URI", amqp_uri())
        .env("IOTP__REGISTRY_FILE", &e.registry)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn envelope(device: &str, kind: &str, content_type: Option<&str>, payload: Vec<u8>) -> RawEnvelope {
    RawEnvelope {
        envelope_id: unique("env-"),
        tenant: "acme".into(),
        device_id: device.into(),
        kind: kind.into(),
        mqtt_topic: format!("iot/acme/{device}/{kind}"),
        content_type: content_type.map(String::from),
        payload,
        received_at: iotp_contract::now_millis(),
        client_identity: None,
        bridge_id: "test".into(),
        redelivered: false,
        user_properties: HashMap::new(),
    }
}

fn reading(seq: i64) -> serde_json::Value {
    json!({"msgId": format!("m-{seq}"), "deviceId": "m-1", "seqNo": seq, "producedAt": iotp_contract::now_millis(), "schemaVersion": 1,
           "readings": [{"metric": "power", "value": 100 + seq}]})
}

fn raw_record(env: &RawEnvelope) -> Record {
    let codec = Codec::<RawEnvelope>::latest().unwrap();
    (
        format!("{}/{}", env.tenant, env.device_id).into_bytes(),
        codec.encode(env).unwrap(),
    )
}

/// One bad message per reason code, as the bridge would have wrapped it.
/// (key, value) of a Kafka record.
type Record = (Vec<u8>, Vec<u8>);

fn bad_inputs() -> Vec<(&'static str, Record)> {
    let json = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();
    let with = |f: &str, v: serde_json::Value| {
        let mut r = reading(1);
        r[f] = v;
        json(r)
    };
    let mut missing = reading(1);
    missing.as_object_mut().unwrap().remove("msgId");
    let mut cbor_bad_range = Vec::new();
    let mut r = reading(1);
    r["readings"] = json!([{"metric": "power", "value": -1}]);
    ciborium::into_writer(&r, &mut cbor_bad_range).unwrap();
    vec![
        (
            "missing_field",
            raw_record(&envelope("m-1", "telemetry", None, json(missing))),
        ),
        (
            "bad_field_type",
            raw_record(&envelope(
                "m-1",
                "telemetry",
                None,
                with("producedAt", json!("noon")),
            )),
        ),
        (
            "bad_seq_no",
            raw_record(&envelope(
                "m-1",
                "telemetry",
                None,
                with("seqNo", json!(-4)),
            )),
        ),
        (
            "produced_in_future",
            raw_record(&envelope(
                "m-1",
                "telemetry",
                None,
                with("producedAt", json!(iotp_contract::now_millis() + 3_600_000)),
            )),
        ),
        (
            "too_old",
            raw_record(&envelope(
                "m-1",
                "telemetry",
                None,
                with("producedAt", json!(1_000_000_000_000i64)),
            )),
        ),
        (
            "out_of_range",
            raw_record(&envelope(
                "m-1",
                "telemetry",
                Some("application/cbor"),
                cbor_bad_range,
            )),
        ),
        (
            "unknown_metric",
            raw_record(&envelope(
                "m-1",
                "telemetry",
                None,
                with("readings", json!([{"metric": "colour", "value": 1}])),
            )),
        ),
        (
            "payload_too_large",
            raw_record(&envelope("m-1", "telemetry", None, vec![b'{'; 100_000])),
        ),
        (
            "device_mismatch",
            raw_record(&envelope(
                "m-1",
                "telemetry",
                None,
                with("deviceId", json!("m-9")),
            )),
        ),
        (
            // The bridge vouched (mqtt.identity = "acl") for another device than the topic's.
            "identity_mismatch",
            raw_record(&RawEnvelope {
                client_identity: Some("acme/m-2".into()),
                ..envelope("m-1", "telemetry", None, json(reading(1)))
            }),
        ),
        (
            "malformed_payload",
            raw_record(&envelope("m-1", "telemetry", None, b"{not json".to_vec())),
        ),
        (
            "unknown_kind",
            raw_record(&envelope("m-1", "firmware", None, json(reading(1)))),
        ),
        (
            "bad_topic",
            raw_record(&envelope("", "telemetry", None, json(reading(1)))),
        ),
        (
            "not_single_object",
            (b"acme/m-1".to_vec(), b"plain bytes, not avro".to_vec()),
        ),
        (
            "unknown_schema",
            (
                b"acme/m-1".to_vec(),
                vec![0xC3, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 0],
            ),
        ),
        (
            // A bundle's header on bytes that are no bundle (a byte too many): the runtime
            // hands the record over whole, and the parser's codec names the family.
            "wrong_schema_family",
            (b"acme/m-1".to_vec(), {
                let mut bundle = iotp_contract::bundle::BundleWriter::new();
                bundle.push(b"acme/m-1", b"v", std::iter::empty());
                let mut bytes = bundle.finish();
                bytes.push(0);
                bytes
            }),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_dead_lettered_with_reasons_while_valid_ones_flow() {
    let (e, channel, _conn) = env().await;
    let bad = bad_inputs();
    let mut records = Vec::new();
    let mut seq = 0;
    for (_, b) in &bad {
        for _ in 0..20 {
            records.push(raw_record(&envelope(
                "m-1",
                "telemetry",
                None,
                serde_json::to_vec(&reading(seq)).unwrap(),
            )));
            seq += 1;
        }
        records.push(b.clone());
    }
    produce(&e.raw, &records).await;
    let mut parser = spawn(&e, "parser-0");

    let valid = read_topic(&e.validated, Duration::from_secs(60), |r| {
        r.len() >= seq as usize
    })
    .await;
    let mut letters = Vec::new();
    for _ in 0..60 {
        letters.extend(drain_queue(&channel, &e.queue).await);
        if letters.len() >= bad.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    parser.kill().unwrap();
    parser.wait().unwrap();

    let codec = Codec::<Telemetry>::latest().unwrap();
    let seqs: HashSet<i64> = valid
        .iter()
        .map(|m| codec.decode(m.payload().unwrap()).unwrap().header.seq_no)
        .collect();
    assert_eq!(
        seqs.len(),
        seq as usize,
        "every valid message reached the validated topic"
    );
    assert!(valid
        .iter()
        .all(|m| m.key() == Some(b"acme/m-1".as_slice())));

    let dl = Codec::<DeadLetter>::latest().unwrap();
    let mut by_reason: HashMap<String, DeadLetter> = HashMap::new();
    for bytes in letters {
        let letter = dl.decode(&bytes).unwrap();
        by_reason.insert(letter.reason_code.clone(), letter);
    }
    for (reason, (_, original)) in &bad {
        let letter = by_reason
            .get(*reason)
            .unwrap_or_else(|| panic!("no dead letter for {reason}; got {:?}", by_reason.keys()));
        assert_eq!(&letter.payload, original, "{reason}: original bytes intact");
        assert_eq!(letter.stage, "parser");
        assert!(!letter.error.is_empty());
    }
    assert_eq!(by_reason.len(), bad.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing() {
    let (e, _channel, _conn) = env().await;
    const N: i64 = 20_000;
    let records: Vec<_> = (0..N)
        .map(|seq| {
            raw_record(&envelope(
                "m-1",
                "telemetry",
                None,
                serde_json::to_vec(&reading(seq)).unwrap(),
            ))
        })
        .collect();
    produce(&e.raw, &records).await;

    let mut parser = spawn(&e, "parser-k");
    let partial = read_topic(&e.validated, Duration::from_secs(60), |r| r.len() >= 3_000).await;
    parser.kill().unwrap(); // SIGKILL: no drain, no commit
    parser.wait().unwrap();
    assert!(
        partial.len() >= 3_000 && (partial.len() as i64) < N,
        "killed mid-stream at {}",
        partial.len()
    );

    let mut restarted = spawn(&e, "parser-k");
    let codec = Codec::<Telemetry>::latest().unwrap();
    let mut seqs = HashSet::new();
    let mut records = 0i64;
    read_topic_until(&e.validated, Duration::from_secs(120), |m| {
        records += 1;
        seqs.insert(codec.decode(m.payload().unwrap()).unwrap().header.seq_no);
        seqs.len() as i64 >= N
    })
    .await;
    // SIGTERM now: the drain must exit 0.
    let code = sigterm(&mut restarted);
    assert_eq!(
        seqs.len() as i64,
        N,
        "every record validated after SIGKILL and restart ({records} records read)"
    );
    assert_eq!(code, Some(0), "SIGTERM drains and exits 0");
    eprintln!("sigkill: {records} records read until all {N} inputs were seen");
}
