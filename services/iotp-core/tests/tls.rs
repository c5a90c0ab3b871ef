//! TLS on the Kafka and RabbitMQ links, through the real clients (librdkafka with OpenSSL,
//! lapin with rustls) against the real brokers. Neither local broker speaks TLS here (Tansu
//! 0.6.0 has no working TLS listener; the local RabbitMQ has no certificates), so each test
//! puts a small TLS terminator (tokio-rustls, a CA and certificates made by the test with
//! rcgen) in front of one and requires a client certificate signed by the test's CA.
//!
//! Kafka: a Tansu of the test's own (`IOTP_TANSU`, default the one `make up` builds), which
//! advertises the terminator's address, so that every connection the client opens (bootstrap
//! and broker) goes through TLS. RabbitMQ: the local one (`IOTP_TEST_AMQP`'s host).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iotp_contract::topology::TopicSpec;
use iotp_core::amqp::AmqpTls;
use iotp_core::kafka::source::KafkaSource;
use iotp_core::kafka::{ensure_topics, KafkaConfig, KafkaSink};
use iotp_core::stage::Output;
use iotp_core::testkit::unique;
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};

/// A CA, a server certificate for `localhost` and 127.0.0.1, and a client certificate, as
/// PEM files in a directory of the test's own.
struct Pki {
    dir: PathBuf,
    ca: CertificateDer<'static>,
    server: (CertificateDer<'static>, PrivateKeyDer<'static>),
}

impl Pki {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("iotp-tls-"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "iotp test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, cn: &str| {
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &ca).unwrap();
            (cert, key)
        };
        let (server, server_key) = leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "localhost",
        );
        let (client, client_key) = leaf(
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            "iotp-test-client",
        );
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("client.pem"), client.pem()).unwrap();
        std::fs::write(dir.join("client.key"), client_key.serialize_pem()).unwrap();
        Self {
            ca: ca.der().clone(),
            server: (
                server.der().clone(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
            ),
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A server configuration that requires a client certificate signed by the CA.
    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        iotp_core::crypto::install_default_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
            .build()
            .unwrap();
        let config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.server.0.clone()], self.server.1.clone_key())
            .unwrap();
        Arc::new(config)
    }
}

/// A TLS terminator on `listener`: each connection's TLS is ended here and its bytes go on,
/// in clear, to `upstream`. Counts the handshakes that succeeded.
fn terminate(
    listener: TcpListener,
    upstream: SocketAddr,
    config: Arc<rustls::ServerConfig>,
) -> Arc<AtomicUsize> {
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counted = handshakes.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let Ok(mut plain) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    handshakes
}

/// A free port on 127.0.0.1 (free when asked; the caller binds it soon after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Tansu of this test's own, in memory, on `port`, advertising `advertised`.
struct Tansu(Child);

impl Tansu {
    fn start(port: u16, advertised: SocketAddr, dir: &Path) -> Self {
        let binary = std::env::var("IOTP_TANSU")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap())
                    .join(".cache/iotp/tansu-0.6.0/bin/tansu")
            });
        assert!(
            binary.exists(),
            "no Tansu at {} (`make up` builds it; or set IOTP_TANSU)",
            binary.display()
        );
        let log = std::fs::File::create(dir.join("tansu.log")).unwrap();
        let child = Command::new(binary)
            .current_dir(dir)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{port}"),
                "--advertised-listener-url",
                &format!("tcp://{advertised}"),
                "--storage-engine",
                "memory://tansu/",
            ])
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .env_remove("STORAGE_ENGINE")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "Tansu did not listen on :{port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self(child)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_records_round_trip_through_tls_with_a_client_certificate() {
    let pki = Pki::new();
    let tls_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_addr = tls_listener.local_addr().unwrap();
    let plain_port = free_port();
    let _tansu = Tansu::start(plain_port, tls_addr, &pki.dir);
    let handshakes = terminate(
        tls_listener,
        SocketAddr::from(([127, 0, 0, 1], plain_port)),
        pki.server_config(),
    );

    let kafka = KafkaConfig {
        brokers: tls_addr.to_string(),
        security_protocol: "ssl".into(),
        ssl_ca_location: Some(pki.path("ca.pem")),
        ssl_certificate_location: Some(pki.path("client.pem")),
        ssl_key_location: Some(pki.path("client.key")),
        ..KafkaConfig::default()
    };
    assert_eq!(kafka.problems(), Vec::<String>::new());
    let topic = unique("tls-");
    let spec = TopicSpec {
        name: topic.clone(),
        partitions: 2,
        schema: "raw-envelope".into(),
        retention_hours: 1,
        about: "TLS test".into(),
    };
    ensure_topics(&kafka.admin("tls-admin").unwrap(), &[spec], 1)
        .await
        .unwrap();

    let sink = KafkaSink::new(
        &kafka,
        "tls-producer",
        topic.clone(),
        iotp_core::retry::Backoff::default(),
    )
    .unwrap();
    let outputs: Vec<Output> = (0..20)
        .map(|i| Output::new(format!("dev-{}", i % 4), format!("record-{i}").into_bytes()))
        .collect();
    let refs: Vec<&Output> = outputs.iter().collect();
    let refused = sink
        .send_all(&refs, &tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    assert!(refused.is_empty(), "refused: {}", refused.len());

    let source = KafkaSource::subscribe(
        &kafka,
        &unique("tls-group-"),
        "tls-consumer",
        std::slice::from_ref(&topic),
        "tls-test",
    )
    .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(60);
    while seen.len() < 20 && Instant::now() < until {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(2), source.first()).await {
            // The records come bundled (`kafka.bundle_max_bytes`): as a stage sees them.
            let mut inputs = Vec::new();
            iotp_core::kafka::source::inputs(&m, &mut inputs);
            for input in inputs {
                seen.insert(String::from_utf8(input.payload.to_vec()).unwrap());
            }
        }
    }
    let expected: std::collections::BTreeSet<String> =
        (0..20).map(|i| format!("record-{i}")).collect();
    assert_eq!(seen, expected);
    // Admin, producer and consumer (bootstrap, then the advertised broker) all came through
    // the terminator: nothing else listens on the advertised address.
    assert!(handshakes.load(Ordering::SeqCst) >= 3, "{handshakes:?}");
    // The client certificate's expiry is exported.
    let expiry = iotp_core::metrics::metrics()
        .tls_cert_expiry_timestamp_seconds
        .with_label_values(&["kafka", "client"])
        .get();
    assert!(expiry > 1_700_000_000, "{expiry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_without_the_right_ca_does_not_connect() {
    let pki = Pki::new();
    let other = Pki::new();
    let tls_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_addr = tls_listener.local_addr().unwrap();
    // Nothing behind it: the handshake is what is tested.
    let handshakes = terminate(
        tls_listener,
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        pki.server_config(),
    );
    let kafka = KafkaConfig {
        brokers: tls_addr.to_string(),
        security_protocol: "ssl".into(),
        ssl_ca_location: Some(other.path("ca.pem")),
        ssl_certificate_location: Some(other.path("client.pem")),
        ssl_key_location: Some(other.path("client.key")),
        ..KafkaConfig::default()
    };
    let count = tokio::time::timeout(
        Duration::from_secs(30),
        iotp_core::kafka::count_records(&kafka, "any"),
    )
    .await
    .expect("count_records returns within its timeout");
    assert!(count.is_err(), "{count:?}");
    assert_eq!(handshakes.load(Ordering::SeqCst), 0);
}

/// A TLS terminator requiring a client certificate in front of the local RabbitMQ; the
/// `amqps://` URI that reaches it.
async fn rabbitmq_behind_tls(pki: &Pki) -> String {
    let plain = iotp_core::testkit::amqp_uri();
    let parsed: lapin::uri::AMQPUri = plain.parse().unwrap();
    let upstream: SocketAddr =
        tokio::net::lookup_host((parsed.authority.host.as_str(), parsed.authority.port))
            .await
            .unwrap()
            .next()
            .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    terminate(listener, upstream, pki.server_config());
    let user = &parsed.authority.userinfo;
    format!(
        "amqps://{}:{}@localhost:{port}/%2f",
        user.username, user.password
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_client_certificate_declares_publishes_and_consumes() {
    let pki = Pki::new();
    let uri = rabbitmq_behind_tls(&pki).await;
    let tls = AmqpTls {
        ca_file: Some(pki.path("ca.pem")),
        cert_file: Some(pki.path("client.pem")),
        key_file: Some(pki.path("client.key")),
    };
    assert_eq!(tls.problems("amqp_tls", &uri), Vec::<String>::new());
    let conn = iotp_core::amqp::connect_with(&uri, &tls).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let queue = unique("tls-");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"over tls",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let mut got = None;
    for _ in 0..50 {
        if let Some(m) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            got = Some(m.delivery.data.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(got.as_deref(), Some(&b"over tls"[..]));
    conn.close(200, "done".into()).await.unwrap();
    let expiry = iotp_core::metrics::metrics()
        .tls_cert_expiry_timestamp_seconds
        .with_label_values(&["amqp", "client"])
        .get();
    assert!(expiry > 1_700_000_000, "{expiry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_without_a_client_certificate_is_refused() {
    let pki = Pki::new();
    let uri = rabbitmq_behind_tls(&pki).await;
    let tls = AmqpTls {
        ca_file: Some(pki.path("ca.pem")),
        ..AmqpTls::default()
    };
    let err = match iotp_core::amqp::connect_with(&uri, &tls).await {
        Ok(_) => panic!("connected without a client certificate"),
        Err(e) => format!("{e:?} / {e}"),
    };
    assert!(err.contains("CertificateRequired"), "{err}");
}
