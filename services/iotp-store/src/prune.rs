//! Retention enforcement by the store itself, for backends without server-side expiry (the
//! embedded one); the tiers are [`crate::Retention`].

use std::future::Future;

use crate::{Retention, StoreError};

/// What a pruning pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Raw messages (with their readings).
    pub raw: u64,
    /// Hourly buckets.
    pub hourly: u64,
    /// Daily buckets.
    pub daily: u64,
}

/// Retention enforcement for backends without server-side TTL (the embedded one).
pub trait Pruning: Send + Sync + 'static {
    /// Remove what is older than its tier allows at `now_ms` (event time).
    ///
    /// Safe to call again: deletions by age, in one transaction on the embedded store (nothing
    /// to do where the server expires data itself).
    fn prune(
        &self,
        now_ms: i64,
        retention: &Retention,
    ) -> impl Future<Output = Result<PruneReport, StoreError>> + Send;
}
