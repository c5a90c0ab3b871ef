//! The DLQ handler. Stages publish dead letters to RabbitMQ; this service
//! - retries transient ones with growing delays (delay queues whose TTL dead-letters them back
//!   to the incoming queue), replaying the original record onto its Kafka topic when a delay
//!   ends;
//! - parks permanent ones, and those out of attempts, on the parking queue, and archives every
//!   parked one in the store with a TTL;
//! - serves an HTTP API (and the `iotp-dlq` CLI) to list, inspect and replay them, on
//!   127.0.0.1 unless configured elsewhere, behind a bearer token (`api_token_file`; required
//!   off loopback, see [`auth`]).
//!
//! Every AMQP message is acknowledged only after its next home (delay queue, parking queue,
//! Kafka, archive) confirmed it. A poison message never blocks a Kafka partition: the stage
//! has already moved on.

mod api;
pub mod auth;
mod replay;
mod route;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
use tracing::Instrument as _;

use iotp_contract::topology::RabbitTopology;
use iotp_contract::{Codec, DeadLetter};
use iotp_core::amqp::source::{header_bytes, header_flag};
use iotp_core::amqp::{AmqpSource, AmqpTls};
use iotp_core::config::{Common, ServiceConfig};
use iotp_core::dead_letter::{
    set_traceparent, DeadLetterConfig, DeadLetterPublisher, AMQP_TRANSIENT,
};
use iotp_core::kafka::sink::{refusal, Refusal};
use iotp_core::kafka::{KafkaConfig, KafkaSink};
use iotp_core::metrics::metrics;
use iotp_core::retry::Halt;
use iotp_core::service::Context;
use iotp_core::stage::StageError;
use iotp_core::trace::{self, BatchSpan, Links};
use iotp_store::{DeadLetterArchive, Store, StoreConfig};
use serde::{Deserialize, Serialize};

pub use api::{ReplayRequest, ReplayResult, Summary, MAX_LIMIT};
pub use replay::ReplayError;
pub use route::{is_transient, route, Route};

/// AMQP header marking a message that comes back from a delay queue.
const AMQP_RETRY_DUE: &str = "x-iotp-retry-due";

/// Index of each consumed queue in the source.
const INCOMING: usize = 0;

/// DLQ handler configuration. `Debug` hides the AMQP and MongoDB passwords
/// (`iotp_contract::redact`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DlqConfig {
    /// Settings every service has.
    pub common: Common,
    /// Kafka cluster (replays).
    pub kafka: KafkaConfig,
    /// RabbitMQ URI. Never logged.
    pub amqp_uri: String,
    /// TLS for an `amqps://` `amqp_uri`: custom CA, client certificate.
    pub amqp_tls: AmqpTls,
    /// The dead-letter queues and exchanges (defaults: `schemas/topology.toml`); one delay
    /// queue per `retry_delays` entry, so that many retries before a letter is parked.
    pub rabbitmq: RabbitTopology,
    /// Reasons retried even if the stage did not flag them transient. Never the reasons of a
    /// record Kafka refused for good (`output_too_large`, `output_rejected`): those always park.
    pub transient_reasons: Vec<String>,
    /// Unacknowledged deliveries per queue.
    pub prefetch: u16,
    /// The archive's store (the pipeline's shared store).
    pub store: StoreConfig,
    /// How long parked dead letters stay in the archive.
    #[serde(with = "humantime_serde")]
    pub archive_ttl: Duration,
    /// Where the HTTP API listens: 127.0.0.1:9200 by default, as the API returns raw payloads
    /// and replays them. An address other than loopback (`0.0.0.0:9200` in a container) needs
    /// `api_token_file`.
    pub api_listen: SocketAddr,
    /// File holding the API's bearer token (at least 32 characters, e.g.
    /// `openssl rand -hex 32`; surrounding whitespace ignored), read at start. Unset: the API
    /// answers without authentication, which only a loopback `api_listen` allows (see `auth`).
    pub api_token_file: Option<PathBuf>,
}

impl std::fmt::Debug for DlqConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        iotp_contract::redact::debug("DlqConfig", self, f)
    }
}

impl Default for DlqConfig {
    fn default() -> Self {
        Self {
            common: Common::default(),
            kafka: KafkaConfig::default(),
            amqp_uri: DeadLetterConfig::default().amqp_uri,
            amqp_tls: AmqpTls::default(),
            rabbitmq: RabbitTopology::default(),
            transient_reasons: vec!["registry_unavailable".into(), "store_unavailable".into()],
            prefetch: 100,
            store: StoreConfig::default(),
            archive_ttl: Duration::from_secs(30 * 24 * 3600),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 9200)),
            api_token_file: None,
        }
    }
}

impl ServiceConfig for DlqConfig {
    fn common(&self) -> &Common {
        &self.common
    }

    fn validate(&self) -> Vec<String> {
        let mut out = self.kafka.problems();
        out.extend(self.store.problems());
        out.extend(self.amqp_tls.problems("amqp_tls", &self.amqp_uri));
        if self.prefetch == 0 {
            out.push("prefetch must be at least 1".into());
        }
        if self.archive_ttl.is_zero() {
            out.push("archive_ttl must be > 0".into());
        }
        if let Err(problem) = self.api_token() {
            out.push(problem);
        }
        out
    }
}

impl DlqConfig {
    /// The API's token, if `api_token_file` is set; refused without one unless `api_listen`
    /// is a loopback address (the service does not start: the rule and its reason are in
    /// [`auth`]).
    pub fn api_token(&self) -> Result<Option<auth::Token>, String> {
        match &self.api_token_file {
            Some(path) => auth::Token::load(path)
                .map(Some)
                .map_err(|e| format!("api_token_file: {e}")),
            None if self.api_listen.ip().to_canonical().is_loopback() => Ok(None),
            None => Err(format!(
                "api_listen {} is not a loopback address: set api_token_file (the dead-letter \
                 API returns raw payloads and replays them; off loopback it needs a bearer token)",
                self.api_listen
            )),
        }
    }
}

/// What handling a dead letter needs.
struct Handler {
    config: DlqConfig,
    codec: Codec<DeadLetter>,
    sink: KafkaSink,
    publisher: DeadLetterPublisher,
    store: Store,
}

/// Run the handler.
pub async fn run(ctx: Context, config: DlqConfig) -> anyhow::Result<()> {
    let store = config.store.open().await?;
    let sink = KafkaSink::new(&config.kafka, &ctx.replica, "", ctx.backoff)?;
    // Checked with the configuration already; again here for a config built in code.
    let token = config.api_token().map_err(anyhow::Error::msg)?;
    let api = Arc::new(api::Api {
        store: store.clone(),
        sink: sink.clone(),
    });
    let listener = tokio::net::TcpListener::bind(config.api_listen).await?;
    let bound = listener.local_addr()?;
    if token.is_some() {
        tracing::info!(api = %bound, "dead-letter API listening (bearer token required)");
    } else {
        tracing::warn!(
            api = %bound,
            "dead-letter API listening WITHOUT AUTHENTICATION: any process on this host can \
             read dead-letter payloads and replay them; set api_token_file"
        );
    }
    let stop_api = ctx.shutdown.clone();
    let app = api::router(api, token).into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop_api.cancelled().await });
        if let Err(e) = served.await {
            tracing::error!(error = %e, "dead-letter API failed");
        }
    });

    let consume = Consume {
        uri: config.amqp_uri.clone(),
        tls: config.amqp_tls.clone(),
        prefetch: config.prefetch,
        queues: [
            config.rabbitmq.incoming_queue.clone(),
            config.rabbitmq.parking_queue.clone(),
        ],
    };
    let mut source = consume.open(&ctx.replica).await?;
    let publisher = DeadLetterPublisher::new(DeadLetterConfig {
        amqp_uri: config.amqp_uri.clone(),
        exchange: String::new(),
        amqp_tls: config.amqp_tls.clone(),
    })?;
    let mut handler = Handler {
        codec: Codec::latest()?,
        config,
        sink,
        publisher,
        store,
    };
    let mut prune = tokio::time::interval(Duration::from_secs(60));
    ctx.health.set_ready(true);

    let result = loop {
        let (queue, delivery) = tokio::select! {
            _ = ctx.shutdown.cancelled() => break Ok(()),
            _ = prune.tick() => {
                handler.prune().await;
                continue;
            }
            next = source.next() => match next {
                Ok(next) => next,
                Err(e) => {
                    // RabbitMQ restarted or the connection broke: unsettled deliveries go
                    // back to their queues by themselves; nothing is in hand.
                    ctx.health.set_ready(false);
                    tracing::warn!(error = %e, "rabbitmq consumer lost; reconnecting");
                    match consume.reopen(&ctx).await {
                        Some(reopened) => source = reopened,
                        None => break Ok(()),
                    }
                    ctx.health.set_ready(true);
                    continue;
                }
            },
        };
        // The letter's trace context (an AMQP header), kept on every next hop; with export
        // on, handling it is a span linked to that trace.
        let traceparent = header_bytes(&delivery, trace::HEADER);
        let span = trace::enabled().then(|| {
            let mut links = Links::default();
            links.add(traceparent.as_deref());
            let queue_name = consume.queues[queue].clone();
            BatchSpan::start(
                format!("process {queue_name}"),
                SpanKind::Consumer,
                None,
                vec![
                    KeyValue::new("iotp.stage", "dlq-handler"),
                    KeyValue::new("messaging.system", "rabbitmq"),
                    KeyValue::new("messaging.operation.type", "process"),
                    KeyValue::new("messaging.destination.name", queue_name),
                ],
                links,
            )
        });
        let handling = async {
            let mut retrying = ctx.backoff.start();
            loop {
                let tp = traceparent.as_deref();
                let result = if queue == INCOMING {
                    handler.on_incoming(&delivery, tp).await
                } else {
                    handler.on_parked(&delivery).await
                };
                match retrying.check(result, &ctx.shutdown, "dead letter").await {
                    Ok(Some(())) => break Ok(()),
                    Ok(None) => {}
                    Err(halt) => break Err(halt),
                }
            }
        };
        let outcome = match &span {
            Some(span) => {
                handling
                    .with_context(span.context())
                    .instrument(span.log())
                    .await
            }
            None => handling.await,
        };
        if let Some(span) = span {
            span.end(match &outcome {
                Ok(()) => None,
                Err(Halt::Shutdown) => Some("shutdown".into()),
                Err(Halt::Failed(e)) => Some(format!("{e:#}")),
            });
        }
        if let Err(e) = AmqpSource::settle(&delivery, &outcome).await {
            // Not settled: RabbitMQ delivers it again (each hop is idempotent).
            tracing::warn!(error = %e, "cannot settle a delivery; reconnecting");
            ctx.health.set_ready(false);
            match consume.reopen(&ctx).await {
                Some(reopened) => source = reopened,
                None => break Ok(()),
            }
            ctx.health.set_ready(true);
            continue;
        }
        match outcome {
            Ok(()) => {}
            Err(Halt::Shutdown) => break Ok(()),
            Err(Halt::Failed(e)) => break Err(e),
        }
    };
    handler.publisher.close().await;
    source.close().await;
    result
}

/// Where the handler consumes, to open the consumers again after RabbitMQ went away.
struct Consume {
    uri: String,
    tls: AmqpTls,
    prefetch: u16,
    queues: [String; 2],
}

impl Consume {
    async fn open(&self, tag: &str) -> lapin::Result<AmqpSource> {
        let queues = [self.queues[0].as_str(), self.queues[1].as_str()];
        AmqpSource::open(&self.uri, &self.tls, self.prefetch, &queues, tag).await
    }

    /// Open again, with the runtime's backoff, for as long as it takes (no work is in hand,
    /// as for MQTT reconnects); `None` on shutdown.
    async fn reopen(&self, ctx: &Context) -> Option<AmqpSource> {
        let mut reconnect = ctx.backoff.start();
        loop {
            let delay = reconnect.next_delay();
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
            match self.open(&ctx.replica).await {
                Ok(source) => {
                    tracing::info!("rabbitmq consumer back");
                    return Some(source);
                }
                Err(e) => tracing::warn!(error = %e, "rabbitmq still unavailable"),
            }
        }
    }
}

/// Undecodable bytes on a dead-letter queue become a dead letter of their own, so they are
/// parked and visible rather than lost.
fn wrap_undecodable(d: &Delivery, error: &str) -> DeadLetter {
    let now = iotp_contract::now_millis();
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

impl Handler {
    /// A new or returning dead letter: replay it, send it to wait in a delay queue, or park it;
    /// its `traceparent` goes with it.
    async fn on_incoming(
        &mut self,
        d: &Delivery,
        traceparent: Option<&[u8]>,
    ) -> Result<(), StageError> {
        let letter = match self.codec.decode(&d.data) {
            Ok(l) => l,
            Err(e) => {
                return self
                    .park(&wrap_undecodable(d, &e.to_string()), traceparent)
                    .await
            }
        };
        let transient = is_transient(
            header_flag(d, AMQP_TRANSIENT),
            &letter.reason_code,
            &self.config.transient_reasons,
        );
        let due = header_flag(d, AMQP_RETRY_DUE);
        match route(
            letter.attempts,
            transient,
            due,
            self.config.rabbitmq.retry_delays.len(),
        ) {
            Route::ReplayNow => match replay::replay(&self.sink, &letter, traceparent).await {
                Ok(()) => {
                    trace::annotate(KeyValue::new("iotp.route", "replay"));
                    metrics()
                        .dead_letters_total
                        .with_label_values(&["dlq-handler", "retried"])
                        .inc();
                }
                // Nowhere to replay it to: park it where an operator sees it.
                Err(ReplayError::NoSource(_)) => self.park(&letter, traceparent).await?,
                // Kafka will never take it (too large for the topic now): retrying would stop
                // this service after `give_up_after` and block the queue; park it instead.
                Err(ReplayError::Kafka(e)) if refusal(&e) != Refusal::Retry => {
                    tracing::warn!(id = %letter.id, error = %e, "kafka refuses the replay for good; parked");
                    self.park(&letter, traceparent).await?
                }
                Err(e) => return Err(StageError::retry(e)),
            },
            Route::Retry { attempt } => {
                let mut headers = FieldTable::default();
                headers.insert(ShortString::from(AMQP_RETRY_DUE), AMQPValue::Boolean(true));
                set_traceparent(&mut headers, traceparent);
                let exchange = &self.config.rabbitmq.retry_exchange;
                self.publisher
                    .publish_to(exchange, &attempt.to_string(), &letter, headers)
                    .await?;
                trace::annotate(KeyValue::new("iotp.route", "retry"));
                tracing::info!(
                    id = %letter.id,
                    reason = %letter.reason_code,
                    attempt,
                    trace_id = trace::trace_id(traceparent),
                    "dead letter waits for retry"
                );
            }
            Route::Park => self.park(&letter, traceparent).await?,
        }
        Ok(())
    }

    async fn park(
        &mut self,
        letter: &DeadLetter,
        traceparent: Option<&[u8]>,
    ) -> Result<(), StageError> {
        let queue = &self.config.rabbitmq.parking_queue;
        let mut headers = FieldTable::default();
        set_traceparent(&mut headers, traceparent);
        self.publisher
            .publish_to("", queue, letter, headers)
            .await?;
        trace::annotate(KeyValue::new("iotp.route", "park"));
        metrics()
            .dead_letters_total
            .with_label_values(&["dlq-handler", "parked"])
            .inc();
        tracing::info!(
            id = %letter.id,
            reason = %letter.reason_code,
            attempts = letter.attempts,
            trace_id = trace::trace_id(traceparent),
            "dead letter parked"
        );
        Ok(())
    }

    /// A parked dead letter: into the archive until its TTL.
    async fn on_parked(&mut self, d: &Delivery) -> Result<(), StageError> {
        let letter = self
            .codec
            .decode(&d.data)
            .unwrap_or_else(|e| wrap_undecodable(d, &e.to_string()));
        let now = iotp_contract::now_millis();
        let expires = now + self.config.archive_ttl.as_millis() as i64;
        self.store.archive(&letter, now, expires).await?;
        trace::annotate(KeyValue::new("iotp.route", "archive"));
        Ok(())
    }

    async fn prune(&self) {
        match self.store.prune_letters(iotp_contract::now_millis()).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "expired dead letters removed from the archive"),
            Err(e) => {
                tracing::warn!(error = %e, "archive pruning failed; the next pass tries again")
            }
        }
    }
}
