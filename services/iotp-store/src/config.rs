//! Which store, and where: the embedded store unless a MongoDB connection string is
//! configured, and how long each tier keeps its data ([`Retention`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::mongo::MongoStore;
use crate::sqlite::SqliteStore;
use crate::{Store, StoreError};

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

/// How long each tier keeps its data (the hot/warm/cold tiers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// Raw readings (and the dedup keys that guard them).
    #[serde(with = "humantime_serde")]
    pub raw: std::time::Duration,
    /// Hourly roll-ups.
    #[serde(with = "humantime_serde")]
    pub hourly: std::time::Duration,
    /// Daily roll-ups.
    #[serde(with = "humantime_serde")]
    pub daily: std::time::Duration,
}

impl Default for Retention {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            raw: std::time::Duration::from_secs(180 * DAY),
            hourly: std::time::Duration::from_secs(3 * 365 * DAY),
            daily: std::time::Duration::from_secs(10 * 365 * DAY),
        }
    }
}

impl Retention {
    /// Rules for `validate()`: each tier outlives the finer one.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.raw.is_zero() {
            out.push("retention.raw must be > 0".into());
        }
        if self.hourly < self.raw {
            out.push("retention.hourly must not be shorter than retention.raw".into());
        }
        if self.daily < self.hourly {
            out.push("retention.daily must not be shorter than retention.hourly".into());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RollupStore;

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
