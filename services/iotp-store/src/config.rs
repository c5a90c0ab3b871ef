//! The store section of every service's configuration, `[store]`: which store and where (the
//! embedded file unless a MongoDB connection string is set), and how long each tier keeps its
//! data (`[store.retention]`). [`StoreConfig::open`] opens what it names.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::mongo::MongoStore;
use crate::sqlite::SqliteStore;
use crate::{Store, StoreError};

/// Which store, where, and its retention: a service's `[store]` section.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Embedded store (SQLite) file, used unless `mongodb_uri` is set; its directory is created
    /// if missing. The services of one machine share it.
    pub path: PathBuf,
    /// MongoDB connection string: use MongoDB instead (a replica set or sharded cluster:
    /// roll-ups use transactions). Never logged.
    pub mongodb_uri: Option<String>,
    /// MongoDB database holding every collection of the store.
    pub mongodb_database: String,
    /// MongoDB user this service logs in as (one user per service); wins over a user in the URI.
    pub mongodb_user: Option<String>,
    /// File holding `mongodb_user`'s password (one trailing newline dropped), read at start.
    pub mongodb_password_file: Option<PathBuf>,
    /// Database the user is defined in (`authSource`; MongoDB's default: `admin`, or the URI's
    /// database).
    pub mongodb_auth_source: Option<String>,
    /// Connect with TLS (as `tls=true` in the URI).
    pub mongodb_tls: bool,
    /// CA certificates (PEM) the server's certificate is checked against; needs `mongodb_tls`.
    pub mongodb_tls_ca_file: Option<PathBuf>,
    /// How long each tier keeps its data. On MongoDB every service that opens the store sets
    /// the server-side TTLs from it, so give every service the same values.
    pub retention: Retention,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from(".run/iotp.sqlite"),
            mongodb_uri: None,
            mongodb_database: "iotp".into(),
            mongodb_user: None,
            mongodb_password_file: None,
            mongodb_auth_source: None,
            mongodb_tls: false,
            mongodb_tls_ca_file: None,
            retention: Retention::default(),
        }
    }
}

/// The MongoDB URI's password hidden (`iotp_contract::redact`).
impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        iotp_contract::redact::debug("StoreConfig", self, f)
    }
}

impl StoreConfig {
    /// Broken rules, for a service's `validate()`, each naming its key in the `[store]`
    /// section: the chosen backend's settings, and the retention tiers.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        match &self.mongodb_uri {
            Some(uri) if uri.trim().is_empty() => {
                out.push("store.mongodb_uri must not be empty when set".into());
            }
            Some(_) if self.mongodb_database.trim().is_empty() => {
                out.push("store.mongodb_database must not be empty".into());
            }
            Some(_) => {}
            None if self.path.as_os_str().is_empty() => {
                out.push("store.path must not be empty".into());
            }
            None => {}
        }
        let mongo_only = [
            ("mongodb_user", self.mongodb_user.is_some()),
            (
                "mongodb_password_file",
                self.mongodb_password_file.is_some(),
            ),
            ("mongodb_auth_source", self.mongodb_auth_source.is_some()),
            ("mongodb_tls", self.mongodb_tls),
            ("mongodb_tls_ca_file", self.mongodb_tls_ca_file.is_some()),
        ];
        for (name, set) in mongo_only {
            if set && self.mongodb_uri.is_none() {
                out.push(format!("store.{name} needs store.mongodb_uri"));
            }
        }
        if self.mongodb_tls_ca_file.is_some() && !self.mongodb_tls {
            out.push("store.mongodb_tls_ca_file needs store.mongodb_tls = true".into());
        }
        if self.mongodb_password_file.is_some() && self.mongodb_user.is_none() {
            out.push("store.mongodb_password_file needs store.mongodb_user".into());
        }
        for (name, path) in [
            ("mongodb_password_file", &self.mongodb_password_file),
            ("mongodb_tls_ca_file", &self.mongodb_tls_ca_file),
        ] {
            if let Some(path) = path {
                if let Err(e) = std::fs::metadata(path) {
                    out.push(format!("store.{name}: cannot read {}: {e}", path.display()));
                }
            }
        }
        out.extend(self.retention.problems());
        out
    }

    /// Open the configured store: connect to MongoDB and create or retune its collections
    /// (TTLs follow `retention`), or open the embedded file, creating its directory.
    pub async fn open(&self) -> Result<Store, StoreError> {
        match &self.mongodb_uri {
            Some(uri) => {
                let options = crate::mongo::client_options(uri, self).await?;
                let store =
                    MongoStore::connect(options, &self.mongodb_database, self.retention).await?;
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

/// How long each tier keeps its data (the hot/warm/cold tiers), by event time: `[store.retention]`.
/// Durations are human-readable (`"180days"`, `"3years"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// Raw readings and the exactly-once keys that guard them (and the keys of messages folded
    /// into roll-ups); the parser rejects older messages as `too_old`. Default 180 days.
    #[serde(with = "humantime_serde")]
    pub raw: Duration,
    /// Hourly roll-up buckets, by bucket start; at least `raw`. Default 3 years.
    #[serde(with = "humantime_serde")]
    pub hourly: Duration,
    /// Daily roll-up buckets, by bucket start; at least `hourly`. Default 10 years.
    #[serde(with = "humantime_serde")]
    pub daily: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            raw: Duration::from_secs(180 * DAY),
            hourly: Duration::from_secs(3 * 365 * DAY),
            daily: Duration::from_secs(10 * 365 * DAY),
        }
    }
}

impl Retention {
    /// Broken rules, named by their keys under `[store]`: each tier outlives the finer one.
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.raw.is_zero() {
            out.push("store.retention.raw must be > 0".into());
        }
        if self.hourly < self.raw {
            out.push("store.retention.hourly must not be shorter than store.retention.raw".into());
        }
        if self.daily < self.hourly {
            out.push(
                "store.retention.daily must not be shorter than store.retention.hourly".into(),
            );
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
        let unknown: Result<StoreConfig, _> = toml::from_str("[retention]\nhot = \"1d\"");
        assert!(unknown.is_err(), "in the retention table too");
    }

    #[test]
    fn one_store_section_with_its_retention_table_and_all_problems_at_once() {
        #[derive(Deserialize)]
        struct Service {
            store: StoreConfig,
        }
        let s: Service = toml::from_str(
            r#"
            [store]
            path = "/var/lib/iotp/store.sqlite"
            mongodb_database = "telemetry"
            [store.retention]
            raw = "30days"
            hourly = "1year"
            "#,
        )
        .expect("parse");
        assert_eq!(s.store.path, PathBuf::from("/var/lib/iotp/store.sqlite"));
        assert_eq!(s.store.mongodb_database, "telemetry");
        assert_eq!(s.store.retention.raw, Duration::from_secs(30 * 86_400));
        assert_eq!(
            s.store.retention.daily,
            Retention::default().daily,
            "a key left out keeps its default"
        );
        assert!(s.store.problems().is_empty());
        let broken = StoreConfig {
            path: PathBuf::new(),
            retention: Retention {
                raw: Duration::ZERO,
                hourly: Duration::from_secs(7200),
                daily: Duration::from_secs(3600),
            },
            ..StoreConfig::default()
        };
        assert_eq!(
            broken.problems(),
            [
                "store.path must not be empty",
                "store.retention.raw must be > 0",
                "store.retention.daily must not be shorter than store.retention.hourly",
            ]
        );
        let mongo = StoreConfig {
            mongodb_uri: Some("mongodb://db/?replicaSet=rs0".into()),
            mongodb_database: " ".into(),
            ..broken
        };
        assert_eq!(
            mongo.problems()[0],
            "store.mongodb_database must not be empty"
        );
    }

    #[tokio::test]
    async fn without_a_uri_the_embedded_store_opens() {
        let path = std::env::temp_dir().join(format!("iotp-select-{}.sqlite", std::process::id()));
        let config = StoreConfig {
            path: path.clone(),
            ..StoreConfig::default()
        };
        let store = config.open().await.expect("open");
        assert!(matches!(store, Store::Embedded(_)));
        assert_eq!(store.watermark().await.expect("watermark"), i64::MIN);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn mongodb_credentials_need_the_uri_a_user_and_readable_files() {
        let without_uri = StoreConfig {
            mongodb_user: Some("u".into()),
            mongodb_tls: true,
            ..StoreConfig::default()
        };
        let problems = without_uri.problems().join("\n");
        assert!(
            problems.contains("store.mongodb_user needs store.mongodb_uri"),
            "{problems}"
        );
        assert!(
            problems.contains("store.mongodb_tls needs store.mongodb_uri"),
            "{problems}"
        );
        let config = StoreConfig {
            mongodb_uri: Some("mongodb://db-0:27017".into()),
            mongodb_password_file: Some("/nonexistent/pw".into()),
            mongodb_tls_ca_file: Some("/nonexistent/ca.pem".into()),
            ..StoreConfig::default()
        };
        let problems = config.problems().join("\n");
        for expected in [
            "store.mongodb_tls_ca_file needs store.mongodb_tls = true",
            "store.mongodb_password_file needs store.mongodb_user",
            "cannot read /nonexistent/pw",
            "cannot read /nonexistent/ca.pem",
        ] {
            assert!(problems.contains(expected), "{expected} not in {problems}");
        }
        // The password file's path prints; it is not a secret.
        let printed = format!("{config:?}");
        assert!(printed.contains("/nonexistent/pw"), "{printed}");
    }
}
