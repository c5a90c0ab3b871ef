//! The roll-up documents and statements on MongoDB, without I/O: a bucket's `_id` and
//! collection, the one mapping of a [`Bucket`] to its document and back, the conditional
//! write of a folded bucket, the key of a folded message, the watermark, publication. The
//! fold that uses them is in [`super::rollups`].

use mongodb::bson::{doc, Bson, DateTime, Document};

use super::fields::Fields;
use super::{key_id, ROLLUPS_DAILY, ROLLUPS_HOURLY};
use crate::{Bucket, MessageRecord, StoreError, GRANULARITIES};

/// `_id` of the watermark document.
pub(crate) const WATERMARK: &str = "watermark";

/// The collection of a granularity's buckets.
pub(crate) fn rollup_collection(granularity: &str) -> &'static str {
    if granularity == "day" {
        ROLLUPS_DAILY
    } else {
        ROLLUPS_HOURLY
    }
}

/// The length of a granularity's buckets, ms.
pub(crate) fn length(granularity: &str) -> i64 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fold::fold_reading;

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
