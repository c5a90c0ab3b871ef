//! Avro single-object encoding (`C3 01`, 8-byte little-endian CRC-64-AVRO fingerprint of the
//! writer schema, then the binary datum). Any Avro implementation can decode it with only the
//! files in `schemas/`. Readers are prepared once per known writer schema when the codec is
//! built; a message never triggers schema parsing or resolution set-up.
//!
//! Two implementations share the work. apache-avro parses the schemas, checks compatibility and
//! decodes another version of the family (schema resolution). The per-record path, encoding
//! with the writer version and decoding that same version, is `serde_avro_fast`'s: it walks
//! the prepared schema alongside the record instead of looking each field up by name, about a
//! tenth of the instructions (docs/performance.md). Both write the bytes the specification
//! prescribes; `tests.rs` holds them to each other and `schemas/interop` to fastavro.

use std::collections::HashMap;
use std::marker::PhantomData;

use apache_avro::reader::datum::GenericDatumReader;
use serde_avro_fast::de::read::SliceRead;
use serde_avro_fast::de::DeserializerState;
use serde_avro_fast::ser::SerializerConfig;

pub mod direct;

use self::direct::Form;
use super::records::Record;
use super::schemas::{schema_registry, Fingerprint, SchemaVersion};

/// The two magic bytes of Avro single-object encoding.
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
/// Magic plus fingerprint.
pub const FRAME_HEADER_LEN: usize = 10;
/// Largest allocation a decoded length prefix may ask for: a corrupt length is an error, not an
/// out-of-memory kill.
const MAX_ALLOCATION_BYTES: usize = 16 * 1024 * 1024;

/// Why a message could not be encoded or decoded. Each maps to a dead-letter reason code.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Not single-object framed.
    #[error("message is not avro single-object encoded ({0})")]
    NotSingleObject(&'static str),
    /// Fingerprint not in `schemas/`.
    #[error("unknown writer schema fingerprint {0}")]
    UnknownSchema(Fingerprint),
    /// A known schema of another family.
    #[error("writer schema is {found} v{version}, expected {expected}")]
    WrongFamily {
        /// Family of the message.
        found: &'static str,
        /// Its version.
        version: u32,
        /// Family this codec reads.
        expected: &'static str,
    },
    /// Framing was fine, the datum was not.
    #[error("malformed avro datum for {family} v{version}: {message}")]
    Malformed {
        /// Family.
        family: &'static str,
        /// Writer version.
        version: u32,
        /// Decoder's message.
        message: String,
    },
    /// The record does not fit its schema (a bug in the writer).
    #[error("cannot encode {family}: {message}")]
    Encode {
        /// Family.
        family: &'static str,
        /// Encoder's message.
        message: String,
    },
    /// Asked for a schema that is not embedded.
    #[error("no schema {family} v{version} in schemas/")]
    MissingSchema {
        /// Family.
        family: String,
        /// Version.
        version: u32,
    },
}

impl CodecError {
    /// The dead-letter reason code for this error.
    pub fn reason_code(&self) -> &'static str {
        match self {
            CodecError::NotSingleObject(_) => "not_single_object",
            CodecError::UnknownSchema(_) => "unknown_schema",
            CodecError::WrongFamily { .. } => "wrong_schema_family",
            CodecError::Malformed { .. } => "malformed_avro",
            CodecError::Encode { .. } => "encode_failed",
            CodecError::MissingSchema { .. } => "missing_schema",
        }
    }
}

enum Reader<T> {
    /// Writer schema == reader schema, and `T` has a hand-written form of it.
    Direct(Form<T>),
    /// Writer schema == reader schema: schema-aware deserialisation straight into `T`.
    Same(&'static serde_avro_fast::Schema),
    /// Another version: decode with the writer schema, resolve to the reader schema.
    Resolving(GenericDatumReader<'static>),
}

/// Encodes `T` with one writer version and decodes any version of `T`'s family into `T`.
pub struct Codec<T: Record> {
    writer_version: &'static SchemaVersion,
    /// `T`'s hand-written form, if it follows the writer version.
    writer: Option<Form<T>>,
    readers: HashMap<Fingerprint, (&'static SchemaVersion, Reader<T>)>,
    _record: PhantomData<fn() -> T>,
}

impl<T: Record> Codec<T> {
    /// Writes and reads with the newest version of `T`'s family.
    pub fn latest() -> Result<Self, CodecError> {
        let newest = schema_registry()
            .latest(T::FAMILY)
            .ok_or(CodecError::MissingSchema {
                family: T::FAMILY.to_string(),
                version: 0,
            })?;
        Self::with_versions(newest.version, newest.version)
    }

    /// Writes with `writer_version` and reads into `T` as `reader_version` (which must be the
    /// version `T` mirrors).
    pub fn with_versions(writer_version: u32, reader_version: u32) -> Result<Self, CodecError> {
        apache_avro::util::max_allocation_bytes(MAX_ALLOCATION_BYTES);
        let find = |version| {
            schema_registry()
                .get(T::FAMILY, version)
                .ok_or(CodecError::MissingSchema {
                    family: T::FAMILY.to_string(),
                    version,
                })
        };
        let writer_version = find(writer_version)?;
        let reader_version = find(reader_version)?;
        let encode_err = |e: apache_avro::Error| CodecError::Encode {
            family: T::FAMILY,
            message: e.to_string(),
        };
        let mut readers = HashMap::new();
        for version in schema_registry().family(T::FAMILY) {
            let reader = if version.fingerprint == reader_version.fingerprint {
                match T::direct().filter(|form| form.version == version.version) {
                    Some(form) => Reader::Direct(form),
                    None => Reader::Same(&version.fast),
                }
            } else {
                Reader::Resolving(
                    GenericDatumReader::builder(&version.schema)
                        .reader_schema(&reader_version.schema)
                        .build()
                        .map_err(encode_err)?,
                )
            };
            readers.insert(version.fingerprint, (version, reader));
        }
        Ok(Self {
            writer_version,
            writer: T::direct().filter(|form| form.version == writer_version.version),
            readers,
            _record: PhantomData,
        })
    }

    /// The version this codec writes.
    pub fn writer_version(&self) -> &'static SchemaVersion {
        self.writer_version
    }

    /// Single-object encode.
    pub fn encode(&self, record: &T) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
        out.extend_from_slice(&self.writer_version.fingerprint.0);
        if let Some(form) = &self.writer {
            (form.write)(record, &mut out);
            return Ok(out);
        }
        let mut config = SerializerConfig::new(&self.writer_version.fast);
        serde_avro_fast::to_datum(record, out, &mut config).map_err(|e| CodecError::Encode {
            family: T::FAMILY,
            message: e.to_string(),
        })
    }

    /// Decode a single-object encoded message of any known version of the family.
    pub fn decode(&self, bytes: &[u8]) -> Result<T, CodecError> {
        let fingerprint = frame_fingerprint(bytes)?;
        let Some((version, reader)) = self.readers.get(&fingerprint) else {
            return Err(match schema_registry().by_fingerprint(&fingerprint) {
                Some(other) => CodecError::WrongFamily {
                    found: other.family,
                    version: other.version,
                    expected: T::FAMILY,
                },
                None => CodecError::UnknownSchema(fingerprint),
            });
        };
        let malformed = |message: String| CodecError::Malformed {
            family: version.family,
            version: version.version,
            message,
        };
        let mut body = &bytes[FRAME_HEADER_LEN..];
        let record = match reader {
            Reader::Direct(form) => {
                let mut input = direct::Input(body);
                let record = (form.read)(&mut input).map_err(malformed)?;
                body = input.0;
                record
            }
            Reader::Same(schema) => {
                // Reading from the slice never allocates more than the slice holds: a corrupt
                // length prefix is an end-of-input error.
                let mut state = DeserializerState::from_slice(body, schema);
                let record =
                    T::deserialize(state.deserializer()).map_err(|e| malformed(e.to_string()))?;
                let mut rest: SliceRead<'_> = state.into_reader();
                let left = std::io::BufRead::fill_buf(&mut rest).map_or(0, |r| r.len());
                body = &body[body.len() - left..];
                record
            }
            Reader::Resolving(reader) => {
                let value = reader
                    .read_value(&mut body)
                    .map_err(|e| malformed(e.to_string()))?;
                apache_avro::from_value::<T>(&value).map_err(|e| malformed(e.to_string()))?
            }
        };
        if !body.is_empty() {
            return Err(malformed(format!("{} trailing bytes", body.len())));
        }
        Ok(record)
    }
}

/// The writer fingerprint of a single-object encoded message.
pub fn frame_fingerprint(bytes: &[u8]) -> Result<Fingerprint, CodecError> {
    if bytes.len() < FRAME_HEADER_LEN {
        return Err(CodecError::NotSingleObject(
            "shorter than the 10-byte header",
        ));
    }
    if bytes[..2] != SINGLE_OBJECT_MAGIC {
        return Err(CodecError::NotSingleObject("no C3 01 magic"));
    }
    let mut fp = [0u8; 8];
    fp.copy_from_slice(&bytes[2..FRAME_HEADER_LEN]);
    Ok(Fingerprint(fp))
}

#[cfg(test)]
mod tests;
