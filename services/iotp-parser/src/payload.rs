//! Device payloads: JSON or CBOR, chosen by the MQTT 5 content type (or the first byte when the
//! device set none), decoded into one field-by-field view so both formats share the rules.

use serde_json::Value;

use iotp_core::stage::Rejection;

/// A decoded payload, format-independent.
pub type Fields = serde_json::Map<String, Value>;

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
    let value: Value = match format {
        Format::Json => serde_json::from_slice(payload)
            .map_err(|e| Rejection::permanent("malformed_payload", format!("invalid JSON: {e}")))?,
        Format::Cbor => ciborium::from_reader(payload)
            .map_err(|e| Rejection::permanent("malformed_payload", format!("invalid CBOR: {e}")))?,
    };
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(Rejection::permanent(
            "malformed_payload",
            "payload is not an object",
        )),
    }
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
        let json = br#"{"deviceId":"d","seqNo":3,"readings":[{"metric":"t","value":1.5}]}"#;
        let from_json = decode(Format::Json, json).expect("json");
        let mut cbor = Vec::new();
        ciborium::into_writer(&serde_json::Value::Object(from_json.clone()), &mut cbor)
            .expect("cbor");
        assert_eq!(decode(Format::Cbor, &cbor).expect("cbor"), from_json);
        assert_eq!(
            decode(Format::Json, b"[1]").expect_err("array").reason,
            "malformed_payload"
        );
        assert_eq!(
            decode(Format::Cbor, &[0xff, 0x00]).expect_err("bad").reason,
            "malformed_payload"
        );
    }
}
