//! Phase 2: the fleet publishes the scenario over MQTT, one connection per device, while the
//! [`Monitor`] watches memory, counters and progress, and the scenario's chaos timeline is run
//! against the stack. The CPU window opens here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::chaos::{self, Done};
use super::monitor::Monitor;
use super::Run;
use crate::fleet::{self, FleetRun, Progress};
use crate::plan::{self, DevicePlan, Step};
use crate::report::{PerProcess, Totals};

/// What driving the fleet produced.
pub struct Driven {
    /// The devices' ledgers: every publish and every PUBACK.
    pub fleet: FleetRun,
    /// The fleet's live counters (PUBACKs per second, reconnects).
    pub progress: Arc<Progress>,
    /// Still watching: the pipeline drains after the fleet is done.
    pub monitor: Monitor,
    /// What each process had used when the fleet started.
    pub before: PerProcess<Totals>,
    /// The chaos actions done meanwhile (none unless the scenario has a timeline).
    pub chaos: Vec<Done>,
}

/// Run the scenario's fleet against the pipeline until its last PUBACK (or a stall).
pub async fn drive(run: &Run) -> anyhow::Result<Driven> {
    let plans = plan::plan(&run.scenario);
    let progress = Arc::new(Progress::default());
    let monitor = Monitor::start(run, &progress, publishes(&plans));
    let before = run.stack.totals();
    // Checked when the scenario was loaded.
    let steps = run.scenario.chaos.steps().unwrap_or_default();
    let start = Instant::now();
    let fleet_done = AtomicBool::new(false);
    let (fleet, chaos) = tokio::join!(
        async {
            let fleet = fleet::run(run.target("iot"), &run.scenario, plans, progress.clone()).await;
            monitor.fleet_done(&progress);
            fleet_done.store(true, Ordering::Relaxed);
            fleet
        },
        chaos::run(&run.stack, steps, start, &fleet_done)
    );
    Ok(Driven {
        fleet: fleet?,
        progress,
        monitor,
        before,
        chaos,
    })
}

/// MQTT publishes the plans make: a telemetry message, resend or heartbeat is one, an offline
/// spell as many as it measured.
fn publishes(plans: &[DevicePlan]) -> u64 {
    plans
        .iter()
        .flat_map(|p| &p.steps)
        .map(|s| match s {
            Step::Offline { count, .. } => *count,
            _ => 1,
        })
        .sum()
}
