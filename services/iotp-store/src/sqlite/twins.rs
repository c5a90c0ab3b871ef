//! Digital twins on SQLite: table `twins`, one row per device; `last_values` and `alarms`
//! are JSON text. A batch is folded in memory with the shared [`fold`] inside one write
//! transaction.

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::{backend, write_transaction, SqliteStore};
use crate::fold::fold;
use crate::{Observation, StoreError, Twin, TwinStore};

fn read_twin(conn: &Connection, tenant: &str, device_id: &str) -> Result<Option<Twin>, StoreError> {
    conn.query_row(
        "SELECT last_seq_no, last_seen_at, last_values, firmware, config_version, heartbeat_secs, online, alarms, seq_gaps
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
                row.get::<_, i64>(8)?,
            ))
        },
    )
    .optional()
    .map_err(backend)?
    .map(|(last_seq_no, last_seen_at, values, firmware, config_version, heartbeat, online, alarms, seq_gaps)| {
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
            seq_gaps,
        })
    })
    .transpose()
}

impl TwinStore for SqliteStore {
    async fn apply(&self, observations: &[Observation]) -> Result<(), StoreError> {
        let observations = observations.to_vec();
        self.with(move |conn| {
            let tx = write_transaction(conn)?;
            let mut twins: HashMap<(String, String), Twin> = HashMap::new();
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
