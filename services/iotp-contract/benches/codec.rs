//! Avro single-object codec hot paths, per message: encode and decode of the records every
//! stage reads or writes (raw envelope, telemetry, enriched telemetry), and the decode of a
//! telemetry v1 message into the v2 record (schema resolution, as a consumer on the newest
//! schema does while old producers still write v1).

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde::{Deserialize, Serialize};

use iotp_contract::{Codec, EnrichedTelemetry, Header, RawEnvelope, Reading, Record, Telemetry};

/// Mirrors `schemas/telemetry/v1.avsc`: what a producer still on v1 writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TelemetryV1 {
    header: Header,
    kind: String,
    readings: Vec<Reading>,
}

impl Record for TelemetryV1 {
    const FAMILY: &'static str = "telemetry";
}

fn header() -> Header {
    Header {
        msg_id: "0190f3a2-7c1e-7d4b-9a55-3f2e1c0b9a87".into(),
        tenant: "acme".into(),
        device_id: "dev-000003".into(),
        seq_no: 123_456,
        produced_at: 1_800_000_000_000,
        received_at: 1_800_000_000_040,
        schema_version: 1,
    }
}

/// The simulator's energy-meter readings.
fn readings() -> Vec<Reading> {
    [
        ("energy", 3_021_734.518_231, "Wh"),
        ("power", 1_523.420_917, "W"),
        ("voltage", 229.871_204, "V"),
    ]
    .into_iter()
    .map(|(metric, value, unit)| Reading {
        metric: metric.into(),
        value,
        unit: Some(unit.into()),
    })
    .collect()
}

fn raw_envelope() -> RawEnvelope {
    let payload = br#"{"msgId":"0190f3a2-7c1e-7d4b-9a55-3f2e1c0b9a87","deviceId":"dev-000003","seqNo":123456,"producedAt":1800000000000,"schemaVersion":1,"readings":[{"metric":"energy","value":3021734.518231,"unit":"Wh"},{"metric":"power","value":1523.420917,"unit":"W"},{"metric":"voltage","value":229.871204,"unit":"V"}]}"#;
    RawEnvelope {
        envelope_id: "0190f3a2-7c1f-7000-8000-00000000abcd".into(),
        tenant: "acme".into(),
        device_id: "dev-000003".into(),
        kind: "telemetry".into(),
        mqtt_topic: "iot/acme/dev-000003/telemetry".into(),
        content_type: None,
        payload: payload.to_vec(),
        received_at: 1_800_000_000_040,
        client_identity: None,
        bridge_id: "iotp-mqtt-bridge-0".into(),
        redelivered: false,
        user_properties: HashMap::new(),
    }
}

fn telemetry() -> Telemetry {
    Telemetry {
        header: header(),
        kind: "telemetry".into(),
        readings: readings(),
        firmware_version: None,
    }
}

fn enriched() -> EnrichedTelemetry {
    EnrichedTelemetry {
        header: header(),
        kind: "telemetry".into(),
        readings: readings(),
        site: Some("site-3".into()),
        asset: Some("meter-cabinet-3".into()),
        profile: "energy-meter-v1".into(),
        firmware_version: Some("2.4.1".into()),
        tags: HashMap::from([
            ("building".into(), "B2".into()),
            ("feeder".into(), "F7".into()),
        ]),
    }
}

/// Hot path: Avro single-object encode and decode of one record of family `T`, newest schema.
fn round_trip<T: Record + PartialEq + std::fmt::Debug>(c: &mut Criterion, family: &str, record: T) {
    let codec = Codec::<T>::latest().expect("codec");
    let bytes = codec.encode(&record).expect("encode");
    assert_eq!(codec.decode(&bytes).expect("decode"), record);
    let mut group = c.benchmark_group(format!("codec/{family}"));
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode", |b| {
        b.iter(|| codec.encode(black_box(&record)).expect("encode"))
    });
    group.bench_function("decode", |b| {
        b.iter(|| codec.decode(black_box(&bytes)).expect("decode"))
    });
    group.finish();
}

fn raw_envelope_codec(c: &mut Criterion) {
    round_trip(c, "raw_envelope", raw_envelope());
}

fn telemetry_codec(c: &mut Criterion) {
    round_trip(c, "telemetry", telemetry());
}

fn enriched_codec(c: &mut Criterion) {
    round_trip(c, "enriched", enriched());
}

/// Hot path: decode of a telemetry v1 message with the v2 reader (schema resolution: the
/// writer-schema datum is read, then resolved to v2 with `firmwareVersion` defaulted).
fn telemetry_v1_resolved_to_v2(c: &mut Criterion) {
    let old = Codec::<TelemetryV1>::with_versions(1, 1).expect("v1 codec");
    let new = Codec::<Telemetry>::latest().expect("v2 codec");
    assert_eq!(new.writer_version().version, 2);
    let v1 = TelemetryV1 {
        header: header(),
        kind: "telemetry".into(),
        readings: readings(),
    };
    let bytes = old.encode(&v1).expect("encode");
    let decoded = new.decode(&bytes).expect("decode");
    assert_eq!(
        (decoded.readings, decoded.firmware_version),
        (v1.readings, None)
    );
    let mut group = c.benchmark_group("codec/telemetry");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode_v1_as_v2", |b| {
        b.iter(|| new.decode(black_box(&bytes)).expect("decode"))
    });
    group.finish();
}

criterion_group!(
    benches,
    raw_envelope_codec,
    telemetry_codec,
    telemetry_v1_resolved_to_v2,
    enriched_codec
);
criterion_main!(benches);
