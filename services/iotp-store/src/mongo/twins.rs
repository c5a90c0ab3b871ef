//! Digital twins on MongoDB: collection `twins`, `_id` = `tenant/deviceId`.
//!
//! [`TwinStore::apply`] reads the batch's twins, folds the observations in memory with the
//! shared [`fold`] (so the rules are the embedded store's), and writes each changed twin back
//! with optimistic concurrency: an upserting update whose filter names the `version` read.
//! If another writer (an enricher replica, `mark_offline`) changed the twin meanwhile, the
//! filter misses, the upsert collides with the existing `_id` (duplicate key): the other twins
//! of the batch are written and the batch fails with [`StoreError::Conflict`]. Applying the
//! batch again converges: a twin already written folds to itself (the fold is idempotent) and
//! is not written again, a changed one is read and folded again. `seqGaps` belongs to the
//! upserter (`update_seq_gaps`): a fold never writes it, so neither writer undoes the other.

use std::collections::{BTreeMap, HashMap};

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime, Document};

use super::command::{mongo_error, update_command, write_reply};
use super::fields::Fields;
use super::{MongoStore, TWINS};
use crate::fold::fold;
use crate::{LastValue, LivenessCounts, Observation, StoreError, Twin, TwinStore};

/// The `_id` of a twin (the same the upserter's `update_seq_gaps` writes to).
pub(crate) fn twin_id(tenant: &str, device_id: &str) -> String {
    format!("{tenant}/{device_id}")
}

/// The document of `t` at `version` (`version` grows with every write: the
/// optimistic-concurrency check). The one mapping to the collection; [`twin_from`] reads it
/// back. Field names are those stored since the first release.
pub(crate) fn twin_doc(t: &Twin, version: i64) -> Document {
    // An array: metric names are data, not field names.
    let last_values: Vec<Document> = t
        .last_values
        .iter()
        .map(|(metric, v)| {
            doc! {
                "metric": metric,
                "value": v.value,
                "unit": optional(v.unit.as_deref()),
                "at": DateTime::from_millis(v.at),
                "seqNo": v.seq_no,
            }
        })
        .collect();
    doc! {
        "_id": twin_id(&t.tenant, &t.device_id),
        "tenant": &t.tenant,
        "deviceId": &t.device_id,
        "lastSeqNo": t.last_seq_no,
        "lastSeenAt": DateTime::from_millis(t.last_seen_at),
        "lastValues": last_values,
        "firmware": optional(t.firmware.as_deref()),
        "configVersion": optional(t.config_version.as_deref()),
        "heartbeatSecs": optional(t.heartbeat_secs.map(|h| h as i64)),
        "online": t.online,
        "alarms": &t.alarms,
        // Written by the upserter only (`update_seq_gaps`).
        "seqGaps": t.seq_gaps,
        "version": version,
    }
}

/// The twin a document holds, and the document's `version` (0 if it has none yet).
pub(crate) fn twin_from(d: &Document) -> Result<(Twin, i64), StoreError> {
    let what = format!("twin {}", d.get_str("_id").unwrap_or("without _id"));
    let f = Fields::of(d, &what);
    let mut last_values = BTreeMap::new();
    for v in f.documents("lastValues")? {
        let v = Fields::of(v, &what);
        let value = LastValue {
            value: v.f64("value")?,
            unit: v.opt_str("unit")?,
            at: v.millis("at")?,
            seq_no: v.i64("seqNo")?,
        };
        last_values.insert(v.str("metric")?, value);
    }
    let twin = Twin {
        tenant: f.str("tenant")?,
        device_id: f.str("deviceId")?,
        last_seq_no: f.i64("lastSeqNo")?,
        last_seen_at: f.millis("lastSeenAt")?,
        last_values,
        firmware: f.opt_str("firmware")?,
        config_version: f.opt_str("configVersion")?,
        heartbeat_secs: f.opt_i64("heartbeatSecs")?.map(|h| h.max(0) as u64),
        online: f.bool("online")?,
        alarms: f.strings("alarms")?,
        seq_gaps: f.opt_i64("seqGaps")?.unwrap_or(0),
    };
    Ok((twin, f.opt_i64("version")?.unwrap_or(0)))
}

fn optional<T: Into<Bson>>(v: Option<T>) -> Bson {
    v.map_or(Bson::Null, Into::into)
}

/// The update statement that writes `twin` if the stored twin is still at `version` (0: none
/// stored yet, then it is inserted). Everything the fold owns is set; `seqGaps` only on insert.
pub(crate) fn twin_update(twin: &Twin, version: i64) -> Document {
    let mut set = twin_doc(twin, version + 1);
    set.remove("_id");
    set.remove("seqGaps");
    doc! {
        "q": { "_id": twin_id(&twin.tenant, &twin.device_id), "version": version },
        "u": { "$set": set, "$setOnInsert": { "seqGaps": 0i64 } },
        "upsert": true,
    }
}

/// The filter of twins that missed `missed` heartbeats by `now_ms`: online, with a known
/// interval, last seen (device time) before now minus that many intervals.
pub(crate) fn offline_filter(now_ms: i64, missed: u32) -> Document {
    doc! {
        "online": true,
        "heartbeatSecs": { "$ne": null },
        "$expr": { "$lt": [
            "$lastSeenAt",
            { "$subtract": [ DateTime::from_millis(now_ms), { "$multiply": [ "$heartbeatSecs", 1000i64 * i64::from(missed) ] } ] },
        ] },
    }
}

/// The update `mark_offline` applies (and the version bump that makes a concurrent fold's
/// conditional write miss: a conflict for that fold).
pub(crate) fn offline_update() -> Document {
    doc! { "$set": { "online": false }, "$addToSet": { "alarms": "offline" }, "$inc": { "version": 1i64 } }
}

impl MongoStore {
    /// The stored twins with these ids, with their versions, by id.
    async fn read_twins(&self, ids: &[String]) -> Result<HashMap<String, (Twin, i64)>, StoreError> {
        let coll = self.db.collection::<Document>(TWINS);
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(self.batch_size) {
            let docs: Vec<Document> = coll
                .find(doc! { "_id": { "$in": chunk } })
                .await
                .map_err(mongo_error)?
                .try_collect()
                .await
                .map_err(mongo_error)?;
            for d in &docs {
                let (twin, version) = twin_from(d)?;
                out.insert(twin_id(&twin.tenant, &twin.device_id), (twin, version));
            }
        }
        Ok(out)
    }
}

impl TwinStore for MongoStore {
    async fn apply(&self, observations: Vec<Observation>) -> Result<(), StoreError> {
        let mut by_twin: BTreeMap<String, Vec<&Observation>> = BTreeMap::new();
        for obs in &observations {
            by_twin
                .entry(twin_id(&obs.tenant, &obs.device_id))
                .or_default()
                .push(obs);
        }
        let ids: Vec<String> = by_twin.keys().cloned().collect();
        let current = self.read_twins(&ids).await?;
        let mut changed = Vec::new();
        let mut statements = Vec::new();
        for (id, batch) in &by_twin {
            let stored = current.get(id);
            let before = stored.map(|(twin, _)| twin.clone());
            let after = batch
                .iter()
                .fold(before.clone(), |t, obs| Some(fold(t, obs)));
            match after {
                Some(t) if Some(&t) != before.as_ref() => {
                    changed.push(id);
                    statements.push(twin_update(&t, stored.map_or(0, |(_, version)| *version)));
                }
                // A replay or an older message: nothing to write.
                _ => {}
            }
        }
        let mut conflicts = Vec::new();
        for (chunk_no, chunk) in statements.chunks(self.batch_size).enumerate() {
            let reply = self
                .db
                .run_command(update_command(TWINS, chunk.to_vec(), false))
                .await
                .map_err(mongo_error)?;
            for i in write_reply(&reply)?.conflicts {
                conflicts.push(changed[chunk_no * self.batch_size + i]);
            }
        }
        match conflicts.first() {
            None => Ok(()),
            Some(first) => Err(StoreError::Conflict(format!(
                "{} twins changed since this batch read them (first {first}); the others were written",
                conflicts.len()
            ))),
        }
    }

    async fn twin(&self, tenant: &str, device_id: &str) -> Result<Option<Twin>, StoreError> {
        let found = self
            .db
            .collection::<Document>(TWINS)
            .find_one(doc! { "_id": twin_id(tenant, device_id) })
            .await
            .map_err(mongo_error)?;
        found
            .as_ref()
            .map(|d| twin_from(d).map(|(twin, _)| twin))
            .transpose()
    }

    async fn mark_offline(&self, now_ms: i64, missed: u32) -> Result<u64, StoreError> {
        self.collection(TWINS)
            .update_many(offline_filter(now_ms, missed), offline_update())
            .await
            .map(|r| r.modified_count)
            .map_err(mongo_error)
    }

    async fn liveness_counts(&self) -> Result<LivenessCounts, StoreError> {
        let twins = self.collection(TWINS);
        let online = twins
            .count_documents(doc! { "online": true })
            .await
            .map_err(mongo_error)?;
        let offline = twins
            .count_documents(doc! { "online": false })
            .await
            .map_err(mongo_error)?;
        Ok(LivenessCounts { online, offline })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn twin() -> Twin {
        let obs = Observation {
            tenant: "acme".into(),
            device_id: "m-1".into(),
            seq_no: 7,
            produced_at: 1_700_000_000_000,
            readings: vec![("a.b".into(), 1.5, Some("Wh".into()))],
            firmware: Some("1.2".into()),
            config_version: None,
            heartbeat_secs: Some(60),
        };
        fold(None, &obs)
    }

    #[test]
    fn a_twin_survives_its_document_whose_shape_is_the_stored_one() {
        let mut t = twin();
        t.seq_gaps = 3;
        let at = DateTime::from_millis(1_700_000_000_000);
        let d = twin_doc(&t, 4);
        // The documents twins have had since the first release: existing ones stay readable.
        assert_eq!(
            d,
            doc! {
                "_id": "acme/m-1", "tenant": "acme", "deviceId": "m-1", "lastSeqNo": 7i64,
                "lastSeenAt": at,
                "lastValues": [
                    { "metric": "a.b", "value": 1.5, "unit": "Wh", "at": at, "seqNo": 7i64 },
                ],
                "firmware": "1.2", "configVersion": null, "heartbeatSecs": 60i64,
                "online": true, "alarms": [], "seqGaps": 3i64, "version": 4i64,
            }
        );
        assert_eq!(twin_from(&d), Ok((t.clone(), 4)));
        // Written before `seqGaps` and `version` existed, or by another driver's integers.
        let mut old = d.clone();
        old.remove("seqGaps");
        old.remove("version");
        old.insert("lastSeqNo", 7i32);
        assert_eq!(
            twin_from(&old),
            Ok((Twin { seq_gaps: 0, ..t }, 0)),
            "missing counters are 0"
        );
        old.insert("lastSeenAt", "yesterday");
        assert!(matches!(twin_from(&old), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn writes_are_conditional_on_the_version_read_and_leave_seq_gaps_alone() {
        let s = twin_update(&twin(), 4);
        assert_eq!(
            s.get_document("q").expect("q"),
            &doc! { "_id": "acme/m-1", "version": 4i64 }
        );
        assert!(s.get_bool("upsert").expect("upsert"));
        let u = s.get_document("u").expect("u");
        let set = u.get_document("$set").expect("$set");
        assert_eq!(set.get_i64("version").expect("next version"), 5);
        assert!(!set.contains_key("seqGaps") && !set.contains_key("_id"));
        assert!(set.get_bool("online").expect("online"));
        assert_eq!(
            u.get_document("$setOnInsert").expect("insert only"),
            &doc! { "seqGaps": 0i64 }
        );
        let new = twin_update(&twin(), 0);
        assert_eq!(
            new.get_document("q").expect("q"),
            &doc! { "_id": "acme/m-1", "version": 0i64 },
            "a missing twin is inserted by the upsert; an existing one collides (duplicate key)"
        );
    }

    #[test]
    fn offline_after_missed_intervals_by_device_time() {
        let f = offline_filter(1_000_000, 3);
        assert!(f.get_bool("online").expect("online"));
        assert_eq!(
            f.get_document("$expr").expect("expr"),
            &doc! { "$lt": [
                "$lastSeenAt",
                { "$subtract": [ DateTime::from_millis(1_000_000), { "$multiply": [ "$heartbeatSecs", 3000i64 ] } ] },
            ] }
        );
        let u = offline_update();
        assert_eq!(
            u.get_document("$addToSet").expect("alarm once"),
            &doc! { "alarms": "offline" }
        );
        assert_eq!(
            u.get_document("$inc").expect("version"),
            &doc! { "version": 1i64 }
        );
    }
}
