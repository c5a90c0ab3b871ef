//! The embedded store: SQLite in WAL mode, one file, no server. The default for `make demo`
//! and for machines without MongoDB.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use super::{fold, Observation, StoreError, Twin, TwinStore};

/// A SQLite-backed store.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS twins (
    tenant TEXT NOT NULL,
    device_id TEXT NOT NULL,
    last_seq_no INTEGER NOT NULL,
    last_seen_at INTEGER NOT NULL,
    last_values TEXT NOT NULL,
    firmware TEXT,
    config_version TEXT,
    heartbeat_secs INTEGER,
    online INTEGER NOT NULL,
    alarms TEXT NOT NULL,
    PRIMARY KEY (tenant, device_id)
);
CREATE INDEX IF NOT EXISTS twins_online ON twins (online, last_seen_at);
";

impl SqliteStore {
    /// Open (creating if needed) the store at `path`; `:memory:` for a private in-memory one.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(backend)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(backend)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(backend)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(backend)?;
        conn.execute_batch(SCHEMA).map_err(backend)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| backend("store mutex poisoned"))?;
            f(&mut guard)
        })
        .await
        .map_err(backend)?
    }
}

fn read_twin(conn: &Connection, tenant: &str, device_id: &str) -> Result<Option<Twin>, StoreError> {
    conn.query_row(
        "SELECT last_seq_no, last_seen_at, last_values, firmware, config_version, heartbeat_secs, online, alarms
         FROM twins WHERE tenant = ?1 AND device_id = ?2",
        params![tenant, device_id],
        |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, Option<String>>(3)?,
                row.get::<_, Option<String>>(4)?,
                row.get::<_, Option<i64>>(5)?,
                row.get::<_, bool>(6)?,
                row.get::<_, String>(7)?,
            ))
        },
    )
    .optional()
    .map_err(backend)?
    .map(|(last_seq_no, last_seen_at, values, firmware, config_version, heartbeat, online, alarms)| {
        Ok(Twin {
            tenant: tenant.to_string(),
            device_id: device_id.to_string(),
            last_seq_no,
            last_seen_at,
            last_values: serde_json::from_str(&values).map_err(backend)?,
            firmware,
            config_version,
            heartbeat_secs: heartbeat.map(|h| h as u64),
            online,
            alarms: serde_json::from_str(&alarms).map_err(backend)?,
        })
    })
    .transpose()
}

impl TwinStore for SqliteStore {
    async fn apply(&self, observations: &[Observation]) -> Result<(), StoreError> {
        let observations = observations.to_vec();
        self.with(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            let mut twins: std::collections::HashMap<(String, String), Twin> = std::collections::HashMap::new();
            for obs in &observations {
                let key = (obs.tenant.clone(), obs.device_id.clone());
                let current = match twins.remove(&key) {
                    Some(t) => Some(t),
                    None => read_twin(&tx, &obs.tenant, &obs.device_id)?,
                };
                twins.insert(key, fold(current, obs));
            }
            for t in twins.values() {
                tx.execute(
                    "INSERT INTO twins (tenant, device_id, last_seq_no, last_seen_at, last_values, firmware, config_version, heartbeat_secs, online, alarms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT (tenant, device_id) DO UPDATE SET
                       last_seq_no = excluded.last_seq_no, last_seen_at = excluded.last_seen_at,
                       last_values = excluded.last_values, firmware = excluded.firmware,
                       config_version = excluded.config_version, heartbeat_secs = excluded.heartbeat_secs,
                       online = excluded.online, alarms = excluded.alarms",
                    params![
                        t.tenant,
                        t.device_id,
                        t.last_seq_no,
                        t.last_seen_at,
                        serde_json::to_string(&t.last_values).map_err(backend)?,
                        t.firmware,
                        t.config_version,
                        t.heartbeat_secs.map(|h| h as i64),
                        t.online,
                        serde_json::to_string(&t.alarms).map_err(backend)?,
                    ],
                )
                .map_err(backend)?;
            }
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn twin(&self, tenant: &str, device_id: &str) -> Result<Option<Twin>, StoreError> {
        let (tenant, device_id) = (tenant.to_string(), device_id.to_string());
        self.with(move |conn| read_twin(conn, &tenant, &device_id))
            .await
    }

    async fn mark_offline(&self, now_ms: i64, missed: u32) -> Result<u64, StoreError> {
        self.with(move |conn| {
            let n = conn
                .execute(
                    "UPDATE twins SET online = 0,
                       alarms = CASE WHEN alarms LIKE '%\"offline\"%' THEN alarms
                                     WHEN alarms = '[]' THEN '[\"offline\"]'
                                     ELSE substr(alarms, 1, length(alarms) - 1) || ',\"offline\"]' END
                     WHERE online = 1 AND heartbeat_secs IS NOT NULL
                       AND last_seen_at < ?1 - heartbeat_secs * 1000 * ?2",
                    params![now_ms, missed],
                )
                .map_err(backend)?;
            Ok(n as u64)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(device: &str, seq_no: i64, at: i64, value: f64) -> Observation {
        Observation {
            tenant: "acme".into(),
            device_id: device.into(),
            seq_no,
            produced_at: at,
            readings: vec![("temp".into(), value, Some("Cel".into()))],
            firmware: None,
            config_version: Some("cfg-1".into()),
            heartbeat_secs: Some(60),
        }
    }

    #[tokio::test]
    async fn twins_are_ordered_by_seq_no_and_replays_change_nothing() {
        let store = SqliteStore::open(Path::new(":memory:")).expect("open");
        store
            .apply(&[obs("d1", 5, 5000, 50.0), obs("d2", 1, 1000, 1.0)])
            .await
            .expect("apply");
        // Late and replayed messages in a later batch.
        store
            .apply(&[
                obs("d1", 3, 3000, 30.0),
                obs("d1", 5, 5000, 50.0),
                obs("d1", 4, 4000, 40.0),
            ])
            .await
            .expect("apply");
        let t = store.twin("acme", "d1").await.expect("read").expect("twin");
        assert_eq!(
            (t.last_seq_no, t.last_seen_at, t.last_values["temp"].value),
            (5, 5000, 50.0)
        );
        assert!(t.online);
        assert_eq!(t.config_version.as_deref(), Some("cfg-1"));
        assert!(store.twin("acme", "nope").await.expect("read").is_none());
    }

    #[tokio::test]
    async fn missed_heartbeats_mark_offline_and_a_new_message_brings_it_back() {
        let store = SqliteStore::open(Path::new(":memory:")).expect("open");
        store
            .apply(&[obs("d1", 1, 1_000_000, 1.0), obs("d2", 1, 1_170_000, 1.0)])
            .await
            .expect("apply");
        // Three 60 s intervals after d1's last sign of life; d2 is within them.
        assert_eq!(
            store
                .mark_offline(1_000_000 + 181_000, 3)
                .await
                .expect("mark"),
            1
        );
        let d1 = store.twin("acme", "d1").await.expect("read").expect("twin");
        assert!(!d1.online);
        assert_eq!(d1.alarms, vec!["offline".to_string()]);
        assert!(
            store
                .twin("acme", "d2")
                .await
                .expect("read")
                .expect("twin")
                .online
        );
        assert_eq!(
            store
                .mark_offline(1_000_000 + 181_000, 3)
                .await
                .expect("mark"),
            0,
            "counted once"
        );
        store
            .apply(&[obs("d1", 2, 1_200_000, 2.0)])
            .await
            .expect("apply");
        let d1 = store.twin("acme", "d1").await.expect("read").expect("twin");
        assert!(d1.online && d1.alarms.is_empty());
    }
}
