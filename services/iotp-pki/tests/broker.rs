//! The project's TLS configuration (dev/mosquitto-tls.conf, dev/mosquitto.acl) on a real
//! Mosquitto started by each test on a free port, with certificates from the project CA
//! (iotp-pki) and the MQTT TLS transport the bridge and the simulator use
//! (`iotp_core::mqtt::tls_transport`). Needs a Mosquitto binary: `IOTP_MOSQUITTO` (the
//! Makefile sets it), else the one dev/brokers.sh installs, else /usr/sbin/mosquitto.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use iotp_pki::{Ca, Issued, Target, Validity, BRIDGE_NAME};
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, StateError};
use rustls::AlertDescription;
use time::OffsetDateTime;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn mosquitto_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("IOTP_MOSQUITTO") {
        return p.into();
    }
    let installed = PathBuf::from(std::env::var("HOME").unwrap_or_default())
        .join(".cache/iotp/mosquitto-2.0.21/usr/sbin/mosquitto");
    if installed.exists() {
        installed
    } else {
        "/usr/sbin/mosquitto".into()
    }
}

/// A Mosquitto from dev/mosquitto-tls.conf and its CA.
struct Broker {
    child: Child,
    port: u16,
    dir: PathBuf,
    ca: Ca,
}

impl Broker {
    fn start(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("iotp-pki-broker-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pki = dir.join("pki");
        let mut ca = Ca::init(&pki, "iotp test CA", 30).unwrap();
        let hosts = ["localhost".to_string(), "127.0.0.1".to_string()];
        ca.issue_broker("mosquitto", &hosts, Validity::days(30).unwrap())
            .unwrap();
        let port = free_port();
        let root = repo_root();
        let template = std::fs::read_to_string(root.join("dev/mosquitto-tls.conf")).unwrap();
        let conf = template
            .replace("@PORT@", &port.to_string())
            .replace("@BIND@", "127.0.0.1")
            .replace(
                "@USER@",
                &std::env::var("USER").unwrap_or_else(|_| "root".into()),
            )
            .replace("@DIR@", dir.to_str().unwrap())
            .replace("@PKI@", pki.to_str().unwrap())
            .replace("@ACL@", root.join("dev/mosquitto.acl").to_str().unwrap());
        assert!(!conf.contains('@'), "every placeholder rendered");
        std::fs::write(dir.join("mosquitto.conf"), conf).unwrap();
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(dir.join("mosquitto.conf"))
            .spawn()
            .expect("mosquitto");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "mosquitto did not listen; log: {}",
                std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            port,
            dir,
            ca,
        }
    }

    fn device(&mut self, tenant: &str, device: &str) -> Issued {
        self.ca
            .issue_device(tenant, device, Validity::days(30).unwrap())
            .unwrap()
    }

    /// SIGHUP: Mosquitto reloads its configuration, the CRL among it.
    fn sighup(&self) {
        let ok = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
        // Wait for the reload to be logged (or a moment, if the log says nothing).
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(3) {
            let log = std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default();
            if log.contains("Reloading config") {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    /// A connection with `cert` (none: no client certificate): the CONNACK, or the error.
    async fn connect(
        &self,
        id: &str,
        cert: Option<&Issued>,
    ) -> Result<(AsyncClient, EventLoop), ConnectionError> {
        let mut opts = MqttOptions::new(id, "127.0.0.1", self.port);
        opts.set_keep_alive(Duration::from_secs(30));
        let transport = iotp_core::mqtt::tls_transport(
            &self.ca.ca_file(),
            cert.map(|c| c.cert_file.as_path()),
            cert.map(|c| c.key_file.as_path()),
        )
        .unwrap();
        opts.set_transport(transport);
        let (client, mut events) = AsyncClient::new(opts, 16);
        loop {
            match tokio::time::timeout(Duration::from_secs(10), events.poll())
                .await
                .expect("no CONNACK nor error within 10 s")?
            {
                Event::Incoming(Packet::ConnAck(ack)) => {
                    assert_eq!(ack.code, ConnectReturnCode::Success);
                    return Ok((client, events));
                }
                _ => continue,
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The TLS alert the broker sent, found in the error's chain (rumqttc's
/// `StateError::Deserialization` does not name its cause as a source: looked into by hand).
fn alert_of(err: &ConnectionError) -> Option<AlertDescription> {
    if let ConnectionError::MqttState(StateError::Deserialization(inner)) = err {
        return alert_in(inner);
    }
    alert_in(err)
}

fn alert_in(err: &(dyn std::error::Error + 'static)) -> Option<AlertDescription> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        if let Some(rustls::Error::AlertReceived(alert)) = e.downcast_ref::<rustls::Error>() {
            return Some(*alert);
        }
        next = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as _),
            None => e.source(),
        };
    }
    None
}

/// The refusal of a connection: the alert, after up to a few polls (with TLS 1.3 the broker
/// checks the client certificate after the client finished its handshake, so the alert
/// arrives on the first read).
async fn refusal(broker: &Broker, id: &str, cert: Option<&Issued>) -> AlertDescription {
    match broker.connect(id, cert).await {
        Ok(_) => panic!("{id}: connected, want a refusal"),
        Err(e) => alert_of(&e).unwrap_or_else(|| panic!("{id}: no TLS alert in {e:?}")),
    }
}

/// Publish QoS 1 and return the PUBACK's reason.
async fn publish(client: &AsyncClient, events: &mut EventLoop, topic: &str) -> PubAckReason {
    client
        .publish(topic, QoS::AtLeastOnce, false, b"{}".to_vec())
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll())
            .await
            .expect("no PUBACK within 10 s")
            .unwrap()
        {
            Event::Incoming(Packet::PubAck(ack)) => return ack.reason,
            _ => continue,
        }
    }
}

/// Subscribe QoS 1 and return the SUBACK's reason.
async fn subscribe(
    client: &AsyncClient,
    events: &mut EventLoop,
    filter: &str,
) -> SubscribeReasonCode {
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll())
            .await
            .expect("no SUBACK within 10 s")
            .unwrap()
        {
            Event::Incoming(Packet::SubAck(ack)) => return ack.return_codes[0],
            _ => continue,
        }
    }
}

/// Publishes that reach `events` within `wait`, by topic.
async fn received(events: &mut EventLoop, wait: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(polled) = tokio::time::timeout_at(deadline, events.poll()).await {
        if let Event::Incoming(Packet::Publish(p)) = polled.unwrap() {
            got.push(String::from_utf8(p.topic.to_vec()).unwrap());
        }
    }
    got.sort();
    got
}

/// Mosquitto 2.0's acl_file does not check SUBSCRIBE (every filter is granted); read access is
/// checked on each message it would deliver. So a device's or the bridge's subscription to
/// topics it may not read is accepted and stays empty: that is what is asserted below.
#[tokio::test]
async fn a_device_publishes_to_its_own_topics_only_and_the_bridge_reads_telemetry_only() {
    let mut broker = Broker::start("acl");
    let m1 = broker.device("acme", "meter-1");
    let m2 = broker.device("acme", "meter-2");
    let bridge = broker
        .ca
        .issue_bridge(BRIDGE_NAME, Validity::days(30).unwrap())
        .unwrap();

    let (b, mut bev) = broker.connect("bridge-0", Some(&bridge)).await.unwrap();
    for filter in ["$share/iotp-bridge/iot/+/+/+", "cmd/#"] {
        assert_eq!(
            subscribe(&b, &mut bev, filter).await,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            "{filter}"
        );
    }
    // meter-2 listens everywhere it may subscribe: it must get nothing of meter-1's.
    let (d2, mut dev2) = broker.connect("acme-meter-2", Some(&m2)).await.unwrap();
    for filter in ["iot/#", "cmd/#", "cmd/acme/meter-1", "iotp-bridges/#"] {
        subscribe(&d2, &mut dev2, filter).await;
    }

    // %u is "acme/meter-1", '/' and all: its own topics pass, PUBACK success.
    let (d, mut dev) = broker.connect("acme-meter-1", Some(&m1)).await.unwrap();
    for kind in ["telemetry", "heartbeat"] {
        let topic = format!("iot/acme/meter-1/{kind}");
        let reason = publish(&d, &mut dev, &topic).await;
        assert!(
            matches!(
                reason,
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers
            ),
            "{topic}: {reason:?}"
        );
    }
    // Another device's, another tenant's, anything else: 0x87 Not authorized.
    for topic in [
        "iot/acme/meter-2/telemetry",
        "iot/other/meter-1/telemetry",
        "iot/acme/meter-1/telemetry/extra",
        "iot/acme/meter-1",
        "cmd/acme/meter-1",
        "cmd/acme/meter-2",
        "iotp-bridges/acme-meter-1",
    ] {
        assert_eq!(
            publish(&d, &mut dev, topic).await,
            PubAckReason::NotAuthorized,
            "{topic}"
        );
    }

    // The bridge received the device's two messages and only those; meter-2 nothing.
    assert_eq!(
        received(&mut bev, Duration::from_secs(2)).await,
        ["iot/acme/meter-1/heartbeat", "iot/acme/meter-1/telemetry"]
    );
    assert_eq!(
        received(&mut dev2, Duration::from_millis(500)).await,
        Vec::<String>::new()
    );
    // The bridge may not publish telemetry (nor commands); presence is its own.
    for topic in ["iot/acme/meter-1/telemetry", "cmd/acme/meter-1"] {
        assert_eq!(
            publish(&b, &mut bev, topic).await,
            PubAckReason::NotAuthorized,
            "{topic}"
        );
    }
    let reason = publish(&b, &mut bev, "iotp-bridges/bridge-0").await;
    assert!(
        matches!(
            reason,
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
        ),
        "{reason:?}"
    );
    // Presence is not for devices to read either.
    assert_eq!(
        received(&mut dev2, Duration::from_millis(500)).await,
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn revoked_expired_and_missing_certificates_cannot_connect() {
    let mut broker = Broker::start("refused");
    // Revoked before the broker read the CRL: SIGHUP makes it read the new one.
    let revoked = broker.device("acme", "stolen");
    broker
        .ca
        .revoke(&Target::Device {
            tenant: "acme".into(),
            device: "stolen".into(),
        })
        .unwrap();
    broker.sighup();
    let now = OffsetDateTime::now_utc();
    let expired = broker
        .ca
        .issue_device(
            "acme",
            "old",
            Validity {
                not_before: now - time::Duration::days(10),
                not_after: now - time::Duration::days(1),
            },
        )
        .unwrap();
    // A certificate of another CA (same names, other key).
    let other_dir = broker.dir.join("other-ca");
    let mut other = Ca::init(&other_dir, "iotp test CA", 30).unwrap();
    let foreign = other
        .issue_device("acme", "meter-1", Validity::days(30).unwrap())
        .unwrap();

    assert_eq!(
        refusal(&broker, "stolen", Some(&revoked)).await,
        AlertDescription::CertificateRevoked
    );
    assert_eq!(
        refusal(&broker, "old", Some(&expired)).await,
        AlertDescription::CertificateExpired
    );
    assert_eq!(
        refusal(&broker, "anonymous", None).await,
        AlertDescription::CertificateRequired
    );
    assert_eq!(
        refusal(&broker, "foreign", Some(&foreign)).await,
        AlertDescription::UnknownCA
    );
    // And a valid one still connects.
    let ok = broker.device("acme", "meter-1");
    broker.connect("ok", Some(&ok)).await.unwrap();
}

#[tokio::test]
async fn a_revocation_takes_effect_when_mosquitto_reloads_the_crl_on_sighup() {
    let mut broker = Broker::start("sighup");
    let dev = broker.device("acme", "meter-9");
    broker.connect("before", Some(&dev)).await.unwrap();
    broker
        .ca
        .revoke(&Target::Device {
            tenant: "acme".into(),
            device: "meter-9".into(),
        })
        .unwrap();
    // The broker still holds the CRL it read at start: the revoked device connects.
    broker
        .connect("not-yet", Some(&dev))
        .await
        .expect("before SIGHUP the old CRL is in force");
    broker.sighup();
    assert_eq!(
        refusal(&broker, "after", Some(&dev)).await,
        AlertDescription::CertificateRevoked
    );
    // A rotated certificate for the same device is accepted.
    let new = broker
        .ca
        .issue_device("acme", "meter-9", Validity::days(30).unwrap())
        .unwrap();
    broker.connect("rotated", Some(&new)).await.unwrap();
}
