//! The raw tier on SQLite: tables `messages` (primary key (tenant, deviceId, seqNo): the
//! exactly-once guard), `readings`, and `seq_stats` (each device's lowest and highest seqNo
//! stored and how many, kept as messages are written, for the gap count).

use std::collections::HashMap;

use rusqlite::{params, OptionalExtension};

use super::{sqlite_error, write_transaction, SqliteStore};
use crate::{MessageRecord, ReadingStore, StoreError, StoredMessage, WriteReport};

impl SqliteStore {
    /// Rows of `table` (for one tenant, or all).
    async fn count_rows(
        &self,
        table: &'static str,
        tenant: Option<&str>,
    ) -> Result<u64, StoreError> {
        let tenant = tenant.map(String::from);
        self.with(move |conn| {
            conn.query_row(
                &format!("SELECT count(*) FROM {table} WHERE ?1 IS NULL OR tenant = ?1"),
                params![tenant],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(sqlite_error)
        })
        .await
    }
}

impl ReadingStore for SqliteStore {
    async fn write_messages(&self, messages: &[MessageRecord]) -> Result<WriteReport, StoreError> {
        let messages = messages.to_vec();
        self.with(move |conn| {
            let now = iotp_contract::now_millis();
            let tx = write_transaction(conn)?;
            let mut report = WriteReport::default();
            {
                let mut message = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO messages (tenant, device_id, seq_no, msg_id, produced_at, received_at, site, asset, profile, stored_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    )
                    .map_err(sqlite_error)?;
                let mut reading = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO readings (tenant, device_id, seq_no, metric, value, unit, produced_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    )
                    .map_err(sqlite_error)?;
                // Per device: lowest and highest seqNo stored by this batch, and how many.
                let mut stats: HashMap<(&str, &str), (i64, i64, i64)> = HashMap::new();
                for m in &messages {
                    let inserted = message
                        .execute(params![m.tenant, m.device_id, m.seq_no, m.msg_id, m.produced_at, m.received_at, m.site, m.asset, m.profile, now])
                        .map_err(sqlite_error)?;
                    if inserted == 0 {
                        report.duplicates += 1;
                        continue;
                    }
                    report.stored += 1;
                    let s = stats
                        .entry((&m.tenant, &m.device_id))
                        .or_insert((m.seq_no, m.seq_no, 0));
                    *s = (s.0.min(m.seq_no), s.1.max(m.seq_no), s.2 + 1);
                    for (metric, value, unit) in &m.readings {
                        reading.execute(params![m.tenant, m.device_id, m.seq_no, metric, value, unit, m.produced_at]).map_err(sqlite_error)?;
                    }
                }
                let mut stat = tx
                    .prepare_cached(
                        "INSERT INTO seq_stats (tenant, device_id, min_seq, max_seq, stored) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (tenant, device_id) DO UPDATE SET min_seq = min(min_seq, excluded.min_seq),
                           max_seq = max(max_seq, excluded.max_seq), stored = stored + excluded.stored",
                    )
                    .map_err(sqlite_error)?;
                for ((tenant, device), (lo, hi, n)) in stats {
                    stat.execute(params![tenant, device, lo, hi, n]).map_err(sqlite_error)?;
                }
            }
            tx.commit().map_err(sqlite_error)?;
            Ok(report)
        })
        .await
    }

    async fn message_count(&self, tenant: Option<&str>) -> Result<u64, StoreError> {
        self.count_rows("messages", tenant).await
    }

    async fn reading_count(&self, tenant: Option<&str>) -> Result<u64, StoreError> {
        self.count_rows("readings", tenant).await
    }

    async fn stored_messages(
        &self,
        tenant: &str,
        after: Option<(String, i64)>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let tenant = tenant.to_string();
        let (after_device, after_seq) = after.unwrap_or((String::new(), i64::MIN));
        self.with(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT m.device_id, m.seq_no, m.msg_id, m.produced_at, m.stored_at,
                            (SELECT count(*) FROM readings r WHERE r.tenant = m.tenant AND r.device_id = m.device_id AND r.seq_no = m.seq_no)
                     FROM messages m
                     WHERE m.tenant = ?1 AND (m.device_id, m.seq_no) > (?2, ?3)
                     ORDER BY m.device_id, m.seq_no LIMIT ?4",
                )
                .map_err(sqlite_error)?;
            let rows = stmt
                .query_map(params![tenant, after_device, after_seq, limit as i64], |r| {
                    Ok(StoredMessage {
                        device_id: r.get(0)?,
                        seq_no: r.get(1)?,
                        msg_id: r.get(2)?,
                        produced_at: r.get(3)?,
                        stored_at: r.get(4)?,
                        readings: r.get(5)?,
                    })
                })
                .map_err(sqlite_error)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(sqlite_error)
        })
        .await
    }

    async fn update_seq_gaps(&self, devices: &[(String, String)]) -> Result<u64, StoreError> {
        let devices = devices.to_vec();
        self.with(move |conn| {
            let tx = write_transaction(conn)?;
            let mut total = 0u64;
            for (tenant, device) in &devices {
                let gaps: i64 = tx
                    .query_row(
                        "SELECT max_seq - min_seq + 1 - stored FROM seq_stats WHERE tenant = ?1 AND device_id = ?2",
                        params![tenant, device],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(sqlite_error)?
                    .unwrap_or(0);
                tx.execute("UPDATE twins SET seq_gaps = ?3 WHERE tenant = ?1 AND device_id = ?2", params![tenant, device, gaps])
                    .map_err(sqlite_error)?;
                total += gaps.max(0) as u64;
            }
            tx.commit().map_err(sqlite_error)?;
            Ok(total)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::test_message as message;

    #[tokio::test]
    async fn seq_stats_are_rebuilt_from_the_messages_of_an_older_file() {
        let path = std::env::temp_dir().join(format!("iotp-stats-{}.sqlite", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let store = SqliteStore::open(&path).expect("open");
        let written: Vec<_> = [0, 1, 3, 7].iter().map(|s| message("d1", *s)).collect();
        store.write_messages(&written).await.expect("write");
        let devices = [("acme".to_string(), "d1".to_string())];
        assert_eq!(store.update_seq_gaps(&devices).await.expect("gaps"), 4);
        store
            .with(|c| c.execute("DELETE FROM seq_stats", []).map_err(sqlite_error))
            .await
            .expect("as before seq_stats");
        drop(store);
        let store = SqliteStore::open(&path).expect("reopen");
        assert_eq!(
            store.update_seq_gaps(&devices).await.expect("gaps"),
            4,
            "2, 4, 5, 6 missing"
        );
        let _ = std::fs::remove_file(&path);
    }
}
