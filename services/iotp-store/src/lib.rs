//! The storage contract. Backends: [`sqlite`] (embedded, the default: no server needed) and
//! [`mongo`] (production). [`StoreConfig`] picks one for every service; [`Store`] holds it.
//! The same contract tests run against every backend.
//!
//! Digital twin rules: a device's twin is ordered by the device's own sequence number, so a
//! replayed or late message never moves it backwards; liveness follows the newest heartbeat
//! or reading by device time.

mod backend;
pub mod mongo;
pub mod sqlite;

pub use backend::{Store, StoreConfig};

use std::collections::BTreeMap;
use std::future::Future;

use serde::{Deserialize, Serialize};

/// What one message tells about its device.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Tenant.
    pub tenant: String,
    /// Device id.
    pub device_id: String,
    /// Device sequence number.
    pub seq_no: i64,
    /// Device time, epoch ms.
    pub produced_at: i64,
    /// Readings `(metric, value, unit)` in canonical units.
    pub readings: Vec<(String, f64, Option<String>)>,
    /// Firmware the message reported.
    pub firmware: Option<String>,
    /// Configuration version the registry holds for the device.
    pub config_version: Option<String>,
    /// Expected heartbeat interval, seconds, from the device profile.
    pub heartbeat_secs: Option<u64>,
}

/// The last value of one metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastValue {
    /// Value.
    pub value: f64,
    /// Unit.
    pub unit: Option<String>,
    /// Device time, epoch ms.
    pub at: i64,
    /// Sequence number of the message that carried it.
    pub seq_no: i64,
}

/// A device's digital twin.
#[derive(Debug, Clone, PartialEq)]
pub struct Twin {
    /// Tenant.
    pub tenant: String,
    /// Device id.
    pub device_id: String,
    /// Highest sequence number seen.
    pub last_seq_no: i64,
    /// Newest device time seen, epoch ms.
    pub last_seen_at: i64,
    /// Newest value of each metric.
    pub last_values: BTreeMap<String, LastValue>,
    /// Firmware, from the newest message that reported one.
    pub firmware: Option<String>,
    /// Configuration version.
    pub config_version: Option<String>,
    /// Expected heartbeat interval, seconds.
    pub heartbeat_secs: Option<u64>,
    /// Online: seen within the allowed number of heartbeat intervals.
    pub online: bool,
    /// Active alarms (`offline`, …).
    pub alarms: Vec<String>,
    /// Sequence numbers the device used that were never stored (set by the upserter).
    pub seq_gaps: i64,
}

/// Storage errors. All are worth retrying: the runtime keeps the batch and tries again.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed.
    #[error("store backend: {0}")]
    Backend(String),
}

/// The twin part of the storage contract.
pub trait TwinStore: Send + Sync + 'static {
    /// Fold observations into twins, idempotently: applying the same observations again, or
    /// older ones later, changes nothing.
    fn apply(
        &self,
        observations: &[Observation],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// One twin.
    fn twin(
        &self,
        tenant: &str,
        device_id: &str,
    ) -> impl Future<Output = Result<Option<Twin>, StoreError>> + Send;
    /// Mark online devices offline whose last sign of life (device time) is older than
    /// `missed` heartbeat intervals before `now_ms`; returns how many were marked.
    fn mark_offline(
        &self,
        now_ms: i64,
        missed: u32,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// A parked dead letter in the archive.
#[derive(Debug, Clone, PartialEq)]
pub struct Archived {
    /// The dead letter.
    pub letter: iotp_core::contract::DeadLetter,
    /// When it was parked, epoch ms.
    pub parked_at: i64,
    /// When the archive may forget it, epoch ms.
    pub expires_at: i64,
    /// When it was last replayed, if ever.
    pub replayed_at: Option<i64>,
    /// How often it was replayed.
    pub replays: i64,
}

/// Which archived dead letters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LetterFilter {
    /// Exactly these ids (empty: any).
    pub ids: Vec<String>,
    /// Reason code.
    pub reason: Option<String>,
    /// Stage.
    pub stage: Option<String>,
    /// Tenant.
    pub tenant: Option<String>,
    /// Device.
    pub device_id: Option<String>,
    /// Also those already replayed.
    pub include_replayed: bool,
    /// At most this many (0: 1000).
    pub limit: usize,
}

/// The dead-letter archive part of the storage contract.
pub trait DeadLetterArchive: Send + Sync + 'static {
    /// Archive (or refresh, by id) a parked dead letter until `expires_at`.
    fn archive(
        &self,
        letter: &iotp_core::contract::DeadLetter,
        parked_at: i64,
        expires_at: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Matching dead letters, oldest parked first.
    fn letters(
        &self,
        filter: &LetterFilter,
    ) -> impl Future<Output = Result<Vec<Archived>, StoreError>> + Send;
    /// Record that these were replayed at `at`.
    fn mark_replayed(
        &self,
        ids: &[String],
        at: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Forget what expired before `now_ms`; returns how many.
    fn prune_letters(&self, now_ms: i64) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// One message's readings: the unit of idempotency is (tenant, deviceId, seqNo).
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRecord {
    /// Tenant.
    pub tenant: String,
    /// Device id.
    pub device_id: String,
    /// Device sequence number.
    pub seq_no: i64,
    /// Device message id.
    pub msg_id: String,
    /// Device time, epoch ms.
    pub produced_at: i64,
    /// Bridge time, epoch ms.
    pub received_at: i64,
    /// Site tag.
    pub site: Option<String>,
    /// Asset tag.
    pub asset: Option<String>,
    /// Profile.
    pub profile: String,
    /// `(metric, value, unit)` in canonical units.
    pub readings: Vec<(String, f64, Option<String>)>,
}

impl From<iotp_core::contract::EnrichedTelemetry> for MessageRecord {
    /// The store's view of an enriched record.
    fn from(r: iotp_core::contract::EnrichedTelemetry) -> Self {
        Self {
            tenant: r.header.tenant,
            device_id: r.header.device_id,
            seq_no: r.header.seq_no,
            msg_id: r.header.msg_id,
            produced_at: r.header.produced_at,
            received_at: r.header.received_at,
            site: r.site,
            asset: r.asset,
            profile: r.profile,
            readings: r
                .readings
                .into_iter()
                .map(|x| (x.metric, x.value, x.unit))
                .collect(),
        }
    }
}

/// What a write did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteReport {
    /// Messages newly stored.
    pub stored: u64,
    /// Messages already stored (redeliveries, replays): skipped.
    pub duplicates: u64,
}

/// One stored message as an audit sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Device id.
    pub device_id: String,
    /// Device sequence number.
    pub seq_no: i64,
    /// Device message id.
    pub msg_id: String,
    /// Device time, epoch ms.
    pub produced_at: i64,
    /// When the store took it, epoch ms.
    pub stored_at: i64,
    /// Readings stored for it (more than the device sent means a duplicate).
    pub readings: i64,
}

/// The readings part of the storage contract (raw tier).
pub trait ReadingStore: Send + Sync + 'static {
    /// Store each message exactly once, whatever the redeliveries; the whole batch is durable
    /// when this returns Ok.
    fn write_messages(
        &self,
        messages: &[MessageRecord],
    ) -> impl Future<Output = Result<WriteReport, StoreError>> + Send;
    /// Messages stored (for one tenant, or all).
    fn message_count(
        &self,
        tenant: Option<&str>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Readings stored (for one tenant, or all).
    fn reading_count(
        &self,
        tenant: Option<&str>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// A tenant's stored messages ordered by (deviceId, seqNo), the page after `after`
    /// (exclusive), at most `limit`.
    fn stored_messages(
        &self,
        tenant: &str,
        after: Option<(String, i64)>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StoredMessage>, StoreError>> + Send;
    /// Recompute the seqNo gaps of these devices (numbers between the lowest and highest
    /// stored that were never stored) into their twins; returns the total over them. The
    /// embedded store keeps each device's lowest, highest and count as it writes (so this is
    /// one row per device, and expiring old readings does not turn them into gaps).
    fn update_seq_gaps(
        &self,
        devices: &[(String, String)],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// A roll-up bucket of one metric of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// Tenant.
    pub tenant: String,
    /// Device id.
    pub device_id: String,
    /// Metric.
    pub metric: String,
    /// `hour` or `day`.
    pub granularity: String,
    /// Bucket start, epoch ms (UTC).
    pub bucket_start: i64,
    /// Readings.
    pub count: i64,
    /// Sum.
    pub sum: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
    /// Value with the earliest event time.
    pub first: f64,
    /// Its time.
    pub first_at: i64,
    /// Value with the latest event time.
    pub last: f64,
    /// Its time.
    pub last_at: i64,
    /// Unit.
    pub unit: Option<String>,
    /// Cumulative counter: roll-ups carry last - first.
    pub cumulative: bool,
    /// Grows with every change.
    pub revision: i64,
}

/// Roll-up granularities and their lengths.
pub const GRANULARITIES: [(&str, i64); 2] = [("hour", 3_600_000), ("day", 86_400_000)];

/// What folding a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FoldReport {
    /// Messages folded.
    pub applied: u64,
    /// Messages folded before (redeliveries, replays): skipped.
    pub duplicates: u64,
}

/// The roll-up part of the storage contract.
pub trait RollupStore: Send + Sync + 'static {
    /// Fold each message not folded before into its hour and day buckets, in one transaction,
    /// and raise the watermark (newest event time seen) to `watermark` if higher.
    /// `cumulative(metric)` says which metrics are counters.
    fn fold(
        &self,
        messages: &[MessageRecord],
        cumulative: &[String],
        watermark: i64,
    ) -> impl Future<Output = Result<FoldReport, StoreError>> + Send;
    /// The watermark: newest event time folded.
    fn watermark(&self) -> impl Future<Output = Result<i64, StoreError>> + Send;
    /// Buckets changed since they were last published whose end plus `lateness` is at or
    /// before the watermark.
    fn closed_unpublished(
        &self,
        lateness_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Bucket>, StoreError>> + Send;
    /// Record these buckets (at these revisions) as published.
    fn mark_published(
        &self,
        buckets: &[Bucket],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// All buckets of a device.
    fn buckets(
        &self,
        tenant: &str,
        device_id: &str,
    ) -> impl Future<Output = Result<Vec<Bucket>, StoreError>> + Send;
}

/// Fold one reading into a bucket (or start one).
pub fn fold_reading(
    bucket: Option<Bucket>,
    key: (&str, &str, &str, &str, i64),
    value: f64,
    at: i64,
    unit: &Option<String>,
    cumulative: bool,
) -> Bucket {
    match bucket {
        None => Bucket {
            tenant: key.0.to_string(),
            device_id: key.1.to_string(),
            metric: key.2.to_string(),
            granularity: key.3.to_string(),
            bucket_start: key.4,
            count: 1,
            sum: value,
            min: value,
            max: value,
            first: value,
            first_at: at,
            last: value,
            last_at: at,
            unit: unit.clone(),
            cumulative,
            revision: 1,
        },
        Some(mut b) => {
            b.count += 1;
            b.sum += value;
            b.min = b.min.min(value);
            b.max = b.max.max(value);
            if at < b.first_at {
                b.first = value;
                b.first_at = at;
            }
            if at >= b.last_at {
                b.last = value;
                b.last_at = at;
            }
            b.revision += 1;
            b
        }
    }
}

/// How long each tier keeps its data (the hot/warm/cold tiers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// Raw readings (and the dedup keys that guard them).
    #[serde(with = "humantime_serde")]
    pub raw: std::time::Duration,
    /// Hourly roll-ups.
    #[serde(with = "humantime_serde")]
    pub hourly: std::time::Duration,
    /// Daily roll-ups.
    #[serde(with = "humantime_serde")]
    pub daily: std::time::Duration,
}

impl Default for Retention {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            raw: std::time::Duration::from_secs(180 * DAY),
            hourly: std::time::Duration::from_secs(3 * 365 * DAY),
            daily: std::time::Duration::from_secs(10 * 365 * DAY),
        }
    }
}

impl Retention {
    /// Rules for `validate()`: each tier outlives the finer one.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.raw.is_zero() {
            out.push("retention.raw must be > 0".into());
        }
        if self.hourly < self.raw {
            out.push("retention.hourly must not be shorter than retention.raw".into());
        }
        if self.daily < self.hourly {
            out.push("retention.daily must not be shorter than retention.hourly".into());
        }
        out
    }
}

/// What a pruning pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Raw messages (with their readings).
    pub raw: u64,
    /// Hourly buckets.
    pub hourly: u64,
    /// Daily buckets.
    pub daily: u64,
}

/// Retention enforcement for backends without server-side TTL (the embedded one).
pub trait Pruning: Send + Sync + 'static {
    /// Remove what is older than its tier allows at `now_ms` (event time).
    fn prune(
        &self,
        now_ms: i64,
        retention: &Retention,
    ) -> impl Future<Output = Result<PruneReport, StoreError>> + Send;
}

/// Run a store operation up to `attempts` times, doubling `delay` between tries.
pub async fn with_retries<T, F, Fut>(
    attempts: u32,
    mut delay: std::time::Duration,
    mut op: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < attempts => {
                tracing::warn!(error = %e, attempt, "store operation failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Fold `obs` into `twin` (or a new twin). Pure: the backends share it.
pub fn fold(twin: Option<Twin>, obs: &Observation) -> Twin {
    let mut t = twin.unwrap_or_else(|| Twin {
        tenant: obs.tenant.clone(),
        device_id: obs.device_id.clone(),
        last_seq_no: -1,
        last_seen_at: i64::MIN,
        last_values: BTreeMap::new(),
        firmware: None,
        config_version: None,
        heartbeat_secs: None,
        online: false,
        alarms: Vec::new(),
        seq_gaps: 0,
    });
    for (metric, value, unit) in &obs.readings {
        let newer = t
            .last_values
            .get(metric)
            .is_none_or(|v| obs.seq_no > v.seq_no);
        if newer {
            t.last_values.insert(
                metric.clone(),
                LastValue {
                    value: *value,
                    unit: unit.clone(),
                    at: obs.produced_at,
                    seq_no: obs.seq_no,
                },
            );
        }
    }
    // Device state: the newest observation that carries a field sets it, and an older one
    // fills it while it is unknown. Arrival order is not send order (an MQTT broker with more
    // than one message in flight may reorder: Mosquitto delivered a device's seqNo 0, the only
    // telemetry carrying its firmware, after later ones in the standard load test).
    let newest = obs.seq_no > t.last_seq_no;
    if newest {
        t.last_seq_no = obs.seq_no;
    }
    if obs.firmware.is_some() && (newest || t.firmware.is_none()) {
        t.firmware = obs.firmware.clone();
    }
    if obs.config_version.is_some() && (newest || t.config_version.is_none()) {
        t.config_version = obs.config_version.clone();
    }
    if obs.heartbeat_secs.is_some() && (newest || t.heartbeat_secs.is_none()) {
        t.heartbeat_secs = obs.heartbeat_secs;
    }
    if obs.produced_at > t.last_seen_at {
        t.last_seen_at = obs.produced_at;
        t.online = true;
        t.alarms.retain(|a| a != "offline");
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(seq_no: i64, at: i64, value: f64) -> Observation {
        Observation {
            tenant: "t".into(),
            device_id: "d".into(),
            seq_no,
            produced_at: at,
            readings: vec![("temp".into(), value, Some("Cel".into()))],
            firmware: Some(format!("fw-{seq_no}")),
            config_version: None,
            heartbeat_secs: Some(60),
        }
    }

    #[test]
    fn any_order_and_replays_end_at_the_newest_state() {
        let all = [obs(1, 1000, 10.0), obs(2, 2000, 20.0), obs(3, 3000, 30.0)];
        let orders: [[usize; 5]; 3] = [[0, 1, 2, 2, 0], [2, 1, 0, 1, 2], [1, 2, 0, 0, 1]];
        let mut results = Vec::new();
        for order in orders {
            let mut twin = None;
            for i in order {
                twin = Some(fold(twin, &all[i]));
            }
            results.push(twin.expect("twin"));
        }
        for t in &results {
            assert_eq!(t.last_seq_no, 3);
            assert_eq!(t.last_seen_at, 3000);
            assert_eq!(t.last_values["temp"].value, 30.0);
            assert_eq!(t.firmware.as_deref(), Some("fw-3"));
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn state_only_an_older_message_carried_is_kept_when_it_arrives_late() {
        let first = Observation {
            firmware: Some("fw-0".into()),
            config_version: Some("cfg-0".into()),
            ..obs(0, 1000, 1.0)
        };
        let later = Observation {
            firmware: None,
            heartbeat_secs: None,
            ..obs(5, 5000, 5.0)
        };
        let t = fold(Some(fold(None, &later)), &first);
        assert_eq!(t.last_seq_no, 5);
        assert_eq!(t.last_values["temp"].value, 5.0);
        assert_eq!(
            (
                t.firmware.as_deref(),
                t.config_version.as_deref(),
                t.heartbeat_secs
            ),
            (Some("fw-0"), Some("cfg-0"), Some(60))
        );
        let newer = Observation {
            firmware: Some("fw-6".into()),
            ..obs(6, 6000, 6.0)
        };
        let t = fold(Some(t), &newer);
        assert_eq!(t.firmware.as_deref(), Some("fw-6"), "the newest still wins");
    }
}
