//! Device payloads: JSON or CBOR, chosen by the MQTT 5 content type (or the first byte when the
//! device set none), decoded into one field-by-field view so both formats share the rules.

mod fast_json;

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use iotp_core::stage::Rejection;

/// A decoded payload, format-independent: the fields the pipeline reads, each as the value the
/// device sent (`None` when absent or null), so validation judges their types itself.
/// Decoded straight from JSON or CBOR, without building a map of every key first (the map,
/// its key strings and their hashing were a third of the parser's CPU in a `perf` profile).
/// Strings borrow from the payload where the format allows (JSON without escapes).
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fields<'a> {
    /// Device-given message id.
    #[serde(borrow)]
    pub msg_id: Option<Scalar<'a>>,
    /// Device id (must match the topic's).
    #[serde(borrow)]
    pub device_id: Option<Scalar<'a>>,
    /// Per-device sequence number.
    #[serde(borrow)]
    pub seq_no: Option<Scalar<'a>>,
    /// Device clock, epoch ms.
    #[serde(borrow)]
    pub produced_at: Option<Scalar<'a>>,
    /// Payload format version.
    #[serde(borrow)]
    pub schema_version: Option<Scalar<'a>>,
    /// The readings, or what stood in their place.
    #[serde(borrow)]
    pub readings: Option<Readings<'a>>,
    /// Firmware version, if reported.
    #[serde(borrow)]
    pub firmware: Option<Scalar<'a>>,
}

/// One field's value as sent: its JSON/CBOR type is kept for the rules to judge, and nothing
/// is built for what no rule reads (the contents of an array or object in a scalar's place).
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar<'a> {
    /// `null` (or CBOR `undefined`).
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer that fits `i64`.
    Int(i64),
    /// A positive integer above `i64::MAX`.
    UInt(u64),
    /// A number with a fraction or exponent.
    Float(f64),
    /// A string, borrowed from the payload when it holds no escapes.
    Str(Cow<'a, str>),
    /// An array, an object, bytes, or an integer outside `u64`.
    Other(&'static str),
}

impl Scalar<'_> {
    /// The integer, if it is one that fits `i64` (as `serde_json::Value::as_i64`).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Scalar::Int(n) => Some(n),
            _ => None,
        }
    }

    /// Any number as `f64` (as `serde_json::Value::as_f64`).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Scalar::Int(n) => Some(n as f64),
            Scalar::UInt(n) => Some(n as f64),
            Scalar::Float(f) => Some(f),
            _ => None,
        }
    }
}

/// As the device sent it, for error texts (JSON notation; never a whole object).
impl fmt::Display for Scalar<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Null => f.write_str("null"),
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::Int(n) => write!(f, "{n}"),
            Scalar::UInt(n) => write!(f, "{n}"),
            Scalar::Float(x) => write!(f, "{x}"),
            Scalar::Str(s) => write!(f, "{s:?}"),
            Scalar::Other(what) => f.write_str(what),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ScalarVisitor<'a>(std::marker::PhantomData<Scalar<'a>>);
        impl<'de: 'a, 'a> Visitor<'de> for ScalarVisitor<'a> {
            type Value = Scalar<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a value")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(i64::try_from(v).map_or(Scalar::UInt(v), Scalar::Int))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Self::Value, E> {
                Ok(match (i64::try_from(v), u64::try_from(v)) {
                    (Ok(n), _) => Scalar::Int(n),
                    (_, Ok(n)) => Scalar::UInt(n),
                    _ => Scalar::Other("an integer out of range"),
                })
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Self::Value, E> {
                self.visit_i128(i128::try_from(v).unwrap_or(i128::MAX))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v)))
            }
            fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Self::Value, E> {
                Ok(Scalar::Other("bytes"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                Scalar::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other("an object"))
            }
        }
        d.deserialize_any(ScalarVisitor(std::marker::PhantomData))
    }
}

/// The `readings` field.
#[derive(Debug, Clone, PartialEq)]
pub enum Readings<'a> {
    /// An array, element by element.
    List(Vec<Element<'a>>),
    /// Anything but an array.
    NotArray,
}

/// One element of `readings`.
// The large variant is the usual one: boxing it would add an allocation per reading, which
// this type exists to avoid.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Element<'a> {
    /// An object: its fields.
    Reading(ReadingFields<'a>),
    /// Anything but an object.
    NotObject,
}

/// The fields of one reading, as sent.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub struct ReadingFields<'a> {
    /// Metric name.
    #[serde(borrow)]
    pub metric: Option<Scalar<'a>>,
    /// Measured value.
    #[serde(borrow)]
    pub value: Option<Scalar<'a>>,
    /// Unit.
    #[serde(borrow)]
    pub unit: Option<Scalar<'a>>,
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

impl<'de: 'a, 'a> Deserialize<'de> for Readings<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ReadingsVisitor<'a>(std::marker::PhantomData<Readings<'a>>);
        impl<'de: 'a, 'a> Visitor<'de> for ReadingsVisitor<'a> {
            type Value = Readings<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("readings")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Readings<'a>, A::Error> {
                let mut list = Vec::with_capacity(seq.size_hint().unwrap_or(4).min(64));
                while let Some(e) = seq.next_element::<Element<'a>>()? {
                    list.push(e);
                }
                Ok(Readings::List(list))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Readings<'a>, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Readings::NotArray)
            }
            other_shapes!(Readings::NotArray);
        }
        d.deserialize_any(ReadingsVisitor(std::marker::PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Element<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ElementVisitor<'a>(std::marker::PhantomData<Element<'a>>);
        impl<'de: 'a, 'a> Visitor<'de> for ElementVisitor<'a> {
            type Value = Element<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a reading")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Element<'a>, A::Error> {
                ReadingFields::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(Element::Reading)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Element<'a>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Element::NotObject)
            }
            other_shapes!(Element::NotObject);
        }
        d.deserialize_any(ElementVisitor(std::marker::PhantomData))
    }
}

/// The payload's top level, which must be an object (a derived struct would also take an
/// array, field by field).
struct Object<'a>(Fields<'a>);

impl<'de: 'a, 'a> Deserialize<'de> for Object<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<'a>(std::marker::PhantomData<Object<'a>>);
        impl<'de: 'a, 'a> Visitor<'de> for ObjectVisitor<'a> {
            type Value = Object<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Object<'a>, A::Error> {
                Fields::deserialize(de::value::MapAccessDeserializer::new(map)).map(Object)
            }
        }
        d.deserialize_map(ObjectVisitor(std::marker::PhantomData))
    }
}

/// An [`Object`] for readers that cannot lend (CBOR's): the same, owning its strings.
struct Owned(Object<'static>);

impl<'de> Deserialize<'de> for Owned {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Object::deserialize(d).map(|o| Owned(Object(o.0.into_owned())))
    }
}

impl Fields<'_> {
    /// The same fields, owning their strings.
    pub fn into_owned(self) -> Fields<'static> {
        let own = |v: Option<Scalar<'_>>| v.map(Scalar::into_owned);
        Fields {
            msg_id: own(self.msg_id),
            device_id: own(self.device_id),
            seq_no: own(self.seq_no),
            produced_at: own(self.produced_at),
            schema_version: own(self.schema_version),
            readings: self.readings.map(|r| match r {
                Readings::List(list) => Readings::List(
                    list.into_iter()
                        .map(|e| match e {
                            Element::Reading(r) => Element::Reading(ReadingFields {
                                metric: own(r.metric),
                                value: own(r.value),
                                unit: own(r.unit),
                            }),
                            Element::NotObject => Element::NotObject,
                        })
                        .collect(),
                ),
                Readings::NotArray => Readings::NotArray,
            }),
            firmware: own(self.firmware),
        }
    }
}

impl Scalar<'_> {
    /// The same value, owning its string.
    pub fn into_owned(self) -> Scalar<'static> {
        match self {
            Scalar::Null => Scalar::Null,
            Scalar::Bool(b) => Scalar::Bool(b),
            Scalar::Int(n) => Scalar::Int(n),
            Scalar::UInt(n) => Scalar::UInt(n),
            Scalar::Float(f) => Scalar::Float(f),
            Scalar::Str(s) => Scalar::Str(Cow::Owned(s.into_owned())),
            Scalar::Other(what) => Scalar::Other(what),
        }
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
/// JSON strings without escapes are borrowed from `payload`. The usual JSON payloads go through
/// a scanner that knows their shape ([`fast_json`]); the rest through serde.
pub fn decode(format: Format, payload: &[u8]) -> Result<Fields<'_>, Rejection> {
    if format == Format::Json {
        if let Some(fields) = fast_json::fields(payload) {
            return Ok(fields);
        }
    }
    decode_with_serde(format, payload)
}

/// [`decode`] through serde_json or ciborium. The whole JSON payload is checked to be UTF-8
/// once, not string by string. Public for the benchmark that compares the two JSON paths.
pub fn decode_with_serde(format: Format, payload: &[u8]) -> Result<Fields<'_>, Rejection> {
    let not_object = |e: String| {
        if e.contains("expected an object") {
            Rejection::permanent("malformed_payload", "payload is not an object")
        } else {
            Rejection::permanent("malformed_payload", e)
        }
    };
    let object: Object<'_> = match format {
        Format::Json => {
            let text = std::str::from_utf8(payload)
                .map_err(|e| not_object(format!("invalid JSON: not UTF-8 ({e})")))?;
            serde_json::from_str(text).map_err(|e| not_object(format!("invalid JSON: {e}")))?
        }
        Format::Cbor => {
            ciborium::from_reader::<Owned, _>(payload)
                .map_err(|e| not_object(format!("invalid CBOR: {e}")))?
                .0
        }
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
    fn strings_borrow_unless_escaped_and_bad_utf8_is_malformed() {
        let plain =
            decode(Format::Json, br#"{"deviceId":"dev-1","msgId":"m\u002d1"}"#).expect("json");
        assert!(matches!(
            plain.device_id,
            Some(Scalar::Str(Cow::Borrowed("dev-1")))
        ));
        assert!(matches!(&plain.msg_id, Some(Scalar::Str(Cow::Owned(s))) if s == "m-1"));
        let bad = decode(Format::Json, b"{\"deviceId\":\"d\xff\"}").expect_err("not utf-8");
        assert_eq!(bad.reason, "malformed_payload");
        assert!(bad.error.contains("not UTF-8"), "{}", bad.error);
        let big = decode(
            Format::Json,
            br#"{"seqNo":18446744073709551615,"producedAt":-3}"#,
        )
        .expect("json");
        assert_eq!(big.seq_no, Some(Scalar::UInt(u64::MAX)));
        assert_eq!(big.seq_no.as_ref().and_then(Scalar::as_i64), None);
        assert_eq!(big.produced_at, Some(Scalar::Int(-3)));
    }

    #[test]
    fn json_and_cbor_decode_to_the_same_fields() {
        let json = br#"{"deviceId":"d","seqNo":3,"extra":{"a":[1]},"readings":[{"metric":"t","value":1.5},7]}"#;
        let from_json = decode(Format::Json, json).expect("json");
        assert_eq!(from_json.device_id, Some(Scalar::Str("d".into())));
        assert_eq!(from_json.seq_no, Some(Scalar::Int(3)));
        assert_eq!(from_json.msg_id, None);
        let Some(Readings::List(list)) = &from_json.readings else {
            panic!("readings: {:?}", from_json.readings)
        };
        assert_eq!(list.len(), 2);
        assert_eq!(list[1], Element::NotObject);
        let value: serde_json::Value = serde_json::from_slice(json).expect("value");
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
