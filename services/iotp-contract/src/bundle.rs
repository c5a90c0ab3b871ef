//! Bundles: several records bound for one Kafka partition, carried in one Kafka record
//! (`schemas/bundle/v1.avsc`, single-object encoded like every value). Each item is what
//! would otherwise be a record of its own: key, value and headers. librdkafka's costs are
//! per record on both sides (the producer's enqueue and delivery report, the consumer's
//! queue op, header parse and message destroy: about 5,000 instructions per record and hop,
//! docs/performance.md), so a bundle of a batch's records bound for one partition pays them
//! once. Any Avro implementation reads a bundle with the files in `schemas/`.
//!
//! Encoded and decoded here by hand, without a `Value` tree: the items are slices of the
//! bundle, nothing is copied. The writer puts every item in one array block, so the count
//! right after the single-object header is the bundle's item count ([`count`]).

use std::sync::LazyLock;

use crate::codec::{FRAME_HEADER_LEN, SINGLE_OBJECT_MAGIC};
use crate::schemas::schema_registry;

/// One record carried in a bundle, borrowed from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item<'a> {
    /// Partitioning key (empty when the record had none).
    pub key: &'a [u8],
    /// Value.
    pub value: &'a [u8],
    /// Headers, in order.
    pub headers: Vec<(&'a str, &'a [u8])>,
}

/// Why bytes that carry the bundle header are not a bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed bundle: {0}")]
pub struct BundleError(&'static str);

/// `C3 01` and the fingerprint of `bundle` v1.
static PREFIX: LazyLock<[u8; FRAME_HEADER_LEN]> = LazyLock::new(|| {
    let mut prefix = [0u8; FRAME_HEADER_LEN];
    prefix[..2].copy_from_slice(&SINGLE_OBJECT_MAGIC);
    // The schema is compiled in and checked by this crate's tests.
    #[allow(clippy::expect_used)]
    let v1 = schema_registry()
        .get("bundle", 1)
        .expect("schemas/bundle/v1.avsc is embedded");
    prefix[2..].copy_from_slice(&v1.fingerprint.0);
    prefix
});

/// Whether `value` is written with the bundle schema (its single-object header says so).
pub fn is_bundle(value: &[u8]) -> bool {
    value.len() >= FRAME_HEADER_LEN && value[..FRAME_HEADER_LEN] == *PREFIX
}

/// The item count of a bundle this module wrote (one block), read without decoding the items;
/// `None` when `value` is not a bundle. For a bundle written elsewhere in several blocks it is
/// the first block's count: use it as a size hint only.
pub fn count(value: &[u8]) -> Option<usize> {
    if !is_bundle(value) {
        return None;
    }
    let mut input = &value[FRAME_HEADER_LEN..];
    read_long(&mut input)
        .ok()
        .map(|n| usize::try_from(n.unsigned_abs()).unwrap_or(usize::MAX))
}

/// The items of a bundle, in order. Every byte must belong to the datum.
pub fn items(value: &[u8]) -> Result<Vec<Item<'_>>, BundleError> {
    if !is_bundle(value) {
        return Err(BundleError(
            "not single-object encoded with the bundle schema",
        ));
    }
    let mut input = &value[FRAME_HEADER_LEN..];
    let mut items = Vec::new();
    read_array(&mut input, |input| {
        let key = read_bytes(input)?;
        let value = read_bytes(input)?;
        let mut headers = Vec::new();
        read_array(input, |input| {
            let name = std::str::from_utf8(read_bytes(input)?)
                .map_err(|_| BundleError("a header name is not UTF-8"))?;
            headers.push((name, read_bytes(input)?));
            Ok(())
        })?;
        items.push(Item {
            key,
            value,
            headers,
        });
        Ok(())
    })?;
    if !input.is_empty() {
        return Err(BundleError("bytes after the datum"));
    }
    Ok(items)
}

/// Builds a bundle item by item.
#[derive(Debug, Default)]
pub struct BundleWriter {
    items: Vec<u8>,
    count: usize,
}

impl BundleWriter {
    /// An empty bundle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a record.
    pub fn push<'h>(
        &mut self,
        key: &[u8],
        value: &[u8],
        headers: impl ExactSizeIterator<Item = (&'h str, &'h [u8])>,
    ) {
        write_bytes(&mut self.items, key);
        write_bytes(&mut self.items, value);
        if headers.len() > 0 {
            write_long(&mut self.items, headers.len() as i64);
            for (name, value) in headers {
                write_bytes(&mut self.items, name.as_bytes());
                write_bytes(&mut self.items, value);
            }
        }
        write_long(&mut self.items, 0);
        self.count += 1;
    }

    /// Records added so far.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether none was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The encoded size so far, header and count included.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER_LEN + 10 + self.items.len() + 1
    }

    /// The encoded bundle.
    pub fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&*PREFIX);
        if self.count > 0 {
            write_long(&mut out, self.count as i64);
            out.extend_from_slice(&self.items);
        }
        write_long(&mut out, 0);
        out
    }
}

/// Size in bytes of `bytes` written as an Avro `bytes` (length prefix included).
pub fn bytes_len(bytes: &[u8]) -> usize {
    let mut n = zigzag(bytes.len() as i64);
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len + bytes.len()
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn write_long(out: &mut Vec<u8>, n: i64) {
    let mut z = zigzag(n);
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn write_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    write_long(out, bytes.len() as i64);
    out.extend_from_slice(bytes);
}

fn read_long(input: &mut &[u8]) -> Result<i64, BundleError> {
    let mut z: u64 = 0;
    for (i, &b) in input.iter().enumerate().take(10) {
        z |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            *input = &input[i + 1..];
            return Ok(((z >> 1) as i64) ^ -((z & 1) as i64));
        }
    }
    Err(BundleError("a length or count is cut off or too long"))
}

fn read_bytes<'a>(input: &mut &'a [u8]) -> Result<&'a [u8], BundleError> {
    let len = usize::try_from(read_long(input)?).map_err(|_| BundleError("a negative length"))?;
    if len > input.len() {
        return Err(BundleError("a length runs past the end"));
    }
    let (bytes, rest) = input.split_at(len);
    *input = rest;
    Ok(bytes)
}

/// An Avro array: blocks of a count (negative: followed by the block's size in bytes) and
/// that many items, ended by a count of zero.
fn read_array<'a>(
    input: &mut &'a [u8],
    mut item: impl FnMut(&mut &'a [u8]) -> Result<(), BundleError>,
) -> Result<(), BundleError> {
    loop {
        let mut n = read_long(input)?;
        if n == 0 {
            return Ok(());
        }
        if n < 0 {
            n = n
                .checked_neg()
                .ok_or(BundleError("a block count out of range"))?;
            read_long(input)?;
        }
        for _ in 0..n {
            if input.is_empty() {
                return Err(BundleError("fewer items than the block count"));
            }
            item(input)?;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use apache_avro::types::Value;

    /// Key, value and headers of a record.
    type Rec = (Vec<u8>, Vec<u8>, Vec<(&'static str, Vec<u8>)>);

    fn sample() -> Vec<Rec> {
        vec![
            (b"t1/dev-1".to_vec(), vec![0xC3, 0x01, 1, 2, 3], vec![]),
            (
                Vec::new(),
                vec![7; 300],
                vec![(
                    "traceparent",
                    b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_vec(),
                )],
            ),
            (
                b"t1/dev-2".to_vec(),
                Vec::new(),
                vec![("iotp-a", vec![]), ("iotp-b", vec![0xff; 200])],
            ),
        ]
    }

    fn write(records: &[Rec]) -> Vec<u8> {
        let mut w = BundleWriter::new();
        for (k, v, h) in records {
            w.push(k, v, h.iter().map(|(n, v)| (*n, v.as_slice())));
        }
        assert_eq!(w.len(), records.len());
        let expected_len = w.encoded_len();
        let out = w.finish();
        assert!(out.len() <= expected_len);
        out
    }

    #[test]
    fn round_trip() {
        let records = sample();
        let bytes = write(&records);
        assert!(is_bundle(&bytes));
        assert_eq!(count(&bytes), Some(3));
        let read = items(&bytes).unwrap();
        assert_eq!(read.len(), 3);
        for (item, (k, v, h)) in read.iter().zip(&records) {
            assert_eq!(item.key, k.as_slice());
            assert_eq!(item.value, v.as_slice());
            let h: Vec<(&str, &[u8])> = h.iter().map(|(n, v)| (*n, v.as_slice())).collect();
            assert_eq!(item.headers, h);
        }
        let empty = BundleWriter::new().finish();
        assert_eq!(items(&empty).unwrap(), vec![]);
        assert_eq!(count(&empty), Some(0));
    }

    fn avro_value(records: &[Rec]) -> Value {
        Value::Record(vec![(
            "items".into(),
            Value::Array(
                records
                    .iter()
                    .map(|(k, v, h)| {
                        Value::Record(vec![
                            ("key".into(), Value::Bytes(k.clone())),
                            ("value".into(), Value::Bytes(v.clone())),
                            (
                                "headers".into(),
                                Value::Array(
                                    h.iter()
                                        .map(|(n, v)| {
                                            Value::Record(vec![
                                                ("name".into(), Value::String((*n).into())),
                                                ("value".into(), Value::Bytes(v.clone())),
                                            ])
                                        })
                                        .collect(),
                                ),
                            ),
                        ])
                    })
                    .collect(),
            ),
        )])
    }

    /// apache-avro, from the schema file alone, reads what the writer wrote, and the reader
    /// reads what apache-avro wrote.
    #[test]
    fn agrees_with_apache_avro() {
        let schema = &schema_registry().get("bundle", 1).unwrap().schema;
        let records = sample();
        let ours = write(&records);
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(schema)
            .build()
            .unwrap();
        let mut body = &ours[FRAME_HEADER_LEN..];
        assert_eq!(reader.read_value(&mut body).unwrap(), avro_value(&records));
        assert!(body.is_empty(), "apache-avro left bytes");

        let writer = apache_avro::writer::datum::GenericDatumWriter::builder(schema)
            .build()
            .unwrap();
        let mut written = PREFIX.to_vec();
        written.extend(writer.write_value_to_vec(avro_value(&records)).unwrap());
        assert_eq!(items(&written).unwrap(), items(&ours).unwrap());
    }

    /// Blocks with a negative count (followed by their size), as other writers may use.
    #[test]
    fn reads_sized_blocks() {
        let mut bytes = PREFIX.to_vec();
        let mut item = Vec::new();
        write_bytes(&mut item, b"k");
        write_bytes(&mut item, b"v");
        write_long(&mut item, 0);
        for _ in 0..2 {
            write_long(&mut bytes, -1);
            write_long(&mut bytes, item.len() as i64);
            bytes.extend_from_slice(&item);
        }
        write_long(&mut bytes, 0);
        let read = items(&bytes).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!((read[1].key, read[1].value), (&b"k"[..], &b"v"[..]));
    }

    #[test]
    fn every_cut_and_extra_byte_is_an_error() {
        let bytes = write(&sample());
        for cut in 0..bytes.len() {
            assert!(items(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(items(&longer).is_err());
        // Another schema's single-object header is not a bundle.
        let mut other = bytes.clone();
        other[9] ^= 1;
        assert!(!is_bundle(&other));
        assert_eq!(count(&other), None);
        // A length past the end, a huge count: errors, not panics or allocations.
        let mut huge = PREFIX.to_vec();
        write_long(&mut huge, i64::MAX);
        assert!(items(&huge).is_err());
        let mut past = PREFIX.to_vec();
        write_long(&mut past, 1);
        write_long(&mut past, 1 << 40);
        assert!(items(&past).is_err());
    }

    #[test]
    fn bytes_len_counts_the_prefix() {
        for n in [0usize, 1, 63, 64, 8191, 8192, 100_000] {
            let mut out = Vec::new();
            write_bytes(&mut out, &vec![0; n]);
            assert_eq!(bytes_len(&vec![0; n]), out.len(), "{n}");
        }
    }
}
