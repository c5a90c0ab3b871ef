//! The runtime every service runs on: the process shell (config, logs, admin port, metrics,
//! shutdown), the stage runtimes (Kafka → Kafka, MQTT → Kafka) and the broker adapters they
//! are built from (Kafka, MQTT, RabbitMQ), and tracing (trace context carried with every
//! message, spans per batch). Stages hold logic only; this crate does the plumbing once.

pub mod admin;
mod allocator;
pub mod amqp;
pub mod config;
pub mod consume;
pub mod crypto;
pub mod dead_letter;
pub mod ingress;
pub mod kafka;
pub mod logging;
pub mod metrics;
pub mod mqtt;
pub mod outbox;
pub mod probe;
pub mod retry;
pub mod service;
pub mod shutdown;
pub mod stage;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod tls;
pub mod trace;
