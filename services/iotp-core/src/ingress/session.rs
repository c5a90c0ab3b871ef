//! One MQTT session served: each PUBLISH is mapped by the stage, produced, and acknowledged
//! only once Kafka confirmed it, in receive order. The in-flight window is the MQTT 5 receive
//! maximum, so the broker (not our memory) holds what we have not taken yet. If Kafka is down,
//! records are retried with backoff and nothing is acknowledged: the broker keeps the messages.
//! A message whose record Kafka refuses for good (too large) is dead-lettered to RabbitMQ
//! instead, and acknowledged in its turn once RabbitMQ confirmed the dead letter. Each record
//! carries the device's `traceparent` (or, with export on, a new trace); with export on, the
//! records confirmed together are one span linked to their traces.
//!
//! A session ends one of three ways: [`Session::close`] keeps it on the broker (a restart
//! resumes it), [`Session::leave`] unsubscribes, drains what the broker had queued for it and
//! ends it, and dropping it (an orphan being drained when the replica stops) closes the socket
//! without a DISCONNECT, so the broker publishes the session's will again.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use rumqttc::Outgoing;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::presence::Presence;
use super::{IngressStage, STAGE};
use crate::admin::Health;
use crate::dead_letter::{self, DeadLetterConfig, DeadLetterPublisher};
use crate::kafka::sink::{Batch, KafkaSink};
use crate::metrics::metrics;
use crate::mqtt::{MqttConfig, ONLINE};
use crate::retry::{Backoff, Halt};
use crate::stage::Output;
use crate::trace::{self, BatchSpan, Links};
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;

/// Whose session this is.
pub(super) enum Role {
    /// This replica's own: reconnects for the life of the service, subscribes the shared
    /// filters at every connect, announces itself online, drives readiness.
    Own { presence: Presence, health: Health },
    /// Another replica's, taken over to drain it: no subscriptions, and no reconnect (if the
    /// owner comes back, the broker hands the session to it and this drain gives up).
    Orphan,
}

/// The records produced for the PUBLISHes taken together, their confirmations still to come.
struct Produced {
    /// Each PUBLISH with its receipt number and its record, in receive order.
    taken: Vec<(u64, Publish, Output)>,
    batch: Batch,
    received: Instant,
}

/// What the event-loop driver hands to the stage loop: a PUBLISH and its receipt number.
type FromBroker = (u64, Publish);

/// The latest receipt number per packet id. A PUBACK is sent only for the latest receipt of
/// its packet id: after a reconnect the broker resends unacknowledged messages under their old
/// ids and may then reuse an id for another message, so acknowledging an older receipt could
/// acknowledge a message Kafka has not confirmed. Indexed by packet id (every id is used in
/// time, so a map would grow to the same 65,536 entries, hashing on every message).
struct Receipts {
    latest: Mutex<Vec<u64>>,
    next: AtomicU64,
}

impl Default for Receipts {
    fn default() -> Self {
        Self {
            latest: Mutex::new(vec![u64::MAX; usize::from(u16::MAX) + 1]),
            next: AtomicU64::new(0),
        }
    }
}

impl Receipts {
    fn record(&self, pkid: u16) -> u64 {
        let receipt = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.latest.lock() {
            m[usize::from(pkid)] = receipt;
        }
        receipt
    }

    fn is_latest(&self, pkid: u16, receipt: u64) -> bool {
        self.latest
            .lock()
            .map(|m| m[usize::from(pkid)] == receipt)
            .unwrap_or(false)
    }
}

/// What the session has received and settled (acknowledged, or superseded by a later copy),
/// to tell when a session being left is drained.
#[derive(Default)]
struct Progress {
    received: AtomicU64,
    settled: AtomicU64,
    unsubscribed: AtomicU64,
    last_received: Mutex<Option<Instant>>,
}

impl Progress {
    fn received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_received.lock() {
            *last = Some(Instant::now());
        }
    }

    fn settled(&self) -> bool {
        self.settled.load(Ordering::Relaxed) >= self.received.load(Ordering::Relaxed)
    }

    fn quiet_for(&self) -> Duration {
        self.last_received
            .lock()
            .ok()
            .and_then(|last| last.map(|t| t.elapsed()))
            .unwrap_or(Duration::MAX)
    }
}

/// How a drain ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Drained {
    /// Unsubscribed, emptied and ended on the broker.
    Ended,
    /// The broker had no session under that id.
    NoSession,
    /// The connection ended first (the owner came back, or the broker went away): the
    /// session, and whatever it still holds, stays on the broker.
    Interrupted,
    /// Something arrived after the drain looked complete: the session was kept.
    Kept,
}

/// A connected MQTT session and the tasks that serve it.
pub(super) struct Session {
    client_id: String,
    /// This replica's own session (not an orphan's).
    own: bool,
    mqtt: MqttConfig,
    client: AsyncClient,
    progress: Arc<Progress>,
    /// `Some(session_present)` once connected.
    connected: watch::Receiver<Option<bool>>,
    from_broker: mpsc::Receiver<FromBroker>,
    produced: mpsc::Sender<Produced>,
    /// The driver and the confirmer; taken by [`Session::close`].
    tasks: Option<(JoinHandle<()>, JoinHandle<anyhow::Result<()>>)>,
}

impl Session {
    /// Connect (in the background) to the session `client_id`.
    pub fn open<S: IngressStage>(
        mqtt: &MqttConfig,
        client_id: &str,
        role: Role,
        (sink, topic, dead_letter): (&KafkaSink, &str, &DeadLetterConfig),
        backoff: Backoff,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let dead_letters = DeadLetterPublisher::new(dead_letter.clone())?;
        let window = usize::from(mqtt.max_in_flight);
        let own = matches!(role, Role::Own { .. });
        let (client, eventloop) = mqtt.connect(client_id)?;
        let receipts = Arc::new(Receipts::default());
        let progress = Arc::new(Progress::default());
        let (connected_tx, connected) = watch::channel(None);
        // Room for several windows: while the driver waits here it stops polling, so no PINGREQ
        // goes out and no PINGRESP is read, and the connection lapses at the next keep-alive;
        // every reconnect then resends the unacknowledged window (the MQTT 5 receive maximum)
        // while the older copies are still queued. A window's room (the first design) filled
        // at the second reconnect and made the drops repeat. Bounded all the same: a full
        // queue pushes back through TCP.
        let (from_broker_tx, from_broker) = mpsc::channel::<FromBroker>(window * 4);
        let driver = tokio::spawn(drive(Driver {
            eventloop,
            client: client.clone(),
            mqtt: mqtt.clone(),
            role,
            receipts: receipts.clone(),
            progress: progress.clone(),
            to_stage: from_broker_tx,
            connected: connected_tx,
            backoff,
        }));
        // Batches of at most a window each; in practice the receive maximum bounds what is
        // in flight, and batches are large only when many messages arrived together.
        let (produced, produced_rx) = mpsc::channel::<Produced>(window);
        let confirmer = tokio::spawn(confirm_in_order::<S>(
            produced_rx,
            client.clone(),
            receipts,
            progress.clone(),
            (sink.clone(), topic.to_string()),
            (dead_letters, backoff),
            shutdown,
        ));
        Ok(Self {
            client_id: client_id.to_string(),
            own,
            mqtt: mqtt.clone(),
            client,
            progress,
            connected,
            from_broker,
            produced,
            tasks: Some((driver, confirmer)),
        })
    }

    /// Map and produce what the broker sends until `stop` completes. `Ok(false)` if the
    /// connection ended for good first (an orphan's owner came back). What has arrived
    /// together (up to the receive maximum) is produced and confirmed as one batch.
    pub async fn pump<S: IngressStage>(
        &mut self,
        stage: &mut S,
        sink: &KafkaSink,
        stop: impl Future<Output = ()>,
    ) -> anyhow::Result<bool> {
        let inflight = metrics().inflight_messages.with_label_values(&[STAGE]);
        let most = usize::from(self.mqtt.max_in_flight).max(1);
        tokio::pin!(stop);
        loop {
            let event = tokio::select! {
                _ = &mut stop => return Ok(true),
                event = self.from_broker.recv() => event,
            };
            let Some(first) = event else {
                return Ok(false);
            };
            let received = Instant::now();
            let now = iotp_contract::now_millis();
            let mut taken = Vec::with_capacity(most.min(self.from_broker.len() + 1));
            let mut next = Some(first);
            while let Some((receipt, publish)) = next {
                let mut output = stage.map(&publish, now)?;
                trace::for_publish(device_traceparent(&publish), &mut output);
                taken.push((receipt, publish, output));
                next = if taken.len() < most {
                    self.from_broker.try_recv().ok()
                } else {
                    None
                };
            }
            let outputs: Vec<&Output> = taken.iter().map(|(_, _, out)| out).collect();
            let batch = sink.enqueue_all(&outputs).await;
            inflight.add(taken.len() as i64);
            let produced = Produced {
                taken,
                batch,
                received,
            };
            if self.produced.send(produced).await.is_err() {
                anyhow::bail!("confirmation task stopped");
            }
        }
    }

    /// Stop taking messages, acknowledge what Kafka confirms, disconnect. The session stays
    /// on the broker with whatever it still holds.
    pub async fn close(mut self) -> anyhow::Result<()> {
        let Some((driver, confirmer)) = self.tasks.take() else {
            return Ok(());
        };
        // Messages that arrive from now on stay unacknowledged in the session.
        self.from_broker.close();
        drop(std::mem::replace(&mut self.produced, mpsc::channel(1).0));
        confirmer.await??;
        tracing::info!(
            client_id = self.client_id,
            "all produced messages confirmed and acknowledged; disconnecting"
        );
        self.client.disconnect().await?;
        driver.await?;
        Ok(())
    }

    /// Leave the shared group: unsubscribe, take everything the broker had queued for this
    /// session until it is quiet and acknowledged, disconnect, and end the session.
    pub async fn leave<S: IngressStage>(
        mut self,
        stage: &mut S,
        sink: &KafkaSink,
    ) -> anyhow::Result<Drained> {
        let mut connected = self.connected.clone();
        // An own session exists whatever its first CONNACK said; an orphan's may not.
        let Ok(session_present) = connected
            .wait_for(Option::is_some)
            .await
            .map(|c| self.own || c.unwrap_or(false))
        else {
            return Ok(Drained::Interrupted);
        };
        let filters = self.mqtt.subscriptions.clone();
        for filter in &filters {
            self.client.unsubscribe(filter.clone()).await?;
        }
        let (progress, quiet) = (self.progress.clone(), self.mqtt.drain_quiet);
        let drained = async move {
            // After the UNSUBACKs nothing new is routed to the session; what it holds keeps
            // coming as acknowledgements free the window.
            while progress.unsubscribed.load(Ordering::Relaxed) < filters.len() as u64 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            loop {
                let step = (quiet / 4).max(Duration::from_millis(20));
                tokio::time::sleep(step).await;
                if progress.settled() && progress.quiet_for() >= quiet {
                    return;
                }
            }
        };
        if !self.pump(stage, sink, drained).await? {
            return Ok(Drained::Interrupted);
        }
        let (progress, client_id, mqtt) = (
            self.progress.clone(),
            self.client_id.clone(),
            self.mqtt.clone(),
        );
        self.close().await?;
        if !progress.settled() {
            tracing::warn!(
                client_id,
                "a message arrived after the drain looked complete; keeping the session"
            );
            return Ok(Drained::Kept);
        }
        end_session(&mqtt, &client_id).await?;
        Ok(if session_present {
            Drained::Ended
        } else {
            Drained::NoSession
        })
    }
}

impl Drop for Session {
    /// Without a DISCONNECT: the broker keeps the session and publishes its will again.
    fn drop(&mut self) {
        if let Some((driver, confirmer)) = self.tasks.take() {
            driver.abort();
            confirmer.abort();
        }
    }
}

/// End the session `client_id` on the broker: a clean start with session expiry 0 discards
/// it and anything still queued for it. Only after it was drained and unsubscribed.
async fn end_session(mqtt: &MqttConfig, client_id: &str) -> anyhow::Result<()> {
    let (client, mut eventloop) = mqtt.connect_sessionless(client_id, 4)?;
    let ended = async {
        loop {
            match eventloop.poll().await? {
                Event::Incoming(Packet::ConnAck(_)) => client.disconnect().await?,
                Event::Outgoing(Outgoing::Disconnect) => return anyhow::Ok(()),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .map_err(|_| anyhow::anyhow!("ending the session {client_id} took over 10 s"))??;
    tracing::info!(client_id, "session ended");
    Ok(())
}

struct Driver {
    eventloop: EventLoop,
    client: AsyncClient,
    mqtt: MqttConfig,
    role: Role,
    receipts: Arc<Receipts>,
    progress: Arc<Progress>,
    to_stage: mpsc::Sender<FromBroker>,
    connected: watch::Sender<Option<bool>>,
    backoff: Backoff,
}

/// Poll the MQTT event loop for the life of the session. It is never cancelled mid-poll (that
/// could lose a PUBACK being written); the own session reconnects with backoff and resumes.
async fn drive(d: Driver) {
    let Driver {
        mut eventloop,
        client,
        mqtt,
        role,
        receipts,
        progress,
        to_stage,
        connected,
        backoff,
    } = d;
    let mut reconnect = backoff.start();
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if publish.topic.starts_with(b"$SYS/") {
                    record_broker_counter(&publish);
                    continue;
                }
                metrics().mqtt_received_messages_total.inc();
                progress.received();
                let receipt = receipts.record(publish.pkid);
                // Closed while draining: the message stays unacknowledged in the session.
                let _ = to_stage.send((receipt, publish)).await;
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(session_present = ack.session_present, "mqtt connected");
                connected.send_replace(Some(ack.session_present));
                reconnect = backoff.start();
                if let Role::Own { presence, health } = &role {
                    // Subscribed from a task: the request queue drains only while this loop
                    // polls, so waiting here for room could wait forever, and `try_subscribe`
                    // on a full queue (PUBACKs waiting to go out after a reconnect) lost the
                    // subscription.
                    let (subscriber, filters, presence) =
                        (client.clone(), mqtt.subscriptions.clone(), presence.clone());
                    tokio::spawn(async move {
                        for filter in filters {
                            if let Err(e) =
                                subscriber.subscribe(filter.clone(), QoS::AtLeastOnce).await
                            {
                                tracing::error!(error = %e, filter, "cannot subscribe");
                            }
                        }
                        presence.announce(ONLINE).await;
                    });
                    if mqtt.watch_broker_counters {
                        for t in [
                            "$SYS/broker/publish/messages/dropped",
                            "$SYS/broker/store/messages/count",
                        ] {
                            let _ = client.try_subscribe(t, QoS::AtMostOnce);
                        }
                    }
                    // Ready means connected: set here, not behind the PUBLISHes queued for
                    // the stage.
                    health.set_ready(true);
                }
            }
            Ok(Event::Incoming(Packet::UnsubAck(_))) => {
                progress.unsubscribed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Event::Outgoing(Outgoing::PubAck(_))) => {
                metrics().mqtt_acked_messages_total.inc();
                progress.settled.fetch_add(1, Ordering::Relaxed);
            }
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
                let Role::Own { health, .. } = &role else {
                    tracing::info!(error = %e, "drained session's connection ended; giving it up");
                    return;
                };
                let delay = reconnect.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "mqtt connection lost");
                health.set_ready(false);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Await delivery reports a batch at a time, in receive order (the sink produces refused
/// records again with the backoff until Kafka takes them); then PUBACK each, in receive
/// order. This task never blocks on the MQTT client: a PUBACK that does not fit the client's
/// request queue waits in a small local queue (packet id and receipt only), because the queue
/// drains only while the event-loop driver polls, and the driver may itself be waiting for the
/// stage loop, which waits for this task. At shutdown, a record Kafka has not taken stays unacknowledged.
/// A record Kafka refuses for good is dead-lettered instead, and RabbitMQ's confirm of the
/// dead letter stands in for Kafka's.
async fn confirm_in_order<S: IngressStage>(
    mut produced: mpsc::Receiver<Produced>,
    client: AsyncClient,
    receipts: Arc<Receipts>,
    progress: Arc<Progress>,
    (sink, topic): (KafkaSink, String),
    (mut dead_letters, backoff): (DeadLetterPublisher, Backoff),
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let latency = metrics().delivery_seconds.with_label_values(&[STAGE]);
    let inflight = metrics().inflight_messages.with_label_values(&[STAGE]);
    let mut acks: VecDeque<(u16, u64, QoS)> = VecDeque::new();
    let mut flush = Flush::default();
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
                progress.settled.fetch_add(1, Ordering::Relaxed);
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
        let Some(Produced {
            taken,
            batch,
            received,
        }) = next
        else {
            open = false;
            continue;
        };
        let handed_on = async {
            let outputs: Vec<&Output> = taken.iter().map(|(_, _, out)| out).collect();
            for (i, why) in sink.confirm_all(&outputs, batch, &shutdown).await? {
                let (_, publish, output) = &taken[i];
                flush.lettered += 1;
                let identity = S::identity(publish);
                let letter = dead_letter::message_letter(
                    STAGE,
                    &publish.topic,
                    &publish.payload,
                    identity,
                    &why,
                );
                dead_letters
                    .deliver(&letter, false, trace::header(output), &backoff, &shutdown)
                    .await?;
            }
            Ok(())
        };
        match handed_on.await {
            Ok(()) => {}
            Err(Halt::Shutdown) => {
                tracing::info!("records not confirmed at shutdown; they stay unacknowledged");
                open = false;
                produced.close();
                while produced.try_recv().is_ok() {}
                continue;
            }
            Err(Halt::Failed(e)) => return Err(e),
        }
        let waited = received.elapsed().as_secs_f64();
        for _ in 0..taken.len() {
            latency.observe(waited);
        }
        inflight.sub(taken.len() as i64);
        if trace::enabled() {
            for (_, _, output) in &taken {
                flush.add(output, received);
            }
            // A flush ends when the records waiting are all confirmed (their PUBACKs go out
            // together next), or at a window's worth.
            if produced.is_empty() || flush.links.messages() >= FLUSH_MAX {
                flush.end(&topic);
            }
        }
        acks.extend(
            taken
                .into_iter()
                .map(|(receipt, publish, _)| (publish.pkid, receipt, publish.qos)),
        );
    }
    flush.end(&topic);
    dead_letters.close().await;
    Ok(())
}

/// Most records one bridge flush span covers.
const FLUSH_MAX: usize = 1000;

/// The span of one bridge flush: the records confirmed together, from the first one's
/// receipt to the last one's confirmation, linked to their traces.
#[derive(Default)]
struct Flush {
    links: Links,
    first: Option<Instant>,
    lettered: usize,
}

impl Flush {
    fn add(&mut self, output: &Output, received: Instant) {
        self.links.add(trace::header(output));
        self.first.get_or_insert(received);
    }

    fn end(&mut self, topic: &str) {
        let Some(first) = self.first.take() else {
            self.lettered = 0;
            return;
        };
        let started = std::time::SystemTime::now().checked_sub(first.elapsed());
        let span = BatchSpan::start(
            format!("send {topic}"),
            SpanKind::Producer,
            started,
            vec![
                KeyValue::new("iotp.stage", STAGE),
                KeyValue::new("messaging.system", "kafka"),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("messaging.destination.name", topic.to_string()),
                KeyValue::new(
                    "iotp.dead_lettered",
                    std::mem::take(&mut self.lettered) as i64,
                ),
            ],
            std::mem::take(&mut self.links),
        );
        span.end(None);
    }
}

/// The device's `traceparent` (an MQTT 5 user property), if it sent one.
fn device_traceparent(publish: &Publish) -> Option<&str> {
    publish
        .properties
        .as_ref()?
        .user_properties
        .iter()
        .find(|(k, _)| k == trace::HEADER)
        .map(|(_, v)| v.as_str())
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
