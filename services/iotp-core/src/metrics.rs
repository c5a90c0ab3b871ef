//! Every metric the pipeline exports, defined in one place. Names follow
//! `iotp_<what>_<unit>_total` for counters and seconds for durations; labels are bounded
//! (stage, topic, reason code), never a device id.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// All metrics of a process.
pub struct Metrics {
    registry: Registry,
    /// Service start marker; `service` label set once.
    pub up: IntGaugeVec,
    /// MQTT PUBLISH packets received by the bridge.
    pub mqtt_received_messages_total: IntCounter,
    /// MQTT PUBACKs sent after Kafka confirmed.
    pub mqtt_acked_messages_total: IntCounter,
    /// PUBACKs not sent because the broker had reused the packet id for a newer message before
    /// the older one was acknowledged (only the newest receipt of a packet id is acknowledged).
    pub mqtt_superseded_acks_total: IntCounter,
    /// MQTT connection errors, by kind.
    pub mqtt_connection_errors_total: IntCounterVec,
    /// Sessions this replica stopped serving, by outcome: `left` (its own, drained and ended
    /// when it left the shared group), `kept` (its own, kept on the broker: no other replica
    /// was online), `taken_over` (another replica's orphaned session, drained and ended).
    pub mqtt_sessions_ended_total: IntCounterVec,
    /// Messages Mosquitto reports it dropped (`$SYS/broker/publish/messages/dropped`).
    pub mqtt_broker_dropped_messages: IntGauge,
    /// Messages Mosquitto has queued for offline or slow clients (`$SYS/broker/store/messages/count`).
    pub mqtt_broker_stored_messages: IntGauge,
    /// Records Kafka confirmed, by topic.
    pub kafka_produced_messages_total: IntCounterVec,
    /// Kafka produce failures that were retried, by reason.
    pub kafka_produce_errors_total: IntCounterVec,
    /// Dead letters RabbitMQ confirmed, by stage and reason.
    pub dead_letters_total: IntCounterVec,
    /// Devices marked offline after missed heartbeats.
    pub devices_marked_offline_total: IntCounter,
    /// Devices whose twin is online or offline (`state`), as the enricher last counted them
    /// in the store: every enricher replica reports the same store-wide count.
    pub devices: IntGaugeVec,
    /// Messages the upserter stored.
    pub messages_stored_total: IntCounter,
    /// Device to store: from a message's `producedAt` (device clock) to the commit of the
    /// upserter's write that holds it (redeliveries included), the "device -> store within
    /// 1 s" objective.
    pub device_to_store_seconds: Histogram,
    /// Redelivered or replayed messages the upserter found already stored.
    pub duplicates_removed_total: IntCounter,
    /// seqNo gaps of the devices the upserter wrote since its last recount (each tick).
    pub batch_device_seq_gaps: IntGauge,
    /// Messages that arrived after their hour window closed, by what was done (corrected, rejected).
    pub late_messages_total: IntCounterVec,
    /// Roll-up buckets published to Kafka.
    pub rollups_published_total: IntCounter,
    /// Messages handed to the sink and not yet confirmed, by stage.
    pub inflight_messages: IntGaugeVec,
    /// Time from receiving a message to its downstream confirmation, by stage.
    pub delivery_seconds: HistogramVec,
    /// Time a batch spent in a stage's own logic.
    pub stage_batch_seconds: Histogram,
    /// Records the broker skipped: offsets missing between two records a stage received in
    /// a row from one partition (none on a plain Kafka topic without transactions).
    pub consumer_offset_gaps_total: IntCounterVec,
    /// Partitions read again after the broker skipped offsets.
    pub consumer_rereads_total: IntCounterVec,
    /// The consumer group's lag on each partition this replica is assigned: the partition's
    /// high watermark minus the group's committed offset (librdkafka statistics, every
    /// `statistics.interval.ms`).
    pub consumer_lag_messages: IntGaugeVec,
    /// Consumer-group leaves on the way out, by stage and outcome (`left`: the coordinator no
    /// longer lists the member; `unconfirmed`: its partitions wait for the session timeout).
    pub consumer_group_leaves_total: IntCounterVec,
    /// notAfter (Unix seconds) of each configured TLS certificate, by link (`kafka`, `amqp`,
    /// `mongodb`) and role (`client`: presented by this service; `ca`: trusted by it); set
    /// when the client that uses it is built (`crate::tls`).
    pub tls_cert_expiry_timestamp_seconds: IntGaugeVec,
}

impl Metrics {
    fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let m = Self {
            up: IntGaugeVec::new(
                Opts::new("iotp_up", "1 while the service runs"),
                &["service"],
            )?,
            mqtt_received_messages_total: IntCounter::new(
                "iotp_mqtt_received_messages_total",
                "MQTT PUBLISH packets received",
            )?,
            mqtt_acked_messages_total: IntCounter::new(
                "iotp_mqtt_acked_messages_total",
                "MQTT PUBACKs sent after Kafka confirmed the record",
            )?,
            mqtt_superseded_acks_total: IntCounter::new(
                "iotp_mqtt_superseded_acks_total",
                "PUBACKs not sent because the broker reused the packet id before the message was acknowledged",
            )?,
            mqtt_connection_errors_total: IntCounterVec::new(
                Opts::new(
                    "iotp_mqtt_connection_errors_total",
                    "MQTT connection errors",
                ),
                &["kind"],
            )?,
            mqtt_sessions_ended_total: IntCounterVec::new(
                Opts::new(
                    "iotp_mqtt_sessions_ended_total",
                    "MQTT sessions this replica stopped serving, by outcome",
                ),
                &["outcome"],
            )?,
            mqtt_broker_dropped_messages: IntGauge::new(
                "iotp_mqtt_broker_dropped_messages",
                "Messages the MQTT broker reports dropped since it started ($SYS)",
            )?,
            mqtt_broker_stored_messages: IntGauge::new(
                "iotp_mqtt_broker_stored_messages",
                "Messages the MQTT broker holds in its store ($SYS)",
            )?,
            kafka_produced_messages_total: IntCounterVec::new(
                Opts::new(
                    "iotp_kafka_produced_messages_total",
                    "Records Kafka confirmed",
                ),
                &["topic"],
            )?,
            kafka_produce_errors_total: IntCounterVec::new(
                Opts::new(
                    "iotp_kafka_produce_errors_total",
                    "Kafka produce failures, retried",
                ),
                &["reason"],
            )?,
            dead_letters_total: IntCounterVec::new(
                Opts::new("iotp_dead_letters_total", "Dead letters RabbitMQ confirmed"),
                &["stage", "reason"],
            )?,
            devices_marked_offline_total: IntCounter::new(
                "iotp_devices_marked_offline_total",
                "Devices marked offline after missing heartbeat intervals",
            )?,
            devices: IntGaugeVec::new(
                Opts::new(
                    "iotp_devices",
                    "Devices whose twin is online or offline, as last counted in the store",
                ),
                &["state"],
            )?,
            messages_stored_total: IntCounter::new(
                "iotp_messages_stored_total",
                "Messages the upserter stored",
            )?,
            device_to_store_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "iotp_device_to_store_seconds",
                    "Device producedAt to the upserter's commit of the message",
                )
                // 1 s is a boundary: the objective is "device -> store within 1 s".
                .buckets(vec![
                    0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                ]),
            )?,
            duplicates_removed_total: IntCounter::new(
                "iotp_duplicates_removed_total",
                "Redelivered or replayed messages found already stored",
            )?,
            batch_device_seq_gaps: IntGauge::new(
                "iotp_batch_device_seq_gaps",
                "seqNo gaps (numbers never stored) of the devices written since the last recount (every io.tick_interval)",
            )?,
            late_messages_total: IntCounterVec::new(
                Opts::new(
                    "iotp_late_messages_total",
                    "Messages later than their window's allowed lateness",
                ),
                &["outcome"],
            )?,
            rollups_published_total: IntCounter::new(
                "iotp_rollups_published_total",
                "Roll-up buckets published to Kafka",
            )?,
            inflight_messages: IntGaugeVec::new(
                Opts::new(
                    "iotp_inflight_messages",
                    "Messages awaiting downstream confirmation",
                ),
                &["stage"],
            )?,
            delivery_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "iotp_delivery_seconds",
                    "Receive to downstream confirmation",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                ]),
                &["stage"],
            )?,
            stage_batch_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "iotp_stage_batch_seconds",
                    "Time in a stage's own logic per batch",
                )
                .buckets(prometheus::exponential_buckets(0.00001, 4.0, 10)?),
            )?,
            consumer_offset_gaps_total: IntCounterVec::new(
                Opts::new(
                    "iotp_consumer_offset_gaps_total",
                    "Offsets skipped between consecutive records of a partition",
                ),
                &["stage"],
            )?,
            consumer_rereads_total: IntCounterVec::new(
                Opts::new(
                    "iotp_consumer_rereads_total",
                    "Partitions sought back and read again after the broker skipped offsets",
                ),
                &["stage"],
            )?,
            consumer_lag_messages: IntGaugeVec::new(
                Opts::new(
                    "iotp_consumer_lag_messages",
                    "High watermark minus the group's committed offset, per assigned partition",
                ),
                &["topic", "partition"],
            )?,
            consumer_group_leaves_total: IntCounterVec::new(
                Opts::new(
                    "iotp_consumer_group_leaves_total",
                    "Consumer-group leaves at shutdown, by outcome (left, unconfirmed)",
                ),
                &["stage", "outcome"],
            )?,
            tls_cert_expiry_timestamp_seconds: IntGaugeVec::new(
                Opts::new(
                    "iotp_tls_cert_expiry_timestamp_seconds",
                    "notAfter of each configured TLS certificate, Unix seconds",
                ),
                &["link", "role"],
            )?,
            registry,
        };
        m.registry.register(Box::new(m.up.clone()))?;
        m.registry
            .register(Box::new(m.mqtt_received_messages_total.clone()))?;
        m.registry
            .register(Box::new(m.mqtt_acked_messages_total.clone()))?;
        m.registry
            .register(Box::new(m.mqtt_connection_errors_total.clone()))?;
        m.registry
            .register(Box::new(m.mqtt_superseded_acks_total.clone()))?;
        m.registry
            .register(Box::new(m.mqtt_sessions_ended_total.clone()))?;
        m.registry
            .register(Box::new(m.mqtt_broker_dropped_messages.clone()))?;
        m.registry
            .register(Box::new(m.mqtt_broker_stored_messages.clone()))?;
        m.registry
            .register(Box::new(m.kafka_produced_messages_total.clone()))?;
        m.registry
            .register(Box::new(m.kafka_produce_errors_total.clone()))?;
        m.registry
            .register(Box::new(m.dead_letters_total.clone()))?;
        m.registry
            .register(Box::new(m.devices_marked_offline_total.clone()))?;
        m.registry.register(Box::new(m.devices.clone()))?;
        m.registry
            .register(Box::new(m.messages_stored_total.clone()))?;
        m.registry
            .register(Box::new(m.device_to_store_seconds.clone()))?;
        m.registry
            .register(Box::new(m.duplicates_removed_total.clone()))?;
        m.registry
            .register(Box::new(m.batch_device_seq_gaps.clone()))?;
        m.registry
            .register(Box::new(m.late_messages_total.clone()))?;
        m.registry
            .register(Box::new(m.rollups_published_total.clone()))?;
        m.registry.register(Box::new(m.inflight_messages.clone()))?;
        m.registry.register(Box::new(m.delivery_seconds.clone()))?;
        m.registry
            .register(Box::new(m.stage_batch_seconds.clone()))?;
        m.registry
            .register(Box::new(m.consumer_offset_gaps_total.clone()))?;
        m.registry
            .register(Box::new(m.consumer_rereads_total.clone()))?;
        m.registry
            .register(Box::new(m.consumer_lag_messages.clone()))?;
        m.registry
            .register(Box::new(m.consumer_group_leaves_total.clone()))?;
        m.registry
            .register(Box::new(m.tls_cert_expiry_timestamp_seconds.clone()))?;
        Ok(m)
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| match Metrics::new() {
    Ok(m) => m,
    // Names and label sets are static: a failure here is a programming error caught by tests.
    #[allow(clippy::panic)]
    Err(e) => panic!("metric definitions are invalid: {e}"),
});

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

#[cfg(test)]
mod tests {
    #[test]
    fn metrics_render_with_expected_names() {
        let m = super::metrics();
        m.mqtt_received_messages_total.inc_by(3);
        m.kafka_produced_messages_total
            .with_label_values(&["iotp.raw"])
            .inc();
        let text = m.render();
        assert!(
            text.contains("iotp_mqtt_received_messages_total 3"),
            "{text}"
        );
        assert!(
            text.contains("iotp_kafka_produced_messages_total{topic=\"iotp.raw\"} 1"),
            "{text}"
        );
    }
}
