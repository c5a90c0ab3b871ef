//! One contract, every backend: the embedded store always, MongoDB where `MONGODB_URI` is set
//! (`make test` runs it then; without it cargo lists it as ignored, with the reason).
#![allow(clippy::unwrap_used)]

use iotp_core::store::mongo::MongoStore;
use iotp_core::store::sqlite::SqliteStore;
use iotp_core::store::{MessageRecord, ReadingStore, Retention, WriteReport};
use iotp_core::testkit::unique;

fn message(tenant: &str, device: &str, seq_no: i64) -> MessageRecord {
    MessageRecord {
        tenant: tenant.into(),
        device_id: device.into(),
        seq_no,
        msg_id: format!("{device}-{seq_no}"),
        produced_at: iotp_core::now_millis() - 60_000 + seq_no,
        received_at: iotp_core::now_millis(),
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
        store.write_messages(&first).await.unwrap(),
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
        store.write_messages(&again).await.unwrap(),
        WriteReport {
            stored: 2,
            duplicates: 2
        },
        "redelivery"
    );
    assert_eq!(
        store.write_messages(&again).await.unwrap(),
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
    assert_eq!(
        store
            .update_seq_gaps(&[(tenant.clone(), "d1".into())])
            .await
            .unwrap(),
        1,
        "seq 4 never arrived"
    );
    assert_eq!(
        store.write_messages(&[]).await.unwrap(),
        WriteReport::default()
    );
}

#[tokio::test]
async fn embedded_store_keeps_the_contract() {
    let path = std::env::temp_dir().join(format!("{}.sqlite", unique("contract-")));
    reading_contract(&SqliteStore::create(&path).unwrap()).await;
}

#[tokio::test]
#[ignore = "needs a MongoDB server: set MONGODB_URI (make test then runs it)"]
async fn mongodb_store_keeps_the_contract() {
    let uri = std::env::var("MONGODB_URI")
        .expect("MONGODB_URI is not set: this test needs a MongoDB server");
    let store = MongoStore::connect(&uri, &unique("iotp_contract_"), Retention::default())
        .await
        .unwrap();
    reading_contract(&store).await;
}
