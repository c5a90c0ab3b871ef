//! The pipeline's contract, the bottom layer every other crate builds on: the Avro schemas
//! from `schemas/` and the Rust records that match them, the single-object codec every Kafka
//! message uses, the topology that names topics, groups, exchanges and queues, and the device
//! registry, and the rule that hides secrets wherever a configuration is printed ([`redact`]).
//! No I/O beyond reading the registry file.

pub mod bundle;
mod codec;
pub mod devices;
mod records;
mod recovery;
pub mod redact;
mod schemas;
pub mod topology;

pub use codec::{Codec, CodecError, FRAME_HEADER_LEN, SINGLE_OBJECT_MAGIC};
pub use records::{
    Aggregate, DeadLetter, EnrichedTelemetry, Header, RawEnvelope, Reading, Record, Telemetry,
};
pub use recovery::{Classify, Recovery};
pub use schemas::{
    crc64_avro, parsing_canonical_form, schema_registry, Fingerprint, SchemaRegistry, SchemaVersion,
};

/// The Kafka key of a device's records, `tenant/deviceId`: one partition per device, so its
/// records stay in order. Built without `format!` (a fifth of the parser's remaining per-record
/// instructions under callgrind went to formatting it).
pub fn device_key(tenant: &str, device_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(tenant.len() + 1 + device_id.len());
    key.extend_from_slice(tenant.as_bytes());
    key.push(b'/');
    key.extend_from_slice(device_id.as_bytes());
    key
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
