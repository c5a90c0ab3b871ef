//! Dead letters end to end: the enricher (in process) rejects, RabbitMQ carries, this handler
//! retries, parks, archives and replays, against the real brokers.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use iotp_contract::topology::RabbitTopology;
use iotp_contract::{Codec, EnrichedTelemetry, Header, Reading, Telemetry};
use iotp_core::admin::Health;
use iotp_core::consume::StageIo;
use iotp_core::dead_letter::DeadLetterConfig;
use iotp_core::kafka::KafkaConfig;
use iotp_core::retry::Backoff;
use iotp_core::service::Context;
use iotp_core::testkit::*;
use iotp_dlq_handler::DlqConfig;
use iotp_enricher::EnricherConfig;
use iotp_store::sqlite::SqliteStore;
use iotp_store::{DeadLetterArchive, LetterFilter, StoreConfig};
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

const PROFILE: &str = r#"
[profiles.meter]
metrics = { energy = { unit = "Wh", min = 0.0, max = 1e12 } }
"#;

fn registry_text(devices: &[&str]) -> String {
    let mut text = PROFILE.to_string();
    for d in devices {
        text.push_str(&format!(
            "\n[[devices]]\ntenant = \"acme\"\nid = \"{d}\"\nprofile = \"meter\"\n"
        ));
    }
    text
}

fn record(device: &str, seq_no: i64) -> (Vec<u8>, Vec<u8>) {
    let t = Telemetry {
        header: Header {
            msg_id: format!("{device}-{seq_no}"),
            tenant: "acme".into(),
            device_id: device.into(),
            seq_no,
            produced_at: 1_700_000_000_000 + seq_no,
            received_at: 1_700_000_000_000 + seq_no,
            schema_version: 1,
        },
        kind: "telemetry".into(),
        readings: vec![Reading {
            metric: "energy".into(),
            value: 1.0,
            unit: Some("Wh".into()),
        }],
        firmware_version: None,
    };
    (
        format!("acme/{device}").into_bytes(),
        Codec::<Telemetry>::latest().unwrap().encode(&t).unwrap(),
    )
}

struct Rig {
    dir: PathBuf,
    validated: String,
    enriched: String,
    dlq: DlqConfig,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Rig {
    async fn start(devices: &[&str]) -> Self {
        iotp_core::logging::init(&iotp_core::config::Common {
            log_format: iotp_core::config::LogFormat::Text,
            log_level: std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            ..Default::default()
        });
        let dir = std::env::temp_dir().join(unique("dlq-"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("registry.toml"), registry_text(devices)).unwrap();
        let (validated, enriched) = (unique("test.validated."), unique("test.enriched."));
        create_topic(&validated, 1).await;
        create_topic(&enriched, 1).await;

        // A private copy of the dead-letter topology, with short delays.
        let names = unique("test.dlq.");
        let topo = RabbitTopology {
            dead_letter_exchange: format!("{names}.dead-letter"),
            incoming_queue: format!("{names}.incoming"),
            retry_exchange: format!("{names}.retry"),
            retry_delays: [300u64, 600, 1200]
                .iter()
                .map(|ms| Duration::from_millis(*ms).into())
                .collect(),
            parking_queue: format!("{names}.parking"),
        };
        let conn = iotp_core::amqp::connect(&amqp_uri()).await.unwrap();
        let channel = conn.create_channel().await.unwrap();
        iotp_core::amqp::declare_topology(&channel, &topo)
            .await
            .unwrap();
        let _ = conn.close(200, "ok".into()).await;

        let kafka = KafkaConfig {
            brokers: kafka_brokers(),
            ..KafkaConfig::default()
        };
        let enricher = EnricherConfig {
            kafka: kafka.clone(),
            io: StageIo {
                input_topics: vec![validated.clone()],
                output_topic: enriched.clone(),
                group: unique("test-enricher-"),
                batch_linger: Duration::from_millis(5),
                dead_letter: DeadLetterConfig {
                    amqp_uri: amqp_uri(),
                    exchange: topo.dead_letter_exchange.clone(),
                    ..Default::default()
                },
                ..StageIo::default()
            },
            registry_file: dir.join("registry.toml"),
            store: StoreConfig {
                path: dir.join("enricher.sqlite"),
                ..StoreConfig::default()
            },
            ..EnricherConfig::default()
        };
        let api_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dlq = DlqConfig {
            kafka,
            amqp_uri: amqp_uri(),
            rabbitmq: topo.clone(),
            store: StoreConfig {
                path: dir.join("dlq.sqlite"),
                ..StoreConfig::default()
            },
            api_listen: SocketAddr::from(([127, 0, 0, 1], api_port)),
            ..DlqConfig::default()
        };
        let shutdown = CancellationToken::new();
        let (enricher_health, dlq_health) = (Health::default(), Health::default());
        let ctx = |name: &'static str, health: &Health| Context {
            service: name,
            replica: format!("{name}-0"),
            shutdown: shutdown.clone(),
            health: health.clone(),
            backoff: Backoff::default(),
        };
        let tasks = vec![
            tokio::spawn(iotp_enricher::run(
                ctx("enricher", &enricher_health),
                enricher,
            )),
            tokio::spawn(iotp_dlq_handler::run(
                ctx("dlq-handler", &dlq_health),
                dlq.clone(),
            )),
        ];
        // Both have loaded their registry and store and are consuming.
        for _ in 0..200 {
            if enricher_health.is_ready() && dlq_health.is_ready() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            enricher_health.is_ready() && dlq_health.is_ready(),
            "enricher and handler ready"
        );
        Self {
            dir,
            validated,
            enriched,
            dlq,
            shutdown,
            tasks,
        }
    }

    fn set_registry(&self, devices: Option<&[&str]>) {
        let path = self.dir.join("registry.toml");
        match devices {
            Some(d) => std::fs::write(path, registry_text(d)).unwrap(),
            None => std::fs::remove_file(path).unwrap(),
        }
    }

    async fn enriched_devices(&self, want: usize) -> HashMap<String, usize> {
        let codec = Codec::<EnrichedTelemetry>::latest().unwrap();
        let out = read_topic(&self.enriched, Duration::from_secs(30), |r| r.len() >= want).await;
        let mut counts = HashMap::new();
        for m in out {
            *counts
                .entry(codec.decode(m.payload().unwrap()).unwrap().header.device_id)
                .or_default() += 1;
        }
        counts
    }

    async fn parked(
        &self,
        store: &SqliteStore,
        filter: &LetterFilter,
        want: usize,
    ) -> Vec<iotp_store::Archived> {
        for _ in 0..120 {
            let found = store.letters(filter).await.unwrap();
            if found.len() >= want {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        store.letters(filter).await.unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            t.await.unwrap().unwrap();
        }
    }
}

fn api(rig: &Rig, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(rig.dlq.api_listen).unwrap();
    write!(s, "{method} {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    (
        out[9..12].parse().unwrap(),
        out.split_once("\r\n\r\n").unwrap().1.to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_failure_is_retried_until_the_registry_is_back_and_parked_ones_replay_once() {
    let rig = Rig::start(&["m-1", "t-dev"]).await;
    let store = SqliteStore::open(Path::new(&rig.dlq.store.path)).unwrap();

    // Unknown device: permanent, parked at once.
    produce(&rig.validated, &[record("m-1", 0), record("late-dev", 0)]).await;
    let parked = rig
        .parked(
            &store,
            &LetterFilter {
                reason: Some("unknown_device".into()),
                ..LetterFilter::default()
            },
            1,
        )
        .await;
    assert_eq!(parked.len(), 1);
    assert_eq!(
        (
            parked[0].letter.attempts,
            parked[0].letter.device_id.as_deref()
        ),
        (1, Some("late-dev"))
    );
    assert_eq!(
        parked[0].letter.payload,
        record("late-dev", 0).1,
        "original bytes archived"
    );

    // Registry source gone: a record for a device the cached registry lacks is transient.
    rig.set_registry(None);
    produce(&rig.validated, &[record("new-dev", 0)]).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    rig.set_registry(Some(&["m-1", "t-dev", "new-dev"]));
    let counts = rig.enriched_devices(2).await;
    assert_eq!(
        counts.get("new-dev"),
        Some(&1),
        "retried after the registry came back: {counts:?}"
    );

    // Fix the parked one (add the device) and replay it through the API: it arrives once.
    rig.set_registry(Some(&["m-1", "t-dev", "new-dev", "late-dev"]));
    let (status, dry) = api(
        &rig,
        "POST",
        "/dead-letters/replay",
        r#"{"reason":"unknown_device","dry_run":true}"#,
    );
    assert_eq!(status, 200);
    assert!(
        dry.contains(&parked[0].letter.id) && dry.contains("\"dry_run\":true"),
        "{dry}"
    );
    let (status, listed) = api(&rig, "GET", "/dead-letters?reason=unknown_device", "");
    assert!(
        status == 200 && listed.contains("late-dev"),
        "dry run replays nothing: {listed}"
    );
    let (status, shown) = api(
        &rig,
        "GET",
        &format!("/dead-letters/{}", parked[0].letter.id),
        "",
    );
    assert!(
        status == 200 && shown.contains("\"schema\":\"telemetry\""),
        "{shown}"
    );
    // The CLI sees the same.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_iotp-dlq"))
            .arg("--api")
            .arg(rig.dlq.api_listen.to_string())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "iotp-dlq {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(cli(&["list", "--reason", "unknown_device"]).contains("late-dev"));
    assert!(
        cli(&["replay", "--reason", "unknown_device", "--dry-run"]).contains(&parked[0].letter.id)
    );
    assert!(cli(&["show", &parked[0].letter.id]).contains("unknown_device"));
    let (status, body) = api(
        &rig,
        "POST",
        "/dead-letters/replay",
        r#"{"reason":"unknown_device"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let (_, again) = api(
        &rig,
        "POST",
        "/dead-letters/replay",
        r#"{"reason":"unknown_device"}"#,
    );
    assert!(
        again.contains("\"ids\":[]"),
        "a replayed dead letter is not replayed twice: {again}"
    );
    let counts = rig.enriched_devices(3).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts_later = rig.enriched_devices(3).await;
    assert_eq!(counts.get("late-dev"), Some(&1), "{counts:?}");
    assert_eq!(
        counts_later.get("late-dev"),
        Some(&1),
        "exactly once: {counts_later:?}"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_failure_that_never_recovers_parks_after_the_configured_attempts() {
    let rig = Rig::start(&["m-1"]).await;
    let store = SqliteStore::open(Path::new(&rig.dlq.store.path)).unwrap();
    rig.set_registry(None);
    produce(&rig.validated, &[record("ghost", 0)]).await;
    let parked = rig.parked(&store, &LetterFilter::default(), 1).await;
    assert_eq!(parked.len(), 1);
    let l = &parked[0].letter;
    assert_eq!(l.reason_code, "registry_unavailable");
    assert_eq!(l.attempts, 4, "first failure plus three retries");
    assert!(
        l.last_failure_at - l.first_failure_at >= 2_000,
        "delays of 300, 600, 1200 ms grew: {} ms",
        l.last_failure_at - l.first_failure_at
    );
    rig.stop().await;
}

/// A replay Kafka refuses for good (the record is over `message.max.bytes`) parks the letter
/// instead of retrying it until the handler stops (`give_up_after`, 5 min here); and a letter
/// with a reason of a record Kafka refused for good parks at once even if flagged transient.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn letters_kafka_refuses_for_good_are_parked_not_retried() {
    use iotp_contract::DeadLetter;
    use iotp_core::dead_letter::DeadLetterPublisher;
    let rig = Rig::start(&["m-1"]).await;
    let store = SqliteStore::open(Path::new(&rig.dlq.store.path)).unwrap();
    let mut publisher = DeadLetterPublisher::new(DeadLetterConfig {
        amqp_uri: amqp_uri(),
        exchange: rig.dlq.rabbitmq.dead_letter_exchange.clone(),
        ..Default::default()
    })
    .unwrap();
    let letter = |id: &str, reason: &str| DeadLetter {
        id: id.into(),
        stage: "enricher".into(),
        reason_code: reason.into(),
        error: "test".into(),
        source_topic: Some(rig.validated.clone()),
        source_partition: Some(0),
        source_offset: Some(0),
        key: Some(b"acme/m-1".to_vec()),
        payload: vec![b'x'; 1_100_000],
        tenant: Some("acme".into()),
        device_id: Some("m-1".into()),
        attempts: 1,
        first_failure_at: 1,
        last_failure_at: 1,
    };
    // Transient: waits 300 ms, then its replay is refused for good.
    publisher
        .publish(&letter("huge-replay", "registry_unavailable"), true)
        .await
        .unwrap();
    publisher
        .publish(&letter("huge-output", "output_too_large"), true)
        .await
        .unwrap();
    publisher.close().await;
    let parked = rig.parked(&store, &LetterFilter::default(), 2).await;
    let mut ids: Vec<&str> = parked.iter().map(|a| a.letter.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec!["huge-output", "huge-replay"]);
    let output = parked
        .iter()
        .find(|a| a.letter.id == "huge-output")
        .unwrap();
    assert_eq!(output.letter.attempts, 1, "parked without a retry");
    assert_eq!(output.letter.payload.len(), 1_100_000);
    rig.stop().await;
}
