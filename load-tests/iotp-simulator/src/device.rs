//! Device profiles and the JSON payload a device sends
//! (`{"msgId","deviceId","seqNo","producedAt","schemaVersion","readings":[…]}`), its heartbeats,
//! and the broken payloads fault injection sends.
//!
//! A heartbeat carries the seqNo of the device's last telemetry message: it says "alive, last
//! sent N" and does not consume a number, so seqNo gaps keep meaning lost readings.

use rand::rngs::StdRng;
use rand::Rng;
use serde::Serialize;

/// The kinds of device in a fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Energy meter with a cumulative counter.
    EnergyMeter,
    /// Temperature and humidity.
    Climate,
    /// Vibration sensor.
    Vibration,
}

impl Profile {
    /// Profiles in rotation: device `i` gets `ALL[i % 3]`.
    pub const ALL: [Profile; 3] = [Profile::EnergyMeter, Profile::Climate, Profile::Vibration];

    /// Readings per telemetry message.
    pub fn readings(self) -> i64 {
        match self {
            Profile::EnergyMeter => 3,
            Profile::Climate => 2,
            Profile::Vibration => 1,
        }
    }
}

/// Firmware every simulated device reports (first message and heartbeats).
pub const FIRMWARE: &str = "sim-1.4.2";

/// One reading.
#[derive(Debug, Serialize)]
pub struct Reading {
    /// Metric name.
    pub metric: &'static str,
    /// Value.
    pub value: f64,
    /// Unit.
    pub unit: &'static str,
}

/// The device payload, JSON.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Payload<'a> {
    /// Unique per message.
    pub msg_id: String,
    /// Device id (must equal the topic's).
    pub device_id: &'a str,
    /// Per-device sequence number from 0.
    pub seq_no: u64,
    /// Device clock, epoch ms.
    pub produced_at: i64,
    /// Payload format version.
    pub schema_version: u32,
    /// Readings (absent in heartbeats).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readings: Option<Vec<Reading>>,
    /// Firmware version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firmware: Option<&'static str>,
    /// Filler that makes an oversized payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub padding: Option<String>,
}

/// A simulated device's state.
pub struct Device {
    /// Device id.
    pub id: String,
    /// Profile.
    pub profile: Profile,
    /// Next sequence number.
    pub seq_no: u64,
    energy_wh: f64,
}

impl Device {
    /// Device number `index`.
    pub fn new(index: usize) -> Self {
        Self {
            id: format!("dev-{index:06}"),
            profile: Profile::ALL[index % 3],
            seq_no: 0,
            energy_wh: 1000.0 * index as f64,
        }
    }

    /// The next telemetry message.
    pub fn next_payload(&mut self, rng: &mut StdRng, now_ms: i64) -> Vec<u8> {
        let bytes = serde_json::to_vec(&self.next_message(rng, now_ms)).unwrap_or_default();
        self.seq_no += 1;
        bytes
    }

    /// The next telemetry message, with its number; the caller advances `seq_no`.
    pub fn next_message(&mut self, rng: &mut StdRng, now_ms: i64) -> Payload<'_> {
        let readings = match self.profile {
            Profile::EnergyMeter => {
                self.energy_wh += rng.gen_range(0.0..50.0);
                vec![
                    Reading {
                        metric: "energy",
                        value: self.energy_wh,
                        unit: "Wh",
                    },
                    Reading {
                        metric: "power",
                        value: rng.gen_range(0.0..3000.0),
                        unit: "W",
                    },
                    Reading {
                        metric: "voltage",
                        value: rng.gen_range(225.0..235.0),
                        unit: "V",
                    },
                ]
            }
            Profile::Climate => vec![
                Reading {
                    metric: "temperature",
                    value: rng.gen_range(15.0..30.0),
                    unit: "Cel",
                },
                Reading {
                    metric: "humidity",
                    value: rng.gen_range(20.0..80.0),
                    unit: "%RH",
                },
            ],
            Profile::Vibration => vec![Reading {
                metric: "vibration_rms",
                value: rng.gen_range(0.0..12.0),
                unit: "mm/s",
            }],
        };
        Payload {
            msg_id: uuid::Uuid::now_v7().to_string(),
            device_id: &self.id,
            seq_no: self.seq_no,
            produced_at: now_ms,
            schema_version: 1,
            readings: Some(readings),
            firmware: (self.seq_no == 0).then_some(FIRMWARE),
            padding: None,
        }
    }

    /// A heartbeat: no readings, the last telemetry seqNo (`last_seq_no`).
    pub fn heartbeat(&self, last_seq_no: u64, now_ms: i64) -> Vec<u8> {
        let payload = Payload {
            msg_id: uuid::Uuid::now_v7().to_string(),
            device_id: &self.id,
            seq_no: last_seq_no,
            produced_at: now_ms,
            schema_version: 1,
            readings: None,
            firmware: Some(FIRMWARE),
            padding: None,
        };
        serde_json::to_vec(&payload).unwrap_or_default()
    }
}

/// Bytes of an oversized payload: above the parser's 64 KiB limit, below Mosquitto's 1 MiB.
pub const OVERSIZED_BYTES: usize = 80 * 1024;

/// Encode a telemetry message, applying a payload fault.
pub fn encode(mut payload: Payload<'_>, fault: PayloadFault) -> Vec<u8> {
    match fault {
        PayloadFault::None => serde_json::to_vec(&payload).unwrap_or_default(),
        PayloadFault::ClockSkew(ahead_ms) => {
            payload.produced_at += ahead_ms;
            serde_json::to_vec(&payload).unwrap_or_default()
        }
        PayloadFault::Oversized => {
            payload.padding = Some("x".repeat(OVERSIZED_BYTES));
            serde_json::to_vec(&payload).unwrap_or_default()
        }
        PayloadFault::Malformed => {
            // Cut mid-object: a device that lost power while writing its buffer.
            let mut bytes = serde_json::to_vec(&payload).unwrap_or_default();
            bytes.truncate(bytes.len() / 2);
            bytes
        }
    }
}

/// What is wrong with a payload on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFault {
    /// Nothing.
    None,
    /// producedAt this many ms ahead of the real clock.
    ClockSkew(i64),
    /// Padded past the parser's size limit.
    Oversized,
    /// Truncated JSON.
    Malformed,
}

/// The registry TOML (profiles and the first `registered` devices) for a fleet.
pub fn registry_toml(tenant: &str, devices: usize, registered: usize) -> String {
    let mut out = String::from(
        "# Generated by iotp-simulator --write-registry.\n\
         [profiles.energy-meter-v1]\n\
         metrics = { energy = { unit = \"Wh\", min = 0.0, max = 1e15, cumulative = true }, power = { unit = \"W\", min = 0.0, max = 1e6 }, voltage = { unit = \"V\", min = 0.0, max = 1000.0 } }\n\n\
         [profiles.climate-v1]\n\
         metrics = { temperature = { unit = \"Cel\", min = -60.0, max = 100.0 }, humidity = { unit = \"%RH\", min = 0.0, max = 100.0 } }\n\n\
         [profiles.vibration-v1]\n\
         metrics = { vibration_rms = { unit = \"mm/s\", min = 0.0, max = 100.0 } }\n",
    );
    for index in 0..devices.min(registered) {
        let d = Device::new(index);
        let profile = match d.profile {
            Profile::EnergyMeter => "energy-meter-v1",
            Profile::Climate => "climate-v1",
            Profile::Vibration => "vibration-v1",
        };
        out.push_str(&format!(
            "\n[[devices]]\ntenant = \"{tenant}\"\nid = \"{}\"\nprofile = \"{profile}\"\nsite = \"site-{}\"\n",
            d.id,
            index % 10
        ));
    }
    out
}
