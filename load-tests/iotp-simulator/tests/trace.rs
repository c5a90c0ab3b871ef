//! One message followed by its trace id through the whole pipeline, as an operator would in a
//! tracing backend: the six service binaries (the load tool's stack: a Tansu and a Mosquitto
//! of the test's own, the machine's RabbitMQ), each exporting its spans with the real OTLP/HTTP
//! exporter to a collector stand-in inside the test (`iotp_core::testkit::OtlpReceiver`).
//! - a reading with the device's `traceparent` and one without (the bridge starts its trace)
//!   end in the store, and the bridge, parser, enricher and upserter spans link to each trace,
//!   the upserter's store commit a child of its batch span; the spans are sent at shutdown
//!   (the export interval is an hour), so this also shows the exporter flushed on SIGTERM;
//! - a malformed reading is dead-lettered by the parser and followed into the dead-letter
//!   archive: the DLQ handler's spans for parking and archiving link to its trace.
//!
//! Needs the service binaries beside `iotp-load` (`cargo test --workspace` builds them; alone:
//! `cargo build --bins` first), RabbitMQ, Mosquitto and the Tansu `make up` builds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use iotp_core::testkit::{self, OtlpReceiver, ReceivedSpan};
use iotp_simulator::chaos::Chaos;
use iotp_simulator::device::{self, Device};
use iotp_simulator::load::ServiceEnv;
use iotp_simulator::stack::{Stack, StackConfig};
use iotp_store::sqlite::SqliteStore;
use iotp_store::{DeadLetterArchive, LetterFilter, ReadingStore, RollupStore};
use rand::SeedableRng;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

/// One pipeline at a time: both use the same admin ports.
static ONE_RUN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const BRIDGE: &str = "iotp-mqtt-bridge";
const DEVICE: &str = "dev-000000";

struct Pipeline {
    stack: Stack,
    receiver: OtlpReceiver,
    tenant: String,
    run_dir: PathBuf,
}

fn bin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_iotp-load"))
        .parent()
        .unwrap()
        .to_path_buf();
    for bin in [
        "iotp-topology",
        "iotp-mqtt-bridge",
        "iotp-parser",
        "iotp-enricher",
        "iotp-upserter",
        "iotp-aggregator",
        "iotp-dlq-handler",
    ] {
        assert!(
            dir.join(bin).exists(),
            "{bin} is not in {}: `cargo build --bins` (cargo test --workspace builds it)",
            dir.display()
        );
    }
    dir
}

/// The stack, every service exporting to a fresh receiver every `export_interval`.
async fn pipeline(name: &str, export_interval: &str) -> Pipeline {
    let receiver = OtlpReceiver::start().await;
    let tenant = testkit::unique(&format!("trace-{name}-"));
    let run_dir = std::env::temp_dir().join(format!("iotp-{tenant}"));
    std::fs::create_dir_all(&run_dir).unwrap();
    let registry = run_dir.join("registry.toml");
    std::fs::write(&registry, device::registry_toml(&tenant, 1, 1)).unwrap();
    let tansu =
        PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/iotp/tansu-0.6.0/bin/tansu");
    assert!(
        tansu.exists(),
        "{} missing: `make up` builds it",
        tansu.display()
    );
    let kafka_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let all = |key: &str, value: &str| ServiceEnv {
        service: None,
        key: key.into(),
        value: value.into(),
    };
    let cfg = StackConfig {
        bin_dir: bin_dir(),
        run_dir: run_dir.clone(),
        mqtt_port: 0,
        own_mosquitto: true,
        kafka: format!("127.0.0.1:{kafka_port}"),
        tansu: Some(tansu),
        engine: "memory".into(),
        admin_port: 9451,
        api_port: 9551,
        env: vec![
            all("IOTP__COMMON__TRACING__OTLP_ENDPOINT", &receiver.endpoint),
            all("IOTP__COMMON__TRACING__EXPORT_INTERVAL", export_interval),
        ],
        tenants: vec![tenant.clone()],
        amqp_uri: testkit::amqp_uri(),
        chaos: Chaos::default(),
        repo: Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
        tls: None,
        partitions: None,
    };
    let stack = Stack::start(&cfg, &registry, 1)
        .await
        .unwrap_or_else(|e| panic!("pipeline: {e:#} (logs in {})", run_dir.display()));
    Pipeline {
        stack,
        receiver,
        tenant,
        run_dir,
    }
}

impl Pipeline {
    /// Publish `payload` as `DEVICE`'s telemetry (QoS 1) with `traceparent` as its MQTT 5 user
    /// property, and wait for the broker's PUBACK.
    async fn publish(&self, payload: Vec<u8>, traceparent: Option<&str>) {
        let mut opts = MqttOptions::new(
            testkit::unique("trace-device-"),
            "127.0.0.1",
            self.stack.mqtt_port(),
        );
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(opts, 8);
        let properties = PublishProperties {
            user_properties: traceparent
                .map(|t| vec![("traceparent".to_string(), t.to_string())])
                .unwrap_or_default(),
            ..PublishProperties::default()
        };
        let topic = format!("iot/{}/{DEVICE}/telemetry", self.tenant);
        client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, properties)
            .await
            .unwrap();
        let acked = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.unwrap() {
                    return;
                }
            }
        })
        .await;
        assert!(acked.is_ok(), "no PUBACK from mosquitto");
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    }

    fn store(&self) -> SqliteStore {
        SqliteStore::open(&self.stack.store_path).unwrap()
    }

    async fn stop(self) -> Vec<ReceivedSpan> {
        let exits = self.stack.stop_services().await;
        for (replica, code) in &exits {
            assert_eq!(*code, Some(0), "{replica} exited {code:?}");
        }
        self.stack.stop_brokers().await;
        // The last export may still be in flight when the process ends its shutdown.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let spans = self.receiver.spans();
        let _ = std::fs::remove_dir_all(&self.run_dir);
        spans
    }
}

/// A telemetry reading of `DEVICE`, number `seq_no`, valid for its profile.
fn reading(seq_no: u64) -> Vec<u8> {
    let mut device = Device::new(0);
    device.seq_no = seq_no;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seq_no);
    device.next_payload(&mut rng, iotp_contract::now_millis())
}

/// The span of `service` that links to `trace`; fails with what was received otherwise.
fn linked<'a>(spans: &'a [ReceivedSpan], service: &str, trace: &str) -> &'a ReceivedSpan {
    spans
        .iter()
        .find(|s| s.service == service && s.links_to(trace))
        .unwrap_or_else(|| {
            panic!(
                "no {service} span links to trace {trace}: {}",
                summary(spans)
            )
        })
}

/// The child of `parent` named `name`.
fn child<'a>(spans: &'a [ReceivedSpan], parent: &ReceivedSpan, name: &str) -> &'a ReceivedSpan {
    spans
        .iter()
        .find(|s| {
            s.name == name && s.trace_id == parent.trace_id && s.parent_span_id == parent.span_id
        })
        .unwrap_or_else(|| {
            panic!(
                "no {name} span under {} {}: {}",
                parent.service,
                parent.name,
                summary(spans)
            )
        })
}

fn summary(spans: &[ReceivedSpan]) -> String {
    spans
        .iter()
        .map(|s| format!("\n  {} {:?} links {:?}", s.service, s.name, s.links))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_is_followed_by_its_trace_id_from_the_publish_to_the_store_commit() {
    let _one = ONE_RUN.lock().await;
    // Spans leave only at shutdown: what arrives was flushed on SIGTERM.
    let p = pipeline("stored", "1h").await;
    let device_trace = iotp_core::trace::start();
    let device_trace_id = device_trace[3..35].to_string();
    p.publish(reading(0), Some(&device_trace)).await;
    p.publish(reading(1), None).await;
    let store = p.store();
    // Stored by the upserter and folded by the aggregator (both consume iotp.enriched):
    // a service stopped before its batch was done would have no span to send.
    let (mut stored, mut folded) = (0, false);
    for _ in 0..600 {
        stored = store.message_count(Some(&p.tenant)).await.unwrap();
        folded = !store.buckets(&p.tenant, DEVICE).await.unwrap().is_empty();
        if stored == 2 && folded {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(folded, "folded (logs in {})", p.run_dir.display());
    assert_eq!(
        stored,
        2,
        "both readings stored (logs in {})",
        p.run_dir.display()
    );
    assert_eq!(p.receiver.requests(), 0, "nothing exported before shutdown");
    let spans = p.stop().await;

    // The device's trace, hop by hop.
    let bridge = linked(&spans, BRIDGE, &device_trace_id);
    assert_eq!(bridge.attr("messaging.destination.name"), Some("iotp.raw"));
    for service in ["iotp-parser", "iotp-enricher", "iotp-upserter"] {
        let span = linked(&spans, service, &device_trace_id);
        assert_ne!(span.trace_id, device_trace_id, "a batch is its own trace");
        assert!(!span.failed, "{service}: {span:?}");
    }
    let upserter = linked(&spans, "iotp-upserter", &device_trace_id);
    let commit = child(&spans, upserter, "store write_messages");
    assert_eq!(commit.attr("db.system.name"), Some("sqlite"));
    let enricher = linked(&spans, "iotp-enricher", &device_trace_id);
    child(&spans, enricher, "store apply_twins");
    let aggregator = linked(&spans, "iotp-aggregator", &device_trace_id);
    child(&spans, aggregator, "store fold");

    // The reading without one: the bridge started its trace, and it goes the same way.
    let started: Vec<&str> = spans
        .iter()
        .filter(|s| s.service == BRIDGE)
        .flat_map(|s| s.links.iter().map(|(t, _)| t.as_str()))
        .filter(|t| *t != device_trace_id)
        .collect();
    assert_eq!(
        started.len(),
        1,
        "one trace started by the bridge: {started:?}"
    );
    for service in ["iotp-parser", "iotp-enricher", "iotp-upserter"] {
        linked(&spans, service, started[0]);
    }
    for s in &spans {
        assert!(
            s.service.starts_with("iotp-"),
            "resource service.name: {s:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_reading_is_followed_by_its_trace_id_into_the_dead_letter_archive() {
    let _one = ONE_RUN.lock().await;
    let p = pipeline("rejected", "200ms").await;
    let trace = iotp_core::trace::start();
    let trace_id = trace[3..35].to_string();
    p.publish(b"{not json".to_vec(), Some(&trace)).await;

    // Parked, archived, and the archive span received.
    let archived = p
        .receiver
        .wait_for(Duration::from_secs(60), |spans| {
            spans.iter().any(|s| {
                s.service == "iotp-dlq-handler"
                    && s.links_to(&trace_id)
                    && s.attr("iotp.route") == Some("archive")
            })
        })
        .await;
    let letters = p
        .store()
        .letters(&LetterFilter {
            stage: Some("parser".into()),
            ..LetterFilter::default()
        })
        .await
        .unwrap();
    let spans = p.receiver.spans();
    assert!(
        archived,
        "no archive span linked to {trace_id}: {}",
        summary(&spans)
    );
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].letter.reason_code, "malformed_payload");

    let parser = linked(&spans, "iotp-parser", &trace_id);
    assert_eq!(parser.attr("iotp.rejected"), Some("1"), "{parser:?}");
    let handled: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.service == "iotp-dlq-handler" && s.links_to(&trace_id))
        .collect();
    let route = |r: &str| {
        let of: Vec<&&ReceivedSpan> = handled
            .iter()
            .filter(|s| s.attr("iotp.route") == Some(r))
            .collect();
        assert_eq!(of.len(), 1, "one {r} span: {handled:?}");
        *of[0]
    };
    assert_eq!(handled.len(), 2, "{handled:?}");
    let parked = route("park");
    assert!(parked.name.starts_with("process ") && parked.name.ends_with(".incoming"));
    let archive = route("archive");
    assert!(archive.name.ends_with(".parking"), "{:?}", archive.name);
    let commit = child(&spans, archive, "store archive");
    assert!(!commit.failed);
    let _ = p.stop().await;
}
