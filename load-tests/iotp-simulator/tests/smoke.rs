//! The smoke scenario through the whole pipeline, as `make load-test` runs the standard one:
//! the real Mosquitto, RabbitMQ and a Tansu of its own, the six service binaries, and the
//! audit; then the same over mutual TLS (smoke-tls: the run's own Mosquitto from
//! dev/mosquitto-tls.conf, a certificate per device). Needs the brokers `make up` starts and
//! the Tansu it builds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One run at a time: both use the same Kafka and admin ports.
static ONE_RUN: Mutex<()> = Mutex::new(());

#[test]
fn the_smoke_scenario_ends_with_nothing_lost_duplicated_or_unexpected() {
    smoke("smoke");
}

#[test]
fn the_smoke_scenario_over_mutual_tls_ends_the_same() {
    smoke("smoke-tls");
}

fn smoke(scenario: &str) {
    let _one = ONE_RUN.lock().unwrap_or_else(|e| e.into_inner());
    let load = Path::new(env!("CARGO_BIN_EXE_iotp-load"));
    let bin_dir = load.parent().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out: PathBuf = std::env::temp_dir().join(format!("iotp-{scenario}-{}", std::process::id()));
    let status = std::process::Command::new(load)
        .current_dir(&root)
        .arg("--scenario")
        .arg(root.join(format!("load-tests/scenarios/{scenario}.toml")))
        .arg("--bin-dir")
        .arg(bin_dir)
        .arg("--out")
        .arg(&out)
        .args([
            "--kafka",
            "127.0.0.1:9095",
            "--admin-port",
            "9351",
            "--quiet",
        ])
        .status()
        .unwrap();
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("report.json")).expect("report.json"),
    )
    .unwrap();
    let audit = &report["audit"];
    for finding in [
        "lost",
        "duplicated",
        "unexpected",
        "incomplete",
        "unexplained_dead_letters",
        "missing_dead_letters",
        "twins_wrong",
    ] {
        assert_eq!(audit[finding]["count"], 0, "{finding}: {}", audit[finding]);
    }
    // 50 × 40 telemetry + 2 × 5 measured offline; 2 × 3 from unknown devices.
    assert_eq!(audit["acked_messages"], 50 * 40 + 2 * 5 + 2 * 3);
    assert_eq!(audit["expected_dead_letters"], 2 + 2 + 1 + 2 * 3);
    let faults = audit["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 7, "every fault kind injected: {faults:?}");
    for f in faults {
        assert_eq!(f["injected"], f["accounted"], "{f}");
    }
    assert!(audit["latency_ms"]["count"].as_u64().unwrap() > 1900);
    assert!(out.join("rate.svg").exists() && out.join("report.md").exists());
    counters_add_up_across_hops(&report);
    expositions_pass_promtool(&out.join("metrics"));
    assert!(
        status.success(),
        "{scenario}: iotp-load exited {status}; report in {}",
        out.display()
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// The services' own counters, scraped from every replica's `/metrics` at the end of the run,
/// against each other and against the records on each topic (the runs are clean: nothing is
/// consumed twice, so every relation is exact).
fn counters_add_up_across_hops(report: &serde_json::Value) {
    let hops: std::collections::HashMap<String, i64> = report["hops"]
        .as_array()
        .expect("hops")
        .iter()
        .map(|h| (h[0].as_str().unwrap().to_string(), h[1].as_i64().unwrap()))
        .collect();
    let at = |name: &str| -> i64 {
        *hops
            .get(name)
            .unwrap_or_else(|| panic!("no counter {name}: {hops:?}"))
    };
    for stage in ["parser", "enricher", "upserter"] {
        assert_eq!(
            at(&format!("{stage}: iotp_consumer_rereads_total")),
            0,
            "{hops:?}"
        );
        assert_eq!(
            at(&format!("{stage}: iotp_consumer_offset_gaps_total")),
            0,
            "{hops:?}"
        );
    }
    let received = at("mqtt-bridge: iotp_mqtt_received_messages_total");
    assert!(received > 0, "{hops:?}");
    // Every PUBLISH the bridge took was produced (or, refused by Kafka for good,
    // dead-lettered), then acknowledged unless a later copy of it superseded it.
    assert_eq!(
        at("mqtt-bridge: iotp_mqtt_acked_messages_total")
            + at("mqtt-bridge: iotp_mqtt_superseded_acks_total"),
        received,
        "{hops:?}"
    );
    let raw = at("records on iotp.raw");
    assert_eq!(
        at("mqtt-bridge: iotp_kafka_produced_messages_total")
            + at("mqtt-bridge: iotp_dead_letters_total"),
        received,
        "{hops:?}"
    );
    assert_eq!(
        at("mqtt-bridge: iotp_kafka_produced_messages_total"),
        raw,
        "{hops:?}"
    );
    // The parser: each raw record becomes a validated record or a dead letter.
    let validated = at("records on iotp.validated");
    assert_eq!(
        at("parser: iotp_kafka_produced_messages_total"),
        validated,
        "{hops:?}"
    );
    assert_eq!(
        validated + at("parser: iotp_dead_letters_total"),
        raw,
        "{hops:?}"
    );
    // The enricher: a validated record becomes an enriched one or a dead letter, or ends at
    // the twin (heartbeats), so no more come out than went in.
    let enriched = at("records on iotp.enriched");
    assert_eq!(
        at("enricher: iotp_kafka_produced_messages_total"),
        enriched,
        "{hops:?}"
    );
    assert!(
        enriched + at("enricher: iotp_dead_letters_total") <= validated,
        "{hops:?}"
    );
    assert!(
        at("enricher: iotp_dead_letters_total") > 0,
        "the smoke run's unknown devices"
    );
    // The upserter: each enriched record is stored or recognised as already stored.
    assert_eq!(
        at("upserter: iotp_messages_stored_total") + at("upserter: iotp_duplicates_removed_total"),
        enriched,
        "{hops:?}"
    );
}

/// `promtool check metrics` on every replica's exposition as the run scraped it (promtool:
/// `dev/setup.sh` installs the Debian package `prometheus`).
fn expositions_pass_promtool(dir: &Path) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for s in iotp_simulator::stack::SERVICES {
        assert!(
            files.iter().any(|f| f.to_string_lossy().contains(s)),
            "no exposition of {s} in {files:?}"
        );
    }
    for file in &files {
        let text = std::fs::read(file).unwrap();
        assert!(!text.is_empty(), "{} is empty", file.display());
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool (dev/setup.sh installs the Debian package prometheus)");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), &text).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics {}: {}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
