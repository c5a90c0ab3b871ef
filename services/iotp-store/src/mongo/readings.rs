//! The raw tier on MongoDB: the time-series collection `readings` (one document per reading)
//! and `message_keys`, the exactly-once guard time series lack.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::error::ErrorKind;
use mongodb::Collection;

use super::command::{code_error, mongo_error, DUPLICATE_KEY};
use super::{key_id, MongoStore, MESSAGE_KEYS, READINGS, TWINS};
use crate::readings::{foreign_cursor, Position};
use crate::{
    MessageRecord, PageCursor, ReadingStore, StoreError, StoredMessage, StoredPage, WriteReport,
};

/// How long a writer may hold a pending key before another may take it over.
const LEASE: Duration = Duration::from_secs(60);

/// The time-series documents of one message: one per reading. Public for the store's benchmark
/// (`benches/store.rs`) only; the store builds them itself in `write_messages`.
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

impl MongoStore {
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
                                return Err(code_error(
                                    w.code,
                                    format!("insert failed: {} ({})", w.message, w.code),
                                ));
                            }
                            duplicates.insert(chunk_no * self.batch_size + w.index);
                        }
                    }
                    _ => return Err(mongo_error(e)),
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
    async fn write_messages(
        &self,
        messages: Vec<MessageRecord>,
    ) -> Result<WriteReport, StoreError> {
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
        let now = iotp_contract::now_millis();
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
                .map_err(mongo_error)?;
            if claimed.modified_count == 1 {
                to_repair.push(m);
                continue;
            }
            let state = keys
                .find_one(doc! { "_id": &id })
                .await
                .map_err(mongo_error)?;
            match state.as_ref().and_then(|d| d.get_str("state").ok()) {
                Some("done") | None => report.duplicates += 1,
                Some(_) => {
                    return Err(StoreError::Conflict(format!(
                    "message {id} is being written by another writer (its lease has not expired)"
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
                .map_err(mongo_error)?
                .try_collect::<Vec<Document>>()
                .await
                .map_err(mongo_error)?
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
                .map_err(mongo_error)?;
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
            .map_err(mongo_error)?;
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
            .map_err(mongo_error)
    }

    async fn reading_count(&self, tenant: Option<&str>) -> Result<u64, StoreError> {
        let filter = match tenant {
            Some(t) => doc! { "meta.tenant": t },
            None => doc! {},
        };
        self.collection(READINGS)
            .count_documents(filter)
            .await
            .map_err(mongo_error)
    }

    /// Pages `message_keys` (index `device_seq`), then counts each page's readings.
    async fn stored_messages(
        &self,
        tenant: &str,
        after: Option<&PageCursor>,
        limit: usize,
    ) -> Result<StoredPage, StoreError> {
        let after = match after.map(PageCursor::position) {
            None => None,
            Some(Position::Key(device, seq_no)) => Some((device.clone(), *seq_no)),
            Some(other) => return Err(foreign_cursor(other)),
        };
        let keys: Vec<Document> = self
            .collection(MESSAGE_KEYS)
            .find(stored_page_filter(tenant, after.as_ref()))
            .sort(doc! { "tenant": 1, "deviceId": 1, "seqNo": 1 })
            .limit(limit as i64)
            .await
            .map_err(mongo_error)?
            .try_collect()
            .await
            .map_err(mongo_error)?;
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
        let next = out
            .last()
            .filter(|_| out.len() == limit)
            .map(|m| PageCursor::new(Position::Key(m.device_id.clone(), m.seq_no)));
        let (Some(first), Some(last)) = (out.first(), out.last()) else {
            return Ok(StoredPage {
                messages: out,
                next,
            });
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
            .map_err(mongo_error)?
            .try_collect::<Vec<Document>>()
            .await
            .map_err(mongo_error)?
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
        Ok(StoredPage {
            messages: out,
            next,
        })
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
                .map_err(mongo_error)?
                .try_collect()
                .await
                .map_err(mongo_error)?;
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
                .map_err(mongo_error)?;
            total += gaps as u64;
        }
        Ok(total)
    }
}

/// The `find` filter for one page of a tenant's stored messages, after `(deviceId, seqNo)`.
fn stored_page_filter(tenant: &str, after: Option<&(String, i64)>) -> Document {
    match after {
        None => doc! { "tenant": tenant, "state": "done" },
        Some((device, seq_no)) => doc! {
            "tenant": tenant, "state": "done",
            "$or": [ { "deviceId": { "$gt": device } }, { "deviceId": device, "seqNo": { "$gt": seq_no } } ],
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
