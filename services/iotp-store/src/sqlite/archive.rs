//! The dead-letter archive on SQLite: table `dead_letters`, primary key the letter's id,
//! expiry by each letter's own `expires_at` (deleted by `prune_letters`).

use iotp_contract::DeadLetter;
use rusqlite::{params, Row};

use super::{sqlite_error, write_transaction, SqliteStore};
use crate::{Archived, DeadLetterArchive, LetterFilter, StoreError};

/// The columns [`archived_row`] reads, in its order.
const ARCHIVED_COLUMNS: &str = "id, stage, reason, error, source_topic, source_partition, \
     source_offset, key, payload, tenant, device_id, attempts, first_failure_at, last_failure_at, \
     parked_at, expires_at, replayed_at, replays";

/// A `dead_letters` row as an [`Archived`] letter: the one mapping from the table (columns
/// [`ARCHIVED_COLUMNS`]).
fn archived_row(r: &Row<'_>) -> rusqlite::Result<Archived> {
    Ok(Archived {
        letter: DeadLetter {
            id: r.get(0)?,
            stage: r.get(1)?,
            reason_code: r.get(2)?,
            error: r.get(3)?,
            source_topic: r.get(4)?,
            source_partition: r.get(5)?,
            source_offset: r.get(6)?,
            key: r.get(7)?,
            payload: r.get(8)?,
            tenant: r.get(9)?,
            device_id: r.get(10)?,
            attempts: r.get(11)?,
            first_failure_at: r.get(12)?,
            last_failure_at: r.get(13)?,
        },
        parked_at: r.get(14)?,
        expires_at: r.get(15)?,
        replayed_at: r.get(16)?,
        replays: r.get(17)?,
    })
}

impl DeadLetterArchive for SqliteStore {
    async fn archive(
        &self,
        l: &DeadLetter,
        parked_at: i64,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let l = l.clone();
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO dead_letters (id, stage, reason, error, source_topic, source_partition, source_offset, key, payload,
                   tenant, device_id, attempts, first_failure_at, last_failure_at, parked_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
                 ON CONFLICT (id) DO UPDATE SET reason = excluded.reason, error = excluded.error,
                   attempts = max(attempts, excluded.attempts), last_failure_at = max(last_failure_at, excluded.last_failure_at),
                   parked_at = excluded.parked_at, expires_at = excluded.expires_at, replayed_at = NULL",
                params![
                    l.id, l.stage, l.reason_code, l.error, l.source_topic, l.source_partition, l.source_offset, l.key, l.payload,
                    l.tenant, l.device_id, l.attempts, l.first_failure_at, l.last_failure_at, parked_at, expires_at
                ],
            )
            .map_err(sqlite_error)?;
            Ok(())
        })
        .await
    }

    async fn letters(&self, f: &LetterFilter) -> Result<Vec<Archived>, StoreError> {
        let f = f.clone();
        self.with(move |conn| {
            let mut sql = format!("SELECT {ARCHIVED_COLUMNS} FROM dead_letters WHERE 1 = 1");
            let mut args: Vec<rusqlite::types::Value> = Vec::new();
            for (column, value) in [
                ("reason", &f.reason),
                ("stage", &f.stage),
                ("tenant", &f.tenant),
                ("device_id", &f.device_id),
            ] {
                if let Some(v) = value {
                    args.push(v.clone().into());
                    sql.push_str(&format!(" AND {column} = ?{}", args.len()));
                }
            }
            if !f.ids.is_empty() {
                let mut marks = Vec::new();
                for id in &f.ids {
                    args.push(id.clone().into());
                    marks.push(format!("?{}", args.len()));
                }
                sql.push_str(&format!(" AND id IN ({})", marks.join(", ")));
            }
            if !f.include_replayed {
                sql.push_str(" AND replayed_at IS NULL");
            }
            let limit = if f.limit == 0 { 1000 } else { f.limit };
            sql.push_str(&format!(" ORDER BY parked_at, id LIMIT {limit}"));
            let mut stmt = conn.prepare(&sql).map_err(sqlite_error)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args), archived_row)
                .map_err(sqlite_error)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(sqlite_error)
        })
        .await
    }

    async fn mark_replayed(&self, ids: &[String], at: i64) -> Result<(), StoreError> {
        let ids = ids.to_vec();
        self.with(move |conn| {
            let tx = write_transaction(conn)?;
            // Once per `at`: the same call made again after a failure counts nothing twice.
            for id in &ids {
                tx.execute(
                    "UPDATE dead_letters SET replayed_at = ?2, replays = replays + 1
                     WHERE id = ?1 AND replayed_at IS NOT ?2",
                    params![id, at],
                )
                .map_err(sqlite_error)?;
            }
            tx.commit().map_err(sqlite_error)
        })
        .await
    }

    async fn prune_letters(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.with(move |conn| {
            conn.execute(
                "DELETE FROM dead_letters WHERE expires_at < ?1",
                params![now_ms],
            )
            .map(|n| n as u64)
            .map_err(sqlite_error)
        })
        .await
    }
}
