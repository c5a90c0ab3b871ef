//! What a processing stage is: logic from a batch of consumed records to one verdict per
//! record. Consuming, producing, dead-lettering, retrying, offsets, metrics and shutdown are
//! the runtime's ([`crate::consume`]).
//!
//! The error model, in one place: a record that cannot go on is a [`Verdict::Reject`] (a dead
//! letter with a reason code); a step that failed as a whole returns a [`StageError`] that says
//! whether the runtime retries the same batch ([`StageError::Retry`], with its one
//! [`crate::retry::Backoff`]) or stops the service without committing ([`StageError::Stop`]).

use std::future::Future;

use iotp_contract::{Classify, Recovery};

/// One consumed Kafka record.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// Topic it was read from.
    pub topic: &'a str,
    /// Its partition.
    pub partition: i32,
    /// Its offset in the partition (with topic, partition and item, a dead letter's default id).
    pub offset: i64,
    /// Its index in the bundle at that offset (`iotp_contract::bundle`); `None` for a Kafka
    /// record of its own.
    pub item: Option<u32>,
    /// Partitioning key (`tenant/deviceId` for device records).
    pub key: Option<&'a [u8]>,
    /// Value (empty for a tombstone).
    pub payload: &'a [u8],
    /// Set when the DLQ handler put this record back for another attempt.
    pub replayed: Option<Replayed<'a>>,
    /// Its W3C `traceparent` header, if it has one: the runtime copies it onto the outputs
    /// made from it and onto its dead letter ([`crate::trace`]).
    pub traceparent: Option<&'a [u8]>,
}

/// Where a replayed record comes from: read from its Kafka headers
/// ([`crate::dead_letter::replay`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replayed<'a> {
    /// Id of the dead letter it was replayed from: a new failure updates that dead letter.
    pub dead_letter_id: &'a str,
    /// Attempts made so far.
    pub attempts: i32,
    /// When it first failed, epoch ms.
    pub first_failure_at: i64,
}

/// A record to produce.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Output {
    /// Topic; `None` is the stage's configured output topic.
    pub topic: Option<String>,
    /// Partitioning key (`tenant/deviceId` for device records).
    pub key: Vec<u8>,
    /// Encoded value.
    pub value: Vec<u8>,
    /// Kafka headers (`traceparent`, the replay headers).
    pub headers: Vec<(&'static str, Vec<u8>)>,
}

impl Output {
    /// A record for the stage's output topic.
    pub fn new(key: impl Into<Vec<u8>>, value: Vec<u8>) -> Self {
        Self {
            key: key.into(),
            value,
            ..Self::default()
        }
    }
}

/// Why a record cannot go on. The record travels to the dead-letter path with its original
/// bytes; the DLQ handler retries transient reasons with backoff and parks the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// Machine-readable reason code (`unknown_schema`, `bad_seq_no`, …).
    pub reason: &'static str,
    /// Human-readable text; never payload contents.
    pub error: String,
    /// Worth retrying later (a dependency was down), as opposed to bad input.
    pub transient: bool,
    /// Tenant, if known.
    pub tenant: Option<String>,
    /// Device, if known.
    pub device_id: Option<String>,
}

impl Rejection {
    /// A permanent rejection: the input itself is bad.
    pub fn permanent(reason: &'static str, error: impl Into<String>) -> Self {
        Self {
            reason,
            error: error.into(),
            transient: false,
            tenant: None,
            device_id: None,
        }
    }

    /// A transient rejection: try again later.
    pub fn transient(reason: &'static str, error: impl Into<String>) -> Self {
        Self {
            transient: true,
            ..Self::permanent(reason, error)
        }
    }
}

/// What to do with one input.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Produce these records (none: consumed, nothing to pass on).
    Emit(Vec<Output>),
    /// Dead-letter the input.
    Reject(Rejection),
}

/// A stage step that failed as a whole (not one record's fault).
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A dependency failed for now: the runtime retries the same batch after its backoff and
    /// acknowledges nothing meanwhile (the step must be idempotent).
    #[error("{0:#}")]
    Retry(anyhow::Error),
    /// Retrying cannot help: the service stops without committing.
    #[error("{0:#}")]
    Stop(anyhow::Error),
}

impl StageError {
    /// A transient failure.
    pub fn retry(e: impl Into<anyhow::Error>) -> Self {
        Self::Retry(e.into())
    }

    /// A failure retrying cannot mend.
    pub fn stop(e: impl Into<anyhow::Error>) -> Self {
        Self::Stop(e.into())
    }
}

/// Errors of the lower layers (codec, store) carry their own class.
impl<E> From<E> for StageError
where
    E: Classify + std::error::Error + Send + Sync + 'static,
{
    fn from(e: E) -> Self {
        match e.recovery() {
            Recovery::Retry => Self::Retry(e.into()),
            Recovery::Stop => Self::Stop(e.into()),
        }
    }
}

/// A stage's logic.
pub trait Stage: Send + 'static {
    /// Stage name, used in dead letters and metrics.
    const NAME: &'static str;

    /// One verdict per input, in input order. Side effects a stage owns (the enricher's twin
    /// writes) finish before it returns, so they are done before the batch is committed. On
    /// [`StageError::Retry`] the runtime calls it again with the same batch.
    fn process(
        &mut self,
        batch: &[Input<'_>],
    ) -> impl Future<Output = Result<Vec<Verdict>, StageError>> + Send;

    /// Called every `io.tick_interval` between batches: periodic work such as liveness checks
    /// or window flushes. Returned records are produced like a batch's outputs. A `Retry`
    /// error waits for the next tick.
    fn tick(&mut self) -> impl Future<Output = Result<Vec<Output>, StageError>> + Send {
        async { Ok(Vec::new()) }
    }

    /// Called once Kafka and RabbitMQ confirmed everything the last `process` or `tick`
    /// returned (and, for a batch, its offsets are stored): e.g. mark emitted windows published.
    fn delivered(&mut self) -> impl Future<Output = Result<(), StageError>> + Send {
        async { Ok(()) }
    }
}
