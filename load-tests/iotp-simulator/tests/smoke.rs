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
    assert!(
        status.success(),
        "{scenario}: iotp-load exited {status}; report in {}",
        out.display()
    );
    let _ = std::fs::remove_dir_all(&out);
}
