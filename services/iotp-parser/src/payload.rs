//! Device payloads: JSON or CBOR, chosen by the MQTT 5 content type (or the first byte when the
//! device set none), decoded into one field-by-field view so both formats share the rules.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use iotp_core::stage::Rejection;

/// A decoded payload, format-independent: the fields the pipeline reads, each as the value the
/// device sent (`None` when absent or null), so validation judges their types itself.
/// Decoded straight from JSON or CBOR, without building a map of every key first (the map,
/// its key strings and their hashing were a third of the parser's CPU in a `perf` profile).
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fields {
    /// Device-given message id.
    pub msg_id: Option<Value>,
    /// Device id (must match the topic's).
    pub device_id: Option<Value>,
    /// Per-device sequence number.
    pub seq_no: Option<Value>,
    /// Device clock, epoch ms.
    pub produced_at: Option<Value>,
    /// Payload format version.
    pub schema_version: Option<Value>,
    /// The readings, or what stood in their place.
    pub readings: Option<Readings>,
    /// Firmware version, if reported.
    pub firmware: Option<Value>,
}

/// The `readings` field.
#[derive(Debug, Clone, PartialEq)]
pub enum Readings {
    /// An array, element by element.
    List(Vec<Element>),
    /// Anything but an array.
    NotArray,
}

/// One element of `readings`.
// The large variant is the usual one: boxing it would add an allocation per reading, which
// this type exists to avoid.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Element {
    /// An object: its fields.
    Reading(ReadingFields),
    /// Anything but an object.
    NotObject,
}

/// The fields of one reading, as sent.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub struct ReadingFields {
    /// Metric name.
    pub metric: Option<Value>,
    /// Measured value.
    pub value: Option<Value>,
    /// Unit.
    pub unit: Option<Value>,
}

/// Drains whatever value is there, for the shapes that are not what a field wants.
macro_rules! other_shapes {
    ($out:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_i128<E: de::Error>(self, _: i128) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_u128<E: de::Error>(self, _: u128) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            IgnoredAny::deserialize(d).map(|_| $out)
        }
    };
}

impl<'de> Deserialize<'de> for Readings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ReadingsVisitor;
        impl<'de> Visitor<'de> for ReadingsVisitor {
            type Value = Readings;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("readings")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Readings, A::Error> {
                let mut list = Vec::with_capacity(seq.size_hint().unwrap_or(4).min(64));
                while let Some(e) = seq.next_element::<Element>()? {
                    list.push(e);
                }
                Ok(Readings::List(list))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Readings, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Readings::NotArray)
            }
            other_shapes!(Readings::NotArray);
        }
        d.deserialize_any(ReadingsVisitor)
    }
}

impl<'de> Deserialize<'de> for Element {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ElementVisitor;
        impl<'de> Visitor<'de> for ElementVisitor {
            type Value = Element;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a reading")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Element, A::Error> {
                ReadingFields::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(Element::Reading)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Element, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Element::NotObject)
            }
            other_shapes!(Element::NotObject);
        }
        d.deserialize_any(ElementVisitor)
    }
}

/// The payload's top level, which must be an object (a derived struct would also take an
/// array, field by field).
struct Object(Fields);

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = Object;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Object, A::Error> {
                Fields::deserialize(de::value::MapAccessDeserializer::new(map)).map(Object)
            }
        }
        d.deserialize_map(ObjectVisitor)
    }
}

/// Payload formats devices use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/json`.
    Json,
    /// `application/cbor` (RFC 8949).
    Cbor,
}

/// Which format, from the content type or, without one, the first byte.
pub fn detect(content_type: Option<&str>, payload: &[u8]) -> Result<Format, Rejection> {
    match content_type.map(|c| {
        c.split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    }) {
        Some(c) if c == "application/json" || c.ends_with("+json") => Ok(Format::Json),
        Some(c) if c == "application/cbor" || c.ends_with("+cbor") => Ok(Format::Cbor),
        Some(c) => Err(Rejection::permanent(
            "unsupported_content_type",
            format!("content type {c} is not JSON or CBOR"),
        )),
        None => match payload.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Ok(Format::Json),
            // CBOR maps are major type 5: 0xa0..=0xbf.
            Some(0xa0..=0xbf) => Ok(Format::Cbor),
            _ => Err(Rejection::permanent(
                "malformed_payload",
                "payload is neither a JSON object nor a CBOR map",
            )),
        },
    }
}

/// Decode into fields; anything but an object/map is malformed.
pub fn decode(format: Format, payload: &[u8]) -> Result<Fields, Rejection> {
    let not_object = |e: String| {
        if e.contains("expected an object") {
            Rejection::permanent("malformed_payload", "payload is not an object")
        } else {
            Rejection::permanent("malformed_payload", e)
        }
    };
    let object: Object =
        match format {
            Format::Json => serde_json::from_slice(payload)
                .map_err(|e| not_object(format!("invalid JSON: {e}")))?,
            Format::Cbor => ciborium::from_reader(payload)
                .map_err(|e| not_object(format!("invalid CBOR: {e}")))?,
        };
    Ok(object.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_from_content_type_or_first_byte() {
        assert_eq!(
            detect(Some("application/json; charset=utf-8"), b"x"),
            Ok(Format::Json)
        );
        assert_eq!(detect(Some("application/cbor"), b"x"), Ok(Format::Cbor));
        assert_eq!(detect(None, b"  {\"a\":1}"), Ok(Format::Json));
        assert_eq!(detect(None, &[0xa2, 0x01]), Ok(Format::Cbor));
        assert_eq!(
            detect(Some("text/plain"), b"{}").expect_err("text").reason,
            "unsupported_content_type"
        );
        assert_eq!(
            detect(None, b"hello").expect_err("junk").reason,
            "malformed_payload"
        );
    }

    #[test]
    fn json_and_cbor_decode_to_the_same_fields() {
        let json = br#"{"deviceId":"d","seqNo":3,"extra":{"a":[1]},"readings":[{"metric":"t","value":1.5},7]}"#;
        let from_json = decode(Format::Json, json).expect("json");
        assert_eq!(from_json.device_id, Some(Value::from("d")));
        assert_eq!(from_json.seq_no, Some(Value::from(3)));
        assert_eq!(from_json.msg_id, None);
        let Some(Readings::List(list)) = &from_json.readings else {
            panic!("readings: {:?}", from_json.readings)
        };
        assert_eq!(list.len(), 2);
        assert_eq!(list[1], Element::NotObject);
        let value: Value = serde_json::from_slice(json).expect("value");
        let mut cbor = Vec::new();
        ciborium::into_writer(&value, &mut cbor).expect("cbor");
        assert_eq!(decode(Format::Cbor, &cbor).expect("cbor"), from_json);
        let odd = decode(Format::Json, br#"{"readings":{"a":1},"seqNo":null}"#).expect("odd");
        assert_eq!(odd.readings, Some(Readings::NotArray));
        assert_eq!(odd.seq_no, None, "null is absent");
        assert_eq!(
            decode(Format::Json, b"[1]").expect_err("array").reason,
            "malformed_payload"
        );
        assert_eq!(
            decode(Format::Json, b"{\"a\":").expect_err("cut").reason,
            "malformed_payload"
        );
        assert_eq!(
            decode(Format::Cbor, &[0xff, 0x00]).expect_err("bad").reason,
            "malformed_payload"
        );
    }
}
