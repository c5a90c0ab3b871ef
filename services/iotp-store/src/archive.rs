//! The dead-letter archive part of the storage contract: parked dead letters kept until their
//! own expiry, listed by filter, marked when replayed.

use std::future::Future;

use iotp_contract::DeadLetter;
use serde::{Deserialize, Serialize};

use crate::StoreError;

/// A parked dead letter in the archive.
#[derive(Debug, Clone, PartialEq)]
pub struct Archived {
    /// The dead letter as the failing stage produced it (original bytes included).
    pub letter: DeadLetter,
    /// When it was parked, epoch ms.
    pub parked_at: i64,
    /// When the archive may forget it, epoch ms.
    pub expires_at: i64,
    /// When it was last replayed, epoch ms, if it was since it was last parked.
    pub replayed_at: Option<i64>,
    /// How often it was replayed, over all its parkings.
    pub replays: i64,
}

/// Which archived dead letters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LetterFilter {
    /// Exactly these ids (empty: any).
    pub ids: Vec<String>,
    /// Only this reason code (`unknown_device`, …).
    pub reason: Option<String>,
    /// Only letters of this stage (`enricher`, …).
    pub stage: Option<String>,
    /// Only this tenant's letters.
    pub tenant: Option<String>,
    /// Only this device's letters.
    pub device_id: Option<String>,
    /// Also those already replayed.
    pub include_replayed: bool,
    /// At most this many (0: 1000).
    pub limit: usize,
}

/// The dead-letter archive part of the storage contract. No method retries by itself; each
/// may be called again after a transient error ([`StoreError::is_transient`]), as its doc says
/// why.
pub trait DeadLetterArchive: Send + Sync + 'static {
    /// Archive (or refresh, by id) a parked dead letter until `expires_at`.
    ///
    /// Safe to call again: one upsert by id that sets the same fields to the same values (and
    /// raises attempts and the last failure with a maximum), so twice is once.
    fn archive(
        &self,
        letter: &DeadLetter,
        parked_at: i64,
        expires_at: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Matching dead letters, oldest parked first. A read: safe to call again.
    fn letters(
        &self,
        filter: &LetterFilter,
    ) -> impl Future<Output = Result<Vec<Archived>, StoreError>> + Send;
    /// Record that these were replayed at `at`: the replay time is set and the replay count
    /// raised by one, once per `at`.
    ///
    /// Safe to call again with the same `at`: a letter already marked replayed at `at` is left
    /// alone, so a call that failed after marking some letters (MongoDB marks them in chunks)
    /// does not count their replay twice when made again.
    fn mark_replayed(
        &self,
        ids: &[String],
        at: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Forget what expired before `now_ms`; returns how many.
    ///
    /// Safe to call again: a deletion by expiry; what a failed call deleted is gone and not
    /// counted again.
    fn prune_letters(&self, now_ms: i64) -> impl Future<Output = Result<u64, StoreError>> + Send;
}
