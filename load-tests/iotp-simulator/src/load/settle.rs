//! Phase 3: wait until the store and the dead-letter archive hold what the fleet was
//! acknowledged for, then until every consumer group of the pipeline is at lag 0, or until
//! nothing moved for the scenario's `stall_timeout`. The CPU window closes there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use iotp_contract::topology::topology;
use iotp_core::kafka::consumer_lag;
use iotp_store::ReadingStore;

use super::chaos::Done;
use super::counters::Counters;
use super::{Driven, Run};
use crate::fleet::{now_millis, FleetRun, Progress};
use crate::plan::{Expected, Fault};
use crate::report::{Drained, Usage, CONFIRM_DRAINED_SECONDS};

/// Pause between two looks at the store or the consumer groups.
const POLL: Duration = Duration::from_millis(250);

/// What the fleet did and what the pipeline took to absorb it.
pub struct Settled {
    /// The devices' ledgers, from [`super::drive`].
    pub fleet: FleetRun,
    /// The fleet's counters, from [`super::drive`].
    pub progress: Arc<Progress>,
    /// When every consumer group was at lag 0, and what lag was left.
    pub drained: Drained,
    /// CPU from the fleet's start until drained, memory sampled meanwhile.
    pub usage: Usage,
    /// The chaos actions done while the fleet published.
    pub chaos: Vec<Done>,
    /// The services' counters over the run.
    pub counters: Counters,
}

/// Wait for the pipeline to absorb what the fleet sent; then stop watching.
pub async fn settle(run: &Run, driven: Driven) -> anyhow::Result<Settled> {
    let Driven {
        fleet,
        progress,
        mut monitor,
        before,
        chaos,
    } = driven;
    let (stored, _) = absorbed(run, owed(&fleet)).await?;
    let lag = drain_groups(run, run.scenario.stall_timeout).await?;
    let drained_at = now_millis();
    monitor.stop_display(stored);
    let after = run.stack.totals();
    let (memory, counters) = monitor.stop_sampling();
    let lag_again = if lag.iter().all(|(_, l)| *l == 0) {
        Some(confirm_drained(run).await?)
    } else {
        None
    };
    Ok(Settled {
        fleet,
        progress,
        drained: Drained {
            at: drained_at,
            lag,
            lag_again,
        },
        usage: Usage {
            before,
            after,
            memory,
        },
        chaos,
        counters,
    })
}

/// Acknowledged messages owed to the store and to the archive.
fn owed(fleet: &FleetRun) -> (u64, u64) {
    let (mut store, mut letters) = (0, 0);
    for d in &fleet.devices {
        for (i, acks) in d.acks.iter().enumerate() {
            if *acks == 0 {
                continue;
            }
            match d.faults[i].map(Fault::expected).unwrap_or(Expected::Stored) {
                Expected::Stored => store += 1,
                Expected::DeadLetter(_) => letters += 1,
            }
        }
    }
    (store, letters)
}

/// Wait until the store and the archive hold what is `owed` (messages, dead letters), or
/// nothing moved for the stall timeout; what they hold.
async fn absorbed(run: &Run, owed: (u64, u64)) -> anyhow::Result<(u64, u64)> {
    let (owed_store, owed_letters) = owed;
    let stall = run.scenario.stall_timeout;
    let mut watch = Stall::new(stall);
    loop {
        // Polled from the per-device counts (a thousand rows, not a million); the exact count
        // once they say everything is there.
        let mut stored = run.store.stored_by_device_counts(&run.tenant).await?;
        let letters = run.letters().await?.len() as u64;
        if stored >= owed_store && letters >= owed_letters {
            stored = run.store.message_count(Some(&run.tenant)).await?;
            if stored >= owed_store {
                return Ok((stored, letters));
            }
        }
        run.stack.restart_crashed().await;
        if watch.stuck((stored, letters)) {
            eprintln!("iotp-load: nothing moved for {stall:?}: {stored}/{owed_store} stored, {letters}/{owed_letters} dead letters");
            return Ok((stored, letters));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Wait until every consumer group of the pipeline has consumed everything (lag 0), or
/// nothing moved for `stall`; the lag left per group.
async fn drain_groups(run: &Run, stall: Duration) -> anyhow::Result<Vec<(String, i64)>> {
    let kafka = &run.kafka;
    let mut watch = Stall::new(stall);
    loop {
        run.stack.restart_crashed().await;
        let mut lags = Vec::new();
        for c in &topology().kafka.consumers {
            let mut lag = 0;
            for topic in &c.topics {
                lag += consumer_lag(kafka, &c.group, topic).await?;
            }
            lags.push((c.group.clone(), lag));
        }
        let total: i64 = lags.iter().map(|(_, l)| l).sum();
        if total == 0 {
            return Ok(lags);
        }
        if watch.stuck(total) {
            eprintln!("iotp-load: consumer lag stuck for {stall:?}: {lags:?}");
            return Ok(lags);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Look at the consumer groups again [`CONFIRM_DRAINED_SECONDS`] after they were all at lag 0,
/// outside the CPU window; if lag is back, wait until it is 0 again (or stalls). Returns the
/// lag found on that second look. A fold that commits after the groups' lag read 0 made the
/// roll-up audit fail twice here, although every bucket was right once the services stopped.
async fn confirm_drained(run: &Run) -> anyhow::Result<i64> {
    tokio::time::sleep(Duration::from_secs(CONFIRM_DRAINED_SECONDS)).await;
    let again = total_lag(run).await?;
    if again > 0 {
        eprintln!(
            "iotp-load: lag {again} again {CONFIRM_DRAINED_SECONDS} s after every group was at lag 0"
        );
        drain_groups(run, run.scenario.stall_timeout).await?;
    }
    Ok(again)
}

async fn total_lag(run: &Run) -> anyhow::Result<i64> {
    let mut total = 0;
    for c in &topology().kafka.consumers {
        for topic in &c.topics {
            total += consumer_lag(&run.kafka, &c.group, topic).await?;
        }
    }
    Ok(total)
}

/// Tells when a value polled again and again stopped moving.
struct Stall<T> {
    last: Option<T>,
    moved: Instant,
    limit: Duration,
}

impl<T: PartialEq> Stall<T> {
    /// Stuck once the value stays the same for longer than `limit`.
    fn new(limit: Duration) -> Self {
        Self {
            last: None,
            moved: Instant::now(),
            limit,
        }
    }

    /// Note the value seen now; whether it has not moved for longer than the limit.
    fn stuck(&mut self, now: T) -> bool {
        if self.last.as_ref() == Some(&now) {
            return self.moved.elapsed() > self.limit;
        }
        self.last = Some(now);
        self.moved = Instant::now();
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_stuck_only_after_it_stayed_put_past_the_limit() {
        let mut watch = Stall::new(Duration::from_millis(100));
        assert!(!watch.stuck(1), "first look");
        assert!(!watch.stuck(1), "not yet");
        std::thread::sleep(Duration::from_millis(150));
        assert!(!watch.stuck(2), "moved");
        assert!(!watch.stuck(2));
        std::thread::sleep(Duration::from_millis(150));
        assert!(watch.stuck(2));
    }
}
