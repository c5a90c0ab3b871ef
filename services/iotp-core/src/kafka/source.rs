//! The batch consumer: a group member that hands out batches of records and stores a batch's
//! offsets only when the runtime says its outputs were confirmed (auto-commit then commits
//! stored offsets only). It also guards against records the broker skips.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::leave::{self, GroupContext};
use super::KafkaConfig;
use crate::dead_letter::replay;
use crate::metrics::metrics;
use crate::stage::Input;

/// A subscribed consumer group member.
pub struct KafkaSource {
    consumer: StreamConsumer<GroupContext>,
    group: String,
    stage: &'static str,
    /// Behind a lock only so batches can borrow the consumer while it is checked; one task
    /// uses it, so the lock is never contended.
    continuity: Mutex<Continuity>,
}

impl KafkaSource {
    /// Join `group` as static member `replica` and subscribe to `topics`.
    pub fn subscribe(
        kafka: &KafkaConfig,
        group: &str,
        replica: &str,
        topics: &[String],
        stage: &'static str,
    ) -> Result<Self, KafkaError> {
        let consumer: StreamConsumer<GroupContext> = kafka
            .consumer_config(group, replica)?
            .create_with_context(GroupContext::new())?;
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(Self {
            consumer,
            group: group.to_string(),
            stage,
            continuity: Mutex::new(Continuity::new(stage)),
        })
    }

    /// The next record. Cancel-safe: race it against shutdown and ticks.
    pub async fn first(&self) -> Result<BorrowedMessage<'_>, KafkaError> {
        self.consumer.recv().await
    }

    /// A batch starting with `first`: more records until `max` or `linger` has passed. Not
    /// cancel-safe (taken records would be lost while later offsets are committed): run it
    /// to completion.
    ///
    /// Records already queued are taken at once; when the queue runs dry, the batch sleeps
    /// out the rest of `linger` and then takes what came meanwhile. Waiting for each record
    /// instead woke this task once for every partition of every fetch response (librdkafka
    /// calls the queue's wake-up for each partition's records it hands over), a thread
    /// switch each, for records that would have waited for the linger anyway.
    pub async fn fill<'c>(
        &'c self,
        first: BorrowedMessage<'c>,
        max: usize,
        linger: Duration,
    ) -> Result<Vec<BorrowedMessage<'c>>, KafkaError> {
        let mut batch = Vec::new();
        if self.accept(&first) {
            batch.push(first);
        }
        let until = tokio::time::Instant::now() + linger;
        // One stream for the whole batch: `recv` registers a waker slot per record.
        let mut queued = self.consumer.stream();
        loop {
            while batch.len() < max {
                match queued.next().now_or_never() {
                    Some(Some(Ok(msg))) => {
                        if self.accept(&msg) {
                            batch.push(msg);
                        }
                    }
                    // The broker went away mid-batch: hand on what was taken; the next
                    // wait for a first record sees the error again.
                    Some(Some(Err(e))) if broker_unavailable(&e) => return Ok(batch),
                    Some(Some(Err(e))) => return Err(e),
                    // Nothing queued (or an event the client handled itself, such as a
                    // log line: what follows it is taken after the sleep).
                    Some(None) | None => break,
                }
            }
            if batch.len() >= max || tokio::time::Instant::now() >= until {
                return Ok(batch);
            }
            tokio::time::sleep_until(until).await;
        }
    }

    fn accept(&self, m: &BorrowedMessage<'_>) -> bool {
        match self.continuity.lock() {
            Ok(mut c) => c.accept(&self.consumer, m),
            Err(poisoned) => poisoned.into_inner().accept(&self.consumer, m),
        }
    }

    /// Store the offsets past the last record of each partition in `inputs`.
    pub fn store_offsets(&self, inputs: &[Input<'_>]) -> Result<(), KafkaError> {
        self.consumer.store_offsets(&next_offsets(inputs))
    }

    /// Commit what was stored, at shutdown.
    pub fn commit(&self) {
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "final commit failed; the last batch will be consumed again")
            }
        }
    }

    /// Leave the group, after the final [`commit`](Self::commit): this static member's
    /// partitions go to the other members at once instead of waiting for its session to time
    /// out (see `kafka/leave.rs`). Counted in `iotp_consumer_group_leaves_total` by outcome; a leave
    /// that is not confirmed is logged and loses nothing.
    pub async fn leave(&self) {
        let outcome = leave::leave(&self.consumer, leave::LEAVE_WITHIN).await;
        let label = match &outcome {
            Ok(took) => {
                tracing::info!(group = %self.group, took = ?took, "left the consumer group");
                "left"
            }
            Err(why) => {
                tracing::warn!(
                    group = %self.group,
                    why = %why,
                    "leaving the consumer group not confirmed: this member's partitions wait for its session timeout (offsets are committed)"
                );
                "unconfirmed"
            }
        };
        metrics()
            .consumer_group_leaves_total
            .with_label_values(&[self.stage, label])
            .inc();
    }
}

/// A consumer error that only says the broker is unreachable for now (restart, network):
/// librdkafka reconnects on its own, so the consumer waits rather than stops. Fatal errors
/// and errors about the group or its topics still stop the service.
pub fn broker_unavailable(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e,
        KafkaError::MessageConsumption(
            C::AllBrokersDown
                | C::BrokerTransportFailure
                | C::NetworkException
                | C::RequestTimedOut
                | C::OperationTimedOut
                | C::BrokerNotAvailable
                | C::CoordinatorNotAvailable
                | C::NotCoordinator
                | C::LeaderNotAvailable
                | C::NotLeaderForPartition
        )
    )
}

/// A consumed record as a stage sees it.
pub fn input<'a>(m: &'a BorrowedMessage<'a>) -> Input<'a> {
    let headers = m.headers();
    Input {
        topic: m.topic(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key(),
        payload: m.payload().unwrap_or_default(),
        replayed: headers.and_then(|h| {
            replay::replayed(|name| {
                h.iter()
                    .find(|header| header.key == name)
                    .and_then(|header| header.value)
            })
        }),
        traceparent: headers.and_then(|h| {
            h.iter()
                .find(|header| header.key == crate::trace::HEADER)
                .and_then(|header| header.value)
        }),
    }
}

/// Offsets to store: one past the last record of each partition in the batch.
fn next_offsets(inputs: &[Input<'_>]) -> TopicPartitionList {
    let mut last: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for i in inputs {
        let e = last.entry((i.topic, i.partition)).or_insert(i.offset);
        *e = (*e).max(i.offset);
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in last {
        // Adding to a fresh list cannot fail.
        let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(offset + 1));
    }
    tpl
}

/// Guards against skipped records. A record whose offset jumps past the next expected one of
/// its partition is not taken: the partition is sought back to the expected offset and read
/// again. If the re-read jumps to the same offset, the gap is real (transaction markers,
/// compaction) and is accepted. Accepted gaps are counted in `iotp_consumer_offset_gaps_total`,
/// re-reads in `iotp_consumer_rereads_total`. (A count-only first version of this check is
/// what showed records skipped under load: the runtime itself dropped half-gathered batches.)
struct Continuity {
    stage: &'static str,
    /// Per topic, per partition: the offset expected next. Keyed by topic first so a record
    /// is looked up without allocating its topic name.
    next: HashMap<String, HashMap<i32, i64>>,
    /// Partitions sought back: the offset expected next, and the offset of the jump.
    reread: HashMap<(String, i32), (i64, i64)>,
}

impl Continuity {
    fn new(stage: &'static str) -> Self {
        Self {
            stage,
            next: HashMap::new(),
            reread: HashMap::new(),
        }
    }

    fn gap(&self, m: &BorrowedMessage<'_>, expected: i64, why: &'static str) {
        let size = m.offset() - expected;
        metrics()
            .consumer_offset_gaps_total
            .with_label_values(&[self.stage])
            .inc_by(size as u64);
        tracing::warn!(
            topic = m.topic(),
            partition = m.partition(),
            expected,
            next = m.offset(),
            why,
            "offset gap accepted"
        );
    }

    /// The offset expected next on `m`'s partition, if one was seen.
    fn expected(&self, m: &BorrowedMessage<'_>) -> Option<i64> {
        self.next.get(m.topic())?.get(&m.partition()).copied()
    }

    fn advance(&mut self, m: &BorrowedMessage<'_>) {
        let partitions = match self.next.get_mut(m.topic()) {
            Some(p) => p,
            None => self.next.entry(m.topic().to_string()).or_default(),
        };
        partitions.insert(m.partition(), m.offset() + 1);
    }

    /// Take this record (true), or drop it because its partition is being read again.
    fn accept(&mut self, consumer: &StreamConsumer<GroupContext>, m: &BorrowedMessage<'_>) -> bool {
        let offset = m.offset();
        if !self.reread.is_empty() {
            let key = (m.topic().to_string(), m.partition());
            if let Some(&(expected, jumped_to)) = self.reread.get(&key) {
                if offset > expected && offset != jumped_to {
                    // Fetched before the seek took effect: it comes again.
                    return false;
                }
                self.reread.remove(&key);
                if offset > expected {
                    self.gap(m, expected, "offsets missing twice: a real gap");
                }
                self.advance(m);
                return true;
            }
        }
        if let Some(expected) = self.expected(m).filter(|&e| offset > e) {
            tracing::warn!(
                topic = m.topic(),
                partition = m.partition(),
                expected,
                next = offset,
                "broker skipped offsets: reading the partition again"
            );
            metrics()
                .consumer_rereads_total
                .with_label_values(&[self.stage])
                .inc();
            let sought = consumer.seek(
                m.topic(),
                m.partition(),
                Offset::Offset(expected),
                Duration::from_secs(10),
            );
            match sought {
                Ok(()) => {
                    self.reread
                        .insert((m.topic().to_string(), m.partition()), (expected, offset));
                    return false;
                }
                Err(e) => {
                    tracing::error!(error = %e, "seek failed");
                    self.gap(m, expected, "seek failed");
                }
            }
        }
        self.advance(m);
        true
    }
}
