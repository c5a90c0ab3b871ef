//! The raw tier on SQLite: table `messages`, in arrival order, the message's readings inline
//! as a JSON array of `[metric, value, unit]`; its exactly-once guard is `message_runs`, each
//! device's runs of seqNos stored (`runs.rs`), which also gives the gap count.
//!
//! Readings are a column, not a table of their own: a row per reading cost two more B-tree
//! inserts per reading (the row and its time index), and with a thousand devices each lands on
//! its own leaf page, so every reading rewrote a page of its own in each commit. Inline, a
//! message is one row; SQLite's JSON functions still reach each reading
//! (`SELECT m.device_id, r.value ->> 0 … FROM messages m, json_each(m.readings) r`).

use rusqlite::params;

use super::runs::{self, Guard, Key};
use super::{schema_has, sqlite_error, write_transaction, SqliteStore};
use crate::readings::{foreign_cursor, Position};
use crate::{
    MessageRecord, PageCursor, ReadingStore, StoreError, StoredMessage, StoredPage, WriteReport,
};

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
    /// Messages stored for `tenant` by the dedup guard's runs (`message_runs`): a row or a
    /// few per device read, where [`ReadingStore::message_count`] reads every message. The
    /// same figure until retention prunes messages (a run goes only when its newest message
    /// is past the raw tier). For watching a store fill: a count of a million messages polled
    /// four times a second held read snapshots and took CPU from the writers.
    pub async fn stored_by_device_counts(&self, tenant: &str) -> Result<u64, StoreError> {
        let tenant = tenant.to_string();
        self.with(move |conn| {
            conn.query_row(
                "SELECT coalesce(sum(hi - lo + 1), 0) FROM message_runs WHERE tenant = ?1",
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
    const HAS_TABLE: &str = "type = 'table' AND name = 'readings'";
    // The usual case, a current file: no write lock taken at start-up.
    if !schema_has(conn, HAS_TABLE)? {
        return Ok(());
    }
    let tx = write_transaction(conn)?;
    if schema_has(&tx, HAS_TABLE)? {
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
    async fn write_messages(
        &self,
        messages: Vec<MessageRecord>,
    ) -> Result<WriteReport, StoreError> {
        self.with(move |conn| {
            let now = iotp_contract::now_millis();
            let tx = write_transaction(conn)?;
            let keys: Vec<Key<'_>> = messages
                .iter()
                .map(|m| (m.tenant.as_str(), m.device_id.as_str(), m.seq_no, m.produced_at))
                .collect();
            let new = runs::take(&tx, Guard::Messages, &keys)?;
            let mut report = WriteReport::default();
            {
                let mut message = tx
                    .prepare_cached(
                        "INSERT INTO messages (tenant, device_id, seq_no, msg_id, produced_at, received_at, site, asset, profile, stored_at, readings)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                    )
                    .map_err(sqlite_error)?;
                for (m, new) in messages.iter().zip(new) {
                    if !new {
                        report.duplicates += 1;
                        continue;
                    }
                    let readings = readings_json(&m.readings)?;
                    message
                        .execute(params![m.tenant, m.device_id, m.seq_no, m.msg_id, m.produced_at, m.received_at, m.site, m.asset, m.profile, now, readings])
                        .map_err(sqlite_error)?;
                    report.stored += 1;
                }
            }
            tx.commit().map_err(sqlite_error)?;
            // The batch goes back to be freed by the thread that allocated it.
            drop(keys);
            Ok((report, messages))
        })
        .await
        .map(|(report, _)| report)
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
        after: Option<&PageCursor>,
        limit: usize,
    ) -> Result<StoredPage, StoreError> {
        let tenant = tenant.to_string();
        let after = match after.map(PageCursor::position) {
            None => 0,
            Some(Position::Row(row)) => *row,
            Some(other) => return Err(foreign_cursor(other)),
        };
        self.with(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT rowid, device_id, seq_no, msg_id, produced_at, stored_at,
                            json_array_length(readings)
                     FROM messages WHERE tenant = ?1 AND rowid > ?2 ORDER BY rowid LIMIT ?3",
                )
                .map_err(sqlite_error)?;
            let mut last = after;
            let rows = stmt
                .query_map(params![tenant, after, limit as i64], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        StoredMessage {
                            device_id: r.get(1)?,
                            seq_no: r.get(2)?,
                            msg_id: r.get(3)?,
                            produced_at: r.get(4)?,
                            stored_at: r.get(5)?,
                            readings: r.get(6)?,
                        },
                    ))
                })
                .map_err(sqlite_error)?;
            let mut messages = Vec::new();
            for row in rows {
                let (rowid, m) = row.map_err(sqlite_error)?;
                last = rowid;
                messages.push(m);
            }
            let next = (messages.len() == limit).then(|| PageCursor::new(Position::Row(last)));
            Ok(StoredPage { messages, next })
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
                    .prepare_cached("SELECT max(hi) - min(lo) + 1 - sum(hi - lo + 1) FROM message_runs WHERE tenant = ?1 AND device_id = ?2")
                    .map_err(sqlite_error)?;
                let mut set = tx
                    .prepare_cached("UPDATE twins SET seq_gaps = ?3 WHERE tenant = ?1 AND device_id = ?2 AND seq_gaps IS NOT ?3")
                    .map_err(sqlite_error)?;
                for (tenant, device) in &devices {
                    let gaps: i64 = count
                        .query_row(params![tenant, device], |r| r.get::<_, Option<i64>>(0))
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
            .write_messages(vec![message("d1", 3)])
            .await
            .expect("write");
        assert_eq!(stored.stored, 1);
        assert_eq!(store.reading_count(None).await.expect("count"), 5);
        let page = store.stored_messages("acme", None, 10).await.expect("page");
        assert_eq!(
            page.messages
                .iter()
                .map(|m| (m.seq_no, m.readings))
                .collect::<Vec<_>>(),
            [(1, 2), (2, 1), (3, 2)]
        );
        let _ = std::fs::remove_file(&path);
    }

    /// A file from before the dedup guards were runs: `messages` keyed by (tenant, deviceId,
    /// seqNo), `seq_stats`, and a key per folded message in `rollup_applied`.
    #[tokio::test]
    async fn a_file_keyed_by_device_gets_runs_and_its_messages_in_arrival_order() {
        use crate::RollupStore;
        let path = std::env::temp_dir().join(format!("iotp-runs-{}.sqlite", std::process::id()));
        let _ = std::fs::remove_file(&path);
        {
            let conn = rusqlite::Connection::open(&path).expect("open");
            conn.execute_batch(
                "CREATE TABLE messages (tenant TEXT NOT NULL, device_id TEXT NOT NULL, seq_no INTEGER NOT NULL,
                   msg_id TEXT NOT NULL, produced_at INTEGER NOT NULL, received_at INTEGER NOT NULL, site TEXT,
                   asset TEXT, profile TEXT NOT NULL, stored_at INTEGER NOT NULL, readings TEXT NOT NULL DEFAULT '[]',
                   PRIMARY KEY (tenant, device_id, seq_no)) WITHOUT ROWID;
                 CREATE INDEX messages_time ON messages (produced_at);
                 CREATE TABLE seq_stats (tenant TEXT NOT NULL, device_id TEXT NOT NULL, min_seq INTEGER NOT NULL,
                   max_seq INTEGER NOT NULL, stored INTEGER NOT NULL, PRIMARY KEY (tenant, device_id)) WITHOUT ROWID;
                 CREATE TABLE rollup_applied (tenant TEXT NOT NULL, device_id TEXT NOT NULL, seq_no INTEGER NOT NULL,
                   produced_at INTEGER NOT NULL, PRIMARY KEY (tenant, device_id, seq_no)) WITHOUT ROWID;
                 INSERT INTO messages VALUES
                   ('acme', 'd1', 0, 'm0', 1000, 1001, NULL, NULL, 'meter', 5003, '[[\"energy\",1.0,\"Wh\"]]'),
                   ('acme', 'd1', 1, 'm1', 1001, 1002, NULL, NULL, 'meter', 5001, '[]'),
                   ('acme', 'd1', 3, 'm3', 1003, 1004, NULL, NULL, 'meter', 5002, '[]'),
                   ('acme', 'd2', 7, 'm7', 1007, 1008, NULL, NULL, 'meter', 5000, '[]');
                 INSERT INTO seq_stats VALUES ('acme', 'd1', 0, 3, 3), ('acme', 'd2', 7, 7, 1);
                 INSERT INTO rollup_applied VALUES ('acme', 'd1', 0, 1000), ('acme', 'd1', 1, 1001);",
            )
            .expect("old schema");
        }
        let store = SqliteStore::open(&path).expect("upgrade");
        let page = store.stored_messages("acme", None, 10).await.expect("page");
        assert_eq!(
            page.messages
                .iter()
                .map(|m| (m.device_id.as_str(), m.seq_no))
                .collect::<Vec<_>>(),
            [("d2", 7), ("d1", 1), ("d1", 3), ("d1", 0)],
            "in the order they were stored"
        );
        assert_eq!(page.messages[3].readings, 1);
        let devices = [
            ("acme".to_string(), "d1".to_string()),
            ("acme".to_string(), "d2".to_string()),
        ];
        assert_eq!(
            store.update_seq_gaps(&devices).await.expect("gaps"),
            1,
            "d1's 2"
        );
        assert_eq!(
            store.stored_by_device_counts("acme").await.expect("counts"),
            4
        );
        let again = [
            message("d1", 1),
            message("d1", 2),
            message("d2", 7),
            message("d2", 8),
        ];
        assert_eq!(
            store.write_messages(again.to_vec()).await.expect("write"),
            WriteReport {
                stored: 2,
                duplicates: 2
            },
            "the keys of the old file still guard"
        );
        assert_eq!(store.update_seq_gaps(&devices).await.expect("gaps"), 0);
        let folded = store
            .fold(
                vec![message("d1", 0), message("d1", 1), message("d1", 2)],
                &[],
                0,
            )
            .await
            .expect("fold");
        assert_eq!(
            (folded.applied, folded.duplicates),
            (1, 2),
            "folded before the upgrade"
        );
        let tables: Vec<String> = store
            .with(|c| {
                let mut stmt = c
                    .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND sql NOT LIKE '%WITHOUT ROWID%' ORDER BY name")
                    .map_err(sqlite_error)?;
                let names = stmt.query_map([], |r| r.get(0)).map_err(sqlite_error)?;
                names.collect::<Result<_, _>>().map_err(sqlite_error)
            })
            .await
            .expect("tables");
        assert!(
            tables.contains(&"messages".to_string()),
            "a rowid table now: {tables:?}"
        );
        let old: i64 = store
            .with(|c| {
                c.query_row(
                    "SELECT count(*) FROM sqlite_schema WHERE name IN ('seq_stats', 'rollup_applied', 'messages_by_device')",
                    [],
                    |r| r.get(0),
                )
                .map_err(sqlite_error)
            })
            .await
            .expect("count");
        assert_eq!(old, 0);
        drop(store);
        // Opening again (as every other service sharing the file does) finds nothing to do.
        let store = SqliteStore::open(&path).expect("reopen");
        assert_eq!(store.message_count(Some("acme")).await.expect("count"), 6);
        let _ = std::fs::remove_file(&path);
    }
}
