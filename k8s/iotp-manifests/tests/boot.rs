//! The boot test: every service of docker-compose.yml and of k8s/overlays/dev started from its
//! real binary with exactly the configuration its manifest gives it (see `boot.rs` for what is
//! mapped to the local brokers), each must reach `/readyz`, and the pipeline must store a
//! message published over MQTT. Needs the brokers `make up` starts and the service binaries
//! (`cargo test --workspace` builds them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use iotp_manifests::boot::{
    effective_config, endpoint_problems, mapped_env, prepare, run_names, Local, Running,
};
use iotp_manifests::launch::{from_overlay, Launch};
use iotp_manifests::objects::{render, Object};
use iotp_manifests::{compose, root};

fn bin_dir() -> PathBuf {
    // target/debug/deps/boot-… → target/debug
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    assert!(
        dir.join("iotp-parser").exists(),
        "no service binaries in {}: build them first (`cargo build --workspace --bins`; \
         `cargo test --workspace` does)",
        dir.display()
    );
    dir
}

fn scratch(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("iotp-boot-{}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    dir
}

/// Each service's configuration is accepted and takes every endpoint from the manifest.
fn check(
    label: &str,
    launches: &[Launch],
    dir: &Path,
) -> Vec<(iotp_manifests::boot::Prepared, toml::Table)> {
    let bins = bin_dir();
    let prepared = prepare(launches, dir).unwrap();
    assert_eq!(
        prepared.len(),
        6,
        "{label}: {} services, want the six",
        prepared.len()
    );
    let mut problems = Vec::new();
    let mut out = Vec::new();
    for p in prepared {
        match effective_config(&bins, &p) {
            Ok(config) => {
                problems.extend(endpoint_problems(&p, &config));
                out.push((p, config));
            }
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    assert!(
        problems.is_empty(),
        "{label}: the manifest does not configure its services:\n  {}",
        problems.join("\n  ")
    );
    out
}

/// Publish one telemetry message per registered device (they hash to different partitions).
fn publish(local: &Local, devices: &[(&str, &str)]) {
    let id = format!("iotp-boot-{}-publisher", std::process::id());
    let mut opts = rumqttc::MqttOptions::new(id, &local.mqtt_host, local.mqtt_port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut connection) = rumqttc::Client::new(opts, 64);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for (i, (device, reading)) in devices.iter().enumerate() {
        let payload = format!(
            r#"{{"msgId":"boot-{now}-{i}","deviceId":"{device}","seqNo":{now},"producedAt":{now},"schemaVersion":1,"readings":[{reading}]}}"#
        );
        client
            .publish(
                format!("iot/demo/{device}/telemetry"),
                rumqttc::QoS::AtLeastOnce,
                false,
                payload,
            )
            .unwrap();
    }
    let mut acked = 0;
    for event in connection.iter() {
        if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = event.expect("mqtt") {
            acked += 1;
            if acked == devices.len() {
                break;
            }
        }
    }
    let _ = client.disconnect();
}

fn boot(label: &str, launches: &[Launch]) {
    let started = Instant::now();
    let dir = scratch(label);
    let local = Local::from_env();
    let services = check(label, launches, &dir);
    let bins = bin_dir();
    let store = dir.join("volumes").join("embedded-override");
    std::fs::create_dir_all(&store).unwrap();
    let run = format!("iotp-boot-{}-{label}", std::process::id()).replace('+', "-");
    let (topics, dead) = run_names(&run);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let kafka = iotp_core::kafka::KafkaConfig {
            brokers: local.kafka.clone(),
            ..Default::default()
        };
        iotp_core::kafka::ensure_topics(&kafka.admin("iotp-boot").unwrap(), &topics, 1)
            .await
            .unwrap();
        let conn = iotp_core::amqp::connect(&local.amqp).await.unwrap();
        iotp_core::amqp::declare_topology(&conn.create_channel().await.unwrap(), &dead)
            .await
            .unwrap();
        let _ = conn.close(200, "declared".into()).await;
    });
    let mut running = Vec::new();
    for (p, config) in &services {
        let (env, mapped) =
            mapped_env(p, config, &local, &store.join("iotp.sqlite"), &run).unwrap();
        eprintln!("{label}: {} mapped here: {}", p.binary, mapped.join(" "));
        running.push(Running::start(&bins, p, &env, &dir.join("logs")).unwrap());
    }
    for r in &mut running {
        let took = r.wait_ready(Duration::from_secs(60)).unwrap();
        eprintln!("{label}: {} ready after {took:.1?}", r.binary);
    }
    // Registered in k8s/base/registry.toml (the manifests' registry), one per profile.
    let devices: Vec<(String, &str)> = (0..10)
        .map(|i| {
            let reading = match i % 3 {
                0 => r#"{"metric":"power","value":1200.0,"unit":"W"}"#,
                1 => r#"{"metric":"temperature","value":21.5,"unit":"Cel"}"#,
                _ => r#"{"metric":"vibration_rms","value":3.2,"unit":"mm/s"}"#,
            };
            (format!("dev-{i:06}"), reading)
        })
        .collect();
    let devices: Vec<(&str, &str)> = devices.iter().map(|(d, r)| (d.as_str(), *r)).collect();
    let upserter = running
        .iter()
        .find(|r| r.binary == "iotp-upserter")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Ready means connected; the bridge's subscription may still be on its way, and a message
    // published before it is for nobody: publish again every 10 s until something is stored.
    let mut published: Option<Instant> = None;
    let stored = loop {
        if published.is_none_or(|p| p.elapsed() >= Duration::from_secs(10)) {
            publish(&local, &devices);
            published = Some(Instant::now());
        }
        let stored = upserter.metric("iotp_messages_stored_total");
        if stored >= 1.0 || Instant::now() > deadline {
            break stored;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let tails: Vec<String> = running
        .iter()
        .map(|r| format!("--- {}\n{}", r.binary, r.log_tail()))
        .collect();
    assert!(
        stored >= 1.0,
        "{label}: nothing stored within 60 s of publishing {} messages\n{}",
        devices.len(),
        tails.join("\n")
    );
    eprintln!(
        "{label}: the upserter stored {stored} of {} messages published",
        devices.len()
    );
    for r in &mut running {
        let code = r.stop(Duration::from_secs(30)).unwrap();
        assert_eq!(
            code,
            Some(0),
            "{label}: {} did not stop cleanly on SIGTERM:\n{}",
            r.binary,
            r.log_tail()
        );
    }
    runtime.block_on(async {
        let conn = iotp_core::amqp::connect(&local.amqp).await.unwrap();
        iotp_core::amqp::delete_topology(&conn.create_channel().await.unwrap(), &dead)
            .await
            .unwrap();
        let _ = conn.close(200, "deleted".into()).await;
    });
    eprintln!(
        "{label}: booted, processed and stopped in {:.1?}",
        started.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn compose_launches(files: &[&str]) -> Vec<Launch> {
    let root = root();
    let vars =
        compose::env_file(&std::fs::read_to_string(root.join(".env.example")).unwrap()).unwrap();
    let model = compose::load(&root, files).unwrap();
    compose::launches(&files.join("+"), &model, &vars, &root).unwrap()
}

/// Compose (MongoDB: checked; embedded: booted) and the dev overlay (booted), one after the
/// other: both runs would print their mapped settings into one interleaved log otherwise.
#[test]
fn every_service_boots_with_its_manifest_configuration_and_the_pipeline_stores_a_message() {
    // MongoDB-backed compose: configuration and endpoints (no MongoDB server here to boot on).
    let mongo = compose_launches(&["docker-compose.yml"]);
    check("compose", &mongo, &scratch("compose-check"));
    boot(
        "compose+embedded",
        &compose_launches(&["docker-compose.yml", "docker-compose.embedded.yml"]),
    );
    let dev = render(&root().join("k8s/overlays/dev")).unwrap();
    let launches = from_overlay("dev", &dev, &[]);
    scaling_follows_what_the_services_consume(
        &dev,
        &check("k8s-dev", &launches, &scratch("k8s-dev-check")),
    );
    boot("k8s-dev", &launches);
}

/// KEDA must scale each service on the group and topic (or queue) its effective configuration
/// consumes, as the binary itself prints it.
fn scaling_follows_what_the_services_consume(
    objects: &[Object],
    services: &[(iotp_manifests::boot::Prepared, toml::Table)],
) {
    let mut checked = 0;
    for o in objects {
        let Object::ScaledObject(so) = o else {
            continue;
        };
        let (_, config) = services
            .iter()
            .find(|(p, _)| p.name == so.spec.scale_target_ref.name)
            .unwrap_or_else(|| panic!("{}: its target runs no service", o.id()));
        for t in &so.spec.triggers {
            let (want, got) = match t.kind.as_str() {
                "kafka" => (
                    (
                        t.metadata["consumerGroup"].clone(),
                        vec![t.metadata["topic"].clone()],
                    ),
                    (
                        config["io"]["group"].as_str().unwrap().to_string(),
                        config["io"]["input_topics"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|v| v.as_str().unwrap().to_string())
                            .collect(),
                    ),
                ),
                "rabbitmq" => (
                    (t.metadata["queueName"].clone(), vec![]),
                    (
                        config["rabbitmq"]["incoming_queue"]
                            .as_str()
                            .unwrap()
                            .to_string(),
                        vec![],
                    ),
                ),
                // The bridge scales on the broker backlog it exports: the query's metric must
                // be one the runtime registers, on a service that has an MQTT session.
                "prometheus" => {
                    let query = &t.metadata["query"];
                    let exported = iotp_core::metrics::metrics().render();
                    let metric = query
                        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .find(|w| w.starts_with("iotp_"))
                        .unwrap_or_default()
                        .to_string();
                    let registered = exported
                        .lines()
                        .any(|l| l.starts_with(&format!("# TYPE {metric} ")));
                    (
                        (metric.clone(), vec!["mqtt".to_string()]),
                        (
                            if registered { metric } else { String::new() },
                            config
                                .get("mqtt")
                                .map(|_| vec!["mqtt".to_string()])
                                .unwrap_or_default(),
                        ),
                    )
                }
                other => panic!("{}: trigger {other}", o.id()),
            };
            assert_eq!(
                want,
                got,
                "{}: KEDA's trigger and what the service consumes differ",
                o.id()
            );
            checked += 1;
        }
    }
    assert_eq!(
        checked, 6,
        "parser, enricher, upserter, aggregator on lag; dlq-handler on its queue; mqtt-bridge on the broker backlog"
    );
}
