//! The Kafka stage runtime against real Kafka (IOTP_TEST_KAFKA, Tansu locally) and RabbitMQ.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use iotp_core::admin::Health;
use iotp_core::consume::{self, StageIo};
use iotp_core::contract::{Codec, DeadLetter};
use iotp_core::dead_letter::DeadLetterConfig;
use iotp_core::kafka::KafkaConfig;
use iotp_core::service::Context;
use iotp_core::stage::{Input, Output, Rejection, Stage, Verdict};
use iotp_core::testkit::*;
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

/// Upper-cases payloads; rejects those starting with "bad".
struct Upper;

impl Stage for Upper {
    const NAME: &'static str = "upper";

    async fn process(&mut self, batch: &[Input<'_>]) -> anyhow::Result<Vec<Verdict>> {
        Ok(batch
            .iter()
            .map(|i| {
                if i.payload.starts_with(b"bad") {
                    Verdict::Reject(Rejection::permanent("bad_input", "payload starts with bad"))
                } else {
                    Verdict::Emit(vec![Output {
                        topic: None,
                        key: i.key.unwrap_or_default().to_vec(),
                        value: i.payload.to_ascii_uppercase(),
                    }])
                }
            })
            .collect())
    }
}

struct Fixture {
    input: String,
    output: String,
    io: StageIo,
    kafka: KafkaConfig,
}

async fn fixture(exchange: &str) -> Fixture {
    let input = unique("test.in.");
    let output = unique("test.out.");
    create_topic(&input, 3).await;
    create_topic(&output, 3).await;
    let io = StageIo {
        input_topics: vec![input.clone()],
        output_topic: output.clone(),
        group: unique("test-group-"),
        batch_max: 200,
        retry_min: Duration::from_millis(50),
        dead_letter: DeadLetterConfig {
            amqp_uri: amqp_uri(),
            exchange: exchange.to_string(),
        },
        ..StageIo::default()
    };
    let kafka = KafkaConfig {
        brokers: kafka_brokers(),
        ..KafkaConfig::default()
    };
    Fixture {
        input,
        output,
        io,
        kafka,
    }
}

fn start(
    f: &Fixture,
    replica: &str,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let shutdown = CancellationToken::new();
    let ctx = Context {
        service: "test",
        replica: replica.to_string(),
        shutdown: shutdown.clone(),
        health: Health::default(),
    };
    let task = tokio::spawn(consume::run(ctx, f.kafka.clone(), f.io.clone(), Upper));
    (shutdown, task)
}

fn records(n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let body = if i % 100 == 7 {
                format!("bad-{i}")
            } else {
                format!("ok-{i}")
            };
            (format!("dev-{}", i % 17).into_bytes(), body.into_bytes())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_and_dead_letters_are_delivered_with_original_bytes() {
    let amqp = iotp_core::amqp::connect(&amqp_uri()).await.unwrap();
    let channel = amqp.create_channel().await.unwrap();
    let (exchange, queue) = (unique("test.dlx."), unique("test.dlq."));
    declare_exchange_and_queue(&channel, &exchange, &queue).await;
    let f = fixture(&exchange).await;
    let sent = records(2000);
    produce(&f.input, &sent).await;

    let (shutdown, task) = start(&f, "upper-0");
    let out = read_topic(&f.output, Duration::from_secs(60), |r| r.len() >= 1980).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();

    assert_eq!(out.len(), 1980);
    let mut values: Vec<String> = out
        .iter()
        .map(|m| String::from_utf8(m.payload().unwrap().to_vec()).unwrap())
        .collect();
    values.sort();
    values.dedup();
    assert_eq!(values.len(), 1980, "no duplicates in a clean run");
    assert!(values.iter().all(|v| v.starts_with("OK-")));

    let letters = drain_queue(&channel, &queue).await;
    assert_eq!(letters.len(), 20);
    let codec = Codec::<DeadLetter>::latest().unwrap();
    for bytes in letters {
        let letter = codec.decode(&bytes).unwrap();
        assert_eq!(letter.reason_code, "bad_input");
        assert_eq!(letter.stage, "upper");
        assert!(letter.payload.starts_with(b"bad-"), "original bytes kept");
        let offset = letter.source_offset.unwrap();
        assert_eq!(
            letter.id,
            format!(
                "upper/{}/{}/{offset}",
                f.input,
                letter.source_partition.unwrap()
            )
        );
    }
}

/// While RabbitMQ cannot take a dead letter, the batch's offsets are not stored: after a
/// restart the batch is consumed again and the dead letter arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_wait_for_the_dead_letter_confirm() {
    let amqp = iotp_core::amqp::connect(&amqp_uri()).await.unwrap();
    let channel = amqp.create_channel().await.unwrap();
    let (exchange, queue) = (unique("test.dlx."), unique("test.dlq."));
    // The exchange does not exist yet: every dead-letter publish fails.
    let f = fixture(&exchange).await;
    produce(&f.input, &records(10)).await;

    let (shutdown, task) = start(&f, "upper-0");
    let first = read_topic(&f.output, Duration::from_secs(60), |r| r.len() >= 9).await;
    assert_eq!(
        first.len(),
        9,
        "outputs produced while the dead letter is refused"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();

    declare_exchange_and_queue(&channel, &exchange, &queue).await;
    let (shutdown, task) = start(&f, "upper-0");
    let mut letters = Vec::new();
    for _ in 0..120 {
        letters.extend(drain_queue(&channel, &queue).await);
        if !letters.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let again = read_topic(&f.output, Duration::from_secs(5), |r| r.len() >= 18).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(letters.len(), 1, "the uncommitted batch was consumed again");
    // Batches that held no rejection were committed; the one with the rejection was replayed,
    // so its outputs exist twice (duplicates are for the idempotent writers downstream).
    assert!(
        again.len() > 9 && again.len() <= 18,
        "replayed outputs: {}",
        again.len() - 9
    );
}
