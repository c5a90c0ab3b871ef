//! MQTT 5 client settings: persistent session, manual acknowledgements, receive maximum as the
//! in-flight bound, optional TLS with a client certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{LastWill, LastWillProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use iotp_contract::topology::topology;

/// MQTT connection and session settings. Its `Debug` (in `config.rs`) hides the password.
#[derive(Clone, Serialize, Deserialize)]
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
    /// Read coalescing of the session's connection, bytes (0: off). The broker writes each
    /// PUBLISH on its own, so a busy session's thread was woken for nearly every segment
    /// (8,900 times a second at 20,000 msgs/s here). While reads come 1,600 times a second
    /// or more, the kernel wakes the reader only once this much is queued (`SO_RCVLOWAT`),
    /// or after `read_coalesce_wait` with what is there; lighter traffic reads as before
    /// (vendor/rumqttc/IOTP.md). With or without TLS.
    pub read_coalesce_bytes: u32,
    /// Longest a busy session's read waits for `read_coalesce_bytes`: the most this adds to
    /// a message's latency.
    #[serde(with = "humantime_serde")]
    pub read_coalesce_wait: Duration,
    /// Subscriptions, QoS 1.
    pub subscriptions: Vec<String>,
    /// Also subscribe to the broker's `$SYS` drop and store counters and export them.
    pub watch_broker_counters: bool,
    /// Where replicas announce themselves, retained: `{presence_prefix}/{clientId}` holds
    /// `online`, `leaving`, `away` or (the broker's will, after `orphan_after`) `orphaned`.
    /// Every replica of one shared group must use the same prefix.
    pub presence_prefix: String,
    /// A replica that vanished (crash, or stopped while no other was online) for this long is
    /// an orphan: its session, which keeps receiving its share of the shared subscription, is
    /// drained and ended by a surviving replica. Also the will delay: a restart shorter than
    /// this keeps the session to itself.
    #[serde(with = "humantime_serde")]
    pub orphan_after: Duration,
    /// A session being left is drained when nothing arrived for this long and every message
    /// it received was acknowledged.
    #[serde(with = "humantime_serde")]
    pub drain_quiet: Duration,
    /// Where the bridge takes the device's authenticated identity (the raw envelope's
    /// `clientIdentity`) from: `none`, or `acl` (see [`Identity::Acl`]).
    pub identity: Identity,
}

/// How the bridge learns which device sent a PUBLISH.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Identity {
    /// No authenticated identity: `clientIdentity` stays empty and the topic alone names the
    /// device.
    #[default]
    None,
    /// The broker's ACL: devices authenticate with their own certificate (the certificate's
    /// name is the MQTT username) and the broker lets each publish only on
    /// `iot/{its tenant}/{its device}/…` (`pattern write iot/%u/…` in the project's
    /// Mosquitto ACL). So a PUBLISH the bridge receives on `iot/{tenant}/{device}/…` was
    /// sent by that device, and the bridge records `tenant/device` as `clientIdentity`; the
    /// parser dead-letters a record whose tenant and device disagree with it
    /// (`identity_mismatch`). It holds only where that ACL is in force: the bridge sees
    /// the topic, not the publisher's certificate (Mosquitto passes no identity to subscribers).
    Acl,
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
            read_coalesce_bytes: 16 * 1024,
            read_coalesce_wait: Duration::from_millis(5),
            subscriptions: vec![topology().mqtt.shared_subscription()],
            watch_broker_counters: true,
            presence_prefix: "iotp-bridges".into(),
            orphan_after: Duration::from_secs(30),
            drain_quiet: Duration::from_secs(1),
            identity: Identity::None,
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
        if self.read_coalesce_bytes > 1
            && (self.read_coalesce_wait.is_zero()
                || self.read_coalesce_wait > Duration::from_millis(100))
        {
            out.push("mqtt.read_coalesce_wait must be between 1 ms and 100 ms: it is what coalescing adds to a message's latency".into());
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
        if self.presence_prefix.is_empty() || self.presence_prefix.contains(['+', '#']) {
            out.push("mqtt.presence_prefix must be a topic without wildcards".into());
        }
        if self.orphan_after.is_zero() || self.drain_quiet.is_zero() {
            out.push("mqtt.orphan_after and mqtt.drain_quiet must be > 0".into());
        }
        out
    }

    /// The client id of `replica`'s session.
    pub fn client_id<'a>(&'a self, replica: &'a str) -> &'a str {
        if self.client_id.is_empty() {
            replica
        } else {
            &self.client_id
        }
    }

    /// The retained presence topic of the session `client_id`.
    pub fn presence_topic(&self, client_id: &str) -> String {
        format!("{}/{client_id}", self.presence_prefix)
    }

    /// Build a client for the persistent, manually acknowledged session `client_id`. Its will
    /// announces the session `orphaned` if the connection ends without a DISCONNECT and no
    /// client resumes the session within `orphan_after`.
    pub fn connect(&self, client_id: &str) -> anyhow::Result<(AsyncClient, EventLoop)> {
        let mut opts = self.options(client_id)?;
        let mut will = LastWill::new(
            self.presence_topic(client_id),
            ORPHANED,
            QoS::AtLeastOnce,
            true,
            None,
        );
        will.properties = Some(LastWillProperties {
            delay_interval: Some(self.orphan_after.as_secs().min(u32::MAX.into()) as u32),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        });
        opts.set_clean_start(false)
            .set_last_will(will)
            .set_session_expiry_interval(Some(
                self.session_expiry.as_secs().min(u32::MAX.into()) as u32
            ))
            .set_receive_maximum(Some(self.max_in_flight))
            .set_manual_acks(true)
            // Acks for a whole window, subscriptions and the disconnect must fit without blocking.
            .set_request_channel_capacity(usize::from(self.max_in_flight) * 2 + 16)
            // The acks queued when the event loop wakes go out in one write, not one each
            // (vendor/rumqttc/IOTP.md).
            .set_max_request_batch(usize::from(self.max_in_flight));
        let mut network = opts.network_options();
        network.set_read_coalescing(self.read_coalesce_bytes as usize, self.read_coalesce_wait);
        opts.set_network_options(network);
        Ok(AsyncClient::new(
            opts,
            usize::from(self.max_in_flight) * 2 + 16,
        ))
    }

    /// Build a client for a connection without a session: presence, or ending a session
    /// (clean start, expiry 0: the broker discards `client_id`'s session and its queue).
    pub fn connect_sessionless(
        &self,
        client_id: &str,
        capacity: usize,
    ) -> anyhow::Result<(AsyncClient, EventLoop)> {
        let mut opts = self.options(client_id)?;
        opts.set_clean_start(true)
            .set_session_expiry_interval(Some(0))
            .set_request_channel_capacity(capacity);
        Ok(AsyncClient::new(opts, capacity))
    }

    fn options(&self, client_id: &str) -> anyhow::Result<MqttOptions> {
        let mut opts = MqttOptions::new(client_id, &self.host, self.port);
        opts.set_keep_alive(self.keep_alive)
            .set_max_packet_size(Some(self.max_packet_size))
            // The bridge publishes only its presence; rumqttc otherwise keeps a slot for
            // 65,535 outgoing publishes (about 16 MiB, allocated and written at connect).
            .set_outgoing_inflight_upper_limit(16);
        if let (Some(user), Some(pass)) = (&self.username, &self.password) {
            opts.set_credentials(user, pass);
        } else if let Some(user) = &self.username {
            opts.set_credentials(user, "");
        }
        if let Some(tls) = &self.tls {
            crate::tls::record_expiry("mqtt", "ca", &tls.ca_file);
            if let Some(cert) = &tls.cert_file {
                crate::tls::record_expiry("mqtt", "client", cert);
            }
            opts.set_transport(tls_transport(
                &tls.ca_file,
                tls.cert_file.as_deref(),
                tls.key_file.as_deref(),
            )?);
        }
        Ok(opts)
    }
}

/// MQTT over TLS trusting only the CA in `ca` (PEM, one or more certificates), with the
/// client certificate `cert` and its key `key` (PEM, PKCS#8, SEC1 or PKCS#1) when given: the
/// bridge's identity, or a device's (the simulator). Installs the process's rustls crypto
/// provider first ([`crate::crypto`]).
pub fn tls_transport(
    ca: &Path,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> anyhow::Result<Transport> {
    crate::crypto::install_default_provider();
    let read = |what: &str, path: &Path| -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow::anyhow!("{what} {}: {e}", path.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "{what} {}: no certificate in it",
            path.display()
        );
        Ok(certs)
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in read("mqtt TLS CA file", ca)? {
        roots
            .add(c)
            .map_err(|e| anyhow::anyhow!("mqtt TLS CA file {}: {e}", ca.display()))?;
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match (cert, key) {
        (Some(cert), Some(key)) => {
            let chain = read("mqtt TLS certificate", cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| anyhow::anyhow!("mqtt TLS key {}: {e}", key.display()))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                anyhow::anyhow!("mqtt TLS client certificate {}: {e}", cert.display())
            })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => anyhow::bail!("mqtt TLS: a client certificate and its key go together"),
    };
    Ok(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(config),
    )))
}

/// Presence of a replica that is connected.
pub const ONLINE: &str = "online";
/// Presence of a replica that is shutting down.
pub const LEAVING: &str = "leaving";
/// Presence of a replica that stopped and kept its session (no other replica was online).
pub const AWAY: &str = "away";
/// Presence the broker publishes (the will) for a session whose connection vanished.
pub const ORPHANED: &str = "orphaned";

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_session_coalesces_its_reads_unless_turned_off() {
        let (_, eventloop) = MqttConfig::default().connect("bridge-0").expect("a client");
        assert_eq!(
            eventloop.options.network_options().read_coalescing(),
            Some((16 * 1024, Duration::from_millis(5)))
        );
        let off = MqttConfig {
            read_coalesce_bytes: 0,
            ..MqttConfig::default()
        };
        let (_, eventloop) = off.connect("bridge-0").expect("a client");
        assert_eq!(eventloop.options.network_options().read_coalescing(), None);
    }

    #[test]
    fn a_coalescing_wait_outside_1_to_100_ms_is_refused() {
        for wait in [Duration::ZERO, Duration::from_millis(101)] {
            let c = MqttConfig {
                read_coalesce_wait: wait,
                ..MqttConfig::default()
            };
            assert!(
                c.problems()
                    .iter()
                    .any(|p| p.contains("read_coalesce_wait")),
                "{wait:?} accepted"
            );
        }
        assert!(MqttConfig::default()
            .problems()
            .iter()
            .all(|p| !p.contains("read_coalesce_wait")));
    }
}
