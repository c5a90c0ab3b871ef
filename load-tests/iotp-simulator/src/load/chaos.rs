//! Phase 2, beside the fleet: the scenario's chaos timeline run against the stack, each
//! action at its offset from the fleet's start (an action that takes long delays the next),
//! and any replica that exits on its own started again (as Kubernetes would; each one is
//! listed); then, once the audit has the store's timeline, what each fault cost.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::counters::Counters;
use crate::audit::Audit;
use crate::chaos::recovery::{growth, recovery, FaultCost};
use crate::chaos::{Action, Step};
use crate::fleet::now_millis;
use crate::stack::{Crash, Stack};

/// One action as it was done, or a replica found exited on its own.
#[derive(Debug, Clone)]
pub struct Done {
    /// The action (`kill parser`), or `crash load-parser-0 (exit 1)`.
    pub action: String,
    /// When it began, epoch ms.
    pub at: i64,
    /// From its start until the replicas it started were ready, or the broker listened again.
    pub took: Duration,
    /// What happened (replica killed, exit codes), or why it failed.
    pub detail: String,
    /// Whether it failed (the run then fails).
    pub failed: bool,
}

/// Pause between two looks at the timeline and at the replicas.
const POLL: Duration = Duration::from_millis(250);

/// Run `steps` against `stack`, offsets from `start`, starting again any replica that exits
/// on its own, until the timeline is done and `fleet_done` is set; what was done.
pub async fn run(
    stack: &Stack,
    steps: Vec<Step>,
    start: Instant,
    fleet_done: &AtomicBool,
) -> Vec<Done> {
    let mut done = Vec::new();
    let mut steps = steps.into_iter().peekable();
    loop {
        stack.restart_crashed().await;
        let due = steps.next_if(|s| start.elapsed() >= s.at);
        let Some(step) = due else {
            if steps.peek().is_none() && fleet_done.load(Ordering::Relaxed) {
                return done;
            }
            tokio::time::sleep(POLL).await;
            continue;
        };
        let at = now_millis();
        let began = Instant::now();
        let result = match &step.action {
            Action::Scale(service, n) => stack.scale(service, *n).await,
            Action::Kill(service) => stack
                .kill_replica(service)
                .await
                .map(|(name, took)| (format!("{name} killed, ready again"), took)),
            Action::KillTansu => stack.kill_tansu().await.map(|t| (String::new(), t)),
            Action::RestartRabbitmq => stack.restart_rabbitmq().await.map(|t| (String::new(), t)),
            Action::RestartMosquitto => stack.restart_mosquitto().await.map(|t| (String::new(), t)),
        };
        let (detail, took, failed) = match result {
            Ok((detail, took)) => (detail, took, false),
            Err(e) => (format!("{e:#}"), began.elapsed(), true),
        };
        println!(
            "iotp-load: chaos +{:.1} s: {} ({:.1} s){}{}",
            began.saturating_duration_since(start).as_secs_f64(),
            step.action,
            took.as_secs_f64(),
            if detail.is_empty() { "" } else { ": " },
            detail
        );
        done.push(Done {
            action: step.action.to_string(),
            at,
            took,
            detail,
            failed,
        });
    }
}

/// The actions done and the replicas that exited on their own (started again), in time order.
pub fn with_crashes(mut done: Vec<Done>, crashes: &[Crash]) -> Vec<Done> {
    done.extend(crashes.iter().map(|c| Done {
        action: format!(
            "crash {} ({})",
            c.replica,
            c.code.map_or("by signal".into(), |c| format!("exit {c}"))
        ),
        at: c.at,
        took: Duration::ZERO,
        detail: "exited on its own; started again".into(),
        failed: false,
    }));
    done.sort_by_key(|d| d.at);
    done
}

/// What each fault cost: the recovery of the stored rate (the audit's timeline), and the
/// redeliveries counted from it until the next fault (or the end of the run). `started_at`:
/// the fleet's first publish, epoch ms; `acks_per_second` from then.
pub fn costs(
    done: &[Done],
    audit: &Audit,
    counters: &Counters,
    started_at: i64,
    acks_per_second: &[u64],
) -> Vec<FaultCost> {
    let stored: BTreeMap<i64, u64> = audit.timeline.iter().map(|s| (s.at, s.stored)).collect();
    let duplicates = counters.series("upserter", "iotp_duplicates_removed_total");
    let received = counters.series("mqtt-bridge", "iotp_mqtt_received_messages_total");
    let end = received.last().map_or(i64::MAX, |(t, _)| *t);
    let acks_between = |from: i64, to: i64| -> f64 {
        let second = |t: i64| ((t - started_at).max(0) / 1000) as usize;
        acks_per_second
            .iter()
            .skip(second(from))
            .take(second(to).saturating_sub(second(from)))
            .sum::<u64>() as f64
    };
    done.iter()
        .enumerate()
        .map(|(i, d)| {
            let to = done.get(i + 1).map_or(end, |n| n.at);
            let at = (d.at - started_at) as f64 / 1000.0;
            FaultCost {
                action: d.action.clone(),
                at,
                ready_after: d.took.as_secs_f64(),
                detail: d.detail.clone(),
                failed: d.failed,
                recovery: recovery(&stored, at),
                store_duplicates: growth(&duplicates, d.at, to),
                mqtt_redeliveries: (growth(&received, d.at, to) - acks_between(d.at, to)).max(0.0),
            }
        })
        .collect()
}
