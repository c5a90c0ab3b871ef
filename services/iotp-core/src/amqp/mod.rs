//! RabbitMQ adapters: the connection, the dead-letter topology ([`topology`]), and the
//! consuming side with its settling rule ([`source`]). Publishing dead letters is
//! [`crate::dead_letter`]'s.

pub mod source;
pub mod topology;

use lapin::{Connection, ConnectionProperties};

pub use source::AmqpSource;
pub use topology::{declare_topology, delete_topology};

/// Connect to RabbitMQ.
pub async fn connect(uri: &str) -> lapin::Result<Connection> {
    Connection::connect(uri, ConnectionProperties::default()).await
}
