use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::*;
use crate::records::{DeadLetter, Header, RawEnvelope, Reading, Telemetry};

/// Mirrors `schemas/telemetry/v1.avsc`: an old consumer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TelemetryV1 {
    header: Header,
    kind: String,
    readings: Vec<Reading>,
}

impl Record for TelemetryV1 {
    const FAMILY: &'static str = "telemetry";
}

fn header(seq_no: i64) -> Header {
    Header {
        msg_id: format!("m-{seq_no}"),
        tenant: "acme".into(),
        device_id: "meter-7".into(),
        seq_no,
        produced_at: 1_790_000_000_000 + seq_no,
        received_at: 1_790_000_000_100 + seq_no,
        schema_version: 1,
    }
}

fn readings() -> Vec<Reading> {
    vec![
        Reading {
            metric: "energy_wh".into(),
            value: 1234.5,
            unit: Some("Wh".into()),
        },
        Reading {
            metric: "voltage".into(),
            value: 229.9,
            unit: None,
        },
    ]
}

fn envelope() -> RawEnvelope {
    RawEnvelope {
        envelope_id: "0190-abc".into(),
        tenant: "acme".into(),
        device_id: "meter-7".into(),
        kind: "telemetry".into(),
        mqtt_topic: "iot/acme/meter-7/telemetry".into(),
        content_type: Some("application/json".into()),
        payload: vec![0, 1, 2, 255, b'{'],
        received_at: 1_790_000_000_000,
        client_identity: None,
        bridge_id: "bridge-0".into(),
        redelivered: true,
        user_properties: HashMap::from([("traceparent".into(), "00-abc-def-01".into())]),
    }
}

#[test]
fn raw_envelope_round_trips_and_uses_standard_framing() {
    let codec = Codec::<RawEnvelope>::latest().expect("codec");
    let bytes = codec.encode(&envelope()).expect("encode");
    assert_eq!(&bytes[..2], &SINGLE_OBJECT_MAGIC);
    let fp = crate::schemas::crc64_avro(
        crate::schemas::parsing_canonical_form(&codec.writer_version().schema).as_bytes(),
    );
    assert_eq!(&bytes[2..FRAME_HEADER_LEN], &fp.to_le_bytes());
    assert_eq!(codec.decode(&bytes).expect("decode"), envelope());
}

#[test]
fn dead_letter_round_trips_with_optional_bytes() {
    let codec = Codec::<DeadLetter>::latest().expect("codec");
    for key in [None, Some(b"acme/meter-7".to_vec())] {
        let record = DeadLetter {
            id: "parser/iotp.raw/3/42".into(),
            stage: "parser".into(),
            reason_code: "bad_seq_no".into(),
            error: "seqNo is negative".into(),
            source_topic: Some("iotp.raw".into()),
            source_partition: Some(3),
            source_offset: Some(42),
            key,
            payload: b"{\"seqNo\":-1}".to_vec(),
            tenant: Some("acme".into()),
            device_id: None,
            attempts: 1,
            first_failure_at: 5,
            last_failure_at: 6,
        };
        assert_eq!(
            codec
                .decode(&codec.encode(&record).expect("encode"))
                .expect("decode"),
            record
        );
    }
}

#[test]
fn v1_written_is_read_by_v2_with_default() {
    let old = Codec::<TelemetryV1>::with_versions(1, 1).expect("v1 codec");
    let new = Codec::<Telemetry>::latest().expect("v2 codec");
    assert_eq!(new.writer_version().version, 2);
    let v1 = TelemetryV1 {
        header: header(1),
        kind: "telemetry".into(),
        readings: readings(),
    };
    let decoded = new
        .decode(&old.encode(&v1).expect("encode"))
        .expect("decode");
    assert_eq!(decoded.header, v1.header);
    assert_eq!(decoded.readings, v1.readings);
    assert_eq!(decoded.firmware_version, None, "v2 default applies");
}

#[test]
fn v2_written_is_read_by_v1_ignoring_new_field() {
    let old = Codec::<TelemetryV1>::with_versions(1, 1).expect("v1 codec");
    let new = Codec::<Telemetry>::latest().expect("v2 codec");
    let v2 = Telemetry {
        header: header(2),
        kind: "heartbeat".into(),
        readings: readings(),
        firmware_version: Some("4.2.0".into()),
    };
    let bytes = new.encode(&v2).expect("encode");
    let fp = schema_registry()
        .get("telemetry", 2)
        .expect("v2")
        .fingerprint;
    assert_eq!(&bytes[2..10], &fp.0, "v2 writer fingerprint on the wire");
    let decoded = old.decode(&bytes).expect("decode");
    assert_eq!(
        decoded,
        TelemetryV1 {
            header: header(2),
            kind: "heartbeat".into(),
            readings: readings()
        }
    );
}

#[test]
fn unknown_and_foreign_schemas_are_errors_with_reason_codes() {
    let codec = Codec::<Telemetry>::latest().expect("codec");
    let mut bytes = codec
        .encode(&Telemetry {
            header: header(3),
            kind: "telemetry".into(),
            readings: vec![],
            firmware_version: None,
        })
        .expect("encode");
    bytes[2] ^= 0xff;
    let err = codec.decode(&bytes).expect_err("unknown");
    assert_eq!(err.reason_code(), "unknown_schema");

    let raw = Codec::<RawEnvelope>::latest()
        .expect("codec")
        .encode(&envelope())
        .expect("encode");
    let err = codec.decode(&raw).expect_err("foreign family");
    assert_eq!(err.reason_code(), "wrong_schema_family");

    assert_eq!(
        codec
            .decode(b"{\"json\":1}")
            .expect_err("json")
            .reason_code(),
        "not_single_object"
    );
    assert_eq!(
        codec.decode(&[0xC3]).expect_err("short").reason_code(),
        "not_single_object"
    );
}

#[test]
fn corrupt_bodies_are_errors_never_panics() {
    corrupt_bodies::<RawEnvelope>(&envelope());
    corrupt_bodies::<Telemetry>(&Telemetry {
        header: header(9),
        kind: "telemetry".into(),
        readings: readings(),
        firmware_version: Some("2.0".into()),
    });
}

fn corrupt_bodies<T: Record + std::fmt::Debug>(record: &T) {
    let codec = Codec::<T>::latest().expect("codec");
    let good = codec.encode(record).expect("encode");
    // Every truncation and a sweep of single-byte corruptions.
    for len in FRAME_HEADER_LEN..good.len() {
        assert_eq!(
            codec
                .decode(&good[..len])
                .expect_err("truncated")
                .reason_code(),
            "malformed_avro"
        );
    }
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in FRAME_HEADER_LEN..good.len() {
        for _ in 0..16 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut bad = good.clone();
            bad[i] = (seed & 0xff) as u8;
            let _ = codec.decode(&bad); // must return, whatever it returns
        }
    }
    // A huge length prefix must not allocate it.
    let mut huge = good[..FRAME_HEADER_LEN].to_vec();
    huge.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
    assert!(codec.decode(&huge).is_err());
}

/// apache-avro's encoding of `record` with `T`'s newest schema, framed like the codec's.
fn apache_encoding<T: Record>(record: &T) -> Vec<u8> {
    let version = schema_registry().latest(T::FAMILY).expect("schema");
    let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&version.schema)
        .build()
        .expect("writer");
    let mut out = SINGLE_OBJECT_MAGIC.to_vec();
    out.extend_from_slice(&version.fingerprint.0);
    writer
        .write_ser(&mut out, record)
        .expect("apache-avro encode");
    out
}

/// The per-record path (`serde_avro_fast`) against apache-avro on every family: the same
/// bytes, and each decodes what the other wrote, through every optional field, union branch,
/// empty and non-empty array and map.
fn same_bytes_both_ways<T: Record + PartialEq + std::fmt::Debug>(records: &[T]) {
    let codec = Codec::<T>::latest().expect("codec");
    let version = schema_registry().latest(T::FAMILY).expect("schema");
    let reader = apache_avro::reader::datum::GenericDatumReader::builder(&version.schema)
        .build()
        .expect("reader");
    for record in records {
        let ours = codec.encode(record).expect("encode");
        let theirs = apache_encoding(record);
        assert_eq!(ours, theirs, "{} bytes differ for {record:?}", T::FAMILY);
        assert_eq!(&codec.decode(&theirs).expect("decode apache's"), record);
        let mut body = &ours[FRAME_HEADER_LEN..];
        let read: T = reader.read_deser(&mut body).expect("apache-avro decode");
        assert_eq!(&read, record);
        assert!(body.is_empty(), "apache-avro left bytes");
    }
}

#[test]
fn per_record_path_writes_and_reads_what_apache_avro_does() {
    use crate::records::{Aggregate, EnrichedTelemetry};
    // The hand-written forms are the ones in use for the records every message passes through.
    assert!(Codec::<RawEnvelope>::latest()
        .expect("codec")
        .writer
        .is_some());
    assert!(Codec::<Telemetry>::latest()
        .expect("codec")
        .writer
        .is_some());
    assert!(Codec::<EnrichedTelemetry>::latest()
        .expect("codec")
        .writer
        .is_some());
    assert!(Codec::<Aggregate>::latest()
        .expect("codec")
        .writer
        .is_none());
    let bare = RawEnvelope {
        content_type: None,
        payload: Vec::new(),
        client_identity: Some("cn=meter-7".into()),
        redelivered: false,
        user_properties: HashMap::new(),
        ..envelope()
    };
    let many_properties = RawEnvelope {
        user_properties: (0..5).map(|i| (format!("k{i}"), format!("v{i}"))).collect(),
        payload: vec![7; 300],
        ..envelope()
    };
    same_bytes_both_ways(&[envelope(), bare, many_properties]);

    let telemetry = |readings, firmware_version| Telemetry {
        header: header(1_000_000_007),
        kind: "telemetry".into(),
        readings,
        firmware_version,
    };
    same_bytes_both_ways(&[
        telemetry(readings(), Some("1.2.3".into())),
        telemetry(Vec::new(), None),
        telemetry((0..70).flat_map(|_| readings()).collect(), None),
    ]);

    let enriched = |tags: HashMap<String, String>, site: Option<&str>| EnrichedTelemetry {
        header: header(42),
        kind: "telemetry".into(),
        readings: readings(),
        site: site.map(str::to_string),
        asset: site.map(|s| format!("{s}-asset")),
        profile: "energy-meter-v1".into(),
        firmware_version: None,
        tags,
    };
    same_bytes_both_ways(&[
        enriched(HashMap::new(), None),
        enriched(
            HashMap::from([("line".into(), "3".into()), ("zone".into(), "b".into())]),
            Some("site-1"),
        ),
    ]);

    let aggregate = |delta, unit: Option<&str>| Aggregate {
        tenant: "acme".into(),
        device_id: "meter-7".into(),
        metric: "energy".into(),
        granularity: "hour".into(),
        bucket_start: 1_790_000_000_000,
        count: 12,
        sum: 12.5,
        min: -1.0,
        max: f64::MAX,
        avg: 1.04,
        first: 0.0,
        first_at: 1_790_000_000_001,
        last: 3.25,
        last_at: 1_790_000_003_599,
        delta,
        unit: unit.map(str::to_string),
        revision: 3,
    };
    same_bytes_both_ways(&[aggregate(None, None), aggregate(Some(-0.5), Some("Wh"))]);

    let letter = |key: Option<Vec<u8>>, source: bool| DeadLetter {
        id: "raw/0/17".into(),
        stage: "parser".into(),
        reason_code: "bad_seq_no".into(),
        error: "seqNo -1 is not a non-negative integer".into(),
        source_topic: source.then(|| "iotp.raw".into()),
        source_partition: source.then_some(3),
        source_offset: source.then_some(17),
        key,
        payload: b"{\"seqNo\":-1}".to_vec(),
        tenant: source.then(|| "acme".into()),
        device_id: None,
        attempts: 2,
        first_failure_at: 1_790_000_000_000,
        last_failure_at: 1_790_000_060_000,
    };
    same_bytes_both_ways(&[
        letter(None, false),
        letter(Some(b"acme/meter-7".to_vec()), true),
    ]);
}
