//! The MQTT → Kafka ingress runtime. A stage maps each PUBLISH to a Kafka record; this module
//! does the rest: a persistent QoS 1 session in the shared group with manual acks, produce,
//! wait for Kafka's delivery report, and only then PUBACK, in receive order ([`session`]).
//!
//! Replicas come and go without stranding messages. Mosquitto keeps queueing a shared
//! subscription's share for a member whose connection is gone, in its persistent session, so:
//! - a replica that stops while another is online leaves the group: it unsubscribes, drains
//!   what the broker had queued for it and ends its session; if none is online (the only
//!   replica restarting) it keeps its session, so the fleet's messages queue there meanwhile;
//! - a replica that vanished (crash, node loss, or a stop that kept its session and never came
//!   back) is an orphan after `orphan_after`: the broker publishes its will, and the surviving
//!   replica with the lowest id takes the session over by its client id, drains it through the
//!   same path, and ends it ([`presence`] tells who is who).

mod presence;
mod session;

use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Publish;
use tokio_util::sync::CancellationToken;

use crate::dead_letter::DeadLetterConfig;
use crate::kafka::sink::KafkaSink;
use crate::kafka::KafkaConfig;
use crate::metrics::metrics;
use crate::mqtt::{MqttConfig, AWAY, LEAVING};
use crate::service::Context;
use crate::stage::{Output, StageError};
use presence::Presence;
use session::{Drained, Role, Session};

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

const STAGE: &str = "mqtt-bridge";

/// Run the ingress until shutdown, then leave the group (or keep the session, if no other
/// replica is online) and flush the producer. `new_stage` makes the stage for this replica's
/// session and for each orphaned session it drains.
pub async fn run<S, F>(
    ctx: Context,
    mqtt: MqttConfig,
    kafka: KafkaConfig,
    topic: String,
    dead_letter: DeadLetterConfig,
    new_stage: F,
) -> anyhow::Result<()>
where
    S: IngressStage,
    F: Fn() -> anyhow::Result<S> + Send + Sync + 'static,
{
    let sink = KafkaSink::new(&kafka, &ctx.replica, topic.clone(), ctx.backoff)?;
    let me = mqtt.client_id(&ctx.replica).to_string();
    let presence = Presence::start(&mqtt, &me, ctx.backoff)?;
    let mut stage = new_stage()?;
    let own = Role::Own {
        presence: presence.clone(),
        health: ctx.health.clone(),
    };
    let mut session = Session::open::<S>(
        &mqtt,
        &me,
        own,
        (&sink, &topic, &dead_letter),
        ctx.backoff,
        ctx.shutdown.clone(),
    )?;
    let janitor_stop = CancellationToken::new();
    let janitor = tokio::spawn(take_over_orphans(Janitor {
        mqtt: mqtt.clone(),
        presence: presence.clone(),
        sink: sink.clone(),
        topic,
        dead_letter,
        new_stage: Arc::new(new_stage),
        ctx: ctx.clone(),
        stop: janitor_stop.clone(),
    }));

    if !session
        .pump(&mut stage, &sink, ctx.shutdown.cancelled())
        .await?
    {
        anyhow::bail!("mqtt event loop stopped");
    }

    // A drain of another replica's session in progress is abandoned: the socket closes
    // without a DISCONNECT, so the broker announces that session orphaned again.
    janitor_stop.cancel();
    let _ = janitor.await;
    presence.announce(LEAVING).await;
    let outcome = if presence.others_online() {
        tracing::info!("leaving the shared group: draining this replica's session");
        let drained = session.leave(&mut stage, &sink).await?;
        tracing::info!(?drained, "left the shared group");
        if matches!(drained, Drained::Ended | Drained::NoSession) {
            presence.clear(&me).await;
            "left"
        } else {
            presence.announce(AWAY).await;
            "kept"
        }
    } else {
        tracing::info!(
            "no other replica online: keeping this replica's session; acknowledging what Kafka confirms"
        );
        session.close().await?;
        presence.announce(AWAY).await;
        "kept"
    };
    metrics()
        .mqtt_sessions_ended_total
        .with_label_values(&[outcome])
        .inc();
    presence.close().await;
    sink.flush(Duration::from_secs(5)).await?;
    tracing::info!("ingress stopped");
    Ok(())
}

struct Janitor<F> {
    mqtt: MqttConfig,
    presence: Presence,
    sink: KafkaSink,
    topic: String,
    dead_letter: DeadLetterConfig,
    new_stage: Arc<F>,
    ctx: Context,
    stop: CancellationToken,
}

/// Look for orphaned sessions every quarter of `orphan_after` and drain them, one at a time.
async fn take_over_orphans<S, F>(j: Janitor<F>)
where
    S: IngressStage,
    F: Fn() -> anyhow::Result<S> + Send + Sync + 'static,
{
    let every = (j.mqtt.orphan_after / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = j.stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        for orphan in j.presence.orphans(j.mqtt.orphan_after) {
            let drained = tokio::select! {
                _ = j.stop.cancelled() => return,
                drained = drain_orphan(&j, &orphan) => drained,
            };
            match drained {
                Ok(d @ (Drained::Ended | Drained::NoSession)) => {
                    tracing::info!(orphan, drained = ?d, "orphaned session drained and ended");
                    metrics()
                        .mqtt_sessions_ended_total
                        .with_label_values(&["taken_over"])
                        .inc();
                    j.presence.clear(&orphan).await;
                }
                Ok(Drained::Kept) => j.presence.announce_for(&orphan, AWAY).await,
                Ok(Drained::Interrupted) => {
                    tracing::info!(orphan, "drain interrupted (its owner may be back)")
                }
                Err(e) => {
                    tracing::warn!(
                        orphan,
                        error = format!("{e:#}"),
                        "cannot drain orphaned session"
                    )
                }
            }
        }
    }
}

async fn drain_orphan<S, F>(j: &Janitor<F>, orphan: &str) -> anyhow::Result<Drained>
where
    S: IngressStage,
    F: Fn() -> anyhow::Result<S> + Send + Sync + 'static,
{
    tracing::info!(orphan, "taking over an orphaned session to drain it");
    let mut stage = (j.new_stage)()?;
    let session = Session::open::<S>(
        &j.mqtt,
        orphan,
        Role::Orphan,
        (&j.sink, &j.topic, &j.dead_letter),
        j.ctx.backoff,
        j.ctx.shutdown.clone(),
    )?;
    session.leave(&mut stage, &j.sink).await
}
