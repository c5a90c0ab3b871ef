//! What a processing stage is: logic from a batch of consumed records to one verdict per
//! record. Consuming, producing, dead-lettering, offsets, metrics and shutdown are the
//! runtime's ([`crate::consume`]).

use std::future::Future;

/// One consumed Kafka record.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key.
    pub key: Option<&'a [u8]>,
    /// Value (empty for a tombstone).
    pub payload: &'a [u8],
    /// Set when the DLQ handler put this record back for another attempt.
    pub retry: Option<Retry<'a>>,
}

/// Where a retried record comes from: read from its Kafka headers
/// ([`crate::dead_letter::HEADER_DEAD_LETTER_ID`] and friends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry<'a> {
    /// Id of the dead letter it was replayed from: a new failure updates that dead letter.
    pub dead_letter_id: &'a str,
    /// Attempts made so far.
    pub attempts: i32,
    /// When it first failed, epoch ms.
    pub first_failure_at: i64,
}

/// A record to produce.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// Topic; `None` is the stage's configured output topic.
    pub topic: Option<String>,
    /// Key.
    pub key: Vec<u8>,
    /// Value.
    pub value: Vec<u8>,
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

/// A stage's logic.
pub trait Stage: Send + 'static {
    /// Stage name, used in dead letters and metrics.
    const NAME: &'static str;

    /// One verdict per input, in input order. Side effects a stage owns (the enricher's twin
    /// writes) finish before it returns, so they are done before the batch is committed. An
    /// `Err` is a defect or an unusable dependency: the service stops without committing, and
    /// the batch is consumed again after restart.
    fn process(
        &mut self,
        batch: &[Input<'_>],
    ) -> impl Future<Output = anyhow::Result<Vec<Verdict>>> + Send;

    /// Called every `io.tick_interval` between batches: periodic work such as liveness checks
    /// or window flushes. Returned records are produced like a batch's outputs.
    fn tick(&mut self) -> impl Future<Output = anyhow::Result<Vec<Output>>> + Send {
        async { Ok(Vec::new()) }
    }

    /// Called once Kafka and RabbitMQ confirmed everything the last `process` or `tick`
    /// returned (and, for a batch, its offsets are stored): e.g. mark emitted windows published.
    fn delivered(&mut self) -> impl Future<Output = anyhow::Result<()>> + Send {
        async { Ok(()) }
    }
}
