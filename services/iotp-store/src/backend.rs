//! The configured store: [`Store`] holds whichever backend [`crate::StoreConfig::open`]
//! picked and keeps the whole contract by delegating to it. Each write is a span
//! (`store {operation}`) when it runs under one of the runtime's batch spans; otherwise (no
//! span exporter, or a tick) it costs a look at the current context and nothing more.

use std::future::Future;

use iotp_contract::DeadLetter;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{global, Context, KeyValue};

use crate::mongo::MongoStore;
use crate::sqlite::SqliteStore;
use crate::{
    Archived, Bucket, DeadLetterArchive, FoldReport, LetterFilter, LivenessCounts, MessageRecord,
    Observation, PageCursor, PruneReport, Pruning, ReadingStore, Retention, RollupStore,
    StoreError, StoredPage, Twin, TwinStore, WriteReport,
};

/// The configured store: whichever backend [`crate::StoreConfig::open`] picked, keeping the
/// whole contract. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub enum Store {
    /// The embedded store: SQLite, one file shared by the services of one machine.
    Embedded(SqliteStore),
    /// MongoDB (production): a replica set or sharded cluster.
    Mongo(MongoStore),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Store::Embedded($s) => $call.await,
            Store::Mongo($s) => $call.await,
        }
    };
}

impl Store {
    /// `write` as span `store {operation}` (`records` written), a child of the current span;
    /// untraced when there is none.
    async fn traced<T>(
        &self,
        operation: &'static str,
        records: usize,
        write: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let parent = Context::current();
        if !parent.has_active_span() {
            return write.await;
        }
        let system = match self {
            Store::Embedded(_) => "sqlite",
            Store::Mongo(_) => "mongodb",
        };
        let tracer = global::tracer("iotp-store");
        let span = tracer
            .span_builder(format!("store {operation}"))
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("db.system.name", system),
                KeyValue::new("db.operation.name", operation),
                KeyValue::new("iotp.store.records", records as i64),
            ])
            .start_with_context(&tracer, &parent);
        let cx = parent.with_span(span);
        let result = write.with_context(cx.clone()).await;
        if let Err(e) = &result {
            cx.span().set_status(Status::error(e.to_string()));
        }
        cx.span().end();
        result
    }
}

impl TwinStore for Store {
    async fn apply(&self, observations: Vec<Observation>) -> Result<(), StoreError> {
        self.traced("apply_twins", observations.len(), async {
            delegate!(self, s => s.apply(observations))
        })
        .await
    }

    async fn twin(&self, tenant: &str, device_id: &str) -> Result<Option<Twin>, StoreError> {
        delegate!(self, s => s.twin(tenant, device_id))
    }

    async fn mark_offline(&self, now_ms: i64, missed: u32) -> Result<u64, StoreError> {
        self.traced("mark_offline", 0, async {
            delegate!(self, s => s.mark_offline(now_ms, missed))
        })
        .await
    }

    async fn liveness_counts(&self) -> Result<LivenessCounts, StoreError> {
        delegate!(self, s => s.liveness_counts())
    }
}

impl ReadingStore for Store {
    async fn write_messages(
        &self,
        messages: Vec<MessageRecord>,
    ) -> Result<WriteReport, StoreError> {
        self.traced("write_messages", messages.len(), async {
            delegate!(self, s => s.write_messages(messages))
        })
        .await
    }

    async fn message_count(&self, tenant: Option<&str>) -> Result<u64, StoreError> {
        delegate!(self, s => s.message_count(tenant))
    }

    async fn reading_count(&self, tenant: Option<&str>) -> Result<u64, StoreError> {
        delegate!(self, s => s.reading_count(tenant))
    }

    async fn stored_messages(
        &self,
        tenant: &str,
        after: Option<&PageCursor>,
        limit: usize,
    ) -> Result<StoredPage, StoreError> {
        delegate!(self, s => s.stored_messages(tenant, after, limit))
    }

    async fn update_seq_gaps(&self, devices: &[(String, String)]) -> Result<u64, StoreError> {
        self.traced("update_seq_gaps", devices.len(), async {
            delegate!(self, s => s.update_seq_gaps(devices))
        })
        .await
    }
}

impl RollupStore for Store {
    async fn fold(
        &self,
        messages: Vec<MessageRecord>,
        cumulative: &[String],
        watermark: i64,
    ) -> Result<FoldReport, StoreError> {
        self.traced("fold", messages.len(), async {
            delegate!(self, s => s.fold(messages, cumulative, watermark))
        })
        .await
    }

    async fn watermark(&self) -> Result<i64, StoreError> {
        delegate!(self, s => s.watermark())
    }

    async fn closed_unpublished(
        &self,
        lateness_ms: i64,
        limit: usize,
    ) -> Result<Vec<Bucket>, StoreError> {
        delegate!(self, s => s.closed_unpublished(lateness_ms, limit))
    }

    async fn mark_published(&self, buckets: &[Bucket]) -> Result<(), StoreError> {
        self.traced("mark_published", buckets.len(), async {
            delegate!(self, s => s.mark_published(buckets))
        })
        .await
    }

    async fn buckets(&self, tenant: &str, device_id: &str) -> Result<Vec<Bucket>, StoreError> {
        delegate!(self, s => s.buckets(tenant, device_id))
    }
}

impl DeadLetterArchive for Store {
    async fn archive(
        &self,
        letter: &DeadLetter,
        parked_at: i64,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        self.traced("archive", 1, async {
            delegate!(self, s => s.archive(letter, parked_at, expires_at))
        })
        .await
    }

    async fn letters(&self, filter: &LetterFilter) -> Result<Vec<Archived>, StoreError> {
        delegate!(self, s => s.letters(filter))
    }

    async fn mark_replayed(&self, ids: &[String], at: i64) -> Result<(), StoreError> {
        self.traced("mark_replayed", ids.len(), async {
            delegate!(self, s => s.mark_replayed(ids, at))
        })
        .await
    }

    async fn prune_letters(&self, now_ms: i64) -> Result<u64, StoreError> {
        delegate!(self, s => s.prune_letters(now_ms))
    }
}

impl Pruning for Store {
    async fn prune(&self, now_ms: i64, retention: &Retention) -> Result<PruneReport, StoreError> {
        delegate!(self, s => s.prune(now_ms, retention))
    }
}
