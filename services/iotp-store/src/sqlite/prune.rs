//! Retention on SQLite: a pruning pass deletes what is older than its tier (event time), in
//! one write transaction; the upserter runs it on its tick.

use rusqlite::params;

use super::runs::{self, Guard};
use super::{sqlite_error, write_transaction, SqliteStore};
use crate::{PruneReport, Pruning, Retention, StoreError};

impl Pruning for SqliteStore {
    async fn prune(&self, now_ms: i64, retention: &Retention) -> Result<PruneReport, StoreError> {
        let r = *retention;
        self.with(move |conn| {
            let cutoff = |d: std::time::Duration| now_ms - d.as_millis() as i64;
            let tx = write_transaction(conn)?;
            let raw = tx
                .execute(
                    "DELETE FROM messages WHERE produced_at < ?1",
                    params![cutoff(r.raw)],
                )
                .map_err(sqlite_error)?;
            // A message older than the raw tier is rejected as too_old before it reaches the
            // store, so the dedup guards' runs of such messages may go with them.
            runs::expire(&tx, Guard::Messages, cutoff(r.raw))?;
            runs::expire(&tx, Guard::Rollups, cutoff(r.raw))?;
            let hourly = tx
                .execute(
                    "DELETE FROM rollups WHERE granularity = 'hour' AND bucket_start < ?1",
                    params![cutoff(r.hourly)],
                )
                .map_err(sqlite_error)?;
            let daily = tx
                .execute(
                    "DELETE FROM rollups WHERE granularity = 'day' AND bucket_start < ?1",
                    params![cutoff(r.daily)],
                )
                .map_err(sqlite_error)?;
            tx.commit().map_err(sqlite_error)?;
            Ok(PruneReport {
                raw: raw as u64,
                hourly: hourly as u64,
                daily: daily as u64,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{MessageRecord, ReadingStore, RollupStore};

    use super::super::test_message as message;

    #[tokio::test]
    async fn each_tier_expires_on_its_own_schedule() {
        const DAY: i64 = 86_400_000;
        let store = SqliteStore::open(Path::new(":memory:")).expect("open");
        let retention = Retention {
            raw: std::time::Duration::from_secs(2 * 86_400),
            hourly: std::time::Duration::from_secs(5 * 86_400),
            daily: std::time::Duration::from_secs(9 * 86_400),
        };
        let old = MessageRecord {
            produced_at: 0,
            ..message("d1", 1)
        };
        store
            .write_messages(vec![old.clone()])
            .await
            .expect("write");
        store.fold(vec![old.clone()], &[], 0).await.expect("fold");
        let count = |g: &'static str| {
            let store = store.clone();
            async move {
                store
                    .buckets("acme", "d1")
                    .await
                    .expect("buckets")
                    .iter()
                    .filter(|b| b.granularity == g)
                    .count()
            }
        };
        // The clock moves: day 1 keeps all; day 3 drops raw; day 6 drops hourly; day 10 daily.
        assert_eq!(
            store.prune(DAY, &retention).await.expect("prune"),
            PruneReport::default()
        );
        assert_eq!(
            store.prune(3 * DAY, &retention).await.expect("prune"),
            PruneReport {
                raw: 1,
                hourly: 0,
                daily: 0
            }
        );
        assert_eq!(store.message_count(None).await.expect("count"), 0);
        assert_eq!(store.reading_count(None).await.expect("count"), 0);
        assert_eq!((count("hour").await, count("day").await), (2, 2));
        // The dedup keys went with the raw tier: nothing counts the message as stored or
        // folded any more.
        assert_eq!(
            store.stored_by_device_counts("acme").await.expect("counts"),
            0
        );
        let keys: i64 = store
            .with(|c| {
                c.query_row(
                    "SELECT (SELECT count(*) FROM message_runs) + (SELECT count(*) FROM rollup_runs)",
                    [],
                    |r| r.get(0),
                )
                .map_err(super::super::sqlite_error)
            })
            .await
            .expect("runs");
        assert_eq!(keys, 0);
        assert_eq!(
            store.prune(6 * DAY, &retention).await.expect("prune"),
            PruneReport {
                raw: 0,
                hourly: 2,
                daily: 0
            }
        );
        assert_eq!((count("hour").await, count("day").await), (0, 2));
        assert_eq!(
            store.prune(10 * DAY, &retention).await.expect("prune"),
            PruneReport {
                raw: 0,
                hourly: 0,
                daily: 2
            }
        );
        assert_eq!(count("day").await, 0);
    }
}
