//! Shared library of the IoT telemetry pipeline: the message contract and its Avro codec, the
//! stage runtime (config, admin endpoints, metrics, shutdown), and the broker adapters.

pub mod admin;
pub mod amqp;
pub mod config;
pub mod consume;
pub mod contract;
pub mod dead_letter;
pub mod ingress;
pub mod kafka;
pub mod metrics;
pub mod mqtt;
pub mod registry;
pub mod service;
pub mod shutdown;
pub mod stage;
pub mod telemetry;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod topology;

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
