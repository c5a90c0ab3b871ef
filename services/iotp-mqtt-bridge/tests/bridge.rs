//! The bridge against real brokers: the project's Mosquitto (a fresh instance per test, from
//! dev/mosquitto.conf), Kafka at IOTP_TEST_KAFKA (Tansu locally), a real MQTT device fleet.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use iotp_contract::{Codec, DeadLetter};
use iotp_core::probe::{find_sum, sample_sum};
use iotp_core::testkit::drain_queue;
use support::*;

const DEVICES: usize = 100;
const PER_DEVICE: i64 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acked_message_reaches_kafka_in_device_order() {
    let mut s = setup("in-order", 4).await;
    s.spec
        .env
        .push(("IOTP__RAW_PARTITIONING".into(), "device".into()));
    let bridge = Bridge::start(&s.spec, "bridge-order-0");
    bridge.wait_ready();
    let sent = publish_fleet(s.mosquitto.port, &s.tenant, DEVICES, PER_DEVICE).await;
    assert_eq!(
        sent.total(),
        DEVICES * PER_DEVICE as usize,
        "broker acked every publish"
    );

    let seen = read_until_complete(&s.spec.topic, &sent, Duration::from_secs(60)).await;
    assert_none_missing(&sent, &seen);
    assert_eq!(seen.len(), sent.total(), "no duplicates without failures");

    // With `raw_partitioning = "device"`: keyed tenant/deviceId, so one device stays in one
    // partition, in publish order.
    let mut by_device: HashMap<&str, Vec<&Seen>> = HashMap::new();
    for s in &seen {
        by_device
            .entry(s.envelope.device_id.as_str())
            .or_default()
            .push(s);
    }
    for (device, mut records) in by_device {
        assert!(records
            .iter()
            .all(|r| r.key == format!("{}/{device}", s.tenant)));
        assert!(
            records.iter().all(|r| r.partition == records[0].partition),
            "{device} spans partitions"
        );
        records.sort_by_key(|r| r.offset);
        let seqs: Vec<i64> = records.iter().map(|r| r.seq_no).collect();
        assert_eq!(
            seqs,
            (0..PER_DEVICE).collect::<Vec<_>>(),
            "{device} out of order"
        );
    }
    let metrics = bridge.metrics();
    assert_eq!(
        find_sum(&metrics, "iotp_mqtt_acked_messages_total", &[]),
        Some(sent.total() as f64)
    );

    // Another Avro implementation reads the raw topic with only schemas/ and the framing.
    let sample: Vec<&Seen> = seen.iter().take(25).collect();
    let decoded = decode_with_fastavro(&s.spec.log_dir, &sample);
    assert_eq!(decoded.len(), sample.len());
    for (ours, theirs) in sample.iter().zip(&decoded) {
        assert_eq!(theirs["schema"], "raw-envelope v1");
        let record = &theirs["record"];
        assert_eq!(record["deviceId"], ours.envelope.device_id.as_str());
        assert_eq!(record["mqttTopic"], ours.envelope.mqtt_topic.as_str());
        assert_eq!(record["receivedAt"], ours.envelope.received_at);
        let payload = record["payload"]["base64"].as_str().unwrap();
        assert_eq!(payload, base64_encode(&ours.envelope.payload));
    }

    // The Kafka records themselves are bundles (`kafka.bundle_max_bytes`), which fastavro
    // unpacks with `schemas/bundle/v1.avsc`: the same items, in order.
    let bundles = iotp_core::testkit::read_topic_raw(&s.spec.topic, Duration::from_secs(30), |r| {
        !r.is_empty()
    })
    .await;
    let value = rdkafka::Message::payload(&bundles[0]).unwrap();
    let items = iotp_contract::bundle::items(value).expect("a bundle");
    let decoded = decode_values_with_fastavro(&s.spec.log_dir, &[value]);
    assert_eq!(decoded[0]["schema"], "bundle v1");
    let theirs = decoded[0]["record"]["items"].as_array().unwrap();
    assert_eq!(theirs.len(), items.len());
    for (ours, theirs) in items.iter().zip(theirs) {
        assert_eq!(
            theirs["value"]["base64"].as_str().unwrap(),
            base64_encode(ours.value)
        );
        assert_eq!(
            theirs["key"]["base64"].as_str().unwrap(),
            base64_encode(ours.key)
        );
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// By default the records carry no key, so librdkafka's sticky partitioner puts each
/// batching window on one partition (one produce request per window).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn by_default_records_are_unkeyed_and_windows_spread_over_partitions() {
    let s = setup("windows", 4).await;
    let bridge = Bridge::start(&s.spec, "bridge-windows-0");
    bridge.wait_ready();
    let sent = publish_fleet(s.mosquitto.port, &s.tenant, DEVICES, 20).await;
    let seen = read_until_complete(&s.spec.topic, &sent, Duration::from_secs(60)).await;
    assert_none_missing(&sent, &seen);
    assert_eq!(seen.len(), sent.total(), "no duplicates without failures");
    assert!(seen.iter().all(|r| r.key.is_empty()), "a keyed record");
    let partitions: std::collections::BTreeSet<i32> = seen.iter().map(|r| r.partition).collect();
    assert!(
        partitions.len() > 1,
        "{} records in one partition: {partitions:?}",
        seen.len()
    );
    // In receive order, consecutive records share their partition: a switch per window,
    // not (as when keyed by device) at most records.
    let mut by_receipt: Vec<&Seen> = seen.iter().collect();
    by_receipt.sort_by_key(|r| (r.envelope.received_at, r.partition, r.offset));
    let switches = by_receipt
        .windows(2)
        .filter(|w| w[0].partition != w[1].partition)
        .count();
    assert!(
        switches * 10 < seen.len(),
        "{switches} partition switches in {} records",
        seen.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bridge_killed_mid_stream_loses_nothing() {
    let s = setup("sigkill", 4).await;
    let mut bridge = Bridge::start(&s.spec, "bridge-kill-0");
    bridge.wait_ready();
    let port = s.mosquitto.port;
    let tenant = s.tenant.clone();
    let fleet =
        tokio::spawn(async move { publish_fleet(port, &tenant, DEVICES, PER_DEVICE).await });
    // Kill it while messages are flowing.
    let mut acked_before_kill = 0.0;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        acked_before_kill = sample_sum(&bridge.metrics(), "iotp_mqtt_acked_messages_total", &[]);
        if acked_before_kill >= 2000.0 {
            break;
        }
    }
    bridge.kill();
    assert!(
        acked_before_kill > 0.0 && acked_before_kill < (DEVICES as f64 * PER_DEVICE as f64),
        "killed mid-stream ({acked_before_kill})"
    );
    let restarted = Bridge::start(&s.spec, "bridge-kill-0");
    let sent = fleet.await.unwrap();
    assert_eq!(sent.total(), DEVICES * PER_DEVICE as usize);
    let seen = read_until_complete(&s.spec.topic, &sent, Duration::from_secs(90)).await;
    assert_none_missing(&sent, &seen);
    eprintln!(
        "sigkill: {} acked by devices, {} records in kafka ({} duplicates)",
        sent.total(),
        seen.len(),
        seen.len() - sent.total()
    );
    drop(restarted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_the_load() {
    let s = setup("two-replicas", 4).await;
    let a = Bridge::start(&s.spec, "bridge-share-0");
    let b = Bridge::start(&s.spec, "bridge-share-1");
    a.wait_ready();
    b.wait_ready();
    let sent = publish_fleet(s.mosquitto.port, &s.tenant, DEVICES, PER_DEVICE).await;
    let seen = read_until_complete(&s.spec.topic, &sent, Duration::from_secs(60)).await;
    assert_none_missing(&sent, &seen);
    let mut share: HashMap<&str, usize> = HashMap::new();
    for r in &seen {
        *share.entry(r.envelope.bridge_id.as_str()).or_default() += 1;
    }
    eprintln!("share: {share:?}");
    for replica in ["bridge-share-0", "bridge-share-1"] {
        let n = share.get(replica).copied().unwrap_or(0);
        assert!(
            n >= sent.total() / 10,
            "{replica} got {n} of {}",
            sent.total()
        );
    }
}

/// Mosquitto's default (1000 queued per client) would drop most of this backlog; the
/// project's config keeps it, across a broker restart, until the bridge comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backlog_while_bridge_is_away_survives_broker_restart() {
    let mut s = setup("backlog", 4).await;
    let mut bridge = Bridge::start(&s.spec, "bridge-backlog-0");
    bridge.wait_ready();
    assert_eq!(bridge.status("/healthz"), 200);
    assert_eq!(bridge.terminate(), 0, "SIGTERM drains and exits 0");

    // 30,000 messages while no bridge is connected: queued in its persistent session.
    let sent = publish_fleet(s.mosquitto.port, &s.tenant, 30, 1000).await;
    assert_eq!(sent.total(), 30_000);
    s.mosquitto.restart();

    let bridge = Bridge::start(&s.spec, "bridge-backlog-0");
    let seen = read_until_complete(&s.spec.topic, &sent, Duration::from_secs(120)).await;
    assert_none_missing(&sent, &seen);
    let metrics = bridge.metrics();
    assert_eq!(
        find_sum(&metrics, "iotp_mqtt_broker_dropped_messages", &[]),
        Some(0.0),
        "broker dropped messages"
    );
}

/// With Kafka down nothing is confirmed, so nothing is acknowledged and every reconnect brings
/// the unacknowledged window again. The connection must stay up all the same: the bridge keeps
/// answering the broker (keep-alive) however long Kafka takes. (It used to stop polling the
/// connection once its queues held two windows, and the broker dropped it at each keep-alive.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_stays_up_while_kafka_is_down() {
    let mut s = setup("kafka-down", 1).await;
    let kafka_port = free_port();
    s.spec.kafka = format!("127.0.0.1:{kafka_port}");
    s.spec.env = vec![
        ("IOTP__MQTT__KEEP_ALIVE".into(), "5s".into()),
        ("IOTP__MQTT__MAX_IN_FLIGHT".into(), "20".into()),
    ];
    let bridge = Bridge::start(&s.spec, "bridge-kafka-down-0");
    bridge.wait_ready();
    let sent = publish_fleet(s.mosquitto.port, &s.tenant, 10, 20).await;
    assert_eq!(sent.total(), 200);
    let errors = |b: &Bridge| sample_sum(&b.metrics(), "iotp_mqtt_connection_errors_total", &[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received = |b: &Bridge| sample_sum(&b.metrics(), "iotp_mqtt_received_messages_total", &[]);
    assert_eq!(
        received(&bridge),
        20.0,
        "nothing acknowledged: the broker sends one receive maximum (max_in_flight), no more"
    );
    // Two broker restarts: the window comes three times (60 unconfirmed messages).
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = errors(&bridge);
        s.mosquitto.restart();
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while errors(&bridge) == before || bridge.status("/readyz") != 200 {
            assert!(
                std::time::Instant::now() < until,
                "bridge did not reconnect: {} connection errors (before {before}), /readyz {}",
                errors(&bridge),
                bridge.status("/readyz")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let after_restarts = errors(&bridge);
    // Three keep-alive periods with Kafka still down: the broker drops a silent client after
    // 1.5 of them.
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(
        errors(&bridge),
        after_restarts,
        "the connection dropped while Kafka was down"
    );
    open_kafka_at(kafka_port).await;
    let seen = read_until_complete(&s.spec.topic, &sent, Duration::from_secs(90)).await;
    assert_none_missing(&sent, &seen);
    assert_eq!(
        errors(&bridge),
        after_restarts,
        "no reconnect once Kafka was back"
    );
}

/// One device publishes `payloads` in order on its telemetry topic (QoS 1); returns how many
/// the broker acknowledged.
async fn publish_in_order(port: u16, tenant: &str, device: &str, payloads: Vec<Vec<u8>>) -> usize {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut opts = MqttOptions::new(format!("{tenant}-{device}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(Some(2 * 1024 * 1024));
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let topic = format!("iot/{tenant}/{device}/telemetry");
    let total = payloads.len();
    let publisher = tokio::spawn(async move {
        for payload in payloads {
            client
                .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    while acked < total {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("device {device}: {e}"),
            Err(_) => break,
        }
    }
    let client = publisher.await.unwrap();
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    acked
}

/// A PUBLISH of about 1 MB is under Mosquitto's max_packet_size (1 MiB) and over librdkafka's
/// message.max.bytes (1,000,000) once in its envelope: Kafka will never take it. It becomes a
/// dead letter (stage mqtt-bridge, output_too_large, its payload and topic) confirmed by
/// RabbitMQ, and is acknowledged in its turn, so the messages after it flow on, in order, and
/// a restarted bridge gets nothing again from its session. (Before, it was retried until
/// give_up_after, stopped the bridge, and came back first after every restart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_publish_is_dead_lettered_and_acknowledged() {
    let mut s = setup("oversized", 1).await;
    let letters = iotp_core::testkit::dead_letter_sink().await;
    s.spec.env = vec![
        (
            "IOTP__DEAD_LETTER__AMQP_URI".into(),
            iotp_core::testkit::amqp_uri(),
        ),
        (
            "IOTP__DEAD_LETTER__EXCHANGE".into(),
            letters.exchange.clone(),
        ),
        // Retrying the refused record would stop the bridge within this.
        ("IOTP__COMMON__BACKOFF__GIVE_UP_AFTER".into(), "5s".into()),
    ];
    let mut bridge = Bridge::start(&s.spec, "bridge-oversized-0");
    bridge.wait_ready();

    let device = "dev-0000";
    let normal = |seq: i64| format!("{{\"deviceId\":\"{device}\",\"seqNo\":{seq}}}").into_bytes();
    let mut big = format!("{{\"deviceId\":\"{device}\",\"seqNo\":10,\"pad\":\"").into_bytes();
    big.resize(1_000_000 - 2, b'p');
    big.extend_from_slice(b"\"}");
    let mut payloads: Vec<Vec<u8>> = (0..10).map(normal).collect();
    payloads.push(big.clone());
    payloads.extend((11..21).map(normal));
    let acked = publish_in_order(s.mosquitto.port, &s.tenant, device, payloads).await;
    assert_eq!(acked, 21, "the broker took every publish");

    let mut sent = SentLog::default();
    sent.acked
        .insert(device.to_string(), (0..10).chain(11..21).collect());
    let seen = read_until_complete(&s.spec.topic, &sent, Duration::from_secs(60)).await;
    assert_none_missing(&sent, &seen);
    let mut seen: Vec<&Seen> = seen.iter().collect();
    seen.sort_by_key(|r| r.offset);
    let seqs: Vec<i64> = seen.iter().map(|r| r.seq_no).collect();
    assert_eq!(
        seqs,
        (0..10).chain(11..21).collect::<Vec<_>>(),
        "the others in order, the oversized one not in kafka"
    );

    let codec = Codec::<DeadLetter>::latest().unwrap();
    let mut dead = Vec::new();
    for _ in 0..120 {
        dead.extend(drain_queue(&letters.channel, &letters.queue).await);
        if !dead.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(dead.len(), 1, "one dead letter");
    let letter = codec.decode(&dead[0]).unwrap();
    assert_eq!(letter.stage, "mqtt-bridge");
    assert_eq!(letter.reason_code, "output_too_large");
    assert_eq!(letter.payload, big, "the PUBLISH payload, as sent");
    let topic = format!("iot/{}/{device}/telemetry", s.tenant);
    assert_eq!(letter.key.as_deref(), Some(topic.as_bytes()));
    assert_eq!(
        (letter.tenant.as_deref(), letter.device_id.as_deref()),
        (Some(s.tenant.as_str()), Some(device))
    );
    assert_eq!(
        (
            letter.source_topic,
            letter.source_partition,
            letter.source_offset
        ),
        (None, None, None)
    );
    assert!(letter.id.starts_with("mqtt-bridge/"), "{}", letter.id);
    assert!(
        !letter.error.contains("pppp"),
        "no payload in the error text"
    );

    // Every PUBLISH acknowledged, the oversized one included.
    let until = std::time::Instant::now() + Duration::from_secs(30);
    let acked = |b: &Bridge| sample_sum(&b.metrics(), "iotp_mqtt_acked_messages_total", &[]);
    while acked(&bridge) < 21.0 {
        assert!(
            std::time::Instant::now() < until,
            "the bridge acknowledged {} of 21",
            acked(&bridge)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        find_sum(
            &bridge.metrics(),
            "iotp_dead_letters_total",
            &["stage=\"mqtt-bridge\"", "reason=\"output_too_large\""]
        ),
        Some(1.0)
    );
    assert_eq!(bridge.terminate(), 0, "SIGTERM drains and exits 0");

    // The same client id again: its session holds nothing.
    let bridge = Bridge::start(&s.spec, "bridge-oversized-0");
    bridge.wait_ready();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let received = sample_sum(&bridge.metrics(), "iotp_mqtt_received_messages_total", &[]);
    assert_eq!(received, 0.0, "the session handed messages over again");
    assert!(
        drain_queue(&letters.channel, &letters.queue)
            .await
            .is_empty(),
        "no second dead letter"
    );
}

/// `mqtt.identity = "acl"`: every record carries the device the topic names as its
/// authenticated identity (`tenant/deviceId`), for the parser to check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_identity_is_recorded_on_every_envelope() {
    let mut s = setup("acl-identity", 2).await;
    s.spec
        .env
        .push(("IOTP__MQTT__IDENTITY".into(), "acl".into()));
    let bridge = Bridge::start(&s.spec, "bridge-acl-0");
    bridge.wait_ready();
    let sent = publish_fleet(s.mosquitto.port, &s.tenant, 5, 10).await;
    let seen = read_until_complete(&s.spec.topic, &sent, Duration::from_secs(60)).await;
    assert_none_missing(&sent, &seen);
    for r in &seen {
        let expected = format!("{}/{}", r.envelope.tenant, r.envelope.device_id);
        assert_eq!(
            r.envelope.client_identity.as_deref(),
            Some(expected.as_str())
        );
    }
}
