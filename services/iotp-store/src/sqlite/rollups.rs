//! Roll-ups on SQLite: table `rollups`, one row per (tenant, deviceId, metric, granularity,
//! bucket start) with the revision published so far; the guard `rollup_runs` (`runs.rs`) holds
//! the keys of the messages already folded, `rollup_state` the watermark. A fold is one write
//! transaction.

use std::collections::hash_map::Entry;

use iotp_contract::devices::FastMap;

use rusqlite::{params, OptionalExtension};

use super::runs::{self, Guard, Key};
use super::{sqlite_error, write_transaction, SqliteStore};
use crate::fold::fold_reading;
use crate::{Bucket, FoldReport, MessageRecord, RollupStore, StoreError, GRANULARITIES};

/// (tenant, deviceId, metric, granularity, bucket start).
type BucketKey<'a> = (&'a str, &'a str, &'a str, &'a str, i64);

/// The columns [`bucket_row`] reads, in its order (and the first 16 the fold writes).
const BUCKET_COLUMNS: &str = "tenant, device_id, metric, granularity, bucket_start, count, sum, min, max, first, first_at, last, last_at, unit, cumulative, revision";

/// A `rollups` row as a [`Bucket`]: the one mapping from the table (columns
/// [`BUCKET_COLUMNS`]).
fn bucket_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Bucket> {
    Ok(Bucket {
        tenant: r.get(0)?,
        device_id: r.get(1)?,
        metric: r.get(2)?,
        granularity: r.get(3)?,
        bucket_start: r.get(4)?,
        count: r.get(5)?,
        sum: r.get(6)?,
        min: r.get(7)?,
        max: r.get(8)?,
        first: r.get(9)?,
        first_at: r.get(10)?,
        last: r.get(11)?,
        last_at: r.get(12)?,
        unit: r.get(13)?,
        cumulative: r.get(14)?,
        revision: r.get(15)?,
    })
}

impl RollupStore for SqliteStore {
    async fn fold(
        &self,
        messages: Vec<MessageRecord>,
        cumulative: &[String],
        watermark: i64,
    ) -> Result<FoldReport, StoreError> {
        let cumulative = cumulative.to_vec();
        self.with(move |conn| {
            let tx = write_transaction(conn)?;
            let mut report = FoldReport::default();
            {
                let keys: Vec<Key<'_>> = messages
                    .iter()
                    .map(|m| (m.tenant.as_str(), m.device_id.as_str(), m.seq_no, m.produced_at))
                    .collect();
                let new = runs::take(&tx, Guard::Rollups, &keys)?;
                let mut read = tx
                    .prepare_cached(&format!(
                        "SELECT {BUCKET_COLUMNS} FROM rollups WHERE tenant = ?1 AND device_id = ?2 AND metric = ?3 AND granularity = ?4 AND bucket_start = ?5"
                    ))
                    .map_err(sqlite_error)?;
                let mut write = tx
                    .prepare_cached(&format!(
                        "INSERT INTO rollups ({BUCKET_COLUMNS}, bucket_end) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)
                         ON CONFLICT (tenant, device_id, metric, granularity, bucket_start) DO UPDATE SET
                           count = excluded.count, sum = excluded.sum, min = excluded.min, max = excluded.max,
                           first = excluded.first, first_at = excluded.first_at, last = excluded.last, last_at = excluded.last_at,
                           revision = excluded.revision"
                    ))
                    .map_err(sqlite_error)?;
                // Each bucket the batch touches is read once, folded in memory in message order,
                // and written once.
                let mut buckets: FastMap<BucketKey<'_>, (Option<Bucket>, i64)> = FastMap::default();
                for (m, new) in messages.iter().zip(new) {
                    if !new {
                        report.duplicates += 1;
                        continue;
                    }
                    report.applied += 1;
                    for (metric, value, unit) in &m.readings {
                        for (granularity, len) in GRANULARITIES {
                            let start = m.produced_at.div_euclid(len) * len;
                            let key = (m.tenant.as_str(), m.device_id.as_str(), metric.as_str(), granularity, start);
                            let slot = match buckets.entry(key) {
                                Entry::Occupied(e) => e.into_mut(),
                                Entry::Vacant(e) => {
                                    let current = read
                                        .query_row(params![m.tenant, m.device_id, metric, granularity, start], bucket_row)
                                        .optional()
                                        .map_err(sqlite_error)?;
                                    e.insert((current, start + len))
                                }
                            };
                            slot.0 = Some(fold_reading(slot.0.take(), key, *value, m.produced_at, unit, cumulative.contains(metric)));
                        }
                    }
                }
                for (b, end) in buckets.into_values().filter_map(|(b, end)| Some((b?, end))) {
                    write
                        .execute(params![
                            b.tenant, b.device_id, b.metric, b.granularity, b.bucket_start, b.count, b.sum, b.min, b.max,
                            b.first, b.first_at, b.last, b.last_at, b.unit, b.cumulative, b.revision, end
                        ])
                        .map_err(sqlite_error)?;
                }
            }
            // Cached, as every statement run once per batch: compiling it cost more than running it.
            tx.prepare_cached(
                "INSERT INTO rollup_state (name, value) VALUES ('watermark', ?1)
                 ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)",
            )
            .and_then(|mut stmt| stmt.execute(params![watermark]))
            .map_err(sqlite_error)?;
            tx.commit().map_err(sqlite_error)?;
            // The batch goes back to be freed by the thread that allocated it.
            Ok((report, messages))
        })
        .await
        .map(|(report, _)| report)
    }

    async fn watermark(&self) -> Result<i64, StoreError> {
        self.with(|conn| {
            conn.query_row(
                "SELECT value FROM rollup_state WHERE name = 'watermark'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map(|v| v.unwrap_or(i64::MIN))
            .map_err(sqlite_error)
        })
        .await
    }

    async fn closed_unpublished(
        &self,
        lateness_ms: i64,
        limit: usize,
    ) -> Result<Vec<Bucket>, StoreError> {
        self.with(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {BUCKET_COLUMNS} FROM rollups
                     WHERE revision > published_revision
                       AND bucket_end + ?1 <= (SELECT value FROM rollup_state WHERE name = 'watermark')
                     ORDER BY bucket_end LIMIT ?2"
                ))
                .map_err(sqlite_error)?;
            let rows = stmt.query_map(params![lateness_ms, limit as i64], bucket_row).map_err(sqlite_error)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(sqlite_error)
        })
        .await
    }

    async fn mark_published(&self, buckets: &[Bucket]) -> Result<(), StoreError> {
        let buckets = buckets.to_vec();
        self.with(move |conn| {
            let tx = write_transaction(conn)?;
            for b in &buckets {
                tx.execute(
                    "UPDATE rollups SET published_revision = max(published_revision, ?6)
                     WHERE tenant = ?1 AND device_id = ?2 AND metric = ?3 AND granularity = ?4 AND bucket_start = ?5",
                    params![b.tenant, b.device_id, b.metric, b.granularity, b.bucket_start, b.revision],
                )
                .map_err(sqlite_error)?;
            }
            tx.commit().map_err(sqlite_error)
        })
        .await
    }

    async fn buckets(&self, tenant: &str, device_id: &str) -> Result<Vec<Bucket>, StoreError> {
        let (tenant, device_id) = (tenant.to_string(), device_id.to_string());
        self.with(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {BUCKET_COLUMNS} FROM rollups WHERE tenant = ?1 AND device_id = ?2 ORDER BY granularity, metric, bucket_start"
                ))
                .map_err(sqlite_error)?;
            let rows = stmt.query_map(params![tenant, device_id], bucket_row).map_err(sqlite_error)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(sqlite_error)
        })
        .await
    }
}
