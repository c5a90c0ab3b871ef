//! Typed reads of a stored document's fields, for the conversions from documents to the
//! store's types (`twins::twin_from`, `rollups::bucket_from`, `archive::archived_from`). As
//! lenient as the serde derive they replaced, so documents written by earlier versions stay
//! readable: an integer is read from either BSON width, a float from an integer too, an
//! optional field that is absent or null is `None`. A required field that is missing, or any
//! field of another type, is [`StoreError::Corrupt`], naming the document and the field.

use mongodb::bson::{Bson, Document};

use crate::StoreError;

/// The fields of one document; `what` names it in errors (`twin acme/m-1`).
pub(crate) struct Fields<'a> {
    doc: &'a Document,
    what: &'a str,
}

impl<'a> Fields<'a> {
    /// The fields of `doc`, a `what`.
    pub(crate) fn of(doc: &'a Document, what: &'a str) -> Self {
        Self { doc, what }
    }

    /// The value of `key`, `None` if absent or null.
    fn value(&self, key: &str) -> Option<&'a Bson> {
        self.doc.get(key).filter(|v| !matches!(v, Bson::Null))
    }

    fn wrong(&self, key: &str, expected: &str) -> StoreError {
        match self.doc.get(key) {
            None | Some(Bson::Null) => {
                StoreError::Corrupt(format!("{}: {key} is missing", self.what))
            }
            Some(v) => StoreError::Corrupt(format!(
                "{}: {key} is {:?}, not {expected}",
                self.what,
                v.element_type()
            )),
        }
    }

    /// An optional field read with `read`; present but unreadable is an error.
    fn optional<T>(
        &self,
        key: &str,
        expected: &str,
        read: impl FnOnce(&'a Bson) -> Option<T>,
    ) -> Result<Option<T>, StoreError> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => read(v).map(Some).ok_or_else(|| self.wrong(key, expected)),
        }
    }

    fn required<T>(
        &self,
        key: &str,
        expected: &str,
        read: impl FnOnce(&'a Bson) -> Option<T>,
    ) -> Result<T, StoreError> {
        self.optional(key, expected, read)?
            .ok_or_else(|| self.wrong(key, expected))
    }

    /// A string.
    pub(crate) fn str(&self, key: &str) -> Result<String, StoreError> {
        self.required(key, "a string", |v| v.as_str().map(String::from))
    }

    /// A string, or `None`.
    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.optional(key, "a string", |v| v.as_str().map(String::from))
    }

    /// An integer.
    pub(crate) fn i64(&self, key: &str) -> Result<i64, StoreError> {
        self.required(key, "an integer", integer)
    }

    /// An integer, or `None`.
    pub(crate) fn opt_i64(&self, key: &str) -> Result<Option<i64>, StoreError> {
        self.optional(key, "an integer", integer)
    }

    /// A 32-bit integer.
    pub(crate) fn i32(&self, key: &str) -> Result<i32, StoreError> {
        self.required(key, "a 32-bit integer", |v| {
            integer(v).and_then(|n| i32::try_from(n).ok())
        })
    }

    /// A 32-bit integer, or `None`.
    pub(crate) fn opt_i32(&self, key: &str) -> Result<Option<i32>, StoreError> {
        self.optional(key, "a 32-bit integer", |v| {
            integer(v).and_then(|n| i32::try_from(n).ok())
        })
    }

    /// A number.
    pub(crate) fn f64(&self, key: &str) -> Result<f64, StoreError> {
        self.required(key, "a number", |v| match v {
            Bson::Double(x) => Some(*x),
            other => integer(other).map(|n| n as f64),
        })
    }

    /// A boolean.
    pub(crate) fn bool(&self, key: &str) -> Result<bool, StoreError> {
        self.required(key, "a boolean", Bson::as_bool)
    }

    /// A date, as epoch ms.
    pub(crate) fn millis(&self, key: &str) -> Result<i64, StoreError> {
        self.required(key, "a date", |v| {
            v.as_datetime().map(|d| d.timestamp_millis())
        })
    }

    /// A date as epoch ms, or `None`.
    pub(crate) fn opt_millis(&self, key: &str) -> Result<Option<i64>, StoreError> {
        self.optional(key, "a date", |v| {
            v.as_datetime().map(|d| d.timestamp_millis())
        })
    }

    /// Binary data.
    pub(crate) fn bytes(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        self.required(key, "binary data", binary)
    }

    /// Binary data, or `None`.
    pub(crate) fn opt_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.optional(key, "binary data", binary)
    }

    /// An array of strings.
    pub(crate) fn strings(&self, key: &str) -> Result<Vec<String>, StoreError> {
        self.required(key, "an array of strings", |v| {
            v.as_array()?
                .iter()
                .map(|s| s.as_str().map(String::from))
                .collect()
        })
    }

    /// An array of documents.
    pub(crate) fn documents(&self, key: &str) -> Result<Vec<&'a Document>, StoreError> {
        self.required(key, "an array of documents", |v| {
            v.as_array()?.iter().map(Bson::as_document).collect()
        })
    }
}

fn integer(v: &Bson) -> Option<i64> {
    match v {
        Bson::Int32(n) => Some(i64::from(*n)),
        Bson::Int64(n) => Some(*n),
        _ => None,
    }
}

fn binary(v: &Bson) -> Option<Vec<u8>> {
    match v {
        Bson::Binary(b) => Some(b.bytes.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use mongodb::bson::{doc, DateTime};

    use super::*;

    #[test]
    fn integers_of_either_width_absent_options_and_named_errors() {
        let d = doc! {
            "small": 3i32, "large": 5_000_000_000i64, "real": 1.5, "none": null,
            "at": DateTime::from_millis(42), "tags": ["a", "b"], "text": "x",
        };
        let f = Fields::of(&d, "twin acme/m-1");
        assert_eq!((f.i64("small"), f.i64("large")), (Ok(3), Ok(5_000_000_000)));
        assert_eq!(
            f.f64("small"),
            Ok(3.0),
            "a float may be stored as an integer"
        );
        assert_eq!(f.f64("real"), Ok(1.5));
        assert_eq!(
            (f.opt_str("none"), f.opt_str("absent")),
            (Ok(None), Ok(None))
        );
        assert_eq!(f.millis("at"), Ok(42));
        assert_eq!(
            f.strings("tags"),
            Ok(vec!["a".to_string(), "b".to_string()])
        );
        assert_eq!(
            f.i32("large").map_err(|e| e.to_string()),
            Err("store data corrupt: twin acme/m-1: large is Int64, not a 32-bit integer".into())
        );
        assert_eq!(
            f.str("absent").map_err(|e| e.to_string()),
            Err("store data corrupt: twin acme/m-1: absent is missing".into())
        );
        assert!(matches!(f.i64("text"), Err(StoreError::Corrupt(_))));
        assert!(matches!(f.opt_i64("text"), Err(StoreError::Corrupt(_))));
    }
}
