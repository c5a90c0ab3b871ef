//! Parser hot paths, per message: payload detect + decode (JSON and CBOR), the full
//! `validate()` of a raw envelope against a device registry, and the parser stage's whole
//! per-message work (Avro decode of the envelope, validate, Avro encode of the telemetry).
//!
//! The payload is the simulator's energy-meter message (three readings, a UUIDv7 `msgId`, no
//! content type, so the format is sniffed from the first byte); the registry is the
//! simulator's, 1000 devices. Each figure includes freeing what was built, as the stage does.

use std::collections::HashMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use iotp_contract::devices::{Registry, RegistryHandle};
use iotp_contract::{Codec, RawEnvelope};
use iotp_core::stage::{Input, Stage, Verdict};
use iotp_parser::payload::{decode, decode_with_serde, detect, Format};
use iotp_parser::{validate, Parser, Rules};

/// Bridge receive time of every benchmark message.
const RECEIVED_AT: i64 = 1_800_000_000_000;
/// Devices in the benchmark registry.
const FLEET: usize = 1000;
/// An energy meter in the simulator's rotation (`index % 3 == 0`).
const DEVICE: &str = "dev-000003";
/// Messages per stage batch.
const BATCH: usize = 500;

/// The simulator's energy-meter payload as JSON, sent 40 ms before `received_at`.
fn payload_json(seq_no: u64, received_at: i64) -> serde_json::Value {
    serde_json::json!({
        "msgId": "0190f3a2-7c1e-7d4b-9a55-3f2e1c0b9a87",
        "deviceId": DEVICE,
        "seqNo": seq_no,
        "producedAt": received_at - 40,
        "schemaVersion": 1,
        "readings": [
            {"metric": "energy", "value": 3_021_734.518_231, "unit": "Wh"},
            {"metric": "power", "value": 1_523.420_917, "unit": "W"},
            {"metric": "voltage", "value": 229.871_204, "unit": "V"},
        ],
    })
}

fn json_bytes(seq_no: u64, received_at: i64) -> Vec<u8> {
    serde_json::to_vec(&payload_json(seq_no, received_at)).expect("json")
}

fn cbor_bytes(seq_no: u64, received_at: i64) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(&payload_json(seq_no, received_at), &mut out).expect("cbor");
    out
}

/// The simulator's registry (`iotp-simulator --write-registry`) for `devices` devices.
fn registry_toml(devices: usize) -> String {
    let mut out = String::from(
        "[profiles.energy-meter-v1]\n\
         metrics = { energy = { unit = \"Wh\", min = 0.0, max = 1e15, cumulative = true }, power = { unit = \"W\", min = 0.0, max = 1e6 }, voltage = { unit = \"V\", min = 0.0, max = 1000.0 } }\n\n\
         [profiles.climate-v1]\n\
         metrics = { temperature = { unit = \"Cel\", min = -60.0, max = 100.0 }, humidity = { unit = \"%RH\", min = 0.0, max = 100.0 } }\n\n\
         [profiles.vibration-v1]\n\
         metrics = { vibration_rms = { unit = \"mm/s\", min = 0.0, max = 100.0 } }\n",
    );
    for index in 0..devices {
        let profile = ["energy-meter-v1", "climate-v1", "vibration-v1"][index % 3];
        out.push_str(&format!(
            "\n[[devices]]\ntenant = \"acme\"\nid = \"dev-{index:06}\"\nprofile = \"{profile}\"\nsite = \"site-{}\"\n",
            index % 10
        ));
    }
    out
}

fn envelope(payload: Vec<u8>) -> RawEnvelope {
    RawEnvelope {
        envelope_id: "0190f3a2-7c1f-7000-8000-00000000abcd".into(),
        tenant: "acme".into(),
        device_id: DEVICE.into(),
        kind: "telemetry".into(),
        mqtt_topic: format!("iot/acme/{DEVICE}/telemetry"),
        content_type: None,
        payload,
        received_at: RECEIVED_AT,
        client_identity: None,
        bridge_id: "iotp-mqtt-bridge-0".into(),
        redelivered: false,
        user_properties: HashMap::new(),
    }
}

/// Hot path: payload format detection and decoding into fields.
fn payload_detect_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("parser/payload_detect_decode");
    group.throughput(Throughput::Elements(1));
    for (format, bytes) in [
        ("json", json_bytes(42, RECEIVED_AT)),
        ("cbor", cbor_bytes(42, RECEIVED_AT)),
    ] {
        group.bench_function(format, |b| {
            b.iter(|| {
                let bytes = black_box(bytes.as_slice());
                let format = detect(None, bytes).expect("format");
                decode(format, bytes).expect("fields")
            })
        });
    }
    // The same JSON through serde_json, which takes what the shape-aware scanner leaves.
    let bytes = json_bytes(42, RECEIVED_AT);
    group.bench_function("json_serde", |b| {
        b.iter(|| decode_with_serde(Format::Json, black_box(bytes.as_slice())).expect("fields"))
    });
    group.finish();
}

/// Hot path: `validate()` of a raw envelope (detect, decode, every rule, registry ranges).
fn validate_envelope(c: &mut Criterion) {
    let registry =
        Registry::parse(&registry_toml(FLEET), Path::new("bench.toml")).expect("registry");
    let rules = Rules::default();
    let mut group = c.benchmark_group("parser/validate");
    group.throughput(Throughput::Elements(1));
    for (format, bytes) in [
        ("json", json_bytes(42, RECEIVED_AT)),
        ("cbor", cbor_bytes(42, RECEIVED_AT)),
    ] {
        let env = envelope(bytes);
        validate(&env, &rules, Some(&registry), RECEIVED_AT).expect("valid");
        group.bench_function(format, |b| {
            b.iter(|| {
                validate(
                    black_box(&env),
                    &rules,
                    Some(&registry),
                    black_box(RECEIVED_AT),
                )
                .expect("valid")
            })
        });
    }
    group.finish();
}

/// A registry file for the stage (the stage reads it through a handle).
struct RegistryFile(PathBuf);

impl RegistryFile {
    fn new() -> Self {
        let path =
            std::env::temp_dir().join(format!("iotp-bench-registry-{}.toml", std::process::id()));
        std::fs::write(&path, registry_toml(FLEET)).expect("write registry");
        Self(path)
    }
}

impl Drop for RegistryFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The stage's input batch over these Kafka values.
fn inputs(values: &[Vec<u8>]) -> Vec<Input<'_>> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| Input {
            topic: "iotp.raw",
            partition: 0,
            offset: i as i64,
            item: None,
            key: None,
            payload: v.as_slice(),
            replayed: None,
            traceparent: None,
        })
        .collect()
}

/// Hot path: the parser stage's `process` over a batch of Avro raw envelopes (Avro decode,
/// validate, Avro encode of the telemetry, key), per message.
fn parser_stage(c: &mut Criterion) {
    let file = RegistryFile::new();
    let handle = RegistryHandle::open(&file.0).expect("registry handle");
    let mut parser = Parser::new(Rules::default(), Some(handle)).expect("parser");
    let codec = Codec::<RawEnvelope>::latest().expect("codec");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    // Receive times near now: the stage judges age against the wall clock.
    let received_at = iotp_contract::now_millis();
    let values: Vec<Vec<u8>> = (0..BATCH as u64)
        .map(|seq_no| {
            let mut env = envelope(json_bytes(seq_no, received_at));
            env.received_at = received_at;
            codec.encode(&env).expect("encode")
        })
        .collect();
    let verdicts = runtime
        .block_on(parser.process(&inputs(&values)))
        .expect("process");
    assert!(
        verdicts.iter().all(|v| matches!(v, Verdict::Emit(_))),
        "every benchmark message must pass"
    );
    let mut group = c.benchmark_group("parser/stage_process");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("json_batch_500", |b| {
        b.iter_batched(
            || inputs(&values),
            |batch| {
                let verdicts = runtime
                    .block_on(parser.process(black_box(&batch)))
                    .expect("process");
                drop(black_box(verdicts));
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(
    benches,
    payload_detect_decode,
    validate_envelope,
    parser_stage
);
criterion_main!(benches);
