//! The MQTT → Kafka ingress runtime. A stage maps each PUBLISH to a Kafka record; this module
//! does the rest: persistent QoS 1 session with manual acks, produce, wait for Kafka's delivery
//! report, and only then PUBACK, in receive order. The in-flight window is the MQTT 5 receive
//! maximum, so the broker (not our memory) holds what we have not taken yet. If Kafka is down,
//! records are retried with backoff and nothing is acknowledged: the broker keeps the messages.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use rumqttc::Outgoing;
use tokio::sync::mpsc;

use crate::admin::Health;
use crate::kafka::KafkaConfig;
use crate::metrics::metrics;
use crate::mqtt::MqttConfig;
use crate::service::Context;

/// A Kafka record made from one PUBLISH.
#[derive(Debug, Clone)]
pub struct OutRecord {
    /// Partitioning key.
    pub key: String,
    /// Encoded value.
    pub value: Vec<u8>,
    /// Headers (e.g. `traceparent`).
    pub headers: Vec<(String, String)>,
}

/// The logic of an ingress stage.
pub trait IngressStage: Send + 'static {
    /// Map one PUBLISH to its record. An error stops the service without acknowledging the
    /// message (the broker redelivers it): reserve it for defects, not for bad device input,
    /// which must travel on to the stage that judges it.
    fn map(&mut self, publish: &Publish, received_at: i64) -> anyhow::Result<OutRecord>;
}

struct Pending {
    receipt: u64,
    publish: Publish,
    record: OutRecord,
    delivery: DeliveryFuture,
    received: Instant,
}

/// What the event-loop driver hands to the stage loop: a PUBLISH and its receipt number.
type FromBroker = (u64, Publish);

/// The latest receipt number per packet id. A PUBACK is sent only for the latest receipt of
/// its packet id: after a reconnect the broker resends unacknowledged messages under their old
/// ids and may then reuse an id for another message, so acknowledging an older receipt could
/// acknowledge a message Kafka has not confirmed.
#[derive(Default)]
struct Receipts {
    latest: Mutex<HashMap<u16, u64>>,
    next: AtomicU64,
}

impl Receipts {
    fn record(&self, pkid: u16) -> u64 {
        let receipt = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.latest.lock() {
            m.insert(pkid, receipt);
        }
        receipt
    }

    fn is_latest(&self, pkid: u16, receipt: u64) -> bool {
        self.latest
            .lock()
            .map(|m| m.get(&pkid) == Some(&receipt))
            .unwrap_or(false)
    }
}

const STAGE: &str = "mqtt-bridge";

/// Run the ingress until shutdown, then drain: confirm and acknowledge what was produced,
/// disconnect (the session persists), flush the producer.
pub async fn run<S: IngressStage>(
    ctx: Context,
    mqtt: MqttConfig,
    kafka: KafkaConfig,
    topic: String,
    mut stage: S,
) -> anyhow::Result<()> {
    let producer = kafka.producer(&ctx.replica)?;
    let window = usize::from(mqtt.max_in_flight);
    let (client, eventloop) = mqtt.connect(&ctx.replica)?;
    let receipts = Arc::new(Receipts::default());
    // Room for several windows: while the driver waits here it stops polling, so no PINGREQ
    // goes out and no PINGRESP is read, and the connection lapses at the next keep-alive; every
    // reconnect then resends the unacknowledged window (the MQTT 5 receive maximum) while the
    // older copies are still queued. A window's room (the first design) filled at the second
    // reconnect and made the drops repeat. Bounded all the same: under a flood the bridge
    // received far more than its PUBACKs sent plus the receive maximum (1,010,001 PUBLISHes
    // against 166,206 PUBACKs in one standard load test; not explained yet), and an unbounded
    // queue grew the bridge to 380 MiB; a full queue pushes back through TCP instead.
    let (from_broker_tx, mut from_broker) = mpsc::channel::<FromBroker>(window * 4);
    let driver = tokio::spawn(drive(
        eventloop,
        client.clone(),
        mqtt.clone(),
        receipts.clone(),
        from_broker_tx,
        ctx.health.clone(),
    ));
    let (pending_tx, pending_rx) = mpsc::channel::<Pending>(window);
    let confirmer = tokio::spawn(confirm_in_order(
        pending_rx,
        client.clone(),
        receipts,
        producer.clone(),
        topic.clone(),
        mqtt.reconnect_min,
        mqtt.reconnect_max,
    ));
    let inflight = metrics().inflight_messages.with_label_values(&[STAGE]);

    loop {
        let event = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            event = from_broker.recv() => event,
        };
        match event {
            Some((receipt, publish)) => {
                let received = Instant::now();
                let record = stage.map(&publish, crate::now_millis())?;
                let delivery = produce(&producer, &topic, &record).await;
                inflight.inc();
                let pending = Pending {
                    receipt,
                    publish,
                    record,
                    delivery,
                    received,
                };
                if pending_tx.send(pending).await.is_err() {
                    anyhow::bail!("confirmation task stopped");
                }
            }
            None => anyhow::bail!("mqtt event loop stopped"),
        }
    }
    tracing::info!("draining: no new messages; acknowledging what Kafka confirms");
    // Messages that arrive from now on stay unacknowledged in the session for the next start.
    drop(from_broker);
    drop(pending_tx);
    confirmer.await??;
    tracing::info!("all produced messages confirmed and acknowledged; disconnecting");
    client.disconnect().await?;
    driver.await?;
    let flushed =
        tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await?;
    flushed?;
    tracing::info!("ingress stopped");
    Ok(())
}

/// Poll the MQTT event loop for the life of the service. It is never cancelled mid-poll (that
/// could lose a PUBACK being written) and reconnects with backoff; the session is resumed.
async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    mqtt: MqttConfig,
    receipts: Arc<Receipts>,
    to_stage: mpsc::Sender<FromBroker>,
    health: Health,
) {
    let mut backoff = mqtt.reconnect_min;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if publish.topic.starts_with(b"$SYS/") {
                    record_broker_counter(&publish);
                    continue;
                }
                metrics().mqtt_received_messages_total.inc();
                let receipt = receipts.record(publish.pkid);
                // Closed while draining: the message stays unacknowledged in the session.
                let _ = to_stage.send((receipt, publish)).await;
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(session_present = ack.session_present, "mqtt connected");
                // Subscribed from a task: the request queue drains only while this loop polls,
                // so waiting here for room could wait forever, and `try_subscribe` on a full
                // queue (PUBACKs waiting to go out after a reconnect) lost the subscription.
                let (subscriber, filters) = (client.clone(), mqtt.subscriptions.clone());
                tokio::spawn(async move {
                    for filter in filters {
                        if let Err(e) = subscriber.subscribe(filter.clone(), QoS::AtLeastOnce).await
                        {
                            tracing::error!(error = %e, filter, "cannot subscribe");
                        }
                    }
                });
                if mqtt.watch_broker_counters {
                    for t in [
                        "$SYS/broker/publish/messages/dropped",
                        "$SYS/broker/store/messages/count",
                    ] {
                        let _ = client.try_subscribe(t, QoS::AtMostOnce);
                    }
                }
                backoff = mqtt.reconnect_min;
                // Ready means connected: set here, not behind the PUBLISHes queued for the stage.
                health.set_ready(true);
            }
            Ok(Event::Outgoing(Outgoing::PubAck(_))) => metrics().mqtt_acked_messages_total.inc(),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                if matches!(e, rumqttc::v5::ConnectionError::RequestsDone) {
                    return;
                }
                metrics()
                    .mqtt_connection_errors_total
                    .with_label_values(&[connection_error_kind(&e)])
                    .inc();
                tracing::warn!(error = %e, retry_in = ?backoff, "mqtt connection lost");
                health.set_ready(false);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(mqtt.reconnect_max);
            }
        }
    }
}

/// Await delivery reports in receive order; re-produce failed records with backoff until Kafka
/// takes them; then PUBACK each, in receive order. This task never blocks on the MQTT client:
/// a PUBACK that does not fit the client's request queue waits in a small local queue (packet
/// id and receipt only), because the queue drains only while the event-loop driver polls, and
/// the driver may itself be waiting for the stage loop, which waits for this task.
async fn confirm_in_order(
    mut pending: mpsc::Receiver<Pending>,
    client: AsyncClient,
    receipts: Arc<Receipts>,
    producer: FutureProducer,
    topic: String,
    backoff_min: Duration,
    backoff_max: Duration,
) -> anyhow::Result<()> {
    let produced = metrics()
        .kafka_produced_messages_total
        .with_label_values(&[&topic]);
    let latency = metrics().delivery_seconds.with_label_values(&[STAGE]);
    let inflight = metrics().inflight_messages.with_label_values(&[STAGE]);
    let mut acks: VecDeque<(u16, u64, QoS)> = VecDeque::new();
    let mut open = true;
    while open || !acks.is_empty() {
        while let Some(&(pkid, receipt, qos)) = acks.front() {
            // Not the latest receipt of its packet id: the broker has sent it again since, and
            // that copy is acknowledged once it is confirmed.
            if receipts.is_latest(pkid, receipt) {
                let mut stub = Publish::new("", qos, Vec::<u8>::new(), None);
                stub.pkid = pkid;
                if client.try_ack(&stub).is_err() {
                    break;
                }
            }
            acks.pop_front();
        }
        let next = if acks.is_empty() {
            pending.recv().await
        } else if open {
            tokio::select! {
                p = pending.recv() => p,
                _ = tokio::time::sleep(Duration::from_millis(2)) => continue,
            }
        } else {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        };
        let Some(p) = next else {
            open = false;
            continue;
        };
        let mut delivery = p.delivery;
        let mut backoff = backoff_min;
        loop {
            match delivery.await {
                Ok(Ok(_)) => break,
                Ok(Err((e, _))) => {
                    metrics()
                        .kafka_produce_errors_total
                        .with_label_values(&[kafka_error_kind(&e)])
                        .inc();
                    tracing::warn!(error = %e, retry_in = ?backoff, "kafka did not take the record; retrying, not acknowledging");
                }
                Err(_) => {
                    metrics()
                        .kafka_produce_errors_total
                        .with_label_values(&["canceled"])
                        .inc();
                    tracing::warn!("delivery report lost; producing again");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(backoff_max);
            delivery = produce(&producer, &topic, &p.record).await;
        }
        produced.inc();
        latency.observe(p.received.elapsed().as_secs_f64());
        inflight.dec();
        acks.push_back((p.publish.pkid, p.receipt, p.publish.qos));
    }
    Ok(())
}

/// Enqueue a record, waiting while librdkafka's queue is full.
async fn produce(producer: &FutureProducer, topic: &str, record: &OutRecord) -> DeliveryFuture {
    loop {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (k, v) in &record.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let out = FutureRecord::to(topic)
            .key(record.key.as_bytes())
            .payload(record.value.as_slice())
            .headers(headers);
        match producer.send_result(out) {
            Ok(delivery) => return delivery,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => {
                metrics()
                    .kafka_produce_errors_total
                    .with_label_values(&[kafka_error_kind(&e)])
                    .inc();
                tracing::warn!(error = %e, "cannot enqueue record; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

fn record_broker_counter(publish: &Publish) {
    let Some(value) = std::str::from_utf8(&publish.payload)
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
    else {
        return;
    };
    match publish.topic.as_ref() {
        b"$SYS/broker/publish/messages/dropped" => {
            let before = metrics().mqtt_broker_dropped_messages.get();
            if value > before {
                tracing::warn!(
                    dropped = value,
                    "mqtt broker reports dropped messages: raise its queue limits"
                );
            }
            metrics().mqtt_broker_dropped_messages.set(value);
        }
        b"$SYS/broker/store/messages/count" => metrics().mqtt_broker_stored_messages.set(value),
        _ => {}
    }
}

fn connection_error_kind(e: &rumqttc::v5::ConnectionError) -> &'static str {
    use rumqttc::v5::ConnectionError as E;
    match e {
        E::Io(_) => "io",
        E::ConnectionRefused(_) => "refused",
        E::Timeout(_) => "timeout",
        E::Tls(_) => "tls",
        _ => "other",
    }
}

fn kafka_error_kind(e: &KafkaError) -> &'static str {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageTimedOut) => "timeout",
        Some(RDKafkaErrorCode::QueueFull) => "queue_full",
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => "too_large",
        Some(_) => "broker",
        None => "client",
    }
}
