//! The load-test report: `report.json` (everything, machine-readable), `report.md` (for
//! people) and two plots, `rate.svg` and `latency.svg`.
//! Building it from what the run's phases produced is in `build.rs`, `report.md` in
//! `markdown.rs`, the plots in `chart.rs`.

use std::path::Path;

use serde::Serialize;

use crate::audit::Audit;
use crate::ceiling::Ceiling;
use crate::chaos::recovery::FaultCost;
use crate::scenario::Scenario;

mod build;
mod chart;
mod faults;
mod markdown;
pub mod spread;

pub use build::{reading, Drained, Outcome, PerProcess, Setting, Totals, Usage, MACHINE};
pub use chart::{svg_chart, Series};

/// How long after every consumer group reached lag 0 the load tool looks again before it
/// audits: longer than the aggregator's batch linger (1 s) plus the auto-commit interval (1 s).
pub const CONFIRM_DRAINED_SECONDS: u64 = 3;

/// The machine the run was on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPUs the OS offers.
    pub cpus: usize,
    /// CPU model, from /proc/cpuinfo (empty where it says none).
    pub cpu_model: String,
    /// Physical memory (MemTotal), GiB.
    pub memory_gib: f64,
    /// Linux kernel release (`uname -r`).
    pub kernel: String,
}

impl Machine {
    /// This machine, as /proc describes it (fields it does not tell are empty or 0).
    pub fn this() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model: cpuinfo
                .lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default(),
            memory_gib: meminfo
                .lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
                .map(|kb| kb / 1024.0 / 1024.0)
                .unwrap_or(0.0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    }
}

/// What the fleet did.
#[derive(Debug, Clone, Serialize)]
pub struct FleetSummary {
    /// Devices (registered and not).
    pub devices: usize,
    /// Publishes (telemetry, resends, heartbeats).
    pub published: u64,
    /// Telemetry PUBACKs with a success reason (resends included, heartbeats not).
    pub acked: u64,
    /// Seconds from the first publish to the last PUBACK.
    pub seconds: f64,
    /// PUBACKs per second over `seconds`.
    pub ack_rate: f64,
    /// MQTT connection errors the devices had, each followed by a reconnect.
    pub connection_errors: u64,
    /// PUBACKs with an error reason.
    pub refused: u64,
    /// Publishes the client gave up (no session on reconnect).
    pub abandoned: u64,
}

/// CPU of one process over the measured window.
#[derive(Debug, Clone, Serialize)]
pub struct Cpu {
    /// Service (or broker).
    pub process: String,
    /// CPU seconds, user + system.
    pub seconds: f64,
    /// Per message stored, µs.
    pub us_per_message: f64,
    /// Wake-ups (voluntary context switches of its live threads) per message stored: how
    /// often its threads blocked and were woken again, a cost the CPU seconds include.
    pub wakeups_per_message: f64,
    /// Bytes written to storage per message stored: the store writers' pages (WAL frames,
    /// checkpoints), Tansu's files when its engine is SQLite.
    pub disk_bytes_per_message: f64,
}

/// Memory of one process.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    /// Service (or broker).
    pub process: String,
    /// Highest RSS sampled, MiB.
    pub max_mib: f64,
    /// Median RSS over the second half of the run (steady state), MiB.
    pub steady_mib: f64,
}

/// A stage's receive→confirmed latency, from its `iotp_delivery_seconds` histogram, ms.
#[derive(Debug, Clone, Serialize)]
pub struct StageLatency {
    /// The `stage` label (`parser`, `enricher`, …).
    pub stage: String,
    /// Median, interpolated inside its bucket.
    pub p50: f64,
    /// 95th percentile, interpolated inside its bucket.
    pub p95: f64,
    /// 99th percentile, interpolated inside its bucket.
    pub p99: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario as run.
    pub scenario: Scenario,
    /// Tenant of the run.
    pub tenant: String,
    /// When it started (UTC).
    pub started: String,
    /// The machine the pipeline and the fleet shared.
    pub machine: Machine,
    /// Kafka-protocol broker and engine.
    pub kafka: String,
    /// What the fleet published and was acknowledged for.
    pub fleet: FleetSummary,
    /// PUBACKs per second since the first publish.
    pub acks_per_second: Vec<u64>,
    /// The ledgers reconciled with the store and the dead-letter archive.
    pub audit: Audit,
    /// Messages stored per second, first publish to last store commit.
    pub sustained_rate: f64,
    /// Median of the per-second store rates over the middle 80% of the run.
    pub steady_rate: f64,
    /// Seconds from the last PUBACK until the store had everything.
    pub drain_seconds: f64,
    /// Seconds from the last PUBACK until every consumer group (aggregator included) was at
    /// lag 0; the CPU window ends there.
    pub groups_drained_seconds: f64,
    /// Lag each consumer group had left at the end (all 0 unless stuck).
    pub lag_left: Vec<(String, i64)>,
    /// Lag found on a second look a few seconds after the first lag 0 (`Some(0)`: none).
    pub lag_again: Option<i64>,
    /// Counts per hop (services' counters and records per topic), run and warm-up together.
    pub hops: Vec<(String, i64)>,
    /// Forward-only ceiling, if measured.
    pub ceiling: Option<Ceiling>,
    /// sustained_rate / ceiling rate.
    pub efficiency: Option<f64>,
    /// The most messages per second the machine's CPUs allow a pipeline that does the work of
    /// both ceiling legs, each at the machine CPU per record it cost alone: CPUs × 1 s over
    /// the two costs together (both legs measured).
    pub shared_bound: Option<f64>,
    /// CPU per process over the run.
    pub cpu: Vec<Cpu>,
    /// Our services' CPU per stored message, summed, µs.
    pub services_us_per_message: f64,
    /// Highest and steady RSS per process.
    pub memory: Vec<Memory>,
    /// Receive→confirmed latency of each stage, from the services' histograms.
    pub stages: Vec<StageLatency>,
    /// Exit code of each replica after SIGTERM.
    pub exit_codes: Vec<(String, Option<i32>)>,
    /// PUBLISHes the broker still held in the bridges' sessions after they stopped: must
    /// be 0.
    pub session_leftovers: u64,
    /// Each bridge client id the run used and what its session still held.
    pub sessions: Vec<(String, u64)>,
    /// Each chaos action, when, and what it cost (empty without a chaos timeline).
    pub chaos: Vec<FaultCost>,
    /// Audit passed and every service exited 0.
    pub passed: bool,
}

impl Report {
    /// Write report.json, report.md, rate.svg and latency.svg into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        let t = &self.audit.timeline;
        let rate: Vec<(f64, f64)> = t.iter().map(|s| (s.at as f64, s.stored as f64)).collect();
        let acked: Vec<(f64, f64)> = self
            .acks_per_second
            .iter()
            .enumerate()
            .map(|(i, n)| (i as f64, *n as f64))
            .collect();
        let markers: Vec<(f64, String)> = self
            .chaos
            .iter()
            .enumerate()
            .map(|(i, f)| (f.at, format!("{}", i + 1)))
            .collect();
        std::fs::write(
            dir.join("rate.svg"),
            svg_chart(
                "Messages acknowledged (PUBACK) and stored per second",
                "seconds since the first publish",
                "msgs/s",
                &[("acked", "#ff7f0e", acked), ("stored", "#1f77b4", rate)],
                &markers,
            ),
        )?;
        let p50: Vec<(f64, f64)> = t.iter().map(|s| (s.at as f64, s.latency.p50)).collect();
        let p99: Vec<(f64, f64)> = t.iter().map(|s| (s.at as f64, s.latency.p99)).collect();
        std::fs::write(
            dir.join("latency.svg"),
            svg_chart(
                "Device→store latency of the messages stored in each second",
                "seconds since the first publish",
                "ms",
                &[("p50", "#2ca02c", p50), ("p99", "#d62728", p99)],
                &markers,
            ),
        )?;
        Ok(())
    }
    /// Add the ceiling, and the pipeline's efficiency: the sustained rate over the lower of
    /// the ceiling's two legs (Kafka, and MQTT when measured).
    pub fn set_ceiling(&mut self, ceiling: Ceiling) {
        let lower = ceiling.rate.min(ceiling.mqtt_rate.unwrap_or(f64::INFINITY));
        self.efficiency = Some(self.sustained_rate / lower);
        self.shared_bound = ceiling.mqtt_machine.and_then(|mqtt| {
            let per_message = ceiling.machine.us_per_record + mqtt.us_per_record;
            (per_message > 0.0).then(|| self.machine.cpus as f64 * 1e6 / per_message)
        });
        self.ceiling = Some(ceiling);
    }
}

/// Median of the per-second store counts over the middle 80% of the seconds.
pub fn steady_rate(audit: &Audit) -> f64 {
    let counts: Vec<u64> = audit.timeline.iter().map(|s| s.stored).collect();
    if counts.is_empty() {
        return 0.0;
    }
    let cut = counts.len() / 10;
    let mut middle: Vec<u64> = counts[cut..counts.len() - cut].to_vec();
    middle.sort_unstable();
    middle[middle.len() / 2] as f64
}
