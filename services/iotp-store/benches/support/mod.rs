//! What the store benches share: the simulator's energy meter as the upserter receives it.

use std::collections::HashMap;
use std::path::PathBuf;

use iotp_contract::{EnrichedTelemetry, Header, Reading};

/// Messages per upserter batch.
pub const BATCH: usize = 500;

/// The simulator's energy meter, message `seq_no` of device `device`, enriched.
pub fn enriched(device: usize, seq_no: i64) -> EnrichedTelemetry {
    EnrichedTelemetry {
        header: Header {
            msg_id: format!("0190f3a2-7c1e-7d4b-9a55-{seq_no:012x}"),
            tenant: "acme".into(),
            device_id: format!("dev-{device:06}"),
            seq_no,
            produced_at: 1_800_000_000_000 + seq_no * 1000,
            received_at: 1_800_000_000_040 + seq_no * 1000,
            schema_version: 1,
        },
        kind: "telemetry".into(),
        readings: [
            ("energy", 3_021_734.518_231, "Wh"),
            ("power", 1_523.420_917, "W"),
            ("voltage", 229.871_204, "V"),
        ]
        .into_iter()
        .map(|(metric, value, unit)| Reading {
            metric: metric.into(),
            value,
            unit: Some(unit.into()),
        })
        .collect(),
        site: Some(format!("site-{}", device % 10)),
        asset: None,
        profile: "energy-meter-v1".into(),
        firmware_version: None,
        tags: HashMap::new(),
    }
}

/// A store file under the temp directory, removed (with its WAL) afterwards.
pub struct TempStore(pub PathBuf);

impl TempStore {
    pub fn new() -> Self {
        Self(std::env::temp_dir().join(format!("iotp-bench-store-{}.sqlite", std::process::id())))
    }
}

impl Drop for TempStore {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}
