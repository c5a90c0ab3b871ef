//! Digital twins on SQLite: table `twins`, one row per device ([`twin_row`] reads it);
//! `last_values` and `alarms` are JSON text, `version` counts the writes of the fold's columns.
//! A batch is folded in memory with the shared [`fold_into`] inside one write transaction, into
//! the twins this process wrote last ([`TwinCache`]) or, for the others, the rows as read.

use std::collections::hash_map::Entry;

use iotp_contract::devices::FastMap;
use rusqlite::types::Type;
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{sqlite_error, write_transaction, SqliteStore};
use crate::fold::{fold_into, new_twin};
use crate::{LivenessCounts, Observation, StoreError, Twin, TwinStore};

/// A `twins` row as a [`Twin`]: the one mapping from the table (the columns [`READ_TWIN`] selects).
/// `last_values` and `alarms` are JSON text; text that does not parse is corrupt data.
fn twin_row(r: &Row<'_>) -> rusqlite::Result<Twin> {
    Ok(Twin {
        tenant: r.get(0)?,
        device_id: r.get(1)?,
        last_seq_no: r.get(2)?,
        last_seen_at: r.get(3)?,
        last_values: json_column(r, 4)?,
        firmware: r.get(5)?,
        config_version: r.get(6)?,
        heartbeat_secs: r.get::<_, Option<i64>>(7)?.map(|h| h.max(0) as u64),
        online: r.get(8)?,
        alarms: json_column(r, 9)?,
        seq_gaps: r.get(10)?,
    })
}

/// A JSON text column, parsed.
fn json_column<T: DeserializeOwned>(r: &Row<'_>, i: usize) -> rusqlite::Result<T> {
    let text: String = r.get(i)?;
    serde_json::from_str(&text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, Type::Text, Box::new(e)))
}

/// A value as the JSON text its column holds.
fn json_text<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Backend(format!("twin as JSON: {e}")))
}

/// One twin by its key, with the columns [`twin_row`] reads, in its order, then its version.
const READ_TWIN: &str = "SELECT tenant, device_id, last_seq_no, last_seen_at, last_values, firmware, \
     config_version, heartbeat_secs, online, alarms, seq_gaps, version FROM twins WHERE tenant = ?1 AND device_id = ?2";

/// A new twin, at version 1 (`?11` is 0: no version stored). Its absence was read in the same
/// write transaction.
const INSERT_TWIN: &str = "INSERT INTO twins (tenant, device_id, last_seq_no, last_seen_at, last_values, firmware, config_version, heartbeat_secs, online, alarms, version)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11 + 1)";

/// A stored twin at version `?11` written back, `online` included (it changed); no row is
/// written when the stored version is another (someone else wrote the twin since it was
/// read). `seq_gaps` is the upserter's, and the upserter does not move the version.
const UPDATE_TWIN_ONLINE: &str = "UPDATE twins SET
       last_seq_no = ?3, last_seen_at = ?4, last_values = ?5, firmware = ?6,
       config_version = ?7, heartbeat_secs = ?8, online = ?9, alarms = ?10, version = ?11 + 1
     WHERE tenant = ?1 AND device_id = ?2 AND version = ?11";

/// As [`UPDATE_TWIN_ONLINE`] for a twin whose `online` did not change (`?9` unused), so the
/// index on `online` is left alone. Most writes are these: a device that keeps sending stays
/// online.
const UPDATE_TWIN: &str = "UPDATE twins SET
       last_seq_no = ?3, last_seen_at = ?4, last_values = ?5, firmware = ?6,
       config_version = ?7, heartbeat_secs = ?8, alarms = ?10, version = ?11 + 1
     WHERE tenant = ?1 AND device_id = ?2 AND version = ?11";

/// Most twins the cache holds: about a kilobyte each (a few metrics' last values). A process
/// with more devices than this caches the first ones it writes and reads the others from the
/// file at every batch, as without a cache.
const TWIN_CACHE_MAX: usize = 10_000;

/// The twins this process wrote last, as written, with the version they were written at:
/// folding a batch into them needs no read of the row and no parse of its JSON columns. A
/// write is conditional on the stored version still being the cached one, so a twin another
/// process (a second enricher, after a rebalance) or the offline sweep changed since is read
/// again from the file in the same write transaction, and the batch is folded into that.
#[derive(Default)]
pub(super) struct TwinCache {
    /// By tenant, then device id, so a batch's borrowed names find it. A device keeps its
    /// slot once it has one (empty while a batch folds its twin); past [`TWIN_CACHE_MAX`]
    /// devices, new ones get none and are read from the file, as without a cache.
    by_tenant: FastMap<String, FastMap<String, Option<(Twin, i64)>>>,
    devices: usize,
}

impl TwinCache {
    /// The cached twin of a device, taken out (a batch folds it in place; it is put back once
    /// the batch is committed, so a failed batch leaves no half-folded twin cached).
    fn take(&mut self, tenant: &str, device_id: &str) -> Option<(Twin, i64)> {
        self.by_tenant.get_mut(tenant)?.get_mut(device_id)?.take()
    }

    /// Keep `twin`, stored at `version`, unless the cache is full.
    fn put(&mut self, twin: Twin, version: i64) {
        if !self.by_tenant.contains_key(&twin.tenant) {
            self.by_tenant
                .insert(twin.tenant.clone(), FastMap::default());
        }
        let Some(devices) = self.by_tenant.get_mut(&twin.tenant) else {
            return;
        };
        if let Some(slot) = devices.get_mut(&twin.device_id) {
            *slot = Some((twin, version));
        } else if self.devices < TWIN_CACHE_MAX {
            self.devices += 1;
            devices.insert(twin.device_id.clone(), Some((twin, version)));
        }
    }
}

/// A device's twin while a batch is folded into it.
struct Folded {
    twin: Twin,
    /// `online` and the version as stored (as cached, when `cached`); `None`: not stored.
    stored: Option<(bool, i64)>,
    /// Taken from the cache, not read in this transaction: the stored version may be newer.
    cached: bool,
    /// The batch changed it: write it back.
    changed: bool,
}

impl Folded {
    /// A device's twin as stored (or cached), or a new one, before the batch is folded in.
    fn new(stored: Option<(Twin, i64)>, cached: bool, tenant: &str, device_id: &str) -> Self {
        match stored {
            Some((twin, version)) => Self {
                stored: Some((twin.online, version)),
                changed: false,
                twin,
                cached,
            },
            None => Self {
                stored: None,
                changed: true,
                twin: new_twin(tenant, device_id),
                cached: false,
            },
        }
    }

    /// The version the twin has once written (or as it is, unchanged).
    fn version(&self) -> i64 {
        let stored = self.stored.map_or(0, |(_, version)| version);
        stored + i64::from(self.changed)
    }
}

fn read_twin(
    conn: &Connection,
    tenant: &str,
    device_id: &str,
) -> Result<Option<(Twin, i64)>, StoreError> {
    // Cached: compiling the statement cost more than running it, and this runs once per device
    // in every batch that the twin cache does not serve.
    conn.prepare_cached(READ_TWIN)
        .and_then(|mut stmt| {
            stmt.query_row(params![tenant, device_id], |r| {
                Ok((twin_row(r)?, r.get(11)?))
            })
            .optional()
        })
        .map_err(sqlite_error)
}

/// Write `f` back if the batch changed it; `false` when the stored version was no longer the
/// one it was folded from (nothing written).
fn write_twin(tx: &Connection, f: &Folded) -> Result<bool, StoreError> {
    if !f.changed {
        return Ok(true);
    }
    let t = &f.twin;
    let sql = match f.stored {
        None => INSERT_TWIN,
        Some((online, _)) if online == t.online => UPDATE_TWIN,
        Some(_) => UPDATE_TWIN_ONLINE,
    };
    let (last_values, alarms) = (json_text(&t.last_values)?, json_text(&t.alarms)?);
    let written = tx
        .prepare_cached(sql)
        .and_then(|mut stmt| {
            stmt.execute(params![
                t.tenant,
                t.device_id,
                t.last_seq_no,
                t.last_seen_at,
                last_values,
                t.firmware,
                t.config_version,
                t.heartbeat_secs.map(|h| h as i64),
                t.online,
                alarms,
                f.stored.map_or(0, |(_, version)| version),
            ])
        })
        .map_err(sqlite_error)?;
    Ok(written == 1)
}

impl TwinStore for SqliteStore {
    async fn apply(&self, observations: Vec<Observation>) -> Result<(), StoreError> {
        let cache = self.twins.clone();
        self.with(move |conn| {
            let mut cache = cache
                .lock()
                .map_err(|_| StoreError::Backend("twin cache poisoned by a panic".into()))?;
            let tx = write_transaction(conn)?;
            // Each device's twin, folded in place, from the cache or read once per batch, with
            // what is needed to write it back. No copy of the stored twin is kept to compare with.
            let mut twins: FastMap<(&str, &str), Folded> = FastMap::default();
            for obs in &observations {
                let (tenant, device_id) = (obs.tenant.as_str(), obs.device_id.as_str());
                let f = match twins.entry((tenant, device_id)) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => e.insert(match cache.take(tenant, device_id) {
                        Some(cached) => Folded::new(Some(cached), true, tenant, device_id),
                        None => Folded::new(
                            read_twin(&tx, tenant, device_id)?,
                            false,
                            tenant,
                            device_id,
                        ),
                    }),
                };
                f.changed |= fold_into(&mut f.twin, obs);
            }
            // Observations already folded in (a replay, a batch consumed again) change nothing.
            for (&(tenant, device_id), f) in twins.iter_mut() {
                if write_twin(&tx, f)? {
                    continue;
                }
                if !f.cached {
                    return Err(StoreError::Backend(format!(
                        "twin {tenant}/{device_id} changed inside a write transaction"
                    )));
                }
                // The cached copy is stale: fold the batch into the twin as stored now.
                *f = Folded::new(read_twin(&tx, tenant, device_id)?, false, tenant, device_id);
                for obs in observations
                    .iter()
                    .filter(|o| o.tenant == tenant && o.device_id == device_id)
                {
                    f.changed |= fold_into(&mut f.twin, obs);
                }
                if !write_twin(&tx, f)? {
                    return Err(StoreError::Backend(format!(
                        "twin {tenant}/{device_id} changed inside a write transaction"
                    )));
                }
            }
            tx.commit().map_err(sqlite_error)?;
            for f in twins.into_values() {
                let version = f.version();
                cache.put(f.twin, version);
            }
            // Handed back to be freed by the thread that allocated it.
            Ok(observations)
        })
        .await
        .map(drop)
    }

    async fn twin(&self, tenant: &str, device_id: &str) -> Result<Option<Twin>, StoreError> {
        let (tenant, device_id) = (tenant.to_string(), device_id.to_string());
        self.with(move |conn| Ok(read_twin(conn, &tenant, &device_id)?.map(|(twin, _)| twin)))
            .await
    }

    async fn mark_offline(&self, now_ms: i64, missed: u32) -> Result<u64, StoreError> {
        self.with(move |conn| {
            let n = conn
                .execute(
                    "UPDATE twins SET online = 0, version = version + 1,
                       alarms = CASE WHEN alarms LIKE '%\"offline\"%' THEN alarms
                                     WHEN alarms = '[]' THEN '[\"offline\"]'
                                     ELSE substr(alarms, 1, length(alarms) - 1) || ',\"offline\"]' END
                     WHERE online = 1 AND heartbeat_secs IS NOT NULL
                       AND last_seen_at < ?1 - heartbeat_secs * 1000 * ?2",
                    params![now_ms, missed],
                )
                .map_err(sqlite_error)?;
            Ok(n as u64)
        })
        .await
    }

    async fn liveness_counts(&self) -> Result<LivenessCounts, StoreError> {
        self.with(|conn| {
            let (online, offline): (i64, i64) = conn
                .query_row(
                    "SELECT COALESCE(SUM(online = 1), 0), COALESCE(SUM(online = 0), 0) FROM twins",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(sqlite_error)?;
            Ok(LivenessCounts {
                online: online as u64,
                offline: offline as u64,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    //! The twin cache against other writers of the same file. The fold's rules are tested on
    //! every backend in `tests/store_contract.rs`.

    use super::*;
    use crate::sqlite::test_file;

    fn obs(seq_no: i64, at: i64, metric: &str) -> Observation {
        Observation {
            tenant: "acme".into(),
            device_id: "d1".into(),
            seq_no,
            produced_at: at,
            readings: vec![(metric.into(), seq_no as f64, Some("Cel".into()))],
            firmware: None,
            config_version: None,
            heartbeat_secs: Some(60),
        }
    }

    fn version(store: &SqliteStore) -> i64 {
        let conn = store.conn.lock().expect("connection");
        conn.query_row(
            "SELECT version FROM twins WHERE tenant = 'acme' AND device_id = 'd1'",
            [],
            |r| r.get(0),
        )
        .expect("version")
    }

    #[tokio::test]
    async fn a_twin_another_process_wrote_is_read_again_not_overwritten() {
        // Two enricher replicas on one file (a rebalance moved the device between them):
        // each has its own cache.
        let path = test_file("twins-two-writers");
        let a = SqliteStore::open(&path).expect("a");
        let b = SqliteStore::open(&path).expect("b");
        a.apply(vec![obs(1, 1000, "temp")]).await.expect("a, seq 1");
        b.apply(vec![obs(2, 2000, "hum")]).await.expect("b, seq 2");
        // `a` still caches the twin at version 1; the file is at 2.
        a.apply(vec![obs(3, 3000, "temp")]).await.expect("a, seq 3");
        let twin = a.twin("acme", "d1").await.expect("read").expect("twin");
        assert_eq!(twin.last_seq_no, 3);
        assert_eq!(
            twin.last_values.keys().collect::<Vec<_>>(),
            ["hum", "temp"],
            "b's metric survived a's write"
        );
        assert_eq!(twin.last_values["temp"].seq_no, 3);
        assert_eq!(version(&a), 3);
        // And the other way round, with `b` now the stale one.
        b.apply(vec![obs(4, 4000, "hum")]).await.expect("b, seq 4");
        let twin = b.twin("acme", "d1").await.expect("read").expect("twin");
        assert_eq!(
            (
                twin.last_values["temp"].seq_no,
                twin.last_values["hum"].seq_no
            ),
            (3, 4)
        );
        assert_eq!(version(&b), 4);
    }

    #[tokio::test]
    async fn the_offline_sweep_is_not_undone_by_a_cached_twin() {
        let path = test_file("twins-sweep");
        let store = SqliteStore::open(&path).expect("store");
        store
            .apply(vec![obs(5, 5000, "temp")])
            .await
            .expect("seq 5");
        // Long after the device's last message: marked offline (the cached twin says online).
        let marked = store.mark_offline(10_000_000, 3).await.expect("sweep");
        assert_eq!(marked, 1);
        // A late, older message with a metric the twin lacks: the twin changes, but it was
        // not sent after the device went quiet, so the device stays offline.
        store.apply(vec![obs(4, 4000, "hum")]).await.expect("seq 4");
        let twin = store.twin("acme", "d1").await.expect("read").expect("twin");
        assert!(twin.last_values.contains_key("hum"));
        assert!(!twin.online, "still offline");
        assert_eq!(twin.alarms, ["offline"]);
        let counts = store.liveness_counts().await.expect("counts");
        assert_eq!((counts.online, counts.offline), (0, 1));
        // A newer message brings it back online, through the cache again.
        store
            .apply(vec![obs(6, 10_000_001, "temp")])
            .await
            .expect("seq 6");
        store
            .apply(vec![obs(7, 10_000_002, "temp")])
            .await
            .expect("seq 7");
        let twin = store.twin("acme", "d1").await.expect("read").expect("twin");
        assert!(twin.online && twin.alarms.is_empty());
        assert_eq!(twin.last_seq_no, 7);
        let counts = store.liveness_counts().await.expect("counts");
        assert_eq!((counts.online, counts.offline), (1, 0));
    }

    #[test]
    fn the_cache_stops_taking_twins_when_full() {
        let mut cache = TwinCache::default();
        for i in 0..TWIN_CACHE_MAX + 5 {
            cache.put(new_twin("acme", &format!("d{i}")), 1);
        }
        assert!(cache.take("acme", "d0").is_some());
        assert!(cache
            .take("acme", &format!("d{}", TWIN_CACHE_MAX - 1))
            .is_some());
        assert!(cache.take("acme", &format!("d{TWIN_CACHE_MAX}")).is_none());
        // A device taken out keeps its slot: it is put back after its batch.
        cache.put(new_twin("acme", "d0"), 2);
        assert_eq!(cache.take("acme", "d0").map(|(_, v)| v), Some(2));
    }
}
