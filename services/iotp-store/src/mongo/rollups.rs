//! Roll-ups on MongoDB.
//!
//! | collection | `_id` | retention |
//! | --- | --- | --- |
//! | `rollups_hourly`, `rollups_daily` | `tenant/deviceId/metric/granularity/bucketStartMs` | TTL index on the `bucketStart` date, `expireAfterSeconds` = `retention.hourly` / `retention.daily` |
//! | `rollup_keys` | `tenant/deviceId/seqNo`: messages already folded | TTL on `producedAt`, raw tier (older messages are rejected as `too_old` upstream) |
//! | `rollup_state` | `watermark` | none |
//!
//! Two collections, each with one TTL on the bucket start, rather than one collection with a
//! per-document `expireAt`: the tier's retention is then a property of the collection, and a
//! changed retention reaches every existing bucket through one `collMod` instead of a rewrite
//! of every document; it is also exactly the embedded store's rule (a bucket goes when its
//! start is older than its tier).
//!
//! [`RollupStore::fold`] runs as one multi-document transaction ([`super::transaction`]):
//! read which of the batch's messages are already in `rollup_keys`, insert the keys of the
//! others, read their buckets, fold the readings in memory with the shared [`fold_reading`],
//! write each bucket back on condition that its `revision` is still the one read (upsert for
//! new buckets), and raise the watermark with `$max`. Either all of it commits or none: each
//! message is folded exactly once, a replay finds its keys and does nothing, the watermark only
//! rises. A transaction the server aborted, or one that met a changed bucket, fails the fold
//! with a transient error and the caller runs it again; so does a commit whose outcome is
//! unknown, and the fold run again then finds the keys if that commit did happen.

use std::collections::{HashMap, HashSet};

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::ClientSession;

use super::buckets::{
    bucket_from, bucket_id, bucket_update, due_filter, length, published_update, rollup_collection,
    rollup_key, watermark_update, WATERMARK,
};
use super::command::{mongo_error, update_command, write_reply};
use super::transaction::{find_in, write_all};
use super::{key_id, MongoStore, ROLLUPS_DAILY, ROLLUPS_HOURLY, ROLLUP_KEYS, ROLLUP_STATE};
use crate::fold::fold_reading;
use crate::{Bucket, FoldReport, MessageRecord, RollupStore, StoreError, GRANULARITIES};

impl MongoStore {
    /// The body of the fold transaction ([`MongoStore::in_transaction`]).
    async fn fold_in(
        &self,
        session: &mut ClientSession,
        messages: &[&MessageRecord],
        cumulative: &[String],
        watermark: i64,
    ) -> Result<FoldReport, StoreError> {
        let ids: Vec<String> = messages
            .iter()
            .map(|m| key_id(&m.tenant, &m.device_id, m.seq_no))
            .collect();
        let folded: HashSet<String> = find_in(
            &self.db.collection::<Document>(ROLLUP_KEYS),
            session,
            &ids,
            self.batch_size,
        )
        .await?
        .iter()
        .filter_map(|d| d.get_str("_id").ok().map(String::from))
        .collect();
        let fresh: Vec<&MessageRecord> = messages
            .iter()
            .zip(&ids)
            .filter(|(_, id)| !folded.contains(*id))
            .map(|(m, _)| *m)
            .collect();
        let report = FoldReport {
            applied: fresh.len() as u64,
            duplicates: (messages.len() - fresh.len()) as u64,
        };
        // The buckets the fresh messages touch, as stored (with the revision read).
        let mut wanted: HashMap<&'static str, HashSet<String>> = HashMap::new();
        for m in &fresh {
            for (metric, _, _) in &m.readings {
                for (g, len) in GRANULARITIES {
                    let start = m.produced_at.div_euclid(len) * len;
                    wanted
                        .entry(rollup_collection(g))
                        .or_default()
                        .insert(bucket_id(&m.tenant, &m.device_id, metric, g, start));
                }
            }
        }
        let mut buckets: HashMap<String, Bucket> = HashMap::new();
        let mut read_revision: HashMap<String, i64> = HashMap::new();
        for (collection, ids) in &wanted {
            let ids: Vec<String> = ids.iter().cloned().collect();
            let coll = self.db.collection::<Document>(collection);
            for d in find_in(&coll, session, &ids, self.batch_size).await? {
                let b = bucket_from(&d)?;
                let id = bucket_id(
                    &b.tenant,
                    &b.device_id,
                    &b.metric,
                    &b.granularity,
                    b.bucket_start,
                );
                read_revision.insert(id.clone(), b.revision);
                buckets.insert(id, b);
            }
        }
        // Each touched bucket once, in first-touched order.
        let mut changed: Vec<String> = Vec::new();
        let mut touched: HashSet<String> = HashSet::new();
        for m in &fresh {
            for (metric, value, unit) in &m.readings {
                for (g, len) in GRANULARITIES {
                    let start = m.produced_at.div_euclid(len) * len;
                    let id = bucket_id(&m.tenant, &m.device_id, metric, g, start);
                    let key = (
                        m.tenant.as_str(),
                        m.device_id.as_str(),
                        metric.as_str(),
                        g,
                        start,
                    );
                    let current = buckets.remove(&id);
                    if touched.insert(id.clone()) {
                        changed.push(id.clone());
                    }
                    let b = fold_reading(
                        current,
                        key,
                        *value,
                        m.produced_at,
                        unit,
                        cumulative.contains(metric),
                    );
                    buckets.insert(id, b);
                }
            }
        }
        write_all(
            self,
            session,
            ROLLUP_KEYS,
            fresh.iter().map(|m| rollup_key(m)).collect(),
            true,
        )
        .await?;
        let mut statements: HashMap<&'static str, Vec<Document>> = HashMap::new();
        for id in &changed {
            let b = &buckets[id];
            statements
                .entry(rollup_collection(&b.granularity))
                .or_default()
                .push(bucket_update(
                    b,
                    read_revision.get(id).copied().unwrap_or(0),
                ));
        }
        for (collection, statements) in statements {
            write_all(self, session, collection, statements, false).await?;
        }
        write_all(
            self,
            session,
            ROLLUP_STATE,
            vec![watermark_update(watermark)],
            false,
        )
        .await?;
        Ok(report)
    }

    async fn bucket_docs(
        &self,
        collection: &str,
        filter: Document,
        sort: Document,
        limit: i64,
    ) -> Result<Vec<Bucket>, StoreError> {
        let docs: Vec<Document> = self
            .db
            .collection::<Document>(collection)
            .find(filter)
            .sort(sort)
            .limit(limit)
            .await
            .map_err(mongo_error)?
            .try_collect()
            .await
            .map_err(mongo_error)?;
        docs.iter().map(bucket_from).collect()
    }
}

impl RollupStore for MongoStore {
    async fn fold(
        &self,
        messages: Vec<MessageRecord>,
        cumulative: &[String],
        watermark: i64,
    ) -> Result<FoldReport, StoreError> {
        // A key twice in one batch: the first is folded, the others are duplicates.
        let mut in_batch = HashSet::new();
        let unique: Vec<&MessageRecord> = messages
            .iter()
            .filter(|m| in_batch.insert(key_id(&m.tenant, &m.device_id, m.seq_no)))
            .collect();
        let repeated = (messages.len() - unique.len()) as u64;
        let mut report = self
            .in_transaction(async |session| {
                self.fold_in(session, &unique, cumulative, watermark).await
            })
            .await?;
        report.duplicates += repeated;
        Ok(report)
    }

    async fn watermark(&self) -> Result<i64, StoreError> {
        let state = self
            .collection(ROLLUP_STATE)
            .find_one(doc! { "_id": WATERMARK })
            .await
            .map_err(mongo_error)?;
        Ok(state
            .and_then(|d| {
                d.get("value")
                    .and_then(|v| v.as_i64().or(v.as_i32().map(i64::from)))
            })
            .unwrap_or(i64::MIN))
    }

    async fn closed_unpublished(
        &self,
        lateness_ms: i64,
        limit: usize,
    ) -> Result<Vec<Bucket>, StoreError> {
        let watermark = self.watermark().await?;
        if watermark == i64::MIN || limit == 0 {
            return Ok(Vec::new());
        }
        let filter = due_filter(watermark.saturating_sub(lateness_ms));
        let mut due = Vec::new();
        for collection in [ROLLUPS_HOURLY, ROLLUPS_DAILY] {
            due.extend(
                self.bucket_docs(
                    collection,
                    filter.clone(),
                    doc! { "bucketEnd": 1 },
                    limit as i64,
                )
                .await?,
            );
        }
        due.sort_by_key(|b| b.bucket_start + length(&b.granularity));
        due.truncate(limit);
        Ok(due)
    }

    async fn mark_published(&self, buckets: &[Bucket]) -> Result<(), StoreError> {
        for collection in [ROLLUPS_HOURLY, ROLLUPS_DAILY] {
            let statements: Vec<Document> = buckets
                .iter()
                .filter(|b| rollup_collection(&b.granularity) == collection)
                .map(published_update)
                .collect();
            for chunk in statements.chunks(self.batch_size) {
                let reply = self
                    .db
                    .run_command(update_command(collection, chunk.to_vec(), false))
                    .await
                    .map_err(mongo_error)?;
                write_reply(&reply)?;
            }
        }
        Ok(())
    }

    async fn buckets(&self, tenant: &str, device_id: &str) -> Result<Vec<Bucket>, StoreError> {
        let mut out = Vec::new();
        // Ordered by granularity ("day" before "hour"), metric, start, as the embedded store.
        for collection in [ROLLUPS_DAILY, ROLLUPS_HOURLY] {
            out.extend(
                self.bucket_docs(
                    collection,
                    doc! { "tenant": tenant, "deviceId": device_id },
                    doc! { "metric": 1, "bucketStart": 1 },
                    0,
                )
                .await?,
            );
        }
        Ok(out)
    }
}
