//! Digital twins on SQLite: table `twins`, one row per device ([`twin_row`] reads it);
//! `last_values` and `alarms` are JSON text. A batch is folded in memory with the shared
//! [`fold`] inside one write transaction.

use std::collections::hash_map::Entry;

use iotp_contract::devices::FastMap;
use rusqlite::types::Type;
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{sqlite_error, write_transaction, SqliteStore};
use crate::fold::{fold, fold_into};
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

/// A device's twin while a batch is folded into it.
struct Folded {
    twin: Twin,
    /// `online` as stored; `None`: not stored yet.
    stored_online: Option<bool>,
    /// The batch changed it: write it back.
    changed: bool,
}

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
    async fn apply(&self, observations: Vec<Observation>) -> Result<(), StoreError> {
        self.with(move |conn| {
            let tx = write_transaction(conn)?;
            // Each device's twin, folded in place (read once per batch), with what is needed
            // to write it back: whether it was stored, as online or not, and whether the
            // batch changed it. No copy of the stored twin is kept to compare with.
            let mut twins: FastMap<(&str, &str), Folded> = FastMap::default();
            for obs in &observations {
                match twins.entry((obs.tenant.as_str(), obs.device_id.as_str())) {
                    Entry::Occupied(e) => {
                        let f = e.into_mut();
                        f.changed |= fold_into(&mut f.twin, obs);
                    }
                    Entry::Vacant(e) => {
                        let folded = match read_twin(&tx, &obs.tenant, &obs.device_id)? {
                            Some(mut twin) => Folded {
                                stored_online: Some(twin.online),
                                changed: fold_into(&mut twin, obs),
                                twin,
                            },
                            None => Folded {
                                stored_online: None,
                                changed: true,
                                twin: fold(None, obs),
                            },
                        };
                        e.insert(folded);
                    }
                }
            }
            let mut insert = tx.prepare_cached(WRITE_TWIN).map_err(sqlite_error)?;
            let mut update = tx.prepare_cached(UPDATE_TWIN).map_err(sqlite_error)?;
            // Observations already folded in (a replay, a batch consumed again) change nothing.
            for f in twins.values().filter(|f| f.changed) {
                let t = &f.twin;
                let write = match f.stored_online {
                    Some(online) if online == t.online => &mut update,
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
            drop((insert, update, twins));
            tx.commit().map_err(sqlite_error)?;
            // Handed back to be freed by the thread that allocated it.
            Ok(observations)
        })
        .await
        .map(drop)
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
