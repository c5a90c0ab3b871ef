//! The batch consumer: a group member that hands out batches of records and stores a batch's
//! offsets only when the runtime says its outputs were confirmed (auto-commit then commits
//! stored offsets only). It also guards against records the broker skips.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use iotp_contract::bundle;

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

    /// A batch starting with `first`: more records until it carries `max` (a bundle counts
    /// its items) or `linger` has passed. Not
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
        // Records carried: a bundle counts its items.
        let mut taken = 0;
        if self.accept(&first) {
            taken += weight(&first);
            batch.push(first);
        }
        let until = tokio::time::Instant::now() + linger;
        // One stream for the whole batch: `recv` registers a waker slot per record.
        let mut queued = self.consumer.stream();
        loop {
            while taken < max {
                match queued.next().now_or_never() {
                    Some(Some(Ok(msg))) => {
                        if self.accept(&msg) {
                            taken += weight(&msg);
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
            if taken >= max || tokio::time::Instant::now() >= until {
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

/// The records a consumed Kafka record carries, as a stage sees them: the record itself, or
/// the items of a bundle (`iotp_contract::bundle`), in order. A record that carries the bundle
/// schema's header but does not decode goes to the stage whole: its codec rejects it (a
/// known schema of another family) and it is dead-lettered with its bytes.
pub fn inputs<'a>(m: &'a BorrowedMessage<'a>, out: &mut Vec<Input<'a>>) {
    let payload = m.payload().unwrap_or_default();
    if bundle::is_bundle(payload) {
        match bundle::items(payload) {
            Ok(items) => {
                let (topic, partition, offset) = (m.topic(), m.partition(), m.offset());
                out.extend(items.into_iter().enumerate().map(|(i, item)| {
                    let header = |name: &str| {
                        item.headers
                            .iter()
                            .find(|(n, _)| *n == name)
                            .map(|(_, v)| *v)
                    };
                    Input {
                        topic,
                        partition,
                        offset,
                        item: Some(i as u32),
                        key: (!item.key.is_empty()).then_some(item.key),
                        payload: item.value,
                        replayed: replay::replayed(header),
                        traceparent: header(crate::trace::HEADER),
                    }
                }));
                return;
            }
            Err(e) => tracing::warn!(
                topic = m.topic(),
                partition = m.partition(),
                offset = m.offset(),
                error = %e,
                "a bundle that does not decode: handed to the stage whole, to be dead-lettered"
            ),
        }
    }
    out.push(input(m));
}

/// How many records a consumed Kafka record carries (a bundle's item count), for the batch
/// limit.
fn weight(m: &BorrowedMessage<'_>) -> usize {
    m.payload().and_then(bundle::count).unwrap_or(1).max(1)
}

/// A consumed Kafka record of its own as a stage sees it.
pub fn input<'a>(m: &'a BorrowedMessage<'a>) -> Input<'a> {
    let headers = m.headers();
    Input {
        topic: m.topic(),
        partition: m.partition(),
        offset: m.offset(),
        item: None,
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
///
/// It runs for every record, so the expected offsets are kept where a record finds its own
/// without hashing or allocating: a list of the (one or two) topics read, and per topic a
/// list indexed by partition number. Keyed by topic name in SipHash maps, the check cost
/// about 1,200 instructions per record (callgrind, docs/performance.md, session 21).
struct Continuity {
    stage: &'static str,
    /// Per topic: the offset expected next, by partition number ([`UNSEEN`] until a record
    /// of the partition was taken).
    next: Vec<(String, Vec<i64>)>,
    /// Partitions sought back: topic, partition, the offset expected next, and the offset of
    /// the jump. Empty but for the moments after a skip.
    reread: Vec<(String, i32, i64, i64)>,
}

/// No record of the partition taken yet.
const UNSEEN: i64 = -1;

/// What to do with a record, by its offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Take it.
    Take,
    /// Drop it: its partition is being read again from an earlier offset, and it comes again.
    Drop,
    /// Offsets were skipped: read the partition again from this offset, then report the
    /// outcome with [`Continuity::sought`] (the record itself is dropped) or, when the seek
    /// failed, [`Continuity::advance`] (the record is taken).
    SeekBack(i64),
    /// Taken after a gap that a re-read confirmed: this many offsets do not exist.
    TakeAfterGap(i64),
}

impl Continuity {
    fn new(stage: &'static str) -> Self {
        Self {
            stage,
            next: Vec::new(),
            reread: Vec::new(),
        }
    }

    /// The expected-offset slot of a partition, created on first use; `None` for a negative
    /// partition number, which no consumed record has.
    fn slot(&mut self, topic: &str, partition: i32) -> Option<&mut i64> {
        let partition = usize::try_from(partition).ok()?;
        let i = match self.next.iter().position(|(t, _)| t == topic) {
            Some(i) => i,
            None => {
                self.next.push((topic.to_string(), Vec::new()));
                self.next.len() - 1
            }
        };
        let offsets = &mut self.next[i].1;
        if offsets.len() <= partition {
            offsets.resize(partition + 1, UNSEEN);
        }
        Some(&mut offsets[partition])
    }

    /// Judge the record at `offset` of `topic`/`partition`.
    fn check(&mut self, topic: &str, partition: i32, offset: i64) -> Check {
        if !self.reread.is_empty() {
            if let Some(i) = self
                .reread
                .iter()
                .position(|(t, p, _, _)| *p == partition && t == topic)
            {
                let (_, _, expected, jumped_to) = self.reread[i];
                if offset > expected && offset != jumped_to {
                    // Fetched before the seek took effect: it comes again.
                    return Check::Drop;
                }
                self.reread.swap_remove(i);
                self.advance(topic, partition, offset);
                return if offset > expected {
                    Check::TakeAfterGap(offset - expected)
                } else {
                    Check::Take
                };
            }
        }
        let Some(slot) = self.slot(topic, partition) else {
            return Check::Take;
        };
        if *slot != UNSEEN && offset > *slot {
            return Check::SeekBack(*slot);
        }
        *slot = offset + 1;
        Check::Take
    }

    /// The record at `offset` was taken: the partition goes on after it (also when the
    /// offsets before it were skipped and the seek back failed).
    fn advance(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(slot) = self.slot(topic, partition) {
            *slot = offset + 1;
        }
    }

    /// The partition was sought back to `expected` after a record at `jumped_to`.
    fn sought(&mut self, topic: &str, partition: i32, expected: i64, jumped_to: i64) {
        self.reread
            .push((topic.to_string(), partition, expected, jumped_to));
    }

    fn gap(&self, m: &BorrowedMessage<'_>, size: i64, why: &'static str) {
        metrics()
            .consumer_offset_gaps_total
            .with_label_values(&[self.stage])
            .inc_by(size as u64);
        tracing::warn!(
            topic = m.topic(),
            partition = m.partition(),
            expected = m.offset() - size,
            next = m.offset(),
            why,
            "offset gap accepted"
        );
    }

    /// Take this record (true), or drop it because its partition is being read again.
    fn accept(&mut self, consumer: &StreamConsumer<GroupContext>, m: &BorrowedMessage<'_>) -> bool {
        let (topic, partition, offset) = (m.topic(), m.partition(), m.offset());
        let expected = match self.check(topic, partition, offset) {
            Check::Take => return true,
            Check::Drop => return false,
            Check::TakeAfterGap(size) => {
                self.gap(m, size, "offsets missing twice: a real gap");
                return true;
            }
            Check::SeekBack(expected) => expected,
        };
        tracing::warn!(
            topic,
            partition,
            expected,
            next = offset,
            "broker skipped offsets: reading the partition again"
        );
        metrics()
            .consumer_rereads_total
            .with_label_values(&[self.stage])
            .inc();
        match consumer.seek(
            topic,
            partition,
            Offset::Offset(expected),
            Duration::from_secs(10),
        ) {
            Ok(()) => {
                self.sought(topic, partition, expected, offset);
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "seek failed");
                self.gap(m, offset - expected, "seek failed");
                self.advance(topic, partition, offset);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_in_order_are_taken_per_partition_and_topic() {
        let mut c = Continuity::new("test");
        for offset in 0..5 {
            assert_eq!(c.check("a", 3, offset), Check::Take);
            assert_eq!(c.check("a", 0, offset + 100), Check::Take);
            assert_eq!(c.check("b", 3, offset + 7), Check::Take);
        }
        // A record at or before the expected offset (a re-delivery after a rebalance) is
        // taken: the store deduplicates.
        assert_eq!(c.check("a", 3, 2), Check::Take);
        assert_eq!(c.check("a", 3, 3), Check::Take);
        assert_eq!(c.check("a", 3, 4), Check::Take);
        // A partition first seen at any offset starts there.
        assert_eq!(c.check("a", 11, 5_000), Check::Take);
        assert_eq!(c.check("a", 11, 5_001), Check::Take);
        assert_eq!(
            c.check("a", -1, 9),
            Check::Take,
            "no such partition: not tracked"
        );
    }

    #[test]
    fn a_skip_reads_the_partition_again_and_a_confirmed_gap_is_taken() {
        let mut c = Continuity::new("test");
        assert_eq!(c.check("a", 1, 10), Check::Take);
        assert_eq!(c.check("a", 2, 0), Check::Take);
        // Offsets 11..15 skipped: seek back to 11.
        assert_eq!(c.check("a", 1, 15), Check::SeekBack(11));
        c.sought("a", 1, 11, 15);
        // Records fetched before the seek took effect are dropped; other partitions and
        // topics go on.
        assert_eq!(c.check("a", 1, 16), Check::Drop);
        assert_eq!(c.check("a", 2, 1), Check::Take);
        assert_eq!(c.check("b", 1, 16), Check::Take);
        // The re-read brings the missing offset: taken, and the partition is checked as usual.
        assert_eq!(c.check("a", 1, 11), Check::Take);
        assert_eq!(c.check("a", 1, 12), Check::Take);
        assert_eq!(c.check("a", 1, 14), Check::SeekBack(13));
        c.sought("a", 1, 13, 14);
        // The re-read jumps to the same offset again: the gap is real.
        assert_eq!(c.check("a", 1, 14), Check::TakeAfterGap(1));
        assert_eq!(c.check("a", 1, 15), Check::Take);
        assert!(c.reread.is_empty());
    }

    #[test]
    fn a_failed_seek_takes_the_record_and_goes_on_from_it() {
        let mut c = Continuity::new("test");
        assert_eq!(c.check("a", 0, 0), Check::Take);
        assert_eq!(c.check("a", 0, 3), Check::SeekBack(1));
        c.advance("a", 0, 3);
        assert_eq!(c.check("a", 0, 4), Check::Take);
        assert_eq!(c.check("a", 0, 6), Check::SeekBack(5));
    }
}
