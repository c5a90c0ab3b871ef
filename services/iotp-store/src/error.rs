//! Storage errors, classified by what the caller should do about them. The store never retries
//! by itself: a transient error ([`StoreError::is_transient`]) goes back to the stage runtime,
//! which runs the whole operation again under its one backoff policy (every operation is safe
//! to run again, see each trait method); a permanent one is a defect or damaged data, which no
//! retry fixes. Each backend maps its driver's errors onto these kinds (`sqlite::sqlite_error`,
//! `mongo::command::mongo_error`).

/// A failed store operation, by what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store cannot serve the operation right now: the connection was lost or timed out,
    /// no MongoDB server could be selected (election, network), the server is shutting down or
    /// stepping down, a write concern was not confirmed in time, SQLite stayed busy or locked by
    /// another process beyond its busy timeout, the disk is full. Transient: back off and run
    /// the operation again.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A concurrent writer got there first: an optimistic-concurrency check (a twin's
    /// `version`, a bucket's `revision`) found a newer document than the one read, MongoDB
    /// aborted a transaction (`TransientTransactionError`, write conflict), or another writer
    /// holds the lease on a message key. Transient: run the operation again; it reads the
    /// newer state.
    #[error("store conflict: {0}")]
    Conflict(String),
    /// The backend refused the operation for a reason a retry does not change: a statement or
    /// document the schema does not take, a server that cannot run it (MongoDB transactions on
    /// a standalone server), a file that cannot be opened, a failed authentication. Permanent:
    /// a defect or a misconfiguration.
    #[error("store backend: {0}")]
    Backend(String),
    /// Stored data the store cannot read back: a damaged or foreign SQLite file, a document or
    /// column value of the wrong type or shape. Permanent.
    #[error("store data corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether the same operation, run again later, may succeed: [`StoreError::Unavailable`]
    /// and [`StoreError::Conflict`].
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Conflict(_))
    }
}

impl iotp_contract::Classify for StoreError {
    /// Transient kinds are retried by the runtime; the rest stop the service.
    fn recovery(&self) -> iotp_contract::Recovery {
        if self.is_transient() {
            iotp_contract::Recovery::Retry
        } else {
            iotp_contract::Recovery::Stop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_and_conflicts_are_transient_defects_and_damage_are_not() {
        assert!(StoreError::Unavailable("timeout".into()).is_transient());
        assert!(StoreError::Conflict("version".into()).is_transient());
        assert!(!StoreError::Backend("no such table".into()).is_transient());
        assert!(!StoreError::Corrupt("not a database".into()).is_transient());
        assert_eq!(
            StoreError::Conflict("twin acme/m-1 changed".into()).to_string(),
            "store conflict: twin acme/m-1 changed"
        );
    }
}
