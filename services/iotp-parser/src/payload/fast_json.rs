//! The JSON payloads devices usually send, decoded by a scanner that knows the shape of
//! [`Fields`] instead of through serde's visitor machinery (docs/performance.md, session 21).
//!
//! It takes only what it is sure of and answers `None` for everything else, which then goes
//! through serde_json as before: a payload that is not UTF-8, a key it does not know, a key
//! given twice, a string with an escape, an array or object where a scalar belongs, a reading
//! that is not an object, an integer of 19 digits or more, `-0`, a number out of `f64`'s range,
//! and any text that is not JSON. So for every payload it takes, it gives exactly what
//! serde_json gives (the tests hold it to that). Numbers with a fraction are parsed by
//! `str::parse`, correctly rounded, as serde_json's are with its `float_roundtrip` feature,
//! which the workspace turns on.

use std::borrow::Cow;

use super::{Element, Fields, ReadingFields, Readings, Scalar};

/// `payload`'s fields, if it is an object this scanner takes (see the module's text).
pub fn fields(payload: &[u8]) -> Option<Fields<'_>> {
    // UTF-8 checked once for the whole payload: strings are then sliced from it as they are.
    let text = std::str::from_utf8(payload).ok()?;
    let mut s = Scanner {
        text,
        b: text.as_bytes(),
        i: 0,
    };
    let mut f = Fields::default();
    let mut seen = 0u8;
    s.ws();
    s.object(|s, key| {
        let bit = match key {
            b"msgId" => 1,
            b"deviceId" => 2,
            b"seqNo" => 4,
            b"producedAt" => 8,
            b"schemaVersion" => 16,
            b"readings" => 32,
            b"firmware" => 64,
            _ => return None,
        };
        first(&mut seen, bit)?;
        if bit == 32 {
            f.readings = s.readings()?;
            return Some(());
        }
        s.scalar(match bit {
            1 => &mut f.msg_id,
            2 => &mut f.device_id,
            4 => &mut f.seq_no,
            8 => &mut f.produced_at,
            16 => &mut f.schema_version,
            _ => &mut f.firmware,
        })
    })?;
    s.ws();
    (s.i == s.b.len()).then_some(f)
}

/// Bytes that end a plain string: its closing quote, an escape, a control character.
static STRING_STOP: [bool; 256] = {
    let mut stop = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        stop[c] = true;
        c += 1;
    }
    stop[b'"' as usize] = true;
    stop[b'\\' as usize] = true;
    stop
};

struct Scanner<'a> {
    /// The payload as text, and the same as bytes (what the scanner walks).
    text: &'a str,
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.eat_if(c).then_some(())
    }

    fn eat_if(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        self.i += usize::from(hit);
        hit
    }

    /// A string without escapes or control characters, after its opening quote: its text.
    /// (A quote byte is never part of a longer UTF-8 sequence, so the slice is whole characters.)
    fn plain_string(&mut self) -> Option<&'a str> {
        let start = self.i;
        let len = self.b[start..]
            .iter()
            .position(|&c| STRING_STOP[usize::from(c)])?;
        let end = start + len;
        if self.b[end] != b'"' {
            return None;
        }
        self.i = end + 1;
        self.text.get(start..end)
    }

    /// A member's key and the colon after it.
    fn key(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let key = self.plain_string()?.as_bytes();
        self.ws();
        self.eat(b':')?;
        Some(key)
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i.checked_add(word.len())?;
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// A scalar field's value, into its slot; `null` leaves it `None` (serde's `Option` takes
    /// null as absent). Written in place: returned, the nested options were moved twice.
    fn scalar(&mut self, slot: &mut Option<Scalar<'a>>) -> Option<()> {
        *slot = Some(match self.peek()? {
            b'"' => {
                self.i += 1;
                Scalar::Str(Cow::Borrowed(self.plain_string()?))
            }
            b't' => {
                self.literal(b"true")?;
                Scalar::Bool(true)
            }
            b'f' => {
                self.literal(b"false")?;
                Scalar::Bool(false)
            }
            b'n' => return self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number()?,
            _ => return None,
        });
        Some(())
    }

    /// A number as JSON writes it (`-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`), in one
    /// pass: an integer's value is summed while its digits are checked.
    fn number(&mut self) -> Option<Scalar<'a>> {
        let b = self.b;
        let start = self.i;
        let mut i = start;
        let negative = b.get(i) == Some(&b'-');
        i += usize::from(negative);
        let int_start = i;
        let mut magnitude = 0i64;
        match b.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                while let Some(&d @ b'0'..=b'9') = b.get(i) {
                    magnitude = magnitude.wrapping_mul(10).wrapping_add(i64::from(d - b'0'));
                    i += 1;
                }
            }
            _ => return None,
        }
        let int_digits = i - int_start;
        let mut fraction = false;
        if b.get(i) == Some(&b'.') {
            fraction = true;
            i = digits(b, i + 1)?;
        }
        if let Some(b'e' | b'E') = b.get(i) {
            fraction = true;
            i += 1;
            if let Some(b'+' | b'-') = b.get(i) {
                i += 1;
            }
            i = digits(b, i)?;
        }
        self.i = i;
        if fraction {
            let x: f64 = self.text.get(start..i)?.parse().ok()?;
            return x.is_finite().then_some(Scalar::Float(x));
        }
        // Up to 18 digits always fit i64; longer ones, and `-0` (serde_json makes it -0.0),
        // are left to serde_json.
        if int_digits > 18 || (negative && magnitude == 0) {
            return None;
        }
        Some(Scalar::Int(if negative { -magnitude } else { magnitude }))
    }

    /// The `readings` value: an array of reading objects, or `null` (absent).
    fn readings(&mut self) -> Option<Option<Readings<'a>>> {
        if self.peek()? == b'n' {
            self.literal(b"null")?;
            return Some(None);
        }
        self.eat(b'[')?;
        let mut list = Vec::with_capacity(4);
        self.ws();
        if self.eat_if(b']') {
            return Some(Some(Readings::List(list)));
        }
        loop {
            self.ws();
            list.push(Element::Reading(self.reading()?));
            self.ws();
            if self.eat_if(b',') {
                continue;
            }
            self.eat(b']')?;
            return Some(Some(Readings::List(list)));
        }
    }

    /// One reading object.
    fn reading(&mut self) -> Option<ReadingFields<'a>> {
        let mut r = ReadingFields::default();
        let mut seen = 0u8;
        self.object(|s, key| {
            let bit = match key {
                b"metric" => 1,
                b"value" => 2,
                b"unit" => 4,
                _ => return None,
            };
            first(&mut seen, bit)?;
            s.scalar(match bit {
                1 => &mut r.metric,
                2 => &mut r.value,
                _ => &mut r.unit,
            })
        })?;
        Some(r)
    }

    /// An object: `member` reads each member's value, given its key, with the scanner at the
    /// value.
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        self.ws();
        if self.eat_if(b'}') {
            return Some(());
        }
        loop {
            self.ws();
            let key = self.key()?;
            self.ws();
            member(self, key)?;
            self.ws();
            if !self.eat_if(b',') {
                return self.eat(b'}');
            }
        }
    }
}

/// Note the key `bit` as seen; `None` if it was already (serde refuses a repeated field).
fn first(seen: &mut u8, bit: u8) -> Option<()> {
    let again = *seen & bit != 0;
    *seen |= bit;
    (!again).then_some(())
}

/// Past one or more digits from `i`, or `None` if there is none.
fn digits(b: &[u8], mut i: usize) -> Option<usize> {
    let start = i;
    while let Some(b'0'..=b'9') = b.get(i) {
        i += 1;
    }
    (i > start).then_some(i)
}

#[cfg(test)]
mod tests {
    use super::super::{decode_with_serde, Format};
    use super::*;

    /// What the scanner takes, serde_json takes alike; returns whether the scanner took it.
    fn decoded_alike(payload: &[u8]) -> bool {
        let slow = decode_with_serde(Format::Json, payload);
        match fields(payload) {
            Some(fast) => {
                let slow = slow.unwrap_or_else(|e| {
                    panic!(
                        "scanner took what serde_json refused ({}): {}",
                        e.error,
                        String::from_utf8_lossy(payload)
                    )
                });
                assert!(
                    fast == slow,
                    "{}\nscanner: {fast:?}\nserde:   {slow:?}",
                    String::from_utf8_lossy(payload)
                );
                true
            }
            None => false,
        }
    }

    const TYPICAL: &str = r#"{"msgId":"0193a4b2-7c1d-7e3f-9a8b-0c1d2e3f4a5b","deviceId":"dev-000042","seqNo":17,"producedAt":1765000000123,"schemaVersion":1,"readings":[{"metric":"energy","value":42123.83922105467,"unit":"Wh"},{"metric":"power","value":1780.5,"unit":"W"},{"metric":"voltage","value":229.99999999999997,"unit":"V"}],"firmware":"sim-1.4.2"}"#;

    #[test]
    fn the_usual_payloads_are_taken_and_decode_as_serde_json_decodes_them() {
        for payload in [
            TYPICAL,
            r#"{"msgId":"m","deviceId":"d","seqNo":0,"producedAt":1,"schemaVersion":1}"#,
            " {\n \"deviceId\" : \"d\" ,\t\"readings\" : [ ] , \"seqNo\" : null } \r\n",
            r#"{"readings":[{},{"value":-1.5e-3},{"value":12,"unit":null,"metric":true}]}"#,
            r#"{"seqNo":-42,"producedAt":999999999999999999,"firmware":false,"msgId":1E+2}"#,
            r#"{}"#,
            r#"{"readings":null,"deviceId":"a b/c~"}"#,
            "{\"deviceId\":\"caf\u{e9} \u{1F321}\u{7f}\"}",
        ] {
            assert!(decoded_alike(payload.as_bytes()), "not taken: {payload}");
        }
        let f = fields(TYPICAL.as_bytes()).expect("typical");
        assert_eq!(f.seq_no, Some(Scalar::Int(17)));
        assert!(matches!(
            f.device_id,
            Some(Scalar::Str(Cow::Borrowed("dev-000042")))
        ));
        let Some(Readings::List(list)) = &f.readings else {
            panic!("{:?}", f.readings)
        };
        assert_eq!(list.len(), 3);
    }

    #[test]
    fn anything_unusual_is_left_to_serde_json() {
        for payload in [
            r#"{"deviceId":"d","extra":1}"#,
            r#"{"seqNo":1,"seqNo":2}"#,
            r#"{"msgId":"m\u002d1"}"#,
            r#"{"seqNo":[1]}"#,
            r#"{"seqNo":{"a":1}}"#,
            r#"{"readings":{"a":1}}"#,
            r#"{"readings":[7]}"#,
            r#"{"readings":[{"metric":"t","metric":"u"}]}"#,
            r#"{"readings":[{"other":1}]}"#,
            r#"{"seqNo":18446744073709551615}"#,
            r#"{"seqNo":-0}"#,
            r#"{"seqNo":1e400}"#,
            r#"{"seqNo":01}"#,
            r#"{"seqNo":1.}"#,
            r#"{"seqNo":.5}"#,
            r#"{"seqNo":+1}"#,
            r#"{"seqNo":1,}"#,
            r#"{"seqNo":1} x"#,
            r#"{"seqNo":tru}"#,
            r#"{"readings":[{"value":1},]}"#,
            "[1]",
            "",
            "{\"deviceId\":\"a\tb\"}",
        ] {
            assert!(
                !decoded_alike(payload.as_bytes()),
                "taken, should be left to serde_json: {payload}"
            );
        }
        assert!(!decoded_alike(b"{\"deviceId\":\"d\xff\"}"), "not UTF-8");
    }

    /// Values as a device's serde_json writes them (shortest round-trip form) come back as the
    /// very same `f64`, through the scanner and through serde_json alike.
    #[test]
    fn readings_come_back_exactly_as_the_device_had_them() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for i in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let value = match i % 4 {
                0 => f64::from_bits(state >> 2),
                1 => (state >> 11) as f64 / (1u64 << 53) as f64 * 3000.0,
                2 => 225.0 + (state >> 11) as f64 / (1u64 << 53) as f64 * 10.0,
                _ => -((state >> 40) as f64) / 7.0,
            };
            if !value.is_finite() {
                continue;
            }
            let payload = format!(
                r#"{{"seqNo":{i},"readings":[{{"metric":"m","value":{}}}]}}"#,
                serde_json::to_string(&value).expect("number")
            );
            assert!(decoded_alike(payload.as_bytes()), "not taken: {payload}");
            let f = fields(payload.as_bytes()).expect("taken");
            let Some(Readings::List(list)) = f.readings else {
                panic!("{payload}")
            };
            let Element::Reading(r) = &list[0] else {
                panic!("{payload}")
            };
            let back = r.value.as_ref().and_then(Scalar::as_f64).expect("value");
            assert_eq!(back.to_bits(), value.to_bits(), "{payload}");
        }
    }

    /// Every cut, and every one-byte change, of a typical payload: whatever the scanner takes
    /// serde_json takes alike (`decoded_alike` panics otherwise).
    #[test]
    fn mutated_payloads_never_decode_differently() {
        let base = TYPICAL.as_bytes();
        let mut taken = 0;
        for end in 0..=base.len() {
            taken += usize::from(decoded_alike(&base[..end]));
        }
        assert_eq!(taken, 1, "only the whole payload is complete JSON");
        let bytes = b"{}[]\":,.-+eE0159 \ntfnulx\\\x7f\xc3";
        let mut tried = 0;
        for i in 0..base.len() {
            for &b in bytes {
                let mut m = base.to_vec();
                m[i] = b;
                decoded_alike(&m);
                m.insert(i, b);
                decoded_alike(&m);
                tried += 2;
            }
            let mut m = base.to_vec();
            m.remove(i);
            decoded_alike(&m);
        }
        assert!(tried > 10_000);
    }
}
