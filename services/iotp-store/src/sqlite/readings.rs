//! The raw tier on SQLite: tables `messages` (primary key (tenant, deviceId, seqNo): the
//! exactly-once guard; the message's readings inline, as a JSON array of `[metric, value,
//! unit]`) and `seq_stats` (each device's lowest and highest seqNo stored and how many, kept
//! as messages are written, for the gap count).
//!
//! Readings are a column, not a table of their own: a row per reading cost two more B-tree
//! inserts per reading (the row and its time index), and with a thousand devices each lands on
//! its own leaf page, so every reading rewrote a page of its own in each commit. Inline, a
//! message is one row; SQLite's JSON functions still reach each reading
//! (`SELECT m.device_id, r.value ->> 0 … FROM messages m, json_each(m.readings) r`).

use std::collections::HashMap;

use rusqlite::{params, OptionalExtension};

use super::{sqlite_error, write_transaction, SqliteStore};
use crate::{MessageRecord, ReadingStore, StoreError, StoredMessage, WriteReport};

impl SqliteStore {
    /// `what` summed over the stored messages (for one tenant, or all).
    async fn sum_over_messages(
        &self,
        what: &'static str,
        tenant: Option<&str>,
    ) -> Result<u64, StoreError> {
        let tenant = tenant.map(String::from);
        self.with(move |conn| {
            conn.query_row(
                &format!(
                    "SELECT coalesce(sum({what}), 0) FROM messages WHERE ?1 IS NULL OR tenant = ?1"
                ),
                params![tenant],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(sqlite_error)
        })
        .await
    }
}

impl SqliteStore {
    /// Messages stored for `tenant` by the per-device counts kept with every write
    /// (`seq_stats`): one row per device read, where [`ReadingStore::message_count`] reads
    /// one index entry per message. The same figure until retention prunes messages (the
    /// counts keep what was ever stored). For watching a store fill: a count of a million
    /// messages polled four times a second held read snapshots and took CPU from the writers.
    pub async fn stored_by_device_counts(&self, tenant: &str) -> Result<u64, StoreError> {
        let tenant = tenant.to_string();
        self.with(move |conn| {
            conn.query_row(
                "SELECT coalesce(sum(stored), 0) FROM seq_stats WHERE tenant = ?1",
                params![tenant],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(sqlite_error)
        })
        .await
    }
}

/// A message's readings as stored: `[["energy",12.5,"Wh"],["power",1.0,null]]`.
fn readings_json(readings: &[(String, f64, Option<String>)]) -> Result<String, StoreError> {
    serde_json::to_string(readings)
        .map_err(|e| StoreError::Backend(format!("readings do not encode as JSON: {e}")))
}

/// Upgrade a file from before readings were inline: move the `readings` table's rows into
/// their messages' column and drop the table, in one transaction (the services sharing the
/// file open it concurrently: the first one moves them, the others find no table).
pub(super) fn inline_readings_table(conn: &mut rusqlite::Connection) -> Result<(), StoreError> {
    let has_table = |c: &rusqlite::Connection| -> Result<bool, StoreError> {
        c.query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'readings'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)
        .map_err(sqlite_error)
    };
    // The usual case, a current file: no write lock taken at start-up.
    if !has_table(conn)? {
        return Ok(());
    }
    let tx = write_transaction(conn)?;
    if has_table(&tx)? {
        tx.execute_batch(
            "UPDATE messages SET readings = (
                 SELECT json_group_array(json_array(r.metric, r.value, r.unit)) FROM readings r
                 WHERE r.tenant = messages.tenant AND r.device_id = messages.device_id
                   AND r.seq_no = messages.seq_no)
             WHERE EXISTS (SELECT 1 FROM readings r WHERE r.tenant = messages.tenant
                   AND r.device_id = messages.device_id AND r.seq_no = messages.seq_no);
             DROP TABLE readings;",
        )
        .map_err(sqlite_error)?;
    }
    tx.commit().map_err(sqlite_error)
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
                        "INSERT OR IGNORE INTO messages (tenant, device_id, seq_no, msg_id, produced_at, received_at, site, asset, profile, stored_at, readings)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                    )
                    .map_err(sqlite_error)?;
                // Per device: lowest and highest seqNo stored by this batch, and how many.
                let mut stats: HashMap<(&str, &str), (i64, i64, i64)> = HashMap::new();
                for m in &messages {
                    let readings = readings_json(&m.readings)?;
                    let inserted = message
                        .execute(params![m.tenant, m.device_id, m.seq_no, m.msg_id, m.produced_at, m.received_at, m.site, m.asset, m.profile, now, readings])
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
        self.sum_over_messages("1", tenant).await
    }

    async fn reading_count(&self, tenant: Option<&str>) -> Result<u64, StoreError> {
        self.sum_over_messages("json_array_length(readings)", tenant)
            .await
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
                            json_array_length(m.readings)
                     FROM messages m
                     WHERE m.tenant = ?1 AND (m.device_id, m.seq_no) > (?2, ?3)
                     ORDER BY m.device_id, m.seq_no LIMIT ?4",
                )
                .map_err(sqlite_error)?;
            let rows = stmt
                .query_map(
                    params![tenant, after_device, after_seq, limit as i64],
                    |r| {
                        Ok(StoredMessage {
                            device_id: r.get(0)?,
                            seq_no: r.get(1)?,
                            msg_id: r.get(2)?,
                            produced_at: r.get(3)?,
                            stored_at: r.get(4)?,
                            readings: r.get(5)?,
                        })
                    },
                )
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
            {
                // Cached: run for every device touched since the last tick.
                let mut count = tx
                    .prepare_cached("SELECT max_seq - min_seq + 1 - stored FROM seq_stats WHERE tenant = ?1 AND device_id = ?2")
                    .map_err(sqlite_error)?;
                let mut set = tx
                    .prepare_cached("UPDATE twins SET seq_gaps = ?3 WHERE tenant = ?1 AND device_id = ?2 AND seq_gaps IS NOT ?3")
                    .map_err(sqlite_error)?;
                for (tenant, device) in &devices {
                    let gaps: i64 = count
                        .query_row(params![tenant, device], |r| r.get(0))
                        .optional()
                        .map_err(sqlite_error)?
                        .unwrap_or(0);
                    set.execute(params![tenant, device, gaps]).map_err(sqlite_error)?;
                    total += gaps.max(0) as u64;
                }
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
    async fn a_file_with_a_readings_table_gets_its_readings_inline() {
        let path = std::env::temp_dir().join(format!("iotp-inline-{}.sqlite", std::process::id()));
        let _ = std::fs::remove_file(&path);
        {
            // The raw tier as it was stored before readings were inline.
            let conn = rusqlite::Connection::open(&path).expect("open");
            conn.execute_batch(
                "CREATE TABLE messages (tenant TEXT NOT NULL, device_id TEXT NOT NULL, seq_no INTEGER NOT NULL,
                   msg_id TEXT NOT NULL, produced_at INTEGER NOT NULL, received_at INTEGER NOT NULL, site TEXT,
                   asset TEXT, profile TEXT NOT NULL, stored_at INTEGER NOT NULL,
                   PRIMARY KEY (tenant, device_id, seq_no)) WITHOUT ROWID;
                 CREATE TABLE readings (tenant TEXT NOT NULL, device_id TEXT NOT NULL, seq_no INTEGER NOT NULL,
                   metric TEXT NOT NULL, value REAL NOT NULL, unit TEXT, produced_at INTEGER NOT NULL,
                   PRIMARY KEY (tenant, device_id, seq_no, metric)) WITHOUT ROWID;
                 INSERT INTO messages VALUES ('acme', 'd1', 1, 'm1', 1001, 1002, NULL, NULL, 'meter', 1003),
                                             ('acme', 'd1', 2, 'm2', 1002, 1003, NULL, NULL, 'meter', 1004);
                 INSERT INTO readings VALUES ('acme', 'd1', 1, 'energy', 12.5, 'Wh', 1001),
                                             ('acme', 'd1', 1, 'power', 3.0, NULL, 1001),
                                             ('acme', 'd1', 2, 'energy', 13.5, 'Wh', 1002);",
            )
            .expect("old schema");
        }
        let store = SqliteStore::open(&path).expect("upgrade");
        assert_eq!(store.message_count(Some("acme")).await.expect("count"), 2);
        assert_eq!(store.reading_count(Some("acme")).await.expect("count"), 3);
        let first: String = store
            .with(|c| {
                c.query_row("SELECT readings FROM messages WHERE seq_no = 1", [], |r| {
                    r.get(0)
                })
                .map_err(sqlite_error)
            })
            .await
            .expect("read");
        assert_eq!(first, r#"[["energy",12.5,"Wh"],["power",3.0,null]]"#);
        drop(store);
        // Opening again (as every other service sharing the file does) finds nothing to move.
        let store = SqliteStore::open(&path).expect("reopen");
        assert_eq!(store.reading_count(None).await.expect("count"), 3);
        let stored = store
            .write_messages(&[message("d1", 3)])
            .await
            .expect("write");
        assert_eq!(stored.stored, 1);
        assert_eq!(store.reading_count(None).await.expect("count"), 5);
        let page = store.stored_messages("acme", None, 10).await.expect("page");
        assert_eq!(
            page.iter().map(|m| m.readings).collect::<Vec<_>>(),
            [2, 1, 2]
        );
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn seq_stats_are_rebuilt_from_the_messages_of_an_older_file() {
        let path = std::env::temp_dir().join(format!("iotp-stats-{}.sqlite", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let store = SqliteStore::open(&path).expect("open");
        let written: Vec<_> = [0, 1, 3, 7].iter().map(|s| message("d1", *s)).collect();
        store.write_messages(&written).await.expect("write");
        let devices = [("acme".to_string(), "d1".to_string())];
        assert_eq!(store.update_seq_gaps(&devices).await.expect("gaps"), 4);
        assert_eq!(
            store.stored_by_device_counts("acme").await.expect("counts"),
            4
        );
        assert_eq!(
            store
                .stored_by_device_counts("other")
                .await
                .expect("counts"),
            0
        );
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
