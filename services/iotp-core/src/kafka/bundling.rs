//! How a batch of outputs becomes Kafka records when bundles are on (`kafka.bundle_max_bytes`):
//! the outputs bound for one partition of one topic go into one bundle
//! ([`iotp_contract::bundle`]) up to the size limit; an output larger than the limit, or bound
//! for a topic whose partitions are not known yet, is a record of its own. The sink picks the
//! partition a keyed output would have had from librdkafka (its default `consistent_random`
//! partitioner: CRC-32 of the key modulo the partition count), so turning bundles on or off
//! moves no device to another partition. Unkeyed outputs (the bridge's) share one partition
//! per window of twice `kafka.linger`, as librdkafka's sticky partitioner does for unkeyed
//! records (`sticky.partitioning.linger.ms`): turning per batch instead sent a produce request
//! per batch, and cost the bridge and Tansu more than bundling saved (docs/performance.md).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iotp_contract::bundle::{self, BundleWriter};
use iotp_contract::FRAME_HEADER_LEN;
use rdkafka::producer::{Producer, ThreadedProducer};

use super::sink::SinkContext;

use crate::stage::Output;

/// One Kafka record of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Planned<'t> {
    /// The output with this index, as a record of its own.
    Single(usize),
    /// These outputs, in order, as one bundle on this partition.
    Bundle {
        topic: &'t str,
        partition: i32,
        members: Vec<usize>,
    },
}

impl Planned<'_> {
    /// The outputs the record carries.
    pub(super) fn into_members(self) -> Vec<usize> {
        match self {
            Planned::Single(i) => vec![i],
            Planned::Bundle { members, .. } => members,
        }
    }
}

/// Whether `out` fits in a bundle of at most `max_bytes`.
pub(super) fn fits(out: &Output, max_bytes: usize) -> bool {
    FRAME_HEADER_LEN + 12 + item_len(out) <= max_bytes
}

/// Bytes `out` takes in a bundle.
fn item_len(out: &Output) -> usize {
    bundle::bytes_len(&out.key)
        + bundle::bytes_len(&out.value)
        + out
            .headers
            .iter()
            .map(|(n, v)| bundle::bytes_len(n.as_bytes()) + bundle::bytes_len(v))
            .sum::<usize>()
        + 20
}

/// The partition librdkafka's default partitioner gives `key` (`rd_kafka_msg_partitioner_consistent_random`
/// for a non-empty key: CRC-32 modulo the partition count).
pub(super) fn key_partition(key: &[u8], partitions: i32) -> i32 {
    (crc32fast::hash(key) % partitions.max(1) as u32) as i32
}

/// Group `outputs` (their topic `None` is `default_topic`) into records. `partitions` gives a
/// topic's partition count (`None`: not known, the output goes alone); `unkeyed` the partition
/// of this batch's unkeyed outputs of a topic with that many partitions.
pub(super) fn plan<'t>(
    outputs: &[&'t Output],
    default_topic: &'t str,
    max_bytes: usize,
    partitions: impl Fn(&str) -> Option<i32>,
    unkeyed: impl Fn(i32) -> i32,
) -> Vec<Planned<'t>> {
    let mut planned = Vec::new();
    // Open bundles: topic, partition, index in `planned`, bytes so far.
    let mut open: Vec<(&'t str, i32, usize, usize)> = Vec::new();
    for (i, out) in outputs.iter().enumerate() {
        let topic: &'t str = out.topic.as_deref().unwrap_or(default_topic);
        let size = item_len(out);
        let count = match partitions(topic) {
            Some(n) if n > 0 && fits(out, max_bytes) => n,
            _ => {
                planned.push(Planned::Single(i));
                continue;
            }
        };
        let partition = if out.key.is_empty() {
            unkeyed(count)
        } else {
            key_partition(&out.key, count)
        };
        let slot = open
            .iter()
            .position(|(t, p, ..)| *p == partition && *t == topic);
        match slot {
            Some(s) if open[s].3 + size <= max_bytes => {
                open[s].3 += size;
                if let Planned::Bundle { members, .. } = &mut planned[open[s].2] {
                    members.push(i);
                }
            }
            _ => {
                let entry = (
                    topic,
                    partition,
                    planned.len(),
                    FRAME_HEADER_LEN + 12 + size,
                );
                match slot {
                    Some(s) => open[s] = entry,
                    None => open.push(entry),
                }
                planned.push(Planned::Bundle {
                    topic,
                    partition,
                    members: vec![i],
                });
            }
        }
    }
    planned
}

/// The bundle of `members`.
pub(super) fn encode(outputs: &[&Output], members: &[usize]) -> Vec<u8> {
    let mut w = BundleWriter::new();
    for &i in members {
        let out = outputs[i];
        w.push(
            &out.key,
            &out.value,
            out.headers.iter().map(|(n, v)| (*n, v.as_slice())),
        );
    }
    w.finish()
}

/// Partition counts of the topics a sink writes, from the cluster's metadata, and the turn of
/// unkeyed batches.
pub(super) struct Partitions {
    /// Topic, partition count (`None`: the metadata did not say), when it was asked.
    known: Mutex<Vec<(String, Option<i32>, Instant)>>,
    /// Unkeyed outputs move to the next partition once per this much time.
    window: Duration,
    started: Instant,
    offset: u32,
}

/// How long a partition count is used before it is asked again (partitions can be added).
const FRESH_FOR: Duration = Duration::from_secs(60);
/// How long a failed look-up stands before it is tried again (its outputs go alone meanwhile).
const RETRY_AFTER: Duration = Duration::from_secs(5);

impl Partitions {
    pub(super) fn new(window: Duration) -> Self {
        Self {
            known: Mutex::new(Vec::new()),
            window: window.max(Duration::from_millis(1)),
            started: Instant::now(),
            offset: rand::random::<u32>() % 1024,
        }
    }

    /// The partition count of `topic`, asked of the cluster when not known or stale.
    pub(super) async fn of(
        &self,
        producer: &Arc<ThreadedProducer<SinkContext>>,
        topic: &str,
    ) -> Option<i32> {
        if let Some(count) = self.cached(topic) {
            return count;
        }
        let asked = {
            let producer = producer.clone();
            let name = topic.to_string();
            tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_metadata(Some(&name), Duration::from_secs(5))
                    .ok()
                    .and_then(|m| {
                        m.topics()
                            .iter()
                            .find(|t| t.name() == name && t.error().is_none())
                            .map(|t| t.partitions().len() as i32)
                    })
                    .filter(|n| *n > 0)
            })
            .await
            .ok()
            .flatten()
        };
        if asked.is_none() {
            tracing::debug!(topic, "partition count not known yet: records go unbundled");
        }
        if let Ok(mut known) = self.known.lock() {
            known.retain(|(t, ..)| t != topic);
            known.push((topic.to_string(), asked, Instant::now()));
        }
        asked
    }

    /// `Some(count)` while the cached answer for `topic` stands.
    pub(super) fn cached(&self, topic: &str) -> Option<Option<i32>> {
        let known = self.known.lock().ok()?;
        let (_, count, at) = known.iter().find(|(t, ..)| t == topic)?;
        let fresh = if count.is_some() {
            FRESH_FOR
        } else {
            RETRY_AFTER
        };
        (at.elapsed() < fresh).then_some(*count)
    }

    /// The current window's number: unkeyed outputs go to this modulo the partition count.
    pub(super) fn turn(&self) -> u32 {
        let windows = self.started.elapsed().as_nanos() / self.window.as_nanos();
        self.offset.wrapping_add(windows as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(key: &str, len: usize) -> Output {
        Output::new(key.as_bytes().to_vec(), vec![1; len])
    }

    #[test]
    fn outputs_of_a_partition_share_a_bundle_until_it_is_full() {
        let outs = [
            out("t/a", 100),
            out("t/b", 100),
            out("t/a", 100),
            out("t/a", 100),
            out("t/c", 10_000),
        ];
        let refs: Vec<&Output> = outs.iter().collect();
        let pa = key_partition(b"t/a", 12);
        let plan = plan(&refs, "topic", 350, |_| Some(12), |_| 0);
        // t/a: two fit in 350 bytes, the third starts a new bundle; t/c is too large.
        let pb = key_partition(b"t/b", 12);
        assert_ne!(pa, pb, "the test needs two partitions");
        assert_eq!(
            plan,
            vec![
                Planned::Bundle {
                    topic: "topic",
                    partition: pa,
                    members: vec![0, 2]
                },
                Planned::Bundle {
                    topic: "topic",
                    partition: pb,
                    members: vec![1]
                },
                Planned::Bundle {
                    topic: "topic",
                    partition: pa,
                    members: vec![3]
                },
                Planned::Single(4),
            ]
        );
        let mut all: Vec<usize> = plan.into_iter().flat_map(Planned::into_members).collect();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 3, 4], "every output once");
    }

    #[test]
    fn topics_apart_unknown_topics_alone_unkeyed_together() {
        let mut other = out("", 10);
        other.topic = Some("other".into());
        let mut unknown = out("t/a", 10);
        unknown.topic = Some("unknown".into());
        let outs = [out("", 10), other, unknown, out("", 10)];
        let refs: Vec<&Output> = outs.iter().collect();
        let plan = plan(
            &refs,
            "topic",
            65_536,
            |t| (t != "unknown").then_some(4),
            |count| 7 % count,
        );
        assert_eq!(
            plan,
            vec![
                Planned::Bundle {
                    topic: "topic",
                    partition: 3,
                    members: vec![0, 3]
                },
                Planned::Bundle {
                    topic: "other",
                    partition: 3,
                    members: vec![1]
                },
                Planned::Single(2),
            ]
        );
    }

    #[test]
    fn a_bundle_holds_its_members_in_order() {
        let mut traced = out("t/b", 5);
        traced.headers.push(("traceparent", b"00-x".to_vec()));
        let outs = [out("t/a", 3), traced];
        let refs: Vec<&Output> = outs.iter().collect();
        let bytes = encode(&refs, &[1, 0]);
        let items = bundle::items(&bytes).expect("a bundle");
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].key, b"t/b");
        assert_eq!(items[0].headers, vec![("traceparent", &b"00-x"[..])]);
        assert_eq!(items[1].value, &[1, 1, 1][..]);
        // The size estimate is never under the encoding.
        let members: Vec<usize> = (0..2).collect();
        let estimate: usize =
            FRAME_HEADER_LEN + 12 + refs.iter().map(|o| item_len(o)).sum::<usize>();
        assert!(encode(&refs, &members).len() <= estimate);
    }
}
