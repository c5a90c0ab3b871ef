//! The dead-letter publisher: a dead letter travels to RabbitMQ as an Avro `DeadLetter`,
//! persistent and mandatory (unroutable is an error, not a silent drop), and is confirmed by
//! the broker before the caller may commit the source offset.

use std::time::Duration;

use iotp_contract::{Classify, Codec, DeadLetter, Recovery};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};

use tokio_util::sync::CancellationToken;

use super::{DeadLetterConfig, AMQP_TRANSIENT};
use crate::metrics::metrics;
use crate::retry::{Backoff, Halt};

/// Why a dead letter was not confirmed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Connection or channel trouble.
    #[error("rabbitmq: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker refused it.
    #[error("rabbitmq nacked the dead letter")]
    Nacked,
    /// No queue is bound for it: the topology is missing.
    #[error("dead letter unroutable on exchange {exchange} with key {key}: declare the topology")]
    Unroutable {
        /// Exchange.
        exchange: String,
        /// Routing key.
        key: String,
    },
    /// Encoding failed.
    #[error(transparent)]
    Codec(#[from] iotp_contract::CodecError),
}

impl Classify for PublishError {
    /// RabbitMQ down or refusing is worth waiting for; a missing topology or a letter that
    /// does not encode is not.
    fn recovery(&self) -> Recovery {
        match self {
            Self::Amqp(_) | Self::Nacked => Recovery::Retry,
            Self::Unroutable { .. } | Self::Codec(_) => Recovery::Stop,
        }
    }
}

/// Publishes dead letters with publisher confirms, reconnecting when the channel breaks.
pub struct DeadLetterPublisher {
    config: DeadLetterConfig,
    codec: Codec<DeadLetter>,
    conn: Option<(Connection, Channel)>,
}

impl DeadLetterPublisher {
    /// A publisher; connects on first use.
    pub fn new(config: DeadLetterConfig) -> Result<Self, PublishError> {
        Ok(Self {
            config,
            codec: Codec::latest()?,
            conn: None,
        })
    }

    async fn channel(&mut self) -> Result<&Channel, PublishError> {
        let usable = matches!(&self.conn, Some((c, ch)) if c.status().connected() && ch.status().connected());
        if !usable {
            let connection =
                crate::amqp::connect_with(&self.config.amqp_uri, &self.config.amqp_tls).await?;
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            self.conn = Some((connection, channel));
        }
        match &self.conn {
            Some((_, ch)) => Ok(ch),
            None => Err(PublishError::Nacked),
        }
    }

    /// Publish to the dead-letter exchange, routing key `{stage}.{reasonCode}`, and wait for
    /// the broker's confirm.
    pub async fn publish(
        &mut self,
        letter: &DeadLetter,
        transient: bool,
    ) -> Result<(), PublishError> {
        self.publish_traced(letter, transient, None).await
    }

    /// [`Self::publish`], with the failed record's W3C `traceparent` as an AMQP header of the
    /// same name.
    pub async fn publish_traced(
        &mut self,
        letter: &DeadLetter,
        transient: bool,
        traceparent: Option<&[u8]>,
    ) -> Result<(), PublishError> {
        let key = format!("{}.{}", letter.stage, letter.reason_code);
        let exchange = self.config.exchange.clone();
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from(AMQP_TRANSIENT),
            AMQPValue::Boolean(transient),
        );
        set_traceparent(&mut headers, traceparent);
        self.publish_to(&exchange, &key, letter, headers).await
    }

    /// [`Self::publish_traced`] until RabbitMQ confirmed it, with `backoff` between attempts
    /// (a missing topology or a letter that does not encode stops at once); counted by stage
    /// and reason once confirmed.
    pub async fn deliver(
        &mut self,
        letter: &DeadLetter,
        transient: bool,
        traceparent: Option<&[u8]>,
        backoff: &Backoff,
        shutdown: &CancellationToken,
    ) -> Result<(), Halt> {
        let mut retrying = backoff.start();
        loop {
            match self.publish_traced(letter, transient, traceparent).await {
                Ok(()) => {
                    metrics()
                        .dead_letters_total
                        .with_label_values(&[&letter.stage, &letter.reason_code])
                        .inc();
                    return Ok(());
                }
                Err(e) if e.recovery() == Recovery::Stop => return Err(Halt::Failed(e.into())),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        reason = %letter.reason_code,
                        trace_id = crate::trace::trace_id(traceparent),
                        "dead letter not confirmed; retrying"
                    );
                    retrying.wait(shutdown, &e).await?;
                }
            }
        }
    }

    /// Publish `letter` to `exchange` with routing key `key` and extra headers, persistent and
    /// mandatory, and wait for the broker's confirm. Unroutable is an error.
    pub async fn publish_to(
        &mut self,
        exchange: &str,
        key: &str,
        letter: &DeadLetter,
        extra: FieldTable,
    ) -> Result<(), PublishError> {
        let body = self.codec.encode(letter)?;
        let (exchange, key) = (exchange.to_string(), key.to_string());
        let mut headers = extra;
        headers.insert(
            ShortString::from("x-reason"),
            AMQPValue::LongString(LongString::from(letter.reason_code.as_str())),
        );
        headers.insert(
            ShortString::from("x-stage"),
            AMQPValue::LongString(LongString::from(letter.stage.as_str())),
        );
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(letter.id.as_str()))
            .with_content_type(ShortString::from("application/vnd.apache.avro+binary"))
            .with_headers(headers);
        let result = async {
            let channel = self.channel().await?;
            let confirm = channel
                .basic_publish(
                    exchange.as_str().into(),
                    key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    properties,
                )
                .await?
                .await?;
            if confirm.is_nack() {
                return Err(PublishError::Nacked);
            }
            if confirm.take_message().is_some() {
                return Err(PublishError::Unroutable {
                    exchange: exchange.clone(),
                    key: key.clone(),
                });
            }
            Ok(())
        }
        .await;
        if matches!(result, Err(PublishError::Amqp(_))) {
            self.conn = None;
        }
        result
    }

    /// Close the connection politely.
    pub async fn close(&mut self) {
        if let Some((conn, _)) = self.conn.take() {
            let _ =
                tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into())).await;
        }
    }
}

/// Put a valid W3C `traceparent` into AMQP `headers` (anything else is left out).
pub fn set_traceparent(headers: &mut FieldTable, traceparent: Option<&[u8]>) {
    if let Some(value) = traceparent.filter(|v| crate::trace::parse(v).is_some()) {
        headers.insert(
            ShortString::from(crate::trace::HEADER),
            AMQPValue::LongString(LongString::from(value.to_vec())),
        );
    }
}
