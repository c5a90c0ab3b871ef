//! Multi-document transactions: [`MongoStore::in_transaction`] runs a body once in one
//! transaction (read concern `snapshot`, write concern `majority` with journaling at commit) and
//! commits it, or aborts it when the body fails. Reads and writes inside it go through
//! [`find_in`] and [`write_all`], which carry the session.
//!
//! Nothing here runs a transaction twice. A transaction the server aborted
//! (`TransientTransactionError`: a write conflict, a network error inside it) or a write that
//! met a document changed since it was read comes back as [`StoreError::Conflict`], a commit
//! whose outcome is unknown (`UnknownTransactionCommitResult`; the driver has already retried
//! the commit once) as [`StoreError::Unavailable`]. The caller's retry runs the whole operation
//! again, which must therefore find out what a committed earlier attempt already did (the
//! roll-up fold does, through its message keys).
//!
//! **Transactions need a replica set or a sharded cluster** (the normal production set-up); a
//! single server must be started as a one-node replica set (`mongod --replSet rs0`, then
//! `rs.initiate()`).

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::options::{ReadConcern, WriteConcern};
use mongodb::{ClientSession, Collection};

use super::command::{error_code, insert_command, mongo_error, update_command, write_reply};
use super::MongoStore;
use crate::StoreError;

/// The server's answer to a transaction on a standalone server.
const ILLEGAL_OPERATION: i32 = 20;

/// Whether a `hello` reply comes from a deployment that runs transactions: a replica-set
/// member or a `mongos`.
pub(crate) fn supports_transactions(hello: &Document) -> bool {
    hello.contains_key("setName") || hello.get_str("msg") == Ok("isdbgrid")
}

/// The store's error for a driver error inside a transaction: [`mongo_error`], with the reason
/// added when the server refuses transactions altogether.
fn transaction_error(e: mongodb::error::Error) -> StoreError {
    if error_code(&e) == Some(ILLEGAL_OPERATION) {
        StoreError::Backend(format!(
            "{e} (transactions need a replica set or a sharded cluster)"
        ))
    } else {
        mongo_error(e)
    }
}

impl MongoStore {
    /// Run `body` in one transaction on a new session, once, and commit it; abort it if `body`
    /// fails. Either everything `body` wrote commits or nothing does.
    pub(crate) async fn in_transaction<T>(
        &self,
        body: impl AsyncFnOnce(&mut ClientSession) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut session = self
            .db
            .client()
            .start_session()
            .await
            .map_err(mongo_error)?;
        let mut concern = WriteConcern::majority();
        concern.journal = Some(true);
        session
            .start_transaction()
            .read_concern(ReadConcern::snapshot())
            .write_concern(concern)
            .await
            .map_err(transaction_error)?;
        match body(&mut session).await {
            Ok(value) => {
                session
                    .commit_transaction()
                    .await
                    .map_err(transaction_error)?;
                Ok(value)
            }
            Err(e) => {
                // The server may have aborted it already; either way it is over.
                let _ = session.abort_transaction().await;
                Err(e)
            }
        }
    }
}

/// The documents of `coll` with these `_id`s, read in the session's transaction, `batch` ids
/// per query.
pub(crate) async fn find_in<T>(
    coll: &Collection<T>,
    session: &mut ClientSession,
    ids: &[String],
    batch: usize,
) -> Result<Vec<T>, StoreError>
where
    T: serde::de::DeserializeOwned + Send + Sync,
{
    let mut out = Vec::new();
    for chunk in ids.chunks(batch) {
        let mut cursor = coll
            .find(doc! { "_id": { "$in": chunk } })
            .session(&mut *session)
            .await
            .map_err(transaction_error)?;
        let docs: Vec<T> = cursor
            .stream(&mut *session)
            .try_collect()
            .await
            .map_err(transaction_error)?;
        out.extend(docs);
    }
    Ok(out)
}

/// Run write statements (`insert` documents, or `update` statements) in the session's
/// transaction. A statement that met a changed document (duplicate key, write conflict) or
/// matched nothing is a [`StoreError::Conflict`]: the transaction is then aborted by the caller.
pub(crate) async fn write_all(
    store: &MongoStore,
    session: &mut ClientSession,
    collection: &str,
    statements: Vec<Document>,
    insert: bool,
) -> Result<(), StoreError> {
    for chunk in statements.chunks(store.batch_size) {
        let command = if insert {
            insert_command(collection, chunk.to_vec(), true)
        } else {
            update_command(collection, chunk.to_vec(), true)
        };
        let reply = store
            .db
            .run_command(command)
            .session(&mut *session)
            .await
            .map_err(transaction_error)?;
        let reply = write_reply(&reply)?;
        if !reply.conflicts.is_empty() || reply.n != chunk.len() as i64 {
            return Err(StoreError::Conflict(format!(
                "{collection} changed under the transaction"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_replica_sets_and_mongos_run_transactions() {
        assert!(supports_transactions(
            &doc! { "isWritablePrimary": true, "setName": "rs0" }
        ));
        assert!(supports_transactions(
            &doc! { "isWritablePrimary": true, "msg": "isdbgrid" }
        ));
        assert!(!supports_transactions(&doc! { "isWritablePrimary": true }));
    }
}
