//! Runs the fleet: one MQTT 5 connection per device, QoS 1, persistent sessions, at most
//! `max_inflight` unacknowledged publishes per device, an optional fleet-wide rate, and a
//! ledger of which message the broker acknowledged (PUBACK matched to the message by packet
//! id; a retransmission after a reconnect keeps its packet id).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::Transport;
use serde::Serialize;

use crate::plan::{DevicePlan, Fault};
use crate::scenario::Scenario;

mod session;

/// Where and as whom the fleet publishes.
#[derive(Debug, Clone)]
pub struct Target {
    /// MQTT broker host.
    pub host: String,
    /// MQTT broker port.
    pub port: u16,
    /// Tenant of every device.
    pub tenant: String,
    /// First seqNo of every device (numbering continues across runs).
    pub seq_start: u64,
    /// Topics are `{prefix}/{tenant}/{deviceId}/{kind}`; the pipeline's prefix is `iot`.
    pub topic_prefix: String,
    /// An iotp-pki CA directory: each device connects over TLS with its own certificate
    /// (CN `tenant/deviceId`) from it, issued on first use; `None`: plain TCP.
    pub tls: Option<PathBuf>,
}

impl Target {
    /// Devices of `tenant` on the broker at `127.0.0.1:port`, numbered from seqNo 0, on topics
    /// under `topic_prefix`.
    pub fn local(port: u16, tenant: &str, topic_prefix: &str) -> Self {
        Self {
            host: "127.0.0.1".into(),
            port,
            tenant: tenant.to_string(),
            seq_start: 0,
            topic_prefix: topic_prefix.to_string(),
            tls: None,
        }
    }

    /// The same, each device over TLS with its own certificate from the CA in `ca_dir`.
    pub fn with_tls(mut self, ca_dir: Option<PathBuf>) -> Self {
        self.tls = ca_dir;
        self
    }

    /// Each device's TLS transport (certificates issued where missing), by device id.
    fn transports(&self, plans: &[DevicePlan]) -> anyhow::Result<HashMap<String, Transport>> {
        let Some(dir) = &self.tls else {
            return Ok(HashMap::new());
        };
        let mut ca = iotp_pki::Ca::open(dir)?;
        let validity = iotp_pki::Validity::days(30)?;
        let ca_file = ca.ca_file();
        let files =
            ca.ensure_devices(&self.tenant, plans.iter().map(|p| p.id.as_str()), validity)?;
        plans
            .iter()
            .zip(files)
            .map(|(p, (cert, key))| {
                let transport = iotp_core::mqtt::tls_transport(&ca_file, Some(&cert), Some(&key))?;
                Ok((p.id.clone(), transport))
            })
            .collect()
    }
}

/// Live counters, for a progress display.
#[derive(Debug, Default)]
pub struct Progress {
    /// Publishes handed to the client (telemetry, resends, heartbeats).
    pub published: AtomicU64,
    /// PUBACKs with a success reason.
    pub acked: AtomicU64,
    /// Connection errors (each followed by a reconnect).
    pub connection_errors: AtomicU64,
    /// Acks per second since the start.
    pub acks_per_second: Mutex<Vec<u64>>,
}

/// What one device sent and what the broker acknowledged. Index = seqNo - seq_start.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceLedger {
    /// Device id.
    pub id: String,
    /// In the registry.
    pub registered: bool,
    /// Readings per telemetry message.
    pub readings: i64,
    /// The fault each seqNo carries.
    #[serde(skip)]
    pub faults: Vec<Option<Fault>>,
    /// Publishes of each seqNo (a resend makes 2).
    #[serde(skip)]
    pub publishes: Vec<u16>,
    /// PUBACKs of each seqNo.
    #[serde(skip)]
    pub acks: Vec<u16>,
    /// Heartbeats acknowledged.
    pub heartbeats_acked: u64,
    /// Device time of the last acknowledged heartbeat, epoch ms.
    pub last_heartbeat_at: i64,
    /// PUBACKs with an error reason (the broker refused the message).
    pub refused: u64,
    /// Publishes lost by the client because the broker had no session on reconnect.
    pub abandoned: u64,
}

impl DeviceLedger {
    /// A device's ledger before it sends anything: one slot per seqNo of `faults`.
    pub fn new(id: String, registered: bool, readings: i64, faults: Vec<Option<Fault>>) -> Self {
        let n = faults.len();
        Self {
            id,
            registered,
            readings,
            faults,
            publishes: vec![0; n],
            acks: vec![0; n],
            heartbeats_acked: 0,
            last_heartbeat_at: 0,
            refused: 0,
            abandoned: 0,
        }
    }
}

/// The whole run.
#[derive(Debug)]
pub struct FleetRun {
    /// Per device.
    pub devices: Vec<DeviceLedger>,
    /// First seqNo.
    pub seq_start: u64,
    /// When publishing started / ended, epoch ms.
    pub started_at: i64,
    /// When the last PUBACK arrived (or the run gave up), epoch ms.
    pub finished_at: i64,
}

impl FleetRun {
    /// Telemetry publishes acknowledged (resends included, heartbeats not).
    pub fn acked(&self) -> u64 {
        self.devices
            .iter()
            .map(|d| d.acks.iter().map(|a| u64::from(*a)).sum::<u64>())
            .sum()
    }

    /// Seconds from the first publish to the last PUBACK.
    pub fn seconds(&self) -> f64 {
        (self.finished_at - self.started_at) as f64 / 1000.0
    }

    /// Telemetry PUBACKs per second over [`Self::seconds`] (at least a millisecond).
    pub fn ack_rate(&self) -> f64 {
        self.acked() as f64 / self.seconds().max(0.001)
    }

    /// Heartbeats acknowledged.
    pub fn heartbeats(&self) -> u64 {
        self.devices.iter().map(|d| d.heartbeats_acked).sum()
    }

    /// Telemetry publishes attempted (resends included, heartbeats not).
    pub fn published(&self) -> u64 {
        self.devices
            .iter()
            .map(|d| d.publishes.iter().map(|a| u64::from(*a)).sum::<u64>())
            .sum()
    }
}

/// Run the planned fleet to completion (or until acknowledgements stall).
pub async fn run(
    target: Target,
    scenario: &Scenario,
    plans: Vec<DevicePlan>,
    progress: Arc<Progress>,
) -> anyhow::Result<FleetRun> {
    let started_at = now_millis();
    let total_devices = plans.len();
    let run = Arc::new(session::Run {
        interval: (scenario.rate > 0)
            .then(|| Duration::from_secs_f64(total_devices as f64 / scenario.rate as f64)),
        target: target.clone(),
        scenario: scenario.clone(),
        started: Instant::now(),
        progress,
    });
    let mut transports = target.transports(&plans)?;
    let mut tasks = Vec::with_capacity(total_devices);
    for (n, plan) in plans.into_iter().enumerate() {
        let run = run.clone();
        let transport = transports.remove(&plan.id);
        let delay = scenario
            .ramp_up
            .mul_f64(n as f64 / total_devices.max(1) as f64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            session::run_device(plan, run, transport).await
        }));
    }
    let mut devices = Vec::with_capacity(tasks.len());
    for t in tasks {
        devices.push(t.await??);
    }
    Ok(FleetRun {
        devices,
        seq_start: target.seq_start,
        started_at,
        finished_at: now_millis(),
    })
}

/// Wall clock, epoch ms.
pub use iotp_contract::now_millis;
