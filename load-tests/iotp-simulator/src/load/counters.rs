//! The services' counters over the run, whatever replicas come and go: each replica's
//! counters are scraped every second and the last values of every replica that ever lived are
//! summed, so a killed or scaled-in replica's counts stay in the totals (up to its last
//! scrape). The totals are kept per second, for what each chaos fault cost.

use std::collections::HashMap;

use iotp_core::probe::sample_sum;

use crate::stack::Member;

/// The counters read per hop, by service: duplicates between hops show here (they are removed
/// at the store).
pub const HOP_COUNTERS: [(&str, &str); 17] = [
    ("mqtt-bridge", "iotp_mqtt_received_messages_total"),
    ("mqtt-bridge", "iotp_mqtt_acked_messages_total"),
    ("mqtt-bridge", "iotp_mqtt_superseded_acks_total"),
    ("mqtt-bridge", "iotp_kafka_produced_messages_total"),
    ("mqtt-bridge", "iotp_dead_letters_total"),
    ("parser", "iotp_kafka_produced_messages_total"),
    ("parser", "iotp_dead_letters_total"),
    ("enricher", "iotp_kafka_produced_messages_total"),
    ("enricher", "iotp_dead_letters_total"),
    ("parser", "iotp_consumer_offset_gaps_total"),
    ("enricher", "iotp_consumer_offset_gaps_total"),
    ("upserter", "iotp_consumer_offset_gaps_total"),
    ("parser", "iotp_consumer_rereads_total"),
    ("enricher", "iotp_consumer_rereads_total"),
    ("upserter", "iotp_consumer_rereads_total"),
    ("upserter", "iotp_messages_stored_total"),
    ("upserter", "iotp_duplicates_removed_total"),
];

const N: usize = HOP_COUNTERS.len();

/// The [`HOP_COUNTERS`] of every replica that lived.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// Each replica's (name, pid: one life of it) last values.
    last: HashMap<(String, u32), [f64; N]>,
    /// The totals after each round of scrapes: (epoch ms, totals).
    series: Vec<(i64, [f64; N])>,
}

impl Counters {
    /// Note what replica `m` says (`text`, its Prometheus page).
    pub fn observe(&mut self, m: &Member, text: &str) {
        let mut values = [0.0; N];
        for (i, (service, metric)) in HOP_COUNTERS.iter().enumerate() {
            if m.service == *service {
                values[i] = sample_sum(text, metric, &[]);
            }
        }
        self.last.insert((m.replica.clone(), m.pid), values);
    }

    /// Keep the totals as of `at` (epoch ms).
    pub fn record(&mut self, at: i64) {
        let totals = self.totals();
        self.series.push((at, totals));
    }

    fn totals(&self) -> [f64; N] {
        let mut out = [0.0; N];
        for values in self.last.values() {
            for (o, v) in out.iter_mut().zip(values) {
                *o += v;
            }
        }
        out
    }

    fn index(service: &str, metric: &str) -> Option<usize> {
        HOP_COUNTERS
            .iter()
            .position(|(s, m)| *s == service && *m == metric)
    }

    /// The total of one counter now, over every replica that lived.
    pub fn total(&self, service: &str, metric: &str) -> f64 {
        Self::index(service, metric).map_or(0.0, |i| self.totals()[i])
    }

    /// One counter's totals over time: (epoch ms, value).
    pub fn series(&self, service: &str, metric: &str) -> Vec<(i64, f64)> {
        let Some(i) = Self::index(service, metric) else {
            return Vec::new();
        };
        self.series.iter().map(|(at, v)| (*at, v[i])).collect()
    }

    /// Every counter's total: `service: metric` and its value.
    pub fn hops(&self) -> Vec<(String, i64)> {
        let totals = self.totals();
        HOP_COUNTERS
            .iter()
            .zip(totals)
            .map(|((s, m), v)| (format!("{s}: {m}"), v as i64))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(service: &str, replica: &str, pid: u32) -> Member {
        Member {
            service: service.into(),
            replica: replica.into(),
            pid,
            admin_port: 1,
        }
    }

    #[test]
    fn a_replica_that_died_keeps_its_counts_and_its_next_life_adds_to_them() {
        let mut c = Counters::default();
        let text = |n: u64| {
            format!(
                "iotp_duplicates_removed_total {n}\niotp_messages_stored_total {}\n",
                n * 10
            )
        };
        c.observe(&member("upserter", "load-upserter-0", 10), &text(3));
        c.observe(&member("upserter", "load-upserter-1", 11), &text(1));
        c.record(1000);
        // upserter-0 killed, started again: a new pid counting from 0.
        c.observe(&member("upserter", "load-upserter-0", 12), &text(2));
        c.record(2000);
        assert_eq!(c.total("upserter", "iotp_duplicates_removed_total"), 6.0);
        assert_eq!(c.total("upserter", "iotp_messages_stored_total"), 60.0);
        assert_eq!(
            c.series("upserter", "iotp_duplicates_removed_total"),
            [(1000, 4.0), (2000, 6.0)]
        );
        // The parser's counters are not read from the upserter's page.
        assert_eq!(c.total("parser", "iotp_consumer_rereads_total"), 0.0);
        assert_eq!(c.hops().len(), HOP_COUNTERS.len());
    }
}
