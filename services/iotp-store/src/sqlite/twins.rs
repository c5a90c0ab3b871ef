//! Digital twins on SQLite: table `twins`, one row per device ([`twin_row`] reads it);
//! `last_values` and `alarms` are JSON text. A batch is folded in memory with the shared
//! [`fold`] inside one write transaction.

use std::collections::HashMap;

use rusqlite::types::Type;
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{sqlite_error, write_transaction, SqliteStore};
use crate::fold::fold;
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

/// One twin by its key, with the columns [`twin_row`] reads, in its order.
const READ_TWIN: &str = "SELECT tenant, device_id, last_seq_no, last_seen_at, last_values, firmware, \
     config_version, heartbeat_secs, online, alarms, seq_gaps FROM twins WHERE tenant = ?1 AND device_id = ?2";

/// A new twin inserted, or a stored one whose `online` changed written back (all columns but
/// `seq_gaps`, which the upserter keeps).
const WRITE_TWIN: &str = "INSERT INTO twins (tenant, device_id, last_seq_no, last_seen_at, last_values, firmware, config_version, heartbeat_secs, online, alarms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
     ON CONFLICT (tenant, device_id) DO UPDATE SET
       last_seq_no = excluded.last_seq_no, last_seen_at = excluded.last_seen_at,
       last_values = excluded.last_values, firmware = excluded.firmware,
       config_version = excluded.config_version, heartbeat_secs = excluded.heartbeat_secs,
       online = excluded.online, alarms = excluded.alarms";

/// A stored twin whose `online` did not change written back: the same parameters as
/// [`WRITE_TWIN`] (`?9` unused), and the index on `online` is left alone. Most writes are
/// these: a device that keeps sending stays online. The row was read in the same write
/// transaction, so it is there.
const UPDATE_TWIN: &str = "UPDATE twins SET
       last_seq_no = ?3, last_seen_at = ?4, last_values = ?5, firmware = ?6,
       config_version = ?7, heartbeat_secs = ?8, alarms = ?10
     WHERE tenant = ?1 AND device_id = ?2";

fn read_twin(conn: &Connection, tenant: &str, device_id: &str) -> Result<Option<Twin>, StoreError> {
    // Cached: compiling the statement cost more than running it, and this runs once per device
    // in every batch.
    conn.prepare_cached(READ_TWIN)
        .and_then(|mut stmt| {
            stmt.query_row(params![tenant, device_id], twin_row)
                .optional()
        })
        .map_err(sqlite_error)
}

impl TwinStore for SqliteStore {
    async fn apply(&self, observations: &[Observation]) -> Result<(), StoreError> {
        let observations = observations.to_vec();
        self.with(move |conn| {
            let tx = write_transaction(conn)?;
            // Each device's twin as read (`None`: not stored yet) and as folded so far.
            let mut twins: HashMap<(&str, &str), (Option<Twin>, Twin)> = HashMap::new();
            for obs in &observations {
                let key = (obs.tenant.as_str(), obs.device_id.as_str());
                let entry = match twins.remove(&key) {
                    Some((stored, folded)) => (stored, fold(Some(folded), obs)),
                    None => {
                        let stored = read_twin(&tx, &obs.tenant, &obs.device_id)?;
                        let folded = fold(stored.clone(), obs);
                        (stored, folded)
                    }
                };
                twins.insert(key, entry);
            }
            let mut insert = tx.prepare_cached(WRITE_TWIN).map_err(sqlite_error)?;
            let mut update = tx.prepare_cached(UPDATE_TWIN).map_err(sqlite_error)?;
            for (stored, t) in twins.values() {
                // Observations already folded in (a replay, a batch consumed again) change nothing.
                if stored.as_ref() == Some(t) {
                    continue;
                }
                let write = match stored {
                    Some(s) if s.online == t.online => &mut update,
                    _ => &mut insert,
                };
                write
                    .execute(params![
                        t.tenant,
                        t.device_id,
                        t.last_seq_no,
                        t.last_seen_at,
                        json_text(&t.last_values)?,
                        t.firmware,
                        t.config_version,
                        t.heartbeat_secs.map(|h| h as i64),
                        t.online,
                        json_text(&t.alarms)?,
                    ])
                    .map_err(sqlite_error)?;
            }
            drop((insert, update));
            tx.commit().map_err(sqlite_error)
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
