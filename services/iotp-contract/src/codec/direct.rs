//! The Avro binary form of the records every message passes through (raw envelope, telemetry,
//! enriched telemetry), written and read by hand for one schema version each: the fields in
//! schema order, no schema walk, no field lookup, no intermediate value.
//!
//! Why by hand: in a `mid` run under callgrind, the parser spent 8.3k instructions per message
//! in serde-based Avro (decode of the envelope, encode of the telemetry) against 21k for all
//! of its own work; a record here costs a few hundred. A codec uses this form only when its
//! writer (or same-version reader) is the version named in [`Direct::VERSION`]; any other
//! version goes through `serde_avro_fast` and apache-avro as before. `tests.rs` holds every
//! form to apache-avro's bytes both ways, and the bridge tests decode it with fastavro.
//!
//! Encoding (Avro 1.11 specification, "Binary Encoding"): `int`/`long` are zig-zag varints,
//! `double` 8 bytes little-endian, `string`/`bytes` a long length then the bytes, a union the
//! branch index as a long then the value, arrays and maps blocks of a count and the items,
//! ended by a count of 0 (a negative count is followed by the block's size in bytes).

use std::collections::HashMap;

use crate::records::{EnrichedTelemetry, Header, RawEnvelope, Reading, Telemetry};

/// A record with a hand-written Avro binary form for one version of its schema family.
pub trait Direct: Sized {
    /// The version of the record's schema family this form follows.
    const VERSION: u32;
    /// Append the record's Avro datum (no framing).
    fn write(&self, out: &mut Vec<u8>);
    /// Read one datum from the front of `input`.
    fn read(input: &mut Input<'_>) -> Result<Self, String>;
}

/// A record's hand-written form, as a codec holds it.
pub struct Form<T> {
    /// The schema version it follows.
    pub version: u32,
    /// [`Direct::write`].
    pub write: fn(&T, &mut Vec<u8>),
    /// [`Direct::read`].
    pub read: fn(&mut Input<'_>) -> Result<T, String>,
}

impl<T> Clone for Form<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Form<T> {}

impl<T: Direct> Form<T> {
    /// `T`'s form.
    pub fn of() -> Self {
        Self {
            version: T::VERSION,
            write: T::write,
            read: T::read,
        }
    }
}

fn long(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn double(out: &mut Vec<u8>, v: f64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn bytes(out: &mut Vec<u8>, v: &[u8]) {
    long(out, v.len() as i64);
    out.extend_from_slice(v);
}

/// `["null", "string"]`.
fn opt_string(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        None => long(out, 0),
        Some(s) => {
            long(out, 1);
            bytes(out, s.as_bytes());
        }
    }
}

/// `{"type": "map", "values": "string"}`: one block.
fn string_map(out: &mut Vec<u8>, map: &HashMap<String, String>) {
    if !map.is_empty() {
        long(out, map.len() as i64);
        for (k, v) in map {
            bytes(out, k.as_bytes());
            bytes(out, v.as_bytes());
        }
    }
    long(out, 0);
}

/// The unread rest of a datum.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    fn long(&mut self) -> Result<i64, String> {
        let mut z: u64 = 0;
        for (i, &b) in self.0.iter().enumerate().take(10) {
            z |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if i == 9 && b > 1 {
                    break;
                }
                self.0 = &self.0[i + 1..];
                return Ok((z >> 1) as i64 ^ -((z & 1) as i64));
            }
        }
        Err("bad or truncated varint".into())
    }

    fn int(&mut self) -> Result<i32, String> {
        let v = self.long()?;
        i32::try_from(v).map_err(|_| format!("int out of range: {v}"))
    }

    fn double(&mut self) -> Result<f64, String> {
        let (head, rest) = self.0.split_first_chunk::<8>().ok_or("truncated double")?;
        self.0 = rest;
        Ok(f64::from_le_bytes(*head))
    }

    fn boolean(&mut self) -> Result<bool, String> {
        let (&b, rest) = self.0.split_first().ok_or("truncated boolean")?;
        self.0 = rest;
        match b {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(format!("invalid boolean byte {b}")),
        }
    }

    /// A length-prefixed slice; a length beyond the input is an error, never an allocation.
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = self.long()?;
        let len = usize::try_from(len).map_err(|_| format!("negative length {len}"))?;
        if len > self.0.len() {
            return Err(format!(
                "length {len} beyond the {} bytes left",
                self.0.len()
            ));
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(head)
    }

    fn string(&mut self) -> Result<String, String> {
        let b = self.bytes()?;
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|e| format!("string is not UTF-8: {e}"))
    }

    fn opt_string(&mut self) -> Result<Option<String>, String> {
        match self.long()? {
            0 => Ok(None),
            1 => self.string().map(Some),
            i => Err(format!("union index {i} out of range")),
        }
    }

    /// The item count of the next array or map block (0: the end). Counts beyond what the
    /// input could hold are errors, so no capacity is reserved from a corrupt count.
    fn block(&mut self) -> Result<usize, String> {
        let mut count = self.long()?;
        if count < 0 {
            count = count.checked_neg().ok_or("bad block count")?;
            self.long()?; // the block's size in bytes
        }
        let count = count as u64;
        if count > self.0.len() as u64 {
            return Err(format!("block of {count} items in {} bytes", self.0.len()));
        }
        Ok(count as usize)
    }

    fn string_map(&mut self) -> Result<HashMap<String, String>, String> {
        let mut map = HashMap::new();
        loop {
            let n = self.block()?;
            if n == 0 {
                return Ok(map);
            }
            map.reserve(n);
            for _ in 0..n {
                let k = self.string()?;
                map.insert(k, self.string()?);
            }
        }
    }

    fn array<T>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<T, String>,
    ) -> Result<Vec<T>, String> {
        let mut out = Vec::new();
        loop {
            let n = self.block()?;
            if n == 0 {
                return Ok(out);
            }
            out.reserve(n);
            for _ in 0..n {
                out.push(item(self)?);
            }
        }
    }
}

fn write_header(h: &Header, out: &mut Vec<u8>) {
    bytes(out, h.msg_id.as_bytes());
    bytes(out, h.tenant.as_bytes());
    bytes(out, h.device_id.as_bytes());
    long(out, h.seq_no);
    long(out, h.produced_at);
    long(out, h.received_at);
    long(out, i64::from(h.schema_version));
}

fn read_header(i: &mut Input<'_>) -> Result<Header, String> {
    Ok(Header {
        msg_id: i.string()?,
        tenant: i.string()?,
        device_id: i.string()?,
        seq_no: i.long()?,
        produced_at: i.long()?,
        received_at: i.long()?,
        schema_version: i.int()?,
    })
}

fn write_readings(readings: &[Reading], out: &mut Vec<u8>) {
    if !readings.is_empty() {
        long(out, readings.len() as i64);
        for r in readings {
            bytes(out, r.metric.as_bytes());
            double(out, r.value);
            opt_string(out, r.unit.as_deref());
        }
    }
    long(out, 0);
}

fn read_reading(i: &mut Input<'_>) -> Result<Reading, String> {
    Ok(Reading {
        metric: i.string()?,
        value: i.double()?,
        unit: i.opt_string()?,
    })
}

/// `schemas/raw-envelope/v1.avsc`.
impl Direct for RawEnvelope {
    const VERSION: u32 = 1;

    fn write(&self, out: &mut Vec<u8>) {
        bytes(out, self.envelope_id.as_bytes());
        bytes(out, self.tenant.as_bytes());
        bytes(out, self.device_id.as_bytes());
        bytes(out, self.kind.as_bytes());
        bytes(out, self.mqtt_topic.as_bytes());
        opt_string(out, self.content_type.as_deref());
        bytes(out, &self.payload);
        long(out, self.received_at);
        opt_string(out, self.client_identity.as_deref());
        bytes(out, self.bridge_id.as_bytes());
        out.push(u8::from(self.redelivered));
        string_map(out, &self.user_properties);
    }

    fn read(i: &mut Input<'_>) -> Result<Self, String> {
        Ok(Self {
            envelope_id: i.string()?,
            tenant: i.string()?,
            device_id: i.string()?,
            kind: i.string()?,
            mqtt_topic: i.string()?,
            content_type: i.opt_string()?,
            payload: i.bytes()?.to_vec(),
            received_at: i.long()?,
            client_identity: i.opt_string()?,
            bridge_id: i.string()?,
            redelivered: i.boolean()?,
            user_properties: i.string_map()?,
        })
    }
}

/// `schemas/telemetry/v2.avsc`.
impl Direct for Telemetry {
    const VERSION: u32 = 2;

    fn write(&self, out: &mut Vec<u8>) {
        write_header(&self.header, out);
        bytes(out, self.kind.as_bytes());
        write_readings(&self.readings, out);
        opt_string(out, self.firmware_version.as_deref());
    }

    fn read(i: &mut Input<'_>) -> Result<Self, String> {
        Ok(Self {
            header: read_header(i)?,
            kind: i.string()?,
            readings: i.array(read_reading)?,
            firmware_version: i.opt_string()?,
        })
    }
}

/// `schemas/enriched/v1.avsc`.
impl Direct for EnrichedTelemetry {
    const VERSION: u32 = 1;

    fn write(&self, out: &mut Vec<u8>) {
        write_header(&self.header, out);
        bytes(out, self.kind.as_bytes());
        write_readings(&self.readings, out);
        opt_string(out, self.site.as_deref());
        opt_string(out, self.asset.as_deref());
        bytes(out, self.profile.as_bytes());
        opt_string(out, self.firmware_version.as_deref());
        string_map(out, &self.tags);
    }

    fn read(i: &mut Input<'_>) -> Result<Self, String> {
        Ok(Self {
            header: read_header(i)?,
            kind: i.string()?,
            readings: i.array(read_reading)?,
            site: i.opt_string()?,
            asset: i.opt_string()?,
            profile: i.string()?,
            firmware_version: i.opt_string()?,
            tags: i.string_map()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longs_are_zigzag_varints_and_bad_ones_are_errors() {
        for (v, enc) in [
            (0_i64, vec![0u8]),
            (-1, vec![1]),
            (1, vec![2]),
            (-64, vec![0x7f]),
            (64, vec![0x80, 0x01]),
            (
                i64::MAX,
                vec![0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
            (
                i64::MIN,
                vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ] {
            let mut out = Vec::new();
            long(&mut out, v);
            assert_eq!(out, enc, "{v}");
            let mut input = Input(&enc);
            assert_eq!(input.long(), Ok(v));
            assert!(input.0.is_empty());
        }
        // Eleven bytes, or a tenth byte with more than the 64th bit: not a long.
        assert!(Input(&[0xff; 11]).long().is_err());
        assert!(
            Input(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02])
                .long()
                .is_err()
        );
        assert!(Input(&[0x80]).long().is_err(), "truncated");
        assert!(
            Input(&[0x80, 0x80, 0x80, 0x80, 0x10]).int().is_err(),
            "2^31 is not an int"
        );
    }

    #[test]
    fn negative_block_counts_carry_a_size_and_huge_ones_are_refused() {
        // A block of -2 items (2, with a byte size), then the end.
        let mut data = Vec::new();
        long(&mut data, -2);
        long(&mut data, 4);
        for s in ["a", "b"] {
            bytes(&mut data, s.as_bytes());
        }
        long(&mut data, 0);
        let mut input = Input(&data);
        assert_eq!(
            input.array(|i| i.string()),
            Ok(vec!["a".to_string(), "b".to_string()])
        );
        assert!(input.0.is_empty());
        let mut huge = Vec::new();
        long(&mut huge, 1 << 40);
        assert!(Input(&huge).array(|i| i.long()).is_err());
        assert!(Input(&huge).bytes().is_err());
    }
}
