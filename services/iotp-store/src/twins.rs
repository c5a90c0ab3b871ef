//! The twin part of the storage contract: what a message tells about its device
//! ([`Observation`]), the device's digital twin ([`Twin`]), and [`TwinStore`]. A twin is ordered
//! by the device's own sequence number, so a replayed or late message never moves it backwards;
//! liveness follows the newest heartbeat or reading by device time. The fold itself is
//! [`crate::fold::fold`], shared by every backend.

use std::collections::BTreeMap;
use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::StoreError;

/// What one message tells about its device.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Tenant (an MQTT topic level: no `/`); with `device_id`, the twin's key.
    pub tenant: String,
    /// Device id, unique within the tenant (an MQTT topic level: no `/`).
    pub device_id: String,
    /// The device's own sequence number of the message: orders the twin's state.
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
    /// Value, in the metric's canonical unit.
    pub value: f64,
    /// Canonical unit (UCUM-style code such as `Cel`, `Wh`), if the metric has one.
    pub unit: Option<String>,
    /// Device time of the message that carried it, epoch ms.
    pub at: i64,
    /// Sequence number of the message that carried it.
    pub seq_no: i64,
}

/// A device's digital twin.
#[derive(Debug, Clone, PartialEq)]
pub struct Twin {
    /// Tenant; with `device_id`, the twin's key.
    pub tenant: String,
    /// Device id, unique within the tenant.
    pub device_id: String,
    /// Highest sequence number seen (-1 before the first message with one).
    pub last_seq_no: i64,
    /// Newest device time seen, epoch ms.
    pub last_seen_at: i64,
    /// Newest value of each metric (by sequence number), by metric name.
    pub last_values: BTreeMap<String, LastValue>,
    /// Firmware, from the newest message that reported one.
    pub firmware: Option<String>,
    /// Configuration version the registry held, from the newest message that carried one.
    pub config_version: Option<String>,
    /// Expected heartbeat interval, seconds, from the device profile; without one a device is
    /// never marked offline.
    pub heartbeat_secs: Option<u64>,
    /// Online: seen within the allowed number of heartbeat intervals.
    pub online: bool,
    /// Active alarms (`offline`, …).
    pub alarms: Vec<String>,
    /// Sequence numbers the device used that were never stored (set by the upserter).
    pub seq_gaps: i64,
}

/// The twin part of the storage contract. No method retries by itself; each may be called
/// again after a transient error ([`StoreError::is_transient`]), as its doc says why.
pub trait TwinStore: Send + Sync + 'static {
    /// Fold observations into twins, idempotently: applying the same observations again, or
    /// older ones later, changes nothing.
    ///
    /// Safe to call again: the embedded store applies the batch in one transaction (all or
    /// nothing); MongoDB writes twin by twin, so a failed call may have written some twins of
    /// the batch, but because the fold is idempotent those fold to themselves when the batch
    /// is applied again (and are not written), while the rest are folded then. A twin changed
    /// by another writer since it was read is a [`StoreError::Conflict`].
    ///
    /// Takes the batch: the embedded store hands it to its blocking thread as it is, where a
    /// borrowed batch had to be copied record by record first.
    fn apply(
        &self,
        observations: Vec<Observation>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// One twin. A read: safe to call again.
    fn twin(
        &self,
        tenant: &str,
        device_id: &str,
    ) -> impl Future<Output = Result<Option<Twin>, StoreError>> + Send;
    /// Mark online devices offline whose last sign of life (device time) is older than
    /// `missed` heartbeat intervals before `now_ms`; returns how many were marked.
    ///
    /// Safe to call again: a device already marked is no longer online, so it is neither
    /// marked nor counted twice (after a partial MongoDB update the count of the call made
    /// again covers only what that call marked).
    fn mark_offline(
        &self,
        now_ms: i64,
        missed: u32,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// How many twins are online and how many offline, over every tenant. A read: safe to
    /// call again.
    fn liveness_counts(&self) -> impl Future<Output = Result<LivenessCounts, StoreError>> + Send;
}

/// Twins by liveness ([`TwinStore::liveness_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LivenessCounts {
    /// Twins marked online.
    pub online: u64,
    /// Twins marked offline (missed heartbeats).
    pub offline: u64,
}
