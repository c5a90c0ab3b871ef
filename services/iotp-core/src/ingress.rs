//! The MQTT → Kafka ingress runtime. A stage maps each PUBLISH to a Kafka record; this module
//! does the rest: persistent QoS 1 session with manual acks, produce, wait for Kafka's delivery
//! report, and only then PUBACK, in receive order. The in-flight window is the MQTT 5 receive
//! maximum, so the broker (not our memory) holds what we have not taken yet. If Kafka is down,
//! records are retried with backoff and nothing is acknowledged: the broker keeps the messages.
//! A message whose record Kafka refuses for good (too large) is dead-lettered to RabbitMQ
//! instead, and acknowledged in its turn once RabbitMQ confirmed the dead letter.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use rumqttc::Outgoing;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::dead_letter::{self, DeadLetterConfig, DeadLetterPublisher};
use crate::kafka::sink::{KafkaSink, Pending};
use crate::kafka::KafkaConfig;
use crate::metrics::metrics;
use crate::mqtt::MqttConfig;
use crate::retry::{Backoff, Halt};
use crate::service::Context;
use crate::stage::{Output, StageError};

/// The logic of an ingress stage.
pub trait IngressStage: Send + 'static {
    /// Map one PUBLISH to its record (for the sink's topic). An error stops the service
    /// without acknowledging the message (the broker redelivers it): reserve it for defects,
    /// not for bad device input, which must travel on to the stage that judges it.
    fn map(&mut self, publish: &Publish, received_at: i64) -> Result<Output, StageError>;

    /// Tenant and device of a PUBLISH, if its topic says: written into its dead letter when
    /// Kafka refuses its record for good.
    fn identity(_publish: &Publish) -> Option<(String, String)> {
        None
    }
}

/// A record produced for a PUBLISH, its confirmation still to come.
struct Produced {
    receipt: u64,
    publish: Publish,
    output: Output,
    pending: Pending,
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
    dead_letter: DeadLetterConfig,
    mut stage: S,
) -> anyhow::Result<()> {
    let sink = KafkaSink::new(&kafka, &ctx.replica, topic, ctx.backoff)?;
    let dead_letters = DeadLetterPublisher::new(dead_letter)?;
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
        ctx.backoff,
    ));
    let (produced_tx, produced_rx) = mpsc::channel::<Produced>(window);
    let confirmer = tokio::spawn(confirm_in_order::<S>(
        produced_rx,
        client.clone(),
        receipts,
        sink.clone(),
        (dead_letters, ctx.backoff),
        ctx.shutdown.clone(),
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
                let output = stage.map(&publish, iotp_contract::now_millis())?;
                let pending = sink.enqueue(&output).await;
                inflight.inc();
                let produced = Produced {
                    receipt,
                    publish,
                    output,
                    pending,
                    received,
                };
                if produced_tx.send(produced).await.is_err() {
                    anyhow::bail!("confirmation task stopped");
                }
            }
            None => anyhow::bail!("mqtt event loop stopped"),
        }
    }
    tracing::info!("draining: no new messages; acknowledging what Kafka confirms");
    // Messages that arrive from now on stay unacknowledged in the session for the next start.
    drop(from_broker);
    drop(produced_tx);
    confirmer.await??;
    tracing::info!("all produced messages confirmed and acknowledged; disconnecting");
    client.disconnect().await?;
    driver.await?;
    sink.flush(Duration::from_secs(5)).await?;
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
    backoff: Backoff,
) {
    let mut reconnect = backoff.start();
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
                reconnect = backoff.start();
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
                let delay = reconnect.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "mqtt connection lost");
                health.set_ready(false);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Await delivery reports in receive order (the sink produces refused records again with the
/// backoff until Kafka takes them); then PUBACK each, in receive order. This task never blocks
/// on the MQTT client: a PUBACK that does not fit the client's request queue waits in a small
/// local queue (packet id and receipt only), because the queue drains only while the
/// event-loop driver polls, and the driver may itself be waiting for the stage loop, which
/// waits for this task. At shutdown, a record Kafka has not taken stays unacknowledged.
/// A record Kafka refuses for good is dead-lettered instead, and RabbitMQ's confirm of the
/// dead letter stands in for Kafka's.
async fn confirm_in_order<S: IngressStage>(
    mut produced: mpsc::Receiver<Produced>,
    client: AsyncClient,
    receipts: Arc<Receipts>,
    sink: KafkaSink,
    (mut dead_letters, backoff): (DeadLetterPublisher, Backoff),
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
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
            } else {
                metrics().mqtt_superseded_acks_total.inc();
            }
            acks.pop_front();
        }
        let next = if acks.is_empty() {
            produced.recv().await
        } else if open {
            tokio::select! {
                p = produced.recv() => p,
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
        let Produced {
            receipt,
            publish,
            output,
            pending,
            received,
        } = p;
        let handed_on = async {
            let Some(why) = sink.confirm(&output, pending, &shutdown).await? else {
                return Ok(());
            };
            let identity = S::identity(&publish);
            let letter = dead_letter::message_letter(
                STAGE,
                &publish.topic,
                &publish.payload,
                identity,
                &why,
            );
            dead_letters
                .deliver(&letter, false, &backoff, &shutdown)
                .await
        };
        match handed_on.await {
            Ok(()) => {}
            Err(Halt::Shutdown) => {
                tracing::info!("a record is not confirmed at shutdown; it stays unacknowledged");
                open = false;
                produced.close();
                while produced.try_recv().is_ok() {}
                continue;
            }
            Err(Halt::Failed(e)) => return Err(e),
        }
        latency.observe(received.elapsed().as_secs_f64());
        inflight.dec();
        acks.push_back((publish.pkid, receipt, publish.qos));
    }
    dead_letters.close().await;
    Ok(())
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
