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
use mongodb::bson::{self, doc, DateTime, Document};
use serde::{Deserialize, Serialize};

use super::command::mongo_error;
use super::command::{update_command, write_reply};
use super::{MongoStore, TWINS};
use crate::fold::fold;
use crate::{LastValue, Observation, StoreError, Twin, TwinStore};

/// The `_id` of a twin (the same the upserter's `update_seq_gaps` writes to).
pub(crate) fn twin_id(tenant: &str, device_id: &str) -> String {
    format!("{tenant}/{device_id}")
}

/// A twin document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TwinDoc {
    /// `tenant/deviceId`.
    #[serde(rename = "_id")]
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// Device id.
    pub device_id: String,
    /// Highest sequence number seen.
    pub last_seq_no: i64,
    /// Newest device time seen.
    pub last_seen_at: DateTime,
    /// Newest value of each metric (an array: metric names are data, not field names).
    pub last_values: Vec<LastValueDoc>,
    /// Firmware.
    pub firmware: Option<String>,
    /// Configuration version.
    pub config_version: Option<String>,
    /// Expected heartbeat interval, seconds.
    pub heartbeat_secs: Option<i64>,
    /// Online.
    pub online: bool,
    /// Active alarms.
    pub alarms: Vec<String>,
    /// Written by the upserter only.
    #[serde(default)]
    pub seq_gaps: i64,
    /// Grows with every write; the optimistic-concurrency check.
    #[serde(default)]
    pub version: i64,
}

/// The newest value of one metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LastValueDoc {
    /// Metric.
    pub metric: String,
    /// Value.
    pub value: f64,
    /// Unit.
    pub unit: Option<String>,
    /// Device time.
    pub at: DateTime,
    /// Sequence number of the message that carried it.
    pub seq_no: i64,
}

impl TwinDoc {
    /// The document of `twin` at `version`.
    pub(crate) fn new(t: &Twin, version: i64) -> Self {
        Self {
            id: twin_id(&t.tenant, &t.device_id),
            tenant: t.tenant.clone(),
            device_id: t.device_id.clone(),
            last_seq_no: t.last_seq_no,
            last_seen_at: DateTime::from_millis(t.last_seen_at),
            last_values: t
                .last_values
                .iter()
                .map(|(metric, v)| LastValueDoc {
                    metric: metric.clone(),
                    value: v.value,
                    unit: v.unit.clone(),
                    at: DateTime::from_millis(v.at),
                    seq_no: v.seq_no,
                })
                .collect(),
            firmware: t.firmware.clone(),
            config_version: t.config_version.clone(),
            heartbeat_secs: t.heartbeat_secs.map(|h| h as i64),
            online: t.online,
            alarms: t.alarms.clone(),
            seq_gaps: t.seq_gaps,
            version,
        }
    }

    /// The twin this document holds.
    pub(crate) fn twin(&self) -> Twin {
        Twin {
            tenant: self.tenant.clone(),
            device_id: self.device_id.clone(),
            last_seq_no: self.last_seq_no,
            last_seen_at: self.last_seen_at.timestamp_millis(),
            last_values: self
                .last_values
                .iter()
                .map(|v| {
                    let value = LastValue {
                        value: v.value,
                        unit: v.unit.clone(),
                        at: v.at.timestamp_millis(),
                        seq_no: v.seq_no,
                    };
                    (v.metric.clone(), value)
                })
                .collect::<BTreeMap<_, _>>(),
            firmware: self.firmware.clone(),
            config_version: self.config_version.clone(),
            heartbeat_secs: self.heartbeat_secs.map(|h| h.max(0) as u64),
            online: self.online,
            alarms: self.alarms.clone(),
            seq_gaps: self.seq_gaps,
        }
    }
}

/// The update statement that writes `twin` if the stored twin is still at `version` (0: none
/// stored yet, then it is inserted). Everything the fold owns is set; `seqGaps` only on insert.
pub(crate) fn twin_update(twin: &Twin, version: i64) -> Result<Document, StoreError> {
    let mut set = bson::to_document(&TwinDoc::new(twin, version + 1))
        .map_err(|e| StoreError::Backend(format!("twin as BSON: {e}")))?;
    let id = set
        .remove("_id")
        .ok_or_else(|| StoreError::Backend("twin without _id".into()))?;
    set.remove("seqGaps");
    Ok(doc! {
        "q": { "_id": id, "version": version },
        "u": { "$set": set, "$setOnInsert": { "seqGaps": 0i64 } },
        "upsert": true,
    })
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
    async fn read_twins(&self, ids: &[String]) -> Result<HashMap<String, TwinDoc>, StoreError> {
        let coll = self.db.collection::<TwinDoc>(TWINS);
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(self.batch_size) {
            let docs: Vec<TwinDoc> = coll
                .find(doc! { "_id": { "$in": chunk } })
                .await
                .map_err(mongo_error)?
                .try_collect()
                .await
                .map_err(mongo_error)?;
            out.extend(docs.into_iter().map(|d| (d.id.clone(), d)));
        }
        Ok(out)
    }
}

impl TwinStore for MongoStore {
    async fn apply(&self, observations: &[Observation]) -> Result<(), StoreError> {
        let mut by_twin: BTreeMap<String, Vec<&Observation>> = BTreeMap::new();
        for obs in observations {
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
            let before = stored.map(TwinDoc::twin);
            let after = batch
                .iter()
                .fold(before.clone(), |t, obs| Some(fold(t, obs)));
            match after {
                Some(t) if Some(&t) != before.as_ref() => {
                    changed.push(id);
                    statements.push(twin_update(&t, stored.map_or(0, |d| d.version))?);
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
            .collection::<TwinDoc>(TWINS)
            .find_one(doc! { "_id": twin_id(tenant, device_id) })
            .await
            .map_err(mongo_error)?;
        Ok(found.as_ref().map(TwinDoc::twin))
    }

    async fn mark_offline(&self, now_ms: i64, missed: u32) -> Result<u64, StoreError> {
        self.collection(TWINS)
            .update_many(offline_filter(now_ms, missed), offline_update())
            .await
            .map(|r| r.modified_count)
            .map_err(mongo_error)
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
    fn a_twin_survives_its_document() {
        let mut t = twin();
        t.seq_gaps = 3;
        let d = TwinDoc::new(&t, 4);
        assert_eq!(d.id, "acme/m-1");
        assert_eq!(d.last_values[0].metric, "a.b", "metric names are values");
        let stored = bson::to_document(&d).expect("bson");
        assert_eq!(stored.get_i64("version").expect("version"), 4);
        assert_eq!(
            stored
                .get_datetime("lastSeenAt")
                .expect("date")
                .timestamp_millis(),
            1_700_000_000_000
        );
        let back: TwinDoc = bson::from_document(stored).expect("read");
        assert_eq!(back.twin(), t);
    }

    #[test]
    fn writes_are_conditional_on_the_version_read_and_leave_seq_gaps_alone() {
        let s = twin_update(&twin(), 4).expect("statement");
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
        let new = twin_update(&twin(), 0).expect("statement");
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
