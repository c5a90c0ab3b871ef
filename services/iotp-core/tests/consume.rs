//! The Kafka stage runtime against real Kafka (IOTP_TEST_KAFKA, Tansu locally) and RabbitMQ.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use iotp_contract::{Codec, DeadLetter};
use iotp_core::consume::{self, StageIo};
use iotp_core::dead_letter::DeadLetterConfig;
use iotp_core::kafka::KafkaConfig;
use iotp_core::service::Context;
use iotp_core::stage::{Input, Output, Rejection, Stage, StageError, Verdict};
use iotp_core::testkit::*;
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

/// Upper-cases payloads; rejects those starting with "bad".
struct Upper;

impl Stage for Upper {
    const NAME: &'static str = "upper";

    async fn process(&mut self, batch: &[Input<'_>]) -> Result<Vec<Verdict>, StageError> {
        Ok(batch
            .iter()
            .map(|i| {
                if i.payload.starts_with(b"bad") {
                    Verdict::Reject(Rejection::permanent("bad_input", "payload starts with bad"))
                } else {
                    Verdict::Emit(vec![Output::new(
                        i.key.unwrap_or_default(),
                        i.payload.to_ascii_uppercase(),
                    )])
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
        dead_letter: DeadLetterConfig {
            amqp_uri: amqp_uri(),
            exchange: exchange.to_string(),
            ..Default::default()
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

fn context(replica: &str, shutdown: &CancellationToken) -> Context {
    test_context(replica, shutdown, Duration::from_secs(3))
}

fn start(
    f: &Fixture,
    replica: &str,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let shutdown = CancellationToken::new();
    let ctx = context(replica, &shutdown);
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

    // The dead letter is retried until the shutdown below: the backoff must not give up
    // first (3 s did, now and then, when reading the outputs back took over a second).
    let shutdown = CancellationToken::new();
    let mut ctx = context("upper-0", &shutdown);
    ctx.backoff.give_up_after = Duration::from_secs(60);
    let task = tokio::spawn(consume::run(ctx, f.kafka.clone(), f.io.clone(), Upper));
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

/// Fails every batch with `Retry` a number of times, then passes it through; or fails with
/// `Stop`. Records which offsets each call saw.
struct Flaky {
    retries_left: usize,
    stop: bool,
    calls: std::sync::Arc<std::sync::Mutex<Vec<Vec<i64>>>>,
}

impl Stage for Flaky {
    const NAME: &'static str = "flaky";

    async fn process(&mut self, batch: &[Input<'_>]) -> Result<Vec<Verdict>, StageError> {
        self.calls
            .lock()
            .unwrap()
            .push(batch.iter().map(|i| i.offset).collect());
        if self.stop {
            return Err(StageError::stop(anyhow::anyhow!("a defect")));
        }
        if self.retries_left > 0 {
            self.retries_left -= 1;
            return Err(StageError::retry(anyhow::anyhow!("store busy")));
        }
        Ok(batch
            .iter()
            .map(|i| {
                Verdict::Emit(vec![Output::new(
                    i.key.unwrap_or_default(),
                    i.payload.to_vec(),
                )])
            })
            .collect())
    }
}

/// The runtime owns retries: a `Retry` error gets the same batch again after the backoff and
/// nothing is produced or committed before it passes; a `Stop` error ends the service with
/// the error and nothing committed; `Retry` for longer than `give_up_after` ends it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_retries_a_failed_batch_and_stops_on_a_defect() {
    let f = fixture("unused").await;
    produce(&f.input, &records(1)).await;
    let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let shutdown = CancellationToken::new();
    let stage = Flaky {
        retries_left: 2,
        stop: false,
        calls: calls.clone(),
    };
    let task = tokio::spawn(consume::run(
        context("flaky-0", &shutdown),
        f.kafka.clone(),
        f.io.clone(),
        stage,
    ));
    let out = read_topic(&f.output, Duration::from_secs(60), |r| !r.is_empty()).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(out.len(), 1, "produced once, after the retries");
    let seen = calls.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "two failures, then success: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] == w[1]),
        "the same batch each time: {seen:?}"
    );

    // A defect stops the service; the batch was not committed, so a healthy stage in the
    // same group gets it again.
    let g = fixture("unused").await;
    produce(&g.input, &records(1)).await;
    let stop = Flaky {
        retries_left: 0,
        stop: true,
        calls: calls.clone(),
    };
    let shutdown = CancellationToken::new();
    let failed = consume::run(
        context("flaky-0", &shutdown),
        g.kafka.clone(),
        g.io.clone(),
        stop,
    )
    .await;
    assert!(failed.unwrap_err().to_string().contains("a defect"));
    let forever = Flaky {
        retries_left: usize::MAX,
        stop: false,
        calls: calls.clone(),
    };
    let gave_up = consume::run(
        context("flaky-0", &shutdown),
        g.kafka.clone(),
        g.io.clone(),
        forever,
    )
    .await;
    let error = gave_up.unwrap_err().to_string();
    assert!(error.contains("still failing"), "{error}");
    // Static membership: the healthy replica takes the same member id.
    let (shutdown, task) = start(&g, "flaky-0");
    let out = read_topic(&g.output, Duration::from_secs(60), |r| !r.is_empty()).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(
        out.len(),
        1,
        "the uncommitted record reached a healthy stage"
    );
}

/// Passes records through; for one starting with "huge" it emits a record over librdkafka's
/// `message.max.bytes` (1,000,000 bytes), and its first tick emits one too.
struct Inflate {
    ticked: bool,
}

impl Stage for Inflate {
    const NAME: &'static str = "inflate";

    async fn process(&mut self, batch: &[Input<'_>]) -> Result<Vec<Verdict>, StageError> {
        Ok(batch
            .iter()
            .map(|i| {
                let key = i.key.unwrap_or_default();
                let mut outputs = vec![Output::new(key, i.payload.to_vec())];
                if i.payload.starts_with(b"huge") {
                    outputs.push(Output::new(key, vec![b'h'; 1_100_000]));
                }
                Verdict::Emit(outputs)
            })
            .collect())
    }

    async fn tick(&mut self) -> Result<Vec<Output>, StageError> {
        if std::mem::replace(&mut self.ticked, true) {
            return Ok(Vec::new());
        }
        Ok(vec![Output::new(b"tick".to_vec(), vec![b't'; 1_100_000])])
    }
}

/// An output Kafka can never take does not hold the stage up: the input it was made from is
/// dead-lettered (`output_too_large`, the input's original bytes and position), the batch's
/// other outputs are produced, and the batch is committed. A tick's output is dead-lettered
/// as itself. Retrying instead would stop the stage after `give_up_after` (3 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_too_large_for_kafka_dead_letters_its_input_and_the_batch_commits() {
    let sink = dead_letter_sink().await;
    let mut f = fixture(&sink.exchange).await;
    f.io.tick_interval = Duration::from_millis(300);
    let sent: Vec<(Vec<u8>, Vec<u8>)> = (0..40)
        .map(|i| {
            let body = if i % 20 == 5 {
                format!("huge-{i}")
            } else {
                format!("ok-{i}")
            };
            (format!("dev-{}", i % 7).into_bytes(), body.into_bytes())
        })
        .collect();
    produce(&f.input, &sent).await;

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consume::run(
        context("inflate-0", &shutdown),
        f.kafka.clone(),
        f.io.clone(),
        Inflate { ticked: false },
    ));
    let out = read_topic(&f.output, Duration::from_secs(60), |r| r.len() >= 40).await;
    let mut letters = Vec::new();
    for _ in 0..60 {
        letters.extend(drain_queue(&sink.channel, &sink.queue).await);
        if letters.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    shutdown.cancel();
    task.await
        .unwrap()
        .expect("the stage did not stop over a record kafka refuses");

    let mut values: Vec<String> = out
        .iter()
        .map(|m| String::from_utf8(m.payload().unwrap().to_vec()).unwrap())
        .collect();
    values.sort();
    values.dedup();
    assert_eq!(values.len(), 40, "every input's small output produced once");

    letters.extend(drain_queue(&sink.channel, &sink.queue).await);
    let codec = Codec::<DeadLetter>::latest().unwrap();
    let letters: Vec<DeadLetter> = letters.iter().map(|b| codec.decode(b).unwrap()).collect();
    assert_eq!(letters.len(), 3, "two inputs and one tick: {letters:?}");
    let (mut from_inputs, from_tick): (Vec<&DeadLetter>, Vec<&DeadLetter>) =
        letters.iter().partition(|l| l.source_topic.is_some());
    from_inputs.sort_by_key(|l| l.payload.clone());
    let payloads: Vec<&[u8]> = from_inputs.iter().map(|l| l.payload.as_slice()).collect();
    assert_eq!(
        payloads,
        vec![&b"huge-25"[..], &b"huge-5"[..]],
        "original bytes"
    );
    for l in &from_inputs {
        assert_eq!(
            (l.stage.as_str(), l.reason_code.as_str()),
            ("inflate", "output_too_large")
        );
        assert_eq!(
            l.id,
            format!(
                "inflate/{}/{}/{}",
                f.input,
                l.source_partition.unwrap(),
                l.source_offset.unwrap()
            )
        );
        assert!(l.error.contains("bytes"), "{}", l.error);
        assert!(!l.error.contains("hhhh"), "no payload in the error");
    }
    let tick = from_tick[0];
    assert_eq!(tick.reason_code, "output_too_large");
    assert!(tick.id.starts_with("inflate/output/"), "{}", tick.id);
    assert_eq!(tick.key.as_deref(), Some(&b"tick"[..]));
    assert_eq!(tick.payload.len(), 1_100_000);

    let lag = iotp_core::kafka::consumer_lag(&f.kafka, &f.io.group, &f.input)
        .await
        .unwrap();
    assert_eq!(
        lag, 0,
        "the batches with the refused outputs were committed"
    );
}

/// The trace context travels with the data, whether or not spans are exported: each output
/// carries its input's `traceparent` header, each dead letter the same as an AMQP header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_and_dead_letters_carry_their_inputs_traceparent() {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    use lapin::types::{AMQPValue, ShortString};
    use rdkafka::message::{Header, Headers, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let amqp = iotp_core::amqp::connect(&amqp_uri()).await.unwrap();
    let channel = amqp.create_channel().await.unwrap();
    let (exchange, queue) = (unique("test.dlx."), unique("test.dlq."));
    declare_exchange_and_queue(&channel, &exchange, &queue).await;
    let f = fixture(&exchange).await;
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .unwrap();
    // Every third record has no trace context; "bad-…" ones are rejected.
    let mut sent = std::collections::HashMap::new();
    for i in 0..30 {
        let body = if i % 10 == 4 {
            format!("bad-{i}")
        } else {
            format!("ok-{i}")
        };
        let traceparent = (i % 3 != 0).then(iotp_core::trace::start);
        let mut record = FutureRecord::to(&f.input).key("k").payload(&body);
        if let Some(t) = &traceparent {
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: "traceparent",
                value: Some(t.as_str()),
            }));
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        sent.insert(body.to_ascii_uppercase(), traceparent.clone());
        sent.insert(body, traceparent);
    }

    let (shutdown, task) = start(&f, "upper-trace");
    let out = read_topic(&f.output, Duration::from_secs(60), |r| r.len() >= 27).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(out.len(), 27);
    let mut traced = 0;
    for m in &out {
        let body = String::from_utf8(m.payload().unwrap().to_vec()).unwrap();
        let header = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == "traceparent")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8(v.to_vec()).unwrap())
        });
        assert_eq!(&header, &sent[&body], "{body}");
        traced += usize::from(header.is_some());
    }
    assert_eq!(traced, 18, "the 18 outputs whose inputs had one");

    let mut letters = 0;
    let codec = Codec::<DeadLetter>::latest().unwrap();
    while let Some(msg) = channel
        .basic_get(queue.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
    {
        msg.delivery.ack(BasicAckOptions::default()).await.unwrap();
        let letter = codec.decode(&msg.delivery.data).unwrap();
        let body = String::from_utf8(letter.payload).unwrap();
        let header = msg
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(&ShortString::from("traceparent")).cloned())
            .map(|v| match v {
                AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).unwrap(),
                other => panic!("traceparent as {other:?}"),
            });
        assert_eq!(&header, &sent[&body], "{body}");
        letters += 1;
    }
    assert_eq!(letters, 3);
}

/// With bundles on (`kafka.bundle_max_bytes`), a stage reads bundled input and writes bundled
/// output: every record arrives once, in bundles far fewer than the records, each on the
/// partition librdkafka gives its key unbundled; headers travel inside the bundle; a rejected
/// item's dead letter names its item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundled_records_go_through_a_stage_one_by_one() {
    use iotp_core::kafka::KafkaSink;
    use iotp_core::retry::Backoff;
    use rdkafka::message::Headers;
    use std::collections::{BTreeSet, HashMap};

    let amqp = iotp_core::amqp::connect(&amqp_uri()).await.unwrap();
    let channel = amqp.create_channel().await.unwrap();
    let (exchange, queue) = (unique("test.dlx."), unique("test.dlq."));
    declare_exchange_and_queue(&channel, &exchange, &queue).await;
    let mut f = fixture(&exchange).await;
    f.kafka.bundle_max_bytes = 65_536;

    // Where librdkafka puts each key unbundled, on a topic with as many partitions.
    let control = unique("test.control.");
    create_topic(&control, 3).await;
    let keys: Vec<Vec<u8>> = (0..17).map(|d| format!("dev-{d}").into_bytes()).collect();
    produce(
        &control,
        &keys
            .iter()
            .map(|k| (k.clone(), b"x".to_vec()))
            .collect::<Vec<_>>(),
    )
    .await;
    let partition_of: HashMap<Vec<u8>, i32> =
        read_topic_raw(&control, Duration::from_secs(30), |r| r.len() >= 17)
            .await
            .iter()
            .map(|m| (m.key().unwrap().to_vec(), m.partition()))
            .collect();
    assert_eq!(partition_of.len(), 17);

    // The input, bundled by a sink: every third record traced.
    let inputs: Vec<Output> = records(2000)
        .into_iter()
        .enumerate()
        .map(|(i, (k, v))| {
            let mut out = Output::new(k, v);
            if i % 3 == 0 {
                out.headers
                    .push(("traceparent", iotp_core::trace::start().into_bytes()));
            }
            out
        })
        .collect();
    let sink =
        KafkaSink::new(&f.kafka, "bundle-test", f.input.clone(), Backoff::default()).unwrap();
    let refs: Vec<&Output> = inputs.iter().collect();
    let refused = sink
        .send_all(&refs, &CancellationToken::new())
        .await
        .unwrap();
    assert!(refused.is_empty());
    let carried = |records: &[rdkafka::message::OwnedMessage]| -> usize {
        records
            .iter()
            .map(|m| iotp_contract::bundle::count(m.payload().unwrap()).unwrap())
            .sum()
    };
    let input_records =
        read_topic_raw(&f.input, Duration::from_secs(30), |r| carried(r) >= 2000).await;
    assert_eq!(carried(&input_records), 2000);
    assert!(
        input_records.len() < 100,
        "2,000 records in {} Kafka records",
        input_records.len()
    );

    let (shutdown, task) = start(&f, "upper-bundles");
    let out = read_topic(&f.output, Duration::from_secs(60), |r| r.len() >= 1980).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();

    // Every output once, with its input's trace context.
    let traced: HashMap<String, Option<Vec<u8>>> = inputs
        .iter()
        .map(|o| {
            let header = o.headers.first().map(|(_, v)| v.clone());
            (
                String::from_utf8(o.value.to_ascii_uppercase()).unwrap(),
                header,
            )
        })
        .collect();
    let mut values = BTreeSet::new();
    for m in &out {
        let body = String::from_utf8(m.payload().unwrap().to_vec()).unwrap();
        assert!(body.starts_with("OK-"), "{body}");
        let header = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == "traceparent")
                .and_then(|h| h.value.map(<[u8]>::to_vec))
        });
        assert_eq!(header, traced[&body], "{body}");
        values.insert(body);
    }
    assert_eq!((out.len(), values.len()), (1980, 1980));

    // Bundled on the way out, each item on its key's partition.
    let output_records =
        read_topic_raw(&f.output, Duration::from_secs(30), |r| carried(r) >= 1980).await;
    assert_eq!(carried(&output_records), 1980);
    assert!(output_records.len() < 200, "{}", output_records.len());
    for record in &output_records {
        let items = iotp_contract::bundle::items(record.payload().unwrap()).unwrap();
        for item in items {
            assert_eq!(record.partition(), partition_of[item.key], "{:?}", item.key);
        }
    }

    // The rejected items: one dead letter each, named by bundle offset and item.
    let letters = drain_queue(&channel, &queue).await;
    assert_eq!(letters.len(), 20);
    let codec = Codec::<DeadLetter>::latest().unwrap();
    let mut ids = BTreeSet::new();
    for bytes in letters {
        let letter = codec.decode(&bytes).unwrap();
        assert!(letter.payload.starts_with(b"bad-"), "original bytes kept");
        let prefix = format!(
            "upper/{}/{}/{}#",
            f.input,
            letter.source_partition.unwrap(),
            letter.source_offset.unwrap()
        );
        assert!(letter.id.starts_with(&prefix), "{} / {prefix}", letter.id);
        ids.insert(letter.id);
    }
    assert_eq!(ids.len(), 20, "ids are distinct");
}
