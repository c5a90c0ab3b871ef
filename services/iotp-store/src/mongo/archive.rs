//! The dead-letter archive on MongoDB: collection `dead_letters`, `_id` = the letter's id.
//! Each letter carries its own expiry (`expiresAt`, parked time + `archive_ttl`); a TTL index
//! with `expireAfterSeconds: 0` on it lets the server remove expired letters.
//! [`DeadLetterArchive::prune_letters`] also deletes expired ones explicitly (the TTL monitor
//! runs about once a minute), so the contract's count holds on both backends.

use futures::TryStreamExt;
use iotp_contract::DeadLetter;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{doc, Binary, Bson, DateTime, Document};

use super::command::mongo_error;
use super::fields::Fields;
use super::{MongoStore, DEAD_LETTERS};
use crate::{Archived, DeadLetterArchive, LetterFilter, StoreError};

/// Letters listed when the filter sets no limit.
const DEFAULT_LIMIT: usize = 1000;

/// The archived letter a stored document holds: the one mapping from the collection
/// ([`archive_update`] writes it).
pub(crate) fn archived_from(d: &Document) -> Result<Archived, StoreError> {
    let what = format!("dead letter {}", d.get_str("_id").unwrap_or("without _id"));
    let f = Fields::of(d, &what);
    Ok(Archived {
        letter: DeadLetter {
            id: f.str("_id")?,
            stage: f.str("stage")?,
            reason_code: f.str("reason")?,
            error: f.str("error")?,
            source_topic: f.opt_str("sourceTopic")?,
            source_partition: f.opt_i32("sourcePartition")?,
            source_offset: f.opt_i64("sourceOffset")?,
            key: f.opt_bytes("key")?,
            payload: f.bytes("payload")?,
            tenant: f.opt_str("tenant")?,
            device_id: f.opt_str("deviceId")?,
            attempts: f.i32("attempts")?,
            first_failure_at: f.millis("firstFailureAt")?,
            last_failure_at: f.millis("lastFailureAt")?,
        },
        parked_at: f.millis("parkedAt")?,
        expires_at: f.millis("expiresAt")?,
        replayed_at: f.opt_millis("replayedAt")?,
        replays: f.opt_i64("replays")?.unwrap_or(0),
    })
}

fn binary(bytes: &[u8]) -> Bson {
    Bson::Binary(Binary {
        subtype: BinarySubtype::Generic,
        bytes: bytes.to_vec(),
    })
}

fn optional<T: Into<Bson>>(v: Option<T>) -> Bson {
    v.map_or(Bson::Null, Into::into)
}

/// The upsert that archives `l`, or refreshes it when the same id is parked again (as the
/// embedded store: reason, error, parked and expiry times are replaced, attempts and the last
/// failure only grow, a refreshed letter is replayable again; the rest is kept from the first).
pub(crate) fn archive_update(l: &DeadLetter, parked_at: i64, expires_at: i64) -> Document {
    doc! {
        "$set": {
            "reason": &l.reason_code,
            "error": &l.error,
            "parkedAt": DateTime::from_millis(parked_at),
            "expiresAt": DateTime::from_millis(expires_at),
            "replayedAt": Bson::Null,
        },
        "$max": { "attempts": l.attempts, "lastFailureAt": DateTime::from_millis(l.last_failure_at) },
        "$setOnInsert": {
            "stage": &l.stage,
            "sourceTopic": optional(l.source_topic.as_deref()),
            "sourcePartition": optional(l.source_partition),
            "sourceOffset": optional(l.source_offset),
            "key": l.key.as_deref().map_or(Bson::Null, binary),
            "payload": binary(&l.payload),
            "tenant": optional(l.tenant.as_deref()),
            "deviceId": optional(l.device_id.as_deref()),
            "firstFailureAt": DateTime::from_millis(l.first_failure_at),
            "replays": 0i64,
        },
    }
}

/// The `find` filter of a [`LetterFilter`].
pub(crate) fn letter_filter(f: &LetterFilter) -> Document {
    let mut filter = Document::new();
    if !f.ids.is_empty() {
        filter.insert("_id", doc! { "$in": &f.ids });
    }
    for (field, value) in [
        ("reason", &f.reason),
        ("stage", &f.stage),
        ("tenant", &f.tenant),
        ("deviceId", &f.device_id),
    ] {
        if let Some(v) = value {
            filter.insert(field, v);
        }
    }
    if !f.include_replayed {
        filter.insert("replayedAt", Bson::Null);
    }
    filter
}

/// The filter and update that record a replay of `ids` at `at`, once per `at`: a letter whose
/// `replayedAt` is `at` already is not counted again (the same call made again after a chunk
/// failed).
pub(crate) fn replay_update(ids: &[String], at: i64) -> (Document, Document) {
    let at = DateTime::from_millis(at);
    (
        doc! { "_id": { "$in": ids }, "replayedAt": { "$ne": at } },
        doc! { "$set": { "replayedAt": at }, "$inc": { "replays": 1i64 } },
    )
}

impl DeadLetterArchive for MongoStore {
    async fn archive(
        &self,
        l: &DeadLetter,
        parked_at: i64,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        self.collection(DEAD_LETTERS)
            .update_one(
                doc! { "_id": &l.id },
                archive_update(l, parked_at, expires_at),
            )
            .upsert(true)
            .await
            .map_err(mongo_error)?;
        Ok(())
    }

    async fn letters(&self, f: &LetterFilter) -> Result<Vec<Archived>, StoreError> {
        let limit = if f.limit == 0 { DEFAULT_LIMIT } else { f.limit };
        let docs: Vec<Document> = self
            .db
            .collection::<Document>(DEAD_LETTERS)
            .find(letter_filter(f))
            .sort(doc! { "parkedAt": 1, "_id": 1 })
            .limit(limit as i64)
            .await
            .map_err(mongo_error)?
            .try_collect()
            .await
            .map_err(mongo_error)?;
        docs.iter().map(archived_from).collect()
    }

    async fn mark_replayed(&self, ids: &[String], at: i64) -> Result<(), StoreError> {
        let coll = self.collection(DEAD_LETTERS);
        for chunk in ids.chunks(self.batch_size) {
            let (filter, update) = replay_update(chunk, at);
            coll.update_many(filter, update)
                .await
                .map_err(mongo_error)?;
        }
        Ok(())
    }

    async fn prune_letters(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.collection(DEAD_LETTERS)
            .delete_many(doc! { "expiresAt": { "$lt": DateTime::from_millis(now_ms) } })
            .await
            .map(|r| r.deleted_count)
            .map_err(mongo_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter() -> DeadLetter {
        DeadLetter {
            id: "enricher/iotp.validated/3/1042".into(),
            stage: "enricher".into(),
            reason_code: "unknown_device".into(),
            error: "e".into(),
            source_topic: Some("iotp.validated".into()),
            source_partition: Some(3),
            source_offset: Some(1042),
            key: None,
            payload: vec![0xC3, 0x01, 9],
            tenant: Some("acme".into()),
            device_id: Some("m-1".into()),
            attempts: 2,
            first_failure_at: 10,
            last_failure_at: 20,
        }
    }

    #[test]
    fn archiving_again_refreshes_and_keeps_the_original() {
        let u = archive_update(&letter(), 100, 200);
        let set = u.get_document("$set").expect("$set");
        assert_eq!(
            set.get_datetime("expiresAt")
                .expect("expiry")
                .timestamp_millis(),
            200
        );
        assert_eq!(set.get("replayedAt"), Some(&Bson::Null), "replayable again");
        assert_eq!(
            u.get_document("$max").expect("$max"),
            &doc! { "attempts": 2, "lastFailureAt": DateTime::from_millis(20) }
        );
        let first = u.get_document("$setOnInsert").expect("$setOnInsert");
        assert_eq!(
            first.get_binary_generic("payload").expect("bytes"),
            &vec![0xC3, 0x01, 9]
        );
        assert_eq!(first.get("key"), Some(&Bson::Null));
        assert_eq!(first.get_i64("replays").expect("replays"), 0);
        // No field is both set and set on insert (the server would refuse the update).
        assert!(set.keys().all(|k| !first.contains_key(k)));
    }

    #[test]
    fn a_stored_letter_reads_back_whole() {
        let mut stored = archive_update(&letter(), 100, 200)
            .get_document("$setOnInsert")
            .expect("insert")
            .clone();
        for part in ["$set", "$max"] {
            stored.extend(
                archive_update(&letter(), 100, 200)
                    .get_document(part)
                    .expect("part")
                    .clone(),
            );
        }
        stored.insert("_id", "enricher/iotp.validated/3/1042");
        let a = archived_from(&stored).expect("read");
        assert_eq!(a.letter, letter());
        assert_eq!(
            (a.parked_at, a.expires_at, a.replayed_at, a.replays),
            (100, 200, None, 0)
        );
        stored.insert("replayedAt", DateTime::from_millis(300));
        stored.insert("replays", 2i32);
        let a = archived_from(&stored).expect("read");
        assert_eq!((a.replayed_at, a.replays), (Some(300), 2));
        stored.remove("payload");
        assert!(matches!(
            archived_from(&stored),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn filters_hide_replayed_letters_unless_asked() {
        assert_eq!(
            letter_filter(&LetterFilter::default()),
            doc! { "replayedAt": null }
        );
        let f = LetterFilter {
            ids: vec!["a".into()],
            reason: Some("unknown_device".into()),
            device_id: Some("m-1".into()),
            include_replayed: true,
            ..LetterFilter::default()
        };
        assert_eq!(
            letter_filter(&f),
            doc! { "_id": { "$in": ["a"] }, "reason": "unknown_device", "deviceId": "m-1" }
        );
    }

    #[test]
    fn a_replay_is_counted_once_per_replay_time() {
        let (filter, update) = replay_update(&["a".to_string()], 300);
        assert_eq!(
            filter,
            doc! { "_id": { "$in": ["a"] }, "replayedAt": { "$ne": DateTime::from_millis(300) } }
        );
        assert_eq!(
            update,
            doc! { "$set": { "replayedAt": DateTime::from_millis(300) }, "$inc": { "replays": 1i64 } }
        );
    }
}
