//! Storage errors.

/// Storage errors. All are worth retrying: the runtime keeps the batch and tries again.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed.
    #[error("store backend: {0}")]
    Backend(String),
}
