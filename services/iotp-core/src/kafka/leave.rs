//! Leaving the consumer group on the way out, so that a replica that goes away (scale-in, a
//! rolling update, a stage that stopped) hands its partitions to the other members at once.
//!
//! Consumers are static members (`group.instance.id` = replica name). librdkafka sends no
//! LeaveGroup when a static member closes (KIP-345; `rd_kafka_cgrp_leave_maybe` skips it on
//! termination), so the coordinator keeps the member, and its partitions, until its session
//! times out (30 s; measured on Tansu 0.6.0, a scale-in survivor got them after 38 s).
//! Unsubscribing first is not termination: librdkafka revokes the
//! assignment and then sends LeaveGroup (v0/v1) with the member id, which Tansu acts on (and
//! Kafka does). KIP-345's administrative form (LeaveGroup v3+, empty member id,
//! `group_instance_id`) would not do on Tansu 0.6.0: its coordinator removes members by member
//! id only, and librdkafka does not tell the application its member id. The leave goes over
//! the consumer's own connections, so TLS and SASL settings apply to it unchanged.
//!
//! Closing the consumer before librdkafka has sent the LeaveGroup suppresses it, and
//! librdkafka reports the LeaveGroup response only in a debug line (context `cgrp`, facility
//! `LEAVEGROUP`): [`GroupContext`] watches for that line, and [`leave`] waits for it. The
//! group's leader first polls one heartbeat interval longer: Tansu 0.6.0 keeps a leader that
//! leaves a re-forming group (another member has just left) as the leader, and the group never
//! forms again (measured; see `LEADER_WAITS`).
//! (DescribeGroups, asking the coordinator, fails on Tansu 0.6.0's SQLite engine: it cannot
//! read its own stored group.) A leave that is not confirmed loses nothing: offsets were
//! committed before it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use tokio::sync::watch;

/// Longest a leave may take. Unsubscribing, the revocation and the LeaveGroup round trip take
/// milliseconds; librdkafka gives the LeaveGroup request 5 s, and a rebalance in progress
/// (Tansu holds a static member's JoinGroup up to 3 s) postpones the unsubscribe.
pub(crate) const LEAVE_WITHIN: Duration = Duration::from_secs(16);

/// How long the group's leader keeps polling before it leaves: one heartbeat interval
/// (librdkafka's 3 s) and a margin, so that it has heard of a rebalance another member's
/// leave began, and leaves a formed group (Tansu 0.6.0 keeps a leader that leaves a
/// re-forming group as the leader, and the group then never forms again).
const LEADER_WAITS: Duration = Duration::from_millis(3_500);

/// The debug context that carries librdkafka's LeaveGroup report.
pub(crate) const DEBUG_CONTEXT: &str = "cgrp";

/// The consumers' librdkafka context: notes librdkafka's report of a LeaveGroup response,
/// exports the statistics' consumer lag, and forwards every log line to `tracing` (target `librdkafka`) as rdkafka's default
/// context forwards them to `log`. The `cgrp` debug lines it needs are dropped there at the
/// usual levels.
pub struct GroupContext {
    left: watch::Sender<Option<Result<(), String>>>,
    /// Whether the last JoinGroup response named this member the leader.
    leader: AtomicBool,
}

impl GroupContext {
    /// A context that has seen no LeaveGroup response.
    pub fn new() -> Self {
        Self {
            left: watch::channel(None).0,
            leader: AtomicBool::new(false),
        }
    }
}

impl Default for GroupContext {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, line: &str) {
        if let Some(outcome) = leave_report(fac, line) {
            self.left.send_replace(Some(outcome));
        }
        if let Some(leads) = leader_report(fac, line) {
            self.leader.store(leads, Ordering::Relaxed);
        }
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", "{fac} {line}"),
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", "{fac} {line}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", "{fac} {line}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", "{fac} {line}"),
        }
    }

    /// librdkafka's statistics report: the group's lag per assigned partition (`stats.rs`).
    fn stats_raw(&self, statistics: &[u8]) {
        if let Err(e) = super::stats::record_lag(statistics) {
            tracing::warn!(target: "librdkafka", error = %e, "statistics report not understood; consumer lag not updated");
        }
    }
}

impl ConsumerContext for GroupContext {}

/// librdkafka's report of a LeaveGroup response (`rd_kafka_cgrp_handle_LeaveGroup`), if
/// this log line is one: Ok, or the error it names.
fn leave_report(fac: &str, line: &str) -> Option<Result<(), String>> {
    if fac != "LEAVEGROUP" {
        return None;
    }
    // After librdkafka's thread prefix, `[thrd:main]: `.
    let report = line.split_once("]: ").map_or(line, |(_, report)| report);
    if report.starts_with("LeaveGroup response received") {
        Some(Ok(()))
    } else if report.starts_with("LeaveGroup response error") {
        Some(Err(report.to_string()))
    } else {
        None
    }
}

/// Whether this log line is a JoinGroup response and names this member the leader
/// (`rd_kafka_cgrp_handle_JoinGroup`: "LeaderId {id} (me), my MemberId ...").
fn leader_report(fac: &str, line: &str) -> Option<bool> {
    if fac != "JOINGROUP" || !line.contains("JoinGroup response: ") {
        return None;
    }
    Some(line.contains(" (me), my MemberId"))
}

/// Unsubscribe `consumer` and wait, polling it, until librdkafka reports the coordinator's
/// answer to its LeaveGroup: the time that took, or why the leave is not confirmed.
pub(crate) async fn leave(
    consumer: &StreamConsumer<GroupContext>,
    within: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let context = consumer.context();
    if context.leader.load(Ordering::Relaxed) {
        let _ = tokio::time::timeout(LEADER_WAITS, poll_and_drop::<()>(consumer)).await;
    }
    context.left.send_replace(None);
    let mut left = context.left.subscribe();
    consumer.unsubscribe();
    let answered = async {
        loop {
            if let Some(outcome) = left.borrow_and_update().clone() {
                return outcome;
            }
            if left.changed().await.is_err() {
                return Err("the consumer is gone".to_string());
            }
        }
    };
    // Polling serves the revocation (librdkafka hands it to the poll path); the LeaveGroup
    // follows once it is done. Records fetched before it are dropped unstored: the next owner
    // reads them from the committed offsets.
    let outcome = tokio::time::timeout(within, async {
        tokio::select! {
            outcome = answered => outcome,
            never = poll_and_drop(consumer) => never,
        }
    })
    .await;
    match outcome {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(why)) => Err(why),
        Err(_) => Err(format!(
            "no LeaveGroup response within {within:?} (not joined, or the coordinator is unreachable)"
        )),
    }
}

/// Serve `consumer`'s queue (rebalances are handled there), dropping records unstored.
async fn poll_and_drop<T>(consumer: &StreamConsumer<GroupContext>) -> T {
    loop {
        if consumer.recv().await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn librdkafkas_leave_group_report_is_read() {
        // The lines of librdkafka 2.12's rd_kafka_cgrp_handle_LeaveGroup.
        assert_eq!(
            leave_report(
                "LEAVEGROUP",
                "[thrd:main]: LeaveGroup response received in state up"
            ),
            Some(Ok(()))
        );
        assert_eq!(
            leave_report(
                "LEAVEGROUP",
                "[thrd:main]: LeaveGroup response error in state up: Broker: Unknown member"
            ),
            Some(Err(
                "LeaveGroup response error in state up: Broker: Unknown member".to_string()
            ))
        );
        assert_eq!(
            leave_report("LEAVEGROUP", "LeaveGroup response received in state up"),
            Some(Ok(()))
        );
        assert_eq!(leave_report("LEAVE", "Leaving group"), None);
        let join = "[thrd:main]: JoinGroup response: GenerationId 2, Protocol cooperative-sticky, LeaderId tagging-0-8a2c (me), my MemberId tagging-0-8a2c, member metadata count 3: (no error)";
        assert_eq!(leader_report("JOINGROUP", join), Some(true));
        let follower = join
            .replace(" (me)", "")
            .replace("my MemberId tagging-0", "my MemberId tagging-1");
        assert_eq!(leader_report("JOINGROUP", &follower), Some(false));
        assert_eq!(
            leader_report("JOINGROUP", "[thrd:main]: I am elected leader"),
            None
        );
        assert_eq!(leave_report("HEARTBEAT", "Heartbeat for group"), None);
    }
}
