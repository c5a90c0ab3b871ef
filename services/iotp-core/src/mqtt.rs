//! MQTT 5 client settings: persistent session, manual acknowledgements, receive maximum as the
//! in-flight bound, optional TLS with a client certificate.

use std::path::PathBuf;
use std::time::Duration;

use rumqttc::v5::{AsyncClient, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use serde::{Deserialize, Serialize};

use iotp_contract::topology::topology;

/// MQTT connection and session settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Client id; empty means the replica name. Must be stable across restarts: it names the
    /// persistent session that holds this replica's unacknowledged messages.
    pub client_id: String,
    /// Username, if the broker wants one.
    pub username: Option<String>,
    /// Password, if the broker wants one. Never logged.
    pub password: Option<String>,
    /// TLS, if set.
    pub tls: Option<TlsFiles>,
    /// Keep-alive interval.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// How long the broker keeps the session (and queues for it) while the client is away.
    #[serde(with = "humantime_serde")]
    pub session_expiry: Duration,
    /// Most unacknowledged messages the broker may send us (MQTT 5 receive maximum); this is
    /// the bridge's in-flight window.
    pub max_in_flight: u16,
    /// Largest packet accepted, bytes.
    pub max_packet_size: u32,
    /// Subscriptions, QoS 1.
    pub subscriptions: Vec<String>,
    /// Also subscribe to the broker's `$SYS` drop and store counters and export them.
    pub watch_broker_counters: bool,
}

/// PEM files for TLS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA bundle that signed the broker's certificate.
    pub ca_file: PathBuf,
    /// Client certificate (per-replica identity), if the broker requires one.
    pub cert_file: Option<PathBuf>,
    /// Its private key.
    pub key_file: Option<PathBuf>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1884,
            client_id: String::new(),
            username: None,
            password: None,
            tls: None,
            // 300 s: under a flood the broker's PINGRESP queues behind the publishes it has
            // for us, and a PINGRESP later than one keep-alive makes the client drop the
            // connection; each such reconnect made Mosquitto send again everything it had sent
            // unacknowledged (unthrottled standard load test at 60 s: one reconnect, 903,951
            // PUBLISHes received twice; at 15 s the session dropped every 30 s). The bridge
            // writes PUBACKs all the time it is busy, so the broker sees it alive anyway.
            keep_alive: Duration::from_secs(300),
            session_expiry: Duration::from_secs(7 * 24 * 3600),
            max_in_flight: 1000,
            // Above the broker's own limit (dev/mosquitto.conf: 1 MiB): a PUBLISH larger than what
            // the client accepts is discarded by an MQTT 5 broker without a trace.
            max_packet_size: 2 * 1024 * 1024,
            subscriptions: vec![topology().mqtt.shared_subscription()],
            watch_broker_counters: true,
        }
    }
}

impl MqttConfig {
    /// Rules for `validate()`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.max_in_flight == 0 {
            out.push("mqtt.max_in_flight must be at least 1".into());
        }
        if self.subscriptions.is_empty() {
            out.push("mqtt.subscriptions must not be empty".into());
        }
        if self.session_expiry.as_secs() == 0 {
            out.push("mqtt.session_expiry must be > 0: a clean session loses messages queued while the bridge is away".into());
        }
        if let Some(tls) = &self.tls {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                out.push("mqtt.tls.cert_file and mqtt.tls.key_file go together".into());
            }
        }
        if self.username.is_none() && self.password.is_some() {
            out.push("mqtt.password needs mqtt.username".into());
        }
        out
    }

    /// Build a client for a persistent, manually acknowledged session.
    pub fn connect(&self, replica: &str) -> anyhow::Result<(AsyncClient, EventLoop)> {
        let client_id = if self.client_id.is_empty() {
            replica
        } else {
            &self.client_id
        };
        let mut opts = MqttOptions::new(client_id, &self.host, self.port);
        opts.set_clean_start(false)
            .set_keep_alive(self.keep_alive)
            .set_session_expiry_interval(Some(
                self.session_expiry.as_secs().min(u32::MAX.into()) as u32
            ))
            .set_receive_maximum(Some(self.max_in_flight))
            .set_max_packet_size(Some(self.max_packet_size))
            .set_manual_acks(true)
            // The bridge publishes nothing to MQTT; rumqttc otherwise keeps a slot for 65,535
            // outgoing publishes (about 16 MiB, allocated and written at connect).
            .set_outgoing_inflight_upper_limit(16)
            // Acks for a whole window, subscriptions and the disconnect must fit without blocking.
            .set_request_channel_capacity(usize::from(self.max_in_flight) * 2 + 16);
        if let (Some(user), Some(pass)) = (&self.username, &self.password) {
            opts.set_credentials(user, pass);
        } else if let Some(user) = &self.username {
            opts.set_credentials(user, "");
        }
        if let Some(tls) = &self.tls {
            let ca = std::fs::read(&tls.ca_file)?;
            let client_auth = match (&tls.cert_file, &tls.key_file) {
                (Some(cert), Some(key)) => Some((std::fs::read(cert)?, std::fs::read(key)?)),
                _ => None,
            };
            opts.set_transport(Transport::Tls(TlsConfiguration::Simple {
                ca,
                alpn: None,
                client_auth,
            }));
        }
        Ok(AsyncClient::new(
            opts,
            usize::from(self.max_in_flight) * 2 + 16,
        ))
    }
}
