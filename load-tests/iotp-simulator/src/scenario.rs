//! A load-test scenario: the fleet, its pace, and the faults to inject. Scenarios are TOML files
//! in `load-tests/scenarios/`; every field has a default, so a scenario names only what it
//! changes.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::chaos::Chaos;

/// One scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// Short name (the report's directory starts with it).
    pub name: String,
    /// What it shows.
    pub description: String,
    /// Tenant of every device; empty: `load-<name>-<unix seconds>`, so runs never collide.
    pub tenant: String,
    /// Registered devices (one MQTT connection each).
    pub devices: usize,
    /// Telemetry messages per device (ignored when `duration` is set).
    pub messages_per_device: u64,
    /// Run this long instead: messages per device = duration × rate / devices (needs a rate).
    #[serde(with = "humantime_serde")]
    pub duration: Option<Duration>,
    /// Fleet-wide telemetry rate, messages/s; 0: as fast as the broker acknowledges.
    pub rate: u64,
    /// Or per device, messages/s (fleet rate = this × devices); 0: use `rate`.
    pub rate_per_device: f64,
    /// Devices connect evenly spread over this time.
    #[serde(with = "humantime_serde")]
    pub ramp_up: Duration,
    /// Unacknowledged QoS 1 publishes a device may have (its send buffer).
    pub max_inflight: usize,
    /// A heartbeat after every N telemetry messages (0: none).
    pub heartbeat_every: u64,
    /// Seed: readings, fault placement.
    pub seed: u64,
    /// Give up waiting for PUBACKs, and for the pipeline to drain, after this long without
    /// progress.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// Faults to inject.
    pub faults: Faults,
    /// Also measure the infrastructure's ceiling (forward-only hops) after the run.
    pub ceiling: bool,
    /// Storage engine of the run's own Tansu, `sqlite` or `memory`; empty: `--kafka-engine`.
    pub kafka_engine: String,
    /// What to break while the fleet publishes (nothing by default).
    pub chaos: Chaos,
    /// Mutual TLS between devices, bridge and broker: the run starts its own Mosquitto from
    /// dev/mosquitto-tls.conf (ACL dev/mosquitto.acl), and every device connects with its own
    /// certificate (CN `tenant/deviceId`), the bridge with the `iotp-bridge` identity, all
    /// from the CA in `ca_dir`.
    pub tls: bool,
    /// The iotp-pki CA directory of a TLS run (created if it holds no CA; certificates are
    /// issued where missing); unset: a new CA in the run's report directory. The simulator
    /// binary (`iotp-simulator`) needs it set to use TLS.
    pub ca_dir: Option<std::path::PathBuf>,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            name: "custom".into(),
            description: String::new(),
            tenant: String::new(),
            devices: 100,
            messages_per_device: 100,
            duration: None,
            rate: 0,
            rate_per_device: 0.0,
            ramp_up: Duration::from_secs(2),
            max_inflight: 32,
            heartbeat_every: 0,
            seed: 42,
            stall_timeout: Duration::from_secs(120),
            faults: Faults::default(),
            ceiling: false,
            kafka_engine: String::new(),
            chaos: Chaos::default(),
            tls: false,
            ca_dir: None,
        }
    }
}

/// Faults, each with a known expected outcome (see [`crate::plan::Fault::expected`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Messages sent twice (same msgId, seqNo, bytes): stored once.
    pub duplicate_sends: u64,
    /// Devices that send a window of 10 messages in reverse order: all stored, twin at the
    /// highest seqNo.
    pub out_of_order: u64,
    /// Messages whose device clock is an hour ahead: dead-lettered `produced_in_future`.
    pub clock_skew: u64,
    /// Truncated JSON payloads: dead-lettered `malformed_payload`.
    pub malformed: u64,
    /// Payloads past the 64 KiB limit: dead-lettered `payload_too_large`.
    pub oversized: u64,
    /// Devices missing from the registry: each of their messages dead-lettered
    /// `unknown_device`.
    pub unknown_devices: u64,
    /// Messages each unknown device sends.
    pub unknown_device_messages: u64,
    /// Devices that go offline mid-run, keep measuring, and send the backlog on reconnect
    /// (store and forward): all stored.
    pub offline_bursts: u64,
    /// How long such a device stays offline.
    #[serde(with = "humantime_serde")]
    pub offline_for: Duration,
    /// Messages it measures while offline.
    pub offline_messages: u64,
}

impl Scenario {
    /// Read a scenario file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read scenario {}: {e}", path.display()))?;
        let mut scenario: Self = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("scenario {}: {e}", path.display()))?;
        scenario.resolve();
        let problems = scenario.problems();
        anyhow::ensure!(
            problems.is_empty(),
            "scenario {}: {}",
            path.display(),
            problems.join("; ")
        );
        Ok(scenario)
    }

    /// Turn a per-device rate into the fleet rate, and a duration into a message count.
    pub fn resolve(&mut self) {
        if self.rate_per_device > 0.0 {
            self.rate = (self.rate_per_device * self.devices as f64).round() as u64;
        }
        if let Some(d) = self.duration {
            if self.rate > 0 && self.devices > 0 {
                self.messages_per_device =
                    (d.as_secs_f64() * self.rate as f64 / self.devices as f64).ceil() as u64;
            }
        }
    }

    /// What is inconsistent.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.devices == 0 {
            out.push("devices must be at least 1".to_string());
        }
        if self.duration.is_some() && self.rate == 0 {
            out.push("duration needs rate or rate_per_device".to_string());
        }
        if self.max_inflight == 0 {
            out.push("max_inflight must be at least 1".to_string());
        }
        if !["", "sqlite", "memory"].contains(&self.kafka_engine.as_str()) {
            out.push("kafka_engine must be sqlite or memory".to_string());
        }
        out.extend(self.chaos.problems());
        if self.ca_dir.is_some() && !self.tls {
            out.push("ca_dir needs tls = true".to_string());
        }
        let f = &self.faults;
        let per_message = f.duplicate_sends + f.clock_skew + f.malformed + f.oversized;
        let capacity = self.devices as u64 * self.messages_per_device;
        if per_message > capacity / 2 {
            out.push(format!(
                "{per_message} per-message faults need more than twice as many messages ({capacity})"
            ));
        }
        if f.out_of_order + f.offline_bursts > self.devices as u64 {
            out.push("out_of_order + offline_bursts must not exceed devices".to_string());
        }
        if f.out_of_order > 0 && self.messages_per_device < 10 {
            out.push("out_of_order needs messages_per_device >= 10".to_string());
        }
        if f.offline_bursts > 0 && (f.offline_messages == 0 || f.offline_for.is_zero()) {
            out.push("offline_bursts needs offline_for and offline_messages".to_string());
        }
        if f.unknown_devices > 0 && f.unknown_device_messages == 0 {
            out.push("unknown_devices needs unknown_device_messages".to_string());
        }
        out
    }

    /// Telemetry messages the registered devices send (excluding duplicates and heartbeats).
    pub fn telemetry_messages(&self) -> u64 {
        self.devices as u64 * self.messages_per_device
            + self.faults.offline_bursts * self.faults.offline_messages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_scenarios_parse_and_are_consistent() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("scenarios dir") {
            let path = entry.expect("entry").path();
            let s = Scenario::load(&path).expect("scenario");
            assert_eq!(
                path.file_stem().and_then(|n| n.to_str()),
                Some(s.name.as_str())
            );
            names.push(s.name);
        }
        names.sort();
        assert_eq!(
            names,
            [
                "callgrind",
                "chaos",
                "chaos-small",
                "faults",
                "latency",
                "mid",
                "paced",
                "smoke",
                "smoke-tls",
                "soak",
                "standard",
                "standard-unthrottled"
            ]
        );
    }

    #[test]
    fn a_ca_dir_without_tls_is_a_problem() {
        let s = Scenario {
            ca_dir: Some("pki".into()),
            ..Scenario::default()
        };
        assert!(s.problems().iter().any(|p| p.contains("ca_dir needs tls")));
        let s = Scenario {
            tls: true,
            ca_dir: Some("pki".into()),
            ..Scenario::default()
        };
        assert!(s.problems().is_empty(), "{:?}", s.problems());
    }

    #[test]
    fn a_duration_and_a_per_device_rate_make_the_message_count() {
        let mut s = Scenario {
            devices: 200,
            rate_per_device: 0.5,
            duration: Some(Duration::from_secs(600)),
            ..Scenario::default()
        };
        s.resolve();
        assert_eq!((s.rate, s.messages_per_device), (100, 300));
        assert!(s.problems().is_empty());
    }

    #[test]
    fn inconsistent_scenarios_are_refused_with_every_reason() {
        let s = Scenario {
            devices: 2,
            messages_per_device: 4,
            faults: Faults {
                malformed: 5,
                out_of_order: 3,
                ..Faults::default()
            },
            ..Scenario::default()
        };
        let problems = s.problems();
        assert_eq!(problems.len(), 3, "{problems:?}");
    }
}
