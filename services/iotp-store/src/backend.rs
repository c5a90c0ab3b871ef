//! Store selection, once for every service: the embedded store unless a MongoDB connection
//! string is configured. [`Store`] keeps the whole contract whichever backend it holds.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::mongo::MongoStore;
use crate::sqlite::SqliteStore;
use crate::{
    Archived, Bucket, DeadLetterArchive, FoldReport, LetterFilter, MessageRecord, Observation,
    PruneReport, Pruning, ReadingStore, Retention, RollupStore, StoreError, StoredMessage, Twin,
    TwinStore, WriteReport,
};
use iotp_core::contract::DeadLetter;

/// Which store, and where.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Embedded store (SQLite) file, used unless `mongodb_uri` is set.
    pub path: PathBuf,
    /// MongoDB connection string: use MongoDB instead (a replica set or sharded cluster:
    /// roll-ups use transactions). Never logged.
    pub mongodb_uri: Option<String>,
    /// MongoDB database.
    pub mongodb_database: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from(".run/iotp.sqlite"),
            mongodb_uri: None,
            mongodb_database: "iotp".into(),
        }
    }
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("path", &self.path)
            .field(
                "mongodb_uri",
                &self.mongodb_uri.as_ref().map(|_| "<redacted>"),
            )
            .field("mongodb_database", &self.mongodb_database)
            .finish()
    }
}

impl StoreConfig {
    /// Broken rules, for a service's `validate()`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        match &self.mongodb_uri {
            Some(uri) if uri.trim().is_empty() => {
                out.push("mongodb_uri must not be empty when set".into());
            }
            Some(_) if self.mongodb_database.trim().is_empty() => {
                out.push("mongodb_database must not be empty".into());
            }
            Some(_) => {}
            None if self.path.as_os_str().is_empty() => {
                out.push("store_path must not be empty".into());
            }
            None => {}
        }
        out
    }

    /// Open the configured store: connect to MongoDB and create or retune its collections
    /// (TTLs follow `retention`), or open the embedded file, creating its directory.
    pub async fn open(&self, retention: Retention) -> Result<Store, StoreError> {
        match &self.mongodb_uri {
            Some(uri) => {
                let store = MongoStore::connect(uri, &self.mongodb_database, retention).await?;
                tracing::info!(backend = "mongodb", database = %self.mongodb_database, "store opened");
                Ok(Store::Mongo(store))
            }
            None => {
                let store = SqliteStore::create(&self.path)?;
                tracing::info!(backend = "embedded", path = %self.path.display(), "store opened");
                Ok(Store::Embedded(store))
            }
        }
    }
}

/// The configured store.
#[derive(Clone)]
pub enum Store {
    /// SQLite, one file.
    Embedded(SqliteStore),
    /// MongoDB.
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

impl TwinStore for Store {
    async fn apply(&self, observations: &[Observation]) -> Result<(), StoreError> {
        delegate!(self, s => s.apply(observations))
    }

    async fn twin(&self, tenant: &str, device_id: &str) -> Result<Option<Twin>, StoreError> {
        delegate!(self, s => s.twin(tenant, device_id))
    }

    async fn mark_offline(&self, now_ms: i64, missed: u32) -> Result<u64, StoreError> {
        delegate!(self, s => s.mark_offline(now_ms, missed))
    }
}

impl ReadingStore for Store {
    async fn write_messages(&self, messages: &[MessageRecord]) -> Result<WriteReport, StoreError> {
        delegate!(self, s => s.write_messages(messages))
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
        after: Option<(String, i64)>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        delegate!(self, s => s.stored_messages(tenant, after, limit))
    }

    async fn update_seq_gaps(&self, devices: &[(String, String)]) -> Result<u64, StoreError> {
        delegate!(self, s => s.update_seq_gaps(devices))
    }
}

impl RollupStore for Store {
    async fn fold(
        &self,
        messages: &[MessageRecord],
        cumulative: &[String],
        watermark: i64,
    ) -> Result<FoldReport, StoreError> {
        delegate!(self, s => s.fold(messages, cumulative, watermark))
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
        delegate!(self, s => s.mark_published(buckets))
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
        delegate!(self, s => s.archive(letter, parked_at, expires_at))
    }

    async fn letters(&self, filter: &LetterFilter) -> Result<Vec<Archived>, StoreError> {
        delegate!(self, s => s.letters(filter))
    }

    async fn mark_replayed(&self, ids: &[String], at: i64) -> Result<(), StoreError> {
        delegate!(self, s => s.mark_replayed(ids, at))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_keep_the_embedded_store_and_the_uri_stays_out_of_logs() {
        let c = StoreConfig::default();
        assert_eq!(c.path, PathBuf::from(".run/iotp.sqlite"));
        assert_eq!(c.mongodb_database, "iotp");
        assert!(c.problems().is_empty());
        let secret = StoreConfig {
            mongodb_uri: Some("mongodb://user:secret@db/?replicaSet=rs0".into()),
            ..StoreConfig::default()
        };
        assert!(!format!("{secret:?}").contains("secret@"));
        let broken = StoreConfig {
            mongodb_uri: Some(" ".into()),
            ..StoreConfig::default()
        };
        assert_eq!(broken.problems().len(), 1);
        let unknown: Result<StoreConfig, _> = toml::from_str("paht = \"x\"");
        assert!(unknown.is_err(), "unknown keys are errors");
    }

    #[tokio::test]
    async fn without_a_uri_the_embedded_store_opens() {
        let path = std::env::temp_dir().join(format!("iotp-select-{}.sqlite", std::process::id()));
        let config = StoreConfig {
            path: path.clone(),
            ..StoreConfig::default()
        };
        let store = config.open(Retention::default()).await.expect("open");
        assert!(matches!(store, Store::Embedded(_)));
        assert_eq!(store.watermark().await.expect("watermark"), i64::MIN);
        let _ = std::fs::remove_file(path);
    }
}
