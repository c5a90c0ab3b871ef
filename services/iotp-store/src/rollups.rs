//! The roll-up part of the storage contract: hourly and daily [`Bucket`]s of each metric of
//! each device, the watermark, and which buckets are due for publication. The fold of one
//! reading into a bucket is [`crate::fold::fold_reading`], shared by every backend.

use std::future::Future;

use iotp_contract::Aggregate;

use crate::{MessageRecord, StoreError};

/// A roll-up bucket of one metric of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// Tenant; with device, metric, granularity and start, the bucket's key.
    pub tenant: String,
    /// Device id.
    pub device_id: String,
    /// Metric name, as in the readings.
    pub metric: String,
    /// `hour` or `day` (see [`GRANULARITIES`]).
    pub granularity: String,
    /// Bucket start, epoch ms (UTC), a multiple of the granularity's length.
    pub bucket_start: i64,
    /// Readings folded in.
    pub count: i64,
    /// Sum of the values (the mean is `sum / count`).
    pub sum: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Value with the earliest event time.
    pub first: f64,
    /// Event time of `first`, epoch ms.
    pub first_at: i64,
    /// Value with the latest event time.
    pub last: f64,
    /// Event time of `last`, epoch ms.
    pub last_at: i64,
    /// Canonical unit of the metric, from the first reading folded in.
    pub unit: Option<String>,
    /// Cumulative counter: published roll-ups carry `last - first`.
    pub cumulative: bool,
    /// Starts at 1 and grows with every change: a bucket published at one revision is due
    /// again when late data raises it.
    pub revision: i64,
}

/// The published form of a bucket: the mean and, for a cumulative counter, the delta over the
/// bucket are derived here, not stored.
impl From<&Bucket> for Aggregate {
    fn from(b: &Bucket) -> Self {
        Aggregate {
            tenant: b.tenant.clone(),
            device_id: b.device_id.clone(),
            metric: b.metric.clone(),
            granularity: b.granularity.clone(),
            bucket_start: b.bucket_start,
            count: b.count,
            sum: b.sum,
            min: b.min,
            max: b.max,
            avg: b.sum / b.count.max(1) as f64,
            first: b.first,
            first_at: b.first_at,
            last: b.last,
            last_at: b.last_at,
            delta: b.cumulative.then_some(b.last - b.first),
            unit: b.unit.clone(),
            revision: b.revision,
        }
    }
}

/// Roll-up granularities and their lengths.
pub const GRANULARITIES: [(&str, i64); 2] = [("hour", 3_600_000), ("day", 86_400_000)];

/// What folding a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FoldReport {
    /// Messages folded.
    pub applied: u64,
    /// Messages folded before (redeliveries, replays): skipped.
    pub duplicates: u64,
}

/// The roll-up part of the storage contract. No method retries by itself; each may be called
/// again after a transient error ([`StoreError::is_transient`]), as its doc says why.
pub trait RollupStore: Send + Sync + 'static {
    /// Fold each message not folded before into its hour and day buckets, in one transaction,
    /// and raise the watermark (newest event time seen) to `watermark` if higher.
    /// `cumulative(metric)` says which metrics are counters.
    ///
    /// Safe to call again: the fold is one transaction on both backends, and the keys of the
    /// messages folded commit with the buckets, so a call made again after a failure folds
    /// exactly the messages the failed one did not commit. If a commit did happen although
    /// the call failed (MongoDB: outcome unknown), its messages are reported as duplicates the
    /// next time. A bucket changed by another writer since it was read is a
    /// [`StoreError::Conflict`].
    ///
    /// Takes the batch, as [`crate::TwinStore::apply`] does.
    fn fold(
        &self,
        messages: Vec<MessageRecord>,
        cumulative: &[String],
        watermark: i64,
    ) -> impl Future<Output = Result<FoldReport, StoreError>> + Send;
    /// The watermark: newest event time folded. A read: safe to call again.
    fn watermark(&self) -> impl Future<Output = Result<i64, StoreError>> + Send;
    /// Buckets changed since they were last published whose end plus `lateness` is at or
    /// before the watermark. A read: safe to call again.
    fn closed_unpublished(
        &self,
        lateness_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Bucket>, StoreError>> + Send;
    /// Record these buckets (at these revisions) as published.
    ///
    /// Safe to call again: the published revision is raised to the bucket's with a maximum,
    /// never added to, so recording it twice is recording it once.
    fn mark_published(
        &self,
        buckets: &[Bucket],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// All buckets of a device. A read: safe to call again.
    fn buckets(
        &self,
        tenant: &str,
        device_id: &str,
    ) -> impl Future<Output = Result<Vec<Bucket>, StoreError>> + Send;
}
