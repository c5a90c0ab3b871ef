//! The dead-letter, retry and parking topology of `schemas/topology.toml` on RabbitMQ. Queues
//! are quorum queues; retry delay queues dead-letter back to the incoming queue with the
//! at-least-once strategy when their TTL runs out.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use iotp_contract::topology::RabbitTopology;

fn quorum_args(extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    for (k, v) in extra {
        args.insert(ShortString::from(*k), v.clone());
    }
    args
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> lapin::Result<()> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map(|_| ())
}

/// Declare exchanges and queues; safe to run again.
pub async fn declare_topology(channel: &Channel, t: &RabbitTopology) -> lapin::Result<Vec<String>> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            t.dead_letter_exchange.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            t.retry_exchange.as_str().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
    declare_queue(channel, &t.incoming_queue, quorum_args(&[])).await?;
    channel
        .queue_bind(
            t.incoming_queue.as_str().into(),
            t.dead_letter_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut declared = vec![t.incoming_queue.clone()];
    for (i, delay) in t.retry_delays().iter().enumerate() {
        let attempt = i + 1;
        let name = t.retry_queue(attempt);
        let args = quorum_args(&[
            (
                "x-message-ttl",
                AMQPValue::LongLongInt(delay.as_millis() as i64),
            ),
            (
                "x-dead-letter-exchange",
                AMQPValue::LongString(LongString::from("")),
            ),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString(LongString::from(t.incoming_queue.as_str())),
            ),
            (
                "x-dead-letter-strategy",
                AMQPValue::LongString(LongString::from("at-least-once")),
            ),
            (
                "x-overflow",
                AMQPValue::LongString(LongString::from("reject-publish")),
            ),
        ]);
        declare_queue(channel, &name, args).await?;
        channel
            .queue_bind(
                name.as_str().into(),
                t.retry_exchange.as_str().into(),
                attempt.to_string().as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        declared.push(name);
    }
    declare_queue(channel, &t.parking_queue, quorum_args(&[])).await?;
    declared.push(t.parking_queue.clone());
    Ok(declared)
}

/// Delete what [`declare_topology`] declared, messages included (for private, per-run
/// topologies such as the load tool's; never for the pipeline's own).
pub async fn delete_topology(channel: &Channel, t: &RabbitTopology) -> lapin::Result<()> {
    let mut queues = vec![t.incoming_queue.clone(), t.parking_queue.clone()];
    queues.extend((1..=t.retry_delays.len()).map(|n| t.retry_queue(n)));
    for q in queues {
        channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    for x in [&t.dead_letter_exchange, &t.retry_exchange] {
        channel
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await?;
    }
    Ok(())
}
