//! Roll-ups on SQLite: table `rollups`, one row per (tenant, deviceId, metric, granularity,
//! bucket start) with the revision published so far; the guard `rollup_runs` (`runs.rs`) holds
//! the keys of the messages already folded, `rollup_state` the watermark. A fold is one write
//! transaction.

use std::collections::hash_map::Entry;

use iotp_contract::devices::FastMap;

use rusqlite::{params, OptionalExtension};

use super::runs::{self, Guard, Key};
use super::{sqlite_error, write_transaction, DeviceCache, SqliteStore};
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

/// A cached bucket written back: only if the stored revision is still `?17`, the one it was
/// cached at (another process or the pruning may have changed or removed the row since).
const UPDATE_CACHED_BUCKET: &str = "UPDATE rollups SET count = ?6, sum = ?7, min = ?8, max = ?9,
       first = ?10, first_at = ?11, last = ?12, last_at = ?13, revision = ?16
     WHERE tenant = ?1 AND device_id = ?2 AND metric = ?3 AND granularity = ?4 AND bucket_start = ?5
       AND revision = ?17";

/// Most devices whose buckets the cache holds (each: the newest bucket of each metric and
/// granularity, about 200 bytes each). The devices past it are read from the file, as without
/// a cache.
const BUCKET_CACHE_DEVICES: usize = 10_000;

/// The buckets this process wrote last: per device, the newest of each metric and granularity
/// (the open ones, where a device's readings land), as written. A batch folds into them without
/// reading their rows; a cached bucket is written back only while the stored revision is the
/// cached one, and otherwise read again in the same write transaction and folded anew.
pub(super) type BucketCache = DeviceCache<Vec<Bucket>, BUCKET_CACHE_DEVICES>;

impl BucketCache {
    /// The cached bucket with this key, taken out (put back once its batch is committed).
    fn take(&mut self, key: BucketKey<'_>) -> Option<Bucket> {
        let (tenant, device_id, metric, granularity, start) = key;
        let buckets = self.get_mut(tenant, device_id)?;
        let at = buckets.iter().position(|b| {
            b.bucket_start == start && b.metric == metric && b.granularity == granularity
        })?;
        Some(buckets.swap_remove(at))
    }

    /// Keep `bucket`, as stored, unless the device has a newer one of its metric and
    /// granularity cached, or the cache is full of other devices.
    fn put(&mut self, bucket: Bucket) {
        let Some(buckets) = self.slot(&bucket.tenant, &bucket.device_id) else {
            return;
        };
        match buckets
            .iter_mut()
            .find(|b| b.metric == bucket.metric && b.granularity == bucket.granularity)
        {
            Some(b) if b.bucket_start <= bucket.bucket_start => *b = bucket,
            Some(_) => {}
            None => buckets.push(bucket),
        }
    }
}

/// A bucket a batch folds into.
struct Slot {
    /// As stored (or cached) and then folded; `None` until a reading lands in it.
    bucket: Option<Bucket>,
    /// Its end, epoch ms.
    end: i64,
    /// The revision it was cached at; `None`: read in this transaction (or not stored).
    cached: Option<i64>,
}

impl RollupStore for SqliteStore {
    async fn fold(
        &self,
        messages: Vec<MessageRecord>,
        cumulative: &[String],
        watermark: i64,
    ) -> Result<FoldReport, StoreError> {
        let cumulative = cumulative.to_vec();
        let cache = self.buckets.clone();
        self.with(move |conn| {
            let mut cache = cache
                .lock()
                .map_err(|_| StoreError::Backend("bucket cache poisoned by a panic".into()))?;
            let tx = write_transaction(conn)?;
            let mut report = FoldReport::default();
            let written: Vec<Bucket>;
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
                let mut write_cached = tx.prepare_cached(UPDATE_CACHED_BUCKET).map_err(sqlite_error)?;
                // Each bucket the batch touches is taken from the cache or read once, folded in
                // memory in message order, and written once.
                let mut buckets: FastMap<BucketKey<'_>, Slot> = FastMap::default();
                for (m, &new) in messages.iter().zip(&new) {
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
                                Entry::Vacant(e) => e.insert(match cache.take(key) {
                                    Some(b) => Slot { end: start + len, cached: Some(b.revision), bucket: Some(b) },
                                    None => Slot {
                                        bucket: read
                                            .query_row(params![m.tenant, m.device_id, metric, granularity, start], bucket_row)
                                            .optional()
                                            .map_err(sqlite_error)?,
                                        end: start + len,
                                        cached: None,
                                    },
                                }),
                            };
                            slot.bucket = Some(fold_reading(slot.bucket.take(), key, *value, m.produced_at, unit, cumulative.contains(metric)));
                        }
                    }
                }
                for (&key, slot) in buckets.iter_mut() {
                    let Some(b) = &slot.bucket else { continue };
                    if let Some(revision) = slot.cached {
                        let written = write_cached
                            .execute(params![
                                b.tenant, b.device_id, b.metric, b.granularity, b.bucket_start, b.count, b.sum, b.min, b.max,
                                b.first, b.first_at, b.last, b.last_at, b.unit, b.cumulative, b.revision, revision
                            ])
                            .map_err(sqlite_error)?;
                        if written == 1 {
                            continue;
                        }
                        // The cached bucket is stale (written by another process, or pruned):
                        // fold this batch's readings into the row as stored now.
                        let (tenant, device_id, metric, granularity, start) = key;
                        let mut bucket = read
                            .query_row(params![tenant, device_id, metric, granularity, start], bucket_row)
                            .optional()
                            .map_err(sqlite_error)?;
                        for (m, _) in messages.iter().zip(&new).filter(|(m, &new)| {
                            new && m.tenant == tenant && m.device_id == device_id && m.produced_at.div_euclid(slot.end - start) * (slot.end - start) == start
                        }) {
                            for (_, value, unit) in m.readings.iter().filter(|(name, _, _)| name == metric) {
                                bucket = Some(fold_reading(bucket, key, *value, m.produced_at, unit, cumulative.iter().any(|c| c == metric)));
                            }
                        }
                        slot.bucket = bucket;
                    }
                    let Some(b) = &slot.bucket else { continue };
                    write
                        .execute(params![
                            b.tenant, b.device_id, b.metric, b.granularity, b.bucket_start, b.count, b.sum, b.min, b.max,
                            b.first, b.first_at, b.last, b.last_at, b.unit, b.cumulative, b.revision, slot.end
                        ])
                        .map_err(sqlite_error)?;
                }
                drop((read, write, write_cached));
                written = buckets.into_values().filter_map(|slot| slot.bucket).collect();
            }
            // Cached, as every statement run once per batch: compiling it cost more than running it.
            tx.prepare_cached(
                "INSERT INTO rollup_state (name, value) VALUES ('watermark', ?1)
                 ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)",
            )
            .and_then(|mut stmt| stmt.execute(params![watermark]))
            .map_err(sqlite_error)?;
            tx.commit().map_err(sqlite_error)?;
            for bucket in written {
                cache.put(bucket);
            }
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

#[cfg(test)]
mod tests {
    //! The bucket cache against other writers of the same file. The fold's rules are tested on
    //! every backend in `tests/store_contract.rs`.
    use std::path::Path;

    use super::*;
    use crate::sqlite::test_file;

    /// One reading of `temp` at 10:00:00.000 plus `seq_no` ms, 1 January 2026.
    fn message(seq_no: i64, value: f64) -> MessageRecord {
        MessageRecord {
            tenant: "acme".into(),
            device_id: "d1".into(),
            seq_no,
            msg_id: format!("m-{seq_no}"),
            produced_at: 1_767_261_600_000 + seq_no,
            received_at: 1_767_261_600_000 + seq_no,
            site: None,
            asset: None,
            profile: "meter".into(),
            readings: vec![("temp".into(), value, Some("Cel".into()))],
        }
    }

    async fn hour(store: &SqliteStore) -> Bucket {
        let buckets = store.buckets("acme", "d1").await.expect("buckets");
        let hour = buckets.into_iter().find(|b| b.granularity == "hour");
        hour.expect("an hour bucket")
    }

    async fn fold(store: &SqliteStore, messages: Vec<MessageRecord>) {
        store.fold(messages, &[], 0).await.expect("fold");
    }

    fn open(path: &Path) -> SqliteStore {
        SqliteStore::open(path).expect("store")
    }

    #[tokio::test]
    async fn a_bucket_another_process_wrote_is_read_again_not_overwritten() {
        // Two aggregator replicas on one file (a rebalance moved the device between them).
        let path = test_file("rollups-two-writers");
        let (a, b) = (open(&path), open(&path));
        fold(&a, vec![message(1, 10.0), message(2, 20.0)]).await;
        fold(&b, vec![message(3, 30.0)]).await;
        // `a` caches the bucket at revision 2; the file has it at 3.
        fold(&a, vec![message(4, 40.0)]).await;
        let bucket = hour(&a).await;
        assert_eq!((bucket.count, bucket.sum, bucket.revision), (4, 100.0, 4));
        assert_eq!((bucket.first, bucket.last), (10.0, 40.0));
        fold(&b, vec![message(5, 5.0)]).await;
        let bucket = hour(&b).await;
        assert_eq!((bucket.count, bucket.sum, bucket.min), (5, 105.0, 5.0));
    }

    #[tokio::test]
    async fn a_cached_bucket_whose_row_was_removed_starts_again() {
        let path = test_file("rollups-removed");
        let store = open(&path);
        fold(&store, vec![message(1, 10.0)]).await;
        // Pruned (or removed by hand) behind the cache's back.
        open(&path)
            .conn
            .lock()
            .expect("connection")
            .execute("DELETE FROM rollups", [])
            .expect("delete");
        fold(&store, vec![message(2, 20.0)]).await;
        let bucket = hour(&store).await;
        assert_eq!((bucket.count, bucket.sum, bucket.revision), (1, 20.0, 1));
    }

    #[test]
    fn the_cache_keeps_the_newest_bucket_of_a_metric() {
        let mut cache = BucketCache::default();
        let bucket = |start: i64, revision: i64| Bucket {
            tenant: "acme".into(),
            device_id: "d1".into(),
            metric: "temp".into(),
            granularity: "hour".into(),
            bucket_start: start,
            count: revision,
            sum: 0.0,
            min: 0.0,
            max: 0.0,
            first: 0.0,
            first_at: start,
            last: 0.0,
            last_at: start,
            unit: None,
            cumulative: false,
            revision,
        };
        cache.put(bucket(3_600_000, 1));
        cache.put(bucket(0, 7)); // a late reading's older bucket: not kept
        assert!(cache.take(("acme", "d1", "temp", "hour", 0)).is_none());
        cache.put(bucket(7_200_000, 2)); // the next hour replaces it
        assert!(cache
            .take(("acme", "d1", "temp", "hour", 3_600_000))
            .is_none());
        let taken = cache.take(("acme", "d1", "temp", "hour", 7_200_000));
        assert_eq!(taken.map(|b| b.revision), Some(2));
    }
}
