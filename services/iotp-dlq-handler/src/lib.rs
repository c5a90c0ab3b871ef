//! The DLQ handler. Stages publish dead letters to RabbitMQ; this service
//! - retries transient ones with growing delays (delay queues whose TTL dead-letters them back
//!   to the incoming queue), replaying the original record onto its Kafka topic when a delay
//!   ends;
//! - parks permanent ones, and those out of attempts, on the parking queue, and archives every
//!   parked one in the store with a TTL;
//! - serves an HTTP API (and the `iotp-dlq` CLI) to list, inspect and replay them.
//!
//! Every AMQP message is acknowledged only after its next home (delay queue, parking queue,
//! Kafka, archive) confirmed it. A poison message never blocks a Kafka partition: the stage
//! has already moved on.

mod api;
mod replay;
mod route;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};

use iotp_core::config::{Common, ServiceConfig};
use iotp_core::contract::{Codec, DeadLetter};
use iotp_core::dead_letter::{DeadLetterConfig, DeadLetterPublisher, AMQP_TRANSIENT};
use iotp_core::kafka::KafkaConfig;
use iotp_core::metrics::metrics;
use iotp_core::service::Context;
use iotp_core::store::{DeadLetterArchive, Retention, Store, StoreConfig};
use iotp_core::topology::topology;
use serde::{Deserialize, Serialize};

pub use api::{ReplayRequest, ReplayResult, Summary};
pub use route::{route, Route};

/// AMQP header marking a message that comes back from a delay queue.
const AMQP_RETRY_DUE: &str = "x-iotp-retry-due";

/// DLQ handler configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DlqConfig {
    /// Settings every service has.
    pub common: Common,
    /// Kafka cluster (replays).
    pub kafka: KafkaConfig,
    /// RabbitMQ URI. Never logged.
    pub amqp_uri: String,
    /// Queue of new and returning dead letters.
    pub incoming_queue: String,
    /// Queue of parked dead letters.
    pub parking_queue: String,
    /// Exchange routing to the delay queues (routing key = attempt number).
    pub retry_exchange: String,
    /// Number of delay queues, i.e. retries before parking.
    pub retries: usize,
    /// Reasons retried even if the stage did not flag them transient.
    pub transient_reasons: Vec<String>,
    /// Unacknowledged deliveries per queue.
    pub prefetch: u16,
    /// Embedded store (SQLite) file holding the archive, used unless `mongodb_uri` is set.
    pub store_path: PathBuf,
    /// MongoDB connection string: keep the archive in MongoDB instead (see [`StoreConfig`]).
    /// Never logged.
    pub mongodb_uri: Option<String>,
    /// MongoDB database.
    pub mongodb_database: String,
    /// Retention tiers of the shared store: on MongoDB every service opening the store sets
    /// its TTLs from these at start-up, so give every service the same values.
    pub retention: Retention,
    /// How long parked dead letters stay in the archive.
    #[serde(with = "humantime_serde")]
    pub archive_ttl: Duration,
    /// Where the HTTP API listens.
    pub api_listen: SocketAddr,
}

impl Default for DlqConfig {
    fn default() -> Self {
        let r = &topology().rabbitmq;
        Self {
            common: Common::default(),
            kafka: KafkaConfig::default(),
            amqp_uri: DeadLetterConfig::default().amqp_uri,
            incoming_queue: r.incoming_queue.clone(),
            parking_queue: r.parking_queue.clone(),
            retry_exchange: r.retry_exchange.clone(),
            retries: r.retry_delays.len(),
            transient_reasons: vec!["registry_unavailable".into(), "store_unavailable".into()],
            prefetch: 100,
            store_path: StoreConfig::default().path,
            mongodb_uri: None,
            mongodb_database: StoreConfig::default().mongodb_database,
            retention: Retention::default(),
            archive_ttl: Duration::from_secs(30 * 24 * 3600),
            api_listen: SocketAddr::from(([0, 0, 0, 0], 9200)),
        }
    }
}

impl DlqConfig {
    /// The store these settings select.
    pub fn store(&self) -> StoreConfig {
        StoreConfig {
            path: self.store_path.clone(),
            mongodb_uri: self.mongodb_uri.clone(),
            mongodb_database: self.mongodb_database.clone(),
        }
    }
}

impl ServiceConfig for DlqConfig {
    fn common(&self) -> &Common {
        &self.common
    }

    fn validate(&self) -> Vec<String> {
        let mut out = self.kafka.problems();
        out.extend(self.store().problems());
        out.extend(self.retention.problems());
        if self.prefetch == 0 {
            out.push("prefetch must be at least 1".into());
        }
        if self.archive_ttl.is_zero() {
            out.push("archive_ttl must be > 0".into());
        }
        out
    }
}

/// Run the handler.
pub async fn run(ctx: Context, config: DlqConfig) -> anyhow::Result<()> {
    let store = config.store().open(config.retention).await?;
    let producer = config.kafka.producer(&ctx.replica)?;
    let api = Arc::new(api::Api {
        store: store.clone(),
        producer: producer.clone(),
    });
    let listener = tokio::net::TcpListener::bind(config.api_listen).await?;
    tracing::info!(api = %listener.local_addr()?, "dead-letter API listening");
    let stop_api = ctx.shutdown.clone();
    tokio::spawn(async move {
        let served = axum::serve(listener, api::router(api))
            .with_graceful_shutdown(async move { stop_api.cancelled().await });
        if let Err(e) = served.await {
            tracing::error!(error = %e, "dead-letter API failed");
        }
    });

    let connection = iotp_core::amqp::connect(&config.amqp_uri).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await?;
    let consume = |queue: &str, tag: &str| {
        channel.basic_consume(
            queue.into(),
            format!("{tag}-{}", ctx.replica).as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
    };
    let mut incoming = consume(&config.incoming_queue, "incoming").await?;
    let mut parking = consume(&config.parking_queue, "parking").await?;
    let mut publisher = DeadLetterPublisher::new(DeadLetterConfig {
        amqp_uri: config.amqp_uri.clone(),
        exchange: String::new(),
    })?;
    let codec = Codec::<DeadLetter>::latest()?;
    let mut prune = tokio::time::interval(Duration::from_secs(60));
    ctx.health.set_ready(true);

    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = prune.tick() => {
                let pruned = store.prune_letters(iotp_core::now_millis()).await?;
                if pruned > 0 {
                    tracing::info!(pruned, "expired dead letters removed from the archive");
                }
            }
            d = incoming.next() => {
                let Some(d) = d else { anyhow::bail!("incoming consumer closed") };
                let d = d?;
                let done = on_incoming(&config, &codec, &producer, &mut publisher, &d).await;
                settle(&d, done).await?;
            }
            d = parking.next() => {
                let Some(d) = d else { anyhow::bail!("parking consumer closed") };
                let d = d?;
                let done = on_parked(&config, &codec, &store, &d).await;
                settle(&d, done).await?;
            }
        }
    }
    publisher.close().await;
    let _ = connection.close(200, "bye".into()).await;
    Ok(())
}

/// Ack what was handed on; requeue (after a pause) what was not.
async fn settle(d: &Delivery, done: anyhow::Result<()>) -> anyhow::Result<()> {
    match done {
        Ok(()) => {
            d.acker.ack(BasicAckOptions::default()).await?;
        }
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "dead letter not handed on; requeued"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            d.acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await?;
        }
    }
    Ok(())
}

fn header_bool(d: &Delivery, name: &str) -> bool {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(&ShortString::from(name)).cloned())
        .is_some_and(|v| matches!(v, AMQPValue::Boolean(true)))
}

/// Undecodable bytes on a dead-letter queue become a dead letter of their own, so they are
/// parked and visible rather than lost.
fn wrap_undecodable(d: &Delivery, error: &str) -> DeadLetter {
    let now = iotp_core::now_millis();
    DeadLetter {
        id: format!(
            "dlq-handler/undecodable/{}",
            d.properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_string())
                .unwrap_or_else(|| now.to_string())
        ),
        stage: "dlq-handler".into(),
        reason_code: "undecodable_dead_letter".into(),
        error: error.to_string(),
        source_topic: None,
        source_partition: None,
        source_offset: None,
        key: None,
        payload: d.data.clone(),
        tenant: None,
        device_id: None,
        attempts: 1,
        first_failure_at: now,
        last_failure_at: now,
    }
}

async fn on_incoming(
    config: &DlqConfig,
    codec: &Codec<DeadLetter>,
    producer: &rdkafka::producer::FutureProducer,
    publisher: &mut DeadLetterPublisher,
    d: &Delivery,
) -> anyhow::Result<()> {
    let letter = match codec.decode(&d.data) {
        Ok(l) => l,
        Err(e) => {
            let wrapped = wrap_undecodable(d, &e.to_string());
            publisher
                .publish_to("", &config.parking_queue, &wrapped, FieldTable::default())
                .await?;
            return Ok(());
        }
    };
    let transient =
        header_bool(d, AMQP_TRANSIENT) || config.transient_reasons.contains(&letter.reason_code);
    let due = header_bool(d, AMQP_RETRY_DUE);
    match route(letter.attempts, transient, due, config.retries) {
        Route::ReplayNow => {
            replay::replay(producer, &letter).await?;
            metrics()
                .dead_letters_total
                .with_label_values(&["dlq-handler", "retried"])
                .inc();
        }
        Route::Retry { attempt } => {
            let mut headers = FieldTable::default();
            headers.insert(ShortString::from(AMQP_RETRY_DUE), AMQPValue::Boolean(true));
            publisher
                .publish_to(
                    &config.retry_exchange,
                    &attempt.to_string(),
                    &letter,
                    headers,
                )
                .await?;
            tracing::info!(id = %letter.id, reason = %letter.reason_code, attempt, "dead letter waits for retry");
        }
        Route::Park => {
            publisher
                .publish_to("", &config.parking_queue, &letter, FieldTable::default())
                .await?;
            metrics()
                .dead_letters_total
                .with_label_values(&["dlq-handler", "parked"])
                .inc();
            tracing::info!(id = %letter.id, reason = %letter.reason_code, attempts = letter.attempts, "dead letter parked");
        }
    }
    Ok(())
}

async fn on_parked(
    config: &DlqConfig,
    codec: &Codec<DeadLetter>,
    store: &Store,
    d: &Delivery,
) -> anyhow::Result<()> {
    let letter = codec
        .decode(&d.data)
        .unwrap_or_else(|e| wrap_undecodable(d, &e.to_string()));
    let now = iotp_core::now_millis();
    store
        .archive(&letter, now, now + config.archive_ttl.as_millis() as i64)
        .await?;
    Ok(())
}
