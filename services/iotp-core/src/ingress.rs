//! The MQTT → Kafka ingress runtime. A stage maps each PUBLISH to a Kafka record; this module
//! does the rest: persistent QoS 1 session with manual acks, produce, wait for Kafka's delivery
//! report, and only then PUBACK, in receive order. The in-flight window is the MQTT 5 receive
//! maximum, so the broker (not our memory) holds what we have not taken yet. If Kafka is down,
//! records are retried with backoff and nothing is acknowledged: the broker keeps the messages.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use rumqttc::Outgoing;
use tokio::sync::mpsc;

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
    generation: u64,
    publish: Publish,
    record: OutRecord,
    delivery: DeliveryFuture,
    received: Instant,
}

struct Confirmed {
    generation: u64,
    publish: Publish,
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
    let (pending_tx, pending_rx) = mpsc::channel::<Pending>(usize::from(mqtt.max_in_flight));
    let (confirmed_tx, mut confirmed_rx) =
        mpsc::channel::<Confirmed>(usize::from(mqtt.max_in_flight));
    let confirmer = tokio::spawn(confirm_in_order(
        pending_rx,
        confirmed_tx,
        producer.clone(),
        topic.clone(),
        mqtt.reconnect_min,
        mqtt.reconnect_max,
    ));
    let mut pending_tx = Some(pending_tx);
    let mut session = Session::new(&mqtt, &ctx.replica)?;
    let mut backoff = mqtt.reconnect_min;
    let mut confirmations_open = true;
    let inflight = metrics().inflight_messages.with_label_values(&[STAGE]);

    let mut acks: VecDeque<Publish> = VecDeque::new();
    loop {
        // Hand PUBACKs to the client's request queue in receive order; what does not fit
        // waits for the event loop to drain the queue (it is polled below).
        while let Some(publish) = acks.front() {
            match session.client.try_ack(publish) {
                Ok(()) => {
                    acks.pop_front();
                    metrics().mqtt_acked_messages_total.inc();
                }
                Err(_) => break,
            }
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled(), if pending_tx.is_some() => {
                tracing::info!("draining: no new messages; acknowledging what Kafka confirms");
                pending_tx = None;
            }
            confirmed = confirmed_rx.recv(), if confirmations_open => match confirmed {
                Some(c) => {
                    inflight.dec();
                    // A message from a connection that is gone is not acknowledged: the broker
                    // resends it on the new one, and that copy is acknowledged once confirmed.
                    if c.generation == session.generation {
                        acks.push_back(c.publish);
                    }
                }
                None if !acks.is_empty() => {
                    // Let the event loop drain the request queue first.
                    tokio::task::yield_now().await;
                }
                None => {
                    confirmations_open = false;
                    tracing::info!("all produced messages confirmed and acknowledged; disconnecting");
                    session.client.disconnect().await?;
                }
            },
            event = session.eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if publish.topic.starts_with(b"$SYS/") {
                        record_broker_counter(&publish);
                        continue;
                    }
                    metrics().mqtt_received_messages_total.inc();
                    let Some(tx) = &pending_tx else { continue };
                    let received = Instant::now();
                    let record = stage.map(&publish, crate::now_millis())?;
                    let delivery = produce(&producer, &topic, &record).await;
                    inflight.inc();
                    let pending = Pending { generation: session.generation, publish, record, delivery, received };
                    if tx.send(pending).await.is_err() {
                        anyhow::bail!("confirmation task stopped");
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    tracing::info!(session_present = ack.session_present, generation = session.generation, "mqtt connected");
                    for filter in &mqtt.subscriptions {
                        session.client.try_subscribe(filter.clone(), QoS::AtLeastOnce)?;
                    }
                    if mqtt.watch_broker_counters {
                        for t in ["$SYS/broker/publish/messages/dropped", "$SYS/broker/store/messages/count"] {
                            session.client.try_subscribe(t, QoS::AtMostOnce)?;
                        }
                    }
                    backoff = mqtt.reconnect_min;
                    ctx.health.set_ready(pending_tx.is_some());
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) if !confirmations_open => break,
                Ok(_) => {}
                Err(e) => {
                    if !confirmations_open {
                        break;
                    }
                    ctx.health.set_ready(false);
                    metrics().mqtt_connection_errors_total.with_label_values(&[connection_error_kind(&e)]).inc();
                    tracing::warn!(error = %e, retry_in = ?backoff, "mqtt connection lost");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = ctx.shutdown.cancelled(), if pending_tx.is_some() => {}
                    }
                    backoff = (backoff * 2).min(mqtt.reconnect_max);
                    // A new client: acks queued for the old connection die with it.
                    session = Session::reconnect(session, &mqtt, &ctx.replica)?;
                    acks.clear();
                }
            },
        }
    }
    confirmer.await??;
    let flushed =
        tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await?;
    flushed?;
    tracing::info!("ingress stopped");
    Ok(())
}

struct Session {
    client: AsyncClient,
    eventloop: EventLoop,
    generation: u64,
}

impl Session {
    fn new(mqtt: &MqttConfig, replica: &str) -> anyhow::Result<Self> {
        let (client, eventloop) = mqtt.connect(replica)?;
        Ok(Self {
            client,
            eventloop,
            generation: 0,
        })
    }

    fn reconnect(old: Self, mqtt: &MqttConfig, replica: &str) -> anyhow::Result<Self> {
        let (client, eventloop) = mqtt.connect(replica)?;
        Ok(Self {
            client,
            eventloop,
            generation: old.generation + 1,
        })
    }
}

/// Await delivery reports in receive order; re-produce failed records with backoff until Kafka
/// takes them; pass each confirmed PUBLISH back for its PUBACK.
async fn confirm_in_order(
    mut pending: mpsc::Receiver<Pending>,
    confirmed: mpsc::Sender<Confirmed>,
    producer: FutureProducer,
    topic: String,
    backoff_min: Duration,
    backoff_max: Duration,
) -> anyhow::Result<()> {
    let produced = metrics()
        .kafka_produced_messages_total
        .with_label_values(&[&topic]);
    let latency = metrics().delivery_seconds.with_label_values(&[STAGE]);
    while let Some(p) = pending.recv().await {
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
        let c = Confirmed {
            generation: p.generation,
            publish: p.publish,
        };
        if confirmed.send(c).await.is_err() {
            anyhow::bail!("ingress loop stopped before acknowledging");
        }
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
