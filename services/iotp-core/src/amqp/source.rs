//! The consuming side of RabbitMQ: deliveries from several queues on one channel with a
//! bounded prefetch, each settled only once its handler said where it went — acknowledged
//! after its next home confirmed it, requeued otherwise (handled again, here or by another
//! replica). The handler's retries are the runtime's ([`crate::retry`]).

use futures::stream::{select_all, BoxStream};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::Connection;

use crate::retry::Halt;

/// Consumers on several queues, merged.
pub struct AmqpSource {
    connection: Connection,
    deliveries: BoxStream<'static, (usize, lapin::Result<Delivery>)>,
}

impl AmqpSource {
    /// Consume `queues` with at most `prefetch` unacknowledged deliveries; consumer tags are
    /// `{queue}-{tag}`.
    pub async fn open(
        uri: &str,
        tls: &super::AmqpTls,
        prefetch: u16,
        queues: &[&str],
        tag: &str,
    ) -> lapin::Result<Self> {
        let connection = super::connect_with(uri, tls).await?;
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let mut streams = Vec::with_capacity(queues.len());
        for (index, queue) in queues.iter().enumerate() {
            let consumer = channel
                .basic_consume(
                    (*queue).into(),
                    format!("{queue}-{tag}").as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            streams.push(consumer.map(move |d| (index, d)).boxed());
        }
        Ok(Self {
            connection,
            deliveries: select_all(streams).boxed(),
        })
    }

    /// The next delivery and the index of its queue in `open`'s list. Cancel-safe.
    pub async fn next(&mut self) -> Result<(usize, Delivery), lapin::Error> {
        match self.deliveries.next().await {
            Some((index, delivery)) => Ok((index, delivery?)),
            None => Err(lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "rabbitmq closed the consumers",
            ))),
        }
    }

    /// Settle `d` by how handling it ended: acknowledged once handed on, requeued otherwise.
    pub async fn settle(d: &Delivery, outcome: &Result<(), Halt>) -> lapin::Result<()> {
        let _settled = match outcome {
            Ok(()) => d.acker.ack(BasicAckOptions::default()).await?,
            Err(_) => {
                d.acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await?
            }
        };
        Ok(())
    }

    /// Close the connection politely.
    pub async fn close(self) {
        let _ = self.connection.close(200, "bye".into()).await;
    }
}

/// A boolean AMQP header of `d`; false when absent.
pub fn header_flag(d: &Delivery, name: &str) -> bool {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(&ShortString::from(name)).cloned())
        .is_some_and(|v| matches!(v, AMQPValue::Boolean(true)))
}

/// A text or byte AMQP header of `d` (`traceparent`); `None` when absent or of another type.
pub fn header_bytes(d: &Delivery, name: &str) -> Option<Vec<u8>> {
    let headers = d.properties.headers().as_ref()?;
    match headers.inner().get(&ShortString::from(name))? {
        AMQPValue::LongString(v) => Some(v.as_bytes().to_vec()),
        AMQPValue::ByteArray(v) => Some(v.as_slice().to_vec()),
        _ => None,
    }
}
