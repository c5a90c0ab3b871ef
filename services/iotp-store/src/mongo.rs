//! The MongoDB backend (production), official driver. Collections:
//!
//! | collection | kind | retention |
//! | --- | --- | --- |
//! | `readings` | time series (timeField `t`, metaField `meta` = tenant/deviceId/metric, granularity `minutes`) | `expireAfterSeconds` = raw tier |
//! | `message_keys` | `_id` = `tenant/deviceId/seqNo`: the uniqueness time series lack | TTL on `expireAt` (raw tier) |
//! | `twins` | `_id` = `tenant/deviceId`, optimistic concurrency on `version` ([`twins`]) | none |
//! | `rollups_hourly`, `rollups_daily` | one document per bucket ([`rollups`]) | TTL on `bucketStart`: `retention.hourly`, `retention.daily` |
//! | `rollup_keys` | `_id` = `tenant/deviceId/seqNo`: messages folded into roll-ups | TTL on `producedAt` (raw tier) |
//! | `rollup_state` | the watermark | none |
//! | `dead_letters` | `_id` = dead-letter id ([`archive`]) | TTL on `expiresAt` (`expireAfterSeconds: 0`: each letter's own expiry) |
//!
//! Time-series collections cannot enforce a unique key, so exactly-once goes through
//! `message_keys` (see [`MongoStore::write_messages`]). Writes use write concern
//! `majority` with journaling, unordered batches of at most `batch_size` documents.
//! Roll-ups are folded in multi-document transactions, which need a replica set or a sharded
//! cluster (see [`rollups`]).
//!
//! [`MongoStore::connect`] creates every collection and index if missing and applies the
//! given [`Retention`] to the existing ones (`collMod`), so every service that opens the store
//! must be given the same retention.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::error::ErrorKind;
use mongodb::options::{CollectionOptions, WriteConcern};
use mongodb::{Client, Collection, Database};

use crate::{
    MessageRecord, PruneReport, Pruning, ReadingStore, Retention, StoreError, StoredMessage,
    WriteReport,
};

/// Collection names.
pub const READINGS: &str = "readings";
/// Collection of dedup keys.
pub const MESSAGE_KEYS: &str = "message_keys";
/// Collection of twins.
pub const TWINS: &str = "twins";
/// Collection of hourly roll-ups.
pub const ROLLUPS_HOURLY: &str = "rollups_hourly";
/// Collection of daily roll-ups.
pub const ROLLUPS_DAILY: &str = "rollups_daily";
/// Collection of the keys of messages folded into roll-ups.
pub const ROLLUP_KEYS: &str = "rollup_keys";
/// Collection of the roll-up watermark.
pub const ROLLUP_STATE: &str = "rollup_state";
/// Collection of archived dead letters.
pub const DEAD_LETTERS: &str = "dead_letters";

mod archive;
mod command;
mod rollups;
mod twins;

pub use archive::{archive_update, letter_filter, LetterDoc};
pub use command::{update_command, write_reply, WriteReply};
pub use rollups::{bucket_id, bucket_update, published_update, rollup_key, BucketDoc};
pub use twins::{offline_filter, twin_update, TwinDoc};

/// How long a writer may hold a pending key before another may take it over.
const LEASE: Duration = Duration::from_secs(60);
/// MongoDB's duplicate-key error.
const DUPLICATE_KEY: i32 = 11000;
/// MongoDB's error for creating a collection that exists.
const NAMESPACE_EXISTS: i32 = 48;
/// MongoDB's error for an index that does not exist.
const INDEX_NOT_FOUND: i32 = 27;

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// `create` for the raw-tier time-series collection.
pub fn create_readings(retention: &Retention) -> Document {
    doc! {
        "create": READINGS,
        "timeseries": { "timeField": "t", "metaField": "meta", "granularity": "minutes" },
        "expireAfterSeconds": retention.raw.as_secs() as i64,
    }
}

/// `collMod` that applies a changed raw tier to an existing time-series collection.
pub fn retune_readings(retention: &Retention) -> Document {
    doc! { "collMod": READINGS, "expireAfterSeconds": retention.raw.as_secs() as i64 }
}

/// `createIndexes` for the dedup keys: TTL on `expireAt` (documents carry their own expiry)
/// and the per-device lookup the gap count uses.
pub fn key_indexes() -> Document {
    doc! {
        "createIndexes": MESSAGE_KEYS,
        "indexes": [
            { "key": { "expireAt": 1 }, "name": "expire", "expireAfterSeconds": 0 },
            { "key": { "tenant": 1, "deviceId": 1, "seqNo": 1 }, "name": "device_seq" },
        ],
    }
}

/// `createIndexes` on the readings' meta and time, for device queries and the repair lookup.
pub fn reading_indexes() -> Document {
    doc! {
        "createIndexes": READINGS,
        "indexes": [ { "key": { "meta.tenant": 1, "meta.deviceId": 1, "t": 1 }, "name": "device_time" } ],
    }
}

/// A TTL index named `expire` on `field`.
pub fn ttl_index(field: &str, seconds: i64) -> Document {
    doc! { "key": { field: 1 }, "name": "expire", "expireAfterSeconds": seconds }
}

/// `collMod` that applies a changed TTL to the existing `expire` index of `collection`.
pub fn retune_ttl(collection: &str, seconds: i64) -> Document {
    doc! { "collMod": collection, "index": { "name": "expire", "expireAfterSeconds": seconds } }
}

/// Every collection created through `createIndexes`: its name, the command, and the TTL of
/// its `expire` index when that follows a retention tier (retuned with [`retune_ttl`]).
pub fn indexed_collections(retention: &Retention) -> Vec<(&'static str, Document, Option<i64>)> {
    let ttl = ttl_seconds(retention);
    let rollups = |collection: &'static str| {
        doc! {
            "createIndexes": collection,
            "indexes": [
                ttl_index("bucketStart", ttl[collection]),
                { "key": { "bucketEnd": 1 }, "name": "due", "partialFilterExpression": { "pending": true } },
                { "key": { "tenant": 1, "deviceId": 1, "metric": 1, "bucketStart": 1 }, "name": "device_metric_start" },
            ],
        }
    };
    vec![
        (
            TWINS,
            doc! {
                "createIndexes": TWINS,
                "indexes": [ { "key": { "online": 1, "lastSeenAt": 1 }, "name": "online_seen" } ],
            },
            None,
        ),
        (
            ROLLUPS_HOURLY,
            rollups(ROLLUPS_HOURLY),
            Some(ttl[ROLLUPS_HOURLY]),
        ),
        (
            ROLLUPS_DAILY,
            rollups(ROLLUPS_DAILY),
            Some(ttl[ROLLUPS_DAILY]),
        ),
        (
            ROLLUP_KEYS,
            doc! { "createIndexes": ROLLUP_KEYS, "indexes": [ ttl_index("producedAt", ttl[ROLLUP_KEYS]) ] },
            Some(ttl[ROLLUP_KEYS]),
        ),
        (
            DEAD_LETTERS,
            doc! {
                "createIndexes": DEAD_LETTERS,
                "indexes": [
                    ttl_index("expiresAt", 0),
                    { "key": { "parkedAt": 1, "_id": 1 }, "name": "parked" },
                    { "key": { "reason": 1, "parkedAt": 1 }, "name": "reason_parked" },
                    { "key": { "tenant": 1, "deviceId": 1, "parkedAt": 1 }, "name": "device_parked" },
                ],
            },
            None,
        ),
    ]
}

fn key_id(tenant: &str, device: &str, seq_no: i64) -> String {
    format!("{tenant}/{device}/{seq_no}")
}

/// The time-series documents of one message: one per reading.
pub fn reading_docs(m: &MessageRecord) -> Vec<Document> {
    m.readings
        .iter()
        .map(|(metric, value, unit)| {
            doc! {
                "t": DateTime::from_millis(m.produced_at),
                "meta": { "tenant": &m.tenant, "deviceId": &m.device_id, "metric": metric },
                "seqNo": m.seq_no,
                "msgId": &m.msg_id,
                "value": *value,
                "unit": unit.as_deref().map(Bson::from).unwrap_or(Bson::Null),
                "receivedAt": DateTime::from_millis(m.received_at),
                "site": m.site.as_deref().map(Bson::from).unwrap_or(Bson::Null),
                "asset": m.asset.as_deref().map(Bson::from).unwrap_or(Bson::Null),
                "profile": &m.profile,
            }
        })
        .collect()
}

/// A MongoDB store.
#[derive(Clone)]
pub struct MongoStore {
    db: Database,
    retention: Retention,
    owner: String,
    batch_size: usize,
}

impl MongoStore {
    /// Connect, and create or retune collections and indexes (idempotent).
    pub async fn connect(
        uri: &str,
        database: &str,
        retention: Retention,
    ) -> Result<Self, StoreError> {
        let client = Client::with_uri_str(uri).await.map_err(backend)?;
        let store = Self {
            db: client.database(database),
            retention,
            owner: format!("{}-{}", std::process::id(), iotp_core::now_millis()),
            batch_size: 1000,
        };
        store.ensure_schema().await?;
        Ok(store)
    }

    async fn ensure_schema(&self) -> Result<(), StoreError> {
        let existing: HashSet<String> = self
            .db
            .list_collection_names()
            .await
            .map_err(backend)?
            .into_iter()
            .collect();
        // Services start together: another may create a collection between the listing and
        // the `create`; then it exists, which is all that was wanted.
        let created = if existing.contains(READINGS) {
            false
        } else {
            self.create(create_readings(&self.retention)).await?
        };
        if !created {
            self.db
                .run_command(retune_readings(&self.retention))
                .await
                .map_err(backend)?;
        }
        self.db.run_command(key_indexes()).await.map_err(backend)?;
        self.db
            .run_command(reading_indexes())
            .await
            .map_err(backend)?;
        // Transactions write to it: it must exist beforehand.
        if !existing.contains(ROLLUP_STATE) {
            self.create(doc! { "create": ROLLUP_STATE }).await?;
        }
        for (collection, indexes, ttl) in indexed_collections(&self.retention) {
            if let (Some(seconds), true) = (ttl, existing.contains(collection)) {
                match self.db.run_command(retune_ttl(collection, seconds)).await {
                    // Not there yet: `createIndexes` makes it with the right TTL.
                    Err(e) if command::error_code(&e) != Some(INDEX_NOT_FOUND) => {
                        return Err(backend(e))
                    }
                    _ => {}
                }
            }
            self.db.run_command(indexes).await.map_err(backend)?;
        }
        let hello = self.db.run_command(doc! { "hello": 1 }).await;
        if hello.is_ok_and(|h| !rollups::supports_transactions(&h)) {
            tracing::warn!(
                "MongoDB is a standalone server: the raw tier, twins and the archive work, \
                 roll-ups need transactions (a replica set or sharded cluster; a single server \
                 can be started with --replSet and rs.initiate())"
            );
        }
        Ok(())
    }

    /// Run a `create`; false if the collection existed already.
    async fn create(&self, command: Document) -> Result<bool, StoreError> {
        match self.db.run_command(command).await {
            Ok(_) => Ok(true),
            Err(e) if command::error_code(&e) == Some(NAMESPACE_EXISTS) => Ok(false),
            Err(e) => Err(backend(e)),
        }
    }

    fn collection(&self, name: &str) -> Collection<Document> {
        let mut concern = WriteConcern::majority();
        concern.journal = Some(true);
        let options = CollectionOptions::builder().write_concern(concern).build();
        self.db.collection_with_options(name, options)
    }

    /// Insert unordered; return the indexes of documents rejected as duplicate keys. Any
    /// other error fails the call.
    async fn insert_tolerating_duplicates(
        &self,
        coll: &Collection<Document>,
        docs: &[Document],
    ) -> Result<HashSet<usize>, StoreError> {
        let mut duplicates = HashSet::new();
        for (chunk_no, chunk) in docs.chunks(self.batch_size).enumerate() {
            match coll.insert_many(chunk).ordered(false).await {
                Ok(_) => {}
                Err(e) => match *e.kind {
                    ErrorKind::InsertMany(ref failure) if failure.write_concern_error.is_none() => {
                        for w in failure.write_errors.iter().flatten() {
                            if w.code != DUPLICATE_KEY {
                                return Err(backend(format!(
                                    "insert failed: {} ({})",
                                    w.message, w.code
                                )));
                            }
                            duplicates.insert(chunk_no * self.batch_size + w.index);
                        }
                    }
                    _ => return Err(backend(e)),
                },
            }
        }
        Ok(duplicates)
    }
}

impl ReadingStore for MongoStore {
    /// Exactly once on a time-series collection:
    /// 1. insert a `pending` key per message into `message_keys` (unique `_id`); a duplicate
    ///    key means the message was seen before;
    /// 2. a seen key that is `done` is a duplicate; one that is `pending` under an expired
    ///    lease (a writer died between steps) is claimed atomically and repaired: the readings
    ///    it already has in `readings` are looked up and only the missing ones are inserted;
    ///    one pending under another writer's live lease fails the batch (retried later);
    /// 3. insert the readings of new and claimed messages;
    /// 4. mark their keys `done`.
    ///
    /// A kill between 1 and 3 leaves pending keys without readings; between 3 and 4, pending
    /// keys with (some) readings: the redelivered batch claims them after the lease and fills
    /// in exactly what is missing. Nothing is acknowledged upstream before 4.
    async fn write_messages(&self, messages: &[MessageRecord]) -> Result<WriteReport, StoreError> {
        let mut report = WriteReport::default();
        // A key twice in one batch: keep the first, count the rest as duplicates (otherwise
        // the second would look like a pending key of this writer and be "repaired").
        let mut in_batch = HashSet::new();
        let messages: Vec<&MessageRecord> = messages
            .iter()
            .filter(|m| {
                let first = in_batch.insert(key_id(&m.tenant, &m.device_id, m.seq_no));
                if !first {
                    report.duplicates += 1;
                }
                first
            })
            .collect();
        if messages.is_empty() {
            return Ok(report);
        }
        let keys = self.collection(MESSAGE_KEYS);
        let readings = self.collection(READINGS);
        let now = iotp_core::now_millis();
        let lease_until = DateTime::from_millis(now + LEASE.as_millis() as i64);
        let key_docs: Vec<Document> = messages
            .iter()
            .map(|m| {
                doc! {
                    "_id": key_id(&m.tenant, &m.device_id, m.seq_no),
                    "tenant": &m.tenant, "deviceId": &m.device_id, "seqNo": m.seq_no,
                    "msgId": &m.msg_id, "producedAt": DateTime::from_millis(m.produced_at),
                    "state": "pending", "owner": &self.owner, "leaseUntil": lease_until,
                    "expireAt": DateTime::from_millis(m.produced_at + self.retention.raw.as_millis() as i64),
                }
            })
            .collect();
        let seen = self.insert_tolerating_duplicates(&keys, &key_docs).await?;
        let mut to_write: Vec<&MessageRecord> = Vec::new();
        let mut to_repair: Vec<&MessageRecord> = Vec::new();
        for (i, &m) in messages.iter().enumerate() {
            if !seen.contains(&i) {
                to_write.push(m);
                continue;
            }
            let id = key_id(&m.tenant, &m.device_id, m.seq_no);
            let claimed = keys
                .update_one(
                    doc! { "_id": &id, "state": "pending", "$or": [ { "leaseUntil": { "$lt": DateTime::from_millis(now) } }, { "owner": &self.owner } ] },
                    doc! { "$set": { "owner": &self.owner, "leaseUntil": lease_until } },
                )
                .await
                .map_err(backend)?;
            if claimed.modified_count == 1 {
                to_repair.push(m);
                continue;
            }
            let state = keys.find_one(doc! { "_id": &id }).await.map_err(backend)?;
            match state.as_ref().and_then(|d| d.get_str("state").ok()) {
                Some("done") | None => report.duplicates += 1,
                Some(_) => {
                    return Err(backend(format!(
                        "message {id} is being written by another writer; retry later"
                    )))
                }
            }
        }
        // Repair: insert only readings not already there.
        let mut docs: Vec<Document> = to_write.iter().flat_map(|m| reading_docs(m)).collect();
        for m in &to_repair {
            let present: HashSet<String> = readings
                .find(doc! { "meta.tenant": &m.tenant, "meta.deviceId": &m.device_id, "seqNo": m.seq_no, "t": DateTime::from_millis(m.produced_at) })
                .await
                .map_err(backend)?
                .try_collect::<Vec<Document>>()
                .await
                .map_err(backend)?
                .iter()
                .filter_map(|d| d.get_document("meta").ok().and_then(|meta| meta.get_str("metric").ok()).map(String::from))
                .collect();
            docs.extend(reading_docs(m).into_iter().filter(|d| {
                let metric = d
                    .get_document("meta")
                    .ok()
                    .and_then(|meta| meta.get_str("metric").ok())
                    .unwrap_or_default();
                !present.contains(metric)
            }));
        }
        for chunk in docs.chunks(self.batch_size) {
            readings
                .insert_many(chunk)
                .ordered(false)
                .await
                .map_err(backend)?;
        }
        let done: Vec<String> = to_write
            .iter()
            .chain(&to_repair)
            .map(|m| key_id(&m.tenant, &m.device_id, m.seq_no))
            .collect();
        for chunk in done.chunks(self.batch_size) {
            keys.update_many(
                doc! { "_id": { "$in": chunk } },
                doc! { "$set": { "state": "done", "storedAt": DateTime::now() }, "$unset": { "leaseUntil": "" } },
            )
            .await
            .map_err(backend)?;
        }
        report.stored = done.len() as u64;
        Ok(report)
    }

    async fn message_count(&self, tenant: Option<&str>) -> Result<u64, StoreError> {
        let filter = match tenant {
            Some(t) => doc! { "state": "done", "tenant": t },
            None => doc! { "state": "done" },
        };
        self.collection(MESSAGE_KEYS)
            .count_documents(filter)
            .await
            .map_err(backend)
    }

    async fn reading_count(&self, tenant: Option<&str>) -> Result<u64, StoreError> {
        let filter = match tenant {
            Some(t) => doc! { "meta.tenant": t },
            None => doc! {},
        };
        self.collection(READINGS)
            .count_documents(filter)
            .await
            .map_err(backend)
    }

    /// Pages `message_keys` (index `device_seq`), then counts each page's readings.
    async fn stored_messages(
        &self,
        tenant: &str,
        after: Option<(String, i64)>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let keys: Vec<Document> = self
            .collection(MESSAGE_KEYS)
            .find(stored_page_filter(tenant, after.as_ref()))
            .sort(doc! { "tenant": 1, "deviceId": 1, "seqNo": 1 })
            .limit(limit as i64)
            .await
            .map_err(backend)?
            .try_collect()
            .await
            .map_err(backend)?;
        let mut out: Vec<StoredMessage> = keys
            .iter()
            .map(|k| StoredMessage {
                device_id: k.get_str("deviceId").unwrap_or_default().to_string(),
                seq_no: k.get_i64("seqNo").unwrap_or_default(),
                msg_id: k.get_str("msgId").unwrap_or_default().to_string(),
                produced_at: k
                    .get_datetime("producedAt")
                    .map(|d| d.timestamp_millis())
                    .unwrap_or_default(),
                stored_at: k
                    .get_datetime("storedAt")
                    .map(|d| d.timestamp_millis())
                    .unwrap_or_default(),
                readings: 0,
            })
            .collect();
        let (Some(first), Some(last)) = (out.first(), out.last()) else {
            return Ok(out);
        };
        let pipeline = vec![
            doc! { "$match": {
                "meta.tenant": tenant,
                "meta.deviceId": { "$gte": &first.device_id, "$lte": &last.device_id },
            } },
            doc! { "$group": { "_id": { "d": "$meta.deviceId", "s": "$seqNo" }, "n": { "$sum": 1 } } },
        ];
        let counts: HashMap<(String, i64), i64> = self
            .collection(READINGS)
            .aggregate(pipeline)
            .await
            .map_err(backend)?
            .try_collect::<Vec<Document>>()
            .await
            .map_err(backend)?
            .iter()
            .filter_map(|d| {
                let id = d.get_document("_id").ok()?;
                let n = d.get_i32("n").map(i64::from).ok()?;
                Some((
                    (id.get_str("d").ok()?.to_string(), id.get_i64("s").ok()?),
                    n,
                ))
            })
            .collect();
        for m in &mut out {
            m.readings = counts
                .get(&(m.device_id.clone(), m.seq_no))
                .copied()
                .unwrap_or(0);
        }
        Ok(out)
    }

    async fn update_seq_gaps(&self, devices: &[(String, String)]) -> Result<u64, StoreError> {
        let keys = self.collection(MESSAGE_KEYS);
        let twins = self.collection(TWINS);
        let mut total = 0u64;
        for (tenant, device) in devices {
            let pipeline = vec![
                doc! { "$match": { "tenant": tenant, "deviceId": device, "state": "done" } },
                doc! { "$group": { "_id": Bson::Null, "min": { "$min": "$seqNo" }, "max": { "$max": "$seqNo" }, "n": { "$sum": 1 } } },
            ];
            let stats: Vec<Document> = keys
                .aggregate(pipeline)
                .await
                .map_err(backend)?
                .try_collect()
                .await
                .map_err(backend)?;
            let gaps = stats
                .first()
                .map(|s| {
                    s.get_i64("max").unwrap_or(0) - s.get_i64("min").unwrap_or(0) + 1
                        - i64::from(s.get_i32("n").unwrap_or(0))
                })
                .unwrap_or(0)
                .max(0);
            twins
                .update_one(
                    doc! { "_id": format!("{tenant}/{device}") },
                    doc! { "$set": { "seqGaps": gaps } },
                )
                .await
                .map_err(backend)?;
            total += gaps as u64;
        }
        Ok(total)
    }
}

impl Pruning for MongoStore {
    /// Nothing to do: TTL indexes and `expireAfterSeconds` expire data server-side.
    async fn prune(&self, _now_ms: i64, _retention: &Retention) -> Result<PruneReport, StoreError> {
        Ok(PruneReport::default())
    }
}

/// The `find` filter for one page of a tenant's stored messages, after `(deviceId, seqNo)`.
pub fn stored_page_filter(tenant: &str, after: Option<&(String, i64)>) -> Document {
    match after {
        None => doc! { "tenant": tenant, "state": "done" },
        Some((device, seq_no)) => doc! {
            "tenant": tenant, "state": "done",
            "$or": [ { "deviceId": { "$gt": device } }, { "deviceId": device, "seqNo": { "$gt": seq_no } } ],
        },
    }
}

/// Map of collection → its TTL in seconds, as [`MongoStore`] sets them (for documentation and
/// checks). Archived dead letters are not in it: each expires at its own `expiresAt`, set by
/// the DLQ handler's `archive_ttl`.
pub fn ttl_seconds(retention: &Retention) -> HashMap<&'static str, i64> {
    let secs = |d: Duration| d.as_secs() as i64;
    HashMap::from([
        (READINGS, secs(retention.raw)),
        (MESSAGE_KEYS, secs(retention.raw)),
        (ROLLUP_KEYS, secs(retention.raw)),
        (ROLLUPS_HOURLY, secs(retention.hourly)),
        (ROLLUPS_DAILY, secs(retention.daily)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retention() -> Retention {
        Retention {
            raw: Duration::from_secs(180 * 86_400),
            ..Retention::default()
        }
    }

    #[test]
    fn each_tier_has_its_ttl_index_and_a_changed_tier_is_retuned() {
        let r = Retention {
            raw: Duration::from_secs(100),
            hourly: Duration::from_secs(200),
            daily: Duration::from_secs(300),
        };
        let schema = indexed_collections(&r);
        let expire = |command: &Document| -> Document {
            command
                .get_array("indexes")
                .expect("indexes")
                .iter()
                .filter_map(|i| i.as_document())
                .find(|i| i.get_str("name") == Ok("expire"))
                .expect("expire index")
                .clone()
        };
        let mut ttl_fields = Vec::new();
        for (collection, command, ttl) in &schema {
            assert_eq!(command.get_str("createIndexes").expect("name"), *collection);
            if let Some(seconds) = ttl {
                let index = expire(command);
                assert_eq!(index.get_i64("expireAfterSeconds").expect("ttl"), *seconds);
                assert_eq!(*seconds, ttl_seconds(&r)[collection]);
                ttl_fields.push((*collection, index.get_document("key").expect("key").clone()));
            }
        }
        assert_eq!(
            ttl_fields,
            vec![
                (ROLLUPS_HOURLY, doc! { "bucketStart": 1 }),
                (ROLLUPS_DAILY, doc! { "bucketStart": 1 }),
                (ROLLUP_KEYS, doc! { "producedAt": 1 }),
            ]
        );
        assert_eq!(
            (
                ttl_seconds(&r)[ROLLUPS_HOURLY],
                ttl_seconds(&r)[ROLLUPS_DAILY]
            ),
            (200, 300)
        );
        assert_eq!(
            retune_ttl(ROLLUPS_DAILY, 300),
            doc! { "collMod": "rollups_daily", "index": { "name": "expire", "expireAfterSeconds": 300i64 } }
        );
        // Dead letters: each expires at its own date.
        let (_, letters, ttl) = schema
            .iter()
            .find(|(c, _, _)| *c == DEAD_LETTERS)
            .expect("dead letters");
        assert_eq!(*ttl, None);
        assert_eq!(
            expire(letters),
            doc! { "key": { "expiresAt": 1 }, "name": "expire", "expireAfterSeconds": 0i64 }
        );
        // Due buckets are found through a partial index.
        let (_, hourly, _) = &schema[1];
        let due = hourly.get_array("indexes").expect("indexes")[1]
            .as_document()
            .expect("index");
        assert_eq!(
            due.get_document("partialFilterExpression")
                .expect("partial"),
            &doc! { "pending": true }
        );
    }

    #[test]
    fn readings_are_a_time_series_with_the_raw_tier_as_ttl() {
        let create = create_readings(&retention());
        assert_eq!(create.get_str("create").expect("create"), "readings");
        let ts = create.get_document("timeseries").expect("timeseries");
        assert_eq!(ts.get_str("timeField").expect("time"), "t");
        assert_eq!(ts.get_str("metaField").expect("meta"), "meta");
        assert_eq!(ts.get_str("granularity").expect("granularity"), "minutes");
        assert_eq!(
            create.get_i64("expireAfterSeconds").expect("ttl"),
            180 * 86_400
        );
        let retune = retune_readings(&Retention {
            raw: Duration::from_secs(90 * 86_400),
            ..retention()
        });
        assert_eq!(
            retune,
            doc! { "collMod": "readings", "expireAfterSeconds": 90i64 * 86_400 }
        );
    }

    #[test]
    fn keys_expire_with_the_raw_tier_and_are_unique_by_id() {
        let indexes = key_indexes();
        let list = indexes.get_array("indexes").expect("indexes");
        let ttl = list[0].as_document().expect("doc");
        assert_eq!(
            ttl.get_i32("expireAfterSeconds").expect("ttl"),
            0,
            "each key carries its own expireAt"
        );
        assert_eq!(key_id("acme", "m-1", 42), "acme/m-1/42");
        assert_eq!(ttl_seconds(&retention())[MESSAGE_KEYS], 180 * 86_400);
    }

    #[test]
    fn one_time_series_document_per_reading() {
        let m = MessageRecord {
            tenant: "acme".into(),
            device_id: "m-1".into(),
            seq_no: 7,
            msg_id: "x".into(),
            produced_at: 1_700_000_000_000,
            received_at: 1_700_000_000_100,
            site: Some("plant".into()),
            asset: None,
            profile: "meter".into(),
            readings: vec![
                ("energy".into(), 1.5, Some("Wh".into())),
                ("power".into(), 2.0, None),
            ],
        };
        let docs = reading_docs(&m);
        assert_eq!(docs.len(), 2);
        assert_eq!(
            docs[0].get_datetime("t").expect("t").timestamp_millis(),
            1_700_000_000_000
        );
        assert_eq!(
            docs[0].get_document("meta").expect("meta"),
            &doc! { "tenant": "acme", "deviceId": "m-1", "metric": "energy" }
        );
        assert_eq!(docs[1].get("unit"), Some(&Bson::Null));
        assert_eq!(docs[0].get_i64("seqNo").expect("seq"), 7);
    }

    #[test]
    fn audit_pages_continue_after_the_last_key() {
        assert_eq!(
            stored_page_filter("acme", None),
            doc! { "tenant": "acme", "state": "done" }
        );
        let next = stored_page_filter("acme", Some(&("m-1".to_string(), 9)));
        let or = next.get_array("$or").expect("or");
        assert_eq!(or[0], Bson::from(doc! { "deviceId": { "$gt": "m-1" } }));
        assert_eq!(
            or[1],
            Bson::from(doc! { "deviceId": "m-1", "seqNo": { "$gt": 9i64 } })
        );
    }
}
