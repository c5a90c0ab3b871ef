//! What the server answers: batched write commands (`update`, `insert`) and their replies, and
//! the classification of every driver or server error into a [`StoreError`] kind. The batched
//! commands are used where a write needs a per-statement outcome (optimistic concurrency on
//! twins) or runs inside a transaction (roll-ups): one round trip per at most `batch_size`
//! statements.

use mongodb::bson::{doc, Bson, Document};
use mongodb::error::{
    Error, ErrorKind, WriteFailure, RETRYABLE_WRITE_ERROR, TRANSIENT_TRANSACTION_ERROR,
    UNKNOWN_TRANSACTION_COMMIT_RESULT,
};

use crate::StoreError;

/// MongoDB's duplicate-key error.
pub(crate) const DUPLICATE_KEY: i32 = 11000;
/// MongoDB's write-conflict error (concurrent transactions touched the same document).
const WRITE_CONFLICT: i32 = 112;
/// The transaction is gone: aborted under the operation (by a conflict or its time limit).
const NO_SUCH_TRANSACTION: i32 = 251;

/// Server codes after which the same operation may succeed once the deployment has recovered:
/// unreachable or timed-out hosts (6, 7, 89, 9001, 262, 50), a primary stepping down or a
/// node that is not (yet) primary (189, 10107, 13435, 13436, 10058, 11602), shutting down
/// (91, 11600), majority reads not available yet (134), a write concern not confirmed in time
/// (64). The driver's retryable-read codes plus 50 and 64.
const UNAVAILABLE_CODES: [i32; 16] = [
    6, 7, 50, 64, 89, 91, 134, 189, 262, 9001, 10058, 10107, 11600, 11602, 13435, 13436,
];

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
        let code = number(e, "code").unwrap_or_default();
        return Err(code_error(
            code,
            format!(
                "write concern not satisfied: {} ({code})",
                e.get_str("errmsg").unwrap_or_default()
            ),
        ));
    }
    let mut out = WriteReply {
        n: number(reply, "n").unwrap_or_default(),
        conflicts: Vec::new(),
    };
    for e in reply.get_array("writeErrors").into_iter().flatten() {
        let e = e
            .as_document()
            .ok_or_else(|| StoreError::Backend("malformed write error in a reply".into()))?;
        let code = number(e, "code").unwrap_or_default();
        if code != i64::from(DUPLICATE_KEY) && code != i64::from(WRITE_CONFLICT) {
            return Err(code_error(
                code,
                format!(
                    "write failed: {} ({code})",
                    e.get_str("errmsg").unwrap_or_default()
                ),
            ));
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

/// The kind of a server error code, with `message`: a concurrent writer (write conflict,
/// duplicate key: an upsert raced another writer's insert of the same `_id`, a transaction
/// aborted under the operation), an unavailable deployment ([`UNAVAILABLE_CODES`]), or else a
/// refusal a retry does not change (validation, an illegal operation such as a transaction on
/// a standalone server, authorization).
pub(crate) fn code_error(code: impl Into<i64>, message: String) -> StoreError {
    let code = code.into();
    if [WRITE_CONFLICT, DUPLICATE_KEY, NO_SUCH_TRANSACTION]
        .iter()
        .any(|c| i64::from(*c) == code)
    {
        StoreError::Conflict(message)
    } else if UNAVAILABLE_CODES.iter().any(|c| i64::from(*c) == code) {
        StoreError::Unavailable(message)
    } else {
        StoreError::Backend(message)
    }
}

/// The store's error for a driver error. Labels first, as the driver and server set them:
/// `TransientTransactionError` (the transaction may be run again from the start: a write
/// conflict, a network error inside it) is a conflict; `UnknownTransactionCommitResult` and
/// `RetryableWriteError` (the outcome or the server is unknown for now) are unavailability.
/// Then the kind: network I/O, a cleared connection pool, no server selectable (an election,
/// a partition) and DNS failures are unavailability; a server error is classified by its code
/// ([`code_error`]); a document that does not deserialize is corrupt data; anything else
/// (invalid arguments, authentication, TLS configuration, an incompatible server) is permanent.
pub(crate) fn mongo_error(e: Error) -> StoreError {
    let message = e.to_string();
    if e.contains_label(TRANSIENT_TRANSACTION_ERROR) {
        return StoreError::Conflict(message);
    }
    if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT)
        || e.contains_label(RETRYABLE_WRITE_ERROR)
    {
        return StoreError::Unavailable(message);
    }
    match *e.kind {
        ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::DnsResolve { .. } => StoreError::Unavailable(message),
        ErrorKind::Command(ref c) => code_error(c.code, message),
        ErrorKind::Write(WriteFailure::WriteConcernError(ref w)) => code_error(w.code, message),
        ErrorKind::Write(WriteFailure::WriteError(ref w)) => code_error(w.code, message),
        // A write concern error concerns the whole batch. Otherwise the batch is transient
        // only if every statement that failed is: the first permanent one decides.
        ErrorKind::InsertMany(ref failure) => match &failure.write_concern_error {
            Some(w) => code_error(w.code, message),
            None => {
                let codes: Vec<i32> = failure
                    .write_errors
                    .iter()
                    .flatten()
                    .map(|w| w.code)
                    .collect();
                let permanent = codes
                    .iter()
                    .find(|code| !code_error(**code, String::new()).is_transient());
                match permanent.or(codes.first()) {
                    Some(code) => code_error(*code, message),
                    None => StoreError::Backend(message),
                }
            }
        },
        ErrorKind::BsonDeserialization(_) => StoreError::Corrupt(message),
        _ => StoreError::Backend(message),
    }
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

    fn server_error(code: i32, name: &str) -> Error {
        let e: mongodb::error::CommandError = mongodb::bson::from_document(
            doc! { "code": code, "codeName": name, "errmsg": format!("{name} happened") },
        )
        .expect("command error");
        Error::from(ErrorKind::Command(e))
    }

    #[test]
    fn lost_connections_and_elections_are_unavailable_conflicts_are_conflicts_the_rest_permanent() {
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let io = mongo_error(Error::from(ErrorKind::Io(std::sync::Arc::new(reset))));
        assert!(matches!(io, StoreError::Unavailable(_)), "{io}");
        for (code, name) in [
            (189, "PrimarySteppedDown"),
            (10107, "NotWritablePrimary"),
            (91, "ShutdownInProgress"),
            (89, "NetworkTimeout"),
            (64, "WriteConcernFailed"),
        ] {
            let e = mongo_error(server_error(code, name));
            assert!(matches!(e, StoreError::Unavailable(_)), "{name}: {e}");
        }
        for (code, name) in [(112, "WriteConflict"), (11000, "DuplicateKey")] {
            let e = mongo_error(server_error(code, name));
            assert!(matches!(e, StoreError::Conflict(_)), "{name}: {e}");
            assert!(e.is_transient());
        }
        for (code, name) in [
            (20, "IllegalOperation"),
            (121, "DocumentValidationFailure"),
            (13, "Unauthorized"),
        ] {
            let e = mongo_error(server_error(code, name));
            assert!(matches!(e, StoreError::Backend(_)), "{name}: {e}");
            assert!(!e.is_transient());
        }
        let wrong_shape = mongodb::bson::from_document::<i64>(doc! { "a": 1 }).expect_err("shape");
        let e = mongo_error(Error::from(ErrorKind::BsonDeserialization(wrong_shape)));
        assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
    }

    #[test]
    fn a_write_concern_timeout_is_transient_an_unsatisfiable_one_is_not() {
        let timeout = doc! { "ok": 1, "n": 1, "writeConcernError": { "code": 64, "errmsg": "waiting for replication timed out" } };
        assert!(matches!(
            write_reply(&timeout),
            Err(StoreError::Unavailable(_))
        ));
        let unsatisfiable = doc! { "ok": 1, "n": 1, "writeConcernError": { "code": 100, "errmsg": "not enough data-bearing nodes" } };
        assert!(matches!(
            write_reply(&unsatisfiable),
            Err(StoreError::Backend(_))
        ));
        let invalid = doc! { "ok": 1, "n": 0, "writeErrors": [ { "index": 0, "code": 121, "errmsg": "validation" } ] };
        assert!(matches!(write_reply(&invalid), Err(StoreError::Backend(_))));
    }
}
