//! Batched write commands (`update`, `insert`) and their replies. Used where a write needs a
//! per-statement outcome (optimistic concurrency on twins) or runs inside a transaction
//! (roll-ups): one round trip per at most `batch_size` statements.

use mongodb::bson::{doc, Bson, Document};
use mongodb::error::{Error, ErrorKind, TRANSIENT_TRANSACTION_ERROR};

use super::{backend, DUPLICATE_KEY};
use crate::StoreError;

/// MongoDB's write-conflict error (concurrent transactions touched the same document).
const WRITE_CONFLICT: i64 = 112;

/// The write concern of every write outside a transaction, and of every commit.
pub(crate) fn majority_journaled() -> Document {
    doc! { "w": "majority", "j": true }
}

/// An `update` command of many statements, unordered. Inside a transaction the command must
/// not carry a write concern (the transaction's applies at commit): pass `in_transaction`.
pub(crate) fn update_command(
    collection: &str,
    updates: Vec<Document>,
    in_transaction: bool,
) -> Document {
    let mut command = doc! { "update": collection, "updates": updates, "ordered": false };
    if !in_transaction {
        command.insert("writeConcern", majority_journaled());
    }
    command
}

/// An `insert` command, unordered; see [`update_command`] for `in_transaction`.
pub(crate) fn insert_command(
    collection: &str,
    documents: Vec<Document>,
    in_transaction: bool,
) -> Document {
    let mut command = doc! { "insert": collection, "documents": documents, "ordered": false };
    if !in_transaction {
        command.insert("writeConcern", majority_journaled());
    }
    command
}

/// What a write command did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct WriteReply {
    /// Documents matched or upserted (update), inserted (insert).
    pub n: i64,
    /// Indexes of the statements rejected with a duplicate key or a write conflict: the
    /// document changed under the writer.
    pub conflicts: Vec<usize>,
}

fn number(d: &Document, key: &str) -> Option<i64> {
    match d.get(key)? {
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Int64(v) => Some(*v),
        Bson::Double(v) => Some(*v as i64),
        _ => None,
    }
}

/// Read a write command's reply: a write-concern error, or a write error other than a duplicate
/// key or a write conflict, fails; those two are reported by statement index.
pub(crate) fn write_reply(reply: &Document) -> Result<WriteReply, StoreError> {
    if let Ok(e) = reply.get_document("writeConcernError") {
        return Err(StoreError::Backend(format!(
            "write concern not satisfied: {} ({})",
            e.get_str("errmsg").unwrap_or_default(),
            number(e, "code").unwrap_or_default()
        )));
    }
    let mut out = WriteReply {
        n: number(reply, "n").unwrap_or_default(),
        conflicts: Vec::new(),
    };
    for e in reply.get_array("writeErrors").into_iter().flatten() {
        let e = e
            .as_document()
            .ok_or_else(|| backend("malformed write error"))?;
        let code = number(e, "code").unwrap_or_default();
        if code != i64::from(DUPLICATE_KEY) && code != WRITE_CONFLICT {
            return Err(StoreError::Backend(format!(
                "write failed: {} ({code})",
                e.get_str("errmsg").unwrap_or_default()
            )));
        }
        out.conflicts
            .push(number(e, "index").unwrap_or_default() as usize);
    }
    Ok(out)
}

/// The server error code of a command that failed, if it was the server that refused it.
pub(crate) fn error_code(e: &Error) -> Option<i32> {
    match *e.kind {
        ErrorKind::Command(ref c) => Some(c.code),
        _ => None,
    }
}

/// Whether a failed transaction may be run again from the start.
pub(crate) fn is_transient(e: &Error) -> bool {
    e.contains_label(TRANSIENT_TRANSACTION_ERROR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_carry_a_write_concern_only_outside_transactions() {
        let update = update_command("twins", vec![doc! { "q": {}, "u": {} }], false);
        assert_eq!(
            update,
            doc! {
                "update": "twins", "updates": [ { "q": {}, "u": {} } ], "ordered": false,
                "writeConcern": { "w": "majority", "j": true },
            }
        );
        let insert = insert_command("rollup_keys", vec![doc! { "_id": "k" }], true);
        assert_eq!(
            insert,
            doc! { "insert": "rollup_keys", "documents": [ { "_id": "k" } ], "ordered": false }
        );
    }

    #[test]
    fn duplicate_keys_and_write_conflicts_are_conflicts_and_other_errors_fail() {
        let reply = doc! {
            "ok": 1, "n": 3, "nModified": 2,
            "writeErrors": [
                { "index": 1, "code": 11000, "errmsg": "E11000 duplicate key" },
                { "index": 4, "code": 112, "errmsg": "WriteConflict" },
            ],
        };
        assert_eq!(
            write_reply(&reply).expect("reply"),
            WriteReply {
                n: 3,
                conflicts: vec![1, 4]
            }
        );
        let failed = doc! { "ok": 1, "n": 0, "writeErrors": [ { "index": 0, "code": 121, "errmsg": "validation" } ] };
        assert!(write_reply(&failed).is_err());
        let unsafe_write =
            doc! { "ok": 1, "n": 1, "writeConcernError": { "code": 64, "errmsg": "timeout" } };
        assert!(write_reply(&unsafe_write).is_err());
        assert_eq!(
            write_reply(&doc! { "ok": 1, "n": 2i64 }).expect("reply").n,
            2
        );
    }
}
