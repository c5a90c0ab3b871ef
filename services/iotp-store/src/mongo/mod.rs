//! The MongoDB backend (production), official driver. Collections:
//!
//! | collection | kind | retention |
//! | --- | --- | --- |
//! | `readings` | time series (timeField `t`, metaField `meta` = tenant/deviceId/metric, granularity `minutes`) | `expireAfterSeconds` = raw tier |
//! | `message_keys` | `_id` = `tenant/deviceId/seqNo`: the uniqueness time series lack | TTL on `expireAt` (raw tier) |
//! | `twins` | `_id` = `tenant/deviceId`, optimistic concurrency on `version` (`twins.rs`) | none |
//! | `rollups_hourly`, `rollups_daily` | one document per bucket (`rollups.rs`) | TTL on `bucketStart`: `retention.hourly`, `retention.daily` |
//! | `rollup_keys` | `_id` = `tenant/deviceId/seqNo`: messages folded into roll-ups | TTL on `producedAt` (raw tier) |
//! | `rollup_state` | the watermark | none |
//! | `dead_letters` | `_id` = dead-letter id (`archive.rs`) | TTL on `expiresAt` (`expireAfterSeconds: 0`: each letter's own expiry) |
//!
//! Time-series collections cannot enforce a unique key, so exactly-once goes through
//! `message_keys` (see `readings.rs`). Writes use write concern
//! `majority` with journaling, unordered batches of at most `batch_size` documents.
//! Roll-ups are folded in multi-document transactions, which need a replica set or a sharded
//! cluster (see `rollups.rs`).
//!
//! `MongoStore::connect` (here) creates every collection and index if missing and applies the
//! given [`Retention`] to the existing ones (`collMod`), so every service that opens the store
//! must be given the same retention. The contract is implemented per concern in `twins.rs`,
//! `readings.rs`, `rollups.rs` (with its documents in `buckets.rs`) and `archive.rs`;
//! `transaction.rs` runs multi-document transactions, `command.rs` builds batched write commands
//! and classifies every error, `fields.rs` reads stored documents.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use mongodb::bson::{doc, Document};
use mongodb::options::{CollectionOptions, WriteConcern};
use mongodb::{Client, Collection, Database};

use crate::{PruneReport, Pruning, Retention, StoreError};

use command::mongo_error;

mod archive;
mod buckets;
mod command;
mod fields;
mod options;
mod readings;
mod rollups;
mod transaction;
mod twins;

pub(crate) use options::client_options;
pub use readings::reading_docs;

/// Collection of raw readings (time series).
pub(crate) const READINGS: &str = "readings";
/// Collection of dedup keys.
pub(crate) const MESSAGE_KEYS: &str = "message_keys";
/// Collection of twins.
pub(crate) const TWINS: &str = "twins";
/// Collection of hourly roll-ups.
pub(crate) const ROLLUPS_HOURLY: &str = "rollups_hourly";
/// Collection of daily roll-ups.
pub(crate) const ROLLUPS_DAILY: &str = "rollups_daily";
/// Collection of the keys of messages folded into roll-ups.
pub(crate) const ROLLUP_KEYS: &str = "rollup_keys";
/// Collection of the roll-up watermark.
pub(crate) const ROLLUP_STATE: &str = "rollup_state";
/// Collection of archived dead letters.
pub(crate) const DEAD_LETTERS: &str = "dead_letters";

/// MongoDB's error for creating a collection that exists.
const NAMESPACE_EXISTS: i32 = 48;
/// MongoDB's error for an index that does not exist.
const INDEX_NOT_FOUND: i32 = 27;

/// `create` for the raw-tier time-series collection.
fn create_readings(retention: &Retention) -> Document {
    doc! {
        "create": READINGS,
        "timeseries": { "timeField": "t", "metaField": "meta", "granularity": "minutes" },
        "expireAfterSeconds": retention.raw.as_secs() as i64,
    }
}

/// `collMod` that applies a changed raw tier to an existing time-series collection.
fn retune_readings(retention: &Retention) -> Document {
    doc! { "collMod": READINGS, "expireAfterSeconds": retention.raw.as_secs() as i64 }
}

/// `createIndexes` for the dedup keys: TTL on `expireAt` (documents carry their own expiry)
/// and the per-device lookup the gap count uses.
fn key_indexes() -> Document {
    doc! {
        "createIndexes": MESSAGE_KEYS,
        "indexes": [
            { "key": { "expireAt": 1 }, "name": "expire", "expireAfterSeconds": 0 },
            { "key": { "tenant": 1, "deviceId": 1, "seqNo": 1 }, "name": "device_seq" },
        ],
    }
}

/// `createIndexes` on the readings' meta and time, for device queries and the repair lookup.
fn reading_indexes() -> Document {
    doc! {
        "createIndexes": READINGS,
        "indexes": [ { "key": { "meta.tenant": 1, "meta.deviceId": 1, "t": 1 }, "name": "device_time" } ],
    }
}

/// A TTL index named `expire` on `field`.
fn ttl_index(field: &str, seconds: i64) -> Document {
    doc! { "key": { field: 1 }, "name": "expire", "expireAfterSeconds": seconds }
}

/// `collMod` that applies a changed TTL to the existing `expire` index of `collection`.
fn retune_ttl(collection: &str, seconds: i64) -> Document {
    doc! { "collMod": collection, "index": { "name": "expire", "expireAfterSeconds": seconds } }
}

/// Every collection created through `createIndexes`: its name, the command, and the TTL of
/// its `expire` index when that follows a retention tier (retuned with [`retune_ttl`]).
fn indexed_collections(retention: &Retention) -> Vec<(&'static str, Document, Option<i64>)> {
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

/// The `_id` of a message's key in `message_keys` and `rollup_keys`.
fn key_id(tenant: &str, device: &str, seq_no: i64) -> String {
    format!("{tenant}/{device}/{seq_no}")
}

/// The MongoDB backend of the store: a connected database whose collections and indexes
/// exist. Cheap to clone (the driver's client is shared).
#[derive(Clone)]
pub struct MongoStore {
    db: Database,
    /// The tiers the TTLs were set from; message keys expire with the raw tier.
    retention: Retention,
    /// This store's name on the message keys it leases (`pid-startMillis`): a call made again
    /// takes its own pending keys back at once.
    owner: String,
    /// Statements or documents per command.
    batch_size: usize,
}

impl MongoStore {
    /// Connect, and create or retune collections and indexes (idempotent).
    pub(crate) async fn connect(
        options: mongodb::options::ClientOptions,
        database: &str,
        retention: Retention,
    ) -> Result<Self, StoreError> {
        let client = Client::with_options(options).map_err(mongo_error)?;
        let store = Self {
            db: client.database(database),
            retention,
            owner: format!("{}-{}", std::process::id(), iotp_contract::now_millis()),
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
            .map_err(mongo_error)?
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
                .map_err(mongo_error)?;
        }
        self.db
            .run_command(key_indexes())
            .await
            .map_err(mongo_error)?;
        self.db
            .run_command(reading_indexes())
            .await
            .map_err(mongo_error)?;
        // Transactions write to it: it must exist beforehand.
        if !existing.contains(ROLLUP_STATE) {
            self.create(doc! { "create": ROLLUP_STATE }).await?;
        }
        for (collection, indexes, ttl) in indexed_collections(&self.retention) {
            if let (Some(seconds), true) = (ttl, existing.contains(collection)) {
                match self.db.run_command(retune_ttl(collection, seconds)).await {
                    // Not there yet: `createIndexes` makes it with the right TTL.
                    Err(e) if command::error_code(&e) != Some(INDEX_NOT_FOUND) => {
                        return Err(mongo_error(e))
                    }
                    _ => {}
                }
            }
            self.db.run_command(indexes).await.map_err(mongo_error)?;
        }
        let hello = self.db.run_command(doc! { "hello": 1 }).await;
        if hello.is_ok_and(|h| !transaction::supports_transactions(&h)) {
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
            Err(e) => Err(mongo_error(e)),
        }
    }

    fn collection(&self, name: &str) -> Collection<Document> {
        let mut concern = WriteConcern::majority();
        concern.journal = Some(true);
        let options = CollectionOptions::builder().write_concern(concern).build();
        self.db.collection_with_options(name, options)
    }
}

impl Pruning for MongoStore {
    /// Nothing to do: TTL indexes and `expireAfterSeconds` expire data server-side.
    async fn prune(&self, _now_ms: i64, _retention: &Retention) -> Result<PruneReport, StoreError> {
        Ok(PruneReport::default())
    }
}

/// Map of collection → its TTL in seconds, as [`MongoStore`] sets them (for documentation and
/// checks). Archived dead letters are not in it: each expires at its own `expiresAt`, set by
/// the DLQ handler's `archive_ttl`.
fn ttl_seconds(retention: &Retention) -> HashMap<&'static str, i64> {
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
}
