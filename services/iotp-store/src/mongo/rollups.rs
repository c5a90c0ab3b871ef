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
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::ClientSession;

use super::command::{mongo_error, update_command, write_reply};
use super::fields::Fields;
use super::transaction::{find_in, write_all};
use super::{key_id, MongoStore, ROLLUPS_DAILY, ROLLUPS_HOURLY, ROLLUP_KEYS, ROLLUP_STATE};
use crate::fold::fold_reading;
use crate::{Bucket, FoldReport, MessageRecord, RollupStore, StoreError, GRANULARITIES};

/// `_id` of the watermark document.
const WATERMARK: &str = "watermark";

/// The collection of a granularity's buckets.
pub(crate) fn rollup_collection(granularity: &str) -> &'static str {
    if granularity == "day" {
        ROLLUPS_DAILY
    } else {
        ROLLUPS_HOURLY
    }
}

fn length(granularity: &str) -> i64 {
    GRANULARITIES
        .iter()
        .find(|(g, _)| *g == granularity)
        .map_or(GRANULARITIES[0].1, |(_, len)| *len)
}

/// The `_id` of a bucket. Tenant and device come from MQTT topic levels and hold no `/`; the
/// start is last, so the id reads back unambiguously whatever the metric.
pub(crate) fn bucket_id(
    tenant: &str,
    device: &str,
    metric: &str,
    granularity: &str,
    start: i64,
) -> String {
    format!("{tenant}/{device}/{metric}/{granularity}/{start}")
}

/// The document of a bucket that changed since it was last published (so `pending`): the one
/// mapping to the collections; [`bucket_from`] reads it back. Field names are those stored
/// since the first release; `publishedRevision` is set on insert only ([`bucket_update`]).
pub(crate) fn bucket_doc(b: &Bucket) -> Document {
    doc! {
        "_id": bucket_id(&b.tenant, &b.device_id, &b.metric, &b.granularity, b.bucket_start),
        "tenant": &b.tenant,
        "deviceId": &b.device_id,
        "metric": &b.metric,
        "granularity": &b.granularity,
        // The TTL field.
        "bucketStart": DateTime::from_millis(b.bucket_start),
        // Due-ness is by the end.
        "bucketEnd": DateTime::from_millis(b.bucket_start + length(&b.granularity)),
        "count": b.count,
        "sum": b.sum,
        "min": b.min,
        "max": b.max,
        "first": b.first,
        "firstAt": DateTime::from_millis(b.first_at),
        "last": b.last,
        "lastAt": DateTime::from_millis(b.last_at),
        "unit": b.unit.as_deref().map_or(Bson::Null, Bson::from),
        "cumulative": b.cumulative,
        "revision": b.revision,
        // `revision > publishedRevision`: what the partial index of due buckets holds.
        "pending": true,
    }
}

/// The bucket a stored document holds.
pub(crate) fn bucket_from(d: &Document) -> Result<Bucket, StoreError> {
    let what = format!("bucket {}", d.get_str("_id").unwrap_or("without _id"));
    let f = Fields::of(d, &what);
    Ok(Bucket {
        tenant: f.str("tenant")?,
        device_id: f.str("deviceId")?,
        metric: f.str("metric")?,
        granularity: f.str("granularity")?,
        bucket_start: f.millis("bucketStart")?,
        count: f.i64("count")?,
        sum: f.f64("sum")?,
        min: f.f64("min")?,
        max: f.f64("max")?,
        first: f.f64("first")?,
        first_at: f.millis("firstAt")?,
        last: f.f64("last")?,
        last_at: f.millis("lastAt")?,
        unit: f.opt_str("unit")?,
        cumulative: f.bool("cumulative")?,
        revision: f.i64("revision")?,
    })
}

/// The statement writing a folded bucket if its stored revision is still `read_revision`
/// (0: none stored, then it is inserted; a bucket stored meanwhile collides on `_id`).
pub(crate) fn bucket_update(b: &Bucket, read_revision: i64) -> Document {
    let mut set = bucket_doc(b);
    set.remove("_id");
    let id = bucket_id(
        &b.tenant,
        &b.device_id,
        &b.metric,
        &b.granularity,
        b.bucket_start,
    );
    doc! {
        "q": { "_id": id, "revision": read_revision },
        "u": { "$set": set, "$setOnInsert": { "publishedRevision": 0i64 } },
        "upsert": true,
    }
}

/// The document recording that a message was folded.
pub(crate) fn rollup_key(m: &MessageRecord) -> Document {
    doc! {
        "_id": key_id(&m.tenant, &m.device_id, m.seq_no),
        "tenant": &m.tenant, "deviceId": &m.device_id, "seqNo": m.seq_no,
        "producedAt": DateTime::from_millis(m.produced_at),
    }
}

/// The statement raising the watermark to `watermark` if higher.
pub(crate) fn watermark_update(watermark: i64) -> Document {
    doc! { "q": { "_id": WATERMARK }, "u": { "$max": { "value": watermark } }, "upsert": true }
}

/// The statement recording a bucket as published at its revision (never lowering what was
/// published; still pending if it changed since it was read).
pub(crate) fn published_update(b: &Bucket) -> Document {
    doc! {
        "q": { "_id": bucket_id(&b.tenant, &b.device_id, &b.metric, &b.granularity, b.bucket_start) },
        "u": [
            { "$set": { "publishedRevision": { "$max": [ "$publishedRevision", b.revision ] } } },
            { "$set": { "pending": { "$gt": [ "$revision", "$publishedRevision" ] } } },
        ],
    }
}

/// The filter of buckets due for publication: changed since published, ended by `cutoff`.
pub(crate) fn due_filter(cutoff: i64) -> Document {
    doc! { "pending": true, "bucketEnd": { "$lte": DateTime::from_millis(cutoff) } }
}

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
        messages: &[MessageRecord],
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(granularity: &str, start: i64) -> Bucket {
        let key = ("acme", "m-1", "energy", granularity, start);
        let b = fold_reading(None, key, 1.0, start + 10, &Some("Wh".into()), true);
        fold_reading(Some(b), key, 3.0, start + 5, &Some("Wh".into()), true)
    }

    #[test]
    fn one_document_per_bucket_with_a_deterministic_id() {
        assert_eq!(
            bucket_id("acme", "m-1", "energy", "hour", 3_600_000),
            "acme/m-1/energy/hour/3600000"
        );
        assert_eq!(rollup_collection("hour"), "rollups_hourly");
        assert_eq!(rollup_collection("day"), "rollups_daily");
        let b = bucket("day", 86_400_000);
        let d = bucket_doc(&b);
        assert_eq!(d.get_str("_id"), Ok("acme/m-1/energy/day/86400000"));
        assert_eq!(
            (d.get_datetime("bucketStart"), d.get_datetime("bucketEnd")),
            (
                Ok(&DateTime::from_millis(86_400_000)),
                Ok(&DateTime::from_millis(2 * 86_400_000))
            ),
            "the TTL field is the start; due-ness is by the end"
        );
        // As stored: with the revision published so far.
        let mut stored = d.clone();
        stored.insert("publishedRevision", 1i64);
        assert_eq!(bucket_from(&stored), Ok(b.clone()));
        stored.insert("count", "two");
        assert!(matches!(bucket_from(&stored), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn a_bucket_is_written_only_over_the_revision_read() {
        let b = bucket("hour", 0);
        assert_eq!((b.count, b.first, b.last, b.revision), (2, 3.0, 1.0, 2));
        let s = bucket_update(&b, 0);
        assert_eq!(
            s.get_document("q").expect("q"),
            &doc! { "_id": "acme/m-1/energy/hour/0", "revision": 0i64 }
        );
        assert!(s.get_bool("upsert").expect("upsert"));
        let u = s.get_document("u").expect("u");
        let set = u.get_document("$set").expect("$set");
        assert_eq!(set.get_i64("revision").expect("revision"), 2);
        assert!(set.get_bool("pending").expect("pending"), "due again");
        assert_eq!(set.get_f64("sum").expect("sum"), 4.0);
        assert!(!set.contains_key("publishedRevision") && !set.contains_key("_id"));
        assert_eq!(
            u.get_document("$setOnInsert").expect("insert"),
            &doc! { "publishedRevision": 0i64 }
        );
        // The statement in full, as sent since the first release: stored buckets stay readable.
        let day = Bucket {
            unit: None,
            ..bucket("day", 86_400_000)
        };
        let at = DateTime::from_millis;
        assert_eq!(
            bucket_update(&day, 3),
            doc! {
                "q": { "_id": "acme/m-1/energy/day/86400000", "revision": 3i64 },
                "u": {
                    "$set": {
                        "tenant": "acme", "deviceId": "m-1", "metric": "energy", "granularity": "day",
                        "bucketStart": at(86_400_000), "bucketEnd": at(2 * 86_400_000),
                        "count": 2i64, "sum": 4.0, "min": 1.0, "max": 3.0,
                        "first": 3.0, "firstAt": at(86_400_005), "last": 1.0, "lastAt": at(86_400_010),
                        "unit": null, "cumulative": true, "revision": 2i64, "pending": true,
                    },
                    "$setOnInsert": { "publishedRevision": 0i64 },
                },
                "upsert": true,
            }
        );
    }

    #[test]
    fn keys_watermark_and_publication_statements() {
        let m = MessageRecord {
            tenant: "acme".into(),
            device_id: "m-1".into(),
            seq_no: 9,
            msg_id: "x".into(),
            produced_at: 1_700_000_000_000,
            received_at: 1_700_000_000_001,
            site: None,
            asset: None,
            profile: "meter".into(),
            readings: Vec::new(),
        };
        assert_eq!(
            rollup_key(&m),
            doc! {
                "_id": "acme/m-1/9", "tenant": "acme", "deviceId": "m-1", "seqNo": 9i64,
                "producedAt": DateTime::from_millis(1_700_000_000_000),
            }
        );
        assert_eq!(
            watermark_update(42),
            doc! { "q": { "_id": "watermark" }, "u": { "$max": { "value": 42i64 } }, "upsert": true }
        );
        let p = published_update(&bucket("hour", 0));
        assert_eq!(
            p.get_array("u").expect("pipeline")[0],
            Bson::from(
                doc! { "$set": { "publishedRevision": { "$max": [ "$publishedRevision", 2i64 ] } } }
            ),
            "published revision never goes down"
        );
        assert!(
            !p.contains_key("upsert"),
            "an expired bucket is not revived"
        );
        assert_eq!(
            due_filter(7_200_000),
            doc! { "pending": true, "bucketEnd": { "$lte": DateTime::from_millis(7_200_000) } }
        );
    }
}
