//! The pipeline's contract, the bottom layer every other crate builds on: the Avro schemas
//! from `schemas/` and the Rust records that match them, the single-object codec every Kafka
//! message uses, the topology that names topics, groups, exchanges and queues, and the device
//! registry. No I/O beyond reading the registry file.

mod codec;
pub mod devices;
mod records;
mod recovery;
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

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
