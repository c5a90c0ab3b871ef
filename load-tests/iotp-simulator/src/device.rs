//! Device profiles and the JSON payload a device sends
//! (`{"msgId","deviceId","seqNo","producedAt","schemaVersion","readings":[…]}`).

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
}

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
    /// Readings.
    pub readings: Vec<Reading>,
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
        let payload = Payload {
            msg_id: uuid::Uuid::now_v7().to_string(),
            device_id: &self.id,
            seq_no: self.seq_no,
            produced_at: now_ms,
            schema_version: 1,
            readings,
        };
        self.seq_no += 1;
        serde_json::to_vec(&payload).unwrap_or_default()
    }
}
