//! Rust records matching the newest version of each schema family in `schemas/`.
//! Times are epoch milliseconds (Avro `timestamp-millis`).

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec::direct::Form;

/// A record type bound to a schema family.
pub trait Record: Serialize + DeserializeOwned {
    /// Folder name under `schemas/`.
    const FAMILY: &'static str;

    /// The hand-written Avro form of one version of the family (`codec/direct.rs`), for the
    /// records every message passes through; the others have none.
    fn direct() -> Option<Form<Self>> {
        None
    }
}

/// What the MQTT bridge saw (`schemas/raw-envelope`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawEnvelope {
    /// UUIDv7 given by the bridge.
    pub envelope_id: String,
    /// Tenant from the topic.
    pub tenant: String,
    /// Device id from the topic.
    pub device_id: String,
    /// Message kind from the topic.
    pub kind: String,
    /// Full MQTT topic.
    pub mqtt_topic: String,
    /// MQTT 5 content type, if set.
    pub content_type: Option<String>,
    /// Untouched PUBLISH payload.
    #[serde(with = "apache_avro::serde::bytes")]
    pub payload: Vec<u8>,
    /// Bridge receive time, epoch ms.
    pub received_at: i64,
    /// Identity the broker vouched for, if any.
    pub client_identity: Option<String>,
    /// Bridge replica name.
    pub bridge_id: String,
    /// MQTT DUP flag.
    pub redelivered: bool,
    /// MQTT 5 user properties.
    pub user_properties: HashMap<String, String>,
}

impl Record for RawEnvelope {
    const FAMILY: &'static str = "raw-envelope";

    fn direct() -> Option<Form<Self>> {
        Some(Form::of())
    }
}

/// The standard message header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Header {
    /// Device-given message id.
    pub msg_id: String,
    /// Tenant the device belongs to, from its MQTT topic: the isolation boundary.
    pub tenant: String,
    /// Device id, unique within the tenant.
    pub device_id: String,
    /// Per-device sequence number; (tenant, deviceId, seqNo) is the idempotency key.
    pub seq_no: i64,
    /// Device clock, epoch ms.
    pub produced_at: i64,
    /// Bridge clock, epoch ms.
    pub received_at: i64,
    /// Device payload format version.
    pub schema_version: i32,
}

/// One measured value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// Metric name from the device profile.
    pub metric: String,
    /// Measured value, in `unit`.
    pub value: f64,
    /// Unit, if given.
    pub unit: Option<String>,
}

/// Canonical telemetry (`schemas/telemetry`, newest version).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Telemetry {
    /// Standard header.
    pub header: Header,
    /// telemetry or heartbeat.
    pub kind: String,
    /// Readings as the device sent them (empty for a heartbeat).
    pub readings: Vec<Reading>,
    /// Firmware reported in the message (v2).
    pub firmware_version: Option<String>,
}

impl Record for Telemetry {
    const FAMILY: &'static str = "telemetry";

    fn direct() -> Option<Form<Self>> {
        Some(Form::of())
    }
}

/// Enriched telemetry (`schemas/enriched`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrichedTelemetry {
    /// Standard header.
    pub header: Header,
    /// telemetry or heartbeat.
    pub kind: String,
    /// Readings in canonical units.
    pub readings: Vec<Reading>,
    /// Site from the registry.
    pub site: Option<String>,
    /// Asset from the registry.
    pub asset: Option<String>,
    /// Device profile id.
    pub profile: String,
    /// Firmware the message reported, else the registry's.
    pub firmware_version: Option<String>,
    /// Further registry tags.
    pub tags: HashMap<String, String>,
}

impl Record for EnrichedTelemetry {
    const FAMILY: &'static str = "enriched";

    fn direct() -> Option<Form<Self>> {
        Some(Form::of())
    }
}

/// A roll-up bucket (`schemas/aggregate`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Aggregate {
    /// Tenant of the device.
    pub tenant: String,
    /// Device the bucket summarises.
    pub device_id: String,
    /// Metric the bucket summarises.
    pub metric: String,
    /// hour or day.
    pub granularity: String,
    /// Bucket start, epoch ms.
    pub bucket_start: i64,
    /// Number of readings.
    pub count: i64,
    /// Sum of the readings (canonical unit).
    pub sum: f64,
    /// Smallest reading.
    pub min: f64,
    /// Largest reading.
    pub max: f64,
    /// sum / count.
    pub avg: f64,
    /// First value by event time.
    pub first: f64,
    /// Its time.
    pub first_at: i64,
    /// Last value by event time.
    pub last: f64,
    /// Its time.
    pub last_at: i64,
    /// last - first for cumulative counters.
    pub delta: Option<f64>,
    /// Canonical unit of the metric.
    pub unit: Option<String>,
    /// Correction count.
    pub revision: i64,
}

impl Record for Aggregate {
    const FAMILY: &'static str = "aggregate";
}

/// A dead letter (`schemas/dead-letter`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// Stable id of the failed original.
    pub id: String,
    /// Stage that failed.
    pub stage: String,
    /// Machine-readable reason.
    pub reason_code: String,
    /// Error text, never the payload.
    pub error: String,
    /// Source topic.
    pub source_topic: Option<String>,
    /// Source partition.
    pub source_partition: Option<i32>,
    /// Source offset.
    pub source_offset: Option<i64>,
    /// Original key.
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub key: Option<Vec<u8>>,
    /// Original bytes.
    #[serde(with = "apache_avro::serde::bytes")]
    pub payload: Vec<u8>,
    /// Tenant, if known.
    pub tenant: Option<String>,
    /// Device, if known.
    pub device_id: Option<String>,
    /// Attempts so far.
    pub attempts: i32,
    /// First failure, epoch ms.
    pub first_failure_at: i64,
    /// Last failure, epoch ms.
    pub last_failure_at: i64,
}

impl Record for DeadLetter {
    const FAMILY: &'static str = "dead-letter";
}
