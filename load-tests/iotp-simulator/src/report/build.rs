//! The report from what the run was ([`Setting`]) and what its phases produced ([`Outcome`]):
//! rates, CPU per stored message, steady memory, the verdict.

use crate::audit::Audit;
use crate::chaos::recovery::FaultCost;
use crate::fleet::FleetRun;
use crate::scenario::Scenario;

use super::{steady_rate, Cpu, FleetSummary, Machine, Memory, Report, StageLatency};

/// One reading per process (services by name, and `tansu`): (process, value).
pub type PerProcess<T> = Vec<(String, T)>;

/// The row of [`PerProcess`] CPU readings that is the whole machine (every process, all CPUs
/// busy), not one process: not among our services.
pub const MACHINE: &str = "machine";

/// The reading of process `name` in `of` (the default if it is not there).
pub fn reading<T: Copy + Default>(of: &[(String, T)], name: &str) -> T {
    of.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .unwrap_or_default()
}

/// What was run, where: the report's header.
#[derive(Debug, Clone)]
pub struct Setting {
    /// The scenario as run (a `--rate` override included).
    pub scenario: Scenario,
    /// The tenant every device of the run published as.
    pub tenant: String,
    /// Wall-clock start, RFC 3339 UTC to the second.
    pub started: String,
    /// The Kafka-protocol broker, said for people (`Tansu 0.6.0, memory engine, at …`).
    pub kafka: String,
}

/// When the pipeline's consumer groups caught up after the last PUBACK.
#[derive(Debug, Clone)]
pub struct Drained {
    /// When every group was at lag 0, or the wait for it gave up, epoch ms.
    pub at: i64,
    /// The lag each consumer group had left then (all 0 unless stuck).
    pub lag: Vec<(String, i64)>,
    /// The lag found when looking again a few seconds after every group was at lag 0
    /// (`Some(0)`: none; the audit waits until it is 0 again).
    pub lag_again: Option<i64>,
}

/// What a process had used so far, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    /// CPU seconds.
    pub cpu_seconds: f64,
    /// Wake-ups (voluntary context switches) of its live threads.
    pub wakeups: f64,
    /// Bytes written to storage.
    pub disk_bytes: f64,
}

/// What the run cost each process, measured from /proc while it lasted.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    /// What each process had used when the fleet started.
    pub before: PerProcess<Totals>,
    /// The same when every consumer group had drained.
    pub after: PerProcess<Totals>,
    /// RSS of each process in bytes, one row per second of the run.
    pub memory: Vec<PerProcess<u64>>,
}

/// What the run's phases produced, in the order they produced it.
#[derive(Debug)]
pub struct Outcome {
    /// The devices' ledgers: what was published and acknowledged (drive).
    pub fleet: FleetRun,
    /// PUBACKs in each second since the first publish (drive).
    pub acks_per_second: Vec<u64>,
    /// MQTT connection errors the devices had, each followed by a reconnect (drive).
    pub connection_errors: u64,
    /// When the consumer groups caught up (settle).
    pub drained: Drained,
    /// CPU and memory per process (settle).
    pub usage: Usage,
    /// Receive→confirmed latency of each stage, from the services' histograms (collect).
    pub stages: Vec<StageLatency>,
    /// What each hop counted: the services' counters and the records per topic (collect).
    pub hops: Vec<(String, i64)>,
    /// The ledgers reconciled with the store and the archive (collect).
    pub audit: Audit,
    /// Each replica's exit code after SIGTERM, `None` when a signal ended it (collect).
    pub exit_codes: Vec<(String, Option<i32>)>,
    /// PUBLISHes the broker still held in each bridge client id's session after the bridges
    /// stopped, every id a replica used in the run (collect).
    pub session_leftovers: Vec<(String, u64)>,
    /// Each chaos action, when, and what it cost (collect).
    pub chaos: Vec<FaultCost>,
}

impl Report {
    /// The report of a run, without the ceiling (measured after, see [`Report::set_ceiling`]).
    pub fn build(setting: Setting, outcome: Outcome) -> Report {
        let (fleet, audit) = (&outcome.fleet, &outcome.audit);
        let cpu = outcome.usage.cpu(audit.expected_stored);
        let services_us_per_message = cpu
            .iter()
            .filter(|c| c.process != "tansu" && c.process != MACHINE)
            .map(|c| c.us_per_message)
            .sum();
        let sustained_rate = audit.expected_stored as f64
            / ((audit.last_stored_at - fleet.started_at).max(1) as f64 / 1000.0);
        let session_leftovers = outcome.session_leftovers.iter().map(|(_, n)| n).sum();
        let passed = audit.passed()
            && session_leftovers == 0
            && outcome.chaos.iter().all(|f| !f.failed)
            && outcome.exit_codes.iter().all(|(_, c)| *c == Some(0))
            && outcome.drained.lag.iter().all(|(_, lag)| *lag == 0);
        Report {
            scenario: setting.scenario,
            tenant: setting.tenant,
            started: setting.started,
            machine: Machine::this(),
            kafka: setting.kafka,
            fleet: FleetSummary {
                devices: fleet.devices.len(),
                published: fleet.published(),
                acked: fleet.acked(),
                seconds: fleet.seconds(),
                ack_rate: fleet.ack_rate(),
                connection_errors: outcome.connection_errors,
                refused: fleet.devices.iter().map(|d| d.refused).sum(),
                abandoned: fleet.devices.iter().map(|d| d.abandoned).sum(),
            },
            steady_rate: steady_rate(audit),
            drain_seconds: ((audit.last_stored_at - fleet.finished_at) as f64 / 1000.0).max(0.0),
            groups_drained_seconds: (outcome.drained.at - fleet.finished_at) as f64 / 1000.0,
            sustained_rate,
            ceiling: None,
            efficiency: None,
            shared_bound: None,
            cpu,
            services_us_per_message,
            memory: outcome.usage.memory(),
            passed,
            acks_per_second: outcome.acks_per_second,
            lag_left: outcome.drained.lag,
            lag_again: outcome.drained.lag_again,
            hops: outcome.hops,
            stages: outcome.stages,
            exit_codes: outcome.exit_codes,
            session_leftovers,
            sessions: outcome.session_leftovers,
            chaos: outcome.chaos,
            audit: outcome.audit,
        }
    }
}

impl Usage {
    /// CPU of each process over the run, and per message stored (`stored`, at least 1).
    fn cpu(&self, stored: u64) -> Vec<Cpu> {
        let stored = stored.max(1) as f64;
        self.after
            .iter()
            .map(|(name, after)| {
                let before = reading(&self.before, name);
                let seconds = after.cpu_seconds - before.cpu_seconds;
                // Counted over live threads and processes: a replica that exited lowers them.
                let wakeups = (after.wakeups - before.wakeups).max(0.0);
                let disk = (after.disk_bytes - before.disk_bytes).max(0.0);
                Cpu {
                    process: name.clone(),
                    seconds,
                    us_per_message: seconds * 1e6 / stored,
                    wakeups_per_message: wakeups / stored,
                    disk_bytes_per_message: disk / stored,
                }
            })
            .collect()
    }

    /// Highest and steady (median of the second half) RSS of each process sampled.
    fn memory(&self) -> Vec<Memory> {
        let mib = |b: u64| b as f64 / 1024.0 / 1024.0;
        let names: Vec<&str> = self
            .memory
            .first()
            .map(|row| row.iter().map(|(n, _)| n.as_str()).collect())
            .unwrap_or_default();
        names
            .into_iter()
            .map(|name| {
                let series: Vec<u64> = self
                    .memory
                    .iter()
                    .filter_map(|row| row.iter().find(|(n, _)| n == name).map(|(_, v)| *v))
                    .collect();
                let mut second_half: Vec<u64> = series[series.len() / 2..].to_vec();
                second_half.sort_unstable();
                Memory {
                    process: name.to_string(),
                    max_mib: mib(series.iter().copied().max().unwrap_or(0)),
                    steady_mib: mib(second_half.get(second_half.len() / 2).copied().unwrap_or(0)),
                }
            })
            .collect()
    }
}
