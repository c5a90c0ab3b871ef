//! Consumer lag from librdkafka's statistics: every `statistics.interval.ms` (15 s, set in
//! [`super::KafkaConfig::consumer_config`]) librdkafka hands the consumer's context a JSON
//! report, and [`record_lag`] copies each assigned partition's lag into
//! `iotp_consumer_lag_messages{topic, partition}`. Labels stay bounded (topics and partitions
//! of the topology). Only the fields used here are decoded (rdkafka's full `Statistics` would
//! decode every broker's and partition's counters, and refuse the whole report if one field
//! changed shape), once per interval, off the message path.

use std::collections::HashMap;

use serde::Deserialize;

use crate::metrics::metrics;

#[derive(Deserialize)]
struct Report {
    #[serde(default)]
    topics: HashMap<String, TopicReport>,
}

#[derive(Deserialize)]
struct TopicReport {
    #[serde(default)]
    partitions: HashMap<String, PartitionReport>,
}

#[derive(Deserialize)]
struct PartitionReport {
    partition: i32,
    /// High watermark (or last stable offset) minus the committed offset; -1 when this member
    /// is not assigned the partition or does not know one of the two.
    consumer_lag: i64,
}

/// Set the lag gauge of every partition the report gives a lag for, and drop the series of
/// partitions it gives none for (librdkafka reports -1 for a partition this member is not
/// assigned, or whose committed offset or high watermark it does not know yet): a revoked
/// partition must not keep showing the lag it had here, since its new owner reports it.
/// Returns an error only if the report is not the JSON librdkafka documents.
pub(crate) fn record_lag(json: &[u8]) -> Result<(), serde_json::Error> {
    let report: Report = serde_json::from_slice(json)?;
    let gauge = &metrics().consumer_lag_messages;
    for (topic, t) in &report.topics {
        for p in t.partitions.values() {
            // librdkafka's internal "unassigned" partition.
            if p.partition < 0 {
                continue;
            }
            let partition = p.partition.to_string();
            if p.consumer_lag >= 0 {
                gauge
                    .with_label_values(&[topic.as_str(), partition.as_str()])
                    .set(p.consumer_lag);
            } else {
                // Absent already is the usual case: nothing to remove.
                let _ = gauge.remove_label_values(&[topic.as_str(), partition.as_str()]);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A consumer's report of one topic's partitions, in librdkafka's shape (cut: the real
    /// one has many more fields per client, broker, topic and partition).
    fn report(topic: &str, lags: &[(i32, i64)]) -> Vec<u8> {
        let partitions: serde_json::Map<String, serde_json::Value> = lags
            .iter()
            .map(|&(p, lag)| {
                let part = serde_json::json!({
                    "partition": p, "fetch_state": "active", "hi_offset": 100,
                    "committed_offset": 100 - lag, "consumer_lag": lag, "consumer_lag_stored": lag,
                });
                (p.to_string(), part)
            })
            .collect();
        serde_json::json!({
            "name": "parser-0#consumer-1", "type": "consumer", "brokers": {},
            "topics": { topic: { "topic": topic, "partitions": partitions } },
        })
        .to_string()
        .into_bytes()
    }

    fn lag(topic: &str, partition: &str) -> Option<i64> {
        let series =
            format!("iotp_consumer_lag_messages{{partition=\"{partition}\",topic=\"{topic}\"}} ");
        metrics()
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(&series).map(str::to_string))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn assigned_partitions_report_their_lag_and_revoked_ones_disappear() {
        let topic = "stats-test-topic";
        assert!(record_lag(&report(topic, &[(0, 42), (1, 0), (-1, 7)])).is_ok());
        assert_eq!(lag(topic, "0"), Some(42));
        assert_eq!(lag(topic, "1"), Some(0));
        assert_eq!(lag(topic, "-1"), None, "librdkafka's unassigned partition");
        // Partition 0 revoked: librdkafka reports -1 for it.
        assert!(record_lag(&report(topic, &[(0, -1), (1, 5)])).is_ok());
        assert_eq!(lag(topic, "0"), None);
        assert_eq!(lag(topic, "1"), Some(5));
    }

    #[test]
    fn a_report_of_another_shape_is_an_error() {
        assert!(record_lag(b"{\"topics\": []}").is_err());
    }
}
