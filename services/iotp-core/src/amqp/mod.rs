//! RabbitMQ adapters: the connection (plain or `amqps://` with a custom CA and a client
//! certificate, [`AmqpTls`]), the dead-letter topology ([`topology`]), and the consuming side
//! with its settling rule ([`source`]). Publishing dead letters is [`crate::dead_letter`]'s.

pub mod source;
pub mod topology;

use std::path::{Path, PathBuf};

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};

pub use source::AmqpSource;
pub use topology::{declare_topology, delete_topology};

/// TLS for an `amqps://` URI (lapin with rustls). Every field unset: the system's trust store,
/// no client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpTls {
    /// CA certificates (PEM) the broker's certificate is checked against, added to the system's.
    pub ca_file: Option<PathBuf>,
    /// This service's client certificate (PEM, leaf first), for a broker that requires one
    /// (`ssl_options.fail_if_no_peer_cert`); its expiry is exported
    /// (`iotp_tls_cert_expiry_timestamp_seconds{link="amqp"}`).
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM, PKCS#8, SEC1 or PKCS#1, unencrypted).
    pub key_file: Option<PathBuf>,
}

impl AmqpTls {
    /// Whether anything is set.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// Rules for `validate()`, with `section` the setting's place (`io.dead_letter.amqp_tls`):
    /// certificate and key together, the files readable, TLS only for an `amqps://` `uri`.
    pub fn problems(&self, section: &str, uri: &str) -> Vec<String> {
        let mut out = Vec::new();
        if self.cert_file.is_some() != self.key_file.is_some() {
            out.push(format!(
                "{section}.cert_file and {section}.key_file go together"
            ));
        }
        let files = [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ];
        for (name, path) in files {
            if let Some(path) = path {
                if let Err(e) = std::fs::metadata(path) {
                    out.push(format!(
                        "{section}.{name}: cannot read {}: {e}",
                        path.display()
                    ));
                }
            }
        }
        if !self.is_empty() && !uri.starts_with("amqps://") {
            out.push(format!("{section} is set but the URI is not amqps://"));
        }
        out
    }

    /// lapin's TLS settings, the files read; records the certificates' expiry.
    pub fn load(&self) -> std::io::Result<OwnedTLSConfig> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display()))
            })
        };
        let cert_chain = match &self.ca_file {
            Some(path) => {
                crate::tls::record_expiry("amqp", "ca", path);
                let pem = read(path)?;
                Some(String::from_utf8(pem).map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{} is not PEM text", path.display()),
                    )
                })?)
            }
            None => None,
        };
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                crate::tls::record_expiry("amqp", "client", cert);
                Some(OwnedIdentity::PKCS8 {
                    pem: read(cert)?,
                    key: read(key)?,
                })
            }
            _ => None,
        };
        Ok(OwnedTLSConfig {
            identity,
            cert_chain,
        })
    }
}

/// Connect to RabbitMQ (an `amqps://` URI: the system's trust store, no client certificate).
pub async fn connect(uri: &str) -> lapin::Result<Connection> {
    connect_with(uri, &AmqpTls::default()).await
}

/// Connect to RabbitMQ; an `amqps://` URI uses `tls`. A TLS file that cannot be read is an
/// I/O error naming it.
pub async fn connect_with(uri: &str, tls: &AmqpTls) -> lapin::Result<Connection> {
    // lapin's rustls builds its client configuration from the process-level provider.
    crate::crypto::install_default_provider();
    let config = tls.load()?;
    Connection::connect_with_config(
        uri,
        ConnectionProperties::default(),
        config,
        lapin::runtime::default_runtime()?,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_rules_name_their_section() {
        let tls = AmqpTls {
            cert_file: Some(PathBuf::from("/nonexistent/client.pem")),
            ..AmqpTls::default()
        };
        let problems = tls.problems("io.dead_letter.amqp_tls", "amqp://h:5672/%2f");
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("io.dead_letter.amqp_tls.cert_file and"));
        assert!(problems[1].contains("/nonexistent/client.pem"));
        assert!(problems[2].contains("not amqps://"));
        assert!(AmqpTls::default()
            .problems("amqp_tls", "amqp://h:5672/%2f")
            .is_empty());
        let pair = AmqpTls {
            key_file: Some(PathBuf::from("/nonexistent/client.key")),
            ..tls
        };
        let err = pair.load().expect_err("unreadable");
        assert!(err.to_string().contains("/nonexistent/client.pem"), "{err}");
    }
}
