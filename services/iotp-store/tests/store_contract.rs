//! One contract, every backend: the embedded store always, MongoDB where `MONGODB_URI` is set
//! (`make test` runs it then; without it cargo lists it as ignored, with the reason). Both are
//! opened through `StoreConfig`, as the services open them. Every part uses its own tenant, so
//! the parts can share a database; event times are recent where MongoDB's TTLs (which follow
//! the real clock) could otherwise remove data mid-test.
//!
//! Over 450 lines on purpose: the contract is one list of parts, each generic over the
//! backend; split into files it would be read in pieces.
#![allow(clippy::unwrap_used)]

use iotp_contract::DeadLetter;
use iotp_store::{
    DeadLetterArchive, FoldReport, LetterFilter, MessageRecord, Observation, ReadingStore,
    RollupStore, Store, StoreConfig, TwinStore, WriteReport,
};

/// `prefix` plus 10 random hex digits: a tenant, file or database of this run only.
fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

const MINUTE: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

fn message(tenant: &str, device: &str, seq_no: i64) -> MessageRecord {
    MessageRecord {
        tenant: tenant.into(),
        device_id: device.into(),
        seq_no,
        msg_id: format!("{device}-{seq_no}"),
        produced_at: iotp_contract::now_millis() - 60_000 + seq_no,
        received_at: iotp_contract::now_millis(),
        site: Some("plant".into()),
        asset: None,
        profile: "meter".into(),
        readings: vec![
            ("energy".into(), seq_no as f64, Some("Wh".into())),
            ("power".into(), 1.0, Some("W".into())),
        ],
    }
}

/// Exactly once per (tenant, deviceId, seqNo), whatever the redeliveries.
async fn reading_contract<S: ReadingStore>(store: &S) {
    let tenant = unique("t");
    let first: Vec<_> = [0, 1, 2, 5, 2]
        .iter()
        .map(|s| message(&tenant, "d1", *s))
        .collect();
    assert_eq!(
        store.write_messages(first.clone()).await.unwrap(),
        WriteReport {
            stored: 4,
            duplicates: 1
        },
        "a key twice in a batch"
    );
    let again: Vec<_> = [2, 3, 5, 6]
        .iter()
        .map(|s| message(&tenant, "d1", *s))
        .collect();
    assert_eq!(
        store.write_messages(again.clone()).await.unwrap(),
        WriteReport {
            stored: 2,
            duplicates: 2
        },
        "redelivery"
    );
    assert_eq!(
        store.write_messages(again.clone()).await.unwrap(),
        WriteReport {
            stored: 0,
            duplicates: 4
        },
        "replay"
    );
    assert_eq!(store.message_count(Some(&tenant)).await.unwrap(), 6);
    assert_eq!(
        store.reading_count(Some(&tenant)).await.unwrap(),
        12,
        "two readings per message, once each"
    );
    let page = store.stored_messages(&tenant, None, 4).await.unwrap();
    assert_eq!(page.messages.len(), 4, "a full first page");
    assert!(page
        .messages
        .iter()
        .all(|m| m.readings == 2 && m.device_id == "d1"));
    let one = page.messages.iter().find(|m| m.seq_no == 1).unwrap();
    assert_eq!(one.msg_id, "d1-1");
    assert!(one.stored_at >= one.produced_at);
    let rest = store
        .stored_messages(&tenant, page.next.as_ref(), 100)
        .await
        .unwrap();
    assert!(rest.next.is_none(), "the last page");
    let mut seqs: Vec<i64> = page
        .messages
        .iter()
        .chain(&rest.messages)
        .map(|m| m.seq_no)
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, [0, 1, 2, 3, 5, 6], "each message once over the pages");
    assert_eq!(
        store
            .update_seq_gaps(&[(tenant.clone(), "d1".into())])
            .await
            .unwrap(),
        1,
        "seq 4 never arrived"
    );
    assert_eq!(
        store.write_messages(vec![]).await.unwrap(),
        WriteReport::default()
    );
}

fn obs(tenant: &str, device: &str, seq_no: i64, at: i64, value: f64) -> Observation {
    Observation {
        tenant: tenant.into(),
        device_id: device.into(),
        seq_no,
        produced_at: at,
        readings: vec![("temp".into(), value, Some("Cel".into()))],
        firmware: None,
        config_version: Some("cfg-1".into()),
        heartbeat_secs: Some(60),
    }
}

/// The upserter's gap count reaches the twin, and later folds keep it.
async fn gaps_contract<S: ReadingStore + TwinStore>(store: &S) {
    let tenant = unique("t");
    let written: Vec<_> = [0, 1, 2, 3, 5]
        .iter()
        .map(|s| message(&tenant, "d1", *s))
        .collect();
    store.write_messages(written.clone()).await.unwrap();
    let now = iotp_contract::now_millis();
    store
        .apply(vec![obs(&tenant, "d1", 5, now, 1.0)])
        .await
        .unwrap();
    let devices = [(tenant.clone(), "d1".to_string())];
    assert_eq!(
        store.update_seq_gaps(&devices).await.unwrap(),
        1,
        "seq 4 never arrived"
    );
    assert_eq!(
        store.twin(&tenant, "d1").await.unwrap().unwrap().seq_gaps,
        1
    );
    store
        .apply(vec![obs(&tenant, "d1", 6, now + 1000, 2.0)])
        .await
        .unwrap();
    let t = store.twin(&tenant, "d1").await.unwrap().unwrap();
    assert_eq!(
        (t.last_seq_no, t.seq_gaps),
        (6, 1),
        "a fold keeps the gap count"
    );
}

/// Twins follow the device's seqNo: late and replayed messages never move them backwards.
async fn twin_contract<S: TwinStore>(store: &S) {
    let tenant = unique("t");
    let base = iotp_contract::now_millis() - HOUR;
    store
        .apply(vec![
            obs(&tenant, "d1", 5, base + 5000, 50.0),
            obs(&tenant, "d2", 1, base + 1000, 1.0),
        ])
        .await
        .unwrap();
    // Late and replayed messages in a later batch.
    store
        .apply(vec![
            obs(&tenant, "d1", 3, base + 3000, 30.0),
            obs(&tenant, "d1", 5, base + 5000, 50.0),
            obs(&tenant, "d1", 4, base + 4000, 40.0),
        ])
        .await
        .unwrap();
    let t = store.twin(&tenant, "d1").await.unwrap().unwrap();
    assert_eq!(
        (t.last_seq_no, t.last_seen_at, t.last_values["temp"].value),
        (5, base + 5000, 50.0)
    );
    assert!(t.online);
    assert_eq!(t.config_version.as_deref(), Some("cfg-1"));
    assert_eq!(t.heartbeat_secs, Some(60));
    assert_eq!(
        store
            .twin(&tenant, "d2")
            .await
            .unwrap()
            .unwrap()
            .last_seq_no,
        1
    );
    assert!(store.twin(&tenant, "nope").await.unwrap().is_none());
    store.apply(vec![]).await.unwrap();
}

/// Devices silent for `missed` heartbeat intervals (device time) are marked offline once; their
/// next message brings them back.
async fn offline_contract<S: TwinStore>(store: &S) {
    let tenant = unique("t");
    // Counted over every tenant: this part compares with the counts it starts from.
    let before = store.liveness_counts().await.unwrap();
    // Device times in 1970: older than any other part's twins, so only these two qualify.
    store
        .apply(vec![
            obs(&tenant, "d1", 1, 1_000_000, 1.0),
            obs(&tenant, "d2", 1, 1_170_000, 1.0),
        ])
        .await
        .unwrap();
    let counts = store.liveness_counts().await.unwrap();
    assert_eq!(
        (counts.online, counts.offline),
        (before.online + 2, before.offline)
    );
    // Three 60 s intervals after d1's last sign of life; d2 is within them.
    assert_eq!(store.mark_offline(1_181_000, 3).await.unwrap(), 1);
    let counts = store.liveness_counts().await.unwrap();
    assert_eq!(
        (counts.online, counts.offline),
        (before.online + 1, before.offline + 1)
    );
    let d1 = store.twin(&tenant, "d1").await.unwrap().unwrap();
    assert!(!d1.online);
    assert_eq!(d1.alarms, vec!["offline".to_string()]);
    assert!(store.twin(&tenant, "d2").await.unwrap().unwrap().online);
    assert_eq!(
        store.mark_offline(1_181_000, 3).await.unwrap(),
        0,
        "counted once"
    );
    store
        .apply(vec![obs(&tenant, "d1", 2, 1_200_000, 2.0)])
        .await
        .unwrap();
    let d1 = store.twin(&tenant, "d1").await.unwrap().unwrap();
    assert!(d1.online && d1.alarms.is_empty());
}

/// Each message is folded once, in any order; a bucket is published once closed, and again,
/// at a higher revision, when late data corrects it; the watermark only rises.
async fn rollup_contract<S: RollupStore>(store: &S) {
    let tenant = unique("t");
    let day = (iotp_contract::now_millis() / DAY - 2) * DAY;
    let at = |seq: i64, t: i64, v: f64| MessageRecord {
        produced_at: day + t,
        readings: vec![("energy".into(), v, Some("Wh".into()))],
        ..message(&tenant, "d1", seq)
    };
    let mine = |buckets: Vec<iotp_store::Bucket>| {
        buckets
            .into_iter()
            .filter(|b| b.tenant == tenant)
            .collect::<Vec<_>>()
    };
    let energy = ["energy".to_string()];
    // Hour 0: values 10 (t=10 min), 30 (t=50 min), 20 (t=30 min) arriving out of order.
    let first = vec![at(1, 10 * MINUTE, 10.0), at(3, 50 * MINUTE, 30.0)];
    store
        .fold(first.clone(), &energy, day + 50 * MINUTE)
        .await
        .unwrap();
    let again = vec![
        at(2, 30 * MINUTE, 20.0),
        at(3, 50 * MINUTE, 30.0),
        at(4, HOUR + MINUTE, 5.0),
        at(4, HOUR + MINUTE, 5.0),
    ];
    assert_eq!(
        store
            .fold(again.clone(), &energy, day + HOUR + MINUTE)
            .await
            .unwrap(),
        FoldReport {
            applied: 2,
            duplicates: 2
        },
        "one redelivered, one twice in the batch"
    );
    assert_eq!(store.watermark().await.unwrap(), day + HOUR + MINUTE);
    let buckets = store.buckets(&tenant, "d1").await.unwrap();
    let hour0 = buckets
        .iter()
        .find(|b| b.granularity == "hour" && b.bucket_start == day)
        .unwrap();
    assert_eq!(
        (hour0.count, hour0.sum, hour0.min, hour0.max),
        (3, 60.0, 10.0, 30.0)
    );
    assert_eq!(
        (hour0.first, hour0.last),
        (10.0, 30.0),
        "first/last by event time"
    );
    assert!(hour0.cumulative);
    let day0 = buckets.iter().find(|b| b.granularity == "day").unwrap();
    assert_eq!((day0.count, day0.bucket_start), (4, day));
    assert_eq!(buckets.len(), 3, "hour 0, hour 1, day 0");
    // Watermark 1h01m: with 0 lateness hour 0 is closed, hour 1 and day 0 are not.
    let closed = mine(store.closed_unpublished(0, 1000).await.unwrap());
    assert_eq!(closed.len(), 1);
    assert_eq!(
        (closed[0].granularity.as_str(), closed[0].bucket_start),
        ("hour", day)
    );
    assert!(
        mine(store.closed_unpublished(10 * MINUTE, 1000).await.unwrap()).is_empty(),
        "lateness keeps it open"
    );
    store.mark_published(&closed).await.unwrap();
    assert!(mine(store.closed_unpublished(0, 1000).await.unwrap()).is_empty());
    // Late data corrects the published bucket, which is then due again with a new revision;
    // its older watermark does not lower the store's.
    store
        .fold(vec![at(0, 5 * MINUTE, 1.0)], &[], day)
        .await
        .unwrap();
    assert_eq!(store.watermark().await.unwrap(), day + HOUR + MINUTE);
    let due = mine(store.closed_unpublished(0, 1000).await.unwrap());
    assert_eq!(due.len(), 1);
    assert_eq!(
        (due[0].count, due[0].first, due[0].revision),
        (4, 1.0, closed[0].revision + 1)
    );
    // A replay of everything folds nothing.
    let before = store.buckets(&tenant, "d1").await.unwrap();
    assert_eq!(
        store.fold(first.clone(), &energy, day).await.unwrap(),
        FoldReport {
            applied: 0,
            duplicates: 2
        }
    );
    assert_eq!(store.buckets(&tenant, "d1").await.unwrap(), before);
}

/// The archive: refresh by id, filters, oldest parked first, replays hidden unless asked,
/// expiry by each letter's own date.
async fn archive_contract<S: DeadLetterArchive>(store: &S) {
    let tenant = unique("t");
    // Expiries ahead of the real clock: MongoDB's TTL monitor must not take them mid-test.
    let now = iotp_contract::now_millis();
    let letter = |id: &str, reason: &str, device: &str| DeadLetter {
        id: format!("enricher/{tenant}/{id}"),
        stage: "enricher".into(),
        reason_code: reason.into(),
        error: "e".into(),
        source_topic: Some("iotp.validated".into()),
        source_partition: Some(1),
        source_offset: Some(7),
        key: Some(b"acme/d".to_vec()),
        payload: vec![0xC3, 0x01, 9],
        tenant: Some(tenant.clone()),
        device_id: Some(device.into()),
        attempts: 1,
        first_failure_at: now - 10,
        last_failure_at: now - 10,
    };
    let (a, b) = (
        letter("a", "unknown_device", "d1"),
        letter("b", "bad_seq_no", "d2"),
    );
    store.archive(&a, now + 100, now + HOUR).await.unwrap();
    store.archive(&b, now + 101, now + 2 * HOUR).await.unwrap();
    store
        .archive(&a, now + 102, now + 3 * HOUR / 2)
        .await
        .unwrap();
    let mine = LetterFilter {
        tenant: Some(tenant.clone()),
        ..LetterFilter::default()
    };
    let all = store.letters(&mine).await.unwrap();
    assert_eq!(
        all.iter().map(|x| &x.letter.id).collect::<Vec<_>>(),
        vec![&b.id, &a.id],
        "oldest parked first"
    );
    assert_eq!(all[1].letter, a, "bytes and fields intact");
    assert_eq!(
        (all[1].parked_at, all[1].expires_at),
        (now + 102, now + 3 * HOUR / 2),
        "refreshed"
    );
    let only_a = LetterFilter {
        reason: Some("unknown_device".into()),
        ..mine.clone()
    };
    assert_eq!(store.letters(&only_a).await.unwrap().len(), 1);
    store
        .mark_replayed(std::slice::from_ref(&a.id), now + 200)
        .await
        .unwrap();
    // The same call made again (a retry after a transient error) counts the replay once.
    store
        .mark_replayed(std::slice::from_ref(&a.id), now + 200)
        .await
        .unwrap();
    assert!(
        store.letters(&only_a).await.unwrap().is_empty(),
        "replayed ones hidden by default"
    );
    let with_replayed = LetterFilter {
        include_replayed: true,
        ..only_a.clone()
    };
    let replayed = store.letters(&with_replayed).await.unwrap();
    assert_eq!(
        (replayed[0].replays, replayed[0].replayed_at),
        (1, Some(now + 200))
    );
    let by_id = LetterFilter {
        ids: vec![a.id.clone()],
        include_replayed: true,
        limit: 1,
        ..LetterFilter::default()
    };
    assert_eq!(store.letters(&by_id).await.unwrap()[0].letter.id, a.id);
    // Parked again: replayable again, its replay count kept.
    store
        .archive(&a, now + 300, now + 3 * HOUR / 2)
        .await
        .unwrap();
    let back = store.letters(&only_a).await.unwrap();
    assert_eq!((back.len(), back[0].replays), (1, 1));
    assert_eq!(
        store.prune_letters(now + 8 * HOUR / 5).await.unwrap(),
        1,
        "a expired, b kept"
    );
    let left = store
        .letters(&LetterFilter {
            include_replayed: true,
            ..mine
        })
        .await
        .unwrap();
    assert_eq!(
        left.iter().map(|x| &x.letter.id).collect::<Vec<_>>(),
        vec![&b.id]
    );
}

async fn keeps_the_contract(store: &Store) {
    reading_contract(store).await;
    gaps_contract(store).await;
    twin_contract(store).await;
    offline_contract(store).await;
    rollup_contract(store).await;
    archive_contract(store).await;
}

#[tokio::test]
async fn embedded_store_keeps_the_contract() {
    let path = std::env::temp_dir().join(format!("{}.sqlite", unique("contract-")));
    let config = StoreConfig {
        path: path.clone(),
        ..StoreConfig::default()
    };
    let store = config.open().await.unwrap();
    assert!(matches!(store, Store::Embedded(_)));
    keeps_the_contract(&store).await;
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
#[ignore = "needs a MongoDB server: set MONGODB_URI (make test then runs it)"]
async fn mongodb_store_keeps_the_contract() {
    let uri = std::env::var("MONGODB_URI").expect(
        "MONGODB_URI is not set: this test needs a MongoDB replica set (roll-ups use transactions)",
    );
    let config = StoreConfig {
        mongodb_uri: Some(uri),
        mongodb_database: unique("iotp_contract_"),
        ..StoreConfig::default()
    };
    let store = config.open().await.unwrap();
    assert!(matches!(store, Store::Mongo(_)));
    keeps_the_contract(&store).await;
}
