//! The one producer path against a real broker: a batch's delivery reports are counted per
//! batch, and a refused record is reported by its index in the caller's list (the unit tests
//! in `kafka/sink.rs` hold the indices of records produced again).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use iotp_core::kafka::sink::OUTPUT_TOO_LARGE;
use iotp_core::kafka::{count_records, KafkaConfig, KafkaSink};
use iotp_core::retry::Backoff;
use iotp_core::stage::Output;
use iotp_core::testkit::{create_topic, kafka_brokers, read_topic, read_topic_raw, unique};
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

fn kafka(message_timeout: Duration) -> KafkaConfig {
    KafkaConfig {
        brokers: kafka_brokers(),
        message_timeout,
        ..KafkaConfig::default()
    }
}

fn backoff() -> Backoff {
    Backoff {
        min: Duration::from_millis(200),
        max: Duration::from_millis(500),
        give_up_after: Duration::from_secs(60),
    }
}

fn values(records: &[rdkafka::message::OwnedMessage]) -> Vec<String> {
    let mut v: Vec<String> = records
        .iter()
        .map(|m| String::from_utf8(m.payload().unwrap().to_vec()).unwrap())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// 1,000 records over four partitions, two of them too large: the two come back by their
/// index, every other record is on the topic once.
#[tokio::test]
async fn a_batch_confirms_every_record_and_names_the_refused_by_index() {
    let topic = unique("sink-");
    create_topic(&topic, 4).await;
    let sink = KafkaSink::new(
        &kafka(Duration::from_secs(30)),
        "sink-test",
        &topic,
        backoff(),
    )
    .unwrap();
    let outputs: Vec<Output> = (0..1000)
        .map(|i| {
            let value = if i == 17 || i == 640 {
                vec![b'x'; 1_000_001]
            } else {
                format!("v-{i:04}").into_bytes()
            };
            Output::new(format!("k-{}", i % 13).into_bytes(), value)
        })
        .collect();
    let refs: Vec<&Output> = outputs.iter().collect();
    let refused = sink
        .send_all(&refs, &CancellationToken::new())
        .await
        .unwrap();
    let indices: Vec<usize> = refused.iter().map(|(i, _)| *i).collect();
    assert_eq!(indices, vec![17, 640]);
    assert!(refused.iter().all(|(_, w)| w.reason == OUTPUT_TOO_LARGE));

    let read = read_topic(&topic, Duration::from_secs(30), |r| r.len() >= 998).await;
    let got = values(&read);
    assert_eq!(got.len(), 998, "every small record once");
    assert!(!got.contains(&"v-0017".to_string()));
    assert!(got.contains(&"v-0018".to_string()) && got.contains(&"v-0999".to_string()));
    // Every Kafka record counted (bundles, `kafka.bundle_max_bytes`, as one each), not the last
    // batches' first ones only (the broker's ListOffsets answer on Tansu's memory engine).
    let kafka_records = read_topic_raw(&topic, Duration::from_secs(30), |r| {
        r.iter()
            .map(|m| iotp_contract::bundle::count(m.payload().unwrap()).unwrap_or(1))
            .sum::<usize>()
            >= 998
    })
    .await;
    assert!(
        kafka_records.len() < 998,
        "bundled: {}",
        kafka_records.len()
    );
    assert_eq!(
        count_records(&kafka(Duration::from_secs(30)), &topic)
            .await
            .unwrap(),
        kafka_records.len() as i64
    );
}
