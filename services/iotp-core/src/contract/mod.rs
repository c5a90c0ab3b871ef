//! The message contract: Avro schemas from `schemas/`, the Rust records that match them, and
//! the single-object codec every Kafka message uses.

mod codec;
mod records;
mod schemas;

pub use codec::{Codec, CodecError, FRAME_HEADER_LEN, SINGLE_OBJECT_MAGIC};
pub use records::{
    Aggregate, DeadLetter, EnrichedTelemetry, Header, RawEnvelope, Reading, Record, Telemetry,
};
pub use schemas::{
    crc64_avro, parsing_canonical_form, registry, Fingerprint, Registry, SchemaVersion,
};
